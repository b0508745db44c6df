//! The shared plan (engine): the strategy a call takes on this adapter, its kernel key, and the
//! query tile (the caller's, the tuned one of its class, else the heuristic). A family's plan
//! starts from [`base_key`] with its own geometry and counts its own loop trips.

use crate::context::GpuContext;
use crate::error::{AttnError, Result};
use crate::softmax::kernel_key;
use crate::softmax::options::{AttnShape, FlashOptions, StrategyChoice};
use crate::softmax::shader::{FlashKey, Geo};
use crate::tensor::DType;
use crate::tuning::{ShapeClass, Strategy, Tile};

/// Whether a plan pairs mirrored query tiles: Tiled causal calls without a left window (whose
/// tiles' key ranges grow with the tile) on CPU adapters. A CPU driver hands each thread a
/// fixed share of the workgroups (SwiftShader: every 16th, in grid order), so uneven tiles
/// leave one thread finishing alone; paired, every workgroup does the same work. On native
/// SwiftShader (B = 1, H = 8, D = 64, L = 1024, 128-row tiles) pairing took causal from
/// 0.61-0.67 of the non-causal time to 0.55-0.57 in alternating runs, about the cost of half
/// the keys; with the paired plan's 64 x 8 tiles, 0.515-0.548 (benches/RESULTS.md). GPUs keep one tile per workgroup: their schedulers hand out
/// workgroups as compute units free up, and pairing would halve a grid sized to fill them
/// (not measured on a GPU).
pub fn pairs_tiles(ctx: &GpuContext, strategy: Strategy, opts: &FlashOptions) -> bool {
    ctx.caps.cpu && strategy == Strategy::Tiled && opts.causal && opts.window.0.is_none()
}

/// The key an untuned plan starts from: strategy, dtype, head-dim buckets and the budgets'
/// default tile (see `crate::flash::plan`).
pub fn base_key(
    ctx: &GpuContext,
    shape: &AttnShape,
    dtype: DType,
    opts: &FlashOptions,
    geometry: Geo,
) -> Result<FlashKey> {
    let mods = opts.softcap.is_some() || opts.alibi_slopes.is_some() || opts.bias.is_some();
    let (d_bucket, dv_bucket) = crate::softmax::head_dims(shape)?;
    let caps = &ctx.caps;
    let sg_ok = crate::softmax::subgroups_usable(ctx);
    let strategy = match opts.strategy {
        StrategyChoice::Auto if caps.cpu && sg_ok => Strategy::Subgroup,
        StrategyChoice::Auto => Strategy::Tiled,
        StrategyChoice::Force(s @ (Strategy::Subgroup | Strategy::Sweep)) if !sg_ok => {
            return Err(crate::softmax::no_subgroups(ctx, s))
        }
        StrategyChoice::Force(Strategy::Sweep) => {
            return Err(AttnError::invalid(
                "strategy Sweep",
                "a neighborhood call",
                "flash attention",
            ))
        }
        StrategyChoice::Force(s) => s,
    };
    Ok(kernel_key(
        strategy,
        dtype,
        d_bucket,
        dv_bucket,
        (caps.subgroup_min, caps.subgroup_max),
        mods,
        geometry,
    ))
}

/// The key's tile candidates that fit this device's workgroup memory (two-stage tiles may not).
pub fn candidates(ctx: &GpuContext, key: &FlashKey) -> Vec<Tile> {
    if tunable(key) {
        let limit = ctx.limits.max_compute_workgroup_storage_size;
        crate::softmax::tile_candidates(key)
            .into_iter()
            .filter(|&t| crate::softmax::with_tile(*key, t).workgroup_bytes() <= limit)
            .collect()
    } else {
        vec![key.tile()]
    }
}

/// Whether a dense key is built with other tiles than its default: D = Dv (the common case;
/// others keep the default, which bounds the specializations naga checks) without score
/// modifications.
pub fn tunable(key: &FlashKey) -> bool {
    key.d4 == key.dv4 && !key.mods && key.strategy != Strategy::Sweep
}

/// The caller's tile when it is one of `candidates`, else an error listing them.
pub(crate) fn wanted_tile(key: &FlashKey, candidates: &[Tile], t: Tile) -> Result<Tile> {
    if candidates.contains(&t) {
        return Ok(t);
    }
    let list: Vec<String> = candidates.iter().map(|c| c.to_string()).collect();
    Err(AttnError::invalid(
        "tile",
        format!("one of {} for {}", list.join(", "), key.label()),
        t,
    ))
}

/// The key with its tile: the caller's (checked against the candidates), else the tuned one of
/// this class, else [`heuristic_tile`].
pub fn choose_tile(
    ctx: &GpuContext,
    key: FlashKey,
    shape: &AttnShape,
    masked: bool,
    paired: bool,
    wanted: Option<Tile>,
) -> Result<FlashKey> {
    let candidates = candidates(ctx, &key);
    let tile = match wanted {
        Some(t) => wanted_tile(&key, &candidates, t)?,
        None => {
            let class = ShapeClass::new(key.strategy, key.dtype, key.d4 * 4, masked, shape.lq);
            ctx.tuned(&class)
                .filter(|t| candidates.contains(t))
                .unwrap_or_else(|| heuristic_tile(ctx, &key, &candidates, shape, masked, paired))
        }
    };
    Ok(crate::softmax::with_tile(key, tile))
}

