//! Helpers of the command-line binary (not part of the library API).
pub mod na;
pub mod npy;
pub mod svg;
