//! Typed errors of the numeric core ([`CoreError`]) and of configuration files ([`ConfigError`], shared by
//! `armd run`'s daemon configuration and `armd simulate`'s). Each carries what the caller needs to report
//! the problem (which input or key, which index, which value) and never panics on user data.

use std::fmt;

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

/// A configuration value that is out of range, of the wrong kind, or unknown. `key` is the dotted TOML
/// path (`protocol.k`, `strategies[2]`, `kafka.topics.labels`); fix that key in the file or the flag or
/// environment variable that overrides it. `value`, when set, is the offending value as it is shown.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigError {
    pub key: String,
    pub value: Option<String>,
    pub message: String,
}

impl ConfigError {
    pub fn new(key: impl Into<String>, message: impl fmt::Display) -> Self {
        Self {
            key: key.into(),
            value: None,
            message: message.to_string(),
        }
    }

    /// The same error, showing the offending value.
    pub fn with_value(mut self, value: impl fmt::Display) -> Self {
        self.value = Some(value.to_string());
        self
    }

    /// `` `key` = value: message `` (the value part only when set).
    fn fmt_entry(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "`{}`", self.key)?;
        if let Some(v) = &self.value {
            write!(f, " = {v}")?;
        }
        write!(f, ": {}", self.message)
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("config key ")?;
        self.fmt_entry(f)
    }
}

impl std::error::Error for ConfigError {}

/// Every invalid value of one configuration, so a single run reports all bad keys at once.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0.len();
        write!(
            f,
            "{n} invalid configuration value{}:",
            if n == 1 { "" } else { "s" }
        )?;
        for e in &self.0 {
            f.write_str("\n  ")?;
            e.fmt_entry(f)?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}
