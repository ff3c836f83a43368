//! `weightinit healthcheck`: asks a server's grpc.health.v1 whether it is SERVING.

use std::time::Duration;

use tonic::transport::Endpoint;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

/// Whether the server at `addr` (e.g. `http://127.0.0.1:50051`) reports SERVING for
/// `service` ("" = the whole server) within `timeout`.
pub async fn is_serving(
    addr: &str,
    service: &str,
    timeout: Duration,
) -> Result<bool, Box<dyn std::error::Error>> {
    let channel = Endpoint::from_shared(addr.to_owned())?
        .connect_timeout(timeout)
        .timeout(timeout)
        .connect()
        .await?;
    let response = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: service.to_owned(),
        })
        .await?;
    Ok(response.into_inner().status == ServingStatus::Serving as i32)
}
