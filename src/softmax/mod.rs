//! What every softmax-attention family shares (dense, neighborhood, and sparse next): the
//! kernel generator and its key ([`shader`]), the budgets that size a specialization, the plan
//! checks every family makes (head-dim buckets, subgroup sizes, llvmpipe's loop limit, grid
//! limits), and the resources of a call (bound sub-ranges of tensors, aliasing checks, the
//! Sweep kernel's textures). A family adds its [`shader::Geometry`] and its plan; it copies
//! none of this.

pub mod call;
mod check;
pub mod dense;
mod generate;
pub mod merge;
mod merge_parts;
pub mod options;
pub mod plan;
pub mod reference;
pub mod reference_grad;
pub mod sequence;
pub mod shader;

pub use options::{AttentionOutput, AttnShape, FlashOptions, SoftmaxPlan, StrategyChoice};

use crate::context::GpuContext;
use crate::error::{AttnError, Result};
use crate::pipeline::Kernel;
use crate::tensor::DType;
pub use crate::tuning::Tile;
use shader::{FlashKey, Geo, Strategy};

/// Head-dim buckets: D is rounded up to one of these and padded lanes read as zero.
pub const HEAD_DIM_BUCKETS: [u32; 13] = [16, 32, 48, 64, 80, 96, 128, 160, 192, 256, 320, 384, 512];
/// The largest D or Dv the kernels are built for.
pub const MAX_HEAD_DIM: usize = 512;
/// Workgroup memory the tiled strategy plans for: the WebGPU default limit, so every adapter fits.
pub const TILE_BUDGET_BYTES: u32 = 16 * 1024;
/// Registers for q rows and accumulators per invocation, in vec4s (`rows * (D + Dv) / 4`):
/// CPU adapters (subgroup strategy) have registers to spare, GPUs (tiled) need occupancy.
const REGISTER_BUDGET_VEC4: [u32; 2] = [128, 256];
/// Unrolled vec4 operations in one key group (`rows * group * (D + Dv) / 4`).
const UNROLL_BUDGET_VEC4: u32 = 512;

/// The head-dim bucket for `d`, or `None` when `d` is 0 or over [`MAX_HEAD_DIM`].
pub fn head_dim_bucket(d: usize) -> Option<u32> {
    HEAD_DIM_BUCKETS
        .iter()
        .copied()
        .find(|&b| d >= 1 && d <= b as usize)
}

pub(crate) fn register_budget(strategy: Strategy) -> u32 {
    match strategy {
        Strategy::Tiled => REGISTER_BUDGET_VEC4[0],
        Strategy::Subgroup | Strategy::Sweep => REGISTER_BUDGET_VEC4[1],
    }
}

/// The kernel specialization for a strategy, dtype, head-dim buckets, (for the subgroup
/// strategy) the adapter's subgroup size range and a family's geometry: rows, key groups and
/// tiles from the register, unroll and workgroup-memory budgets. Families build their keys
/// through it.
#[allow(clippy::too_many_arguments)]
pub fn kernel_key(
    strategy: Strategy,
    dtype: DType,
    d_bucket: u32,
    dv_bucket: u32,
    subgroup: (u32, u32),
    mods: bool,
    geometry: Geo,
) -> FlashKey {
    let (d4, dv4) = (d_bucket / 4, dv_bucket / 4);
    let width = d4 + dv4;
    // Rows per invocation: more rows, fewer loads per FMA, but R * (D + Dv) floats of registers
    // (q and the accumulator). Measured on lavapipe at L2048 D64: R = 2 / 4 / 8 gives 6.7 / 10.9
    // / 15.4 GFLOP/s; R = 16 gives 20.7 but triples the compile time, and at D = 256 R = 4
    // already takes a minute to compile.
    let budget = register_budget(strategy);
    let fit_rows = (budget / width).clamp(1, 8);
    let rows = 1u32 << (31 - fit_rows.leading_zeros()); // a power of two
    match strategy {
        Strategy::Tiled => {
            let fit = TILE_BUDGET_BYTES / (16 * width);
            let block = 1u32 << (31 - fit.min(32).leading_zeros());
            // Keys per unrolled group: the unrolled body is rows * group * (D + Dv) / 4 vec4
            // operations; SwiftShader's compile time grows fast with it.
            let mut group = block.min(8);
            while group > 1 && rows * group * width > UNROLL_BUDGET_VEC4 {
                group /= 2;
            }
            FlashKey {
                strategy,
                dtype,
                d4,
                dv4,
                rows,
                block,
                group,
                wg: 64,
                mods,
                geometry,
                pins: 0,
                lanes: 0,
                stages: 1,
            }
        }
        Strategy::Subgroup | Strategy::Sweep => {
            let (min, max) = subgroup;
            FlashKey {
                strategy,
                dtype,
                d4,
                dv4,
                rows,
                block: 0,
                // Two keys per shuffle round: divides every subgroup size >= 2, and measured on
                // lavapipe (D64, R4) U = 2 / 4 / 8 gives 10.9 / 10.5 / 9.7 GFLOP/s.
                group: 2,
                // a workgroup must fill whole subgroups of the largest size
                wg: if max > 64 { 128 } else { 64 },
                mods,
                geometry,
                pins: 0,
                // (the Sweep kernel's own key loop stops at a partial group: it keeps the loop)
                lanes: if strategy == Strategy::Subgroup && min == max && max == shader::FIXED_LANES
                {
                    max
                } else {
                    0
                },
                stages: 1,
            }
        }
    }
}

