//! Decode: attention of a few new queries per sequence (Lq from 1 to ~16) over a long KV
//! cache, as an inference engine calls it once per generated token (FlashAttention's
//! `flash_attn_with_kvcache`, flash-decoding, vLLM's paged cache, ggml's quantized caches).
//!
//! - **Split-KV**: the visible keys of each (batch, KV head) are cut into splits, each a
//!   workgroup that writes a partial O and LSE; the engine's merge (`softmax::merge`)
//!   combines them exactly. The query heads
//!   that share a KV head (GQA/MQA) are processed together.
//! - **Paged caches**: `k`, `v` `[num_pages, page_size, Hkv, D]` and a block table
//!   `[B, max_blocks]` (i32): logical key `j` of sequence `b` is row `j % page_size` of page
//!   `block_table[b, j / page_size]`. Without a block table the cache is `[B, Lk, Hkv, D]`.
//! - **Quantized caches**: ggml's `q8_0` and `q4_0` blocks ([`quant`]), dequantized in
//!   registers as the keys are read; scores and softmax stay f32.
//!
//! The family imports the core and the softmax engine (its options' meaning, the output type,
//! the f64 reference core), no other family.

mod append;
mod check;
mod encode;
pub mod pages;
mod plan;
pub mod quant;
pub mod reference;
pub mod shader;

pub use crate::softmax::merge::{
    encode_merge_attention, merge_attention, merge_reference, AttentionPart,
};
pub use pages::PagePool;
pub use plan::{plan, DecodePlan};
pub use quant::{dequantize, quantize, KvFormat};

use crate::context::GpuContext;
use crate::error::{AttnError, Result};
use crate::pipeline::Kernel;
use crate::softmax::AttentionOutput;
use crate::tensor::{DType, Tensor};

/// A KV cache as the kernel reads it: a float tensor (`[pages|B, page_size|Lk, Hkv, D]`, last
/// axis contiguous), or ggml blocks in a `u32` tensor whose words hold the bytes (contiguous,
/// the same logical shape).
#[derive(Clone, Debug)]
pub struct KvCache {
    data: Tensor,
    shape: [usize; 4],
    format: KvFormat,
}

impl KvCache {
    /// A float cache (f32 or f16), bound as it is.
    pub fn from_tensor(t: &Tensor) -> Result<Self> {
        let shape: [usize; 4] = t.shape().try_into().map_err(|_| {
            AttnError::shape(
                "kv cache",
                "rank 4 [pages|B, page_size|Lk, Hkv, D]",
                t.shape(),
            )
        })?;
        let format = match t.dtype() {
            DType::F32 => KvFormat::F32,
            DType::F16 => KvFormat::F16,
            other => {
                return Err(AttnError::DType {
                    what: "kv cache".into(),
                    expected: "f32 or f16 (quantized caches: KvCache::from_blocks)".into(),
                    actual: other.to_string(),
                })
            }
        };
        Ok(KvCache {
            data: t.clone(),
            shape,
            format,
        })
    }

    /// A cache of ggml blocks the caller already holds (an engine's GGUF-style cache): `words`
    /// is a `u32` view whose bytes are the blocks of `shape` in `format`, row-major.
    pub fn from_blocks(words: &Tensor, shape: [usize; 4], format: KvFormat) -> Result<Self> {
        words.dtype().require("kv cache blocks", DType::U32)?;
        if !format.is_quantized() {
            return Err(AttnError::invalid(
                "kv format",
                "q8_0 or q4_0 (float caches: KvCache::from_tensor)",
                format,
            ));
        }
        let values = shape
            .iter()
            .try_fold(1usize, |n, &x| n.checked_mul(x))
            .ok_or_else(|| {
                AttnError::invalid("kv cache", "a size that fits usize", format!("{shape:?}"))
            })?;
        if !shape[3].is_multiple_of(quant::QK) {
            return Err(AttnError::shape(
                "kv cache D",
                format!("a multiple of {} ({format} blocks)", quant::QK),
                shape[3],
            ));
        }
        let need = format.bytes_for(values)?.div_ceil(4);
        if words.shape().len() != 1 || !words.is_contiguous() || words.numel() < need {
            return Err(AttnError::shape(
                "kv cache blocks",
                format!(
                    "a contiguous rank-1 u32 view of at least {need} words ({format} {shape:?})"
                ),
                format!("{:?}", words.shape()),
            ));
        }
        Ok(KvCache {
            data: words.clone(),
            shape,
            format,
        })
    }

