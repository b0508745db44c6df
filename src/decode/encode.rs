//! The decode call path: checks, plan, new tokens appended, the split pass, the merge of the
//! splits; params and resources bound by the kernel's names.

use wgpu::util::DeviceExt;

use super::check::{check, check_outputs};
use super::plan::{plan, DecodePlan};
use super::shader::{flags, DecodeParams};
use super::{DecodeOptions, KvCache};
use crate::context::GpuContext;
use crate::error::{u32_of, AttnError, Result};
use crate::resources::{check_no_alias, entries_by_name, BoundRange};
use crate::softmax::merge::{encode_merge, MergeTarget, PartViews};
use crate::softmax::AttnShape;
use crate::tensor::{DType, Tensor};

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
