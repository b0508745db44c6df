//! Tiled attention: the FlashAttention-2 forward pass.
//!
//! Layout `[batch, seq, heads, dim]`: Q `[B, Lq, Hq, D]`, K `[B, Lk, Hkv, D]`, V `[B, Lk, Hkv, Dv]`,
//! O `[B, Lq, Hq, Dv]`, LSE `[B, Hq, Lq]` (f32, natural log). Any strides with a contiguous dim
//! axis. `Hq` must be a multiple of `Hkv` (GQA/MQA).
//!
//! Semantics follow FlashAttention: causal masks are bottom-right aligned (query `i` sees key `j`
//! iff `j <= i + Lk - Lq`), per-batch lengths align at each sequence's own lengths, a row that sees
//! no key gives O = 0 and LSE = -inf.

pub mod reference;
pub mod shader;

use wgpu::util::DeviceExt;

use crate::context::GpuContext;
use crate::error::{AttnError, Result};
use crate::neighborhood::{NaAxis, NaSpec};
use crate::pipeline::Kernel;
use crate::tensor::{DType, Tensor};
use shader::{flags, FlashKey, FlashParams, Strategy, TEXTURE_WIDTH};

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

/// Which strategy to use: chosen from the adapter unless forced.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum StrategyChoice {
    /// Subgroup shuffles on CPU adapters that have subgroups; workgroup-memory tiles elsewhere.
    #[default]
    Auto,
    Force(Strategy),
}

/// Optional knobs of a flash attention call. `Default` is plain softmax attention.
#[derive(Clone, Debug, Default)]
pub struct FlashOptions {
    /// Bottom-right aligned causal mask.
    pub causal: bool,
    /// Softmax scale; `None` is `1 / sqrt(D)`.
    pub scale: Option<f32>,
    /// Tanh softcap `c`: `s = c * tanh(s / c)` after scaling. Must be > 0.
    pub softcap: Option<f32>,
    /// ALiBi slopes, one per query head: adds `-slope * |i + Lk - Lq - j|`.
    pub alibi_slopes: Option<Vec<f32>>,
    /// Additive f32 bias `[B|1, Hq|1, Lq, Lk]` (size-1 axes broadcast); `-inf` masks.
    pub bias: Option<Tensor>,
    /// Valid query rows per batch (`<= Lq`); rows past it are written as 0.
    pub q_lens: Option<Vec<u32>>,
    /// Valid keys per batch (`<= Lk`).
    pub kv_lens: Option<Vec<u32>>,
    /// Sliding window `(left, right)`: query i sees key j iff
    /// `i + Lk - Lq - left <= j <= i + Lk - Lq + right`; `None` on a side is unbounded.
    pub window: (Option<u32>, Option<u32>),
    /// The first `sinks` keys stay visible to every query, whatever the window (not past causality).
    pub sinks: u32,
    /// Also return the log-sum-exp `[B, Hq, Lq]`.
    pub return_lse: bool,
    pub strategy: StrategyChoice,
}

/// Problem sizes, read off the tensors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttnShape {
    pub batch: usize,
    pub lq: usize,
    pub lk: usize,
    pub hq: usize,
    pub hkv: usize,
    pub d: usize,
    pub dv: usize,
}

impl AttnShape {
    /// FLOPs of the dense problem: `4 * B * Hq * Lq * Lk * D` (for D = Dv; QK^T and PV).
    pub fn flops(&self, causal: bool) -> f64 {
        let f = self.flops_for_pairs((self.lq * self.lk) as u64);
        if causal {
            f / 2.0
        } else {
            f
        }
    }

    /// FLOPs of the work a mask leaves: `2 * (D + Dv)` per visible (query, key) pair, with
    /// `pairs` counted per batch and head.
    pub fn flops_for_pairs(&self, pairs: u64) -> f64 {
        2.0 * (self.batch * self.hq) as f64 * pairs as f64 * (self.d + self.dv) as f64
    }
}

/// What a flash call returns: O and, when asked for, LSE.
pub struct AttentionOutput {
    pub out: Tensor,
    pub lse: Option<Tensor>,
}

/// The decisions for one call: kernel specialization and grid.
#[derive(Clone, Copy, Debug)]
pub struct FlashPlan {
    pub key: FlashKey,
    pub grid: [u32; 3],
    /// Neighborhood calls: how query tiles cover the spatial grid.
    pub na: Option<NaGrid>,
    /// Neighborhood calls: the axes as the kernel takes them (Sweep moves unit axes back).
    pub na_spec: Option<NaSpec>,
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
    fn new(spec: &NaSpec, sub_rows: u32, wg_rows: u32) -> Self {
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
    fn sweep(spec: &NaSpec, lanes: u32, wg_lanes: u32) -> Self {
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

/// The head-dim bucket for `d`, or `None` when `d` is 0 or over [`MAX_HEAD_DIM`].
pub fn head_dim_bucket(d: usize) -> Option<u32> {
    HEAD_DIM_BUCKETS
        .iter()
        .copied()
        .find(|&b| d >= 1 && d <= b as usize)
}

fn register_budget(strategy: Strategy) -> u32 {
    match strategy {
        Strategy::Tiled => REGISTER_BUDGET_VEC4[0],
        Strategy::Subgroup | Strategy::Sweep => REGISTER_BUDGET_VEC4[1],
    }
}

/// The kernel specialization the plan picks for a strategy, dtype, head-dim buckets and (for the
/// subgroup strategy) the adapter's subgroup size range. The only producer of `FlashKey`s.
pub fn flash_key(
    strategy: Strategy,
    dtype: DType,
    d_bucket: u32,
    dv_bucket: u32,
    subgroup: (u32, u32),
    mods: bool,
    na: bool,
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
                na,
                pins: 0,
            }
        }
        Strategy::Subgroup | Strategy::Sweep => {
            let (_min, max) = subgroup;
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
                na,
                pins: 0,
            }
        }
    }
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
    let mut key = flash_key(
        Strategy::Subgroup,
        dtype,
        d_bucket,
        dv_bucket,
        subgroup,
        false,
        true,
    );
    key.strategy = Strategy::Sweep;
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

