//! The linear family's plan: recurrent, chunk or fused chunk (Mode, or Auto's pick by length
//! and adapter), the kernel keys, and the pieces long sequences run in (under lavapipe's loop
//! limit and the binding size).

use super::check::{check_options, u32_of};
use super::chunk::{self, ChunkKey, Stage};
use super::shader::{Decay, LinearKey};
use super::{
    auto_chunk_min_t, chunk_delta, chunk_fused, FeatureMap, LinearOptions, LinearShape, Mode, Rule,
};
use crate::context::GpuContext;
use crate::error::{AttnError, Result};
use crate::pipeline::Kernel;
use crate::tensor::DType;

/// The kernels a plan runs.
#[non_exhaustive]
#[derive(Clone, Debug)]
pub enum LinearKernel {
    Recurrent {
        key: LinearKey,
        grid: [u32; 3],
    },
    Chunk(ChunkPlan),
    /// `chunk_fused.rs`: one dispatch per piece of chunks.
    Fused {
        key: ChunkKey,
        grid: [u32; 3],
    },
}

/// The chunk passes of a plan.
#[derive(Clone, Debug)]
pub struct ChunkPlan {
    /// The delta rules' solve pass (`chunk_delta.rs`), one workgroup per chunk of a piece.
    pub solve: Option<(ChunkKey, [u32; 3])>,
    pub states: ChunkKey,
    pub output: ChunkKey,
    pub states_grid: [u32; 3],
    /// For a piece of `chunks_per_piece` chunks.
    pub output_grid: [u32; 3],
    pub chunks_per_piece: u32,
}

/// What the plan chose.
#[non_exhaustive]
#[derive(Clone, Debug)]
pub struct LinearPlan {
    pub kernel: LinearKernel,
    /// Ranges of the dispatches: tokens (recurrent) or chunks (chunk). lavapipe stops loops
    /// past 65535 iterations, and the chunk states of a piece must fit one binding, so long
    /// sequences run in pieces, the state carried through the final-state buffer.
    pub pieces: Vec<(u32, u32)>,
}

impl LinearPlan {
    /// The kernel labels, as `info` and `--json` print them.
    pub fn label(&self) -> String {
        match &self.kernel {
            LinearKernel::Recurrent { key, .. } => key.label(),
            LinearKernel::Fused { key, .. } => key.label(),
            LinearKernel::Chunk(cp) => {
                let solve = cp
                    .solve
                    .as_ref()
                    .map_or(String::new(), |(k, _)| format!("{} + ", k.label()));
                format!("{solve}{} + {}", cp.states.label(), cp.output.label())
            }
        }
    }
    /// `Recurrent`, `Chunk` or `FusedChunk`.
    pub fn mode(&self) -> Mode {
        match self.kernel {
            LinearKernel::Recurrent { .. } => Mode::Recurrent,
            LinearKernel::Chunk(_) => Mode::Chunk,
            LinearKernel::Fused { .. } => Mode::FusedChunk,
        }
    }
}

/// The kernels and the dispatches for this problem on this adapter.
pub fn plan(
    ctx: &GpuContext,
    s: &LinearShape,
    dtype: DType,
    opts: &LinearOptions,
) -> Result<LinearPlan> {
    check_options(s, opts)?;
    if dtype == DType::F16 && !ctx.caps.f16 {
        return Err(AttnError::MissingFeature {
            feature: "SHADER_F16",
            adapter: ctx.adapter_info.name.clone(),
            needed_for: "f16 linear attention".into(),
        });
    }
    let longest = longest_sequence(s, opts);
    let chunked = match opts.mode {
        Mode::FusedChunk => return plan_fused(ctx, s, dtype, opts, longest),
        Mode::Chunk => true,
        Mode::Recurrent => false,
        Mode::Auto => {
            let cpu = ctx.adapter_info.device_type == wgpu::DeviceType::Cpu;
            // a CPU adapter: the fused kernel wherever it runs, decode steps included
            // (see plan_fused)
            let fused = cpu
                && opts.subgroups != Some(false)
                && subgroups_of_8(ctx)
                && fused_unsupported(s, opts).is_none();
            if fused {
                return plan_fused(ctx, s, dtype, opts, longest);
            }
            longest >= auto_chunk_min_t(opts, chunk_subgroups(ctx, opts)?, cpu)
        }
    };
    if chunked {
        plan_chunk(ctx, s, dtype, opts, longest)
    } else {
        plan_recurrent(ctx, s, dtype, opts)
    }
}

