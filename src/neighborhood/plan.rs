//! The neighborhood family's plan: the strategy (the Sweep kernel on CPU adapters where the
//! problem allows it), the specialization, how query tiles cover the grid ([`NaGrid`]), the
//! loop-limit check and the uniform block ([`NaParams`]).

use crate::context::GpuContext;
use crate::error::{AttnError, Result};
use crate::pipeline::Kernel;
use crate::softmax::call::{CallLayout, FamilyData};
use crate::softmax::shader::{FlashKey, Strategy};
use crate::softmax::{kernel_key, subgroup_ranges, HEAD_DIM_BUCKETS};
use crate::softmax::{AttnShape, FlashOptions, SoftmaxPlan, StrategyChoice};

/// A neighborhood call's plan: the engine's [`SoftmaxPlan`] (kernel key, grid).
pub type NeighborhoodPlan = SoftmaxPlan;
use crate::tensor::DType;

use super::shader::{NaParams, Neighborhood};
use super::{NaAxis, NaSpec};

/// A neighborhood specialization of the shared kernel (no score modifications).
pub fn na_key(
    strategy: Strategy,
    dtype: DType,
    d_bucket: u32,
    dv_bucket: u32,
    subgroup: (u32, u32),
) -> FlashKey {
    kernel_key(
        strategy,
        dtype,
        d_bucket,
        dv_bucket,
        subgroup,
        false,
        Neighborhood::geo(),
    )
}

/// Most query slots a Sweep kernel keeps (the x kernel size): its unrolled body grows with
/// slots x (D + Dv), and so does its compile time (13 slots at D = Dv = 64: about 20 s on
/// lavapipe).
pub const SWEEP_MAX_SLOTS: u32 = 13;
/// Largest head dim a Sweep kernel takes (D and Dv share a bucket).
pub const SWEEP_MAX_DIM: u32 = 64;

/// The Sweep specialization: `slots` = the x kernel size, border pins when x is not causal.
pub fn sweep_key(
    dtype: DType,
    d_bucket: u32,
    dv_bucket: u32,
    subgroup: (u32, u32),
    slots: u32,
    causal_x: bool,
) -> FlashKey {
    let mut key = na_key(Strategy::Subgroup, dtype, d_bucket, dv_bucket, subgroup);
    key.strategy = Strategy::Sweep;
    key.lanes = 0; // its own key loop stops at a partial group
    key.rows = slots;
    key.pins = if causal_x { 0 } else { slots / 2 };
    key
}

/// The problem as the Sweep kernel takes it, or why it does not: leading unit axes move to the
/// back (a 2D `[1, X, Y]` becomes `[X, Y, 1]`, the same tokens in the same order), x is swept,
/// so it needs stride 1 and a kernel of 2 ..= [`SWEEP_MAX_SLOTS`], and the inner axes must not
/// be all units (1D problems stream their window directly).
pub fn sweep_layout(
    spec: &NaSpec,
    d_bucket: u32,
    dv_bucket: u32,
) -> std::result::Result<NaSpec, String> {
    let mut axes: Vec<NaAxis> = spec.axes.iter().copied().skip_while(|a| a.n == 1).collect();
    axes.resize(3, NaAxis::UNIT);
    let [x, y, z] = [axes[0], axes[1], axes[2]];
    if x.n == 1 || (y.n == 1 && z.n == 1) {
        return Err("a neighborhood over at least 2 axes longer than 1".into());
    }
    if x.stride != 1 {
        return Err(format!("stride 1 on the first axis (got {})", x.stride));
    }
    if !(2..=SWEEP_MAX_SLOTS as usize).contains(&x.kernel) {
        return Err(format!(
            "a first-axis kernel of 2..={SWEEP_MAX_SLOTS} (got {})",
            x.kernel
        ));
    }
    if d_bucket != dv_bucket || d_bucket > SWEEP_MAX_DIM {
        return Err(format!(
            "D and Dv in one head-dim bucket of at most {SWEEP_MAX_DIM} (got buckets {d_bucket} and {dv_bucket})"
        ));
    }
    Ok(NaSpec { axes: [x, y, z] })
}