/// Every flash specialization as a [`Kernel`] (for the host layer's registry).
pub fn all_kernels() -> Vec<Box<dyn Kernel>> {
    all_flash_keys()
        .into_iter()
        .map(|k| Box::new(k) as Box<dyn Kernel>)
        .collect()
}

/// Every flash specialization the host can build, on any adapter (for naga tests).
pub fn all_flash_keys() -> Vec<FlashKey> {
    let sizes = [4u32, 8, 16, 32, 64, 128];
    let mut sg_ranges = Vec::new();
    for &lo in &sizes {
        for &hi in sizes.iter().filter(|&&h| h >= lo) {
            sg_ranges.push((lo, hi));
        }
    }
    let mut keys = Vec::new();
    for dtype in [DType::F32, DType::F16] {
        for &d in &HEAD_DIM_BUCKETS {
            for &dv in &HEAD_DIM_BUCKETS {
                // neighborhood kernels have no score modifications
                for (mods, na) in [(false, false), (true, false), (false, true)] {
                    keys.push(flash_key(Strategy::Tiled, dtype, d, dv, (0, 0), mods, na));
                    for &r in &sg_ranges {
                        keys.push(flash_key(Strategy::Subgroup, dtype, d, dv, r, mods, na));
                    }
                }
            }
        }
    }
    for dtype in [DType::F32, DType::F16] {
        for &d in &HEAD_DIM_BUCKETS {
            if d > SWEEP_MAX_DIM {
                continue;
            }
            for slots in 2..=SWEEP_MAX_SLOTS {
                for causal in [false, true] {
                    for &r in &sg_ranges {
                        keys.push(sweep_key(dtype, d, d, r, slots, causal));
                    }
                }
            }
        }
    }
    keys.sort_by_key(|k| k.label());
    keys.dedup();
    keys
}

/// Picks the strategy and specialization for this adapter and problem.
pub fn plan(
    ctx: &GpuContext,
    shape: &AttnShape,
    dtype: DType,
    opts: &FlashOptions,
) -> Result<FlashPlan> {
    plan_with(ctx, shape, dtype, opts, None)
}

