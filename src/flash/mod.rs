//! Tiled attention: the FlashAttention-2 forward pass.
//!
//! Layout `[batch, seq, heads, dim]`: Q `[B, Lq, Hq, D]`, K `[B, Lk, Hkv, D]`, V `[B, Lk, Hkv, Dv]`,
//! O `[B, Lq, Hq, Dv]`, LSE `[B, Hq, Lq]` (f32, natural log). Any strides with a contiguous dim
//! axis. `Hq` must be a multiple of `Hkv` (GQA/MQA).
//!
//! Semantics follow FlashAttention: causal masks are bottom-right aligned (query `i` sees key `j`
//! iff `j <= i + Lk - Lq`), per-batch lengths align at each sequence's own lengths, a row that sees
//! no key gives O = 0 and LSE = -inf.

pub mod backward;
pub mod reference;
pub mod shader;

use crate::context::GpuContext;
use crate::error::Result;
use crate::pipeline::Kernel;
pub use crate::softmax::call::check_inputs;
use crate::softmax::call::Call;
use crate::softmax::kernel_key;
pub use crate::softmax::options::{
    AttentionOutput, AttnShape, FlashOptions, SoftmaxPlan, StrategyChoice,
};

/// A dense call's plan: the engine's [`SoftmaxPlan`] (kernel key, grid, tile pairs).
pub type FlashPlan = SoftmaxPlan;
use crate::softmax::plan::candidates;
pub use crate::softmax::plan::{heuristic_tile, pairs_tiles, tunable};
use crate::softmax::shader::{FlashKey, Strategy};
pub use crate::softmax::{
    head_dim_bucket, Tile, HEAD_DIM_BUCKETS, MAX_HEAD_DIM, TILE_BUDGET_BYTES,
};
use crate::tensor::{DType, Tensor};
use shader::Sequence;

/// The key an untuned dense plan starts from (the engine's [`crate::softmax::plan::base_key`]
/// with the dense geometry).
pub fn base_key(
    ctx: &GpuContext,
    shape: &AttnShape,
    dtype: DType,
    opts: &FlashOptions,
) -> Result<FlashKey> {
    crate::softmax::dense::base_key(ctx, shape, dtype, opts)
}

/// The dense kernel specialization (see [`kernel_key`]).
pub fn flash_key(
    strategy: Strategy,
    dtype: DType,
    d_bucket: u32,
    dv_bucket: u32,
    subgroup: (u32, u32),
    mods: bool,
) -> FlashKey {
    kernel_key(
        strategy,
        dtype,
        d_bucket,
        dv_bucket,
        subgroup,
        mods,
        Sequence::geo(),
    )
}

/// Every dense specialization as a [`Kernel`] (for the host layer's registry).
pub fn all_kernels() -> Vec<Box<dyn Kernel>> {
    crate::softmax::boxed(all_flash_keys())
}

/// Every dense specialization the host can build, on any adapter (for naga tests).
pub fn all_flash_keys() -> Vec<FlashKey> {
    let mut keys = Vec::new();
    crate::softmax::for_each_shared_shape(|strategy, dtype, d, dv, sg| {
        for mods in [false, true] {
            let key = flash_key(strategy, dtype, d, dv, sg, mods);
            keys.push(key);
            if tunable(&key) {
                for t in crate::softmax::tile_candidates(&key) {
                    keys.push(crate::softmax::with_tile(key, t));
                }
            }
        }
    });
    crate::softmax::sorted(keys)
}

/// The tiles [`plan`] may give this problem ([`FlashOptions::tile`] takes one of them).
pub fn tile_choices(
    ctx: &GpuContext,
    shape: &AttnShape,
    dtype: DType,
    opts: &FlashOptions,
) -> Result<Vec<Tile>> {
    let key = base_key(ctx, shape, dtype, opts)?;
    Ok(candidates(ctx, &key))
}

