//! The dense family's [`Geometry`]: query rows are rows of the sequence, keys the range that
//! causality, the sliding window and the sinks leave, in two passes (sinks, then the window);
//! scores go through `modify()` (softcap, ALiBi, bias when compiled in, then the masks).

use crate::softmax::sequence::{modify_fn_with, seq_prologue, ModifyHooks, SEQ_WGSL};
use crate::softmax::shader::{FlashKey, Geo, Geometry, Strategy};
use crate::wgsl::Wgsl;

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
        "src/flash/shader.rs"
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
