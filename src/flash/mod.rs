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
use crate::pipeline::{BindingKind, Kernel};
use crate::softmax::shader::{flags, FlashKey, FlashParams, Strategy};
use crate::softmax::{
    check_no_alias, copy_to_texture, kernel_key, make_textures, texture_texels, BoundRange,
};
pub use crate::softmax::{
    head_dim_bucket, Tile, HEAD_DIM_BUCKETS, MAX_HEAD_DIM, TILE_BUDGET_BYTES,
};
use crate::tensor::{DType, Tensor};
use crate::tune::ShapeClass;
use shader::Sequence;

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
    /// The query tile, where the caller wants a given one (one of [`tile_choices`]: the planned
    /// key's [`crate::softmax::tile_candidates`] that fit the device's workgroup memory; `tune`
    /// measures them this way).
    /// `None`: the tile `wgpu-attention tune` measured for this class on this adapter, else the
    /// plan's heuristic ([`heuristic_tile`]).
    pub tile: Option<Tile>,
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
    /// Tiled causal calls on CPU adapters: each workgroup owns query tile `x` and its mirror
    /// `ntiles - 1 - x` (the grid has half the tiles), so every workgroup sees the same number
    /// of keys ([`pairs_tiles`]).
    pub pair_tiles: bool,
}

impl FlashPlan {
    /// The kernel's label, with ` (tile pairs)` when workgroups own mirrored tile pairs.
    pub fn label(&self) -> String {
        match self.pair_tiles {
            true => format!("{} (tile pairs)", self.key.label()),
            false => self.key.label(),
        }
    }
}

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

/// The dense kernel specialization (see [`kernel_key`]).
pub fn flash_key(
    strategy: Strategy,
    dtype: DType,
    d_bucket: u32,
    dv_bucket: u32,
    subgroup: (u32, u32),
    mods: bool,
) -> FlashKey {
    kernel_key(
        strategy,
        dtype,
        d_bucket,
        dv_bucket,
        subgroup,
        mods,
        Sequence::geo(),
    )
}

/// Every dense specialization as a [`Kernel`] (for the host layer's registry).
pub fn all_kernels() -> Vec<Box<dyn Kernel>> {
    crate::softmax::boxed(all_flash_keys())
}

/// Every dense specialization the host can build, on any adapter (for naga tests).
pub fn all_flash_keys() -> Vec<FlashKey> {
    let mut keys = Vec::new();
    crate::softmax::for_each_shared_shape(|strategy, dtype, d, dv, sg| {
        for mods in [false, true] {
            let key = flash_key(strategy, dtype, d, dv, sg, mods);
            keys.push(key);
            if tunable(&key) {
                for t in crate::softmax::tile_candidates(&key) {
                    keys.push(crate::softmax::with_tile(key, t));
                }
            }
        }
    });
    crate::softmax::sorted(keys)
}

/// The key an untuned plan starts from: strategy, dtype, head-dim buckets and the budgets'
/// default tile (see [`plan`]).
pub fn base_key(
    ctx: &GpuContext,
    shape: &AttnShape,
    dtype: DType,
    opts: &FlashOptions,
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
    Ok(flash_key(
        strategy,
        dtype,
        d_bucket,
        dv_bucket,
        (caps.subgroup_min, caps.subgroup_max),
        mods,
    ))
}

/// The tiles [`plan`] may give this problem ([`FlashOptions::tile`] takes one of them).
pub fn tile_choices(
    ctx: &GpuContext,
    shape: &AttnShape,
    dtype: DType,
    opts: &FlashOptions,
) -> Result<Vec<Tile>> {
    let key = base_key(ctx, shape, dtype, opts)?;
    Ok(candidates(ctx, &key))
}

