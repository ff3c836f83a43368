//! `weightinit._native`: the engine in the Python caller's process, and calls to a server
//! received in Rust. A thin layer over [`weightinit_client::local`] and
//! [`weightinit_client::remote`]; the Python package checks destinations and builds results.
//! Failures are raised as [`Failure`], described (kind, status code, field, cause, address)
//! for weightinit.errors, the one place that turns them into the package's exceptions.

use std::path::PathBuf;
use std::pin::pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, mpsc};
use std::time::{Duration, Instant};

use prost::Message;
use pyo3::create_exception;
use pyo3::exceptions::{PyException, PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyBytes;
use tokio::runtime::Runtime;
use tonic::{Code, Status};
use weightinit_client::local::{self, LocalError, LocalPlan};
use weightinit_client::remote::{self, RemoteError, Unary};
use weightinit_client::retry::RetryPolicy;
use weightinit_client::target::{Caller, Given, Security};
use weightinit_engine::RequestError;
use weightinit_engine::structured::StopCheck;
use weightinit_proto::GenerateRequest;

#[pymodule]
mod _native {
    #[pymodule_export]
    use super::Failure;
    #[pymodule_export]
    use super::Plan;
    #[pymodule_export]
    use super::Remote;
}

/// A validated request (an encoded GenerateRequest), planned once.
#[pyclass(frozen, module = "weightinit._native")]
struct Plan(LocalPlan);

#[pymethods]
impl Plan {
    #[new]
    fn new(py: Python<'_>, request: &[u8]) -> PyResult<Self> {
        // Planning may factor a large orthogonal matrix: let other threads run meanwhile.
        py.detach(|| LocalPlan::decode(request))
            .map(Self)
            .map_err(local_failure)
    }

    /// The tensors' headers as an encoded DescribeResponse.
    fn describe<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.0.describe())
    }

    /// Writes each tensor `index` of `targets` into the `length` bytes at its `address`, on
    /// all cores, without the GIL, in one pass over all of them. The caller
    /// (weightinit.client) passes addresses of writable, C-contiguous buffers it keeps
    /// exported for the whole call.
    fn fill(&self, py: Python<'_>, targets: Vec<(usize, usize, usize)>) -> PyResult<()> {
        self.0.check_disjoint(&targets).map_err(local_failure)?;
        let outs = targets
            .into_iter()
            .map(|(index, address, length)| {
                let out: &mut [u8] = if length == 0 {
                    &mut []
                } else {
                    // SAFETY: per this private method's contract, `address` is the start of
                    // `length` writable bytes that stay alive and are not moved while the call
                    // runs; `check_disjoint` made sure no two targets share a byte.
                    unsafe { std::slice::from_raw_parts_mut(address as *mut u8, length) }
                };
                (index, out)
            })
            .collect();
        interruptible(py, |stop| self.0.fill(outs, stop))
    }

    /// Tensor `index`'s BLAKE3 digest (32 bytes), computed as a server's Digest does.
    fn digest<'py>(&self, py: Python<'py>, index: usize) -> PyResult<Bound<'py, PyBytes>> {
        let hash = interruptible(py, |stop| self.0.digest(index, stop))?;
        Ok(PyBytes::new(py, hash.as_bytes()))
    }
}

