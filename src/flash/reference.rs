//! The dense family's f64 reference: the engine's reference core
//! ([`crate::softmax::reference`]) with no hooks, every option, no tiling, no tricks. Tests and
//! the CLI's `--check` compare the GPU against it.

pub use crate::softmax::reference::{
    attention_plain_f16, attention_reference, compare, round_f16, visible, Comparison, RefInputs,
    RefOutput,
};
