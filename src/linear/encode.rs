//! The linear family's encoders: bind the checked tensors (by the kernels' declared binding
//! names) and record the plan's dispatches, piece by piece.

use wgpu::util::DeviceExt;

use super::check::{check_inputs, check_state, u32_of};
use super::chunk::ChunkKey;
use super::encode_chunk::encode_chunk;
use super::plan::{plan, LinearKernel, LinearPlan};
use super::shader::{flags, LinearKey, LinearParams};
use super::{retention_log_decay, FeatureMap, Mode};
use super::{LinearOptions, LinearShape, Rule};
use crate::context::GpuContext;
use crate::error::{AttnError, Result};
use crate::pipeline::Kernel;
use crate::resources::{check_no_alias, entries_by_name, BoundRange};
use crate::tensor::{DType, Tensor};

/// `[off, batch, token, head]` element strides of a rank-3/4 tensor's first axes; broadcast
/// axes get stride 0.
pub(super) fn strides(t: &Tensor, bound: &BoundRange) -> Result<[u32; 4]> {
    let st = t.strides();
    let get = |i: usize| st.get(i).map_or(Ok(0), |&x| u32_of(x, "tensor stride"));
    Ok([bound.elem_offset, get(0)?, get(1)?, get(2)?])
}

/// Records the linear attention into `encoder`. `final_state`, when given, receives the state
/// after the last token (`[N, HV, F, Vs]` f32, contiguous). `timestamps` brackets all
/// dispatches.
#[allow(clippy::too_many_arguments)]
pub fn encode_linear_attention(
    ctx: &GpuContext,
    encoder: &mut wgpu::CommandEncoder,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    out: &Tensor,
    final_state: Option<&Tensor>,
    opts: &LinearOptions,
    timestamps: Option<(&wgpu::QuerySet, u32)>,
) -> Result<LinearPlan> {
    let s = check_inputs(q, k, v)?;
    let mut plan = plan(ctx, &s, q.dtype(), opts)?;
    check_outputs(&s, [q, k, v, out], final_state, opts)?;
    require_vec4_rows(&mut plan, [q, k, v, out]);
    // the state carried between pieces (and written at the end) needs a buffer
    // (global attention in chunks reads the final state for every chunk's output)
    let chunked = plan.mode() == Mode::Chunk;
    let carry = plan.pieces.len() > 1 || (chunked && !opts.causal);
    let scratch = if final_state.is_none() && carry {
        Some(Tensor::filled(ctx, &s.state_shape(opts), DType::F32, 0.0)?)
    } else {
        None
    };
    let state_out = final_state.or(scratch.as_ref());
    // retention's default decays, one per head
    let default_g = if opts.rule == Rule::Retention && opts.g.is_none() {
        let g: Vec<f32> = (0..s.hv).map(|h| retention_log_decay(h) as f32).collect();
        Some(Tensor::from_f32(ctx, &g, &[s.hv])?)
    } else {
        None
    };
    let g = opts.g.as_ref().or(default_g.as_ref());
    let range = BoundRange::new;
    let (bq, bk) = (range(ctx, q, "q")?, range(ctx, k, "k")?);
    let (bv, bo) = (range(ctx, v, "v")?, range(ctx, out, "out")?);
    let bg = g.map(|t| range(ctx, t, "g")).transpose()?;
    let bb = (opts.beta.as_ref())
        .map(|t| range(ctx, t, "beta"))
        .transpose()?;
    let bi = (opts.initial_state.as_ref())
        .map(|t| range(ctx, t, "initial_state"))
        .transpose()?;
    let bs = state_out
        .map(|t| range(ctx, t, "final_state"))
        .transpose()?;
    let cu_buf = cu_buffer(ctx, opts);
    let b = Bound {
        q: &bq,
        k: &bk,
        v: &bv,
        o: &bo,
        g: bg.as_ref(),
        beta: bb.as_ref(),
        init: bi.as_ref(),
        state: bs.as_ref(),
        cu: cu_buf
            .as_ref()
            .map_or(BoundRange::whole(&ctx.dummy), BoundRange::whole),
        dummy: BoundRange::whole(&ctx.dummy),
        dummy_rw: BoundRange::whole(&ctx.dummy_rw),
    };
    let base = base_params(&s, opts, [q, k, v, out], g, &b)?;
    match &plan.kernel {
        LinearKernel::Recurrent { key, grid } => {
            encode_recurrent(ctx, encoder, key, grid, &plan, &base, &b, opts, timestamps)?
        }
        LinearKernel::Chunk(cp) => encode_chunk(
            ctx,
            encoder,
            &s,
            cp,
            &plan.pieces,
            &base,
            &b,
            opts,
            timestamps,
        )?,
        LinearKernel::Fused { key, grid } => encode_fused(
            ctx,
            encoder,
            key,
            grid,
            &plan.pieces,
            &base,
            &b,
            opts,
            timestamps,
        )?,
    }
    Ok(plan)
}

