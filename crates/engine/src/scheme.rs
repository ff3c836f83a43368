//! Init schemes: PyTorch's and Keras's formulas turned into a distribution, given the fans.
//!
//! Parameters left unset take the defaults of algorithm v1. Every formula is evaluated in
//! f64 in the order the algorithm writes it, so all implementations agree on each bit.

use super::distribution::Distribution;
use super::fans::{Fans, Layout};
pub use super::param::{SchemeError, SchemeField};
use super::param::{finite, invalid, non_negative, param};
use super::structured::{Structure, StructuredScheme};

/// Keras's correction making a [-2, 2]-truncated normal have the wanted variance.
#[allow(clippy::excessive_precision)] // written as the algorithm writes it
const TRUNCATION_STD_CORRECTION: f64 = 0.87962566103423978;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FanMode {
    FanIn,
    FanOut,
    FanAvg,
    FanGeoAvg,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Nonlinearity {
    Linear,
    Sigmoid,
    Tanh,
    Relu,
    LeakyRelu,
    Selu,
}

/// Which distribution variance scaling draws from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScalingDistribution {
    TruncatedNormal,
    UntruncatedNormal,
    Uniform,
}

/// A scheme as requested; `None` means "the default".
#[derive(Clone, Debug, PartialEq)]
pub enum Scheme {
    Zeros,
    Ones,
    Constant {
        value: f64,
    },
    Uniform {
        low: Option<f64>,
        high: Option<f64>,
    },
    Normal {
        mean: Option<f64>,
        std: Option<f64>,
    },
    TruncatedNormal {
        mean: Option<f64>,
        std: Option<f64>,
        a: Option<f64>,
        b: Option<f64>,
    },
    XavierUniform {
        gain: Option<f64>,
    },
    XavierNormal {
        gain: Option<f64>,
    },
    KaimingUniform(Kaiming),
    KaimingNormal(Kaiming),
    VarianceScaling {
        scale: Option<f64>,
        mode: Option<FanMode>,
        distribution: Option<ScalingDistribution>,
    },
    GlorotUniform,
    GlorotNormal,
    HeUniform,
    HeNormal,
    LecunUniform,
    LecunNormal,
    TorchDefault,
    TorchDefaultBias,
    /// orthogonal, eye, identity, dirac or sparse: values that depend on the tensor's shape.
    Structured(StructuredScheme),
}

#[derive(Clone, Copy, Debug, PartialEq, Default)]
pub struct Kaiming {
    pub a: f64,
    pub mode: Option<FanMode>,
    pub nonlinearity: Option<Nonlinearity>,
}

/// What a scheme became for one tensor.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Resolved {
    pub scheme: &'static str,
    pub fans: Fans,
    /// What each element's word becomes; for a structured scheme, the draws it starts from
    /// (standard normal for orthogonal, normal(0, std) for sparse, 0 for eye and dirac).
    pub distribution: Distribution,
    pub gain: Option<f64>,
    /// Set for the structured schemes, which do more than map each word to a value.
    pub structure: Option<Structure>,
}

impl Resolved {
    /// The values that bound the tensor's elements (algorithm v1 section 4).
    pub fn extremes(&self) -> [f64; 2] {
        match &self.structure {
            Some(structure) => structure.extremes(),
            None => self.distribution.extremes(),
        }
    }
}

