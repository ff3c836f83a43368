//! `weightinit._native`: the engine in the Python caller's process. A thin layer over
//! [`weightinit_client::local`]; the Python package checks destinations and builds results.

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyBytes;
use weightinit_client::local::{LocalError, LocalPlan};
use weightinit_engine::RequestError;

#[pymodule]
mod _native {
    #[pymodule_export]
    use super::Plan;
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
        py.detach(|| self.0.fill(index, out))
            .map_err(|error| raise(py, error))
    }

    /// Tensor `index`'s BLAKE3 digest (32 bytes), computed as a server's Digest does.
    fn digest<'py>(&self, py: Python<'py>, index: usize) -> PyResult<Bound<'py, PyBytes>> {
        let hash = py
            .detach(|| self.0.digest(index))
            .map_err(|error| raise(py, error))?;
        Ok(PyBytes::new(py, hash.as_bytes()))
    }
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