/// `out` and `final_state` have the shapes the inputs imply, and no output aliases an input.
fn check_outputs(
    s: &LinearShape,
    [q, k, v, out]: [&Tensor; 4],
    final_state: Option<&Tensor>,
    opts: &LinearOptions,
) -> Result<()> {
    let want_out = [s.batch, s.t, s.hv, s.v];
    out.dtype().require("out", v.dtype())?;
    if out.shape() != want_out {
        return Err(AttnError::shape(
            "out",
            format!("{want_out:?}"),
            out.shape(),
        ));
    }
    if let Some(fs) = final_state {
        check_state("final_state", fs, &s.state_shape(opts))?;
    }
    let mut inputs: Vec<(&str, &Tensor)> = vec![("q", q), ("k", k), ("v", v)];
    for (name, t) in [
        ("g", &opts.g),
        ("beta", &opts.beta),
        ("initial_state", &opts.initial_state),
    ] {
        if let Some(t) = t {
            inputs.push((name, t));
        }
    }
    let mut outputs: Vec<(&str, &Tensor)> = vec![("out", out)];
    if let Some(fs) = final_state {
        outputs.push(("final_state", fs));
    }
    check_no_alias(&inputs, &outputs)
}

/// The vec4 kernels need every row to start on a vec4; other views take the scalar paths.
fn require_vec4_rows(plan: &mut LinearPlan, tensors: [&Tensor; 4]) {
    let fours = |t: &Tensor| {
        t.offset().is_multiple_of(4) && t.strides().iter().take(3).all(|x| x.is_multiple_of(4))
    };
    if tensors.into_iter().all(fours) {
        return;
    }
    match &mut plan.kernel {
        LinearKernel::Chunk(cp) => {
            cp.states.aligned = false;
            cp.output.aligned = false;
        }
        LinearKernel::Fused { key, .. } => key.aligned = false,
        LinearKernel::Recurrent { .. } => {}
    }
}

/// The uniforms every piece of a call starts from: sizes, flags, scales and the strides of
/// the bound tensors (`g` may be retention's default decays).
fn base_params(
    s: &LinearShape,
    opts: &LinearOptions,
    [q, k, v, out]: [&Tensor; 4],
    g: Option<&Tensor>,
    b: &Bound,
) -> Result<LinearParams> {
    let g_st = match (g, b.g) {
        // one decay per head, whatever the batch and token
        (Some(t), Some(r)) if opts.rule == Rule::Retention => {
            [r.elem_offset, 0, 0, u32_of(t.strides()[0], "g stride")?]
        }
        (Some(t), Some(r)) => strides(t, r)?,
        _ => [0; 4],
    };
    let g_si = match g {
        Some(t) if opts.rule == Rule::Gla => u32_of(t.strides()[3], "g stride")?,
        _ => 0,
    };
    let scale = opts.scale.unwrap_or(1.0 / (s.k as f32).sqrt());
    let taylor = opts.feature_map == FeatureMap::Taylor;
    let mut fl = 0u32;
    if opts.cu_seqlens.is_some() {
        fl |= flags::VARLEN;
    }
    if b.state.is_some() {
        fl |= flags::WRITE_STATE;
    }
    Ok(LinearParams {
        n_seq: u32_of(s.sequences(opts), "sequences")?,
        t: u32_of(s.t, "T")?,
        h: u32_of(s.h, "H")?,
        hv: u32_of(s.hv, "HV")?,
        dk: u32_of(s.k, "K")?,
        dv: u32_of(s.v, "V")?,
        f: u32_of(s.feature_dim(opts), "F")?,
        vs: u32_of(s.state_cols(opts), "state columns")?,
        flags: fl,
        t_from: 0,
        t_to: 0,
        group: u32_of(s.hv / s.h, "HV / H")?,
        scale: if taylor { 1.0 } else { scale },
        eps: s.eps(opts) as f32,
        feat_scale: if taylor { scale.sqrt() } else { 1.0 },
        g_si,
        q_st: strides(q, b.q)?,
        k_st: strides(k, b.k)?,
        v_st: strides(v, b.v)?,
        o_st: strides(out, b.o)?,
        g_st,
        beta_st: match (&opts.beta, b.beta) {
            (Some(t), Some(r)) => strides(t, r)?,
            _ => [0; 4],
        },
        state: [
            b.init.map_or(0, |r| r.elem_offset),
            b.state.map_or(0, |r| r.elem_offset),
            0,
            0,
        ],
        chunk: [0; 4],
    })
}

