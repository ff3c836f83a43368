//! `weightinit healthcheck`: asks a server's grpc.health.v1 whether it is SERVING, over
//! plaintext, TLS or mutual TLS ([`ClientSecurity`]).

use std::time::Duration;

use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

use super::target::{Caller, ClientSecurity, Unreachable};

type Error = Box<dyn std::error::Error + Send + Sync>;

/// Whether the server at `addr` (e.g. `http://127.0.0.1:50051`) reports SERVING for
/// `service` ("" = the whole server) within `timeout`.
pub async fn is_serving(
    addr: &str,
    service: &str,
    timeout: Duration,
) -> Result<bool, Box<dyn std::error::Error>> {
    is_serving_with(addr, service, timeout, &ClientSecurity::default())
        .await
        .map_err(|e| e as Box<dyn std::error::Error>)
}

/// [`is_serving`] over TLS or with a token, as `security` says. Failures name the address
/// and the cause ([`Unreachable`]) when the connection is what failed.
pub async fn is_serving_with(
    addr: &str,
    service: &str,
    timeout: Duration,
    security: &ClientSecurity,
) -> Result<bool, Error> {
    let caller = Caller::Cli("--addr");
    let security = security.read()?;
    let target = security.target(addr, caller)?;
    let channel = security
        .endpoint(&target)?
        .connect_timeout(timeout)
        .timeout(timeout)
        .connect()
        .await
        .map_err(|e| match Unreachable::diagnose(&e, &target) {
            Some(unreachable) => Box::new(unreachable) as Error,
            None => chain(&e).into(),
        })?;
    let mut request = tonic::Request::new(HealthCheckRequest {
        service: service.to_owned(),
    });
    if let Some(value) = security.authorization(caller)? {
        request.metadata_mut().insert("authorization", value);
    }
    let response = match HealthClient::new(channel).check(request).await {
        Ok(response) => response,
        Err(status) => {
            return Err(
                match Unreachable::explain(&status, &target, &security).await {
                    Some(unreachable) => Box::new(unreachable),
                    None => format!("{:?}: {}", status.code(), status.message()).into(),
                },
            );
        }
    };
    Ok(response.into_inner().status == ServingStatus::Serving as i32)
}

/// An error and its causes, `a: b: c` (a transport error alone says only "transport error"),
/// without the repetitions of wrappers that print their cause too.
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.ends_with(&cause_text) {
            text = format!("{text}: {cause_text}");
        }
        source = cause.source();
    }
    text
}
