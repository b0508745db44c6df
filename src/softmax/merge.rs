//! Exact merging of partial attention results computed over disjoint key sets (engine: every
//! softmax family may split its keys): the decode splits' combine step, NATTEN's additional
//! keys, and the public [`merge_attention`] (context-parallel / ring attention,
//! results of several devices or families, DuoAttention-style head mixes).
//!
//! For parts `(O_s, LSE_s)`: `M = max_s LSE_s`, `LSE = M + ln sum_s exp(LSE_s - M)`,
//! `O = sum_s exp(LSE_s - LSE) O_s`. A part with LSE = -inf saw no key and weighs nothing; a
//! row every part of which is empty gives O = 0 and LSE = -inf.

use crate::context::GpuContext;
use crate::dtype::DType;
use crate::error::u32_of;
use crate::error::{AttnError, Result};
use crate::pipeline::{declare_bindings, BindingDecl, Kernel, UniformLayout};
use crate::resources::{check_no_alias, entries_by_name, BoundRange};
use crate::tensor::Tensor;
use crate::wgsl::Wgsl;

/// `flags` of [`MergeParams`]: the accumulator joins as one more part; the result goes to the
/// accumulator (else to `out`); the LSE is written.
pub mod flags {
    pub const ACC_IN: u32 = 1;
    pub const TO_ACC: u32 = 2;
    pub const WRITE_LSE: u32 = 4;
}

/// One merge specialization: the parts' dtype and the output's.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MergeKey {
    pub part: DType,
    pub out: DType,
}

/// Strides of a `[B, L, H, Dv]` O view (and of its parts along `part`), and of a `[B, H, L]`
/// LSE view.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, bytemuck::Pod, bytemuck::Zeroable)]
pub struct MergeParams {
    pub items: u32,
    pub row_groups: u32,
    pub h: u32,
    pub l: u32,
    pub dv: u32,
    pub nparts: u32,
    pub flags: u32,
    pub _pad: u32,
    pub po_off: u32,
    pub po_sb: u32,
    pub po_sl: u32,
    pub po_sh: u32,
    pub po_sp: u32,
    pub pl_off: u32,
    pub pl_sb: u32,
    pub pl_sh: u32,
    pub pl_sl: u32,
    pub pl_sp: u32,
    pub o_off: u32,
    pub o_sb: u32,
    pub o_sl: u32,
    pub o_sh: u32,
    pub ol_off: u32,
    pub ol_sb: u32,
    pub ol_sh: u32,
    pub ol_sl: u32,
}

/// Every merge specialization.
pub fn all_keys() -> Vec<MergeKey> {
    let f = [DType::F32, DType::F16];
    f.iter()
        .flat_map(|&part| f.iter().map(move |&out| MergeKey { part, out }))
        .collect()
}

impl Kernel for MergeKey {
    fn label(&self) -> String {
        format!("merge_{}_to_{}", self.part, self.out)
    }
    fn source(&self) -> String {
        generate(self)
    }
    fn bindings(&self) -> Vec<BindingDecl> {
        vec![
            BindingDecl::uniform("p", "Params"),
            BindingDecl::read(
                "part_o",
                self.part.wgsl(),
                "parts' O [B, L, H, Dv] per part",
            ),
            BindingDecl::read("part_lse", "f32", "parts' LSE [B, H, L] per part"),
            BindingDecl::read_write("acc", "f32", "running O [B*H*L, Dv]"),
            BindingDecl::read("lse_in", "f32", "running LSE [B*H*L]"),
            BindingDecl::read_write("lse_acc", "f32", "running LSE out [B*H*L]"),
            BindingDecl::read_write("out", self.out.wgsl(), "O [B, L, H, Dv]"),
            BindingDecl::read_write("out_lse", "f32", "LSE [B, H, L]"),
        ]
    }
    fn workgroup_bytes(&self) -> u32 {
        0
    }
    fn capabilities(&self) -> naga::valid::Capabilities {
        if self.part == DType::F16 || self.out == DType::F16 {
            naga::valid::Capabilities::SHADER_FLOAT16
        } else {
            naga::valid::Capabilities::empty()
        }
    }
    fn uniforms(&self) -> Vec<UniformLayout> {
        vec![crate::uniform_layout!(MergeParams, "Params";
            items, row_groups, h, l, dv, nparts, flags, _pad,
            po_off, po_sb, po_sl, po_sh, po_sp, pl_off, pl_sb, pl_sh, pl_sl, pl_sp,
            o_off, o_sb, o_sl, o_sh, ol_off, ol_sb, ol_sh, ol_sl)]
    }
}