/// Runs `work` on a thread of the engine's pool without the GIL, looking for Ctrl-C (any
/// signal handler's exception) every [`SIGNAL_POLL`]: the work is then told to stop, which
/// it does within one job, and the exception is raised here.
fn interruptible<T: Send>(
    py: Python<'_>,
    work: impl FnOnce(StopCheck<'_>) -> Result<T, LocalError> + Send,
) -> PyResult<T> {
    let stop = AtomicBool::new(false);
    let stop = &stop;
    let waited = local::beside(
        move || work(&|| stop.load(Ordering::Relaxed)),
        |mut result| loop {
            // Moved in and back: a Receiver cannot be shared with the detached closure.
            let (back, next) = py.detach(move || {
                let next = result.recv_timeout(SIGNAL_POLL);
                (result, next)
            });
            result = back;
            match next {
                Ok(Ok(value)) => return value.map_err(local_failure),
                Ok(Err(_)) | Err(mpsc::RecvTimeoutError::Disconnected) => {
                    return Err(PyRuntimeError::new_err("the generation thread panicked"));
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if let Err(signal) = py.check_signals() {
                        stop.store(true, Ordering::Relaxed);
                        // The work ends at its next check; its result no longer matters.
                        let _ = py.detach(move || result.recv());
                        return Err(signal);
                    }
                }
            }
        },
    );
    waited.map_err(local_failure)?
}

/// A failure as weightinit.errors turns it into the package's exception.
fn local_failure(error: LocalError) -> PyErr {
    let (kind, code) = match &error {
        LocalError::Refused(RequestError::Invalid { .. }) => {
            ("status", Some(Code::InvalidArgument))
        }
        LocalError::Refused(RequestError::OverLimit { .. }) => {
            ("status", Some(Code::ResourceExhausted))
        }
        LocalError::OutOfMemory { .. } => ("memory", None),
        _ => return PyValueError::new_err(error.to_string()),
    };
    Described {
        kind,
        code,
        field: error.field(),
        message: error.to_string(),
        ..Described::default()
    }
    .into()
}

create_exception!(
    _native,
    Failure,
    PyException,
    "A failed call, described for weightinit.errors: `kind` (\"options\", \"status\", \
     \"unreachable\", \"integrity\", \"memory\"), `code` (the gRPC status code's number, or None), `field` \
     (the option or request field at fault, or None), `cause` and `address` (for \
     \"unreachable\"), and the message."
);

/// What weightinit.errors needs to raise the package's own exception for a failure.
#[derive(Default)]
struct Described {
    kind: &'static str,
    code: Option<Code>,
    field: Option<String>,
    cause: Option<&'static str>,
    address: Option<String>,
    message: String,
}

impl From<Described> for PyErr {
    fn from(described: Described) -> Self {
        Python::attach(|py| {
            let error = Failure::new_err(described.message);
            let value = error.value(py);
            let attributes = [
                ("kind", described.kind.into_pyobject(py)?.into_any()),
                ("code", described.code.map(|c| c as i32).into_pyobject(py)?),
                ("field", described.field.into_pyobject(py)?),
                ("cause", described.cause.into_pyobject(py)?),
                ("address", described.address.into_pyobject(py)?),
            ];
            for (name, attribute) in attributes {
                value.setattr(name, attribute)?;
            }
            Ok(error)
        })
        .unwrap_or_else(|failed: PyErr| failed)
    }
}

impl From<RemoteError> for Described {
    fn from(error: RemoteError) -> Self {
        let field = error.field();
        let message = error.to_string();
        if let Some(unreachable) = error.unreachable() {
            return Self {
                kind: "unreachable",
                code: Some(Code::Unavailable),
                cause: Some(unreachable.cause.name()),
                address: Some(unreachable.target.address()),
                message,
                ..Self::default()
            };
        }
        let kind = match &error {
            RemoteError::Refused(_) => "options",
            RemoteError::Status(_) | RemoteError::GaveUp { .. } => "status",
            RemoteError::Integrity(_) => "integrity",
        };
        Self {
            kind,
            code: error.status().map(Status::code),
            field,
            message,
            ..Self::default()
        }
    }
}

/// A server over gRPC: one channel, kept for every call of the Python Client that owns it,
/// and how often a call is retried.
#[pyclass(frozen, module = "weightinit._native")]
struct Remote(weightinit_client::remote::Remote, RetryPolicy);

/// A destination the Python caller keeps exported for the whole call, as `Plan.fill`'s.
struct Destination(&'static mut [u8]);

impl AsMut<[u8]> for Destination {
    fn as_mut(&mut self) -> &mut [u8] {
        self.0
    }
}

/// How often a wait for the server or for local work looks for Ctrl-C.
const SIGNAL_POLL: Duration = Duration::from_millis(50);

/// PEM or token bytes from Python, and the file they were read from (None: given as bytes).
type FromPython = Option<(Vec<u8>, Option<PathBuf>)>;

fn given(from: FromPython) -> Option<Given> {
    from.map(|(bytes, path)| Given { bytes, path })
}

#[pymethods]
impl Remote {
    /// The server at `target`, over TLS when `tls_ca` is given; connects on first use.
    /// Options that cannot work are refused here (Failure of kind "options"), in the words of
    /// the Python package's Security. `retries`: failed attempts in a row, without progress
    /// in between, that are tried again (after a backoff) before a call gives up.
    #[new]
    #[pyo3(signature = (target, tls_ca=None, tls_cert=None, tls_key=None, tls_server_name=None, token=None, retries=8))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        target: &str,
        tls_ca: FromPython,
        tls_cert: FromPython,
        tls_key: FromPython,
        tls_server_name: Option<String>,
        token: FromPython,
        retries: u32,
    ) -> PyResult<Self> {
        let security = Security {
            tls_ca: given(tls_ca),
            tls_cert: given(tls_cert),
            tls_key: given(tls_key),
            tls_server_name,
            token: given(token),
        };
        let runtime = runtime().map_err(|e| PyRuntimeError::new_err(e.to_string()))?;
        let _entered = runtime.enter();
        let remote = remote::Remote::new(target, security, Caller::Python)
            .map_err(|refusal| PyErr::from(Described::from(RemoteError::from(refusal))))?;
        Ok(Self(remote, RetryPolicy::new(retries)))
    }

    /// Runs Generate for an encoded GenerateRequest. `open(header)` gets each encoded
    /// TensorHeader and returns (address, length) of the tensor's destination, which the
    /// caller keeps exported until the call returns. A tensor received again after a retry
    /// goes to the destination it had.
    fn generate(
        &self,
        py: Python<'_>,
        request: &[u8],
        timeout: Option<f64>,
        open: Bound<'_, PyAny>,
    ) -> PyResult<()> {
        let request = decode(request)?;
        let deadline = deadline(timeout);
        let mut generation = self.0.generation::<Destination>(request, deadline, self.1);
        // Chunks are received and copied without the GIL; a header needs Python.
        while let Some(header) = wait(py, deadline, &self.0, generation.next())? {
            let (address, length): (usize, usize) = open
                .call1((PyBytes::new(py, &header.encode_to_vec()),))?
                .extract()?;
            let destination: &'static mut [u8] = if length == 0 {
                &mut []
            } else {
                // SAFETY: per this private method's contract, `address` is the start of
                // `length` writable bytes that stay alive and unmoved until it returns, and
                // the generation is dropped before it does.
                unsafe { std::slice::from_raw_parts_mut(address as *mut u8, length) }
            };
            generation
                .open(Destination(destination))
                .map_err(|error| PyErr::from(Described::from(RemoteError::from(error))))?;
        }
        Ok(())
    }

    /// The encoded DigestResponse of an encoded GenerateRequest.
    fn digest<'py>(
        &self,
        py: Python<'py>,
        request: &[u8],
        timeout: Option<f64>,
    ) -> PyResult<Bound<'py, PyBytes>> {
        self.unary(py, Unary::Digest, request, timeout)
    }

    /// The encoded DescribeResponse of an encoded GenerateRequest.
    fn describe<'py>(
        &self,
        py: Python<'py>,
        request: &[u8],
        timeout: Option<f64>,
    ) -> PyResult<Bound<'py, PyBytes>> {
        self.unary(py, Unary::Describe, request, timeout)
    }
}

