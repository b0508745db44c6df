//! The delta rules in chunks (fla's `chunk_delta_rule` / `chunk_gated_delta_rule`, the UT
//! form). With `b_t` the gates summed from the chunk's start, `g_t = exp(b_t)` (1 for DeltaNet)
//! and `S_0` the state before the chunk, the recurrence `S_t = a_t (I - beta_t k_t k_t^T)
//! S_{t-1} + beta_t k_t v_t^T` is `S_t = g_t S_0 + sum_{s <= t} (g_t / g_s) k_s u_s^T` with
//!
//! `u_t = beta_t (v_t - g_t S_0^T k_t) - sum_{s < t} beta_t (g_t / g_s) (k_t . k_s) u_s`,
//!
//! that is `(I + M) U = diag(beta) V - diag(beta g) K S_0`, `M` strictly lower triangular.
//! Three passes per piece:
//!
//! - the **solve pass** (`Stage::Solve`, every chunk in parallel) forms `M` and solves
//!   `(I + M) [W | U'] = [diag(beta g) K | diag(beta) V]` by forward substitution (the
//!   triangular solve), and stores `W`, `U'` and per token `(beta, b, 1/|k|, 1/|q|)`; with
//!   subgroups of 8 (lavapipe, GPUs) each lane owns four tokens and shuffles hand their keys
//!   and rows of `M` round ([`generate_solve_sg`]), else loops over workgroup memory
//!   ([`generate_solve`]: the unrolled form took SwiftShader minutes and 24 GB to compile);
//! - the **state pass** (`Stage::States`, chunks in order) stores `S_0`, forms
//!   `U = U' - W S_0` (written over `U'`, for the output pass) and applies the chunk,
//!   `S <- exp(b_C) S_0 + sum_s exp(b_C - b_s) k_s u_s^T`;
//! - the **output pass** is `chunk.rs`'s, with `u` in place of `v`: `o_t = g_t q_t S_0 +
//!   sum_{s <= t} (g_t / g_s) (q_t . k_s) u_s`.
//!
//! Every exponent is again a difference of summed gates in order, so none is positive. The
//! state pass holds all `K` rows of its columns (`u` needs the whole `S_0^T k`): the rows in
//! workgroup memory, `STATE_VEC4S` vec4s, so fewer columns per workgroup as K grows.

use super::chunk::{emit_loaders4, header, ChunkKey, Stage};
use super::shader::{emit_loaders, emit_sequence, Decay};
use crate::pipeline::{BindingDecl, Kernel};
use crate::wgsl::Wgsl;

pub use super::chunk_delta_states::generate_states;

/// Invocations of the solve pass.
pub const SOLVE_WG: u32 = 64;
/// vec4 columns a lane of the subgroup solve pass takes at a time (every lane runs the same
/// iterations, for the shuffles; `kp + vu` is a multiple of 16, so the last may have half
/// the lanes idle).
const SG_SOLVE_COLS: u32 = 4;
/// vec4s of state the delta state pass keeps in workgroup memory (8 KiB).
pub const STATE_VEC4S: u32 = 512;
/// Features per key slab (vec4s: `KS4`).
pub(super) const KS: u32 = 16;

/// Column vec4s (and invocations) of a delta state-pass workgroup holding `fp` rows.
pub fn state_vt4(fp: u32) -> u32 {
    match STATE_VEC4S / fp.max(64) {
        x if x >= 8 => 8,
        x if x >= 4 => 4,
        _ => 2,
    }
}

/// Loop iterations of one chunk in the delta state pass (lavapipe's loop limit).
pub fn state_loops_per_chunk(key: &ChunkKey, k: u32) -> u64 {
    let wg = u64::from(key.wg());
    let c = u64::from(key.c());
    let slabs = u64::from(k.div_ceil(KS));
    u64::from(key.fp) / 4 + c / wg + 1 + 2 * slabs * (c * 4 / wg + 5)
}

