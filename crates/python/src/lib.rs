//! `weightinit._native`: the engine in the Python caller's process, and calls to a server
//! received in Rust. A thin layer over [`weightinit_client::local`] and
//! [`weightinit_client::remote`]; the Python package checks destinations and builds results.

use std::pin::pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, mpsc};
use std::time::{Duration, Instant};

use prost::Message;
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyBytes;
use tokio::runtime::Runtime;
use tonic::Status;
use weightinit_client::local::{LocalError, LocalPlan};
use weightinit_client::remote::{self, Receiver, RemoteError, Security};
use weightinit_engine::RequestError;
use weightinit_engine::structured::StopCheck;
use weightinit_service::proto::GenerateRequest;

#[pymodule]
mod _native {
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
            .map_err(|error| raise(py, error))
    }

    /// The tensors' headers as an encoded DescribeResponse.
    fn describe<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.0.describe())
    }

    /// Writes tensor `index` into the `length` bytes at `address`, on all cores, without the
    /// GIL. The caller (weightinit.client) passes the address of a writable, C-contiguous
    /// buffer it keeps exported for the whole call.
    fn fill(&self, py: Python<'_>, index: usize, address: usize, length: usize) -> PyResult<()> {
        let out: &mut [u8] = if length == 0 {
            &mut []
        } else {
            // SAFETY: per this private method's contract, `address` is the start of `length`
            // writable bytes that stay alive and are not moved while the call runs.
            unsafe { std::slice::from_raw_parts_mut(address as *mut u8, length) }
        };
        interruptible(py, |stop| self.0.fill(index, out, stop))
    }

    /// Tensor `index`'s BLAKE3 digest (32 bytes), computed as a server's Digest does.
    fn digest<'py>(&self, py: Python<'py>, index: usize) -> PyResult<Bound<'py, PyBytes>> {
        let hash = interruptible(py, |stop| self.0.digest(index, stop))?;
        Ok(PyBytes::new(py, hash.as_bytes()))
    }
}

/// Runs `work` on its own thread without the GIL, looking for Ctrl-C (any signal handler's
/// exception) every [`SIGNAL_POLL`]: the work is then told to stop, which it does within
/// one job, and the exception is raised here.
fn interruptible<T: Send>(
    py: Python<'_>,
    work: impl FnOnce(StopCheck<'_>) -> Result<T, LocalError> + Send,
) -> PyResult<T> {
    let stop = AtomicBool::new(false);
    std::thread::scope(|scope| {
        let (done, result) = mpsc::channel();
        let stop = &stop;
        scope.spawn(move || {
            let _ = done.send(work(&|| stop.load(Ordering::Relaxed)));
        });
        let mut result = result;
        loop {
            // Moved in and back: a Receiver cannot be shared with the detached closure.
            let (back, next) = py.detach(move || {
                let next = result.recv_timeout(SIGNAL_POLL);
                (result, next)
            });
            result = back;
            match next {
                Ok(value) => return value.map_err(|error| raise(py, error)),
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if let Err(signal) = py.check_signals() {
                        stop.store(true, Ordering::Relaxed);
                        // The work ends at its next check; its result no longer matters.
                        let _ = py.detach(move || result.recv());
                        return Err(signal);
                    }
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    return Err(PyRuntimeError::new_err("the generation thread panicked"));
                }
            }
        }
    })
}

/// A refused request becomes weightinit.RequestRefused, as a server's refusal does, so that
/// callers handle both targets alike; anything else is a plain ValueError.
fn raise(py: Python<'_>, error: LocalError) -> PyErr {
    let LocalError::Refused(refused) = &error else {
        return PyValueError::new_err(error.to_string());
    };
    let code = match refused {
        RequestError::Invalid { .. } => "INVALID_ARGUMENT",
        RequestError::OverLimit { .. } => "RESOURCE_EXHAUSTED",
    };
    py.import("weightinit.client")
        .and_then(|client| client.getattr("RequestRefused"))
        .and_then(|class| class.call1((code, refused.field(), refused.to_string())))
        .map_or_else(|failed| failed, PyErr::from_value)
}

