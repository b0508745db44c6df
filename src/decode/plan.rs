//! The decode call path: checks, the plan (specialization, rows per workgroup, key splits),
//! params, resources, and the two passes (splits, merge).

use wgpu::util::DeviceExt;

use super::shader::{
    flags, DecodeKey, DecodeParams, DIM_BUCKETS, ROW_CHOICES, TILE, WORKGROUP_BUDGET,
};
use super::{DecodeOptions, KvCache};
use crate::context::GpuContext;
use crate::error::u32_of;
use crate::error::{AttnError, Result};
use crate::pipeline::Kernel;
use crate::resources::{check_no_alias, entries_by_name, BoundRange};
use crate::softmax::merge::{encode_merge, MergeTarget, PartViews};
use crate::softmax::AttnShape;
use crate::tensor::{DType, Tensor};

/// The decisions of one decode call.
#[non_exhaustive]
#[derive(Clone, Copy, Debug)]
pub struct DecodePlan {
    pub key: DecodeKey,
    /// Key splits per (batch, KV head, row chunk): the grid's x.
    pub splits: u32,
    pub grid: [u32; 3],
    /// Keys one workgroup may visit at most (the longest sequence).
    pub max_keys: u32,
    /// Keys per split for every sequence (balanced by key count), or 0: each sequence's keys
    /// in `splits` runs (a caller's `num_splits`).
    pub per_split: u32,
}

impl DecodePlan {
    pub fn label(&self) -> String {
        format!("{} x{} splits", self.key.label(), self.splits)
    }
}

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

fn bucket(x: usize) -> u32 {
    DIM_BUCKETS
        .into_iter()
        .find(|&c| c as usize >= x)
        .unwrap_or(DIM_BUCKETS[DIM_BUCKETS.len() - 1])
}

/// The plan for a checked problem: the specialization (head-dim capacities, rows per
/// workgroup: every row of a KV head's group where they fit, up to 16), then the splits.
/// A caller's `num_splits` cuts each sequence into that many runs (raised where a run would
/// take more than [`DecodeKey::tiles_per_split_max`] tiles). Otherwise the work is balanced by
/// key count (Lean Attention's stream-K, at split granularity): every split takes the same
/// number of keys, enough splits in all to fill the adapter (64 workgroups on a CPU adapter,
/// 1024 on a GPU) with at least 4 tiles each, so a long sequence gets many splits and a short
/// one few, and the grid is as wide as the longest sequence needs.
pub fn plan(
    ctx: &GpuContext,
    s: &AttnShape,
    dtype: DType,
    kv: super::KvFormat,
    opts: &DecodeOptions,
) -> Result<DecodePlan> {
    let rows_needed = (s.hq / s.hkv) * s.lq;
    let (d, dv) = (bucket(s.d), bucket(s.dv));
    let key_for = |rows| DecodeKey {
        dtype,
        kv,
        d,
        dv,
        rows,
    };
    let fits: Vec<u32> = ROW_CHOICES
        .into_iter()
        .filter(|&r| key_for(r).workgroup_bytes() <= WORKGROUP_BUDGET)
        .collect();
    let rows = fits
        .iter()
        .copied()
        .find(|&r| r as usize >= rows_needed)
        .or(fits.last().copied())
        .unwrap_or(1);
    let key = key_for(rows);
    let chunks = rows_needed.div_ceil(rows as usize);
    let max_keys = opts
        .cache_seqlens
        .as_ref()
        .and_then(|l| l.iter().max().map(|&x| x as usize))
        .unwrap_or(s.lk);
    let tiles = max_keys.div_ceil(TILE as usize).max(1);
    let min_splits = tiles.div_ceil(key.tiles_per_split_max() as usize);
    let (splits, per_split) = match opts.num_splits {
        Some(n) => ((n as usize).max(min_splits).max(1), 0),
        None => {
            let target: usize = match ctx.adapter_info.device_type {
                wgpu::DeviceType::Cpu => 64,
                _ => 1024,
            };
            // tiles of every (sequence, KV head, row chunk), in all
            let per_seq = |n: usize| n.div_ceil(TILE as usize).max(1);
            let seq_tiles: usize = match &opts.cache_seqlens {
                Some(l) => l.iter().map(|&n| per_seq(n as usize)).sum(),
                None => s.batch * per_seq(s.lk),
            };
            let all = seq_tiles * s.hkv * chunks;
            let cap = key.tiles_per_split_max() as usize;
            let per = all.div_ceil(target).clamp(4, cap.max(4)).min(cap);
            (tiles.div_ceil(per), per * TILE as usize)
        }
    };
    let grid = crate::pipeline::dispatch_grid(
        ctx,
        [
            ("key splits", splits),
            ("KV heads x row chunks", s.hkv * chunks),
            ("batch", s.batch),
        ],
    )?;
    Ok(DecodePlan {
        key,
        splits: grid[0],
        grid,
        max_keys: u32_of(max_keys, "keys")?,
        per_split: u32_of(per_split, "keys per split")?,
    })
}

