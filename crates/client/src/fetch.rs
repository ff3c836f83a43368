//! `weightinit fetch`: a request's tensors streamed to disk, verified, and resumed after
//! interruptions.
//!
//! Describe gives every tensor's size first, so the output is laid out before any data
//! arrives; each chunk is then written in place at its offset, hashed, and dropped: memory
//! stays bounded whatever the model size. Every stream's TensorEnd digest is checked against
//! the bytes written.
//!
//! A stream that breaks for a reason another attempt can cure is followed, after a backoff, by
//! a Generate for what is missing only: finished tensors are skipped; an unsliced or
//! flat-sliced tensor continues from its last element with a flat slice of the full tensor;
//! a tensor with a dims or shard slice starts again (what it still lacks is no single flat
//! range). A continued tensor's hash keeps running over its whole bytes while the
//! continuation's TensorEnd covers only its own range, so both are hashed; once complete,
//! the whole is compared with a Digest of the original tensor, which costs no transfer.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio_stream::StreamExt;
use tonic::{Request, Status};

use super::output::{self, Format, Output, OutputError, Provenance};
use super::progress::{Progress, human_bytes};
use super::remote::{Checked, IntegrityError, StreamCheck, VerifyError, verify};
use super::retry::{self, Backoff, RetryPolicy};
use super::source::{Server, SourceArgs, SourceError, status_text};
use weightinit_proto::{GenerateRequest, Range, Slice, TensorHeader, TensorSpec, slice};

#[derive(clap::Args, Debug)]
pub struct FetchArgs {
    #[command(flatten)]
    pub source: SourceArgs,
    /// Where to write: NAME.safetensors; a directory of NAME.npy files (a path ending in /
    /// or an existing directory); NAME.bin or NAME.raw for the raw bytes in request order.
    #[arg(long, short)]
    pub out: PathBuf,
    /// The format, instead of guessing it from --out. NumPy has no bfloat16: npy files hold
    /// bfloat16 tensors as '<u2' with the raw bf16 bits.
    #[arg(long)]
    pub format: Option<Format>,
    /// Failed attempts in a row, without progress in between, before giving up.
    #[arg(long, default_value_t = 8)]
    pub retries: u32,
    /// No progress line, retry notes or summary: errors only.
    #[arg(long, short)]
    pub quiet: bool,
    /// Write even when the output's file system reports less free space than the output
    /// needs (checked before anything is written).
    #[arg(long)]
    pub no_space_check: bool,
}

/// Why a fetch failed.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Output(#[from] OutputError),
    /// The server refused or failed an RPC.
    #[error("{}", status_text(.0))]
    Rpc(#[from] Status),
    /// A stream ended before its last tensor did.
    #[error("the stream ended early")]
    Interrupted,
    /// The server broke the protocol: messages out of order, sizes that disagree.
    #[error("the server broke the protocol: {0}")]
    Protocol(String),
    #[error(transparent)]
    Verify(#[from] VerifyError),
    /// Transient failures of `what`, `attempts` in a row; the last one.
    #[error(
        "{what}: gave up after {attempts} failed attempts in a row (--retries sets how many): \
         {last}"
    )]
    GaveUp {
        what: String,
        attempts: u32,
        #[source]
        last: Box<FetchError>,
    },
    /// SIGINT or SIGTERM arrived; the partial output has been removed.
    #[error(
        "stopped by {}; the partial output was removed (a fetch cannot resume across runs: run \
         it again to start over)",
        .0.name()
    )]
    Stopped(Signal),
}

/// A signal that stops a fetch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Signal {
    Interrupt,
    Terminate,
}

impl Signal {
    fn name(self) -> &'static str {
        match self {
            Self::Interrupt => "SIGINT",
            Self::Terminate => "SIGTERM",
        }
    }

    /// The exit code of a process that ends on this signal, as shells report it.
    pub fn exit_code(self) -> u8 {
        match self {
            Self::Interrupt => 128 + 2,
            Self::Terminate => 128 + 15,
        }
    }
}

impl From<IntegrityError> for FetchError {
    fn from(error: IntegrityError) -> Self {
        match error {
            IntegrityError::Protocol(what) => Self::Protocol(what),
            IntegrityError::Digest(error) => Self::Verify(error),
        }
    }
}