impl Scheme {
    /// The canonical snake_case name (the proto field name of the scheme).
    pub const fn name(&self) -> &'static str {
        match self {
            Self::Zeros => "zeros",
            Self::Ones => "ones",
            Self::Constant { .. } => "constant",
            Self::Uniform { .. } => "uniform",
            Self::Normal { .. } => "normal",
            Self::TruncatedNormal { .. } => "truncated_normal",
            Self::XavierUniform { .. } => "xavier_uniform",
            Self::XavierNormal { .. } => "xavier_normal",
            Self::KaimingUniform(_) => "kaiming_uniform",
            Self::KaimingNormal(_) => "kaiming_normal",
            Self::VarianceScaling { .. } => "variance_scaling",
            Self::GlorotUniform => "glorot_uniform",
            Self::GlorotNormal => "glorot_normal",
            Self::HeUniform => "he_uniform",
            Self::HeNormal => "he_normal",
            Self::LecunUniform => "lecun_uniform",
            Self::LecunNormal => "lecun_normal",
            Self::TorchDefault => "torch_default",
            Self::TorchDefaultBias => "torch_default_bias",
            Self::Structured(s) => s.name(),
        }
    }

    /// Every scheme name, in proto field order.
    pub const NAMES: [&'static str; 24] = [
        "zeros",
        "ones",
        "constant",
        "uniform",
        "normal",
        "truncated_normal",
        "xavier_uniform",
        "xavier_normal",
        "kaiming_uniform",
        "kaiming_normal",
        "variance_scaling",
        "glorot_uniform",
        "glorot_normal",
        "he_uniform",
        "he_normal",
        "lecun_uniform",
        "lecun_normal",
        "torch_default",
        "torch_default_bias",
        "orthogonal",
        "eye",
        "identity",
        "dirac",
        "sparse",
    ];

    /// Applies defaults and the scheme's formula to a tensor of `shape` under `layout`.
    pub fn resolve(
        &self,
        shape: &[u64],
        layout: Layout,
        fans: Fans,
    ) -> Result<Resolved, SchemeError> {
        match self {
            Self::Structured(s) => {
                let (structure, distribution, gain) = s.resolve(shape, layout)?;
                Ok(Resolved {
                    scheme: self.name(),
                    fans,
                    distribution,
                    gain,
                    structure: Some(structure),
                })
            }
            _ => self.resolve_fans(fans),
        }
    }

    /// Applies defaults and the formula of a scheme that maps each word to a value.
    fn resolve_fans(&self, fans: Fans) -> Result<Resolved, SchemeError> {
        let mut gain = None;
        let distribution = match *self {
            Self::Zeros => Distribution::Constant { value: 0.0 },
            Self::Ones => Distribution::Constant { value: 1.0 },
            Self::Constant { value } => Distribution::Constant {
                value: finite("value", value)?,
            },
            Self::Uniform { low, high } => {
                let low = param("low", low, 0.0)?;
                let high = param("high", high, 1.0)?;
                if low > high {
                    return Err(invalid(
                        SchemeField::Parameter("high"),
                        format!("must be >= low ({low}), got {high}"),
                    ));
                }
                if !(high - low).is_finite() {
                    return Err(invalid(
                        SchemeField::Parameter(""),
                        "high - low overflows f64",
                    ));
                }
                Distribution::Uniform { low, high }
            }
            Self::Normal { mean, std } => Distribution::Normal {
                mean: param("mean", mean, 0.0)?,
                std: non_negative("std", param("std", std, 1.0)?)?,
            },
            Self::TruncatedNormal { mean, std, a, b } => {
                let mean = param("mean", mean, 0.0)?;
                let std = param("std", std, 1.0)?;
                if std <= 0.0 {
                    return Err(invalid(
                        SchemeField::Parameter("std"),
                        format!("must be > 0 for a truncated normal, got {std}"),
                    ));
                }
                let a = param("a", a, -2.0)?;
                let b = param("b", b, 2.0)?;
                truncated(mean, std, (a - mean) / std, (b - mean) / std)?
            }
            Self::XavierUniform { gain: g } | Self::XavierNormal { gain: g } => {
                let g = non_negative("gain", param("gain", g, 1.0)?)?;
                gain = Some(g);
                let sum = fan_sum(fans)?;
                let std = g * (2.0 / sum).sqrt();
                if matches!(self, Self::XavierUniform { .. }) {
                    symmetric_uniform(3.0f64.sqrt() * std)
                } else {
                    Distribution::Normal { mean: 0.0, std }
                }
            }
            Self::KaimingUniform(k) | Self::KaimingNormal(k) => {
                let (g, std) = kaiming_std(k, fans)?;
                gain = Some(g);
                if matches!(self, Self::KaimingUniform(_)) {
                    symmetric_uniform(3.0f64.sqrt() * std)
                } else {
                    Distribution::Normal { mean: 0.0, std }
                }
            }
            Self::TorchDefault => {
                let k = Kaiming {
                    a: 5.0f64.sqrt(),
                    mode: Some(FanMode::FanIn),
                    nonlinearity: Some(Nonlinearity::LeakyRelu),
                };
                let (g, std) = kaiming_std(k, fans)?;
                gain = Some(g);
                symmetric_uniform(3.0f64.sqrt() * std)
            }
            Self::TorchDefaultBias => {
                let fan_in = known(fans.fan_in, SchemeField::FanIn)?;
                let b = if fan_in > 0 {
                    1.0 / (fan_in as f64).sqrt()
                } else {
                    0.0
                };
                symmetric_uniform(b)
            }
            Self::VarianceScaling {
                scale,
                mode,
                distribution,
            } => {
                let scale = non_negative("scale", param("scale", scale, 1.0)?)?;
                variance_scaling(
                    scale,
                    mode.unwrap_or(FanMode::FanIn),
                    distribution.unwrap_or(ScalingDistribution::TruncatedNormal),
                    fans,
                )?
            }
            Self::GlorotUniform => {
                variance_scaling(1.0, FanMode::FanAvg, ScalingDistribution::Uniform, fans)?
            }
            Self::GlorotNormal => variance_scaling(
                1.0,
                FanMode::FanAvg,
                ScalingDistribution::TruncatedNormal,
                fans,
            )?,
            Self::HeUniform => {
                variance_scaling(2.0, FanMode::FanIn, ScalingDistribution::Uniform, fans)?
            }
            Self::HeNormal => variance_scaling(
                2.0,
                FanMode::FanIn,
                ScalingDistribution::TruncatedNormal,
                fans,
            )?,
            Self::LecunUniform => {
                variance_scaling(1.0, FanMode::FanIn, ScalingDistribution::Uniform, fans)?
            }
            Self::LecunNormal => variance_scaling(
                1.0,
                FanMode::FanIn,
                ScalingDistribution::TruncatedNormal,
                fans,
            )?,
            Self::Structured(_) => unreachable!("resolve handles structured schemes"),
        };
        Ok(Resolved {
            scheme: self.name(),
            fans,
            distribution,
            gain,
            structure: None,
        })
    }
}

