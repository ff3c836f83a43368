//! Translation between the protobuf messages and the engine's types, and of engine errors
//! into gRPC statuses. Nothing here decides anything the engine does not.

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::{self as proto, init, slice};
use weightinit_engine::{
    self as engine, DType, Distribution, FanMode, Kaiming, Layout, Nonlinearity, RequestError,
    ScalingDistribution, Scheme, SliceSpec, Structure, StructuredScheme, TensorPlan,
};

/// A refused request as INVALID_ARGUMENT or RESOURCE_EXHAUSTED, with a google.rpc.BadRequest
/// naming the field: the one place an engine error becomes a gRPC status.
pub fn status(error: RequestError) -> Status {
    let code = match error {
        RequestError::Invalid { .. } => Code::InvalidArgument,
        RequestError::OverLimit { .. } => Code::ResourceExhausted,
    };
    let details = ErrorDetails::with_bad_request_violation(error.field(), error.reason());
    Status::with_error_details(code, error.to_string(), details)
}

/// An enum number: 0 is "unset", unknown numbers are an error naming `field`.
fn enum_value<E: TryFrom<i32>>(
    value: i32,
    field: impl FnOnce() -> String,
) -> Result<Option<E>, RequestError> {
    if value == 0 {
        return Ok(None);
    }
    E::try_from(value)
        .map(Some)
        .map_err(|_| RequestError::invalid(field(), format!("unknown enum value {value}")))
}

fn dtype(value: i32, field: impl FnOnce() -> String) -> Result<Option<DType>, RequestError> {
    Ok(enum_value::<proto::DType>(value, field)?.map(|d| match d {
        proto::DType::DtypeUnspecified | proto::DType::DtypeFloat32 => DType::Float32,
        proto::DType::DtypeFloat64 => DType::Float64,
        proto::DType::DtypeFloat16 => DType::Float16,
        proto::DType::DtypeBfloat16 => DType::BFloat16,
    }))
}

fn layout(value: i32, field: impl FnOnce() -> String) -> Result<Option<Layout>, RequestError> {
    Ok(enum_value::<proto::Layout>(value, field)?.map(|l| match l {
        proto::Layout::Unspecified | proto::Layout::Torch => Layout::Torch,
        proto::Layout::Keras => Layout::Keras,
    }))
}

fn fan_mode(value: i32, field: impl FnOnce() -> String) -> Result<Option<FanMode>, RequestError> {
    Ok(
        enum_value::<proto::FanMode>(value, field)?.map(|m| match m {
            proto::FanMode::Unspecified | proto::FanMode::FanIn => FanMode::FanIn,
            proto::FanMode::FanOut => FanMode::FanOut,
            proto::FanMode::FanAvg => FanMode::FanAvg,
            proto::FanMode::FanGeoAvg => FanMode::FanGeoAvg,
        }),
    )
}

fn nonlinearity(
    value: i32,
    field: impl FnOnce() -> String,
) -> Result<Option<Nonlinearity>, RequestError> {
    Ok(
        enum_value::<proto::Nonlinearity>(value, field)?.map(|n| match n {
            proto::Nonlinearity::Unspecified | proto::Nonlinearity::LeakyRelu => {
                Nonlinearity::LeakyRelu
            }
            proto::Nonlinearity::Linear => Nonlinearity::Linear,
            proto::Nonlinearity::Sigmoid => Nonlinearity::Sigmoid,
            proto::Nonlinearity::Tanh => Nonlinearity::Tanh,
            proto::Nonlinearity::Relu => Nonlinearity::Relu,
            proto::Nonlinearity::Selu => Nonlinearity::Selu,
        }),
    )
}

fn scaling_distribution(
    value: i32,
    field: impl FnOnce() -> String,
) -> Result<Option<ScalingDistribution>, RequestError> {
    Ok(
        enum_value::<proto::Distribution>(value, field)?.map(|d| match d {
            proto::Distribution::Unspecified | proto::Distribution::TruncatedNormal => {
                ScalingDistribution::TruncatedNormal
            }
            proto::Distribution::UntruncatedNormal => ScalingDistribution::UntruncatedNormal,
            proto::Distribution::Uniform => ScalingDistribution::Uniform,
        }),
    )
}