impl FetchError {
    fn is_transient(&self) -> bool {
        match self {
            Self::Rpc(status) => retry::is_transient(status),
            Self::Interrupted => true,
            _ => false,
        }
    }
}

/// The slice asking for what `spec` asks for from element `done` on, when one flat slice
/// can say it: for a whole tensor of `numel` elements, or a flat range. `None` for dims and
/// shard slices.
pub fn continuation(spec: &TensorSpec, numel: u64, done: u64) -> Option<Slice> {
    let (start, stop) = match spec.slice.as_ref().and_then(|s| s.kind.as_ref()) {
        None => (0, numel),
        Some(slice::Kind::Flat(range)) => (range.start, range.stop),
        Some(slice::Kind::Dims(_) | slice::Kind::Shard(_)) => return None,
    };
    Some(Slice {
        kind: Some(slice::Kind::Flat(Range {
            start: start + done,
            stop,
        })),
    })
}

/// How a fetch went.
#[derive(Debug)]
pub struct Summary {
    pub tensors: usize,
    pub bytes: u64,
    pub elapsed: Duration,
    /// Failed attempts that were retried.
    pub retried: u32,
}

/// Fetches every tensor of `request` from `server` into `out`, retrying per `policy`; with
/// `check_space`, only when the output fits in the free space.
pub async fn fetch<S: Server + ?Sized>(
    server: &S,
    request: &GenerateRequest,
    out: &Path,
    format: Format,
    policy: RetryPolicy,
    check_space: bool,
    progress: &mut Progress,
) -> Result<Summary, FetchError> {
    let mut backoff = Backoff::new(policy);
    let manifest = loop {
        match describe(server, request).await {
            Ok(manifest) => break manifest,
            Err(error) => recover(&mut backoff, error, false, "Describe", progress).await?,
        }
    };
    let provenance = Provenance {
        seed: request.seed,
        algorithm: manifest.first().map_or(request.algorithm, |h| h.algorithm),
    };
    let output = Output::create(format, out, &manifest, provenance, check_space)?;
    let mut assembly = Assembly::new(request, &manifest, &output)?;
    let total = manifest.iter().map(|h| h.byte_length).sum();
    progress.start(total);
    loop {
        let before = assembly.progress();
        match assembly.attempt(server, progress).await {
            Ok(()) => break,
            Err(error) => {
                let progressed = assembly.progress() != before;
                let what = format!(
                    "Generate ({} of {} to go)",
                    human_bytes(total - assembly.done),
                    human_bytes(total)
                );
                recover(&mut backoff, error, progressed, &what, progress).await?;
            }
        }
    }
    progress.finish();
    let (digests, bytes) = (assembly.digests(), assembly.done);
    output.commit(&digests)?;
    Ok(Summary {
        tensors: manifest.len(),
        bytes,
        elapsed: progress.elapsed(),
        retried: backoff.retried(),
    })
}

/// Every tensor's header, checked to match the request.
async fn describe<S: Server + ?Sized>(
    server: &S,
    request: &GenerateRequest,
) -> Result<Vec<TensorHeader>, FetchError> {
    let manifest = server
        .describe(Request::new(request.clone()))
        .await?
        .into_inner()
        .tensors;
    let names = manifest.iter().map(|h| &h.name);
    if !names.eq(request.tensors.iter().map(|t| &t.name)) {
        return Err(FetchError::Protocol(
            "Describe does not list the request's tensors".into(),
        ));
    }
    Ok(manifest)
}

/// After a failed attempt at `what`: waits and returns when another attempt is worth it,
/// or else returns the error.
async fn recover(
    backoff: &mut Backoff,
    error: FetchError,
    progressed: bool,
    what: &str,
    progress: &mut Progress,
) -> Result<(), FetchError> {
    if !error.is_transient() {
        return Err(error);
    }
    let Some(wait) = backoff.next(progressed) else {
        return Err(FetchError::GaveUp {
            what: what.to_owned(),
            attempts: backoff.failures(),
            last: Box::new(error),
        });
    };
    progress.note(&format!(
        "{what}: {error}; retrying in {:.1}s (retry {} of {} before giving up)",
        wait.as_secs_f64(),
        backoff.failures(),
        backoff.retries()
    ));
    tokio::time::sleep(wait).await;
    Ok(())
}

