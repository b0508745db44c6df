//! The chunk passes' encoder (see `encode.rs` for the call and the other modes): per piece the
//! delta rules' solve pass, the state pass and the output pass, each bound by the names its
//! kernel declares.

use super::check::u32_of;
use super::chunk::{self, Stage};
use super::encode::{begin_pass, params_buffer, Bound};
use super::plan::{chunk_state_vec4s, delta_row_vec4s, ChunkPlan};
use super::shader::{flags, LinearParams};
use super::{LinearOptions, LinearShape};
use crate::context::GpuContext;
use crate::error::{AttnError, Result};
use crate::resources::{entries_by_name, BoundRange};

/// The chunk passes: per piece the state pass (storing each chunk's starting state) and the
/// output pass; global attention runs every state piece, then the output pieces against the
/// final state.
#[allow(clippy::too_many_arguments)]
pub(super) fn encode_chunk(
    ctx: &GpuContext,
    encoder: &mut wgpu::CommandEncoder,
    s: &LinearShape,
    cp: &ChunkPlan,
    pieces: &[(u32, u32)],
    base: &LinearParams,
    bound: &Bound,
    opts: &LinearOptions,
    timestamps: Option<(&wgpu::QuerySet, u32)>,
) -> Result<()> {
    let ChunkPlan {
        solve,
        states,
        output,
        states_grid,
        output_grid,
        chunks_per_piece,
    } = cp;
    // chunk states [N, HV, P, Fp, W4] (vec4s; global attention: one slot, the final state)
    let slot = chunk_state_vec4s(s, opts);
    let slots = if opts.causal {
        u64::from(*chunks_per_piece)
    } else {
        1
    };
    let per_nh = slot * slots;
    let total = per_nh * u64::from(base.n_seq) * u64::from(base.hv);
    let (slot, per_nh) = (
        u32_of(slot as usize, "chunk state")?,
        u32_of(per_nh as usize, "chunk states")?,
    );
    let steps = chunk_steps(pieces, base, opts, solve.is_some(), [per_nh, slot]);
    ctx.scoped(|| {
        let pipes = Pipes {
            states: ctx.pipeline(states)?,
            output: ctx.pipeline(output)?,
            solve: solve.as_ref().map(|(k, _)| ctx.pipeline(k)).transpose()?,
        };
        let scratch = Scratch::new(ctx, s, cp, base, total)?;
        let groups = bind_steps(ctx, cp, &pipes, &scratch, bound, &steps)?;
        let mut pass = begin_pass(encoder, "linear attention (chunks)", timestamps);
        for (stage, bg) in &groups {
            let [x, y, z] = match (stage, &pipes.solve, solve) {
                (Stage::Solve, Some(sp), Some((_, grid))) => {
                    pass.set_pipeline(sp);
                    *grid
                }
                (Stage::Solve | Stage::Fused, _, _) => continue,
                (Stage::States, _, _) => {
                    pass.set_pipeline(&pipes.states);
                    *states_grid
                }
                (Stage::Output, _, _) => {
                    pass.set_pipeline(&pipes.output);
                    *output_grid
                }
            };
            pass.set_bind_group(0, bg, &[]);
            pass.dispatch_workgroups(x, y, z);
        }
        Ok(())
    })
}

/// The passes of a call in order, each with its uniforms: per piece the solve (delta rules),
/// the states and (causal) the output pass; global attention's output passes after every
/// state pass. `slots` is `[chunk states per (sequence, head), one chunk state]` in vec4s.
fn chunk_steps(
    pieces: &[(u32, u32)],
    base: &LinearParams,
    opts: &LinearOptions,
    solve: bool,
    [per_nh, slot]: [u32; 2],
) -> Vec<(Stage, LinearParams)> {
    let mut steps: Vec<(Stage, LinearParams)> = Vec::new();
    for (i, &(from, to)) in pieces.iter().enumerate() {
        let mut p = *base;
        p.chunk = [from, to, per_nh, slot];
        if i == 0 {
            if opts.initial_state.is_some() {
                p.flags |= flags::INIT;
            }
        } else {
            p.flags |= flags::RESUME;
        }
        // (WRITE_STATE is in base whenever there is a state to carry or return)
        p.flags |= if opts.causal {
            flags::CHUNKS
        } else {
            flags::GLOBAL
        };
        if solve {
            steps.push((Stage::Solve, p));
        }
        steps.push((Stage::States, p));
        if opts.causal {
            let mut o = *base;
            o.chunk = [from, to, per_nh, slot];
            o.flags &= flags::VARLEN;
            steps.push((Stage::Output, o));
        }
    }
    if !opts.causal {
        for &(from, to) in pieces {
            let mut o = *base;
            o.chunk = [from, to, per_nh, 0];
            o.flags = (o.flags & flags::VARLEN) | flags::GLOBAL;
            steps.push((Stage::Output, o));
        }
    }
    steps
}