fn kaiming(a: f64, mode: i32, nl: i32, at: &str) -> Result<Kaiming, RequestError> {
    Ok(Kaiming {
        a,
        mode: fan_mode(mode, || format!("{at}.mode"))?,
        nonlinearity: nonlinearity(nl, || format!("{at}.nonlinearity"))?,
    })
}

/// The scheme of `init`, or `None` when it is unset; `at` is the path of `init`.
fn scheme(init: &proto::Init, at: &str) -> Result<Option<Scheme>, RequestError> {
    use init::Scheme as P;
    let Some(scheme) = &init.scheme else {
        return Ok(None);
    };
    Ok(Some(match scheme {
        P::Zeros(_) => Scheme::Zeros,
        P::Ones(_) => Scheme::Ones,
        P::Constant(c) => Scheme::Constant { value: c.value },
        P::Uniform(u) => Scheme::Uniform {
            low: u.low,
            high: u.high,
        },
        P::Normal(n) => Scheme::Normal {
            mean: n.mean,
            std: n.std,
        },
        P::TruncatedNormal(t) => Scheme::TruncatedNormal {
            mean: t.mean,
            std: t.std,
            a: t.a,
            b: t.b,
        },
        P::XavierUniform(x) => Scheme::XavierUniform { gain: x.gain },
        P::XavierNormal(x) => Scheme::XavierNormal { gain: x.gain },
        P::KaimingUniform(k) => Scheme::KaimingUniform(kaiming(
            k.a,
            k.mode,
            k.nonlinearity,
            &format!("{at}.kaiming_uniform"),
        )?),
        P::KaimingNormal(k) => Scheme::KaimingNormal(kaiming(
            k.a,
            k.mode,
            k.nonlinearity,
            &format!("{at}.kaiming_normal"),
        )?),
        P::VarianceScaling(v) => Scheme::VarianceScaling {
            scale: v.scale,
            mode: fan_mode(v.mode, || format!("{at}.variance_scaling.mode"))?,
            distribution: scaling_distribution(v.distribution, || {
                format!("{at}.variance_scaling.distribution")
            })?,
        },
        P::GlorotUniform(_) => Scheme::GlorotUniform,
        P::GlorotNormal(_) => Scheme::GlorotNormal,
        P::HeUniform(_) => Scheme::HeUniform,
        P::HeNormal(_) => Scheme::HeNormal,
        P::LecunUniform(_) => Scheme::LecunUniform,
        P::LecunNormal(_) => Scheme::LecunNormal,
        P::TorchDefault(_) => Scheme::TorchDefault,
        P::TorchDefaultBias(_) => Scheme::TorchDefaultBias,
        P::Orthogonal(o) => Scheme::Structured(StructuredScheme::Orthogonal { gain: o.gain }),
        P::Eye(_) => Scheme::Structured(StructuredScheme::Eye),
        P::Identity(i) => Scheme::Structured(StructuredScheme::Identity { gain: i.gain }),
        P::Dirac(d) => Scheme::Structured(StructuredScheme::Dirac { groups: d.groups }),
        P::Sparse(s) => Scheme::Structured(StructuredScheme::Sparse {
            sparsity: s.sparsity,
            std: s.std,
        }),
    }))
}

fn range(r: &proto::Range) -> engine::Range {
    engine::Range {
        start: r.start,
        stop: r.stop,
    }
}

fn slice_spec(s: &proto::Slice) -> Option<SliceSpec> {
    Some(match s.kind.as_ref()? {
        slice::Kind::Dims(d) => SliceSpec::Dims(d.ranges.iter().map(range).collect()),
        slice::Kind::Flat(r) => SliceSpec::Flat(range(r)),
        slice::Kind::Shard(s) => SliceSpec::Shard {
            dim: s.dim,
            index: s.index,
            count: s.count,
        },
    })
}

