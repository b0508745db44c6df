//! The decode call's checks: q, the caches and every option against each other, the new
//! tokens and the room for them, the outputs.

use super::{DecodeOptions, KvCache};
use crate::context::GpuContext;
use crate::error::{u32_of, AttnError, Result};
use crate::resources::check_no_alias;
use crate::softmax::AttnShape;
use crate::tensor::{DType, Tensor};

use super::shader::DIM_BUCKETS;

/// The problem a decode call describes: `lk` is the logical cache length (the block table's
/// pages times the page size, or the cache's token axis), `hkv` and `d` from the cache.
pub(crate) fn check(
    ctx: &GpuContext,
    q: &Tensor,
    k: &KvCache,
    v: &KvCache,
    opts: &DecodeOptions,
) -> Result<AttnShape> {
    let [b, lq, hq, d]: [usize; 4] = q
        .shape()
        .try_into()
        .map_err(|_| AttnError::shape("q", "rank 4 [B, Lq, Hq, D]", q.shape()))?;
    q.dtype().require_float("q")?;
    let [n0, n1, hkv, dk] = k.shape();
    let [v0, v1, vh, dv] = v.shape();
    if [v0, v1, vh] != [n0, n1, hkv] {
        return Err(AttnError::shape(
            "v cache",
            format!("[{n0}, {n1}, {hkv}, Dv] (as the k cache)"),
            format!("{:?}", v.shape()),
        ));
    }
    if dk != d {
        return Err(AttnError::shape("k cache D", format!("{d} (q's D)"), dk));
    }
    if k.format() != v.format() {
        return Err(AttnError::invalid(
            "v cache format",
            format!("{} (as k)", k.format()),
            v.format(),
        ));
    }
    if [b, lq, hq, d, n0, n1, hkv, dv].contains(&0) {
        return Err(AttnError::shape(
            "q and caches",
            "no zero-sized axis",
            format!("q {:?}, k {:?}, v {:?}", q.shape(), k.shape(), v.shape()),
        ));
    }
    if !hq.is_multiple_of(hkv) {
        return Err(AttnError::shape(
            "q heads",
            "Hkv >= 1 dividing Hq (GQA/MQA)",
            format!("Hq = {hq}, Hkv = {hkv}"),
        ));
    }
    let top = *DIM_BUCKETS.last().unwrap_or(&256) as usize;
    for (what, x) in [("D", d), ("Dv", dv)] {
        if !x.is_multiple_of(4) || x > top {
            return Err(AttnError::shape(
                format!("decode {what}"),
                format!("a multiple of 4 up to {top}"),
                x,
            ));
        }
    }
    if q.strides()[3] != 1 {
        return Err(AttnError::shape(
            "q",
            "a contiguous last axis",
            format!("strides {:?}", q.strides()),
        ));
    }
    let f16 = q.dtype() == DType::F16
        || k.format() == super::KvFormat::F16
        || v.format() == super::KvFormat::F16;
    if f16 && !ctx.caps.f16 {
        return Err(AttnError::MissingFeature {
            feature: "SHADER_F16",
            adapter: ctx.adapter_info.name.clone(),
            needed_for: "f16 decode".into(),
        });
    }
    let lk = cache_length(b, n0, n1, k, opts)?;
    check_options(b, lq, hq, lk, opts)?;
    check_new_tokens(b, lk, [hkv, d, dv], opts)?;
    Ok(AttnShape {
        batch: b,
        lq,
        hq,
        hkv,
        lk,
        d,
        dv,
    })
}

/// The logical cache length: the block table's pages times the page size, or the cache's token
/// axis (then the cache has one row per sequence).
fn cache_length(
    b: usize,
    n0: usize,
    n1: usize,
    k: &KvCache,
    opts: &DecodeOptions,
) -> Result<usize> {
    let lk = match &opts.block_table {
        Some(t) => {
            t.dtype().require("block_table", DType::I32)?;
            if t.shape().len() != 2 || t.shape()[0] != b || t.shape()[1] == 0 || !t.is_contiguous()
            {
                return Err(AttnError::shape(
                    "block_table",
                    format!("contiguous [{b}, max_blocks >= 1]"),
                    format!("{:?}", t.shape()),
                ));
            }
            t.shape()[1].checked_mul(n1).ok_or_else(|| {
                AttnError::invalid(
                    "block_table",
                    "pages x page size that fit usize",
                    t.shape()[1],
                )
            })?
        }
        None => {
            if n0 != b {
                return Err(AttnError::shape(
                    "k cache",
                    format!(
                        "[{b}, Lk, Hkv, D] (one row per sequence; paged caches need a block_table)"
                    ),
                    format!("{:?}", k.shape()),
                ));
            }
            n1
        }
    };
    u32_of(lk, "cache length")?;
    Ok(lk)
}