/// The pipelines of a chunked call.
struct Pipes {
    states: std::sync::Arc<wgpu::ComputePipeline>,
    output: std::sync::Arc<wgpu::ComputePipeline>,
    solve: Option<std::sync::Arc<wgpu::ComputePipeline>>,
}

/// A chunked call's scratch buffers: the chunk states, and for the delta rules the per-token
/// scratch of a piece: (beta, b, 1/|k|, 1/|q|), W and U.
struct Scratch {
    chunk_states: wgpu::Buffer,
    delta: Option<[wgpu::Buffer; 3]>,
}

impl Scratch {
    fn new(
        ctx: &GpuContext,
        s: &LinearShape,
        cp: &ChunkPlan,
        base: &LinearParams,
        states_vec4s: u64,
    ) -> Result<Self> {
        let scratch = |label: &'static str, vec4s: u64| -> Result<wgpu::Buffer> {
            let bytes = vec4s.saturating_mul(16);
            ctx.check_binding(label, bytes)?;
            Ok(ctx.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some(label),
                size: bytes.max(16),
                usage: wgpu::BufferUsages::STORAGE,
                mapped_at_creation: false,
            }))
        };
        let toks = u64::from(cp.chunks_per_piece)
            * u64::from(chunk::C_DELTA)
            * u64::from(base.n_seq)
            * u64::from(base.hv);
        let delta = match cp.solve {
            Some(_) => Some([
                scratch("linear delta tokens", toks)?,
                scratch("linear delta W", toks * delta_row_vec4s(s.k))?,
                scratch("linear delta U", toks * delta_row_vec4s(s.v))?,
            ]),
            None => None,
        };
        Ok(Self {
            chunk_states: scratch("linear chunk states", states_vec4s)?,
            delta,
        })
    }
}

/// One bind group per step, each bound by the names its kernel declares.
fn bind_steps(
    ctx: &GpuContext,
    cp: &ChunkPlan,
    pipes: &Pipes,
    scratch: &Scratch,
    bound: &Bound,
    steps: &[(Stage, LinearParams)],
) -> Result<Vec<(Stage, wgpu::BindGroup)>> {
    let delta_ranges = (scratch.delta.as_ref()).map(|d| d.each_ref().map(BoundRange::whole));
    let cs = BoundRange::whole(&scratch.chunk_states);
    let named = bound.named();
    steps
        .iter()
        .map(|(stage, p)| {
            let params = params_buffer(ctx, p);
            let pr = BoundRange::whole(&params);
            let (key, pipe) = match (stage, &cp.solve, &pipes.solve) {
                (Stage::Solve, Some((k, _)), Some(sp)) => (k, sp),
                (Stage::States, _, _) => (&cp.states, &pipes.states),
                (Stage::Output, _, _) => (&cp.output, &pipes.output),
                (Stage::Solve | Stage::Fused, _, _) => {
                    return Err(AttnError::invalid(
                        "chunk plan",
                        "a solve pass only for the delta rules, no fused kernel",
                        format!("{stage:?}"),
                    ))
                }
            };
            let layout = pipe.get_bind_group_layout(0);
            let mut all = vec![("p", pr.resource()), ("states", cs.resource())];
            all.extend(named.iter().cloned());
            if let Some([tk, wr, ur]) = &delta_ranges {
                all.extend([
                    ("tok", tk.resource()),
                    ("wsc", wr.resource()),
                    ("usc", ur.resource()),
                ]);
                if *stage == Stage::Output {
                    // the delta rules' output pass reads U from the state pass as its `v`
                    all.push(("v", ur.resource()));
                }
            }
            let entries = entries_by_name(key, &all)?;
            Ok((
                *stage,
                ctx.device.create_bind_group(&wgpu::BindGroupDescriptor {
                    label: Some("linear chunk bind group"),
                    layout: &layout,
                    entries: &entries,
                }),
            ))
        })
        .collect()
}