const BODY: &str = "
fn neg_inf() -> f32 {
    var bits = 0xff800000u;
    return bitcast<f32>(bits);
}

// One invocation per (row, column); rows enumerate (batch, head, query) in that order.
@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let item = gid.y * p.row_groups * 64u + gid.x;
    if (item >= p.items) {
        return;
    }
    let row = item / p.dv;
    let c = item % p.dv;
    let qi = row % p.l;
    let h = (row / p.l) % p.h;
    let b = row / (p.l * p.h);
    let po = p.po_off + b * p.po_sb + qi * p.po_sl + h * p.po_sh + c;
    let pl = p.pl_off + b * p.pl_sb + h * p.pl_sh + qi * p.pl_sl;
    let acc_in = (p.flags & 1u) != 0u;
    // the largest LSE of a part that saw keys (an empty part's -inf never enters a
    // difference); -1e30 is the floor, not f32's lowest: Tint refuses that literal
    var mx = -1.0e30;
    var any = false;
    if (acc_in && lse_in[row] > -1.0e30) {
        mx = lse_in[row];
        any = true;
    }
    for (var s = 0u; s < p.nparts; s++) {
        let x = part_lse[pl + s * p.pl_sp];
        if (x > -1.0e30) {
            mx = max(mx, x);
            any = true;
        }
    }
    var sum = 0.0;
    if (acc_in && lse_in[row] > -1.0e30) {
        sum = exp(lse_in[row] - mx);
    }
    for (var s = 0u; s < p.nparts; s++) {
        let x = part_lse[pl + s * p.pl_sp];
        sum += select(0.0, exp(x - mx), x > -1.0e30);
    }
    let lse = mx + log(sum);
    var o = 0.0;
    if (acc_in && lse_in[row] > -1.0e30) {
        o = acc[row * p.dv + c] * exp(lse_in[row] - lse);
    }
    for (var s = 0u; s < p.nparts; s++) {
        let x = part_lse[pl + s * p.pl_sp];
        let w = select(0.0, exp(x - lse), x > -1.0e30);
        o += w * f32(part_o[po + s * p.po_sp]);
    }
    let out_lse_v = select(neg_inf(), lse, any);
    o = select(0.0, o, any);
    if ((p.flags & 2u) != 0u) {
        acc[row * p.dv + c] = o;
        if (c == 0u) {
            lse_acc[row] = out_lse_v;
        }
    } else {
        out[p.o_off + b * p.o_sb + qi * p.o_sl + h * p.o_sh + c] = OUT(o);
        if (c == 0u && (p.flags & 4u) != 0u) {
            out_lse[p.ol_off + b * p.ol_sb + h * p.ol_sh + qi * p.ol_sl] = out_lse_v;
        }
    }
}
";

const PARAMS: &str = "struct Params {
    items: u32, row_groups: u32, h: u32, l: u32, dv: u32, nparts: u32, flags: u32, pad: u32,
    po_off: u32, po_sb: u32, po_sl: u32, po_sh: u32, po_sp: u32,
    pl_off: u32, pl_sb: u32, pl_sh: u32, pl_sl: u32, pl_sp: u32,
    o_off: u32, o_sb: u32, o_sl: u32, o_sh: u32,
    ol_off: u32, ol_sb: u32, ol_sh: u32, ol_sl: u32,
}
";

fn generate(key: &MergeKey) -> String {
    let mut w = Wgsl::new(&format!(
        "Generated by wgpu-attention (src/softmax/merge.rs): exact merge of partial attention\n\
         results (O, LSE), parts {}, output {}.",
        key.part, key.out
    ));
    if key.part == DType::F16 || key.out == DType::F16 {
        w.line("enable f16;");
    }
    w.raw(PARAMS);
    w.raw(&declare_bindings(&key.bindings()));
    w.line(&format!(
        "fn OUT(x: f32) -> {} {{ return {}(x); }}",
        key.out.wgsl(),
        key.out.wgsl()
    ));
    w.raw(BODY);
    w.finish()
}

