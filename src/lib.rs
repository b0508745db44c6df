//! # wgpu-attention
//!
//! Portable GPU attention in WGSL on `wgpu`: Vulkan, Metal, DX12 and WebGPU in the browser.
//!
//! ```no_run
//! use wgpu_attention::{flash_attention, FlashOptions, GpuContext, Tensor};
//! # fn main() -> wgpu_attention::Result<()> {
//! let ctx = GpuContext::new()?;                       // default adapter (lavapipe without a GPU)
//! let (b, l, h, d) = (1, 128, 4, 64);
//! let x: Vec<f32> = (0..b * l * h * d).map(|i| (i as f32 * 0.37).sin()).collect();
//! let q = Tensor::from_f32(&ctx, &x, &[b, l, h, d])?;  // [batch, seq, heads, dim]
//! let opts = FlashOptions::default().causal(true).return_lse(true);
//! let res = flash_attention(&ctx, &q, &q, &q, &opts)?;
//! let o: Vec<f32> = res.out.to_vec_f32(&ctx)?;         // [batch, seq, heads, dim]
//! # Ok(()) }
//! ```
//!
//! See ARCHITECTURE.md for the layers and where a new variant goes.

pub mod baseline;
pub mod bench;
pub mod builder;
pub mod context;
pub mod decode;
pub mod dtype;
pub mod error;
pub mod flash;
pub mod linear;
pub mod neighborhood;
pub mod pipeline;
pub mod registry;
pub mod resources;
pub mod softmax;
pub mod sparse;
pub mod tensor;
pub mod timing;
pub mod tune;
pub mod tuning;
pub mod wgsl;

pub use context::{Capabilities, GpuContext};
pub use decode::{
    decode_attention, decode_attention_into, encode_decode_attention, encode_merge_attention,
    merge_attention, AttentionPart, DecodeOptions, DecodePlan, KvCache, KvFormat, PagePool,
};
pub use error::{AttnError, Result};
pub use flash::backward::{
    encode_flash_attention_backward, flash_attention_backward, flash_attention_backward_into,
    FlashBackwardPlan, FlashGrads,
};
pub use flash::reference::{attention_plain_f16, attention_reference, RefInputs, RefOutput};
pub use flash::{
    encode_flash_attention, flash_attention, flash_attention_into, FlashOptions, FlashPlan,
};
pub use linear::{
    encode_linear_attention, linear_attention, linear_attention_into, FeatureMap, LinearOptions,
    LinearOutput, LinearPlan, LinearShape, Mode, Rule,
};
pub use neighborhood::{
    encode_neighborhood_attention, neighborhood_attention, neighborhood_attention_into, NaAxis,
    NeighborhoodOptions, NeighborhoodPlan,
};
pub use softmax::reference_grad::{
    attention_backward_plain_f16, attention_backward_reference, RefGrads,
};
pub use softmax::{AttentionOutput, AttnShape, StrategyChoice, Tile};
/// The sparse family's mask builders (FlexAttention's patterns, each with its WGSL twin).
pub use sparse::masks;
pub use sparse::routing::TopK;
pub use sparse::{
    encode_sparse_attention, sparse_attention, sparse_attention_into, BlockLayout, BlockMask,
    MaskMod, Normalizer, SparseOptions, SparsePlan,
};
pub use tensor::{DType, Tensor};
pub use tuning::Strategy;
/// The `wgpu` this crate is built on (encoders and devices passed in must come from it).
pub use wgpu;
