//! Checks of a scheme's parameters, and the errors that name the parameter at fault; shared
//! by the plain schemes and the structured ones.

/// Why a scheme cannot be resolved; `field` is relative to the scheme's message
/// (empty for the message itself), or one of the tensor's `fan_in` / `fan_out`.
#[derive(Debug, PartialEq)]
pub struct SchemeError {
    pub field: SchemeField,
    pub reason: String,
}

#[derive(Debug, PartialEq, Eq)]
pub enum SchemeField {
    /// A parameter of the scheme message, e.g. "std"; "" for the whole message.
    Parameter(&'static str),
    /// The tensor's shape does not suit the scheme.
    Shape,
    FanIn,
    FanOut,
}

pub(super) fn invalid(field: SchemeField, reason: impl Into<String>) -> SchemeError {
    SchemeError {
        field,
        reason: reason.into(),
    }
}

/// Rejects NaN and infinities for parameter `name`.
pub(super) fn finite(name: &'static str, value: f64) -> Result<f64, SchemeError> {
    if value.is_finite() {
        Ok(value)
    } else {
        Err(invalid(
            SchemeField::Parameter(name),
            format!("must be finite, got {value}"),
        ))
    }
}

pub(super) fn param(
    name: &'static str,
    value: Option<f64>,
    default: f64,
) -> Result<f64, SchemeError> {
    finite(name, value.unwrap_or(default))
}

pub(super) fn non_negative(name: &'static str, value: f64) -> Result<f64, SchemeError> {
    if value >= 0.0 {
        Ok(value)
    } else {
        Err(invalid(
            SchemeField::Parameter(name),
            format!("must be >= 0, got {value}"),
        ))
    }
}