/// Workgroups a GPU plan aims for: a few per compute unit of a large GPU (WebGPU does not say
/// how many units there are; 132 on an H200, 128 on an RTX 4090, 10-40 on Apple and integrated
/// GPUs), so that each unit has more than one to switch between while loads are in flight.
pub const GPU_TARGET_WORKGROUPS: u64 = 256;
/// Registers a GPU invocation may spend on its q rows and accumulators, in floats: NVIDIA and
/// AMD give a thread at most 255 (fewer at full occupancy); the softmax state, the score group
/// and addresses need the rest.
pub const GPU_ROW_FLOATS: u32 = 160;

/// Invocations per workgroup of an untuned paired causal plan on CPU adapters
/// ([`heuristic_tile`]).
pub const CPU_PAIRED_WG: u32 = 64;

/// The tile an untuned plan takes (the `tune` command measures instead).
/// - GPUs (not CPU adapters): the most rows per invocation whose q and accumulator fit
///   [`GPU_ROW_FLOATS`] (one row at D = 64: 128 floats), 64 invocations (two NVIDIA warps,
///   one AMD wave64); then smaller workgroups while the grid has fewer than
///   [`GPU_TARGET_WORKGROUPS`]. Not measured on a GPU yet.
/// - CPU adapters (lavapipe, SwiftShader, a browser's fallback adapter): a workgroup runs on
///   one thread in SIMD lanes, so there is no occupancy to win and more rows reuse each loaded
///   key more: the most rows (8), and 128 invocations without a mask; 64 for a causal call
///   whose tiles are paired ([`pairs_tiles`]: 512-row tiles, a pair per head at L = 1024);
///   16 where a window bounds the keys (128-row tiles, so whole tiles past the diagonal are
///   never loaded). Measured on SwiftShader (`tune --strategy tiled`, B = 1, H = 8, D = 64):
///   128 x 8 was the fastest of 16 tiles without a mask at L = 1024 and 2048 (1.4-1.5x the
///   budget's 64 x 4); with a causal mask and no pairing 16 x 8 was the fastest at L = 2048
///   and within 7% of 128 x 8 at 1024; paired, 64 x 8 beat 16 x 8 and 128 x 8 at L = 1024 and
///   4096 (benches/RESULTS.md).
/// - One K/V stage everywhere: two stages (load the next tile while computing this one) did
///   not pay on either CPU driver (L = 1024, D = 64, alternating runs; benches/RESULTS.md) and
///   have not run on a GPU. `tune` measures them on every adapter whose workgroup memory holds
///   them, so where they pay a tuned plan takes them.
pub fn heuristic_tile(
    ctx: &GpuContext,
    key: &FlashKey,
    candidates: &[Tile],
    shape: &AttnShape,
    masked: bool,
    paired: bool,
) -> Tile {
    let default = key.tile();
    if candidates.len() <= 1 || key.strategy != Strategy::Tiled {
        return default;
    }
    let one_stage: Vec<Tile> = candidates
        .iter()
        .copied()
        .filter(|t| t.stages == 1)
        .collect();
    let candidates = &one_stage[..];
    let width = 4 * (key.d4 + key.dv4);
    let workgroups = |t: &Tile| {
        (shape.lq as u64).div_ceil((t.wg * t.rows) as u64) * (shape.batch * shape.hq) as u64
    };
    if !ctx.caps.cpu {
        let rows = candidates
            .iter()
            .map(|t| t.rows)
            .filter(|&r| r * width <= GPU_ROW_FLOATS)
            .max()
            .unwrap_or(1);
        let mut fits: Vec<&Tile> = candidates
            .iter()
            .filter(|t| t.rows == rows && t.wg >= 32 && t.wg <= 64)
            .collect();
        fits.sort_by_key(|t| std::cmp::Reverse(t.wg));
        return fits
            .iter()
            .find(|t| workgroups(t) >= GPU_TARGET_WORKGROUPS)
            .or(fits.last())
            .map_or(default, |t| **t);
    }
    // most rows; the largest workgroup, 64 invocations for paired causal tiles, or the smallest
    // where a window bounds the keys
    let rows = candidates
        .iter()
        .map(|t| t.rows)
        .max()
        .unwrap_or(default.rows);
    let same_rows = candidates.iter().copied().filter(|t| t.rows == rows);
    match (masked, paired) {
        (_, true) => same_rows.min_by_key(|t| t.wg.abs_diff(CPU_PAIRED_WG)),
        (false, false) => same_rows.max_by_key(|t| t.wg),
        (true, false) => same_rows.min_by_key(|t| t.wg),
    }
    .unwrap_or(default)
}