impl FlashKey {
    /// This key's tile.
    pub fn tile(&self) -> Tile {
        Tile {
            wg: self.wg,
            rows: self.rows,
            stages: self.stages,
        }
    }
}

/// Workgroup memory a two-stage Tiled key may declare: twice the one-stage budget, the limit of
/// most GPUs and of both CPU drivers here (WebGPU's default is 16 KiB; the plan offers two
/// stages only where the device's limit holds them).
pub const STAGED_BUDGET_BYTES: u32 = 2 * TILE_BUDGET_BYTES;

/// The tiles a key may be rebuilt with, its default among them:
/// - Tiled: 16, 32, 64 or 128 invocations, and rows from a quarter to twice the budget's
///   (at most 8), so a workgroup owns 16 to 1024 query rows. Fewer rows per workgroup make
///   more workgroups (a GPU needs several per compute unit) and skip more of a causal or
///   windowed problem's tiles; more rows reuse each K/V tile more. Each also with two K/V
///   stages ([`FlashKey::stages`]) where the geometry can prefetch and they fit
///   [`STAGED_BUDGET_BYTES`].
/// - Subgroup: half to twice the budget's rows (at most 16), same workgroup: on lavapipe
///   16 rows at D = 64 ran faster than 8 but compile three times longer (benches/RESULTS.md).
/// - Sweep: none but the default (its rows are the window's slots).
pub fn tile_candidates(key: &FlashKey) -> Vec<Tile> {
    let r0 = key.rows;
    let rows = |lo: u32, hi: u32| {
        [r0 / 4, r0 / 2, r0, r0 * 2]
            .into_iter()
            .filter(move |&r| r >= lo.max(1) && r <= hi)
    };
    let mut out: Vec<Tile> = match key.strategy {
        Strategy::Tiled => [16, 32, 64, 128]
            .into_iter()
            .flat_map(|wg| rows(r0 / 4, 8).map(move |rows| Tile::new(wg, rows)))
            .flat_map(|t| {
                let two = Tile { stages: 2, ..t };
                let staged = key.geometry.0.prefetches()
                    && with_tile(*key, two).workgroup_bytes() <= STAGED_BUDGET_BYTES;
                std::iter::once(t).chain(staged.then_some(two))
            })
            .collect(),
        Strategy::Subgroup => rows(r0 / 2, 16)
            .map(|rows| Tile::new(key.wg, rows))
            .collect(),
        Strategy::Sweep => vec![],
    };
    if !out.contains(&key.tile()) {
        out.push(key.tile());
    }
    out.sort_by_key(|t| (t.wg * t.rows, t.rows, t.stages));
    out.dedup();
    out
}

/// `key` rebuilt with `tile` (one of [`tile_candidates`]): the key group shrinks where more
/// rows would pass the unroll budget.
pub fn with_tile(key: FlashKey, tile: Tile) -> FlashKey {
    let mut k = FlashKey {
        wg: tile.wg,
        rows: tile.rows,
        stages: tile.stages,
        ..key
    };
    if k.strategy == Strategy::Tiled {
        let width = k.d4 + k.dv4;
        k.group = k.block.min(8);
        while k.group > 1 && k.rows * k.group * width > UNROLL_BUDGET_VEC4 {
            k.group /= 2;
        }
    }
    k
}

/// Keys sorted by label, without repeats (enumerations overlap where budgets clamp).
pub fn sorted(mut keys: Vec<FlashKey>) -> Vec<FlashKey> {
    keys.sort_by_key(|k| k.label());
    keys.dedup();
    keys
}