impl Remote {
    fn unary<'py>(
        &self,
        py: Python<'py>,
        which: Unary,
        request: &[u8],
        timeout: Option<f64>,
    ) -> PyResult<Bound<'py, PyBytes>> {
        let request = decode(request)?;
        let deadline = deadline(timeout);
        let call = self.0.unary_retried(which, request, deadline, self.1);
        Ok(PyBytes::new(py, &wait(py, deadline, &self.0, call)?))
    }
}

fn decode(request: &[u8]) -> PyResult<GenerateRequest> {
    GenerateRequest::decode(request).map_err(|e| PyValueError::new_err(e.to_string()))
}

/// When a call with `timeout` seconds must be over.
fn deadline(timeout: Option<f64>) -> Option<Instant> {
    timeout.map(|t| Instant::now() + Duration::from_secs_f64(t))
}

/// Runs `future`, a call to `remote`, on the runtime without the GIL, until it completes,
/// the deadline passes (DEADLINE_EXCEEDED) or Ctrl-C arrives (KeyboardInterrupt, raised here;
/// dropping the future cancels the call).
fn wait<T: Send>(
    py: Python<'_>,
    deadline: Option<Instant>,
    remote: &weightinit_client::remote::Remote,
    future: impl Future<Output = Result<T, RemoteError>> + Send,
) -> PyResult<T> {
    let runtime = runtime().map_err(|e| PyRuntimeError::new_err(e.to_string()))?;
    let mut future = pin!(future);
    loop {
        let tick = Instant::now() + SIGNAL_POLL;
        let until = deadline.map_or(tick, |d| d.min(tick));
        let done = py.detach(|| {
            runtime.block_on(async { tokio::time::timeout_at(until.into(), future.as_mut()).await })
        });
        match done {
            Ok(result) => return result.map_err(|error| Described::from(error).into()),
            Err(_) if deadline.is_some_and(|d| Instant::now() >= d) => {
                let status = Status::deadline_exceeded(format!(
                    "the call to {} did not finish within its timeout",
                    remote.target()
                ));
                return Err(Described::from(RemoteError::Status(status)).into());
            }
            Err(_) => py.check_signals()?,
        }
    }
}

/// This process's tokio runtime. A forked child (Python programs fork: DataLoader workers,
/// multiprocessing) starts its own rather than wait on threads it does not have.
fn runtime() -> std::io::Result<Arc<Runtime>> {
    static RUNTIME: Mutex<Option<(u32, Arc<Runtime>)>> = Mutex::new(None);
    let pid = std::process::id();
    let mut current = RUNTIME.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some((owner, runtime)) = current.as_ref()
        && *owner == pid
    {
        return Ok(Arc::clone(runtime));
    }
    let runtime = Arc::new(
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?,
    );
    // The parent's runtime cannot be shut down from here: its threads are not in this process.
    if let Some(inherited) = current.replace((pid, Arc::clone(&runtime))) {
        std::mem::forget(inherited);
    }
    Ok(runtime)
}
