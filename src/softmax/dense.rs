//! Dense attention on the engine: the `Sequence` geometry (query rows are rows of the
//! sequence; keys the range causality, the sliding window and the sinks leave, in two passes),
//! the dense plan and call layout. The dense family (src/flash/) is its public face; other
//! families compose with it (NATTEN's additional keys are a dense call merged by LSE).

use crate::context::GpuContext;
use crate::error::Result;
use crate::softmax::call::{encode_with, Call, CallLayout, FamilyData};
use crate::softmax::options::{AttnShape, FlashOptions, SoftmaxPlan};
use crate::softmax::plan::{choose_tile, pairs_tiles};
use crate::softmax::sequence::{modify_fn_with, seq_prologue, ModifyHooks, SEQ_WGSL};
use crate::softmax::shader::{FlashKey, Geo, Geometry, Strategy};
use crate::tensor::DType;
use crate::wgsl::Wgsl;

/// The key an untuned dense plan starts from (the engine's [`crate::softmax::plan::base_key`]
/// with the dense geometry).
pub fn base_key(
    ctx: &GpuContext,
    shape: &AttnShape,
    dtype: DType,
    opts: &FlashOptions,
) -> Result<FlashKey> {
    crate::softmax::plan::base_key(ctx, shape, dtype, opts, Sequence::geo())
}

/// Picks the strategy and specialization for this adapter and problem: the Subgroup kernel on
/// CPU adapters with usable subgroups, the Tiled kernel elsewhere (the Sweep strategy belongs
/// to neighborhood calls).
pub fn plan(
    ctx: &GpuContext,
    shape: &AttnShape,
    dtype: DType,
    opts: &FlashOptions,
) -> Result<SoftmaxPlan> {
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
    Ok(SoftmaxPlan {
        key,
        grid: crate::softmax::grid(ctx, x, shape)?,
        pair_tiles,
    })
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
    ) -> Result<(SoftmaxPlan, FamilyData)> {
        Ok((plan(ctx, s, dtype, opts)?, FamilyData::default()))
    }
}

/// Records one dense call (the engine's call path with the dense layout).
pub(crate) fn encode(
    ctx: &GpuContext,
    encoder: &mut wgpu::CommandEncoder,
    call: &Call,
    timestamps: Option<(&wgpu::QuerySet, u32)>,
) -> Result<SoftmaxPlan> {
    encode_with(ctx, encoder, call, &Dense, timestamps)
}

/// The dense geometry (every flash key's, see [`Geometry`]).
pub struct Sequence;

/// The one instance flash keys point to.
pub static SEQUENCE: Sequence = Sequence;

impl Sequence {
    /// As a key's geometry.
    pub fn geo() -> Geo {
        Geo(&SEQUENCE)
    }
}

impl Geometry for Sequence {
    fn suffix(&self) -> &'static str {
        ""
    }
    fn source_file(&self) -> &'static str {
        "src/softmax/dense.rs"
    }
    fn helpers(&self, w: &mut Wgsl, key: &FlashKey) {
        w.raw(SEQ_WGSL);
        modify_fn(w, key.mods);
    }
    fn prologue(&self, w: &mut Wgsl, key: &FlashKey) {
        seq_prologue(w, key);
    }
    /// Two passes over keys: the attention sinks left of the window
    /// (`[kv_start, min(sinks, kv_lo))`), then the window's own range `[kv_lo, kv_hi)`. Bounds
    /// are uniform, as barriers and shuffles need.
    fn open_passes(&self, w: &mut Wgsl, _key: &FlashKey) {
        // without sinks the first pass is empty: skip it (SwiftShader runs a loop's body at
        // least once, so an empty pass still costs a tile load and a key group there)
        w.open("for (var kpass = select(0u, 1u, p.sinks == 0u); kpass < 2u; kpass++) {");
        w.line("let pass_lo = select(kv_lo, p.kv_start, kpass == 0u);");
        w.line("let pass_hi = select(kv_hi, min(min(p.sinks, kv_lo), p.kv_end), kpass == 0u);");
        w.line("range_lo = pass_lo;");
        w.line("range_hi = pass_hi;");
    }
    fn lane_key(&self, w: &mut Wgsl) {
        w.line("let kj = key_row(kb + lane);");
    }
    /// The prologue's rows come from `qtile`, so causal Tiled calls may pair mirrored tiles.
    fn pairs_tiles(&self) -> bool {
        true
    }
    /// `key_row` clamps to the last key.
    fn prefetches(&self) -> bool {
        true
    }
    /// Causal and window bounds of the invocation's own rows (`inv_lo`, `inv_hi`, from the
    /// prologue): a workgroup of 64 x R rows bounds its tiles by its last row, so without this
    /// most of its invocations would compute tiles right of their diagonal. Sinks are bounded by
    /// causality only, in either pass (the window pass may start left of the last sink).
    fn tile_guard(&self, key: &FlashKey) -> Option<String> {
        (key.strategy == Strategy::Tiled).then(|| {
            format!(
                "(i32(kb) < inv_hi) & ((kpass == 0u) | (i32(kb) + {} > inv_lo) | (kb < p.sinks))",
                key.block
            )
        })
    }
    fn group_keys(&self, _w: &mut Wgsl, _key: &FlashKey) {}
    fn score(&self, _key: &FlashKey, r: u32, u: u32) -> String {
        format!("modify(s{r}_{u}, b, h, tok{r}, kb + g + {u}u, qlen, kvlen)")
    }
}

/// `modify()`: masking and, when the key has `mods`, the score modifications in FlashAttention's
/// order (scale is folded into q; then softcap, ALiBi, bias). Returns the score in base 2, or
/// MASKED. Branch-free like `visible()`.
fn modify_fn(w: &mut Wgsl, mods: bool) {
    modify_fn_with(w, mods, &ModifyHooks::default());
}