pub fn bindings(key: &ChunkKey, e: &str) -> Vec<BindingDecl> {
    let v4 = "vec4<f32>";
    match key.stage {
        Stage::Solve => vec![
            BindingDecl::uniform("p", "LinParams"),
            BindingDecl::read("q", e, "[B, T, H, K]"),
            BindingDecl::read("k", e, "[B, T, H, K]"),
            BindingDecl::read("v", e, "[B, T, HV, V]"),
            BindingDecl::read("g", "f32", "gates (natural log)"),
            BindingDecl::read("beta", "f32", "[B, T, HV]"),
            BindingDecl::read("cu", "u32", "cu_seqlens"),
            BindingDecl::read_write("tok", v4, "per token (beta, b, 1/|k|, 1/|q|) [N, HV, P C]"),
            BindingDecl::read_write("wsc", v4, "W [N, HV, P C, Kp/4]"),
            BindingDecl::read_write("usc", v4, "U' [N, HV, P C, Vp/4]"),
        ],
        Stage::States => vec![
            BindingDecl::uniform("p", "LinParams"),
            BindingDecl::read("k", e, "[B, T, H, K]"),
            BindingDecl::read("s_in", "f32", "initial state [N, HV, F, Vs]"),
            BindingDecl::read("cu", "u32", "cu_seqlens"),
            BindingDecl::read("tok", v4, "per token (beta, b, 1/|k|, 1/|q|) [N, HV, P C]"),
            BindingDecl::read("wsc", v4, "W [N, HV, P C, Kp/4]"),
            BindingDecl::read_write("usc", v4, "U' in, U out [N, HV, P C, Vp/4]"),
            BindingDecl::read_write("states", v4, "chunk states [N, HV, P, Fp, W4]"),
            BindingDecl::read_write("s_out", "f32", "state [N, HV, F, Vs]"),
        ],
        Stage::Output | Stage::Fused => vec![
            BindingDecl::uniform("p", "LinParams"),
            BindingDecl::read("q", e, "[B, T, H, K]"),
            BindingDecl::read("k", e, "[B, T, H, K]"),
            BindingDecl::read("v", v4, "U from the state pass [N, HV, P C, Vp/4]"),
            BindingDecl::read("g", "f32", "gates (natural log)"),
            BindingDecl::read("cu", "u32", "cu_seqlens"),
            BindingDecl::read("states", v4, "chunk states [N, HV, P, Fp, W4]"),
            BindingDecl::read_write("o", e, "[B, T, HV, V]"),
            BindingDecl::read("tok", v4, "per token (beta, b, 1/|k|, 1/|q|) [N, HV, P C]"),
        ],
    }
}

pub fn workgroup_bytes(key: &ChunkKey) -> u32 {
    let c = key.c();
    match key.stage {
        Stage::Solve => 16 * c * (KS / 4) + 4 * c * c + 16 * c,
        Stage::States => 16 * key.fp * key.wg() + 16 * c * (KS / 4) + 16 * c,
        Stage::Output | Stage::Fused => 0,
    }
}

/// `tok_base(n, hv, c)`: the first token of chunk `c` in the per-token scratch of a piece
/// (`p.chunk.z / p.chunk.w` chunks per sequence and head); `vu4()`: vec4s of a `u` row.
pub(super) fn emit_scratch_index(w: &mut Wgsl) {
    w.raw(
        "fn tok_base(n: u32, hv: u32, c: u32) -> u32 {
    return ((n * p.hv + hv) * (p.chunk.z / p.chunk.w) + c - p.chunk.x) * C;
}
fn vu4() -> u32 { return (p.dv + 63u) / 64u * 16u; }
fn kp4() -> u32 { return (p.dk + 63u) / 64u * 16u; }
",
    );
}

/// For the output pass: `ld4_v` reads `u` of the chunk set in `ubase` (its first token `utc`).
pub fn emit_u_access(w: &mut Wgsl) {
    emit_scratch_index(w);
    w.raw(
        "var<private> ubase: u32;
var<private> utc: u32;
fn ld4_v(b: u32, t: u32, h: u32, i: u32, ok: bool) -> vec4<f32> {
    let idx = ubase + (t - utc) * vu4() + i / 4u;
    return select(vec4<f32>(0.0), v[select(0u, idx, ok)], ok);
}
",
    );
}

/// Both solve passes from their loaders to the chunk's first token `tc`, its tokens `nt`,
/// its scratch row `tb` and the scratch widths `kp`, `vu` (`local`: the second builtin of
/// `main`); a workgroup past the sequence returns.
fn solve_prologue(w: &mut Wgsl, key: &ChunkKey, local: &str) {
    emit_loaders(w, &["g", "beta"], false);
    emit_loaders4(w, key, &["q", "k", "v"]);
    emit_scratch_index(w);
    w.line("@compute @workgroup_size(WG)");
    w.open(&format!(
        "fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin({local}) {{"
    ));
    w.line("let n = wid.z;");
    w.line("let hv = wid.y;");
    w.line("let hq = hv / p.group;");
    emit_sequence(w);
    w.line("let c = p.chunk.x + wid.x;");
    w.open("if c >= p.chunk.y || c * C >= len {");
    w.line("return;");
    w.close();
    w.line("let tc = t0 + c * C;");
    w.line("let nt = min(C, len - c * C);");
    w.line("let tb = tok_base(n, hv, c);");
    w.line("let kp = kp4();");
    w.line("let vu = vu4();");
}