/// Where a tensor's verification stands.
#[derive(Clone, Copy, Debug)]
enum Digest {
    Pending,
    /// Every byte is written and every stream's TensorEnd matched, but no one stream covered
    /// the whole tensor: its hash awaits a Digest of the original.
    Unconfirmed(blake3::Hash),
    Verified(blake3::Hash),
}

/// One tensor of the output.
struct Tensor {
    byte_length: u64,
    element_bytes: u64,
    /// Elements of the full tensor, to continue an unsliced one.
    numel: u64,
    /// Bytes `[0, written)` are on disk and in `hasher`.
    written: u64,
    /// Only while the tensor is partly written: a whole model's hashers would not be small.
    hasher: Option<Box<blake3::Hasher>>,
    /// Some of the bytes came from a continuation stream.
    resumed: bool,
    digest: Digest,
}

/// One tensor's part of one Generate stream (its bytes from where it stood), whose
/// [`StreamCheck`] hashes that part alone for its TensorEnd.
struct Segment {
    tensor: usize,
}

/// The tensors of a fetch and where each stands, fed by Generate streams.
struct Assembly<'a> {
    request: &'a GenerateRequest,
    manifest: &'a [TensorHeader],
    output: &'a Output,
    tensors: Vec<Tensor>,
    /// Bytes on disk now (a tensor that starts again counts from zero again).
    done: u64,
    /// The most bytes ever on disk at once: a tensor that starts again only makes progress
    /// once it gets further than before.
    furthest: u64,
    /// Ends and confirmations so far.
    settled: u64,
}

fn protocol(what: impl Into<String>) -> FetchError {
    FetchError::Protocol(what.into())
}

impl<'a> Assembly<'a> {
    fn new(
        request: &'a GenerateRequest,
        manifest: &'a [TensorHeader],
        output: &'a Output,
    ) -> Result<Self, FetchError> {
        let tensors = manifest
            .iter()
            .map(|header| {
                Ok(Tensor {
                    byte_length: header.byte_length,
                    element_bytes: output::dtype(header)?.size() as u64,
                    numel: header.shape.iter().product(),
                    written: 0,
                    hasher: None,
                    resumed: false,
                    digest: Digest::Pending,
                })
            })
            .collect::<Result<_, OutputError>>()?;
        Ok(Self {
            request,
            manifest,
            output,
            tensors,
            done: 0,
            furthest: 0,
            settled: 0,
        })
    }

    /// What an attempt that got anywhere changes.
    fn progress(&self) -> (u64, u64) {
        (self.furthest, self.settled)
    }

    /// One Generate for every tensor still missing, then a Digest for those it completed
    /// from more than one stream.
    async fn attempt<S: Server + ?Sized>(
        &mut self,
        server: &S,
        progress: &mut Progress,
    ) -> Result<(), FetchError> {
        let pending: Vec<usize> = (0..self.tensors.len())
            .filter(|&i| matches!(self.tensors[i].digest, Digest::Pending))
            .collect();
        if !pending.is_empty() {
            let request = self.remaining(&pending);
            progress.update(self.done);
            let stream = server.generate(Request::new(request)).await?.into_inner();
            tokio::pin!(stream);
            let names = pending.iter().map(|&i| self.manifest[i].name.clone());
            let mut check = StreamCheck::new(names.collect());
            let mut segment: Option<Segment> = None;
            while let Some(message) = stream.next().await {
                match check.check(message?)? {
                    Checked::Header(header) => {
                        segment = Some(self.begin(pending[check.ended()], &header)?);
                    }
                    Checked::Data { data, .. } => {
                        let part = segment.as_ref().expect("the check puts data in a tensor");
                        self.chunk(part, &data)?;
                        progress.update(self.done);
                    }
                    Checked::End => {
                        let part = segment.take().expect("the check puts ends in a tensor");
                        self.end(part);
                    }
                }
            }
            if !check.complete() {
                return Err(FetchError::Interrupted);
            }
        }
        self.confirm(server).await
    }