/// Query tiling of a neighborhood call (axes x, y, z; z innermost). A subgroup's rows form a
/// `sub` box, a workgroup's `sub * wgrid`; `tiles` workgroup tiles cover one dilation group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NaGrid {
    pub sub: [u32; 3],
    pub wgrid: [u32; 3],
    pub tiles: [u32; 3],
}

impl NaGrid {
    /// Picks box shapes whose window union (`box + kernel - 1` keys per axis) is smallest:
    /// the keys a subgroup streams are those of the union, so a square box beats a line.
    pub fn new(spec: &NaSpec, sub_rows: u32, wg_rows: u32) -> Self {
        let m = spec.axes.map(|a| a.n.div_ceil(a.dilation) as u32);
        let reach = spec.axes.map(|a| (a.kernel + a.stride - 1) as u32);
        let grow = |start: [u32; 3], target: u32| {
            let mut t = start;
            while t.iter().product::<u32>() < target {
                let cost = |a: usize| {
                    (0..3)
                        .map(|b| u64::from(if a == b { 2 * t[b] } else { t[b] } + reach[b] - 1))
                        .product::<u64>()
                };
                match (0..3)
                    .rev()
                    .filter(|&a| t[a] < m[a])
                    .min_by_key(|&a| cost(a))
                {
                    Some(a) => t[a] *= 2,
                    None => break,
                }
            }
            t
        };
        let sub = grow([1, 1, 1], sub_rows);
        let full = grow(sub, wg_rows);
        NaGrid {
            sub,
            wgrid: [0, 1, 2].map(|a| full[a] / sub[a]),
            tiles: [0, 1, 2].map(|a| m[a].div_ceil(full[a])),
        }
    }

    /// The Sweep kernel's grid: a workgroup owns whole x lines (one lane per position of the
    /// inner axes), so x is neither split nor tiled.
    pub fn sweep(spec: &NaSpec, lanes: u32, wg_lanes: u32) -> Self {
        let mut inner = *spec;
        inner.axes[0] = NaAxis::UNIT;
        NaGrid::new(&inner, lanes, wg_lanes)
    }

    /// Query tile of one workgroup.
    pub fn tile(&self) -> [u32; 3] {
        [0, 1, 2].map(|a| self.sub[a] * self.wgrid[a])
    }

    /// Workgroup tiles per dilation group.
    pub fn per_group(&self) -> u32 {
        self.tiles.iter().product()
    }
}

/// Every neighborhood specialization as a [`Kernel`] (for the host layer's registry).
pub fn all_kernels() -> Vec<Box<dyn Kernel>> {
    crate::softmax::boxed(all_na_keys())
}

/// Every neighborhood specialization the host can build, on any adapter (for naga tests).
pub fn all_na_keys() -> Vec<FlashKey> {
    let mut keys = Vec::new();
    crate::softmax::for_each_shared_shape(|strategy, dtype, d, dv, sg| {
        keys.push(na_key(strategy, dtype, d, dv, sg));
    });
    for dtype in [DType::F32, DType::F16] {
        for &d in HEAD_DIM_BUCKETS.iter().filter(|&&d| d <= SWEEP_MAX_DIM) {
            for slots in 2..=SWEEP_MAX_SLOTS {
                for causal in [false, true] {
                    for r in subgroup_ranges() {
                        keys.push(sweep_key(dtype, d, d, r, slots, causal));
                    }
                }
            }
        }
    }
    crate::softmax::sorted(keys)
}

/// A neighborhood plan: the shared plan, the axes as the kernel takes them (Sweep moves unit
/// axes back) and the query tiling.
#[derive(Clone, Copy, Debug)]
pub struct NaPlan {
    pub flash: NeighborhoodPlan,
    pub spec: NaSpec,
    pub grid: NaGrid,
}