/// The solve pass: one workgroup per (chunk, value head, sequence).
pub fn generate_solve(key: &ChunkKey) -> String {
    let gated = key.decay == Decay::Scalar;
    let mut w = Wgsl::new(&format!(
        "{}: chunked delta rule, solve pass (generated by wgpu-attention)",
        key.label()
    ));
    header(&mut w, key);
    w.line(&format!(
        "const KS4: u32 = {}u; // vec4s per key slab",
        KS / 4
    ));
    w.line("var<workgroup> sk: array<vec4<f32>, C * KS4>; // a slab of the chunk's keys");
    w.line("var<workgroup> sa: array<f32, C * C>; // k_t . k_s, then M");
    w.line("var<workgroup> st: array<vec4<f32>, C>; // beta, b, 1/|k|, 1/|q|");
    solve_prologue(&mut w, key, "local_invocation_id) lid3: vec3<u32>");
    w.line("let lid = lid3.x;");
    w.open("if lid < C {");
    w.line("let ok = lid < nt;");
    w.line("let t = tc + lid;");
    w.line("var rk = 1.0;");
    w.line("var rq = 1.0;");
    if key.l2 {
        w.line("var ak = vec4<f32>(0.0);");
        w.line("var aq = vec4<f32>(0.0);");
        w.open("for (var f = 0u; f < p.dk; f += 4u) {");
        w.line("let x = ld4_k(b, t, hq, f, ok);");
        w.line("let y = ld4_q(b, t, hq, f, ok);");
        w.line("ak += x * x;");
        w.line("aq += y * y;");
        w.close();
        w.line("rk = inverseSqrt(ak.x + ak.y + ak.z + ak.w + 1e-6);");
        w.line("rq = inverseSqrt(aq.x + aq.y + aq.z + aq.w + 1e-6);");
    }
    let g = if gated {
        "ld_g(b, t, hv, 0u, ok)"
    } else {
        "0.0"
    };
    w.line(&format!(
        "st[lid] = vec4<f32>(ld_beta(b, t, hv, ok), {g}, rk, rq);"
    ));
    w.close();
    w.open("for (var e = lid; e < C * C; e += WG) {");
    w.line("sa[e] = 0.0;");
    w.close();
    w.line("workgroupBarrier();");
    if gated {
        w.open("if lid == 0u {");
        w.line("var run = 0.0;");
        w.open("for (var e = 0u; e < C; e++) {");
        w.line("run += st[e].y;");
        w.line("st[e].y = run;");
        w.close();
        w.close();
        w.line("workgroupBarrier();");
    }
    w.open("if lid < C {");
    w.line("tok[tb + lid] = st[lid];");
    w.close();
    w.line("// the Gram matrix of the (normalized) keys, slab by slab");
    w.open("for (var f0 = 0u; f0 < p.dk; f0 += KS4 * 4u) {");
    w.line("workgroupBarrier();");
    w.open("for (var e = lid; e < C * KS4; e += WG) {");
    w.line("let u = e / KS4;");
    w.line("sk[e] = ld4_k(b, tc + u, hq, f0 + (e % KS4) * 4u, u < nt) * st[u].z;");
    w.close();
    w.line("workgroupBarrier();");
    w.open("for (var e = lid; e < C * C; e += WG) {");
    w.line("let t = e / C;");
    w.line("let s = e % C;");
    w.open("if s < t {");
    let d: Vec<String> = (0..KS / 4)
        .map(|i| format!("dot(sk[t * KS4 + {i}u], sk[s * KS4 + {i}u])"))
        .collect();
    w.line(&format!("sa[e] += {};", d.join(" + ")));
    w.close();
    w.close();
    w.close();
    w.line("workgroupBarrier();");
    w.line("// M_ts = beta_t exp(b_t - b_s) k_t . k_s below the diagonal");
    w.open("for (var e = lid; e < C * C; e += WG) {");
    w.line("let t = e / C;");
    w.line("let s = e % C;");
    let m = if gated {
        "st[t].x * exp(st[t].y - st[s].y) * sa[e]"
    } else {
        "st[t].x * sa[e]"
    };
    w.line(&format!("sa[e] = select(0.0, {m}, s < t);"));
    w.close();
    w.line("workgroupBarrier();");
    w.line("// (I + M) Y = R by forward substitution, one vec4 column of [W | U'] per invocation");
    w.open("for (var e = lid; e < kp + vu; e += WG) {");
    w.line("let isk = e < kp;");
    w.line("let col = select(e - kp, e, isk) * 4u;");
    w.line("var y: array<vec4<f32>, C>;");
    // loops, not unrolled: SwiftShader took minutes and 24 GB to compile the unrolled solve
    w.open("for (var t = 0u; t < C; t++) {");
    w.line("let a = st[t];");
    let kf = if gated {
        "a.x * a.z * exp(a.y)"
    } else {
        "a.x * a.z"
    };
    w.line(&format!(
        "var x = select(ld4_v(b, tc + t, hv, col, t < nt && !isk) * a.x, ld4_k(b, tc + t, hq, col, t < nt && isk) * ({kf}), isk);"
    ));
    w.open("for (var s = 0u; s < t; s++) {");
    w.line("x -= sa[t * C + s] * y[s];");
    w.close();
    w.line("y[t] = x;");
    w.open("if isk {");
    w.line("wsc[(tb + t) * kp + e] = x;");
    w.close();
    w.open("else {");
    w.line("usc[(tb + t) * vu + e - kp] = x;");
    w.close();
    w.close();
    w.close();
    w.close(); // main
    w.finish()
}