/// Where a merge dispatch reads its parts: an O view and an LSE view, `nparts` of them
/// `part` elements apart.
pub(crate) struct PartViews<'a> {
    pub o: &'a Tensor,
    pub lse: &'a Tensor,
    /// `[off, b, l, h, part]` element strides of O, `[off, b, h, l, part]` of LSE (the
    /// offsets relative to the bound ranges).
    pub o_st: [u32; 5],
    pub lse_st: [u32; 5],
    pub nparts: u32,
}

/// Where the merge writes: the final O `[B, L, H, Dv]` and LSE (`[B, H, L]`, or `[B, L, H]`
/// with `lse_heads_last`: NATTEN's), or the running accumulator.
pub(crate) enum MergeTarget<'a> {
    Out {
        out: &'a Tensor,
        lse: Option<&'a Tensor>,
        lse_heads_last: bool,
    },
    Acc,
}

/// The running accumulator of a merge of several tensors: O `[rows, Dv]` and two LSE
/// buffers it alternates between (a dispatch reads one and writes the other).
pub(crate) struct Accumulator {
    pub o: Tensor,
    pub lse: [Tensor; 2],
}

/// Records one merge dispatch of `parts` (with the accumulator as one more part where
/// `acc_in`, reading LSE buffer `flip` and writing the other) into `target`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn encode_merge(
    ctx: &GpuContext,
    enc: &mut wgpu::CommandEncoder,
    dims: [usize; 4],
    parts: &PartViews,
    acc: Option<(&Accumulator, bool, usize)>,
    target: MergeTarget,
    timestamp_end: Option<(&wgpu::QuerySet, u32)>,
) -> Result<()> {
    let out_dtype = match &target {
        MergeTarget::Out { out, .. } => out.dtype(),
        MergeTarget::Acc => DType::F32,
    };
    let key = MergeKey {
        part: parts.o.dtype(),
        out: out_dtype,
    };
    let bo = BoundRange::new(ctx, parts.o, "part O")?;
    let bl = BoundRange::new(ctx, parts.lse, "part LSE")?;
    let (mut prm, grid) = part_params(ctx, dims, parts, [&bo, &bl])?;
    let mut fl = 0;
    // a dummy for each binding a dispatch does not use
    let dummy = |dtype: DType| Tensor::filled(ctx, &[1], dtype, 0.0);
    let scratch_acc;
    let (acc_o, lse_read, lse_write) = match acc {
        Some((a, read_first, _)) => {
            let (r, w) = if read_first { (0, 1) } else { (1, 0) };
            (&a.o, &a.lse[r], &a.lse[w])
        }
        None => {
            scratch_acc = [dummy(DType::F32)?, dummy(DType::F32)?, dummy(DType::F32)?];
            (&scratch_acc[0], &scratch_acc[1], &scratch_acc[2])
        }
    };
    if matches!(acc, Some((_, _, n)) if n > 0) {
        fl |= flags::ACC_IN;
    }
    let dummy_out;
    let dummy_lse;
    let (out, out_lse) = match target {
        MergeTarget::Out {
            out,
            lse,
            lse_heads_last,
        } => {
            fl |= out_strides(ctx, out, lse, lse_heads_last, &mut prm)?;
            let lse_t = match lse {
                Some(t) => t,
                None => {
                    dummy_lse = dummy(DType::F32)?;
                    &dummy_lse
                }
            };
            (out, lse_t)
        }
        MergeTarget::Acc => {
            fl |= flags::TO_ACC;
            dummy_out = dummy(out_dtype)?;
            dummy_lse = dummy(DType::F32)?;
            (&dummy_out, &dummy_lse)
        }
    };
    prm.flags = fl;
    check_no_alias(
        &[
            ("part O", parts.o),
            ("part LSE", parts.lse),
            ("lse_in", lse_read),
        ],
        &[
            ("acc", acc_o),
            ("lse_acc", lse_write),
            ("out", out),
            ("out_lse", out_lse),
        ],
    )?;
    let ranges = [
        ("acc", BoundRange::new(ctx, acc_o, "acc")?),
        ("lse_in", BoundRange::new(ctx, lse_read, "lse_in")?),
        ("lse_acc", BoundRange::new(ctx, lse_write, "lse_acc")?),
        ("out", BoundRange::new(ctx, out, "out")?),
        ("out_lse", BoundRange::new(ctx, out_lse, "out_lse")?),
    ];
    let mut named = vec![("part_o", bo.resource()), ("part_lse", bl.resource())];
    named.extend(ranges.iter().map(|(n, r)| (*n, r.resource())));
    dispatch(ctx, enc, &key, &prm, named, grid, timestamp_end)
}

