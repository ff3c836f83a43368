//! A request as the engine sees it, the server's limits, and validation into tensor plans.
//!
//! Validation runs completely before any data is produced, and reports the first problem
//! with the path of the field at fault (`tensors[2].slice.dims.ranges[1]`).

use std::collections::HashSet;

use super::dtype::DType;
use super::fans::{Fans, Layout};
use super::plan::TensorPlan;
use super::scheme::{Scheme, SchemeField};
use super::slice::{Selection, SliceSpec};

/// The algorithm versions this engine implements.
pub const ALGORITHMS: [u32; 1] = [1];

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Request {
    pub seed: u64,
    pub tensors: Vec<TensorSpec>,
    /// Default for tensors without their own; `None` = float32.
    pub dtype: Option<DType>,
    /// Largest chunk wanted; 0 = the server's default.
    pub chunk_bytes: u32,
    /// Default for tensors without their own; `None` = TORCH.
    pub layout: Option<Layout>,
    /// 0 or 1: algorithm v1.
    pub algorithm: u32,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct TensorSpec {
    pub name: String,
    pub shape: Vec<u64>,
    /// Required; `None` is an error.
    pub init: Option<Scheme>,
    pub dtype: Option<DType>,
    pub layout: Option<Layout>,
    pub fan_in: Option<u64>,
    pub fan_out: Option<u64>,
    pub slice: Option<SliceSpec>,
    /// Empty = none; else a permutation of `0..rank`: the output is the view
    /// numpy.transpose(full, permute), which `slice` then addresses.
    pub permute: Vec<u32>,
}

/// Server limits that validation enforces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub default_chunk_bytes: u32,
    pub max_chunk_bytes: u32,
    pub max_request_bytes: u64,
    pub max_tensors: u32,
    pub max_rank: u32,
    pub max_name_bytes: u32,
    /// Largest rows x cols of a scheme computed as a whole before any slice (orthogonal,
    /// sparse): its cost and memory grow with the whole matrix, not with what is sent.
    pub max_matrix_elements: u64,
    /// Largest CPU cost of one request in element-equivalents ([`TensorPlan::work`]): what
    /// keeps a small request from costing hours of QR.
    pub max_request_work: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            default_chunk_bytes: 1 << 20,
            // grpcurl and most clients refuse messages over 4 MiB; leave room for framing.
            max_chunk_bytes: (4 << 20) - (64 << 10),
            max_request_bytes: 1 << 40,
            max_tensors: 100_000,
            max_rank: 32,
            max_name_bytes: 1024,
            // [4096, 4096]: 128 MiB of f64 and tens of seconds of QR at most.
            max_matrix_elements: 1 << 24,
            // About 70 CPU-minutes (at 250 M normal elements per second): more than the largest
            // plain request, about 96 orthogonal [4096, 4096].
            max_request_work: 1 << 40,
        }
    }
}

impl Limits {
    /// Refuses more tensors than the limit; the transport asks this before decoding them.
    pub fn check_tensor_count(&self, count: usize) -> Result<(), RequestError> {
        if count > self.max_tensors as usize {
            return Err(RequestError::over_limit(
                "tensors",
                format!(
                    "{count} tensors exceed this server's limit of {}",
                    self.max_tensors
                ),
            ));
        }
        Ok(())
    }
}

/// Why a request is refused, naming the field at fault.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// The request itself is wrong.
    #[error("{field}: {reason}")]
    Invalid { field: String, reason: String },
    /// The request is valid but exceeds a limit of this server.
    #[error("{field}: {reason}")]
    OverLimit { field: String, reason: String },
}

impl RequestError {
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::Invalid {
            field: field.into(),
            reason: reason.into(),
        }
    }

    pub fn over_limit(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::OverLimit {
            field: field.into(),
            reason: reason.into(),
        }
    }

    pub fn field(&self) -> &str {
        match self {
            Self::Invalid { field, .. } | Self::OverLimit { field, .. } => field,
        }
    }

    pub fn reason(&self) -> &str {
        match self {
            Self::Invalid { reason, .. } | Self::OverLimit { reason, .. } => reason,
        }
    }
}

