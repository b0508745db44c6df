//! The text of the FlashAttention-2 forward kernel (see `shader.rs` for the key it is
//! generated from and the strategies): the params struct, the common helpers, the loaders,
//! the epilogue, one key group's online-softmax update, and [`generate`] that writes one
//! specialization with its geometry's hooks.

use super::shader::{flags, FlashKey, Strategy};
use crate::pipeline::declare_bindings;
use crate::tensor::DType;
use crate::wgsl::Wgsl;

const PARAMS_WGSL: &str = "struct Params {
    batch: u32, hq: u32, hkv: u32, lq: u32,
    lk: u32, d: u32, dv: u32, flags: u32,
    q: vec4<u32>,    // offset, batch stride, seq stride, head stride (elements)
    k: vec4<u32>,
    v: vec4<u32>,
    o: vec4<u32>,
    bias: vec4<u32>, // offset, batch stride, head stride, query stride (0 broadcasts)
    scale: f32, softcap: f32, win_left: i32, win_right: i32,
    kv_start: u32, kv_end: u32, sinks: u32, pad: u32,
    lse: vec4<u32>,  // offset, batch stride, head stride, query stride
}
";

/// Constants and helpers every strategy and geometry shares.
const COMMON_WGSL: &str = "
const MASKED: f32 = -1.0e30;          // finite sentinel for masked scores (never inf: inf - inf is 0 on llvmpipe)
const LOG2E: f32 = 1.4426950408889634; // scores move to base 2 so that exp2 does the softmax
const LN2: f32 = 0.6931471805599453;

// The key range of the current pass (sinks, then the window): a block that overhangs its range
// must not count keys that the other pass visits. (Loops bound themselves by the pass's own
// `let` copies: WGSL's uniformity analysis treats every read of a private variable as
// non-uniform, and the Tiled kernel's barriers need uniform loop bounds.)
var<private> range_lo: u32;
var<private> range_hi: u32;

fn has(f: u32) -> bool { return (p.flags & f) != 0u; }

// -inf from a runtime value: WGSL forbids a constant expression that evaluates to infinity
// (Tint rejects `bitcast<f32>(0xff800000u)`; naga lets it through).
fn neg_inf() -> f32 {
    var bits = 0xff800000u;
    return bitcast<f32>(bits);
}

// tanh that stays finite for any |x| (exp of a large argument never appears).
fn tanh_safe(x: f32) -> f32 {
    let e = exp(-2.0 * abs(x));
    return sign(x) * (1.0 - e) / (1.0 + e);
}
";

pub use crate::resources::TEXTURE_WIDTH;

/// `ld_q`, `ld_k`, `ld_v` (vec4 `c` of the head dim at element `base`; elements past the head
/// dim read as 0 so padded lanes add nothing) and `st_o`.
///
/// `textured` (the Sweep kernel): Q, K and V are read through textures, element `e` of a buffer
/// being component `e % 4` of texel `e / 4`, rows of [`TEXTURE_WIDTH`] texels (the host copies
/// the buffers in, with offsets and strides that are multiples of 4). On llvmpipe a texel fetch
/// is a branch-free gather of 16 bytes per lane, where a storage-buffer load is a loop over
/// lanes with a branch per component.
pub(crate) fn loaders(w: &mut Wgsl, t: &str, textured: bool) {
    let (shift, mask) = (TEXTURE_WIDTH.trailing_zeros(), TEXTURE_WIDTH - 1);
    for (name, dim) in [("q", "p.d"), ("k", "p.d"), ("v", "p.dv")] {
        let body = if textured {
            format!(
                "    // base + c is a multiple of 4
    let t = (base + c) >> 2u;
    let x = textureLoad({name}_tex, vec2<u32>(t & {mask}u, t >> {shift}u), 0);
    return select(vec4<f32>(0.0), x, vec4<u32>(c) + vec4<u32>(0u, 1u, 2u, 3u) < vec4<u32>({dim}));"
            )
        } else {
            format!(
                "    // elements past the head dim read as 0 so padded lanes add nothing
    return vec4<f32>(
        select(0.0, f32({name}_buf[base + c]), c < {dim}),
        select(0.0, f32({name}_buf[base + c + 1u]), c + 1u < {dim}),
        select(0.0, f32({name}_buf[base + c + 2u]), c + 2u < {dim}),
        select(0.0, f32({name}_buf[base + c + 3u]), c + 3u < {dim}));"
            )
        };
        w.raw(&format!(
            "fn ld_{name}(base: u32, c: u32) -> vec4<f32> {{\n{body}\n}}"
        ));
    }
    w.raw(&format!(
        "fn st_o(base: u32, c: u32, x: vec4<f32>) {{
    if (c < p.dv) {{ o_buf[base + c] = {t}(x.x); }}
    if (c + 1u < p.dv) {{ o_buf[base + c + 1u] = {t}(x.y); }}
    if (c + 2u < p.dv) {{ o_buf[base + c + 2u] = {t}(x.z); }}
    if (c + 3u < p.dv) {{ o_buf[base + c + 3u] = {t}(x.w); }}
}}"
    ));
}