/// The solve pass with subgroups (8 lanes; lavapipe, GPUs): lane `l` owns tokens
/// `l + 8m` (`m < 4`): their scalars, norms and rows of `M`, the keys of its tokens loaded by
/// itself and handed round by `subgroupShuffle`, as are the rows of `M` in the substitution,
/// where lane `l` takes `SG_SOLVE_COLS` vec4 columns at a time. No workgroup memory.
pub fn generate_solve_sg(key: &ChunkKey) -> String {
    let gated = key.decay == Decay::Scalar;
    let c = key.c();
    let nc = SG_SOLVE_COLS;
    let mut w = Wgsl::new(&format!(
        "{}: chunked delta rule, solve pass with subgroups (generated by wgpu-attention)",
        key.label()
    ));
    header(&mut w, key);
    solve_prologue(&mut w, key, "subgroup_invocation_id) lane: u32");
    let four = |f: &dyn Fn(u32) -> String| -> String {
        let v: Vec<String> = (0..4).map(f).collect();
        format!("vec4<f32>({})", v.join(", "))
    };
    for m in 0..4 {
        w.line(&format!("let ok{m} = lane + {}u < nt;", 8 * m));
    }
    w.line(&format!(
        "let bl = {}; // beta of this lane's tokens",
        four(&|m| format!("ld_beta(b, tc + lane + {}u, hv, ok{m})", 8 * m))
    ));
    w.line("var rk = vec4<f32>(1.0);");
    w.line("var rq = vec4<f32>(1.0);");
    if key.l2 {
        w.line("var ak = vec4<f32>(0.0);");
        w.line("var aq = vec4<f32>(0.0);");
        w.open("for (var f = 0u; f < p.dk; f += 4u) {");
        for m in 0..4 {
            w.line(&format!(
                "let x{m} = ld4_k(b, tc + lane + {}u, hq, f, ok{m});",
                8 * m
            ));
            w.line(&format!(
                "let y{m} = ld4_q(b, tc + lane + {}u, hq, f, ok{m});",
                8 * m
            ));
        }
        w.line(&format!("ak += {};", four(&|m| format!("dot(x{m}, x{m})"))));
        w.line(&format!("aq += {};", four(&|m| format!("dot(y{m}, y{m})"))));
        w.close();
        w.line("rk = inverseSqrt(ak + 1e-6);");
        w.line("rq = inverseSqrt(aq + 1e-6);");
    }
    // b_t, the gates summed through t, in every lane
    if gated {
        w.line(&format!(
            "let gl = {};",
            four(&|m| format!("ld_g(b, tc + lane + {}u, hv, 0u, ok{m})", 8 * m))
        ));
        w.line("var run = 0.0;");
        for t in 0..c {
            w.line(&format!(
                "run += subgroupShuffle(gl[{}], {}u);",
                t / 8,
                t % 8
            ));
            w.line(&format!("let b{t} = run;"));
        }
        w.line("var bo = vec4<f32>(b0, b8, b16, b24); // this lane's tokens");
        for l in 1..8 {
            w.line(&format!(
                "bo = select(bo, vec4<f32>(b{}, b{}, b{}, b{}), lane == {l}u);",
                l,
                l + 8,
                l + 16,
                l + 24
            ));
        }
    } else {
        w.line("let bo = vec4<f32>(0.0);");
    }
    for m in 0..4 {
        w.line(&format!(
            "tok[tb + lane + {}u] = vec4<f32>(bl[{m}], bo[{m}], rk[{m}], rq[{m}]);",
            8 * m
        ));
    }
    // the Gram rows of this lane's tokens: g{m}[s / 4][s % 4] = k_t . k_s, t = lane + 8m
    // (rows of tokens 8m .. 8m + 7 need keys s < 8m + 8 only)
    let comp = |s: u32| ["x", "y", "z", "w"][(s % 4) as usize];
    for m in 0..4 {
        w.line(&format!(
            "var g{m} = array<vec4<f32>, {}>();",
            (8 * m + 8) / 4
        ));
    }
    w.open("for (var f = 0u; f < p.dk; f += 4u) {");
    for m in 0..4 {
        w.line(&format!(
            "let kq{m} = ld4_k(b, tc + lane + {}u, hq, f, ok{m}) * rk[{m}];",
            8 * m
        ));
    }
    for s in 0..c {
        w.line(&format!(
            "let ks{s} = subgroupShuffle(kq{}, {}u);",
            s / 8,
            s % 8
        ));
        for m in (s / 8)..4 {
            w.line(&format!(
                "g{m}[{}].{} += dot(kq{m}, ks{s});",
                s / 4,
                comp(s)
            ));
        }
    }
    w.close();
    // M_ts = beta_t exp(b_t - b_s) k_t . k_s for s < t
    for m in 0..4 {
        for s in 0..(8 * m + 8) {
            let dec = if gated {
                format!(" * exp(bo[{m}] - b{s})")
            } else {
                String::new()
            };
            w.line(&format!(
                "g{m}[{}].{c} = select(0.0, bl[{m}]{dec} * g{m}[{}].{c}, {s}u < lane + {}u);",
                s / 4,
                s / 4,
                8 * m,
                c = comp(s)
            ));
        }
    }
    w.line(&format!(
        "// (I + M) Y = R, {nc} vec4 columns of [W | U'] per lane at a time; row t of M from lane t % 8"
    ));
    w.open(&format!(
        "for (var e00 = 0u; e00 < kp + vu; e00 += {}u) {{",
        8 * nc
    ));
    w.line(&format!("let e0 = e00 + lane * {nc}u;"));
    w.line("let isk = e0 < kp; // (kp is a multiple of 16: no group straddles)");
    for i in 0..nc {
        w.line(&format!(
            "let col{i} = select(e0 + {i}u - kp, e0 + {i}u, isk) * 4u;"
        ));
    }
    for t in 0..c {
        let (m, l) = (t / 8, t % 8);
        w.line(&format!("let bt{t} = subgroupShuffle(bl[{m}], {l}u);"));
        let kf = if gated {
            format!("bt{t} * subgroupShuffle(rk[{m}], {l}u) * exp(b{t})")
        } else {
            format!("bt{t} * subgroupShuffle(rk[{m}], {l}u)")
        };
        w.line(&format!("let kf{t} = {kf};"));
        for i in 0..nc {
            w.line(&format!(
                "var y{t}_{i} = select(ld4_v(b, tc + {t}u, hv, col{i}, {t}u < nt && !isk) * bt{t}, ld4_k(b, tc + {t}u, hq, col{i}, {t}u < nt && isk) * kf{t}, isk);"
            ));
        }
        for s in 0..t {
            w.line(&format!(
                "let m{t}_{s} = subgroupShuffle(g{m}[{}].{}, {l}u);",
                s / 4,
                comp(s)
            ));
            for i in 0..nc {
                w.line(&format!("y{t}_{i} -= m{t}_{s} * y{s}_{i};"));
            }
        }
    }
    w.open("if e0 >= kp + vu {");
    w.line("continue; // (past the last columns: kp + vu is a multiple of 16)");
    w.close();
    w.open("if isk {");
    for t in 0..c {
        for i in 0..nc {
            w.line(&format!("wsc[(tb + {t}u) * kp + e0 + {i}u] = y{t}_{i};"));
        }
    }
    w.close();
    w.open("else {");
    for t in 0..c {
        for i in 0..nc {
            w.line(&format!(
                "usc[(tb + {t}u) * vu + e0 + {i}u - kp] = y{t}_{i};"
            ));
        }
    }
    w.close();
    w.close();
    w.close(); // main
    w.finish()
}