fn tensor(spec: &proto::TensorSpec, index: usize) -> Result<engine::TensorSpec, RequestError> {
    let at = |field: &str| format!("tensors[{index}].{field}");
    Ok(engine::TensorSpec {
        name: spec.name.clone(),
        shape: spec.shape.clone(),
        init: match &spec.init {
            Some(init) => scheme(init, &at("init"))?,
            None => None,
        },
        dtype: dtype(spec.dtype, || at("dtype"))?,
        layout: layout(spec.layout, || at("layout"))?,
        fan_in: spec.fan_in,
        fan_out: spec.fan_out,
        slice: spec.slice.as_ref().and_then(slice_spec),
        permute: spec.permute.clone(),
    })
}

/// The engine's view of a request; unknown enum numbers are refused here.
pub fn request(req: &proto::GenerateRequest) -> Result<engine::Request, RequestError> {
    Ok(engine::Request {
        seed: req.seed,
        tensors: req
            .tensors
            .iter()
            .enumerate()
            .map(|(i, t)| tensor(t, i))
            .collect::<Result<_, _>>()?,
        dtype: dtype(req.dtype, || "dtype".to_owned())?,
        chunk_bytes: req.chunk_bytes,
        layout: layout(req.layout, || "layout".to_owned())?,
        algorithm: req.algorithm,
    })
}

pub fn proto_dtype(dtype: DType) -> proto::DType {
    match dtype {
        DType::Float32 => proto::DType::DtypeFloat32,
        DType::Float64 => proto::DType::DtypeFloat64,
        DType::Float16 => proto::DType::DtypeFloat16,
        DType::BFloat16 => proto::DType::DtypeBfloat16,
    }
}

fn resolved(r: &engine::Resolved) -> proto::Resolved {
    let mut out = proto::Resolved {
        scheme: r.scheme.to_owned(),
        fan_in: r.fans.fan_in,
        fan_out: r.fans.fan_out,
        distribution: r.distribution.name().to_owned(),
        gain: r.gain,
        ..Default::default()
    };
    match r.distribution {
        Distribution::Constant { value } => out.value = value,
        Distribution::Uniform { low, high } => (out.low, out.high) = (low, high),
        Distribution::Normal { mean, std } => (out.mean, out.std) = (mean, std),
        Distribution::TruncatedNormal {
            mean,
            std,
            alpha,
            beta,
        } => {
            (out.mean, out.std) = (mean, std);
            (out.trunc_low, out.trunc_high) = (mean + std * alpha, mean + std * beta);
        }
    }
    if let Some(structure) = r.structure {
        structured(&structure, &mut out);
    }
    out
}

/// A structured scheme's own fields; its distribution names the structure.
fn structured(structure: &Structure, out: &mut proto::Resolved) {
    match *structure {
        Structure::Orthogonal { rows, cols, .. } => {
            out.distribution = "orthogonal".to_owned();
            (out.mean, out.std) = (0.0, 0.0);
            (out.rows, out.cols) = (Some(rows), Some(cols));
        }
        Structure::Eye { value } => {
            out.distribution = "eye".to_owned();
            out.value = value;
        }
        Structure::Dirac { groups, .. } => {
            out.distribution = "dirac".to_owned();
            (out.value, out.groups) = (1.0, Some(groups));
        }
        Structure::Sparse {
            rows, cols, zeros, ..
        } => {
            out.distribution = "sparse".to_owned();
            (out.rows, out.cols) = (Some(rows), Some(cols));
            out.zeros_per_column = Some(zeros);
        }
    }
}

pub fn header(plan: &TensorPlan) -> proto::TensorHeader {
    proto::TensorHeader {
        index: plan.index,
        name: plan.name.clone(),
        shape: plan.shape.clone(),
        output_shape: plan.output_shape().to_vec(),
        dtype: proto_dtype(plan.dtype).into(),
        byte_length: plan.byte_length(),
        algorithm: engine::ALGORITHMS[0],
        resolved: Some(resolved(&plan.resolved)),
    }
}