/// Picks the strategy and specialization for this adapter and problem: the Subgroup kernel on
/// CPU adapters with usable subgroups, the Tiled kernel elsewhere (the engine's dense plan,
/// [`crate::softmax::dense::plan`]).
pub fn plan(
    ctx: &GpuContext,
    shape: &AttnShape,
    dtype: DType,
    opts: &FlashOptions,
) -> Result<FlashPlan> {
    crate::softmax::dense::plan(ctx, shape, dtype, opts)
}

/// Records the attention into `encoder` (for embedders that batch their own work).
/// `timestamps` writes the pass's begin and end into a query set (see `bench`).
#[allow(clippy::too_many_arguments)]
pub fn encode_flash_attention(
    ctx: &GpuContext,
    encoder: &mut wgpu::CommandEncoder,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    out: &Tensor,
    lse: Option<&Tensor>,
    opts: &FlashOptions,
    timestamps: Option<(&wgpu::QuerySet, u32)>,
) -> Result<FlashPlan> {
    let call = Call {
        q,
        k,
        v,
        out,
        lse,
        opts,
    };
    crate::softmax::dense::encode(ctx, encoder, &call, timestamps)
}

/// Runs attention into caller-provided output tensors and submits the work.
pub fn flash_attention_into(
    ctx: &GpuContext,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    out: &Tensor,
    lse: Option<&Tensor>,
    opts: &FlashOptions,
) -> Result<FlashPlan> {
    ctx.submit(|enc| encode_flash_attention(ctx, enc, q, k, v, out, lse, opts, None))
}

/// Runs attention and returns new O (and LSE when `opts.return_lse`).
pub fn flash_attention(
    ctx: &GpuContext,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    opts: &FlashOptions,
) -> Result<AttentionOutput> {
    let s = check_inputs(q, k, v)?;
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
    flash_attention_into(ctx, q, k, v, &out, lse.as_ref(), opts)?;
    Ok(AttentionOutput { out, lse })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_fits_the_webgpu_default_workgroup_memory_and_budgets() {
        for k in all_flash_keys() {
            // one K/V stage fits the WebGPU default; two may take twice that, and the plan
            // offers them only where the device's limit holds them (`candidates`)
            let per_stage = k.workgroup_bytes() / k.stages;
            assert!(per_stage <= TILE_BUDGET_BYTES, "{k:?}");
            assert!(
                k.workgroup_bytes() <= crate::softmax::STAGED_BUDGET_BYTES,
                "{k:?}"
            );
            assert!(k.stages == 1 || k.strategy == Strategy::Tiled, "{k:?}");
            assert!(k.rows >= 1 && k.group >= 1, "{k:?}");
            let budget = crate::softmax::register_budget(k.strategy);
            // tile variants go up to twice the budget's rows (tune measures whether it pays)
            let fit = (budget / (k.d4 + k.dv4)).max(1);
            assert!(k.rows <= 2 * fit, "{k:?}");
            if k.strategy == Strategy::Tiled {
                assert!(k.block.is_multiple_of(k.group), "{k:?}");
            }
        }
    }

    #[test]
    fn tiles_parse_back_from_their_display() {
        for k in all_flash_keys() {
            for t in crate::softmax::tile_candidates(&k) {
                assert_eq!(t.to_string().parse::<Tile>(), Ok(t));
            }
        }
        for bad in [
            "wg64",
            "wg64xr",
            "64xr8",
            "wg0xr8",
            "wg64xr8s",
            "wg64xr8s0",
            "wgaxr8",
        ] {
            assert!(bad.parse::<Tile>().is_err(), "{bad}");
        }
    }

    #[test]
    fn head_dim_buckets_cover_every_d_up_to_512() {
        for d in 1..=MAX_HEAD_DIM {
            let b = head_dim_bucket(d).unwrap() as usize;
            assert!(b >= d && b.is_multiple_of(4), "{d} -> {b}");
        }
        assert_eq!(head_dim_bucket(0), None);
        assert_eq!(head_dim_bucket(MAX_HEAD_DIM + 1), None);
    }
}