    /// Uploads `values` (`shape`, row-major) in `format`, quantizing with [`quantize`] (the
    /// library's quantizer: the bytes ggml would write).
    pub fn upload(
        ctx: &GpuContext,
        values: &[f32],
        shape: [usize; 4],
        format: KvFormat,
    ) -> Result<Self> {
        shape
            .iter()
            .try_fold(1usize, |n, &x| n.checked_mul(x))
            .filter(|&n| n == values.len())
            .ok_or_else(|| {
                AttnError::shape(
                    "kv values",
                    format!("{shape:?}"),
                    format!("{} values", values.len()),
                )
            })?;
        match format {
            KvFormat::F32 => Self::from_tensor(&Tensor::from_f32(ctx, values, &shape)?),
            KvFormat::F16 => {
                let h: Vec<half::f16> = values.iter().map(|&x| half::f16::from_f32(x)).collect();
                Self::from_tensor(&Tensor::from_f16(ctx, &h, &shape)?)
            }
            _ => {
                // from_blocks checks D against the block size
                let mut bytes = quantize(values, format)?;
                bytes.resize(bytes.len().div_ceil(4).max(1) * 4, 0);
                let words: Vec<u32> = bytes
                    .chunks_exact(4)
                    .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect();
                let t = Tensor::from_u32(ctx, &words, &[words.len()])?;
                Self::from_blocks(&t, shape, format)
            }
        }
    }

    pub fn shape(&self) -> [usize; 4] {
        self.shape
    }
    pub fn format(&self) -> KvFormat {
        self.format
    }
    /// The tensor bound to the kernel (floats, or the blocks' words).
    pub fn data(&self) -> &Tensor {
        &self.data
    }

    /// The values, dequantized, row-major `shape` (what the reference reads). Blocks.
    pub fn to_vec_f32(&self, ctx: &GpuContext) -> Result<Vec<f32>> {
        pollster::block_on(self.to_vec_f32_async(ctx))
    }

    /// [`KvCache::to_vec_f32`] without blocking (the browser's form).
    pub async fn to_vec_f32_async(&self, ctx: &GpuContext) -> Result<Vec<f32>> {
        let n: usize = self.shape.iter().product();
        match self.format {
            KvFormat::F32 | KvFormat::F16 => self.data.to_vec_f32_async(ctx).await,
            _ => {
                let words = self.data.to_vec_u32_async(ctx).await?;
                let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
                dequantize(&bytes, self.format, n)
            }
        }
    }
}

/// Options of a decode call. `Default` is plain softmax attention over every cached key.
#[non_exhaustive]
#[derive(Clone, Debug, Default)]
pub struct DecodeOptions {
    /// Bottom-right aligned causal mask (FlashAttention's): the last query sees every key.
    pub causal: bool,
    /// Softmax scale; `None` is `1 / sqrt(D)`.
    pub scale: Option<f32>,
    /// Tanh softcap `c` (> 0): `s = c * tanh(s / c)` after scaling.
    pub softcap: Option<f32>,
    /// ALiBi slopes, one per query head: adds `-slope * |i + Lk - Lq - j|`.
    pub alibi_slopes: Option<Vec<f32>>,
    /// Additive f32 bias `[B|1, Hq|1, Lq, Lk]` over logical key positions; `-inf` masks.
    pub bias: Option<Tensor>,
    /// Sliding window `(left, right)` as in [`crate::FlashOptions::window`].
    pub window: (Option<u32>, Option<u32>),
    /// The first `sinks` keys stay visible whatever the window (StreamingLLM's attention sinks).
    pub sinks: u32,
    /// Valid keys per sequence (FlashAttention's `cache_seqlens`); `None`: the whole cache.
    pub cache_seqlens: Option<Vec<u32>>,
    /// Paged cache: `[B, max_blocks]` i32 page indices (vLLM's block table). Entries past a
    /// sequence's length are never read; an entry outside `[0, num_pages)` is clamped.
    pub block_table: Option<Tensor>,
    /// New tokens to append before attending (FlashAttention's `k`, `v`): `[B, S_new, Hkv, D]`
    /// and `[B, S_new, Hkv, Dv]`, written in place into the caches at `cache_seqlens[b]..`
    /// (through the block table where paged, quantized as ggml would); the attention then
    /// runs over `cache_seqlens[b] + S_new` keys. A sequence without room is an error before
    /// anything is written.
    pub k_new: Option<Tensor>,
    pub v_new: Option<Tensor>,
    /// Key splits per (batch, KV head); `None`: the plan picks from the key count, the grid and
    /// the adapter. Raised where needed to keep each split's loops within the adapter's limits.
    pub num_splits: Option<u32>,
    /// Also return the log-sum-exp `[B, Hq, Lq]`.
    pub return_lse: bool,
}