    /// The request for the `pending` tensors, each continuing where it stopped when it can,
    /// or else starting again.
    fn remaining(&mut self, pending: &[usize]) -> GenerateRequest {
        let mut tensors = Vec::with_capacity(pending.len());
        for &i in pending {
            let mut spec = self.request.tensors[i].clone();
            let tensor = &mut self.tensors[i];
            if tensor.written > 0 {
                let resume = tensor
                    .written
                    .is_multiple_of(tensor.element_bytes)
                    .then(|| {
                        continuation(&spec, tensor.numel, tensor.written / tensor.element_bytes)
                    })
                    .flatten();
                match resume {
                    Some(slice) => {
                        spec.slice = Some(slice);
                        tensor.resumed = true;
                    }
                    None => {
                        self.done -= tensor.written;
                        tensor.written = 0;
                        tensor.hasher = None;
                    }
                }
            }
            tensors.push(spec);
        }
        GenerateRequest {
            tensors,
            ..self.request.clone()
        }
    }

    /// A segment of tensor `index`, whose header must agree with Describe's from where the
    /// tensor stands.
    fn begin(&mut self, index: usize, header: &TensorHeader) -> Result<Segment, FetchError> {
        let expected = &self.manifest[index];
        let tensor = &self.tensors[index];
        if header.name != expected.name
            || header.dtype != expected.dtype
            || header.byte_length != tensor.byte_length - tensor.written
        {
            return Err(protocol(format!(
                "the header of {:?} disagrees with Describe",
                expected.name
            )));
        }
        Ok(Segment { tensor: index })
    }

    /// Writes the next bytes of `segment`'s tensor (the check keeps them in order and within
    /// its length).
    fn chunk(&mut self, segment: &Segment, data: &[u8]) -> Result<(), FetchError> {
        let tensor = &mut self.tensors[segment.tensor];
        let len = data.len() as u64;
        self.output.write(segment.tensor, tensor.written, data)?;
        tensor.hasher.get_or_insert_default().update(data);
        tensor.written += len;
        self.done += len;
        self.furthest = self.furthest.max(self.done);
        Ok(())
    }

    /// `segment`'s tensor is complete and its stream's part checked: verified if that part
    /// was the whole tensor, else to be confirmed by a Digest.
    fn end(&mut self, segment: Segment) {
        let tensor = &mut self.tensors[segment.tensor];
        let whole = tensor.hasher.take().unwrap_or_default().finalize();
        tensor.digest = if tensor.resumed {
            Digest::Unconfirmed(whole)
        } else {
            Digest::Verified(whole)
        };
        self.settled += 1;
    }

    /// Compares every unconfirmed tensor with a Digest of the original tensor.
    async fn confirm<S: Server + ?Sized>(&mut self, server: &S) -> Result<(), FetchError> {
        let unconfirmed: Vec<usize> = (0..self.tensors.len())
            .filter(|&i| matches!(self.tensors[i].digest, Digest::Unconfirmed(_)))
            .collect();
        if unconfirmed.is_empty() {
            return Ok(());
        }
        let request = GenerateRequest {
            tensors: unconfirmed
                .iter()
                .map(|&i| self.request.tensors[i].clone())
                .collect(),
            ..self.request.clone()
        };
        let digests = server
            .digest(Request::new(request))
            .await?
            .into_inner()
            .digests;
        if digests.len() != unconfirmed.len() {
            return Err(protocol("Digest does not list every tensor asked for"));
        }
        for (&i, sent) in unconfirmed.iter().zip(&digests) {
            let tensor = &mut self.tensors[i];
            if let Digest::Unconfirmed(whole) = tensor.digest {
                verify(&self.manifest[i].name, "Digest", &whole, &sent.blake3)?;
                tensor.digest = Digest::Verified(whole);
                self.settled += 1;
            }
        }
        Ok(())
    }

