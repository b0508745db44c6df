//! Helpers of the command-line binary (not part of the library API).
pub mod bench;
pub mod bench_decode;
pub mod decode;
pub mod info;
pub mod linear;
pub mod na;
pub mod npy;
pub mod report;
pub mod run;
pub mod sparse;
pub mod svg;
pub mod tune;

use clap::ValueEnum;
use wgpu_attention::{AttnError, Strategy, StrategyChoice};

/// What every subcommand returns.
pub type CliResult<T> = std::result::Result<T, Failure>;

#[derive(Clone, Copy, ValueEnum)]
pub enum DTypeArg {
    F32,
    F16,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum StrategyArg {
    Auto,
    Tiled,
    Subgroup,
    /// neighborhood calls over 2+ axes on CPU adapters
    Sweep,
}

impl StrategyArg {
    fn choice(self) -> StrategyChoice {
        match self {
            StrategyArg::Auto => StrategyChoice::Auto,
            StrategyArg::Tiled => StrategyChoice::Force(Strategy::Tiled),
            StrategyArg::Subgroup => StrategyChoice::Force(Strategy::Subgroup),
            StrategyArg::Sweep => StrategyChoice::Force(Strategy::Sweep),
        }
    }
}

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