/// A validated request: every tensor ready to generate, in request order.
#[derive(Debug)]
pub struct RequestPlan {
    pub tensors: Vec<TensorPlan>,
    /// Largest chunk payload, before rounding down to whole elements per tensor.
    pub chunk_bytes: usize,
    /// Output bytes of all tensors together.
    pub total_bytes: u64,
}

impl Request {
    /// Validates the whole request against `limits` and resolves every tensor.
    pub fn plan(&self, limits: &Limits) -> Result<RequestPlan, RequestError> {
        if self.algorithm > 1 {
            return Err(RequestError::invalid(
                "algorithm",
                format!(
                    "algorithm {} does not exist; this server implements 1",
                    self.algorithm
                ),
            ));
        }
        if self.tensors.is_empty() {
            return Err(RequestError::invalid(
                "tensors",
                "at least one tensor is required",
            ));
        }
        limits.check_tensor_count(self.tensors.len())?;
        let chunk_bytes = match self.chunk_bytes {
            0 => limits.default_chunk_bytes,
            n if n > limits.max_chunk_bytes => {
                return Err(RequestError::over_limit(
                    "chunk_bytes",
                    format!(
                        "{n} exceeds this server's maximum of {}",
                        limits.max_chunk_bytes
                    ),
                ));
            }
            n => n,
        };
        let mut names = HashSet::with_capacity(self.tensors.len());
        let mut tensors = Vec::with_capacity(self.tensors.len());
        let mut total_bytes = 0u64;
        let mut work = 0u64;
        for (index, spec) in self.tensors.iter().enumerate() {
            let at = |field: &str| format!("tensors[{index}].{field}");
            if !names.insert(spec.name.as_str()) {
                return Err(RequestError::invalid(
                    at("name"),
                    format!("{:?} is already the name of an earlier tensor", spec.name),
                ));
            }
            let plan = self.plan_tensor(index, spec, limits).map_err(|e| match e {
                RequestError::Invalid { field, reason } => RequestError::Invalid {
                    field: at(&field),
                    reason,
                },
                RequestError::OverLimit { field, reason } => RequestError::OverLimit {
                    field: at(&field),
                    reason,
                },
            })?;
            let size = plan.dtype.size();
            if (chunk_bytes as usize) < size {
                return Err(RequestError::invalid(
                    "chunk_bytes",
                    format!(
                        "{chunk_bytes} is smaller than one {} element of {}",
                        plan.dtype.name(),
                        at("dtype")
                    ),
                ));
            }
            total_bytes = total_bytes.checked_add(plan.byte_length()).ok_or_else(|| {
                RequestError::invalid("tensors", "the total byte length overflows u64")
            })?;
            work = work.saturating_add(plan.work());
            if work > limits.max_request_work {
                return Err(RequestError::over_limit(
                    at("name"),
                    format!(
                        "{:?} ({}, shape {:?}) brings the request's CPU cost to {work} \
                         element-equivalents, over this server's limit of {} per request \
                         (--max-request-work); ask for fewer or smaller tensors per request",
                        spec.name,
                        spec.init.as_ref().map_or("", Scheme::name),
                        spec.shape,
                        limits.max_request_work
                    ),
                ));
            }
            tensors.push(plan);
        }
        if total_bytes > limits.max_request_bytes {
            return Err(RequestError::over_limit(
                "tensors",
                format!(
                    "{total_bytes} bytes of output exceed this server's limit of {} per request",
                    limits.max_request_bytes
                ),
            ));
        }
        Ok(RequestPlan {
            tensors,
            chunk_bytes: chunk_bytes as usize,
            total_bytes,
        })
    }

