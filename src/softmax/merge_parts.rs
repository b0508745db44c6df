//! The public merge (`merge_attention`): any number of (O, LSE) parts over disjoint key sets
//! into one result, one dispatch of the engine's merge kernel ([`super::merge`]) per part, the
//! running result in f32; and the same merge in f64 on the host.

use super::merge::{encode_merge, Accumulator, MergeTarget, PartViews};
use super::AttentionOutput;
use crate::context::GpuContext;
use crate::error::{u32_of, AttnError, Result};
use crate::tensor::{DType, Tensor};

/// One part of a merge: O `[B, L, H, Dv]` (f32 or f16) and its LSE `[B, H, L]` (f32, natural
/// log), computed over a key set disjoint from the other parts'.
#[derive(Clone, Copy, Debug)]
pub struct AttentionPart<'a> {
    pub out: &'a Tensor,
    pub lse: &'a Tensor,
}

fn check_parts(parts: &[AttentionPart]) -> Result<[usize; 4]> {
    let first = parts
        .first()
        .ok_or_else(|| AttnError::invalid("parts", "at least one (O, LSE) pair", "none"))?;
    let dims: [usize; 4] =
        first.out.shape().try_into().map_err(|_| {
            AttnError::shape("parts[0].out", "rank 4 [B, L, H, Dv]", first.out.shape())
        })?;
    let [b, l, h, _] = dims;
    if dims.contains(&0) {
        return Err(AttnError::shape(
            "parts[0].out",
            "no zero-sized axis",
            first.out.shape(),
        ));
    }
    for (i, p) in parts.iter().enumerate() {
        if p.out.shape() != dims {
            return Err(AttnError::shape(
                format!("parts[{i}].out"),
                format!("{dims:?} (as parts[0])"),
                p.out.shape(),
            ));
        }
        p.out.dtype().require_float(&format!("parts[{i}].out"))?;
        if p.out.dtype() != first.out.dtype() {
            return Err(AttnError::DType {
                what: format!("parts[{i}].out"),
                expected: format!("{} (as parts[0])", first.out.dtype()),
                actual: p.out.dtype().to_string(),
            });
        }
        if p.lse.shape() != [b, h, l] {
            return Err(AttnError::shape(
                format!("parts[{i}].lse"),
                format!("{:?}", [b, h, l]),
                p.lse.shape(),
            ));
        }
        p.lse
            .dtype()
            .require(&format!("parts[{i}].lse"), DType::F32)?;
        if p.out.strides()[3] != 1 {
            return Err(AttnError::shape(
                format!("parts[{i}].out"),
                "a contiguous last axis (stride 1)",
                format!("strides {:?}", p.out.strides()),
            ));
        }
    }
    Ok(dims)
}

fn views<'a>(p: &AttentionPart<'a>) -> Result<PartViews<'a>> {
    let o = p.out.strides();
    let s = p.lse.strides();
    let c = |x: usize| u32_of(x, "part stride");
    Ok(PartViews {
        o: p.out,
        lse: p.lse,
        o_st: [0, c(o[0])?, c(o[1])?, c(o[2])?, 0],
        lse_st: [0, c(s[0])?, c(s[1])?, c(s[2])?, 0],
        nparts: 1,
    })
}

/// Records the merge of `parts` into `out` `[B, L, H, Dv]` (f32 or f16) and `lse` `[B, H, L]`
/// where given: one dispatch per part, the running result in f32.
pub fn encode_merge_attention(
    ctx: &GpuContext,
    enc: &mut wgpu::CommandEncoder,
    parts: &[AttentionPart],
    out: &Tensor,
    lse: Option<&Tensor>,
) -> Result<()> {
    let dims = check_parts(parts)?;
    let [b, l, h, dv] = dims;
    if out.shape() != dims {
        return Err(AttnError::shape("out", format!("{dims:?}"), out.shape()));
    }
    out.dtype().require_float("out")?;
    if let Some(t) = lse {
        if t.shape() != [b, h, l] {
            return Err(AttnError::shape(
                "lse",
                format!("{:?}", [b, h, l]),
                t.shape(),
            ));
        }
        t.dtype().require("lse", DType::F32)?;
    }
    let f16 = parts[0].out.dtype() == DType::F16 || out.dtype() == DType::F16;
    if f16 && !ctx.caps.f16 {
        return Err(AttnError::MissingFeature {
            feature: "SHADER_F16",
            adapter: ctx.adapter_info.name.clone(),
            needed_for: "merging f16 attention results".into(),
        });
    }
    let last = parts.len() - 1;
    let rows = b * l * h;
    let acc = if last > 0 {
        Some(Accumulator {
            o: Tensor::filled(ctx, &[rows, dv], DType::F32, 0.0)?,
            lse: [
                Tensor::filled(ctx, &[rows], DType::F32, 0.0)?,
                Tensor::filled(ctx, &[rows], DType::F32, 0.0)?,
            ],
        })
    } else {
        None
    };
    for (i, part) in parts.iter().enumerate() {
        let v = views(part)?;
        let target = if i == last {
            MergeTarget::Out {
                out,
                lse,
                lse_heads_last: false,
            }
        } else {
            MergeTarget::Acc
        };
        // dispatch i reads LSE buffer (i + 1) % 2 and writes buffer i % 2
        let a = acc.as_ref().map(|a| (a, i % 2 == 1, i));
        encode_merge(ctx, enc, dims, &v, a, target, None)?;
    }
    Ok(())
}

/// Merges `parts` into new O (the parts' dtype) and LSE.
pub fn merge_attention(ctx: &GpuContext, parts: &[AttentionPart]) -> Result<AttentionOutput> {
    let dims = check_parts(parts)?;
    let [b, l, h, _] = dims;
    let out = Tensor::filled(ctx, &dims, parts[0].out.dtype(), 0.0)?;
    let lse = Tensor::filled(ctx, &[b, h, l], DType::F32, 0.0)?;
    ctx.submit(|enc| encode_merge_attention(ctx, enc, parts, &out, Some(&lse)))?;
    Ok(AttentionOutput {
        out,
        lse: Some(lse),
    })
}

/// The merge in f64 on the host: `parts` of `(O [rows, Dv], LSE [rows])` in the merge's row
/// order (any order works, as long as every part uses the same one).
pub fn merge_reference(parts: &[(&[f32], &[f32])], dv: usize) -> (Vec<f64>, Vec<f64>) {
    let rows = parts.first().map_or(0, |p| p.1.len());
    let mut out = vec![0.0; rows * dv];
    let mut lse = vec![f64::NEG_INFINITY; rows];
    for r in 0..rows {
        let finite = || {
            parts
                .iter()
                .map(|p| p.1[r] as f64)
                .filter(|x| x.is_finite())
        };
        let Some(m) = finite().reduce(f64::max) else {
            continue;
        };
        let total = m + finite().map(|x| (x - m).exp()).sum::<f64>().ln();
        lse[r] = total;
        for (o, l) in parts {
            let w = if (l[r] as f64).is_finite() {
                (l[r] as f64 - total).exp()
            } else {
                0.0
            };
            for c in 0..dv {
                out[r * dv + c] += w * o[r * dv + c] as f64;
            }
        }
    }
    (out, lse)
}