/// [`plan`], for a neighborhood problem when `na` is given.
pub fn plan_with(
    ctx: &GpuContext,
    shape: &AttnShape,
    dtype: DType,
    opts: &FlashOptions,
    na: Option<&NaSpec>,
) -> Result<FlashPlan> {
    let choice = opts.strategy;
    let mods = opts.softcap.is_some() || opts.alibi_slopes.is_some() || opts.bias.is_some();
    let sinks = opts.sinks;
    let d_bucket = head_dim_bucket(shape.d).ok_or(AttnError::HeadDim {
        what: "D (q/k head dim)",
        got: shape.d,
        max: MAX_HEAD_DIM,
    })?;
    let dv_bucket = head_dim_bucket(shape.dv).ok_or(AttnError::HeadDim {
        what: "Dv (v head dim)",
        got: shape.dv,
        max: MAX_HEAD_DIM,
    })?;
    let caps = &ctx.caps;
    let sg_ok = caps.subgroups
        && caps.subgroup_min >= 2
        && caps.subgroup_max <= 128
        && caps.subgroup_min <= caps.subgroup_max;
    let sweep = na.map(|spec| sweep_layout(spec, d_bucket, dv_bucket));
    let strategy = match choice {
        StrategyChoice::Auto if caps.cpu && sg_ok && matches!(sweep, Some(Ok(_))) => {
            Strategy::Sweep
        }
        StrategyChoice::Auto if caps.cpu && sg_ok => Strategy::Subgroup,
        StrategyChoice::Auto => Strategy::Tiled,
        StrategyChoice::Force(s @ (Strategy::Subgroup | Strategy::Sweep)) if !sg_ok => {
            return Err(AttnError::MissingFeature {
                feature: "SUBGROUP (with subgroup sizes 2..=128)",
                adapter: ctx.adapter_info.name.clone(),
                needed_for: format!("the {s:?} strategy"),
            })
        }
        StrategyChoice::Force(Strategy::Sweep) => match &sweep {
            Some(Ok(_)) => Strategy::Sweep,
            Some(Err(why)) => {
                return Err(AttnError::invalid(
                    "strategy Sweep",
                    why.clone(),
                    "this problem",
                ))
            }
            None => {
                return Err(AttnError::invalid(
                    "strategy Sweep",
                    "a neighborhood call",
                    "flash attention",
                ))
            }
        },
        StrategyChoice::Force(s) => s,
    };
    let na = match (&sweep, strategy) {
        (Some(Ok(rotated)), Strategy::Sweep) => Some(*rotated),
        _ => na.copied(),
    };
    let na = na.as_ref();
    let key = match (strategy, na) {
        (Strategy::Sweep, Some(spec)) => sweep_key(
            dtype,
            d_bucket,
            dv_bucket,
            (caps.subgroup_min, caps.subgroup_max),
            spec.axes[0].kernel as u32,
            spec.axes[0].causal,
        ),
        _ => flash_key(
            strategy,
            dtype,
            d_bucket,
            dv_bucket,
            (caps.subgroup_min, caps.subgroup_max),
            mods,
            na.is_some(),
        ),
    };
    let na_grid = na.map(|spec| {
        let grid = match strategy {
            Strategy::Subgroup => {
                NaGrid::new(spec, caps.subgroup_max * key.rows, key.rows_per_workgroup())
            }
            Strategy::Tiled => {
                NaGrid::new(spec, key.rows_per_workgroup(), key.rows_per_workgroup())
            }
            Strategy::Sweep => NaGrid::sweep(spec, caps.subgroup_max, key.wg),
        };
        (spec, grid)
    });
    if let Some(limit) = caps.loop_limit {
        // Trip count of the key loops in one invocation (everything else is unrolled).
        let (block, group) = match strategy {
            Strategy::Tiled => (key.block as u64, key.group as u64),
            Strategy::Subgroup | Strategy::Sweep => (caps.subgroup_min as u64, key.group as u64),
        };
        let trips = match na_grid {
            // x planes (the sweep, then the border queries' planes), each a pass over its
            // union box in blocks
            Some((spec, g)) if strategy == Strategy::Sweep => {
                let box_keys: u64 = (1..3)
                    .map(|a| {
                        let ax = spec.axes[a];
                        (ax.n.div_ceil(ax.dilation) as u64)
                            .min(g.sub[a] as u64 + (ax.kernel + ax.stride) as u64)
                    })
                    .product();
                let x = spec.axes[0];
                let planes = x.n.div_ceil(x.dilation) as u64 + x.kernel as u64 + 2;
                planes * ((box_keys.div_ceil(block) + 1) * (1 + block / group) + 1)
            }
            // one pass over the flattened key box, in blocks
            Some((spec, g)) => {
                let tile = g.tile();
                let keys: u64 = (0..3)
                    .map(|a| {
                        let ax = spec.axes[a];
                        (ax.n.div_ceil(ax.dilation) as u64)
                            .min(tile[a] as u64 + (ax.kernel + ax.stride) as u64)
                    })
                    .product();
                (keys.div_ceil(block) + 1) * (1 + block / group) + 1
            }
            // the window pass, the sinks pass, and one partial block each
            None => {
                let blocks = (shape.lk as u64).div_ceil(block) + (sinks as u64).div_ceil(block) + 2;
                blocks * (1 + block / group)
            }
        };
        // a margin for the loops outside the key loops (and a limit under it refuses all)
        let usable = limit.saturating_sub(64);
        if trips > usable {
            return Err(AttnError::Limit {
                what: format!(
                    "loop iterations per invocation for Lk = {} ({} driver stops loops silently)",
                    shape.lk, ctx.adapter_info.driver
                ),
                needed: trips,
                limit: usable,
            });
        }
    }
    let x = match na_grid {
        Some((spec, g)) => spec
            .axes
            .iter()
            .map(|a| a.dilation as u64)
            .product::<u64>()
            .saturating_mul(g.per_group() as u64),
        None => (shape.lq as u64).div_ceil(key.rows_per_workgroup() as u64),
    };
    let grid = [
        u32::try_from(x).unwrap_or(u32::MAX),
        shape.hq as u32,
        shape.batch as u32,
    ];
    let max = ctx.limits.max_compute_workgroups_per_dimension;
    if let Some(&g) = grid.iter().find(|&&g| g > max) {
        return Err(AttnError::Limit {
            what: "workgroups per dispatch dimension".into(),
            needed: g as u64,
            limit: max as u64,
        });
    }
    Ok(FlashPlan {
        key,
        grid,
        na: na_grid.map(|(_, g)| g),
        na_spec: na.copied(),
    })
}

fn dims4(t: &Tensor, what: &str) -> Result<[usize; 4]> {
    t.shape()
        .try_into()
        .map_err(|_| AttnError::shape(what, "rank 4 [batch, seq, heads, dim]", t.shape()))
}

fn strides_u32(t: &Tensor) -> Result<[u32; 4]> {
    let s = t.strides();
    let conv = |x: usize| {
        u32::try_from(x).map_err(|_| AttnError::Limit {
            what: "tensor stride".into(),
            needed: x as u64,
            limit: u32::MAX as u64,
        })
    };
    Ok([conv(t.offset())?, conv(s[0])?, conv(s[1])?, conv(s[2])?])
}

