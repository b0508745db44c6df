//! The element types of tensors (core, below the tensor and the tuning data that both name it).

use std::fmt;

use crate::error::{AttnError, Result};

/// Element type of a tensor. Attention's inputs and outputs are `F32` or `F16`; the integer
/// types are for data that snippets read (the sparse family's aux buffers: document ids,
/// tables).
#[non_exhaustive]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F16,
    I32,
    U32,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::F32 | DType::I32 | DType::U32 => 4,
            DType::F16 => 2,
        }
    }
    pub fn wgsl(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::I32 => "i32",
            DType::U32 => "u32",
        }
    }
    /// `F32` or `F16`: what attention computes with.
    pub fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::F16)
    }
    /// A typed error unless `F32` or `F16` (`what` names the tensor).
    pub fn require_float(self, what: &str) -> Result<()> {
        if self.is_float() {
            return Ok(());
        }
        Err(AttnError::DType {
            what: what.to_string(),
            expected: "f32 or f16".into(),
            actual: self.to_string(),
        })
    }
    /// A typed error ([`AttnError::DType`]) unless `self` is `want` (`what` names the tensor).
    pub fn require(self, what: &str, want: DType) -> Result<()> {
        if self == want {
            return Ok(());
        }
        Err(AttnError::DType {
            what: what.to_string(),
            expected: want.to_string(),
            actual: self.to_string(),
        })
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.wgsl())
    }
}