/// A server over gRPC: one channel, kept for every call of the Python Client that owns it.
#[pyclass(frozen, module = "weightinit._native")]
struct Remote(weightinit_client::remote::Remote);

/// A destination the Python caller keeps exported for the whole call, as `Plan.fill`'s.
struct Destination(&'static mut [u8]);

impl AsMut<[u8]> for Destination {
    fn as_mut(&mut self) -> &mut [u8] {
        self.0
    }
}

/// How often a wait for the server or for local work looks for Ctrl-C.
const SIGNAL_POLL: Duration = Duration::from_millis(50);

#[pymethods]
impl Remote {
    /// The server at `target`, over TLS when `tls_ca` (PEM bytes) is given; connects on first
    /// use. The caller (weightinit.client) has checked the options and read the files.
    #[new]
    #[pyo3(signature = (target, tls_ca=None, tls_cert=None, tls_key=None, tls_server_name=None, token=None))]
    fn new(
        py: Python<'_>,
        target: &str,
        tls_ca: Option<Vec<u8>>,
        tls_cert: Option<Vec<u8>>,
        tls_key: Option<Vec<u8>>,
        tls_server_name: Option<String>,
        token: Option<String>,
    ) -> PyResult<Self> {
        let security = Security {
            tls_ca,
            identity: tls_cert.zip(tls_key),
            tls_server_name,
            token,
        };
        let runtime = runtime().map_err(|e| PyRuntimeError::new_err(e.to_string()))?;
        let _entered = runtime.enter();
        remote::Remote::new(target, security)
            .map(Self)
            .map_err(|error| failed(py, error))
    }

    /// Runs Generate for an encoded GenerateRequest whose tensors are `names`.
    /// `open(header)` gets each encoded TensorHeader and returns (address, length) of the
    /// tensor's destination, which the caller keeps exported until the call returns.
    fn generate(
        &self,
        py: Python<'_>,
        request: &[u8],
        names: Vec<String>,
        timeout: Option<f64>,
        open: Bound<'_, PyAny>,
    ) -> PyResult<()> {
        let request = decode(request)?;
        let (deadline, timeout) = deadline(timeout);
        let mut stream = wait(py, deadline, self.0.generate(request, timeout))
            .map_err(|error| failed(py, error))?;
        let mut receiver = Receiver::<Destination>::new(names);
        loop {
            // Chunks are received and copied here without the GIL; a header needs Python.
            let next = wait(py, deadline, async {
                loop {
                    let response = match stream.message().await {
                        Ok(Some(response)) => response,
                        Ok(None) => return Ok(None),
                        Err(status) => return Err(self.0.failed(status).await),
                    };
                    if let Some(header) = receiver.receive(response)? {
                        return Ok(Some(header));
                    }
                }
            });
            let Some(header) = next.map_err(|error| failed(py, error))? else {
                break;
            };
            let (address, length): (usize, usize) = open
                .call1((PyBytes::new(py, &header.encode_to_vec()),))?
                .extract()?;
            let destination: &'static mut [u8] = if length == 0 {
                &mut []
            } else {
                // SAFETY: per this private method's contract, `address` is the start of
                // `length` writable bytes that stay alive and unmoved until it returns, and
                // the receiver is dropped before it does.
                unsafe { std::slice::from_raw_parts_mut(address as *mut u8, length) }
            };
            receiver
                .open(Destination(destination))
                .map_err(|error| failed(py, RemoteError::from(error)))?;
        }
        receiver
            .finish()
            .map_err(|error| failed(py, RemoteError::from(error)))
    }

    /// The encoded DigestResponse of an encoded GenerateRequest.
    fn digest<'py>(
        &self,
        py: Python<'py>,
        request: &[u8],
        timeout: Option<f64>,
    ) -> PyResult<Bound<'py, PyBytes>> {
        let request = decode(request)?;
        unary(py, timeout, |timeout| self.0.digest(request, timeout))
    }

    /// The encoded DescribeResponse of an encoded GenerateRequest.
    fn describe<'py>(
        &self,
        py: Python<'py>,
        request: &[u8],
        timeout: Option<f64>,
    ) -> PyResult<Bound<'py, PyBytes>> {
        let request = decode(request)?;
        unary(py, timeout, |timeout| self.0.describe(request, timeout))
    }
}

