//! The WGSL pieces of a sequence-shaped geometry (engine): rows of a sequence, keys of a
//! causal/window/sinks range, `visible()` and `modify()`. The dense family's `Sequence`
//! geometry is made of them; the sparse family's block lists reuse them with hooks.

use crate::softmax::shader::{FlashKey, Strategy};
use crate::wgsl::Wgsl;

/// Masking of sequence kernels: key `j` lives at row `j` (clamped: overhanging lanes load a valid
/// row), and `visible()` applies causality, the window and the sinks.
pub(crate) const SEQ_WGSL: &str = "
fn key_row(j: u32) -> u32 { return min(j, p.lk - 1u); }

// Does query row i see key j? FlashAttention alignment: the diagonal is j = i + kvlen - qlen.
// Branch-free on purpose (`&`, `|` and select, never `&&`, `||` or `if`): the function is
// inlined R x U times per key group, and SwiftShader's compile time grows exponentially with
// the number of branches in one block of straight-line code.
fn visible(i: u32, j: u32, qlen: u32, kvlen: u32) -> bool {
    let diag = i32(i) + i32(kvlen) - i32(qlen);
    let jj = i32(j);
    let ok = (i < qlen) & (j < kvlen) & (j >= range_lo) & (j < range_hi)
        & (!has(F_CAUSAL) | (jj <= diag));
    let in_window = (!has(F_WLEFT) | (jj >= diag - p.win_left))
        & (!has(F_WRIGHT) | (jj <= diag + p.win_right));
    // attention sinks: the first `sinks` keys bypass the window, never causality
    return ok & (in_window | (j < p.sinks));
}
";

/// What another family adds to `modify()` (the sparse family: a user's `score_mod` and the
/// block mask with its `mask_mod`).
#[derive(Default)]
pub(crate) struct ModifyHooks<'a> {
    /// Extra parameters after `kvlen`, with their leading comma (`, st: u32`).
    pub params: &'a str,
    /// Lines run after the built-in modifications, on `s` (natural-log units).
    pub score: &'a str,
    /// A WGSL boolean ANDed with `visible()`, with its leading ` & `.
    pub mask: &'a str,
}

/// `modify()` with a family's hooks (dense calls: none): masking and, when the key has `mods`,
/// the score modifications in FlashAttention's order (scale is folded into q; then softcap,
/// ALiBi, bias), then the hooks. Returns the score in base 2, or MASKED. Branch-free like
/// `visible()`.
pub(crate) fn modify_fn_with(w: &mut Wgsl, mods: bool, hooks: &ModifyHooks) {
    w.raw(&format!(
        "fn modify(raw: f32, b: u32, h: u32, i: u32, j: u32, qlen: u32, kvlen: u32{}) -> f32 {{
    var s = raw;",
        hooks.params
    ));
    if mods {
        w.raw(
            "    s = select(s, p.softcap * tanh_safe(s / p.softcap), has(F_SOFTCAP));
    let dist = f32(abs(i32(i) + i32(kvlen) - i32(qlen) - i32(j)));
    s = s - select(0.0, alibi_buf[h], has(F_ALIBI)) * dist;
    let bias_at = p.bias.x + b * p.bias.y + h * p.bias.z + i * p.bias.w + j;
    s = s + select(0.0, bias_buf[bias_at], has(F_BIAS));",
        );
    }
    if !hooks.score.is_empty() {
        w.raw(hooks.score);
    }
    w.raw(&format!(
        "    let t = s * LOG2E;
    // -inf from an additive mask becomes MASKED; NaN stays NaN.
    return select(MASKED, select(t, MASKED, t <= MASKED), visible(i, j, qlen, kvlen){});
}}",
        hooks.mask
    ));
}

