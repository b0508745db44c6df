//! NATTEN's `additional_keys` / `additional_values`: tokens `[B, S_add, Hkv, D]` that every
//! query attends to besides its neighborhood, never masked. The neighborhood pass and a dense
//! pass over the extra tokens each write O and LSE; the engine's merge combines them through
//! the LSE, exactly (NATTEN merges the same way).

use super::{Flat, NeighborhoodOptions, NeighborhoodPlan};
use crate::context::GpuContext;
use crate::error::{AttnError, Result};
use crate::softmax::call::Call;
use crate::softmax::merge::{encode_merge, MergeTarget, PartViews};
use crate::softmax::FlashOptions;
use crate::tensor::{DType, Tensor};

/// Checks the extra tokens against the flattened problem: `[B, S_add >= 1, Hkv, D]` keys and
/// `[B, S_add, Hkv, Dv]` values of q's dtype, both or neither.
pub(super) fn check(f: &Flat, opts: &NeighborhoodOptions) -> Result<Option<(Tensor, Tensor)>> {
    let (k, v) = match (&opts.additional_keys, &opts.additional_values) {
        (None, None) => return Ok(None),
        (Some(k), Some(v)) => (k, v),
        _ => {
            return Err(AttnError::invalid(
                "additional_keys, additional_values",
                "both or neither",
                "only one",
            ))
        }
    };
    let (b, hkv, d, dv) = (
        f.k.shape()[0],
        f.k.shape()[2],
        f.k.shape()[3],
        f.v.shape()[3],
    );
    let s = k.shape().get(1).copied().unwrap_or(0);
    for (what, t, dim) in [("additional_keys", k, d), ("additional_values", v, dv)] {
        t.dtype().require(what, f.q.dtype())?;
        if t.shape() != [b, s, hkv, dim] || s == 0 {
            return Err(AttnError::shape(
                what,
                format!("[{b}, S_add >= 1, {hkv}, {dim}]"),
                t.shape(),
            ));
        }
    }
    Ok(Some((k.clone(), v.clone())))
}

/// Records the neighborhood pass (into scratch O and LSE), the dense pass over the extra
/// tokens, and their merge into `out` `[B, L, Hq, Dv]` and `lse` `[B, L, Hq]` (flattened views).
#[allow(clippy::too_many_arguments)]
pub(super) fn encode(
    ctx: &GpuContext,
    enc: &mut wgpu::CommandEncoder,
    f: &Flat,
    extra: (&Tensor, &Tensor),
    out: &Tensor,
    lse: Option<&Tensor>,
    opts: &NeighborhoodOptions,
    timestamps: Option<(&wgpu::QuerySet, u32)>,
) -> Result<NeighborhoodPlan> {
    let [b, l, hq, _]: [usize; 4] = f.q.shape().try_into().map_err(|_| {
        AttnError::shape("q", "a flattened [B, L, H, D] view", f.q.shape().to_vec())
    })?;
    let dv = f.v.shape()[3];
    let dtype = f.q.dtype();
    let na_o = Tensor::filled(ctx, &[b, l, hq, dv], dtype, 0.0)?;
    let na_lse = Tensor::filled(ctx, &[b, l, hq], DType::F32, 0.0)?;
    let x_o = Tensor::filled(ctx, &[b, l, hq, dv], dtype, 0.0)?;
    let x_lse = Tensor::filled(ctx, &[b, hq, l], DType::F32, 0.0)?;
    let fo = super::flash_opts(opts);
    let na = Call {
        q: &f.q,
        k: &f.k,
        v: &f.v,
        out: &na_o,
        lse: Some(&na_lse),
        opts: &fo,
    };
    let layout = super::plan::NaLayout(&f.spec);
    // the pass pair's start; the merge writes the end
    let plan = crate::softmax::call::encode_with(ctx, enc, &na, &layout, timestamps)?;
    // every query sees every extra token: no mask, the neighborhood's scale
    let dense_opts = FlashOptions::default()
        .scale(opts.scale)
        .strategy(opts.strategy);
    let dense = Call {
        q: &f.q,
        k: extra.0,
        v: extra.1,
        out: &x_o,
        lse: Some(&x_lse),
        opts: &dense_opts,
    };
    crate::softmax::dense::encode(ctx, enc, &dense, None)?;
    // the two parts: O [B, L, H, Dv]; LSE heads-last [B, L, H], then [B, H, L]
    let u = |x: usize| crate::error::u32_of(x, "merge strides");
    let o_st = [0, u(l * hq * dv)?, u(hq * dv)?, u(dv)?, 0];
    let parts = [
        PartViews {
            o: &na_o,
            lse: &na_lse,
            o_st,
            lse_st: [0, u(l * hq)?, 1, u(hq)?, 0],
            nparts: 1,
        },
        PartViews {
            o: &x_o,
            lse: &x_lse,
            o_st,
            lse_st: [0, u(hq * l)?, u(l)?, 1, 0],
            nparts: 1,
        },
    ];
    merge_two(ctx, enc, [b, l, hq, dv], &parts, out, lse, timestamps)?;
    Ok(plan)
}

/// The merge of two parts into the final O and heads-last LSE, through a running accumulator.
fn merge_two(
    ctx: &GpuContext,
    enc: &mut wgpu::CommandEncoder,
    dims: [usize; 4],
    parts: &[PartViews; 2],
    out: &Tensor,
    lse: Option<&Tensor>,
    timestamps: Option<(&wgpu::QuerySet, u32)>,
) -> Result<()> {
    let [b, l, h, dv] = dims;
    let rows = b * l * h;
    let acc = crate::softmax::merge::Accumulator {
        o: Tensor::filled(ctx, &[rows, dv], DType::F32, 0.0)?,
        lse: [
            Tensor::filled(ctx, &[rows], DType::F32, 0.0)?,
            Tensor::filled(ctx, &[rows], DType::F32, 0.0)?,
        ],
    };
    encode_merge(
        ctx,
        enc,
        dims,
        &parts[0],
        Some((&acc, false, 0)),
        MergeTarget::Acc,
        None,
    )?;
    let target = MergeTarget::Out {
        out,
        lse,
        lse_heads_last: true,
    };
    let end = timestamps.map(|(set, i)| (set, i + 1));
    encode_merge(
        ctx,
        enc,
        dims,
        &parts[1],
        Some((&acc, true, 1)),
        target,
        end,
    )
}