fn symmetric_uniform(bound: f64) -> Distribution {
    Distribution::Uniform {
        low: -bound,
        high: bound,
    }
}

fn truncated(mean: f64, std: f64, alpha: f64, beta: f64) -> Result<Distribution, SchemeError> {
    if !(alpha.is_finite() && beta.is_finite()) {
        return Err(invalid(
            SchemeField::Parameter(""),
            "truncation bounds in units of std overflow f64",
        ));
    }
    if alpha >= beta {
        return Err(invalid(
            SchemeField::Parameter("b"),
            "the truncation interval is empty: need a < b",
        ));
    }
    let distribution = Distribution::TruncatedNormal {
        mean,
        std,
        alpha,
        beta,
    };
    if let super::distribution::Sampler::TruncatedNormal { mass, .. } = distribution.sampler()
        && mass <= 0.0
    {
        return Err(invalid(
            SchemeField::Parameter(""),
            format!("the truncation interval [{alpha}, {beta}] std has no probability mass in f64"),
        ));
    }
    Ok(distribution)
}

fn known(fan: Option<u64>, field: SchemeField) -> Result<u64, SchemeError> {
    fan.ok_or_else(|| {
        let which = if field == SchemeField::FanIn {
            "fan_in"
        } else {
            "fan_out"
        };
        invalid(
            field,
            format!(
                "the scheme needs {which}: set it, or give the shape rank >= 2 under LAYOUT_TORCH"
            ),
        )
    })
}