/// `[elem offset, s0, s1, s2]` of a cache for the kernel: element strides of a float cache,
/// or (blocks) the byte offset and the bytes of one row of D values.
pub(super) fn cache_strides(c: &KvCache, r: &BoundRange) -> Result<[u32; 4]> {
    if c.format().is_quantized() {
        let row = c.format().bytes_for(c.shape()[3])?;
        return Ok([r.elem_offset * 4, u32_of(row, "cache row bytes")?, 0, 0]);
    }
    let st = c.data().strides();
    if st[3] != 1 {
        return Err(AttnError::shape(
            "kv cache",
            "a contiguous last axis",
            format!("strides {st:?}"),
        ));
    }
    Ok([
        r.elem_offset,
        u32_of(st[0], "cache stride")?,
        u32_of(st[1], "cache stride")?,
        u32_of(st[2], "cache stride")?,
    ])
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn encode(
    ctx: &GpuContext,
    enc: &mut wgpu::CommandEncoder,
    q: &Tensor,
    k: &KvCache,
    v: &KvCache,
    out: &Tensor,
    lse: Option<&Tensor>,
    opts: &DecodeOptions,
    timestamps: Option<(&wgpu::QuerySet, u32)>,
) -> Result<DecodePlan> {
    let s = check(ctx, q, k, v, opts)?;
    check_outputs(&s, q, k, v, out, lse, opts)?;
    // new tokens go in first (checked to fit: nothing is written otherwise); the attention
    // then sees the longer sequences
    let after = append_new_tokens(ctx, enc, &s, k, v, opts)?;
    let opts = after.as_ref().unwrap_or(opts);
    let plan = plan(ctx, &s, q.dtype(), k.format(), opts)?;
    let splits = plan.splits as usize;
    let part_rows = s.batch * s.hq * s.lq * splits;
    let o_part = Tensor::filled(ctx, &[part_rows, s.dv], DType::F32, 0.0)?;
    let lse_part = Tensor::filled(ctx, &[part_rows], DType::F32, 0.0)?;
    record_splits(
        ctx,
        enc,
        &s,
        &plan,
        q,
        k,
        v,
        opts,
        [&o_part, &lse_part],
        timestamps,
    )?;
    // the splits' rows are (b, head, query, split): parts `split` apart
    let c = |x: usize| u32_of(x, "partial strides");
    let (hq, lq, dv) = (s.hq, s.lq, s.dv);
    let parts = PartViews {
        o: &o_part,
        lse: &lse_part,
        o_st: [
            0,
            c(hq * lq * splits * dv)?,
            c(splits * dv)?,
            c(lq * splits * dv)?,
            c(dv)?,
        ],
        lse_st: [0, c(hq * lq * splits)?, c(lq * splits)?, c(splits)?, 1],
        nparts: plan.splits,
    };
    let target = MergeTarget::Out {
        out,
        lse,
        lse_heads_last: false,
    };
    let end = timestamps.map(|(set, i)| (set, i + 1));
    encode_merge(ctx, enc, [s.batch, lq, hq, dv], &parts, None, target, end)?;
    Ok(plan)
}

/// Writes `opts.k_new` / `opts.v_new` into the caches at `cache_seqlens` and returns the
/// options the attention then runs with (the lengths grown by `S_new`); `None` without new
/// tokens.
fn append_new_tokens(
    ctx: &GpuContext,
    enc: &mut wgpu::CommandEncoder,
    s: &AttnShape,
    k: &KvCache,
    v: &KvCache,
    opts: &DecodeOptions,
) -> Result<Option<DecodeOptions>> {
    let (Some(kn), Some(vn)) = (&opts.k_new, &opts.v_new) else {
        return Ok(None);
    };
    let lens = opts.cache_seqlens.as_ref().ok_or_else(|| {
        AttnError::invalid(
            "cache_seqlens",
            "the cached lengths (where new tokens go)",
            "none",
        )
    })?;
    let s_new = kn.shape()[1];
    let mut inputs = vec![("k_new", kn), ("v_new", vn)];
    inputs.extend(opts.block_table.iter().map(|t| ("block_table", t)));
    check_no_alias(&inputs, &[("k cache", k.data())])?;
    check_no_alias(&inputs, &[("v cache", v.data())])?;
    let dev_lens = Tensor::from_u32(ctx, lens, &[lens.len()])?;
    let max_blocks = opts.block_table.as_ref().map_or(1, |t| t.shape()[1]);
    super::append::encode_append(
        ctx,
        enc,
        kn,
        k,
        opts.block_table.as_ref(),
        &dev_lens,
        max_blocks,
    )?;
    super::append::encode_append(
        ctx,
        enc,
        vn,
        v,
        opts.block_table.as_ref(),
        &dev_lens,
        max_blocks,
    )?;
    let mut after = opts.clone();
    after.k_new = None;
    after.v_new = None;
    // fits u32: checked against the cache length
    after.cache_seqlens = Some(lens.iter().map(|&l| l + s_new as u32).collect());
    debug_assert!(after
        .cache_seqlens
        .iter()
        .flatten()
        .all(|&l| l as usize <= s.lk));
    Ok(Some(after))
}

/// The outputs' shapes and dtypes, and no output sharing a buffer with an input or another.
fn check_outputs(
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

/// Binds the inputs by the kernel's names and records the split pass into `parts` (partial O,
/// partial LSE).
#[allow(clippy::too_many_arguments)]
fn record_splits(
    ctx: &GpuContext,
    enc: &mut wgpu::CommandEncoder,
    s: &AttnShape,
    plan: &DecodePlan,
    q: &Tensor,
    k: &KvCache,
    v: &KvCache,
    opts: &DecodeOptions,
    parts: [&Tensor; 2],
    timestamp_begin: Option<(&wgpu::QuerySet, u32)>,
) -> Result<()> {
    // per-batch key counts, then the ALiBi slopes' bits
    let mut aux: Vec<u32> = opts
        .cache_seqlens
        .clone()
        .unwrap_or_else(|| vec![0; s.batch]);
    aux.extend(opts.alibi_slopes.iter().flatten().map(|x| x.to_bits()));
    let aux = Tensor::from_u32(ctx, &aux, &[aux.len()])?;
    let dummy_i = Tensor::from_i32(ctx, &[0], &[1])?;
    let dummy_f = Tensor::filled(ctx, &[1], DType::F32, 0.0)?;
    let table = opts.block_table.as_ref().unwrap_or(&dummy_i);
    let bias = opts.bias.as_ref().unwrap_or(&dummy_f);
    let (bq, bk, bv, bb) = (
        BoundRange::new(ctx, q, "q")?,
        BoundRange::new(ctx, k.data(), "k cache")?,
        BoundRange::new(ctx, v.data(), "v cache")?,
        BoundRange::new(ctx, bias, "bias")?,
    );
    let mut prm = params(s, plan, q, k, opts)?;
    prm.q_off = bq.elem_offset;
    [prm.k_off, prm.k_s0, prm.k_s1, prm.k_s2] = cache_strides(k, &bk)?;
    [prm.v_off, prm.v_s0, prm.v_s1, prm.v_s2] = cache_strides(v, &bv)?;
    prm.b_off = bb.elem_offset;
    let rest = [
        ("table", BoundRange::new(ctx, table, "block_table")?),
        ("aux", BoundRange::new(ctx, &aux, "decode aux")?),
        ("o_part", BoundRange::new(ctx, parts[0], "partial O")?),
        ("lse_part", BoundRange::new(ctx, parts[1], "partial LSE")?),
    ];
    let pipeline = ctx.pipeline(&plan.key)?;
    let pbuf = ctx
        .device
        .create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some("decode params"),
            contents: bytemuck::bytes_of(&prm),
            usage: wgpu::BufferUsages::UNIFORM,
        });
    let mut named = vec![
        ("p", pbuf.as_entire_binding()),
        ("q", bq.resource()),
        ("k", bk.resource()),
        ("v", bv.resource()),
        ("bias", bb.resource()),
    ];
    named.extend(rest.iter().map(|(n, r)| (*n, r.resource())));
    let entries = entries_by_name(&plan.key, &named)?;
    let bg = ctx.device.create_bind_group(&wgpu::BindGroupDescriptor {
        label: Some("decode"),
        layout: &pipeline.get_bind_group_layout(0),
        entries: &entries,
    });
    let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
        label: Some("decode splits"),
        timestamp_writes: timestamp_begin.map(|(set, i)| wgpu::ComputePassTimestampWrites {
            query_set: set,
            beginning_of_pass_write_index: Some(i),
            end_of_pass_write_index: None,
        }),
    });
    pass.set_pipeline(&pipeline);
    pass.set_bind_group(0, &bg, &[]);
    let [x, y, z] = plan.grid;
    pass.dispatch_workgroups(x, y, z);
    Ok(())
}