/// The key range `[{pre}lo, {pre}hi)` that rows `first ..= last` can see (causality, the window;
/// sinks right of the window still count); empty when there are no rows. `diag_off`, `qlen`,
/// `kvlen` in scope.
fn key_bounds(pre: &str, first: &str, last: &str) -> String {
    format!(
        "    var {pre}hi = min(i32(kvlen), i32(p.kv_end));
    var {pre}lo = i32(p.kv_start);
    if (has(F_CAUSAL)) {{ {pre}hi = min({pre}hi, {last} + diag_off + 1); }}
    let {pre}hi_sinks = min({pre}hi, i32(min(p.sinks, p.kv_end))); // sinks right of the window still count
    if (has(F_WRIGHT)) {{ {pre}hi = max(min({pre}hi, {last} + diag_off + p.win_right + 1), {pre}hi_sinks); }}
    if (has(F_WLEFT)) {{ {pre}lo = max({pre}lo, {first} + diag_off - p.win_left); }}
    if ({last} < {first}) {{ {pre}hi = {pre}lo; }}"
    )
}

/// Sequence kernels: rows `row0 .. row0 + R` of the sequence; the key range `[kv_lo, kv_hi)`
/// from causality and the window, bounded per subgroup (Subgroup) or workgroup (Tiled).
pub(crate) fn seq_prologue(w: &mut Wgsl, key: &FlashKey) {
    let r_n = key.rows;
    w.raw(&format!(
        "    let b = wid.z;
    let h = wid.y;
    let hk = h / (p.hq / p.hkv);          // GQA: query head h reads kv head h / (Hq / Hkv)
    var qlen = p.lq;
    var kvlen = p.lk;
    if (has(F_QLENS)) {{ qlen = min(lens_buf[b], p.lq); }}
    if (has(F_KVLENS)) {{ kvlen = min(lens_buf[p.batch + b], p.lk); }}
    let tile0 = qtile * {rpw}u;            // first query row of this tile
    let row0 = tile0 + lid * {r_n}u;       // this invocation's rows: row0 .. row0 + R
{bounds}
    let diag_off = i32(kvlen) - i32(qlen);
{wg_bounds}
    let kv_lo = u32(max(lo, 0));
    let kv_hi = u32(max(hi, max(lo, 0)));
{inv_bounds}
    let k_head = p.k.x + b * p.k.y + hk * p.k.w;
    let v_head = p.v.x + b * p.v.y + hk * p.v.w;
",
        rpw = key.rows_per_workgroup(),
        wg_bounds = key_bounds("", "first", "last"),
        inv_bounds = match key.strategy {
            Strategy::Tiled => format!(
                "    // Keys this invocation's own rows can see: tiles outside are loaded (the workgroup
    // shares them) but not computed. The same bounds as above, for rows row0 .. row0 + R.
    let inv_first = i32(row0);
    let inv_last = i32(min(row0 + {r_n}u, qlen)) - 1;
{}",
                key_bounds("inv_", "inv_first", "inv_last")
            ),
            Strategy::Subgroup | Strategy::Sweep => String::new(),
        },
        bounds = match key.strategy {
            // the key loop only has to be uniform over the subgroup: bound it by the subgroup's
            // own rows, so causal work above the diagonal is skipped in steps of sg_size * R rows
            Strategy::Subgroup | Strategy::Sweep => format!(
                "    // Keys this subgroup can see (uniform over the subgroup): tiles outside are never loaded.
    let first = i32(subgroupMin(row0));
    let last = i32(min(subgroupMax(row0) + {r_n}u, qlen)) - 1;"
            ),
            Strategy::Tiled => format!(
                "    // Keys this workgroup can see (uniform over the workgroup): tiles outside are never loaded.
    let first = i32(tile0);
    let last = i32(min(tile0 + {}u, qlen)) - 1;",
                key.rows_per_workgroup()
            ),
        }
    ));
    for r in 0..r_n {
        w.line(&format!("let tok{r} = row0 + {r}u;"));
        w.line(&format!("let ok{r} = tok{r} < p.lq;"));
    }
}