impl NaPlan {
    /// The uniform block of this plan.
    pub fn params(&self) -> NaParams {
        let (spec, g) = (&self.spec, &self.grid);
        let mut np = NaParams::default();
        let u = |x: usize| x as u32; // axis sizes are at most the token count, which fits u32
        for (a, ax) in spec.axes.iter().enumerate() {
            if ax.causal {
                np.causal |= 1 << a;
            }
            np.n[a] = u(ax.n);
            np.kernel[a] = u(ax.kernel);
            np.dil[a] = u(ax.dilation);
            np.stride[a] = u(ax.stride);
            np.sub[a] = g.sub[a];
            np.wgrid[a] = g.wgrid[a];
            np.tiles[a] = g.tiles[a];
        }
        np.n[3] = g.per_group();
        np.sub[3] = g.sub.iter().product();
        np.wgrid[3] = g.wgrid.iter().product();
        np
    }
}

/// Picks the strategy, specialization and query tiling of a neighborhood problem `spec` with
/// `shape` (Lq = Lk = the grid's tokens) for this adapter.
pub fn plan(
    ctx: &GpuContext,
    shape: &AttnShape,
    dtype: DType,
    opts: &FlashOptions,
    spec: &NaSpec,
) -> Result<NaPlan> {
    let (d_bucket, dv_bucket) = crate::softmax::head_dims(shape)?;
    let caps = &ctx.caps;
    let sweep = sweep_layout(spec, d_bucket, dv_bucket);
    let strategy = pick_strategy(ctx, opts, &sweep)?;
    let subgroup = (caps.subgroup_min, caps.subgroup_max);
    let (spec, key) = match (strategy, sweep) {
        (Strategy::Sweep, Ok(rotated)) => {
            let x = rotated.axes[0];
            let key = sweep_key(
                dtype,
                d_bucket,
                dv_bucket,
                subgroup,
                x.kernel as u32,
                x.causal,
            );
            (rotated, key)
        }
        _ => (
            *spec,
            na_key(strategy, dtype, d_bucket, dv_bucket, subgroup),
        ),
    };
    let grid = match strategy {
        Strategy::Subgroup => NaGrid::new(
            &spec,
            caps.subgroup_max * key.rows,
            key.rows_per_workgroup(),
        ),
        Strategy::Tiled => NaGrid::new(&spec, key.rows_per_workgroup(), key.rows_per_workgroup()),
        Strategy::Sweep => NaGrid::sweep(&spec, caps.subgroup_max, key.wg),
    };
    let trips = key_trips(ctx, strategy, &key, &spec, &grid);
    crate::softmax::check_trips(ctx, trips, shape.lk)?;
    let x = spec
        .axes
        .iter()
        .map(|a| a.dilation as u64)
        .product::<u64>()
        .saturating_mul(grid.per_group() as u64);
    Ok(NaPlan {
        flash: NeighborhoodPlan {
            key,
            grid: crate::softmax::grid(ctx, x, shape)?,
            pair_tiles: false,
        },
        spec,
        grid,
    })
}

/// The strategy of a neighborhood call: the Sweep kernel on CPU adapters where the problem's
/// layout allows it, else Subgroup there; Tiled elsewhere; a forced one where it can run.
fn pick_strategy(
    ctx: &GpuContext,
    opts: &FlashOptions,
    sweep: &std::result::Result<NaSpec, String>,
) -> Result<Strategy> {
    let caps = &ctx.caps;
    let sg_ok = crate::softmax::subgroups_usable(ctx);
    Ok(match opts.strategy {
        StrategyChoice::Auto if caps.cpu && sg_ok && sweep.is_ok() => Strategy::Sweep,
        StrategyChoice::Auto if caps.cpu && sg_ok => Strategy::Subgroup,
        StrategyChoice::Auto => Strategy::Tiled,
        StrategyChoice::Force(s @ (Strategy::Subgroup | Strategy::Sweep)) if !sg_ok => {
            return Err(crate::softmax::no_subgroups(ctx, s))
        }
        StrategyChoice::Force(Strategy::Sweep) => match &sweep {
            Ok(_) => Strategy::Sweep,
            Err(why) => {
                return Err(AttnError::invalid(
                    "strategy Sweep",
                    why.clone(),
                    "this problem",
                ))
            }
        },
        StrategyChoice::Force(s) => s,
    })
}

