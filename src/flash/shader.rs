//! The dense family's geometry, which lives in the engine (`softmax::dense`) so that other
//! families can compose a dense call with theirs.

pub use crate::softmax::dense::{Sequence, SEQUENCE};