fn non_zero(fan: u64, field: SchemeField) -> Result<u64, SchemeError> {
    if fan == 0 {
        Err(invalid(field, "the scheme divides by this fan, which is 0"))
    } else {
        Ok(fan)
    }
}

/// fan_in + fan_out summed as integers, then as f64; must be non-zero.
fn fan_sum(fans: Fans) -> Result<f64, SchemeError> {
    let fan_in = known(fans.fan_in, SchemeField::FanIn)?;
    let fan_out = known(fans.fan_out, SchemeField::FanOut)?;
    let sum = u128::from(fan_in) + u128::from(fan_out);
    if sum == 0 {
        return Err(invalid(SchemeField::FanIn, "fan_in + fan_out is 0"));
    }
    Ok(sum as f64)
}

/// PyTorch's calculate_gain.
fn gain(nonlinearity: Nonlinearity, slope: f64) -> f64 {
    match nonlinearity {
        Nonlinearity::Linear | Nonlinearity::Sigmoid => 1.0,
        Nonlinearity::Tanh => 5.0 / 3.0,
        Nonlinearity::Relu => 2.0f64.sqrt(),
        Nonlinearity::Selu => 3.0 / 4.0,
        Nonlinearity::LeakyRelu => (2.0 / (1.0 + slope * slope)).sqrt(),
    }
}

/// (gain, std) of kaiming: std = gain(nonlinearity, a) / sqrt(fan).
fn kaiming_std(k: Kaiming, fans: Fans) -> Result<(f64, f64), SchemeError> {
    let a = finite("a", k.a)?;
    let fan = match k.mode.unwrap_or(FanMode::FanIn) {
        FanMode::FanIn => non_zero(known(fans.fan_in, SchemeField::FanIn)?, SchemeField::FanIn)?,
        FanMode::FanOut => non_zero(
            known(fans.fan_out, SchemeField::FanOut)?,
            SchemeField::FanOut,
        )?,
        FanMode::FanAvg | FanMode::FanGeoAvg => {
            return Err(invalid(
                SchemeField::Parameter("mode"),
                "kaiming accepts only FAN_MODE_FAN_IN or FAN_MODE_FAN_OUT",
            ));
        }
    };
    let g = gain(k.nonlinearity.unwrap_or(Nonlinearity::LeakyRelu), a);
    Ok((g, g / (fan as f64).sqrt()))
}