/// Keys as [`Kernel`]s, for the host layer's registry.
pub fn boxed(keys: Vec<FlashKey>) -> Vec<Box<dyn Kernel>> {
    keys.into_iter()
        .map(|k| Box::new(k) as Box<dyn Kernel>)
        .collect()
}

/// Subgroup sizes every subgroup specialization is enumerated for (the naga test builds all).
pub const SUBGROUP_SIZES: [u32; 6] = [4, 8, 16, 32, 64, 128];

/// Every `(min, max)` subgroup size range an adapter may report, from [`SUBGROUP_SIZES`].
pub fn subgroup_ranges() -> Vec<(u32, u32)> {
    let mut r = Vec::new();
    for &lo in &SUBGROUP_SIZES {
        for &hi in SUBGROUP_SIZES.iter().filter(|&&h| h >= lo) {
            r.push((lo, hi));
        }
    }
    r
}

/// Calls `f(strategy, dtype, d_bucket, dv_bucket, subgroup)` for every Tiled and Subgroup
/// specialization of the shared kernel any adapter may get: both dtypes, every pair of head-dim
/// buckets, every subgroup size range. A family's enumeration of its keys starts here.
pub fn for_each_shared_shape(mut f: impl FnMut(Strategy, DType, u32, u32, (u32, u32))) {
    for dtype in [DType::F32, DType::F16] {
        for &d in &HEAD_DIM_BUCKETS {
            for &dv in &HEAD_DIM_BUCKETS {
                f(Strategy::Tiled, dtype, d, dv, (0, 0));
                for r in subgroup_ranges() {
                    f(Strategy::Subgroup, dtype, d, dv, r);
                }
            }
        }
    }
}

/// The head-dim buckets of D and Dv, or which of them has none.
pub fn head_dims(shape: &AttnShape) -> Result<(u32, u32)> {
    let d = head_dim_bucket(shape.d).ok_or(AttnError::HeadDim {
        what: "D (q/k head dim)",
        got: shape.d,
        max: MAX_HEAD_DIM,
    })?;
    let dv = head_dim_bucket(shape.dv).ok_or(AttnError::HeadDim {
        what: "Dv (v head dim)",
        got: shape.dv,
        max: MAX_HEAD_DIM,
    })?;
    Ok((d, dv))
}

/// Whether the subgroup strategies can run: SUBGROUP with a size range of 2..=128.
pub fn subgroups_usable(ctx: &GpuContext) -> bool {
    let caps = &ctx.caps;
    caps.subgroups
        && caps.subgroup_min >= 2
        && caps.subgroup_max <= 128
        && caps.subgroup_min <= caps.subgroup_max
}

/// The error for a subgroup strategy forced on an adapter without usable subgroups.
pub fn no_subgroups(ctx: &GpuContext, strategy: Strategy) -> AttnError {
    AttnError::MissingFeature {
        feature: "SUBGROUP (with subgroup sizes 2..=128)",
        adapter: ctx.adapter_info.name.clone(),
        needed_for: format!("the {strategy:?} strategy"),
    }
}

/// Refuses a plan whose key loops would run more iterations per invocation than the driver's
/// loop limit allows (llvmpipe stops loops silently); `trips` as the family counts them.
pub fn check_trips(ctx: &GpuContext, trips: u64, lk: usize) -> Result<()> {
    if let Some(limit) = ctx.caps.loop_limit {
        // a margin for the loops outside the key loops (and a limit under it refuses all)
        let usable = limit.saturating_sub(64);
        if trips > usable {
            return Err(AttnError::Limit {
                what: format!(
                    "loop iterations per invocation for Lk = {lk} ({} driver stops loops silently)",
                    ctx.adapter_info.driver
                ),
                needed: trips,
                limit: usable,
            });
        }
    }
    Ok(())
}

/// The dispatch grid `[x, heads, batch]`, refused past the adapter's per-dimension limit.
pub fn grid(ctx: &GpuContext, x: u64, shape: &AttnShape) -> Result<[u32; 3]> {
    let max = ctx.limits.max_compute_workgroups_per_dimension;
    let grid = [x, shape.hq as u64, shape.batch as u64];
    if let Some(&g) = grid.iter().find(|&&g| g > max as u64) {
        return Err(AttnError::Limit {
            what: "workgroups per dispatch dimension".into(),
            needed: g,
            limit: max as u64,
        });
    }
    // each is at most `max`, a u32
    Ok(grid.map(|g| g as u32))
}