/// Checks shapes and dtypes and returns the problem sizes.
pub fn check_inputs(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<AttnShape> {
    let [b, lq, hq, d] = dims4(q, "q")?;
    let [bk, lk, hkv, dk] = dims4(k, "k")?;
    let [bv, lv, hv, dv] = dims4(v, "v")?;
    if (bk, dk) != (b, d) {
        return Err(AttnError::shape(
            "k",
            format!("[{b}, Lk, Hkv, {d}] (batch and head dim of q)"),
            k.shape(),
        ));
    }
    if (bv, lv, hv) != (b, lk, hkv) {
        return Err(AttnError::shape(
            "v",
            format!("[{b}, {lk}, {hkv}, Dv] (batch, length and heads of k)"),
            v.shape(),
        ));
    }
    if [b, lq, hq, lk, hkv].contains(&0) {
        return Err(AttnError::shape(
            "q/k",
            "non-zero batch, lengths and heads",
            (q.shape(), k.shape()),
        ));
    }
    if hq % hkv != 0 {
        return Err(AttnError::invalid(
            "heads",
            format!("Hq a multiple of Hkv = {hkv}"),
            format!("Hq = {hq}"),
        ));
    }
    if k.dtype() != q.dtype() || v.dtype() != q.dtype() {
        return Err(AttnError::DType {
            what: "q, k, v".into(),
            expected: format!("one dtype ({} as q)", q.dtype()),
            actual: format!("q {}, k {}, v {}", q.dtype(), k.dtype(), v.dtype()),
        });
    }
    Ok(AttnShape {
        batch: b,
        lq,
        lk,
        hq,
        hkv,
        d,
        dv,
    })
}

fn check_lens(lens: &Option<Vec<u32>>, what: &str, batch: usize, max: usize) -> Result<()> {
    if let Some(l) = lens {
        if l.len() != batch {
            return Err(AttnError::shape(
                what,
                format!("[{batch}] (one per batch)"),
                [l.len()],
            ));
        }
        if let Some(&bad) = l.iter().find(|&&x| x as usize > max) {
            return Err(AttnError::invalid(what, format!("lengths <= {max}"), bad));
        }
    }
    Ok(())
}

/// Everything a dispatch needs, checked.
struct Prepared {
    plan: FlashPlan,
    /// Sweep: Q, K and V textures with their texel counts, filled by copies before the pass.
    textures: Option<[(wgpu::Texture, u64); 3]>,
    bind_group: wgpu::BindGroup,
    pipeline: std::sync::Arc<wgpu::ComputePipeline>,
}

/// The texels of a Q/K/V texture that holds tensor `t`'s whole buffer, or why it cannot: the
/// Sweep kernel reads element `e` as component `e % 4` of texel `e / 4`, so a head-dim run
/// must start on a texel (offset and strides multiples of 4 elements).
fn texture_texels(ctx: &GpuContext, t: &Tensor) -> std::result::Result<u64, String> {
    let texel_bytes = 4 * t.dtype().size() as u64;
    let (offset, strides) = (t.offset(), t.strides());
    if !offset.is_multiple_of(4) || strides.iter().any(|&s| !s.is_multiple_of(4) && s != 1) {
        return Err(format!(
            "Q/K/V offsets and strides that are multiples of 4 elements (got offset {offset}, strides {strides:?})"
        ));
    }
    let buf = t.buffer();
    if !buf.usage().contains(wgpu::BufferUsages::COPY_SRC) {
        return Err("Q/K/V buffers with COPY_SRC usage".into());
    }
    if !buf.size().is_multiple_of(texel_bytes) {
        return Err(format!(
            "Q/K/V buffers of whole texels of 4 elements ({texel_bytes} bytes; got {} bytes)",
            buf.size()
        ));
    }
    let texels = buf.size() / texel_bytes;
    let max_rows = ctx.limits.max_texture_dimension_2d as u64;
    if TEXTURE_WIDTH as u64 > max_rows || texels.div_ceil(TEXTURE_WIDTH as u64) > max_rows {
        return Err(format!(
            "Q/K/V buffers of at most {} texels of 4 elements (max_texture_dimension_2d {max_rows}; got {texels})",
            (TEXTURE_WIDTH as u64).saturating_mul(max_rows)
        ));
    }
    Ok(texels)
}

/// Copies a buffer into a Q/K/V texture row by row: the full rows, then the partial last one.
fn copy_to_texture(
    encoder: &mut wgpu::CommandEncoder,
    buffer: &wgpu::Buffer,
    texture: &wgpu::Texture,
    texels: u64,
    texel_bytes: u64,
) {
    let width = TEXTURE_WIDTH as u64;
    let (full, rest) = (texels / width, texels % width);
    let layout = |offset| wgpu::TexelCopyBufferLayout {
        offset,
        bytes_per_row: Some((width * texel_bytes) as u32),
        rows_per_image: None,
    };
    // rows and widths fit u32: the texture was created with them
    for (row, rows, cols) in [(0, full, width), (full, (rest > 0) as u64, rest)] {
        if rows == 0 {
            continue;
        }
        encoder.copy_buffer_to_texture(
            wgpu::TexelCopyBufferInfo {
                buffer,
                layout: layout(row * width * texel_bytes),
            },
            wgpu::TexelCopyTextureInfo {
                texture,
                mip_level: 0,
                origin: wgpu::Origin3d {
                    x: 0,
                    y: row as u32,
                    z: 0,
                },
                aspect: wgpu::TextureAspect::All,
            },
            wgpu::Extent3d {
                width: cols as u32,
                height: rows as u32,
                depth_or_array_layers: 1,
            },
        );
    }
}

/// A tensor's bytes as a binding: the sub-range its view spans, started on the adapter's
/// storage-offset alignment (so a view into a pooled allocation binds without the whole
/// buffer), and the element offset of the view inside that range.
struct BoundRange<'a> {
    buffer: &'a wgpu::Buffer,
    offset: u64,
    size: u64,
    elem_offset: u32,
}

impl<'a> BoundRange<'a> {
    fn new(ctx: &GpuContext, t: &'a Tensor, what: &str) -> Result<Self> {
        t.require_usage(what, wgpu::BufferUsages::STORAGE)?;
        let (start, end) = t.byte_range();
        let align = u64::from(ctx.limits.min_storage_buffer_offset_alignment.max(4));
        let offset = start / align * align;
        // storage bindings are whole 4-byte words
        let end = end.div_ceil(4) * 4;
        if end > t.buffer().size() {
            return Err(AttnError::invalid(
                format!("{what} buffer"),
                format!("at least {end} bytes (the view's last element, rounded up to 4 bytes)"),
                format!("{} bytes", t.buffer().size()),
            ));
        }
        let size = (end - offset).max(4);
        ctx.check_binding(what, size)?;
        let elem_offset =
            u32::try_from((start - offset) / t.dtype().size() as u64).map_err(|_| {
                AttnError::invalid(what, "a storage offset alignment under 4 GiB", align)
            })?;
        Ok(BoundRange {
            buffer: t.buffer(),
            offset,
            size,
            elem_offset,
        })
    }