/// The uniform block, apart from the offsets the bound ranges decide.
fn params(
    s: &AttnShape,
    plan: &DecodePlan,
    q: &Tensor,
    k: &KvCache,
    opts: &DecodeOptions,
) -> Result<DecodeParams> {
    let mut fl = 0;
    let mut set = |on: bool, f: u32| {
        if on {
            fl |= f;
        }
    };
    set(opts.causal, flags::CAUSAL);
    set(opts.cache_seqlens.is_some(), flags::LENS);
    set(opts.block_table.is_some(), flags::PAGED);
    set(opts.alibi_slopes.is_some(), flags::ALIBI);
    set(opts.bias.is_some(), flags::BIAS);
    set(opts.softcap.is_some(), flags::SOFTCAP);
    set(opts.window.0.is_some(), flags::WIN_LEFT);
    set(opts.window.1.is_some(), flags::WIN_RIGHT);
    let qs = q.strides();
    // windows past any cache length are unbounded; the kernel does i32 arithmetic on them
    let win = |w: Option<u32>| w.unwrap_or(0).min(1 << 30);
    let (num_pages, page_size, max_blocks) = match &opts.block_table {
        Some(t) => (k.shape()[0], k.shape()[1], t.shape()[1]),
        None => (1, k.shape()[1], 1),
    };
    let (bb, bh) = match &opts.bias {
        Some(t) => {
            let st = t.strides();
            let sh = t.shape();
            (
                if sh[0] == 1 { 0 } else { st[0] },
                if sh[1] == 1 { 0 } else { st[1] },
            )
        }
        None => (0, 0),
    };
    let c = |x: usize, what: &str| u32_of(x, what);
    Ok(DecodeParams {
        lq: c(s.lq, "Lq")?,
        hq: c(s.hq, "Hq")?,
        hkv: c(s.hkv, "Hkv")?,
        d: c(s.d, "D")?,
        dv: c(s.dv, "Dv")?,
        lk: c(s.lk, "cache length")?,
        splits: plan.splits,
        rows: c((s.hq / s.hkv) * s.lq, "rows per KV head")?,
        page_size: c(page_size, "page size")?,
        max_blocks: c(max_blocks, "max blocks")?,
        num_pages: c(num_pages, "pages")?,
        flags: fl,
        q_off: 0,
        q_sb: c(qs[0], "q stride")?,
        q_sl: c(qs[1], "q stride")?,
        q_sh: c(qs[2], "q stride")?,
        b_sb: c(bb, "bias stride")?,
        b_sh: c(bh, "bias stride")?,
        b_sl: opts
            .bias
            .as_ref()
            .map_or(Ok(0), |t| c(t.strides()[2], "bias stride"))?,
        scale: opts.scale.unwrap_or(1.0 / (s.d as f32).sqrt()),
        softcap: opts.softcap.unwrap_or(0.0),
        win_left: win(opts.window.0),
        win_right: win(opts.window.1),
        sinks: opts.sinks.min(1 << 30),
        slopes_at: c(s.batch, "batch")?,
        per_split: plan.per_split,
        ..Default::default()
    })
}