crate::setters!(DecodeOptions {
    causal: bool,
    scale: Option<f32>,
    softcap: Option<f32>,
    alibi_slopes: Option<Vec<f32>>,
    bias: Option<Tensor>,
    window: (Option<u32>, Option<u32>),
    sinks: u32,
    cache_seqlens: Option<Vec<u32>>,
    block_table: Option<Tensor>,
    k_new: Option<Tensor>,
    v_new: Option<Tensor>,
    num_splits: Option<u32>,
    return_lse: bool,
});

/// Every decode and merge specialization (for the registry).
pub fn all_kernels() -> Vec<Box<dyn Kernel>> {
    let mut all: Vec<Box<dyn Kernel>> = Vec::new();
    for k in shader::all_keys() {
        all.push(Box::new(k));
    }
    for k in append::all_keys() {
        all.push(Box::new(k));
    }
    all
}

/// Records the decode into `encoder`: the split pass, then the merge of the splits into `out`
/// `[B, Lq, Hq, Dv]` (q's dtype) and `lse` `[B, Hq, Lq]` where given. `timestamps` brackets
/// both passes.
#[allow(clippy::too_many_arguments)]
pub fn encode_decode_attention(
    ctx: &GpuContext,
    encoder: &mut wgpu::CommandEncoder,
    q: &Tensor,
    k: &KvCache,
    v: &KvCache,
    out: &Tensor,
    lse: Option<&Tensor>,
    opts: &DecodeOptions,
    timestamps: Option<(&wgpu::QuerySet, u32)>,
) -> Result<DecodePlan> {
    encode::encode(ctx, encoder, q, k, v, out, lse, opts, timestamps)
}

/// Runs the decode into caller-provided outputs and submits the work.
#[allow(clippy::too_many_arguments)]
pub fn decode_attention_into(
    ctx: &GpuContext,
    q: &Tensor,
    k: &KvCache,
    v: &KvCache,
    out: &Tensor,
    lse: Option<&Tensor>,
    opts: &DecodeOptions,
) -> Result<DecodePlan> {
    ctx.submit(|enc| encode_decode_attention(ctx, enc, q, k, v, out, lse, opts, None))
}

/// Runs the decode and returns new O `[B, Lq, Hq, Dv]` (and LSE when `opts.return_lse`).
pub fn decode_attention(
    ctx: &GpuContext,
    q: &Tensor,
    k: &KvCache,
    v: &KvCache,
    opts: &DecodeOptions,
) -> Result<AttentionOutput> {
    let s = check::check(ctx, q, k, v, opts)?;
    let out = Tensor::filled(ctx, &[s.batch, s.lq, s.hq, s.dv], q.dtype(), 0.0)?;
    let lse = if opts.return_lse {
        Some(Tensor::filled(
            ctx,
            &[s.batch, s.hq, s.lq],
            DType::F32,
            0.0,
        )?)
    } else {
        None
    };
    decode_attention_into(ctx, q, k, v, &out, lse.as_ref(), opts)?;
    Ok(AttentionOutput { out, lse })
}