/// Whether the chunk kernels run their subgroup variant. lavapipe loops over the lanes for
/// every storage or workgroup load, so a value all lanes need costs eight loads there: the
/// subgroup variants load each value once and shuffle.
pub(super) fn chunk_subgroups(ctx: &GpuContext, opts: &LinearOptions) -> Result<bool> {
    let (decay, normalize) = (opts.rule.decay(), LinearShape::normalized(opts));
    let sg_ok = subgroups_of_8(ctx);
    match opts.subgroups {
        None => Ok(sg_ok && ChunkKey::sg_supported(decay, normalize)),
        Some(false) => Ok(false),
        Some(true) if !sg_ok => Err(AttnError::MissingFeature {
            feature: "SUBGROUP (subgroups of 8 lanes or more)",
            adapter: ctx.adapter_info.name.clone(),
            needed_for: "the subgroup chunk kernels".into(),
        }),
        Some(true) if !ChunkKey::sg_supported(decay, normalize) => Err(AttnError::invalid(
            "subgroups",
            "None or false for GLA and a normalized output (no subgroup variant)",
            "true",
        )),
        Some(true) => Ok(true),
    }
}

/// Tokens of the longest sequence.
pub(super) fn longest_sequence(s: &LinearShape, opts: &LinearOptions) -> usize {
    match &opts.cu_seqlens {
        Some(cu) => cu
            .windows(2)
            .map(|w| w[1].saturating_sub(w[0]) as usize)
            .max()
            .unwrap_or(0),
        None => s.t,
    }
}

pub(super) fn check_grid(ctx: &GpuContext, grid: &[u64; 3]) -> Result<()> {
    let max = u64::from(ctx.limits.max_compute_workgroups_per_dimension);
    if let Some(&g) = grid.iter().find(|&&g| g > max || g == 0) {
        return Err(if g == 0 {
            AttnError::invalid("problem", "at least one sequence", "none")
        } else {
            AttnError::Limit {
                what: "workgroups per dispatch dimension".into(),
                needed: g,
                limit: max,
            }
        });
    }
    Ok(())
}

/// Bytes of chunk states one piece may hold (besides the binding limit).
pub(super) const CHUNK_STATES_BYTES: u64 = 64 << 20;

pub(super) fn plan_chunk(
    ctx: &GpuContext,
    s: &LinearShape,
    dtype: DType,
    opts: &LinearOptions,
    longest: usize,
) -> Result<LinearPlan> {
    let delta = opts.rule.delta();
    let key = chunk_key(ctx, s, dtype, opts)?;
    let (states, output) = (key(Stage::States), key(Stage::Output));
    let chunks = (longest as u64).div_ceil(u64::from(states.c())).max(1);
    let (n, hv) = (s.sequences(opts) as u64, s.hv as u64);
    let nvt_o = (s.v as u64).div_ceil(u64::from(output.out_cols()));
    let per_piece = chunks_per_piece(ctx, s, opts, &states, chunks, nvt_o)?;
    let (tile_rows, tile_cols) = if delta {
        // every row, 4 WG columns
        (s.k as u32, 4 * states.wg())
    } else {
        states.state_tile()
    };
    let states_grid = [
        (s.v as u64).div_ceil(u64::from(tile_cols)),
        (s.feature_dim(opts) as u64).div_ceil(u64::from(tile_rows)),
        n * hv,
    ];
    let solve_grid = [per_piece, hv, n];
    check_grid(ctx, &solve_grid)?;
    let output_grid = [
        per_piece.div_ceil(u64::from(output.chunks_per_workgroup())) * nvt_o,
        hv,
        n,
    ];
    check_grid(ctx, &states_grid)?;
    check_grid(ctx, &output_grid)?;
    let per = u32_of(per_piece as usize, "chunks per piece")?;
    let total = u32_of(chunks as usize, "chunks")?;
    let pieces = chunk_pieces(total, per);
    Ok(LinearPlan {
        kernel: LinearKernel::Chunk(ChunkPlan {
            solve: delta.then(|| (key(Stage::Solve), solve_grid.map(|g| g as u32))),
            states,
            output,
            states_grid: states_grid.map(|g| g as u32),
            output_grid: output_grid.map(|g| g as u32),
            chunks_per_piece: per,
        }),
        pieces,
    })
}