/// New tokens `k_new` `[B, S_new, Hkv, D]` and `v_new` `[B, S_new, Hkv, Dv]` (float), both or
/// neither, with the cached lengths they follow, and room for them in the cache: a sequence
/// that would outgrow its pages is an error before anything is written.
fn check_new_tokens(b: usize, lk: usize, hd: [usize; 3], opts: &DecodeOptions) -> Result<()> {
    let [hkv, d, dv] = hd;
    let (kn, vn) = match (&opts.k_new, &opts.v_new) {
        (None, None) => return Ok(()),
        (Some(kn), Some(vn)) => (kn, vn),
        _ => {
            return Err(AttnError::invalid(
                "k_new, v_new",
                "both new keys and new values, or neither",
                "only one",
            ))
        }
    };
    let s_new = kn.shape().get(1).copied().unwrap_or(0);
    for (what, t, dim) in [("k_new", kn, d), ("v_new", vn, dv)] {
        t.dtype().require_float(what)?;
        if t.shape() != [b, s_new, hkv, dim] || s_new == 0 || t.strides()[3] != 1 {
            return Err(AttnError::shape(
                what,
                format!("[{b}, S_new >= 1, {hkv}, {dim}] with a contiguous last axis"),
                t.shape(),
            ));
        }
    }
    let lens = opts.cache_seqlens.as_ref().ok_or_else(|| {
        AttnError::invalid(
            "cache_seqlens",
            "the cached lengths the new tokens follow",
            "none",
        )
    })?;
    if let Some((i, &l)) = lens
        .iter()
        .enumerate()
        .find(|(_, &l)| l as usize + s_new > lk)
    {
        return Err(AttnError::Limit {
            what: format!(
                "cache room for {s_new} new tokens after {l} of sequence {i} (nothing written)"
            ),
            needed: l as u64 + s_new as u64,
            limit: lk as u64,
        });
    }
    Ok(())
}

/// The options against the problem: lengths within the cache, a slope per query head, a
/// positive softcap, a bias that broadcasts to `[B, Hq, Lq, Lk]`.
fn check_options(b: usize, lq: usize, hq: usize, lk: usize, opts: &DecodeOptions) -> Result<()> {
    if let Some(l) = &opts.cache_seqlens {
        if l.len() != b {
            return Err(AttnError::shape(
                "cache_seqlens",
                format!("{b} lengths"),
                l.len(),
            ));
        }
        if let Some(&bad) = l.iter().find(|&&x| x as usize > lk) {
            return Err(AttnError::invalid(
                "cache_seqlens",
                format!("lengths <= {lk} (the cache)"),
                bad,
            ));
        }
    }
    if let Some(a) = &opts.alibi_slopes {
        if a.len() != hq {
            return Err(AttnError::shape(
                "alibi_slopes",
                format!("{hq} slopes"),
                a.len(),
            ));
        }
    }
    if let Some(c) = opts.softcap {
        if !(c > 0.0 && c.is_finite()) {
            return Err(AttnError::invalid("softcap", "a finite value > 0", c));
        }
    }
    if let Some(bias) = &opts.bias {
        bias.dtype().require("bias", DType::F32)?;
        let sh = bias.shape();
        let ok = sh.len() == 4
            && (sh[0] == 1 || sh[0] == b)
            && (sh[1] == 1 || sh[1] == hq)
            && sh[2] == lq
            && sh[3] == lk
            && bias.strides()[3] == 1;
        if !ok {
            return Err(AttnError::shape(
                "bias",
                format!("[1|{b}, 1|{hq}, {lq}, {lk}] with a contiguous last axis"),
                format!("{sh:?}"),
            ));
        }
    }
    Ok(())
}

/// The outputs' shapes and dtypes, and no output sharing a buffer with an input or another.
pub(super) fn check_outputs(
    s: &AttnShape,
    q: &Tensor,
    k: &KvCache,
    v: &KvCache,
    out: &Tensor,
    lse: Option<&Tensor>,
    opts: &DecodeOptions,
) -> Result<()> {
    let want = [s.batch, s.lq, s.hq, s.dv];
    if out.shape() != want {
        return Err(AttnError::shape("out", format!("{want:?}"), out.shape()));
    }
    out.dtype().require("out", q.dtype())?;
    if let Some(l) = lse {
        if l.shape() != [s.batch, s.hq, s.lq] {
            return Err(AttnError::shape(
                "lse",
                format!("{:?}", [s.batch, s.hq, s.lq]),
                l.shape(),
            ));
        }
        l.dtype().require("lse", DType::F32)?;
    }
    let mut inputs = vec![("q", q), ("k", k.data()), ("v", v.data())];
    inputs.extend(opts.block_table.iter().map(|t| ("block_table", t)));
    inputs.extend(opts.bias.iter().map(|t| ("bias", t)));
    let mut outputs = vec![("out", out)];
    outputs.extend(lse.map(|l| ("lse", l)));
    check_no_alias(&inputs, &outputs)
}