/// Writes one query row's O and LSE from its online-softmax state (`m`, `l`, `acc`); `row` is
/// in scope. Rows with no visible key give O = 0 and LSE = -inf.
/// Sigmoid attention (`sigmoid`) writes `acc` as it is and no LSE (the host refuses to ask).
pub(crate) fn store_row(w: &mut Wgsl, dv4: u32, m: &str, l: &str, acc: &str, sigmoid: bool) {
    if sigmoid {
        w.line("let inv = 1.0;");
    } else {
        w.line(&format!("let inv = select(0.0, 1.0 / {l}, {l} > 0.0);"));
    }
    w.line("let ob = p.o.x + b * p.o.y + row * p.o.z + h * p.o.w;");
    for i in 0..dv4 {
        w.line(&format!("st_o(ob, {}u, {acc}[{i}] * inv);", i * 4));
    }
    if sigmoid {
        return;
    }
    w.open("if (has(F_LSE)) {");
    w.line(&format!(
        "lse_buf[p.lse.x + b * p.lse.y + h * p.lse.z + row * p.lse.w] = select(neg_inf(), ({m} + log2({l})) * LN2, {l} > 0.0);"
    ));
    w.close();
}

/// Generates the WGSL source of one specialization: the shared parts, with the geometry's hooks.
pub fn generate(key: &FlashKey) -> String {
    let geo = key.geometry.0;
    let t = key.dtype.wgsl();
    let (r_n, u_n, d4, dv4) = (key.rows, key.group, key.d4, key.dv4);
    let mut w = Wgsl::new(&format!(
        "Generated by wgpu-attention (src/softmax/shader.rs and {}) for {key:?}.\nDo not edit: change the generator.",
        geo.source_file()
    ));
    if key.dtype == DType::F16 {
        w.line("enable f16;");
    }
    w.raw(PARAMS_WGSL);
    w.raw(&declare_bindings(&key.bindings()));
    w.raw(&flags::wgsl());
    w.raw(COMMON_WGSL);
    geo.helpers(&mut w, key);
    loaders(&mut w, t, key.strategy == Strategy::Sweep);
    // two K/V stages in workgroup memory (Tiled keys of geometries that can prefetch)
    let two = key.strategy == Strategy::Tiled && key.stages == 2 && geo.prefetches();
    if key.strategy == Strategy::Tiled {
        let stages = if two { 2 } else { 1 };
        w.line(&format!(
            "var<workgroup> k_tile: array<vec4<f32>, {}>; // [stages, BC, D/4]",
            stages * key.block * d4
        ));
        w.line(&format!(
            "var<workgroup> v_tile: array<vec4<f32>, {}>; // [stages, BC, Dv/4]",
            stages * key.block * dv4
        ));
    }

    w.line(&format!("@compute @workgroup_size({})", key.wg));
    let sg_args = if key.strategy != Strategy::Tiled {
        ", @builtin(subgroup_size) sg_size: u32, @builtin(subgroup_invocation_id) lane: u32"
    } else {
        ""
    };
    w.open(&format!(
        "fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32{sg_args}) {{"
    ));
    if geo.own_body(&mut w, key) {
        w.close();
        return w.finish();
    }
    // Causal balance: a workgroup may own query tile wid.x and its mirror, each a pass of the
    // whole body (a uniform loop: the barriers inside stay uniform).
    let paired = key.strategy == Strategy::Tiled && geo.pairs_tiles();
    if paired {
        w.line(&format!(
            "let ntiles = (p.lq + {rpw}u - 1u) / {rpw}u;",
            rpw = key.rows_per_workgroup()
        ));
        w.line("let mirror = ntiles - 1u - wid.x;");
        w.line("let n_tiles_here = select(1u, 2u, has(F_PAIR) & (mirror > wid.x));");
        w.open("for (var tile_pass = 0u; tile_pass < n_tiles_here; tile_pass++) {");
        w.line("let qtile = select(wid.x, mirror, tile_pass == 1u);");
    } else {
        w.line("let qtile = wid.x;");
    }
    geo.prologue(&mut w, key);
    // Query rows, pre-scaled; running max, sum, accumulator per row.
    for r in 0..r_n {
        w.line(&format!(
            "let qb{r} = p.q.x + b * p.q.y + min(tok{r}, p.lq - 1u) * p.q.z + h * p.q.w;"
        ));
        w.line(&format!("var q{r}: array<vec4<f32>, {d4}>;"));
        for i in 0..d4 {
            w.line(&format!("q{r}[{i}] = ld_q(qb{r}, {}u) * p.scale;", i * 4));
        }
        w.line(&format!("var m{r} = MASKED;"));
        w.line(&format!("var l{r} = 0.0;"));
        w.line(&format!("var acc{r}: array<vec4<f32>, {dv4}>;"));
    }

    match key.strategy {
        Strategy::Subgroup | Strategy::Sweep => {
            w.line(&format!("var kr: array<vec4<f32>, {d4}>;"));
            w.line(&format!("var vr: array<vec4<f32>, {dv4}>;"));
            geo.open_passes(&mut w, key);
            w.open("for (var kb = pass_lo; kb < pass_hi; kb += sg_size) {");
            w.line("// each lane holds one K row and one V row of this block");
            geo.lane_key(&mut w);
            for i in 0..d4 {
                w.line(&format!("kr[{i}] = ld_k(k_head + kj * p.k.z, {}u);", i * 4));
            }
            for i in 0..dv4 {
                w.line(&format!("vr[{i}] = ld_v(v_head + kj * p.v.z, {}u);", i * 4));
            }
            // the subgroup's keys in groups of U: unrolled with constant lane indices where the
            // subgroup size is known (`FlashKey::lanes`), else a loop
            let starts: Vec<Option<u32>> = if key.lanes > 0 {
                (0..key.lanes).step_by(u_n as usize).map(Some).collect()
            } else {
                vec![None]
            };
            for g0 in starts {
                match g0 {
                    Some(g0) => {
                        w.open("{");
                        w.line(&format!("let g = {g0}u;"));
                    }
                    None => w.open(&format!("for (var g = 0u; g < sg_size; g += {u_n}u) {{")),
                }
                let keys = |w: &mut Wgsl| geo.group_keys(w, key);
                let score = |r: u32, u: u32| geo.score(key, r, u);
                group_body(&mut w, key, r_n, "", &keys, &score, |x, u, i| match g0 {
                    Some(g0) => format!("subgroupShuffle({x}[{i}], {}u)", g0 + u),
                    None => format!("subgroupShuffle({x}[{i}], g + {u}u)"),
                });
                w.close();
            }
            w.close();
            w.close();
        }
        Strategy::Tiled => {
            let bc = key.block;
            // Cooperative load of the K/V tile at key `at`: invocation `lid` takes vec4s
            // `lid + s * wg`. `Now` stores them into the stage at `ko`/`vo`; `Fetch` only loads
            // them into registers (`nk{s}`, `nv{s}`), `Store` puts those into the other stage.
            #[derive(PartialEq)]
            enum Load {
                Now,
                Fetch,
                Store,
            }
            let load = |w: &mut Wgsl, at: &str, ko: &str, vo: &str, how: Load| {
                for (tile, n4, ld, head, stride, off, reg) in [
                    ("k_tile", d4, "ld_k", "k_head", "p.k.z", ko, "nk"),
                    ("v_tile", dv4, "ld_v", "v_head", "p.v.z", vo, "nv"),
                ] {
                    let total = bc * n4;
                    for step in 0..total.div_ceil(key.wg) {
                        let o = step * key.wg;
                        let guard = if (step + 1) * key.wg > total {
                            format!("if (lid + {o}u < {total}u) ")
                        } else {
                            String::new()
                        };
                        // vec4 `x` of the tile: key `at + x / n4`, columns `(x % n4) * 4`
                        let fetch = |x: &str| {
                            format!("{ld}({head} + key_row({at} + {x} / {n4}u) * {stride}, ({x} % {n4}u) * 4u)")
                        };
                        w.line(&match how {
                            Load::Now => format!(
                                "{guard}{{ let x = lid + {o}u; {tile}[{off}x] = {}; }}",
                                fetch("x")
                            ),
                            // key_row clamps: the fetch needs no guard, only the store
                            Load::Fetch => {
                                format!("let {reg}{step} = {};", fetch(&format!("(lid + {o}u)")))
                            }
                            Load::Store => {
                                format!("{guard}{{ {tile}[{off}lid + {o}u] = {reg}{step}; }}")
                            }
                        });
                    }
                }
            };
            geo.open_passes(&mut w, key);
            if two {
                w.line("// two stages: the pass's first tile into stage 0; each iteration fetches the next tile");
                w.line("// (rows clamped past the pass's end) and stores it into the other stage: one barrier");
                load(&mut w, "pass_lo", "", "", Load::Now);
                w.line("workgroupBarrier();");
                w.line("var stage = 0u;");
            }
            w.open(&format!(
                "for (var kb = pass_lo; kb < pass_hi; kb += {bc}u) {{"
            ));
            let (ko, vo) = if two {
                w.line(&format!("let ko = stage * {}u;", bc * d4));
                w.line(&format!("let vo = stage * {}u;", bc * dv4));
                w.line("// the next tile's loads go out now and land in the other stage after this tile's");
                w.line("// arithmetic, so a GPU overlaps their latency with it");
                load(&mut w, &format!("kb + {bc}u"), "", "", Load::Fetch);
                ("ko + ", "vo + ")
            } else {
                w.line("// cooperative load of a K/V tile into workgroup memory");
                load(&mut w, "kb", "", "", Load::Now);
                w.line("workgroupBarrier();");
                ("", "")
            };
            // the tile is the workgroup's; an invocation none of whose rows sees it skips the
            // arithmetic (no barrier inside, so the branch may be non-uniform)
            let guard = geo.tile_guard(key);
            if let Some(g) = &guard {
                w.open(&format!("if ({g}) {{"));
            }
            if bc == u_n {
                w.open("{");
                w.line("let g = 0u;");
            } else {
                w.open(&format!("for (var g = 0u; g < {bc}u; g += {u_n}u) {{"));
            }
            let keys = |w: &mut Wgsl| geo.group_keys(w, key);
            let score = |r: u32, u: u32| geo.score(key, r, u);
            group_body(&mut w, key, r_n, "", &keys, &score, |x, u, i| {
                let (tile, n4, off) = if x == "kr" {
                    ("k_tile", d4, ko)
                } else {
                    ("v_tile", dv4, vo)
                };
                format!("{tile}[{off}(g + {u}u) * {n4}u + {i}u]")
            });
            w.close();
            if guard.is_some() {
                w.close();
            }
            if two {
                load(
                    &mut w,
                    "",
                    &format!("{}u - ko + ", bc * d4),
                    &format!("{}u - vo + ", bc * dv4),
                    Load::Store,
                );
            }
            w.line("workgroupBarrier();");
            if two {
                w.line("stage = 1u - stage;");
            }
            w.close();
            w.close();
        }
    }

    // Epilogue: normalise and write; rows with no visible key give O = 0 and LSE = -inf.
    for r in 0..r_n {
        w.open(&format!("if (ok{r}) {{"));
        w.line(&format!("let row = tok{r};"));
        store_row(
            &mut w,
            dv4,
            &format!("m{r}"),
            &format!("l{r}"),
            &format!("acc{r}"),
            geo.sigmoid_bias().is_some(),
        );
        w.close();
    }
    if paired {
        w.close();
    }
    w.close();
    w.finish()
}