/// The uniform block's sizes and part strides, and the grid: one invocation per value.
fn part_params(
    ctx: &GpuContext,
    dims: [usize; 4],
    parts: &PartViews,
    bound: [&BoundRange; 2],
) -> Result<(MergeParams, [u32; 3])> {
    let [b, l, h, dv] = dims;
    let items = [b, l, h, dv]
        .iter()
        .try_fold(1usize, |n, &x| n.checked_mul(x))
        .ok_or_else(|| {
            AttnError::invalid("merge", "a size that fits usize", format!("{dims:?}"))
        })?;
    let (grid, row_groups) = crate::pipeline::folded_grid(ctx, "merged values", items, 64)?;
    let [bo, bl] = bound;
    let prm = MergeParams {
        items: u32_of(items, "merged values")?,
        row_groups,
        h: u32_of(h, "heads")?,
        l: u32_of(l, "queries")?,
        dv: u32_of(dv, "Dv")?,
        nparts: parts.nparts,
        po_off: bo.elem_offset + parts.o_st[0],
        po_sb: parts.o_st[1],
        po_sl: parts.o_st[2],
        po_sh: parts.o_st[3],
        po_sp: parts.o_st[4],
        pl_off: bl.elem_offset + parts.lse_st[0],
        pl_sb: parts.lse_st[1],
        pl_sh: parts.lse_st[2],
        pl_sl: parts.lse_st[3],
        pl_sp: parts.lse_st[4],
        ..Default::default()
    };
    Ok((prm, grid))
}

/// `out`'s and `lse`'s strides into `prm`; the flags that writing them needs.
fn out_strides(
    ctx: &GpuContext,
    out: &Tensor,
    lse: Option<&Tensor>,
    heads_last: bool,
    prm: &mut MergeParams,
) -> Result<u32> {
    let st = out.strides();
    prm.o_off = BoundRange::new(ctx, out, "out")?.elem_offset;
    prm.o_sb = u32_of(st[0], "out stride")?;
    prm.o_sl = u32_of(st[1], "out stride")?;
    prm.o_sh = u32_of(st[2], "out stride")?;
    let Some(t) = lse else {
        return Ok(0);
    };
    let st = t.strides();
    prm.ol_off = BoundRange::new(ctx, t, "lse")?.elem_offset;
    let (h, l) = if heads_last { (2, 1) } else { (1, 2) };
    prm.ol_sb = u32_of(st[0], "lse stride")?;
    prm.ol_sh = u32_of(st[h], "lse stride")?;
    prm.ol_sl = u32_of(st[l], "lse stride")?;
    Ok(flags::WRITE_LSE)
}

/// One compute pass of the merge kernel: `prm` at `p`, the rest bound by name.
fn dispatch(
    ctx: &GpuContext,
    enc: &mut wgpu::CommandEncoder,
    key: &MergeKey,
    prm: &MergeParams,
    resources: Vec<(&str, wgpu::BindingResource)>,
    grid: [u32; 3],
    timestamp_end: Option<(&wgpu::QuerySet, u32)>,
) -> Result<()> {
    use wgpu::util::DeviceExt;
    let pipeline = ctx.pipeline(key)?;
    let pbuf = ctx
        .device
        .create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some("merge params"),
            contents: bytemuck::bytes_of(prm),
            usage: wgpu::BufferUsages::UNIFORM,
        });
    let mut named = vec![("p", pbuf.as_entire_binding())];
    named.extend(resources);
    let entries = entries_by_name(key, &named)?;
    let bg = ctx.device.create_bind_group(&wgpu::BindGroupDescriptor {
        label: Some("merge"),
        layout: &pipeline.get_bind_group_layout(0),
        entries: &entries,
    });
    let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
        label: Some("merge"),
        timestamp_writes: timestamp_end.map(|(set, i)| wgpu::ComputePassTimestampWrites {
            query_set: set,
            beginning_of_pass_write_index: None,
            end_of_pass_write_index: Some(i),
        }),
    });
    pass.set_pipeline(&pipeline);
    pass.set_bind_group(0, &bg, &[]);
    pass.dispatch_workgroups(grid[0], grid[1], grid[2]);
    Ok(())
}

pub use super::merge_parts::{
    encode_merge_attention, merge_attention, merge_reference, AttentionPart,
};