    /// Validates one tensor; field paths are relative to the tensor.
    fn plan_tensor(
        &self,
        index: usize,
        spec: &TensorSpec,
        limits: &Limits,
    ) -> Result<TensorPlan, RequestError> {
        if spec.name.is_empty() {
            return Err(RequestError::invalid("name", "must not be empty"));
        }
        if spec.name.len() > limits.max_name_bytes as usize {
            return Err(RequestError::over_limit(
                "name",
                format!(
                    "{} bytes exceed this server's limit of {}",
                    spec.name.len(),
                    limits.max_name_bytes
                ),
            ));
        }
        if spec.shape.len() > limits.max_rank as usize {
            return Err(RequestError::over_limit(
                "shape",
                format!(
                    "rank {} exceeds this server's limit of {}",
                    spec.shape.len(),
                    limits.max_rank
                ),
            ));
        }
        let numel = spec
            .shape
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| RequestError::invalid("shape", "the element count overflows u64"))?;
        let dtype = spec.dtype.or(self.dtype).unwrap_or(DType::Float32);
        let layout = spec.layout.or(self.layout).unwrap_or_default();
        let scheme = spec
            .init
            .as_ref()
            .ok_or_else(|| RequestError::invalid("init", "an init scheme is required"))?;
        let fans = Fans::new(&spec.shape, layout, spec.fan_in, spec.fan_out)
            .map_err(|_| RequestError::invalid("shape", "a fan overflows u64"))?;
        let resolved = scheme.resolve(&spec.shape, layout, fans).map_err(|e| {
            let field = match e.field {
                SchemeField::Shape => "shape".to_owned(),
                SchemeField::FanIn => "fan_in".to_owned(),
                SchemeField::FanOut => "fan_out".to_owned(),
                SchemeField::Parameter("") => format!("init.{}", scheme.name()),
                SchemeField::Parameter(p) => format!("init.{}.{p}", scheme.name()),
            };
            RequestError::invalid(field, e.reason)
        })?;
        // Checked on the distribution's extremes after the dtype's rounding chain, as an
        // element would be: what rounds to the largest finite value is still valid.
        if let Some(matrix) = resolved.structure.and_then(|s| s.whole_matrix())
            && matrix > limits.max_matrix_elements
        {
            return Err(RequestError::over_limit(
                "shape",
                format!(
                    "{} computes its {matrix} elements as a whole, over this server's limit of {} \
                     (--max-matrix-elements)",
                    scheme.name(),
                    limits.max_matrix_elements
                ),
            ));
        }
        if let Some(extreme) = resolved
            .extremes()
            .into_iter()
            .find(|&x| !dtype.round(x).is_finite())
        {
            return Err(RequestError::invalid(
                "dtype",
                format!(
                    "{} values of {} can reach {extreme:e}, which is not finite in {} (largest \
                     finite {:e})",
                    scheme.name(),
                    resolved
                        .structure
                        .map_or(format!("{:?}", resolved.distribution), |s| format!("{s:?}")),
                    dtype.name(),
                    dtype.max_finite()
                ),
            ));
        }
        check_permutation(&spec.permute, spec.shape.len())
            .map_err(|reason| RequestError::invalid("permute", reason))?;
        let selection = Selection::new(&spec.shape, numel, &spec.permute, spec.slice.as_ref())
            .map_err(|e| RequestError::invalid(format!("slice.{}", e.field), e.reason))?;
        selection
            .len()
            .checked_mul(dtype.size() as u64)
            .ok_or_else(|| RequestError::invalid("shape", "the byte length overflows u64"))?;
        Ok(TensorPlan::new(
            index as u32,
            self.seed,
            &spec.name,
            &spec.shape,
            dtype,
            resolved,
            selection,
        ))
    }
}

/// Whether `permute` is empty or a permutation of `0..rank`; why not if it is neither.
fn check_permutation(permute: &[u32], rank: usize) -> Result<(), String> {
    if permute.is_empty() {
        return Ok(());
    }
    if permute.len() != rank {
        return Err(format!(
            "must be empty or list each of the {rank} dimensions once, got {} entries",
            permute.len()
        ));
    }
    let mut seen = vec![false; rank];
    for &d in permute {
        match seen.get_mut(d as usize) {
            Some(seen) if !*seen => *seen = true,
            _ => {
                return Err(format!(
                    "{permute:?} is not a permutation of 0..{rank}: {d} is {}",
                    if (d as usize) < rank {
                        "repeated"
                    } else {
                        "not a dimension"
                    }
                ));
            }
        }
    }
    Ok(())
}