/// The bound buffers of a call.
pub(super) struct Bound<'a> {
    q: &'a BoundRange<'a>,
    k: &'a BoundRange<'a>,
    v: &'a BoundRange<'a>,
    o: &'a BoundRange<'a>,
    g: Option<&'a BoundRange<'a>>,
    beta: Option<&'a BoundRange<'a>>,
    init: Option<&'a BoundRange<'a>>,
    /// The state carried between pieces and written at the end (final state or scratch).
    state: Option<&'a BoundRange<'a>>,
    /// `cu_seqlens` (packed sequences), else the dummy buffer.
    cu: BoundRange<'a>,
    /// What an absent read-only / writable binding gets.
    dummy: BoundRange<'a>,
    dummy_rw: BoundRange<'a>,
}

impl<'a> Bound<'a> {
    /// The call's buffers under the names the linear kernels declare (absent optional ones as
    /// the dummy buffers, read-only or writable as declared).
    pub(super) fn named(&self) -> Vec<(&'static str, wgpu::BindingResource<'a>)> {
        let (cu, dummy, dummy_rw) = (&self.cu, &self.dummy, &self.dummy_rw);
        vec![
            ("q", self.q.resource()),
            ("k", self.k.resource()),
            ("v", self.v.resource()),
            ("g", self.g.unwrap_or(dummy).resource()),
            ("beta", self.beta.unwrap_or(dummy).resource()),
            ("s_in", self.init.unwrap_or(dummy).resource()),
            ("cu", cu.resource()),
            ("o", self.o.resource()),
            ("s_out", self.state.unwrap_or(dummy_rw).resource()),
        ]
    }
}

pub(super) fn cu_buffer(ctx: &GpuContext, opts: &LinearOptions) -> Option<wgpu::Buffer> {
    // offsets only for packed sequences (the kernels read them under F_VARLEN)
    opts.cu_seqlens.as_ref().map(|cu| {
        ctx.device
            .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some("linear cu_seqlens"),
                contents: bytemuck::cast_slice(cu),
                usage: wgpu::BufferUsages::STORAGE,
            })
    })
}

/// A compute pass, its start and end timestamped when asked.
pub(super) fn begin_pass<'e>(
    encoder: &'e mut wgpu::CommandEncoder,
    label: &str,
    timestamps: Option<(&wgpu::QuerySet, u32)>,
) -> wgpu::ComputePass<'e> {
    encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
        label: Some(label),
        timestamp_writes: timestamps.map(|(set, i)| wgpu::ComputePassTimestampWrites {
            query_set: set,
            beginning_of_pass_write_index: Some(i),
            end_of_pass_write_index: Some(i + 1),
        }),
    })
}

pub(super) fn params_buffer(ctx: &GpuContext, p: &LinearParams) -> wgpu::Buffer {
    ctx.device
        .create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some("linear params"),
            contents: bytemuck::bytes_of(p),
            usage: wgpu::BufferUsages::UNIFORM,
        })
}