    fn whole(buffer: &'a wgpu::Buffer) -> Self {
        BoundRange {
            buffer,
            offset: 0,
            size: buffer.size(),
            elem_offset: 0,
        }
    }

    fn entry(&self, binding: u32) -> wgpu::BindGroupEntry<'a> {
        wgpu::BindGroupEntry {
            binding,
            resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                buffer: self.buffer,
                offset: self.offset,
                size: std::num::NonZeroU64::new(self.size),
            }),
        }
    }
}

/// Outputs must not share a buffer with an input or with each other: wgpu refuses one buffer
/// bound read-only and writable in one dispatch, and two outputs over the same bytes race.
fn check_no_alias(inputs: &[(&str, &Tensor)], outputs: &[(&str, &Tensor)]) -> Result<()> {
    for (i, (name, o)) in outputs.iter().enumerate() {
        let others = inputs.iter().chain(&outputs[..i]);
        if let Some((other, _)) = others.into_iter().find(|(_, t)| t.buffer() == o.buffer()) {
            return Err(AttnError::invalid(
                *name,
                "a buffer of its own (outputs may not share a buffer with an input or another output)",
                format!("the buffer of {other}"),
            ));
        }
        if !o.is_non_overlapping() {
            return Err(AttnError::invalid(
                format!("{name} strides"),
                "strides under which no two elements share memory (no zero or interleaved strides)",
                format!("shape {:?} strides {:?}", o.shape(), o.strides()),
            ));
        }
    }
    Ok(())
}

/// What the checks of one call produce: sizes, flags and the values of the uniforms that do
/// not depend on the plan.
struct Checked {
    s: AttnShape,
    flags: u32,
    scale: f32,
    win_left: i32,
    win_right: i32,
    /// Bias strides (batch, head, query), broadcast axes at 0; the offset comes from its binding.
    bias_strides: [u32; 3],
    /// Per-batch q lengths then kv lengths, empty when neither is given.
    lens: Vec<u32>,
}

/// Step 1 of a call: every check of the inputs, outputs and options, before anything is built.
#[allow(clippy::too_many_arguments)]
fn check_call(
    ctx: &GpuContext,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    out: &Tensor,
    lse: Option<&Tensor>,
    opts: &FlashOptions,
    na: Option<&NaSpec>,
) -> Result<Checked> {
    let s = check_inputs(q, k, v)?;
    let expect_o = [s.batch, s.lq, s.hq, s.dv];
    if out.shape() != expect_o {
        return Err(AttnError::shape(
            "out",
            format!("{expect_o:?}"),
            out.shape(),
        ));
    }
    if out.dtype() != q.dtype() {
        return Err(AttnError::DType {
            what: "out".into(),
            expected: q.dtype().to_string(),
            actual: out.dtype().to_string(),
        });
    }
    if q.dtype() == DType::F16 && !ctx.caps.f16 {
        return Err(AttnError::MissingFeature {
            feature: "SHADER_F16",
            adapter: ctx.adapter_info.name.clone(),
            needed_for: "f16 attention".into(),
        });
    }
    let mut fl = 0;
    if let Some(spec) = na {
        if s.lq != spec.len() || s.lk != spec.len() {
            return Err(AttnError::shape(
                "q/k tokens",
                format!("{} (the neighborhood grid)", spec.len()),
                (s.lq, s.lk),
            ));
        }
    }
    if let Some(l) = lse {
        // [B, Hq, Lq]; neighborhood calls pass NATTEN's heads-last [B, L, Hq]
        let expect = match na {
            None => [s.batch, s.hq, s.lq],
            Some(_) => [s.batch, s.lq, s.hq],
        };
        if l.shape() != expect || l.dtype() != DType::F32 {
            return Err(AttnError::shape(
                "lse",
                format!("{expect:?} f32"),
                (l.shape(), l.dtype()),
            ));
        }
        fl |= flags::LSE;
    }
    let mut inputs = vec![("q", q), ("k", k), ("v", v)];
    if let Some(b) = &opts.bias {
        inputs.push(("bias", b));
    }
    let mut outputs = vec![("out", out)];
    outputs.extend(lse.map(|l| ("lse", l)));
    check_no_alias(&inputs, &outputs)?;
    let scale = opts.scale.unwrap_or(1.0 / (s.d as f32).sqrt());
    if !scale.is_finite() {
        return Err(AttnError::invalid("scale", "a finite number", scale));
    }
    if opts.causal {
        fl |= flags::CAUSAL;
    }
    if let Some(c) = opts.softcap {
        if !(c > 0.0 && c.is_finite()) {
            return Err(AttnError::invalid("softcap", "a finite value > 0", c));
        }
        fl |= flags::SOFTCAP;
    }
    if let Some(a) = &opts.alibi_slopes {
        if a.len() != s.hq {
            return Err(AttnError::shape(
                "alibi_slopes",
                format!("[{}] (one per query head)", s.hq),
                [a.len()],
            ));
        }
        fl |= flags::ALIBI;
    }
    check_lens(&opts.q_lens, "q_lens", s.batch, s.lq)?;
    check_lens(&opts.kv_lens, "kv_lens", s.batch, s.lk)?;
    if opts.q_lens.is_some() {
        fl |= flags::Q_LENS;
    }
    if opts.kv_lens.is_some() {
        fl |= flags::KV_LENS;
    }
    let lens: Vec<u32> = match (&opts.q_lens, &opts.kv_lens) {
        (None, None) => Vec::new(),
        (ql, kl) => {
            // lengths fit u32: check_inputs bounded the sizes by the u32 element index
            let mut v = ql.clone().unwrap_or_else(|| vec![s.lq as u32; s.batch]);
            v.extend(kl.clone().unwrap_or_else(|| vec![s.lk as u32; s.batch]));
            v
        }
    };
    let (wl, wr) = opts.window;
    let to_i32 = |x: u32, what: &str| {
        i32::try_from(x).map_err(|_| AttnError::invalid(what, "<= i32::MAX", x))
    };
    let win_left = match wl {
        Some(x) => {
            fl |= flags::WINDOW_LEFT;
            to_i32(x, "window left")?
        }
        None => 0,
    };
    let win_right = match wr {
        Some(x) => {
            fl |= flags::WINDOW_RIGHT;
            to_i32(x, "window right")?
        }
        None => 0,
    };
    let mut bias_strides = [0u32; 3];
    if let Some(bias) = &opts.bias {
        let sh = bias.shape();
        let ok = sh.len() == 4
            && (sh[0] == s.batch || sh[0] == 1)
            && (sh[1] == s.hq || sh[1] == 1)
            && sh[2] == s.lq
            && sh[3] == s.lk;
        if !ok || bias.dtype() != DType::F32 {
            return Err(AttnError::shape(
                "bias",
                format!("[{}|1, {}|1, {}, {}] f32", s.batch, s.hq, s.lq, s.lk),
                (sh, bias.dtype()),
            ));
        }
        let st = strides_u32(bias)?;
        let bcast = |n: usize, st: u32| if n == 1 { 0 } else { st };
        bias_strides = [bcast(sh[0], st[1]), bcast(sh[1], st[2]), st[3]];
        fl |= flags::BIAS;
    }
    Ok(Checked {
        s,
        flags: fl,
        scale,
        win_left,
        win_right,
        bias_strides,
        lens,
    })
}

