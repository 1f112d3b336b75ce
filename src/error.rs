//! Typed errors of the numeric core. Each variant carries what the caller needs to report the problem
//! (which input, which index, which value) and never panics on user data.

use thiserror::Error;

/// Errors returned by the pure numeric modules ([`crate::posterior`], [`crate::selection`], ...).
#[derive(Debug, Error, Clone, PartialEq)]
pub enum CoreError {
    /// A vector's length differs from the model dimension. Callers should reject the input message.
    #[error("{what}: expected dimension {expected}, got {got}")]
    Dimension {
        what: &'static str,
        expected: usize,
        got: usize,
    },
    /// A value is NaN or infinite. Callers should reject the input message.
    #[error("{what}: non-finite value {value} at index {index}")]
    NonFinite {
        what: &'static str,
        index: usize,
        value: f64,
    },
    /// An empty vector or a zero-dimensional model was given where data are needed.
    #[error("{what}: must not be empty")]
    Empty { what: &'static str },
    /// A label outside [0, 1].
    #[error("label {value} is outside [0, 1]")]
    LabelOutOfRange { value: f64 },
    /// A parameter outside its valid range (prior precision, epsilon, batch size, ...).
    #[error("invalid parameter {name} = {value}: {reason}")]
    Parameter {
        name: &'static str,
        value: String,
        reason: &'static str,
    },
    /// An unknown strategy, scaling or candidate-mode name.
    #[error("unknown {what} '{name}' (expected one of: {expected})")]
    UnknownName {
        what: &'static str,
        name: String,
        expected: &'static str,
    },
    /// A matrix that should be positive definite is not, even after refactoring.
    #[error("matrix is not positive definite ({context})")]
    NotPositiveDefinite { context: &'static str },
    /// An index (candidate, response) outside its collection.
    #[error("{what}: index {index} out of range (len {len})")]
    Index {
        what: &'static str,
        index: usize,
        len: usize,
    },
}

/// Checks that every value is finite; names the input and the first bad index otherwise.
pub fn check_finite(what: &'static str, values: &[f64]) -> Result<(), CoreError> {
    match values.iter().position(|v| !v.is_finite()) {
        None => Ok(()),
        Some(index) => Err(CoreError::NonFinite {
            what,
            index,
            value: values[index],
        }),
    }
}

/// Checks a vector's length against the model dimension.
pub fn check_dim(what: &'static str, expected: usize, got: usize) -> Result<(), CoreError> {
    if expected == got {
        Ok(())
    } else {
        Err(CoreError::Dimension {
            what,
            expected,
            got,
        })
    }
}