/// One group of `U` keys: scores, masking, online-softmax update, P·V, for `rows` query rows
/// whose state is named `{pre}q{r}`, `{pre}m{r}`, `{pre}l{r}`, `{pre}acc{r}`. `fetch(x, u, i)`
/// returns the expression for vec4 `i` of key (x = "kr") or value (x = "vr") number `g + u`;
/// `keys` emits what the masks need per key, `score(r, u)` the masked score of row r, key u.
pub(crate) fn group_body(
    w: &mut Wgsl,
    key: &FlashKey,
    rows: u32,
    pre: &str,
    keys: &dyn Fn(&mut Wgsl),
    score: &dyn Fn(u32, u32) -> String,
    fetch: impl Fn(&str, u32, u32) -> String,
) {
    let (r_n, u_n) = (rows, key.group);
    for u in 0..u_n {
        for r in 0..r_n {
            w.line(&format!("var s{r}_{u} = 0.0;"));
        }
        for i in 0..key.d4 {
            let e = fetch("kr", u, i);
            w.line(&format!("let k{u}_{i} = {e};"));
            for r in 0..r_n {
                w.line(&format!("s{r}_{u} += dot({pre}q{r}[{i}], k{u}_{i});"));
            }
        }
    }
    keys(w);
    for r in 0..r_n {
        for u in 0..u_n {
            w.line(&format!("s{r}_{u} = {};", score(r, u)));
        }
        if let Some(bias) = key.geometry.0.sigmoid_bias() {
            // sigmoid attention: each weight on its own, no running max, no row sum
            for u in 0..u_n {
                w.line(&format!(
                    "let p{r}_{u} = select(0.0, 1.0 / (1.0 + exp2(-(s{r}_{u} + {bias}))), s{r}_{u} > MASKED);"
                ));
            }
            continue;
        }
        let maxes = (0..u_n).fold(format!("{pre}m{r}"), |acc, u| {
            format!("max({acc}, s{r}_{u})")
        });
        w.line(&format!("let mx{r} = {maxes};"));
        w.line(&format!("let c{r} = exp2({pre}m{r} - mx{r});"));
        for u in 0..u_n {
            w.line(&format!(
                "let p{r}_{u} = select(0.0, exp2(s{r}_{u} - mx{r}), s{r}_{u} > MASKED);"
            ));
        }
        let sum = (0..u_n)
            .map(|u| format!("p{r}_{u}"))
            .collect::<Vec<_>>()
            .join(" + ");
        w.line(&format!("{pre}l{r} = {pre}l{r} * c{r} + {sum};"));
        w.line(&format!("{pre}m{r} = mx{r};"));
    }
    let softmax = key.geometry.0.sigmoid_bias().is_none();
    for i in 0..key.dv4 {
        for r in 0..r_n {
            if softmax {
                w.line(&format!("{pre}acc{r}[{i}] *= c{r};"));
            }
        }
        for u in 0..u_n {
            let e = fetch("vr", u, i);
            w.line(&format!("let v{u}_{i} = {e};"));
            for r in 0..r_n {
                w.line(&format!("{pre}acc{r}[{i}] += p{r}_{u} * v{u}_{i};"));
            }
        }
    }
}