/// The chunk kernels' key for each stage of this call.
fn chunk_key(
    ctx: &GpuContext,
    s: &LinearShape,
    dtype: DType,
    opts: &LinearOptions,
) -> Result<impl Fn(Stage) -> ChunkKey> {
    let normalize = LinearShape::normalized(opts);
    let decay = opts.rule.decay();
    // vec4 loads where K and V allow (the call checks the tensors' offsets and strides)
    // (Taylor's features are products of scalar loads)
    let aligned =
        s.k.is_multiple_of(4) && s.v.is_multiple_of(4) && opts.feature_map != FeatureMap::Taylor;
    let sg = chunk_subgroups(ctx, opts)?;
    let delta = opts.rule.delta();
    let k_u32 = u32_of(s.k, "K")?;
    let (qk_l2norm, feature_map) = (opts.qk_l2norm, opts.feature_map);
    Ok(move |stage| {
        let k = if delta {
            let gated = decay == Decay::Scalar;
            ChunkKey::delta(stage, dtype, gated, qk_l2norm, aligned, k_u32)
        } else {
            ChunkKey::new(stage, dtype, feature_map, decay, normalize, aligned)
        };
        // (the delta rules' state pass has one variant)
        if sg && (!delta || stage != Stage::States) {
            k.with_subgroups()
        } else {
            k
        }
    })
}

/// Chunks per piece: as many as one piece's chunk states fit in memory, lavapipe's loop
/// limit allows in the state pass and the grid's widest dimension holds.
fn chunks_per_piece(
    ctx: &GpuContext,
    s: &LinearShape,
    opts: &LinearOptions,
    states: &ChunkKey,
    chunks: u64,
    nvt_o: u64,
) -> Result<u64> {
    let (delta, c) = (opts.rule.delta(), u64::from(states.c()));
    let (n, hv) = (s.sequences(opts) as u64, s.hv as u64);
    // one slot of chunk states: [N, HV, Fp, W4] vec4s, and the delta rules' per-token
    // scratch of a chunk
    let slot = n * hv * (chunk_state_vec4s(s, opts) + delta_scratch_vec4s(s, opts)) * 16;
    let budget = CHUNK_STATES_BYTES.min(ctx.limits.max_storage_buffer_binding_size);
    let by_memory = budget / slot.max(1);
    if by_memory == 0 {
        return Err(AttnError::Limit {
            what: "bytes of one chunk's states (all sequences and heads)".into(),
            needed: slot,
            limit: budget,
        });
    }
    // the state pass's loops per chunk (the serial gate sum, the keys, the tokens, the
    // values), against lavapipe's count
    let loops = if delta {
        chunk_delta::state_loops_per_chunk(states, u32_of(s.k, "K")?)
    } else {
        4 * c + 8
    };
    let by_loops = match ctx.caps.loop_limit {
        None => u64::MAX,
        // (and the state's row-loop load and store)
        Some(limit) => ((limit / 2).saturating_sub(chunk::STATE_ROW_LOOPS) / loops).max(1),
    };
    let max_dim = u64::from(ctx.limits.max_compute_workgroups_per_dimension);
    let by_grid = (max_dim / nvt_o).max(1);
    Ok(chunks.min(by_memory).min(by_loops).min(by_grid))
}