    /// Every tensor's digest, once an attempt has succeeded.
    fn digests(&self) -> Vec<blake3::Hash> {
        self.tensors
            .iter()
            .map(|t| match t.digest {
                Digest::Verified(hash) => hash,
                _ => unreachable!("a successful attempt verifies every tensor"),
            })
            .collect()
    }
}

/// `weightinit fetch`. SIGINT and SIGTERM stop it cleanly: the fetch is dropped, and its
/// output with it, so that no partial file outlives the process.
pub async fn run(args: FetchArgs) -> Result<(), FetchError> {
    use tokio::signal::unix::{SignalKind, signal};
    let request = args.source.request()?;
    let format = Format::resolve(args.format, &args.out)?;
    let source = args.source.source()?;
    let mut progress = Progress::stderr(args.quiet);
    let mut interrupt = signal(SignalKind::interrupt()).expect("SIGINT handler");
    let mut terminate = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let fetching = fetch(
        &*source,
        &request,
        &args.out,
        format,
        RetryPolicy::new(args.retries),
        !args.no_space_check,
        &mut progress,
    );
    let outcome = tokio::select! {
        outcome = fetching => outcome,
        _ = interrupt.recv() => Err(FetchError::Stopped(Signal::Interrupt)),
        _ = terminate.recv() => Err(FetchError::Stopped(Signal::Terminate)),
    };
    let summary = outcome.inspect_err(|_| progress.finish())?;
    let seconds = summary.elapsed.as_secs_f64();
    let retried = match summary.retried {
        0 => String::new(),
        n => format!(", after {n} retries"),
    };
    progress.note(&format!(
        "wrote {} ({format}): {} tensors, {} in {seconds:.1}s ({}/s), BLAKE3 verified{retried}",
        args.out.display(),
        summary.tensors,
        human_bytes(summary.bytes),
        human_bytes((summary.bytes as f64 / seconds.max(1e-3)) as u64),
    ));
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::sync::Mutex;

    use tonic::Response;

    use super::*;
    use crate::local::LocalServer;
    use crate::source::GenerateStream;
    use weightinit_proto::{DescribeResponse, DigestResponse, generate_response};

    /// The in-process service, made to break its streams or to lie about digests.
    struct Faulty {
        inner: LocalServer,
        /// Per Generate call, in order: the messages let through before the stream breaks,
        /// and whether it breaks with an error (or just ends).
        cuts: Mutex<VecDeque<(usize, bool)>>,
        bad_ends: bool,
        bad_digests: bool,
        generated: Mutex<Vec<GenerateRequest>>,
        digested: Mutex<Vec<GenerateRequest>>,
    }

    impl Faulty {
        fn new(cuts: &[(usize, bool)]) -> Self {
            Self {
                inner: LocalServer,
                cuts: Mutex::new(cuts.iter().copied().collect()),
                bad_ends: false,
                bad_digests: false,
                generated: Mutex::default(),
                digested: Mutex::default(),
            }
        }

        fn generates(&self) -> usize {
            self.generated.lock().unwrap().len()
        }
    }

    fn flip(digest: &mut [u8]) {
        digest[0] ^= 1;
    }

    #[tonic::async_trait]
    impl Server for Faulty {
        async fn generate(
            &self,
            request: Request<GenerateRequest>,
        ) -> Result<Response<GenerateStream>, Status> {
            self.generated
                .lock()
                .unwrap()
                .push(request.get_ref().clone());
            let bad_ends = self.bad_ends;
            let stream = self
                .inner
                .generate(request)
                .await?
                .into_inner()
                .map(move |message| {
                    message.map(|mut m| {
                        if let (true, Some(generate_response::Item::End(end))) =
                            (bad_ends, &mut m.item)
                        {
                            flip(&mut end.blake3);
                        }
                        m
                    })
                });
            let cut = self.cuts.lock().unwrap().pop_front();
            Ok(Response::new(match cut {
                None => Box::pin(stream),
                Some((after, error)) => {
                    let end = error.then(|| Err(Status::unavailable("connection reset")));
                    Box::pin(stream.take(after).chain(tokio_stream::iter(end)))
                }
            }))
        }

        async fn describe(
            &self,
            request: Request<GenerateRequest>,
        ) -> Result<Response<DescribeResponse>, Status> {
            self.inner.describe(request).await
        }

        async fn digest(
            &self,
            request: Request<GenerateRequest>,
        ) -> Result<Response<DigestResponse>, Status> {
            self.digested
                .lock()
                .unwrap()
                .push(request.get_ref().clone());
            let mut response = self.inner.digest(request).await?;
            if self.bad_digests {
                for end in &mut response.get_mut().digests {
                    flip(&mut end.blake3);
                }
            }
            Ok(response)
        }
    }

    /// Four tensors in 1 KiB chunks: unsliced (27 messages: header, 25 chunks, end),
    /// dims-sliced (5), flat-sliced (6), and a small bfloat16 one (3).
    fn request() -> GenerateRequest {
        serde_json::from_str(
            r#"{"seed": 9, "chunkBytes": 1024, "tensors": [
                {"name": "a", "shape": [64, 100], "init": {"normal": {}}},
                {"name": "b", "shape": [40, 30], "init": {"xavierUniform": {}},
                 "slice": {"dims": {"ranges": [{"start": 10, "stop": 30}, {"stop": 30}]}}},
                {"name": "c", "shape": [1000], "init": {"uniform": {}},
                 "slice": {"flat": {"start": 100, "stop": 900}}},
                {"name": "d", "shape": [7], "dtype": "DTYPE_BFLOAT16", "init": {"ones": {}}}
            ]}"#,
        )
        .unwrap()
    }

    fn policy() -> RetryPolicy {
        RetryPolicy {
            retries: 3,
            first: Duration::from_millis(1),
            max: Duration::from_millis(4),
        }
    }

    /// A fresh directory for one test.
    fn scratch(test: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("weightinit-fetch-{}-{test}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// A tensor as a request asks for it: its name and slice.
    type Asked = (String, Option<slice::Kind>);

    fn asked_for(tensor: &TensorSpec) -> Asked {
        let kind = tensor.slice.clone().and_then(|s| s.kind);
        (tensor.name.clone(), kind)
    }

    /// The tensors of every request a server got.
    fn asked(requests: &Mutex<Vec<GenerateRequest>>) -> Vec<Vec<Asked>> {
        let requests = requests.lock().unwrap();
        let tensors = |r: &GenerateRequest| r.tensors.iter().map(asked_for).collect();
        requests.iter().map(tensors).collect()
    }

    async fn fetch_raw(server: &Faulty, out: &Path) -> Result<Summary, FetchError> {
        let mut progress = Progress::stderr(true);
        fetch(
            server,
            &request(),
            out,
            Format::Raw,
            policy(),
            true,
            &mut progress,
        )
        .await
    }

    #[tokio::test]
    async fn resumes_tensors_where_they_stopped() {
        let dir = scratch("resume");
        let clean = Faulty::new(&[]);
        fetch_raw(&clean, &dir.join("clean.bin")).await.unwrap();
        assert!(
            clean.digested.lock().unwrap().is_empty(),
            "nothing to confirm"
        );
        // Mid "a" (9 of its 25 chunks); then after a's continuation (header, 16 chunks, end)
        // mid "b", which starts again; then quietly mid "c" (2 of 4 chunks), which continues.
        let faulty = Faulty::new(&[(10, true), (20, true), (8, false)]);
        let summary = fetch_raw(&faulty, &dir.join("resumed.bin")).await.unwrap();
        assert_eq!(summary.retried, 3);
        let original = request().tensors;
        let flat = |start, stop| Some(slice::Kind::Flat(Range { start, stop }));
        let generated = asked(&faulty.generated);
        assert_eq!(generated.len(), 4);
        assert_eq!(generated[1][0], ("a".to_owned(), flat(9 * 256, 6400)));
        assert_eq!(generated[2][0], asked_for(&original[1]), "b starts again");
        assert_eq!(generated[3][0], ("c".to_owned(), flat(100 + 2 * 256, 900)));
        assert_eq!(generated[3].len(), 2, "c and d");
        let originals = vec![asked_for(&original[0]), asked_for(&original[2])];
        assert_eq!(asked(&faulty.digested), [originals], "a and c at once");
        assert_eq!(
            std::fs::read(dir.join("resumed.bin")).unwrap(),
            std::fs::read(dir.join("clean.bin")).unwrap()
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn gives_up_after_the_retries_without_progress() {
        let dir = scratch("give-up");
        let faulty = Faulty::new(&[(0, true); 4]);
        let error = fetch_raw(&faulty, &dir.join("out.bin")).await.unwrap_err();
        assert!(
            matches!(error, FetchError::GaveUp { attempts: 4, .. }),
            "{error}"
        );
        assert_eq!(
            std::fs::read_dir(&dir).unwrap().count(),
            0,
            "no partial file"
        );
        // "a" completes, then "b" (which starts again each time) never gets further.
        let faulty = Faulty::new(&[(30, true), (3, true), (3, true), (3, true), (3, true)]);
        let error = fetch_raw(&faulty, &dir.join("out.bin")).await.unwrap_err();
        assert!(
            matches!(error, FetchError::GaveUp { attempts: 4, .. }),
            "{error}"
        );
        assert_eq!(faulty.generates(), 4);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn wrong_digests_are_errors() {
        let dir = scratch("wrong-digest");
        let mut lying = Faulty::new(&[]);
        lying.bad_ends = true;
        let error = fetch_raw(&lying, &dir.join("out.bin")).await.unwrap_err();
        assert!(
            matches!(&error, FetchError::Verify(e) if e.tensor == "a" && e.against == "TensorEnd"),
            "{error}"
        );
        assert_eq!(lying.generates(), 1, "not retried");
        let mut lying = Faulty::new(&[(10, true)]);
        lying.bad_digests = true;
        let error = fetch_raw(&lying, &dir.join("out.bin")).await.unwrap_err();
        assert!(
            matches!(&error, FetchError::Verify(e) if e.tensor == "a" && e.against == "Digest"),
            "{error}"
        );
        assert_eq!(
            std::fs::read_dir(&dir).unwrap().count(),
            0,
            "no partial file"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn refused_requests_are_not_retried() {
        let dir = scratch("refused");
        let faulty = Faulty::new(&[]);
        let mut request = request();
        request.algorithm = 7;
        let mut progress = Progress::stderr(true);
        let out = dir.join("out.bin");
        let error = fetch(
            &faulty,
            &request,
            &out,
            Format::Raw,
            policy(),
            true,
            &mut progress,
        )
        .await
        .unwrap_err();
        assert!(
            matches!(&error, FetchError::Rpc(s) if s.code() == tonic::Code::InvalidArgument),
            "{error}"
        );
        assert_eq!(faulty.generates(), 0);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn verify_compares_digests() {
        let computed = blake3::hash(b"weights");
        assert_eq!(
            verify("w", "TensorEnd", &computed, computed.as_bytes()),
            Ok(())
        );
        let mut sent = *computed.as_bytes();
        sent[31] ^= 0x80;
        let error = verify("w", "TensorEnd", &computed, &sent).unwrap_err();
        assert_eq!(error.computed, computed.to_hex().as_str());
        assert_eq!(error.sent[..62], error.computed[..62]);
        assert_ne!(error.sent, error.computed);
        assert!(
            verify("w", "Digest", &computed, &[]).is_err(),
            "a missing digest"
        );
        assert!(error.to_string().contains("TensorEnd"));
    }

    #[test]
    fn continuations_are_flat_ranges_of_the_full_tensor() {
        let flat = |slice: Option<Slice>| match slice.and_then(|s| s.kind) {
            Some(slice::Kind::Flat(r)) => Some((r.start, r.stop)),
            _ => None,
        };
        let request = request();
        assert_eq!(
            flat(continuation(&request.tensors[0], 6400, 1000)),
            Some((1000, 6400))
        );
        assert_eq!(flat(continuation(&request.tensors[1], 1200, 10)), None);
        assert_eq!(
            flat(continuation(&request.tensors[2], 1000, 50)),
            Some((150, 900))
        );
        let mut unset = request.tensors[0].clone();
        unset.slice = Some(Slice { kind: None });
        assert_eq!(flat(continuation(&unset, 6400, 6400)), Some((6400, 6400)));
    }
}