/// Step 2: the plan, re-made with the Subgroup kernel where the Sweep kernel cannot copy these
/// tensors into textures (or an error when Sweep was forced); with the texel counts of the
/// Q/K/V textures when it can.
#[allow(clippy::type_complexity)]
fn plan_call(
    ctx: &GpuContext,
    c: &Checked,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    opts: &FlashOptions,
    na: Option<&NaSpec>,
) -> Result<(FlashPlan, Option<[u64; 3]>)> {
    let plan = plan_with(ctx, &c.s, q.dtype(), opts, na)?;
    if plan.key.strategy != Strategy::Sweep {
        return Ok((plan, None));
    }
    let counts = [q, k, v].map(|t| texture_texels(ctx, t));
    match counts.iter().find_map(|c| c.as_ref().err()).cloned() {
        None => Ok((plan, Some(counts.map(|c| c.unwrap_or(0))))),
        Some(_) if opts.strategy == StrategyChoice::Auto => {
            let mut o = opts.clone();
            o.strategy = StrategyChoice::Force(Strategy::Subgroup);
            Ok((plan_with(ctx, &c.s, q.dtype(), &o, na)?, None))
        }
        Some(why) => Err(AttnError::invalid(
            "strategy Sweep",
            why,
            "these Q/K/V tensors",
        )),
    }
}

/// Step 3: the uniforms, from the checks, the plan and where each tensor's view starts in its
/// binding (`offsets`: q, k, v, out, lse, bias in elements).
fn flash_params(
    c: &Checked,
    plan: &FlashPlan,
    t: [&Tensor; 4],
    offsets: [u32; 6],
) -> Result<FlashParams> {
    let s = &c.s;
    let mut fl = c.flags;
    let u = |x: usize| x as u32; // axis sizes are at most the token count, which fits u32
    let (mut na_n, mut na_kernel, mut na_dil, mut na_stride) = ([0; 4], [0; 4], [0; 4], [0; 4]);
    let (mut na_sub, mut na_wgrid, mut na_tiles) = ([0; 4], [0; 4], [0; 4]);
    if let (Some(spec), Some(g)) = (plan.na_spec, plan.na) {
        for (a, ax) in spec.axes.iter().enumerate() {
            if ax.causal {
                fl |= flags::NA_CAUSAL << a;
            }
            na_n[a] = u(ax.n);
            na_kernel[a] = u(ax.kernel);
            na_dil[a] = u(ax.dilation);
            na_stride[a] = u(ax.stride);
            na_sub[a] = g.sub[a];
            na_wgrid[a] = g.wgrid[a];
            na_tiles[a] = g.tiles[a];
        }
        na_n[3] = g.per_group();
        na_sub[3] = g.sub.iter().product();
        na_wgrid[3] = g.wgrid.iter().product();
    }
    let with_offset = |t: &Tensor, off: u32| -> Result<[u32; 4]> {
        let [_, b, l, h] = strides_u32(t)?;
        Ok([off, b, l, h])
    };
    let [q, k, v, out] = t;
    let [bb, bh, bq] = c.bias_strides;
    Ok(FlashParams {
        batch: s.batch as u32,
        hq: s.hq as u32,
        hkv: s.hkv as u32,
        lq: s.lq as u32,
        lk: s.lk as u32,
        d: s.d as u32,
        dv: s.dv as u32,
        flags: fl,
        q: with_offset(q, offsets[0])?,
        k: with_offset(k, offsets[1])?,
        v: with_offset(v, offsets[2])?,
        o: with_offset(out, offsets[3])?,
        bias: [offsets[5], bb, bh, bq],
        scale: c.scale,
        softcap: 1.0,
        win_left: c.win_left,
        win_right: c.win_right,
        kv_start: 0,
        kv_end: s.lk as u32,
        sinks: 0,
        _pad: 0,
        lse: [offsets[4], 0, 0, 0],
        na_n,
        na_kernel,
        na_dil,
        na_stride,
        na_sub,
        na_wgrid,
        na_tiles,
    })
}