/// Whether the adapter has subgroups of 8 lanes or more: what the subgroup chunk passes and
/// the fused chunk kernel need.
pub fn subgroups_of_8(ctx: &GpuContext) -> bool {
    ctx.caps.subgroups && ctx.caps.subgroup_min >= chunk::SG_LANES
}

/// What the fused chunk kernel needs that these options lack, if anything.
pub fn fused_unsupported(s: &LinearShape, opts: &LinearOptions) -> Option<&'static str> {
    if opts.rule.delta() || opts.rule == Rule::Gla {
        Some("Linear, Retention or SimpleGla")
    } else if !opts.causal {
        Some("causal attention")
    } else if LinearShape::normalized(opts) {
        Some("an output that is not normalized (no Taylor map, no normalize)")
    } else if s.feature_dim(opts) > chunk_fused::FUSED_ROWS as usize {
        Some("K of at most 64")
    } else {
        None
    }
}

/// `total` chunks in ranges of `per`.
pub(super) fn chunk_pieces(total: u32, per: u32) -> Vec<(u32, u32)> {
    (0..total.div_ceil(per))
        .map(|i| (i * per, (i * per).saturating_add(per).min(total)))
        .collect()
}

/// The fused chunk kernel's plan (`Mode::FusedChunk`), or why it cannot run these options.
///
/// `Auto` takes it on CPU adapters at every length (lavapipe, K = V = 64: 1.2-1.9x faster
/// than the two passes from T = 1024 to 65536 at H = 8, benches/RESULTS.md; with one
/// workgroup, simple GLA at H = 1, T = 1024: 1.47 against 2.85 ms, single runs; and faster
/// than the recurrent kernel down to decode steps, simple GLA, H = 8, medians of 15 runs:
/// T = 1 0.18 against 0.51 ms, T = 4 0.22 against 0.68, T = 16 0.36 against 1.87). A GPU keeps
/// the two passes: the fused kernel's one workgroup per sequence, head and 64 columns would
/// leave most of its compute units idle (not measured: no GPU has run it).
pub(super) fn plan_fused(
    ctx: &GpuContext,
    s: &LinearShape,
    dtype: DType,
    opts: &LinearOptions,
    longest: usize,
) -> Result<LinearPlan> {
    if let Some(why) = fused_unsupported(s, opts) {
        return Err(AttnError::invalid(
            "mode",
            format!("chunk, recurrent or auto, or fused-chunk with {why}"),
            "fused-chunk",
        ));
    }
    if opts.subgroups == Some(false) {
        return Err(AttnError::invalid(
            "subgroups",
            "None or true for the fused chunk kernel (it has no variant without subgroups)",
            "false",
        ));
    }
    if !subgroups_of_8(ctx) {
        return Err(AttnError::MissingFeature {
            feature: "SUBGROUP (subgroups of 8 lanes or more)",
            adapter: ctx.adapter_info.name.clone(),
            needed_for: "the fused chunk kernel".into(),
        });
    }
    let aligned = s.k.is_multiple_of(4) && s.v.is_multiple_of(4);
    let key = ChunkKey::fused(dtype, opts.feature_map, opts.rule.decay(), aligned);
    let grid = [
        (s.v as u64).div_ceil(u64::from(chunk_fused::FUSED_COLS)),
        1,
        s.sequences(opts) as u64 * s.hv as u64,
    ];
    check_grid(ctx, &grid)?;
    let chunks = (longest as u64).div_ceil(u64::from(key.c())).max(1);
    let per_piece = match ctx.caps.loop_limit {
        None => chunks,
        Some(limit) => ((limit / 2).saturating_sub(chunk::STATE_ROW_LOOPS)
            / chunk_fused::loops_per_chunk(&key))
        .max(1),
    };
    let per = u32_of(per_piece.min(chunks) as usize, "chunks per piece")?;
    let total = u32_of(chunks as usize, "chunks")?;
    let pieces = chunk_pieces(total, per);
    Ok(LinearPlan {
        kernel: LinearKernel::Fused {
            key,
            grid: grid.map(|g| g as u32),
        },
        pieces,
    })
}