#[allow(clippy::too_many_arguments)]
pub(super) fn encode_recurrent(
    ctx: &GpuContext,
    encoder: &mut wgpu::CommandEncoder,
    key: &LinearKey,
    grid: &[u32; 3],
    plan: &LinearPlan,
    base: &LinearParams,
    bound: &Bound,
    opts: &LinearOptions,
    timestamps: Option<(&wgpu::QuerySet, u32)>,
) -> Result<()> {
    // one dispatch per piece; global attention runs the update pieces, then the output ones
    let mut steps: Vec<LinearParams> = Vec::new();
    let phases: &[u32] = if opts.causal {
        &[flags::UPDATE | flags::OUTPUT]
    } else {
        &[flags::UPDATE, flags::OUTPUT]
    };
    for (pi, &phase) in phases.iter().enumerate() {
        for (i, &(from, to)) in plan.pieces.iter().enumerate() {
            let mut p = *base;
            p.t_from = from;
            p.t_to = to;
            p.flags |= phase;
            let first = pi == 0 && i == 0;
            if first {
                if opts.initial_state.is_some() {
                    p.flags |= flags::INIT;
                }
            } else {
                p.flags |= flags::RESUME;
            }
            // a lone output phase of global attention reads the state and leaves it be
            if phase == flags::OUTPUT {
                p.flags &= !flags::WRITE_STATE;
            }
            steps.push(p);
        }
    }
    let named = bound.named();
    encode_steps(
        ctx,
        encoder,
        key,
        grid,
        &steps,
        &named,
        "linear attention",
        timestamps,
    )
}

/// One kernel dispatched once per step: the same buffers (`named`, by the kernel's declared
/// names) and the step's parameters as `p`.
#[allow(clippy::too_many_arguments)]
pub(super) fn encode_steps(
    ctx: &GpuContext,
    encoder: &mut wgpu::CommandEncoder,
    kernel: &dyn Kernel,
    grid: &[u32; 3],
    steps: &[LinearParams],
    named: &[(&str, wgpu::BindingResource)],
    label: &str,
    timestamps: Option<(&wgpu::QuerySet, u32)>,
) -> Result<()> {
    ctx.scoped(|| {
        let pipeline = ctx.pipeline(kernel)?;
        let layout = pipeline.get_bind_group_layout(0);
        let groups: Vec<wgpu::BindGroup> = steps
            .iter()
            .map(|p| {
                let params = params_buffer(ctx, p);
                let mut all = vec![("p", params.as_entire_binding())];
                all.extend(named.iter().cloned());
                let entries = entries_by_name(kernel, &all)?;
                Ok(ctx.device.create_bind_group(&wgpu::BindGroupDescriptor {
                    label: Some(label),
                    layout: &layout,
                    entries: &entries,
                }))
            })
            .collect::<Result<_>>()?;
        let mut pass = begin_pass(encoder, label, timestamps);
        pass.set_pipeline(&pipeline);
        let [x, y, z] = *grid;
        for bg in &groups {
            pass.set_bind_group(0, bg, &[]);
            pass.dispatch_workgroups(x, y, z);
        }
        Ok(())
    })
}

/// The fused chunk kernel: one dispatch per piece of chunks, the state carried through the
/// final-state buffer.
#[allow(clippy::too_many_arguments)]
pub(super) fn encode_fused(
    ctx: &GpuContext,
    encoder: &mut wgpu::CommandEncoder,
    key: &ChunkKey,
    grid: &[u32; 3],
    pieces: &[(u32, u32)],
    base: &LinearParams,
    bound: &Bound,
    opts: &LinearOptions,
    timestamps: Option<(&wgpu::QuerySet, u32)>,
) -> Result<()> {
    let steps: Vec<LinearParams> = pieces
        .iter()
        .enumerate()
        .map(|(i, &(from, to))| {
            let mut p = *base;
            p.chunk = [from, to, 0, 0];
            if i > 0 {
                p.flags |= flags::RESUME;
            } else if opts.initial_state.is_some() {
                p.flags |= flags::INIT;
            }
            p
        })
        .collect();
    let named = bound.named();
    let label = "linear attention (fused chunks)";
    encode_steps(ctx, encoder, key, grid, &steps, &named, label, timestamps)
}
