//! One error type for everything a caller or a device can get wrong.

/// Every failure the public API can report. Each variant says what was expected and what came.
/// Non-exhaustive: new families may add variants, so match with a wildcard arm.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AttnError {
    /// No adapter matched (none at all, or none matching `WGPU_ATTENTION_ADAPTER`).
    #[error("no GPU adapter found: {0}")]
    NoAdapter(String),
    /// The adapter refused to open a device.
    #[error("could not open a device on adapter '{adapter}': {reason}")]
    RequestDevice { adapter: String, reason: String },
    /// A tensor had the wrong shape.
    #[error("shape mismatch for {what}: expected {expected}, got {actual}")]
    Shape {
        what: String,
        expected: String,
        actual: String,
    },
    /// A tensor had the wrong element type.
    #[error("dtype mismatch for {what}: expected {expected}, got {actual}")]
    DType {
        what: String,
        expected: String,
        actual: String,
    },
    /// A head dimension that no kernel is built for.
    #[error("unsupported head dim {what} = {got}: supported are 1..={max}")]
    HeadDim {
        what: &'static str,
        got: usize,
        max: usize,
    },
    /// The adapter lacks a feature this call needs.
    #[error("feature {feature} is not available on adapter '{adapter}' (needed for {needed_for})")]
    MissingFeature {
        feature: &'static str,
        adapter: String,
        needed_for: String,
    },
    /// A size is over one of the adapter's limits.
    #[error("adapter limit exceeded: {what} needs {needed}, the adapter allows {limit}")]
    Limit {
        what: String,
        needed: u64,
        limit: u64,
    },
    /// An option or argument with a value outside what it accepts.
    #[error("invalid argument {what}: expected {expected}, got {actual}")]
    Invalid {
        what: String,
        expected: String,
        actual: String,
    },
    /// A generated shader that the device (or naga) rejected: a bug in this crate, reported with
    /// the specialization that failed.
    #[error("shader '{name}' failed to build: {message}")]
    Shader { name: String, message: String },
    /// The device reported an error (a validation error caught in an error scope, a lost
    /// device, a mapping failure, out of memory).
    #[error("GPU error: {0}")]
    Gpu(String),
}

impl AttnError {
    /// An [`AttnError::Invalid`] from what was expected and what came.
    pub fn invalid(
        what: impl Into<String>,
        expected: impl Into<String>,
        actual: impl std::fmt::Display,
    ) -> Self {
        AttnError::Invalid {
            what: what.into(),
            expected: expected.into(),
            actual: actual.to_string(),
        }
    }

    pub(crate) fn shape(
        what: impl Into<String>,
        expected: impl Into<String>,
        actual: impl std::fmt::Debug,
    ) -> Self {
        AttnError::Shape {
            what: what.into(),
            expected: expected.into(),
            actual: format!("{actual:?}"),
        }
    }
}

pub type Result<T> = std::result::Result<T, AttnError>;

/// A size as the `u32` a kernel's uniform holds, or [`AttnError::Limit`] naming it: never a
/// wrapped value.
pub(crate) fn u32_of(x: usize, what: &str) -> Result<u32> {
    u32::try_from(x).map_err(|_| AttnError::Limit {
        what: what.into(),
        needed: x as u64,
        limit: u32::MAX as u64,
    })
}
