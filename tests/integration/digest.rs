//! The pipeline hashes blocks in parallel and merges their BLAKE3 subtrees: TensorEnd and
//! Digest must still be exactly `blake3::hash` of the bytes, for every length (empty, one
//! element, around block boundaries, many blocks, odd sizes), and the chunks must stay
//! contiguous, in order, whole elements, and at most chunk_bytes.

use crate::util::{TestServer, generate};
use serde_json::json;
use weightinit::engine::blocks::BLOCK_BYTES;
use weightinit::proto::GenerateRequest;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn digests_are_blake3_of_the_bytes_for_every_length() {
    let server = TestServer::start_with(|c| c.workers = Some(3)).await;
    let mut client = server.client().await;
    let block = BLOCK_BYTES as u64;
    // (dtype, element size, byte lengths)
    let cases = [
        (
            "DTYPE_FLOAT32",
            4u64,
            vec![
                0,
                4,
                block - 4,
                block,
                block + 4,
                2 * block,
                3 * block + 12,
                9 * block + 8,
            ],
        ),
        (
            "DTYPE_FLOAT16",
            2,
            vec![2, 2 * block - 2, 4 * block + 2, 5 * block + 1002],
        ),
        ("DTYPE_FLOAT64", 8, vec![8, block + 8, 7 * block - 8]),
        ("DTYPE_BFLOAT16", 2, vec![1234, block / 2 + 6]),
    ];
    for (dtype, size, lengths) in cases {
        for (i, bytes) in lengths.into_iter().enumerate() {
            for chunk_bytes in [0u32, 1000, 3 << 20] {
                let request: GenerateRequest = serde_json::from_value(json!({
                    "seed": 17, "dtype": dtype, "chunkBytes": chunk_bytes, "tensors": [
                        {"name": format!("t{i}"), "shape": [bytes / size], "init": {"normal": {}}},
                        {"name": "small", "shape": [3], "init": {"uniform": {}}}]
                }))
                .unwrap();
                let what = format!("{dtype}, {bytes} bytes, chunk_bytes {chunk_bytes}");
                let received = generate(&mut client, request.clone()).await;
                let digests = client.digest(request).await.unwrap().into_inner().digests;
                // Digest has no headers: each digest names its tensor.
                let names: Vec<&str> = digests.iter().map(|d| d.name.as_str()).collect();
                assert_eq!(names, [format!("t{i}").as_str(), "small"], "{what}");
                for (tensor, digest) in received.iter().zip(&digests) {
                    let want = blake3::hash(&tensor.data);
                    assert_eq!(tensor.blake3, want.as_bytes(), "{what}: TensorEnd");
                    assert_eq!(digest.blake3, want.as_bytes(), "{what}: Digest");
                    let limit = if chunk_bytes == 0 {
                        1 << 20
                    } else {
                        chunk_bytes as usize
                    };
                    for &n in &tensor.chunk_sizes {
                        assert!(
                            n > 0 && n <= limit && (n as u64).is_multiple_of(size),
                            "{what}: chunk {n}"
                        );
                    }
                }
                assert_eq!(received[0].data.len() as u64, bytes, "{what}");
            }
        }
    }
}