#[allow(clippy::too_many_arguments)]
fn prepare(
    ctx: &GpuContext,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    out: &Tensor,
    lse: Option<&Tensor>,
    opts: &FlashOptions,
    na: Option<&NaSpec>,
) -> Result<Prepared> {
    // 1. checks
    let c = check_call(ctx, q, k, v, out, lse, opts, na)?;
    // 2. plan
    let (plan, texels) = plan_call(ctx, &c, q, k, v, opts, na)?;
    // 3. params: each tensor binds the sub-range its view spans
    let ranges =
        [(q, "q"), (k, "k"), (v, "v"), (out, "out")].map(|(t, what)| BoundRange::new(ctx, t, what));
    let [rq, rk, rv, ro] = ranges;
    let (rq, rk, rv, ro) = (rq?, rk?, rv?, ro?);
    let rl = lse.map(|l| BoundRange::new(ctx, l, "lse")).transpose()?;
    let rb = opts
        .bias
        .as_ref()
        .map(|b| BoundRange::new(ctx, b, "bias"))
        .transpose()?;
    // the Sweep kernel reads Q/K/V from textures holding their whole buffers
    let qkv_offset = |r: &BoundRange, t: &Tensor| {
        if texels.is_some() {
            t.offset() as u32 // < u32::MAX: with_layout bounds every index
        } else {
            r.elem_offset
        }
    };
    let offsets = [
        qkv_offset(&rq, q),
        qkv_offset(&rk, k),
        qkv_offset(&rv, v),
        ro.elem_offset,
        rl.as_ref().map_or(0, |r| r.elem_offset),
        rb.as_ref().map_or(0, |r| r.elem_offset),
    ];
    let mut params = flash_params(&c, &plan, [q, k, v, out], offsets)?;
    params.softcap = opts.softcap.unwrap_or(1.0);
    params.sinks = opts.sinks;
    if let Some(l) = lse {
        // LSE strides as (batch, head, query): [B, Hq, Lq], or [B, L, Hq] for neighborhoods
        let st = l.strides();
        let conv = |x: usize| u32::try_from(x).unwrap_or(u32::MAX);
        params.lse[1] = conv(st[0]);
        (params.lse[2], params.lse[3]) = match na {
            None => (conv(st[1]), conv(st[2])),
            Some(_) => (conv(st[2]), conv(st[1])),
        };
    }
    // 4. resources
    ctx.scoped(|| {
        let pipeline = ctx.pipeline(&plan.key)?;
        let dev = &ctx.device;
        let init = |label: &str, contents: &[u8], usage| {
            dev.create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some(label),
                contents,
                usage,
            })
        };
        let params_buf = init(
            "flash params",
            bytemuck::bytes_of(&params),
            wgpu::BufferUsages::UNIFORM,
        );
        let alibi_buf = opts.alibi_slopes.as_ref().map(|a| {
            init(
                "alibi slopes",
                bytemuck::cast_slice(a),
                wgpu::BufferUsages::STORAGE,
            )
        });
        let lens_buf = (!c.lens.is_empty()).then(|| {
            init(
                "seq lens",
                bytemuck::cast_slice(&c.lens),
                wgpu::BufferUsages::STORAGE,
            )
        });
        let textures = texels.map(|counts| make_textures(ctx, q.dtype(), counts));
        let views = textures.as_ref().map(|ts| {
            ts.each_ref()
                .map(|(t, _)| t.create_view(&wgpu::TextureViewDescriptor::default()))
        });
        let dummy = BoundRange::whole(&ctx.dummy);
        let mut entries = vec![
            BoundRange::whole(&params_buf).entry(0),
            rq.entry(1),
            rk.entry(2),
            rv.entry(3),
            ro.entry(4),
            rl.as_ref()
                .unwrap_or(&BoundRange::whole(&ctx.dummy_rw))
                .entry(5),
            rb.as_ref().unwrap_or(&dummy).entry(6),
            alibi_buf
                .as_ref()
                .map_or(dummy.entry(7), |b| BoundRange::whole(b).entry(7)),
            lens_buf
                .as_ref()
                .map_or(dummy.entry(8), |b| BoundRange::whole(b).entry(8)),
        ];
        for (binding, view) in (9..).zip(views.iter().flatten()) {
            entries.push(wgpu::BindGroupEntry {
                binding,
                resource: wgpu::BindingResource::TextureView(view),
            });
        }
        let bind_group = dev.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some("flash bind group"),
            layout: &pipeline.get_bind_group_layout(0),
            entries: &entries,
        });
        Ok(Prepared {
            plan,
            textures,
            bind_group,
            pipeline,
        })
    })
}

/// The Sweep kernel's Q, K and V textures, 4096 texels a row, with their texel counts.
fn make_textures(ctx: &GpuContext, dtype: DType, counts: [u64; 3]) -> [(wgpu::Texture, u64); 3] {
    let format = match dtype {
        DType::F32 => wgpu::TextureFormat::Rgba32Float,
        DType::F16 => wgpu::TextureFormat::Rgba16Float,
    };
    let make = |label, texels: u64| {
        let tex = ctx.device.create_texture(&wgpu::TextureDescriptor {
            label: Some(label),
            size: wgpu::Extent3d {
                width: TEXTURE_WIDTH,
                // rows within max_texture_dimension_2d (checked): the cast cannot truncate
                height: texels.div_ceil(TEXTURE_WIDTH as u64) as u32,
                depth_or_array_layers: 1,
            },
            mip_level_count: 1,
            sample_count: 1,
            dimension: wgpu::TextureDimension::D2,
            format,
            usage: wgpu::TextureUsages::TEXTURE_BINDING | wgpu::TextureUsages::COPY_DST,
            view_formats: &[],
        });
        (tex, texels)
    };
    let [tq, tk, tv] = counts;
    [
        make("flash Q texture", tq),
        make("flash K texture", tk),
        make("flash V texture", tv),
    ]
}