fn decode(request: &[u8]) -> PyResult<GenerateRequest> {
    GenerateRequest::decode(request).map_err(|e| PyValueError::new_err(e.to_string()))
}

/// A unary call's encoded response as bytes, waited for as [`wait`] does.
fn unary<'py, F>(
    py: Python<'py>,
    timeout: Option<f64>,
    call: impl FnOnce(Option<Duration>) -> F,
) -> PyResult<Bound<'py, PyBytes>>
where
    F: Future<Output = Result<Vec<u8>, RemoteError>> + Send,
{
    let (deadline, timeout) = deadline(timeout);
    let response = wait(py, deadline, call(timeout)).map_err(|error| failed(py, error))?;
    Ok(PyBytes::new(py, &response))
}

/// When a call with `timeout` seconds must be over, and the timeout to send the server.
fn deadline(timeout: Option<f64>) -> (Option<Instant>, Option<Duration>) {
    let timeout = timeout.map(Duration::from_secs_f64);
    (timeout.map(|t| Instant::now() + t), timeout)
}

/// Runs `future` on the runtime without the GIL, until it completes, the deadline passes
/// (DEADLINE_EXCEEDED) or Ctrl-C arrives (KeyboardInterrupt, raised here; dropping the
/// future cancels the call).
fn wait<T: Send>(
    py: Python<'_>,
    deadline: Option<Instant>,
    future: impl Future<Output = Result<T, RemoteError>> + Send,
) -> Result<T, Interrupted> {
    let runtime =
        runtime().map_err(|e| Interrupted::Python(PyRuntimeError::new_err(e.to_string())))?;
    let mut future = pin!(future);
    loop {
        let tick = Instant::now() + SIGNAL_POLL;
        let until = deadline.map_or(tick, |d| d.min(tick));
        let done = py.detach(|| {
            runtime.block_on(async { tokio::time::timeout_at(until.into(), future.as_mut()).await })
        });
        match done {
            Ok(result) => return result.map_err(Interrupted::Remote),
            Err(_) if deadline.is_some_and(|d| Instant::now() >= d) => {
                return Err(Interrupted::Remote(RemoteError::Status(
                    Status::deadline_exceeded("Deadline Exceeded"),
                )));
            }
            Err(_) => py.check_signals().map_err(Interrupted::Python)?,
        }
    }
}

/// Why a wait ended without a result.
enum Interrupted {
    Remote(RemoteError),
    Python(PyErr),
}

impl From<RemoteError> for Interrupted {
    fn from(error: RemoteError) -> Self {
        Self::Remote(error)
    }
}

/// A failed call as the Python package's exception: weightinit.client builds it from the
/// status code's name (None for an integrity error), the message, and when the server could
/// not be reached, the cause (see [`RemoteError::unreachable`]).
fn failed(py: Python<'_>, error: impl Into<Interrupted>) -> PyErr {
    let error = match error.into() {
        Interrupted::Python(error) => return error,
        Interrupted::Remote(error) => error,
    };
    let code = error.code().map(|code| format!("{code:?}"));
    py.import("weightinit.client")
        .and_then(|client| client.getattr("_failed"))
        .and_then(|build| build.call1((code, error.to_string(), error.unreachable())))
        .map_or_else(|failed| failed, PyErr::from_value)
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