/// Trip count of the key loops in one invocation (everything else is unrolled).
fn key_trips(
    ctx: &GpuContext,
    strategy: Strategy,
    key: &FlashKey,
    spec: &NaSpec,
    grid: &NaGrid,
) -> u64 {
    let caps = &ctx.caps;
    let (block, group) = match strategy {
        Strategy::Tiled => (key.block as u64, key.group as u64),
        Strategy::Subgroup | Strategy::Sweep => (caps.subgroup_min as u64, key.group as u64),
    };
    if strategy == Strategy::Sweep {
        // x planes (the sweep, then the border queries' planes), each a pass over its union
        // box in blocks
        let box_keys: u64 = (1..3)
            .map(|a| {
                let ax = spec.axes[a];
                (ax.n.div_ceil(ax.dilation) as u64)
                    .min(grid.sub[a] as u64 + (ax.kernel + ax.stride) as u64)
            })
            .product();
        let x = spec.axes[0];
        let planes = x.n.div_ceil(x.dilation) as u64 + x.kernel as u64 + 2;
        planes * ((box_keys.div_ceil(block) + 1) * (1 + block / group) + 1)
    } else {
        // one pass over the flattened key box, in blocks
        let tile = grid.tile();
        let keys: u64 = (0..3)
            .map(|a| {
                let ax = spec.axes[a];
                (ax.n.div_ceil(ax.dilation) as u64)
                    .min(tile[a] as u64 + (ax.kernel + ax.stride) as u64)
            })
            .product();
        (keys.div_ceil(block) + 1) * (1 + block / group) + 1
    }
}

/// A neighborhood call on the flash call path: `q`, `k`, `v`, `out` flattened to
/// `[B, L, H, D]`, LSE `[B, L, Hq]`.
pub(crate) struct NaLayout<'a>(pub &'a NaSpec);

impl CallLayout for NaLayout<'_> {
    fn check(&self, s: &AttnShape) -> Result<()> {
        let n = self.0.len();
        if s.lq != n || s.lk != n {
            return Err(AttnError::shape(
                "q/k tokens",
                format!("{n} (the neighborhood grid)"),
                (s.lq, s.lk),
            ));
        }
        Ok(())
    }
    fn lse_heads_last(&self) -> bool {
        true
    }
    fn plan(
        &self,
        ctx: &GpuContext,
        s: &AttnShape,
        dtype: DType,
        opts: &FlashOptions,
    ) -> Result<(NeighborhoodPlan, FamilyData)> {
        let p = plan(ctx, s, dtype, opts, self.0)?;
        let family = FamilyData {
            uniform: bytemuck::bytes_of(&p.params()).to_vec(),
            storage: Vec::new(),
        };
        Ok((p.flash, family))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_fits_the_webgpu_default_workgroup_memory_and_budgets() {
        for k in all_na_keys() {
            assert!(
                k.workgroup_bytes() <= crate::softmax::TILE_BUDGET_BYTES,
                "{k:?}"
            );
            assert!(k.rows >= 1 && k.group >= 1, "{k:?}");
            // the Sweep kernel's slots are its own budget: SWEEP_MAX_SLOTS at SWEEP_MAX_DIM
            let budget = match k.strategy {
                Strategy::Sweep => SWEEP_MAX_SLOTS * SWEEP_MAX_DIM / 2,
                s => crate::softmax::register_budget(s),
            };
            assert!(k.rows * (k.d4 + k.dv4) <= budget || k.rows == 1, "{k:?}");
        }
    }
}