fn variance_scaling(
    scale: f64,
    mode: FanMode,
    distribution: ScalingDistribution,
    fans: Fans,
) -> Result<Distribution, SchemeError> {
    let fan_in = || known(fans.fan_in, SchemeField::FanIn);
    let fan_out = || known(fans.fan_out, SchemeField::FanOut);
    let n = match mode {
        FanMode::FanIn => fan_in()? as f64,
        FanMode::FanOut => fan_out()? as f64,
        FanMode::FanAvg => (u128::from(fan_in()?) + u128::from(fan_out()?)) as f64 / 2.0,
        FanMode::FanGeoAvg => (fan_in()? as f64 * fan_out()? as f64).sqrt(),
    };
    let s = scale / 1.0f64.max(n);
    Ok(match distribution {
        ScalingDistribution::TruncatedNormal => {
            truncated(0.0, s.sqrt() / TRUNCATION_STD_CORRECTION, -2.0, 2.0)?
        }
        ScalingDistribution::UntruncatedNormal => Distribution::Normal {
            mean: 0.0,
            std: s.sqrt(),
        },
        ScalingDistribution::Uniform => symmetric_uniform((3.0 * s).sqrt()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fans(fan_in: u64, fan_out: u64) -> Fans {
        Fans {
            fan_in: Some(fan_in),
            fan_out: Some(fan_out),
        }
    }

    #[test]
    fn xavier_uniform_bound() {
        let r = Scheme::XavierUniform { gain: None }
            .resolve_fans(fans(784, 256))
            .unwrap();
        let b = 3.0f64.sqrt() * (1.0 * (2.0f64 / 1040.0).sqrt());
        assert_eq!(r.distribution, Distribution::Uniform { low: -b, high: b });
        assert_eq!(r.gain, Some(1.0));
    }

    #[test]
    fn torch_default_is_kaiming_uniform_with_a_sqrt5() {
        let r = Scheme::TorchDefault.resolve_fans(fans(200, 300)).unwrap();
        let g = (2.0 / (1.0 + 5.0f64.sqrt() * 5.0f64.sqrt())).sqrt();
        let b = 3.0f64.sqrt() * (g / 200f64.sqrt());
        assert_eq!(r.distribution, Distribution::Uniform { low: -b, high: b });
    }

    #[test]
    fn glorot_normal_is_truncated_with_the_correction() {
        let r = Scheme::GlorotNormal.resolve_fans(fans(784, 128)).unwrap();
        let std = (1.0f64 / 456.0).sqrt() / TRUNCATION_STD_CORRECTION;
        assert_eq!(
            r.distribution,
            Distribution::TruncatedNormal {
                mean: 0.0,
                std,
                alpha: -2.0,
                beta: 2.0
            }
        );
    }

    #[test]
    fn bias_with_zero_fan_is_all_zero_bounds() {
        let r = Scheme::TorchDefaultBias.resolve_fans(fans(0, 0)).unwrap();
        assert_eq!(
            r.distribution,
            Distribution::Uniform {
                low: -0.0,
                high: 0.0
            }
        );
    }

    #[test]
    fn missing_and_zero_fans_are_errors() {
        let none = Fans::default();
        assert_eq!(
            Scheme::XavierNormal { gain: None }
                .resolve_fans(none)
                .unwrap_err()
                .field,
            SchemeField::FanIn
        );
        let k = Scheme::KaimingNormal(Kaiming {
            mode: Some(FanMode::FanOut),
            ..Default::default()
        });
        assert_eq!(
            k.resolve_fans(fans(3, 0)).unwrap_err().field,
            SchemeField::FanOut
        );
        let avg = Scheme::KaimingUniform(Kaiming {
            mode: Some(FanMode::FanAvg),
            ..Default::default()
        });
        assert_eq!(
            avg.resolve_fans(fans(3, 3)).unwrap_err().field,
            SchemeField::Parameter("mode")
        );
    }

    #[test]
    fn bad_parameters_name_their_field() {
        let cases = [
            (
                Scheme::Normal {
                    mean: None,
                    std: Some(-1.0),
                },
                "std",
            ),
            (
                Scheme::Uniform {
                    low: Some(1.0),
                    high: Some(0.0),
                },
                "high",
            ),
            (
                Scheme::Uniform {
                    low: Some(-f64::MAX),
                    high: Some(f64::MAX),
                },
                "",
            ),
            (Scheme::Constant { value: f64::NAN }, "value"),
            (
                Scheme::TruncatedNormal {
                    mean: None,
                    std: Some(0.0),
                    a: None,
                    b: None,
                },
                "std",
            ),
            (
                Scheme::TruncatedNormal {
                    mean: None,
                    std: None,
                    a: Some(40.0),
                    b: Some(50.0),
                },
                "",
            ),
            (
                Scheme::TruncatedNormal {
                    mean: None,
                    std: None,
                    a: Some(1.0),
                    b: Some(1.0),
                },
                "b",
            ),
        ];
        for (scheme, field) in cases {
            let err = scheme.resolve_fans(fans(1, 1)).unwrap_err();
            assert_eq!(
                err.field,
                SchemeField::Parameter(field),
                "{scheme:?}: {}",
                err.reason
            );
        }
    }
}
