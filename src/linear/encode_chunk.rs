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
    // (pass, params) in order
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
        if solve.is_some() {
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
    ctx.scoped(|| {
        let dev = &ctx.device;
        let states_pipe = ctx.pipeline(states)?;
        let output_pipe = ctx.pipeline(output)?;
        let solve_pipe = solve.as_ref().map(|(k, _)| ctx.pipeline(k)).transpose()?;
        let scratch = |label: &'static str, vec4s: u64| -> Result<wgpu::Buffer> {
            let bytes = vec4s.saturating_mul(16);
            ctx.check_binding(label, bytes)?;
            Ok(dev.create_buffer(&wgpu::BufferDescriptor {
                label: Some(label),
                size: bytes.max(16),
                usage: wgpu::BufferUsages::STORAGE,
                mapped_at_creation: false,
            }))
        };
        let chunk_states = scratch("linear chunk states", total)?;
        // the delta rules' per-token scratch of a piece: (beta, b, 1/|k|, 1/|q|), W, U
        let toks = u64::from(*chunks_per_piece)
            * u64::from(chunk::C_DELTA)
            * u64::from(base.n_seq)
            * u64::from(base.hv);
        let delta_bufs = match solve {
            Some(_) => Some((
                scratch("linear delta tokens", toks)?,
                scratch("linear delta W", toks * delta_row_vec4s(s.k))?,
                scratch("linear delta U", toks * delta_row_vec4s(s.v))?,
            )),
            None => None,
        };
        let delta_ranges = delta_bufs.as_ref().map(|(t, w, u)| {
            (
                BoundRange::whole(t),
                BoundRange::whole(w),
                BoundRange::whole(u),
            )
        });
        let cs = BoundRange::whole(&chunk_states);
        let named = bound.named();
        let groups: Vec<(Stage, wgpu::BindGroup)> = steps
            .iter()
            .map(|(stage, p)| {
                let params = params_buffer(ctx, p);
                let pr = BoundRange::whole(&params);
                let (key, pipe) = match (stage, solve, &solve_pipe) {
                    (Stage::Solve, Some((k, _)), Some(sp)) => (k, sp),
                    (Stage::States, _, _) => (states, &states_pipe),
                    (Stage::Output, _, _) => (output, &output_pipe),
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
                if let Some((tk, wr, ur)) = &delta_ranges {
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
                let bg = dev.create_bind_group(&wgpu::BindGroupDescriptor {
                    label: Some("linear chunk bind group"),
                    layout: &layout,
                    entries: &entries,
                });
                Ok((*stage, bg))
            })
            .collect::<Result<_>>()?;
        let mut pass = begin_pass(encoder, "linear attention (chunks)", timestamps);
        for (stage, bg) in &groups {
            let [x, y, z] = match (stage, &solve_pipe, solve) {
                (Stage::Solve, Some(sp), Some((_, grid))) => {
                    pass.set_pipeline(sp);
                    *grid
                }
                (Stage::Solve | Stage::Fused, _, _) => continue,
                (Stage::States, _, _) => {
                    pass.set_pipeline(&states_pipe);
                    *states_grid
                }
                (Stage::Output, _, _) => {
                    pass.set_pipeline(&output_pipe);
                    *output_grid
                }
            };
            pass.set_bind_group(0, bg, &[]);
            pass.dispatch_workgroups(x, y, z);
        }
        Ok(())
    })
}