/// The key's tile candidates that fit this device's workgroup memory (two-stage tiles may not).
fn candidates(ctx: &GpuContext, key: &FlashKey) -> Vec<Tile> {
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

/// Picks the strategy and specialization for this adapter and problem: the Subgroup kernel on
/// CPU adapters with usable subgroups, the Tiled kernel elsewhere (the Sweep strategy belongs
/// to neighborhood calls).
pub fn plan(
    ctx: &GpuContext,
    shape: &AttnShape,
    dtype: DType,
    opts: &FlashOptions,
) -> Result<FlashPlan> {
    let key = base_key(ctx, shape, dtype, opts)?;
    let caps = &ctx.caps;
    let strategy = key.strategy;
    let masked = opts.causal || opts.window != (None, None);
    let mut pair_tiles = pairs_tiles(ctx, strategy, opts);
    let key = choose_tile(ctx, key, shape, masked, pair_tiles, opts.tile)?;
    // Trip count of the key loops in one invocation (everything else is unrolled): the window
    // pass, the sinks pass, and one partial block each.
    let block = match strategy {
        Strategy::Tiled => key.block as u64,
        Strategy::Subgroup | Strategy::Sweep => caps.subgroup_min as u64,
    };
    let blocks = (shape.lk as u64).div_ceil(block) + (opts.sinks as u64).div_ceil(block) + 2;
    let trips = blocks * (1 + block / key.group as u64);
    // a pair of tiles runs the loops twice: pair only where that fits the driver's loop limit
    pair_tiles &= crate::softmax::check_trips(ctx, 2 * trips, shape.lk).is_ok();
    crate::softmax::check_trips(ctx, trips, shape.lk)?;
    let mut x = (shape.lq as u64).div_ceil(key.rows_per_workgroup() as u64);
    if pair_tiles {
        x = x.div_ceil(2);
    }
    Ok(FlashPlan {
        key,
        grid: crate::softmax::grid(ctx, x, shape)?,
        pair_tiles,
    })
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
fn choose_tile(
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

/// How a family that runs on the flash call path (dense calls, the neighborhood and sparse
/// families, whose options map to [`FlashOptions`]) lays out its call: its extra checks, its
/// LSE layout and its plan, with the buffers of its own ([`FamilyData`]).
pub(crate) trait CallLayout {
    /// Checks of the shape beyond the shared ones.
    fn check(&self, s: &AttnShape) -> Result<()>;
    /// LSE is `[B, L, Hq]` (NATTEN) rather than `[B, Hq, L]`.
    fn lse_heads_last(&self) -> bool;
    /// The plan for `opts` (whose strategy may be a forced fallback), and the family's buffers.
    fn plan(
        &self,
        ctx: &GpuContext,
        s: &AttnShape,
        dtype: DType,
        opts: &FlashOptions,
    ) -> Result<(FlashPlan, FamilyData)>;
}

/// A family's own buffers for one planned call, bound after the shared bindings in the
/// order its geometry declares them: the bytes of its uniform block (empty: none) and of its
/// read-only storage buffers (the sparse block tables and aux buffers: host bytes uploaded per
/// call, or a caller's tensor bound as it is).
#[derive(Default)]
pub(crate) struct FamilyData {
    pub uniform: Vec<u8>,
    pub storage: Vec<crate::softmax::StorageData>,
}

/// Dense calls: no extra checks, LSE `[B, Hq, Lq]`, [`plan`], no uniform of their own.
struct Dense;

impl CallLayout for Dense {
    fn check(&self, _s: &AttnShape) -> Result<()> {
        Ok(())
    }
    fn lse_heads_last(&self) -> bool {
        false
    }
    fn plan(
        &self,
        ctx: &GpuContext,
        s: &AttnShape,
        dtype: DType,
        opts: &FlashOptions,
    ) -> Result<(FlashPlan, FamilyData)> {
        Ok((plan(ctx, s, dtype, opts)?, FamilyData::default()))
    }
}

/// One call's tensors and options, as every step of the call path takes them.
#[derive(Clone, Copy)]
pub(crate) struct Call<'a> {
    pub q: &'a Tensor,
    pub k: &'a Tensor,
    pub v: &'a Tensor,
    pub out: &'a Tensor,
    pub lse: Option<&'a Tensor>,
    pub opts: &'a FlashOptions,
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
    q.dtype().require_float("q")?;
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

pub(crate) fn check_lens(
    lens: &Option<Vec<u32>>,
    what: &str,
    batch: usize,
    max: usize,
) -> Result<()> {
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
fn check_call(ctx: &GpuContext, call: &Call, layout: &dyn CallLayout) -> Result<Checked> {
    let Call {
        q,
        k,
        v,
        out,
        lse,
        opts,
    } = *call;
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
    layout.check(&s)?;
    if let Some(l) = lse {
        // [B, Hq, Lq]; neighborhood calls pass NATTEN's heads-last [B, L, Hq]
        let expect = match layout.lse_heads_last() {
            false => [s.batch, s.hq, s.lq],
            true => [s.batch, s.lq, s.hq],
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

/// Step 2: the family's plan, re-made with the Subgroup kernel where the Sweep kernel cannot
/// copy these tensors into textures (or an error when Sweep was forced); with the texel counts
/// of the Q/K/V textures when it can.
#[allow(clippy::type_complexity)]
fn plan_call(
    ctx: &GpuContext,
    c: &Checked,
    call: &Call,
    layout: &dyn CallLayout,
) -> Result<(FlashPlan, FamilyData, Option<[u64; 3]>)> {
    let dtype = call.q.dtype();
    let (plan, family) = layout.plan(ctx, &c.s, dtype, call.opts)?;
    if plan.key.strategy != Strategy::Sweep {
        return Ok((plan, family, None));
    }
    let counts = [call.q, call.k, call.v].map(|t| texture_texels(ctx, t));
    match counts.iter().find_map(|c| c.as_ref().err()).cloned() {
        None => Ok((plan, family, Some(counts.map(|c| c.unwrap_or(0))))),
        Some(_) if call.opts.strategy == StrategyChoice::Auto => {
            let mut o = call.opts.clone();
            o.strategy = StrategyChoice::Force(Strategy::Subgroup);
            let (plan, family) = layout.plan(ctx, &c.s, dtype, &o)?;
            Ok((plan, family, None))
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
fn flash_params(c: &Checked, t: [&Tensor; 4], offsets: [u32; 6]) -> Result<FlashParams> {
    let s = &c.s;
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
        flags: c.flags,
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
    })
}

fn prepare(ctx: &GpuContext, call: &Call, layout: &dyn CallLayout) -> Result<Prepared> {
    let Call {
        q,
        k,
        v,
        out,
        lse,
        opts,
    } = *call;
    // 1. checks
    let c = check_call(ctx, call, layout)?;
    // 2. plan
    let (plan, family, texels) = plan_call(ctx, &c, call, layout)?;
    let limit = ctx.limits.max_storage_buffer_binding_size;
    if let Some(b) = family
        .storage
        .iter()
        .map(crate::softmax::StorageData::host_bytes)
        .find(|&n| n > limit)
    {
        return Err(AttnError::Limit {
            what: format!("bytes of a storage buffer of {}", plan.key.label()),
            needed: b,
            limit,
        });
    }
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
    let mut params = flash_params(&c, [q, k, v, out], offsets)?;
    if plan.pair_tiles {
        params.flags |= crate::softmax::shader::flags::PAIR_TILES;
    }
    params.softcap = opts.softcap.unwrap_or(1.0);
    params.sinks = opts.sinks;
    if let Some(l) = lse {
        // LSE strides as (batch, head, query): [B, Hq, Lq], or [B, L, Hq] for neighborhoods
        let st = l.strides();
        let conv = |x: usize| u32::try_from(x).unwrap_or(u32::MAX);
        params.lse[1] = conv(st[0]);
        (params.lse[2], params.lse[3]) = match layout.lse_heads_last() {
            false => (conv(st[1]), conv(st[2])),
            true => (conv(st[2]), conv(st[1])),
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
        let dummy_rw = BoundRange::whole(&ctx.dummy_rw);
        let family_buf = (!family.uniform.is_empty()).then(|| {
            init(
                "family params",
                &family.uniform,
                wgpu::BufferUsages::UNIFORM,
            )
        });
        let storage_bufs = family
            .storage
            .iter()
            .map(|a| a.upload(ctx, "family storage"))
            .collect::<Result<Vec<_>>>()?;
        let storage_ranges = storage_bufs
            .iter()
            .map(|b| b.range(ctx, "family storage"))
            .collect::<Result<Vec<_>>>()?;
        // Entries in the key's declared order (optional ones are declared only where the key
        // uses them): shared bindings by name, then the family's uniform and storage buffers.
        let mut family = storage_ranges.iter();
        let mut entries = Vec::new();
        for (i, decl) in (0u32..).zip(plan.key.bindings()) {
            let tex = |n: usize| {
                views.as_ref().map(|v| wgpu::BindGroupEntry {
                    binding: i,
                    resource: wgpu::BindingResource::TextureView(&v[n]),
                })
            };
            let entry = match decl.name {
                "p" => Some(BoundRange::whole(&params_buf).entry(i)),
                "q_buf" => Some(rq.entry(i)),
                "k_buf" => Some(rk.entry(i)),
                "v_buf" => Some(rv.entry(i)),
                "o_buf" => Some(ro.entry(i)),
                "lse_buf" => Some(rl.as_ref().unwrap_or(&dummy_rw).entry(i)),
                "bias_buf" => Some(rb.as_ref().unwrap_or(&dummy).entry(i)),
                "alibi_buf" => Some(
                    alibi_buf
                        .as_ref()
                        .map_or(dummy.entry(i), |b| BoundRange::whole(b).entry(i)),
                ),
                "lens_buf" => Some(
                    lens_buf
                        .as_ref()
                        .map_or(dummy.entry(i), |b| BoundRange::whole(b).entry(i)),
                ),
                "q_tex" => tex(0),
                "k_tex" => tex(1),
                "v_tex" => tex(2),
                _ => match decl.kind {
                    BindingKind::Uniform(_) => family_buf.as_ref().map(|b| BoundRange::whole(b).entry(i)),
                    _ => family.next().map(|r| r.entry(i)),
                },
            };
            entries.push(entry.ok_or_else(|| {
                AttnError::Gpu(format!(
                    "{}: nothing to bind to `{}` (a family's plan gave fewer buffers than its kernel declares)",
                    plan.key.label(),
                    decl.name
                ))
            })?);
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
    let call = Call {
        q,
        k,
        v,
        out,
        lse,
        opts,
    };
    encode_with(ctx, encoder, &call, &Dense, timestamps)
}

/// Records a call of a family on the flash call path (see [`CallLayout`]).
pub(crate) fn encode_with(
    ctx: &GpuContext,
    encoder: &mut wgpu::CommandEncoder,
    call: &Call,
    layout: &dyn CallLayout,
    timestamps: Option<(&wgpu::QuerySet, u32)>,
) -> Result<FlashPlan> {
    let q = call.q;
    let prep = prepare(ctx, call, layout)?;
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
        for (t, (tex, texels)) in [q, call.k, call.v].into_iter().zip(textures) {
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
            // one K/V stage fits the WebGPU default; two may take twice that, and the plan
            // offers them only where the device's limit holds them (`candidates`)
            let per_stage = k.workgroup_bytes() / k.stages;
            assert!(per_stage <= TILE_BUDGET_BYTES, "{k:?}");
            assert!(
                k.workgroup_bytes() <= crate::softmax::STAGED_BUDGET_BYTES,
                "{k:?}"
            );
            assert!(k.stages == 1 || k.strategy == Strategy::Tiled, "{k:?}");
            assert!(k.rows >= 1 && k.group >= 1, "{k:?}");
            let budget = crate::softmax::register_budget(k.strategy);
            // tile variants go up to twice the budget's rows (tune measures whether it pays)
            let fit = (budget / (k.d4 + k.dv4)).max(1);
            assert!(k.rows <= 2 * fit, "{k:?}");
            if k.strategy == Strategy::Tiled {
                assert!(k.block.is_multiple_of(k.group), "{k:?}");
            }
        }
    }

    #[test]
    fn tiles_parse_back_from_their_display() {
        for k in all_flash_keys() {
            for t in crate::softmax::tile_candidates(&k) {
                assert_eq!(t.to_string().parse::<Tile>(), Ok(t));
            }
        }
        for bad in [
            "wg64",
            "wg64xr",
            "64xr8",
            "wg0xr8",
            "wg64xr8s",
            "wg64xr8s0",
            "wgaxr8",
        ] {
            assert!(bad.parse::<Tile>().is_err(), "{bad}");
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
