//! Every case of the v1 vectors (an independent implementation's digests) must match, in
//! process through the engine and over gRPC through Generate, TensorEnd and Digest.

use crate::util::{TestServer, check_served, engine_dtype, generate, vectors};
use weightinit::engine::{Isa, Limits};
use weightinit::service::convert;

/// With each instruction set this CPU has (the hot loops have a copy per set, and a machine
/// with AVX-512 would otherwise never run the others), every vector matches.
#[test]
fn engine_matches_every_vector() {
    let sets = Isa::ALL.into_iter().filter(|isa| *isa <= Isa::detected());
    for isa in sets {
        Isa::set_max(isa);
        assert_eq!(Isa::active(), isa);
        engine_matches_vectors(isa);
    }
    Isa::set_max(Isa::Avx512);
}

fn engine_matches_vectors(isa: Isa) {
    for case in vectors().cases {
        let request = convert::request(&case.request()).unwrap();
        let plan = request.plan(&Limits::default()).unwrap();
        assert_eq!(plan.tensors.len(), case.expect.len(), "{}", case.case);
        for (tensor, expected) in plan.tensors.iter().zip(&case.expect) {
            let mut data = vec![0u8; tensor.byte_length() as usize];
            tensor.fill(0, &mut data);
            assert_eq!(tensor.name, expected.name);
            assert_eq!(
                data.len() as u64,
                expected.byte_length,
                "{}/{}",
                case.case,
                expected.name
            );
            assert_eq!(
                blake3::hash(&data).to_hex().as_str(),
                expected.blake3,
                "{}/{} with {isa}",
                case.case,
                expected.name
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generate_and_digest_match_every_vector() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    for case in vectors().cases {
        let received = generate(&mut client, case.request()).await;
        let digests = client
            .digest(case.request())
            .await
            .unwrap()
            .into_inner()
            .digests;
        check_served(&case, &received, &digests);
        for (tensor, expected) in received.iter().zip(&case.expect) {
            let what = format!("{}/{}", case.case, expected.name);
            // first_values went through a float printer: compare them rounded to the dtype.
            let dtype = engine_dtype(tensor.header.dtype);
            let mut want = vec![0u8; expected.first_values.len() * dtype.size()];
            dtype.encode(&expected.first_values, &mut want);
            assert_eq!(tensor.data[..want.len()], want, "{what}: first values");
        }
    }
}