/// Records the attention into `encoder` (for embedders that batch their own work).
/// `timestamps` writes the pass's begin and end into a query set (see `bench`).
#[allow(clippy::too_many_arguments)]
pub fn encode_flash_attention(
    ctx: &GpuContext,
    encoder: &mut wgpu::CommandEncoder,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    out: &Tensor,
    lse: Option<&Tensor>,
    opts: &FlashOptions,
    timestamps: Option<(&wgpu::QuerySet, u32)>,
) -> Result<FlashPlan> {
    encode_with(ctx, encoder, q, k, v, out, lse, opts, None, timestamps)
}

/// [`encode_flash_attention`] with the neighborhood mask when `na` is given (`q`, `k`, `v`,
/// `out` flattened to `[B, L, H, D]`, `lse` to `[B, L, Hq]`).
#[allow(clippy::too_many_arguments)]
pub(crate) fn encode_with(
    ctx: &GpuContext,
    encoder: &mut wgpu::CommandEncoder,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    out: &Tensor,
    lse: Option<&Tensor>,
    opts: &FlashOptions,
    na: Option<&NaSpec>,
    timestamps: Option<(&wgpu::QuerySet, u32)>,
) -> Result<FlashPlan> {
    let prep = prepare(ctx, q, k, v, out, lse, opts, na)?;
    let copied = prep.textures.is_some();
    if let Some(textures) = &prep.textures {
        // The timed region covers the copies: an empty pass writes the first timestamp.
        if let Some((set, i)) = timestamps {
            drop(encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some("flash attention: Q/K/V copies"),
                timestamp_writes: Some(wgpu::ComputePassTimestampWrites {
                    query_set: set,
                    beginning_of_pass_write_index: Some(i),
                    end_of_pass_write_index: None,
                }),
            }));
        }
        let texel_bytes = 4 * q.dtype().size() as u64;
        for (t, (tex, texels)) in [q, k, v].into_iter().zip(textures) {
            copy_to_texture(encoder, t.buffer(), tex, *texels, texel_bytes);
        }
    }
    let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
        label: Some("flash attention"),
        timestamp_writes: timestamps.map(|(set, i)| wgpu::ComputePassTimestampWrites {
            query_set: set,
            beginning_of_pass_write_index: (!copied).then_some(i),
            end_of_pass_write_index: Some(i + 1),
        }),
    });
    pass.set_pipeline(&prep.pipeline);
    pass.set_bind_group(0, &prep.bind_group, &[]);
    let [x, y, z] = prep.plan.grid;
    pass.dispatch_workgroups(x, y, z);
    drop(pass);
    Ok(prep.plan)
}

/// Runs attention into caller-provided output tensors and submits the work.
pub fn flash_attention_into(
    ctx: &GpuContext,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    out: &Tensor,
    lse: Option<&Tensor>,
    opts: &FlashOptions,
) -> Result<FlashPlan> {
    ctx.submit(|enc| encode_flash_attention(ctx, enc, q, k, v, out, lse, opts, None))
}

/// Runs attention and returns new O (and LSE when `opts.return_lse`).
pub fn flash_attention(
    ctx: &GpuContext,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    opts: &FlashOptions,
) -> Result<AttentionOutput> {
    let s = check_inputs(q, k, v)?;
    let out = Tensor::filled(ctx, &[s.batch, s.lq, s.hq, s.dv], q.dtype(), 0.0)?;
    let lse = if opts.return_lse {
        Some(Tensor::filled(
            ctx,
            &[s.batch, s.hq, s.lq],
            DType::F32,
            0.0,
        )?)
    } else {
        None
    };
    flash_attention_into(ctx, q, k, v, &out, lse.as_ref(), opts)?;
    Ok(AttentionOutput { out, lse })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_fits_the_webgpu_default_workgroup_memory_and_budgets() {
        for k in all_flash_keys() {
            assert!(k.workgroup_bytes() <= TILE_BUDGET_BYTES, "{k:?}");
            assert!(k.rows >= 1 && k.group >= 1, "{k:?}");
            // the Sweep kernel's slots are its own budget: SWEEP_MAX_SLOTS at SWEEP_MAX_DIM
            let budget = match k.strategy {
                Strategy::Sweep => SWEEP_MAX_SLOTS * SWEEP_MAX_DIM / 2,
                s => register_budget(s),
            };
            assert!(k.rows * (k.d4 + k.dv4) <= budget || k.rows == 1, "{k:?}");
            if k.strategy == Strategy::Tiled {
                assert!(k.block.is_multiple_of(k.group), "{k:?}");
            }
        }
    }

    #[test]
    fn head_dim_buckets_cover_every_d_up_to_512() {
        for d in 1..=MAX_HEAD_DIM {
            let b = head_dim_bucket(d).unwrap() as usize;
            assert!(b >= d && b.is_multiple_of(4), "{d} -> {b}");
        }
        assert_eq!(head_dim_bucket(0), None);
        assert_eq!(head_dim_bucket(MAX_HEAD_DIM + 1), None);
    }
}
