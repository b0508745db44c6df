//! Helpers of the command-line binary (not part of the library API).
pub mod linear;
pub mod na;
pub mod npy;
pub mod sparse;
pub mod svg;

use wgpu_attention::AttnError;

/// How the CLI fails: bad input (arguments, files, shapes, sizes the adapter cannot take) is
/// exit code 2, a device failure or a check over tolerance exit code 1. File errors are the
/// CLI's own: the library has no files.
#[derive(Debug)]
pub enum Failure {
    /// Bad input: exit code 2.
    Input(String),
    /// Device failure or check over tolerance: exit code 1.
    Run(String),
}

impl From<AttnError> for Failure {
    fn from(e: AttnError) -> Self {
        match e {
            AttnError::Shape { .. }
            | AttnError::DType { .. }
            | AttnError::HeadDim { .. }
            | AttnError::Invalid { .. }
            | AttnError::Limit { .. }
            | AttnError::MissingFeature { .. } => Failure::Input(e.to_string()),
            _ => Failure::Run(e.to_string()),
        }
    }
}