/// vec4s of a row of the delta rules' W or U scratch: K or V padded to 64 (the WGSL's `kp4()`,
/// `vu4()`).
pub(super) fn delta_row_vec4s(x: usize) -> u64 {
    (x as u64).div_ceil(64) * 16
}

/// vec4s of the delta rules' scratch per chunk: per token `(beta, b, 1/|k|, 1/|q|)`, a row of
/// W and of U.
pub(super) fn delta_scratch_vec4s(s: &LinearShape, opts: &LinearOptions) -> u64 {
    if !opts.rule.delta() {
        return 0;
    }
    u64::from(chunk::C_DELTA) * (1 + delta_row_vec4s(s.k) + delta_row_vec4s(s.v))
}

/// vec4s of one chunk state: F padded to the state pass's 64 rows, times `W4` (V padded to the
/// output pass's 64 columns, plus one for z).
pub(super) fn chunk_state_vec4s(s: &LinearShape, opts: &LinearOptions) -> u64 {
    let fp = (s.feature_dim(opts) as u64).div_ceil(u64::from(chunk::STATE_ROWS))
        * u64::from(chunk::STATE_ROWS);
    let w4 = (s.v as u64).div_ceil(u64::from(chunk::OUT_COLS)) * u64::from(chunk::OUT_COLS) / 4
        + u64::from(LinearShape::normalized(opts));
    fp * w4
}

pub(super) fn plan_recurrent(
    ctx: &GpuContext,
    s: &LinearShape,
    dtype: DType,
    opts: &LinearOptions,
) -> Result<LinearPlan> {
    let key = LinearKey::new(
        dtype,
        s.k,
        opts.rule,
        opts.feature_map,
        LinearShape::normalized(opts),
        opts.qk_l2norm,
    );
    // one invocation per column of V (each keeps z itself when normalizing)
    let cols = s.v as u64;
    let grid = [
        cols.div_ceil(u64::from(key.wg)),
        s.hv as u64,
        s.sequences(opts) as u64,
    ];
    check_grid(ctx, &grid)?;
    let t = u32_of(s.t, "T")?;
    // lavapipe counts the loop iterations of an invocation: a piece runs `len` tokens and
    // `len / tb` blocks. Measured: T = 61424 in one piece stopped after token 58255 (its
    // count is not exactly ours), so a piece takes half the limit
    let piece = match ctx.caps.loop_limit {
        None => t.max(1),
        Some(limit) => {
            let usable = limit / 2;
            let tb = u64::from(key.tb);
            let p = usable * tb / (tb + 1) / tb * tb;
            u32::try_from(p.max(tb)).unwrap_or(u32::MAX)
        }
    };
    let ranges: Vec<(u32, u32)> = (0..t.max(1).div_ceil(piece))
        .map(|i| (i * piece, (i * piece).saturating_add(piece).min(t)))
        .collect();
    Ok(LinearPlan {
        kernel: LinearKernel::Recurrent {
            key,
            grid: grid.map(|g| g as u32),
        },
        pieces: ranges,
    })
}

/// Every kernel the linear family can build (for naga in `cargo test`).
pub fn all_kernels() -> Vec<Box<dyn Kernel>> {
    let rec = LinearKey::all()
        .into_iter()
        .map(|k| Box::new(k) as Box<dyn Kernel>);
    let chunk = ChunkKey::all()
        .into_iter()
        .map(|k| Box::new(k) as Box<dyn Kernel>);
    rec.chain(chunk).collect()
}
