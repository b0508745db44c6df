//! The WGSL pieces the chunk kernels share (see `chunk.rs` for the passes and their keys): the
//! header, the state tile's load and store, the vec4 loaders and feature maps, and the final
//! state's write.

use super::chunk::ChunkKey;
use super::shader::{emit_phi, flags, PARAMS_WGSL};
use super::FeatureMap;
use crate::pipeline::{declare_bindings, Kernel};
use crate::tensor::DType;
use crate::wgsl::Wgsl;

pub(super) fn header(w: &mut Wgsl, key: &ChunkKey) {
    if key.dtype == DType::F16 {
        w.line("enable f16;");
    }
    w.raw(PARAMS_WGSL);
    w.raw(&declare_bindings(&key.bindings()));
    w.raw(&flags::wgsl());
    w.line(&format!("const C: u32 = {}u; // tokens per chunk", key.c()));
    w.line(&format!("const WG: u32 = {}u;", key.wg()));
    w.line(&format!(
        "const NORM: u32 = {}u; // a z column in the chunk states",
        u32::from(key.normalize)
    ));
    // the chunk states are rows of W4 vec4s: V padded to 64 columns, then z
    w.raw(
        "fn w4() -> u32 { return (p.dv + 63u) / 64u * 16u + NORM; }
fn okk(ok: bool, f: u32) -> vec4<bool> {
    return vec4<bool>(ok && f < p.dk, ok && f + 1u < p.dk, ok && f + 2u < p.dk, ok && f + 3u < p.dk);
}
",
    );
}

/// `ld_state(idx, ok, from_init)`: an element of the initial state or of the state carried
/// from the last piece (zero where not `ok`).
pub(super) const LD_STATE_WGSL: &str = "fn ld_state(idx: u32, ok: bool, from_init: bool) -> f32 {
    let i = select(0u, idx, ok);
    return select(0.0, select(s_out[i], s_in[i], from_init), ok);
}
";

/// Loop iterations once per dispatch of a kernel that holds a state tile in registers (its
/// load and store below, a row per iteration, 64 rows at most), against lavapipe's count.
pub const STATE_ROW_LOOPS: u64 = 2 * 64;

/// The initial state (`F_INIT`) or the one carried from the last piece (`F_RESUME`) into the
/// register tile `val(row, group)` (`rows` rows from `row0`, `groups` vec4s of columns `step` apart
/// from `col0`), a row per loop iteration picked into place by selects. The same tile
/// unrolled (a load per element, two for the choice of buffer) took lavapipe 44 s to compile
/// for 64 rows; this takes about a second.
pub(super) fn emit_load_state(
    w: &mut Wgsl,
    rows: u32,
    groups: u32,
    step: u32,
    val: &dyn Fn(u32, u32) -> String,
) {
    w.line("let from_init = (p.flags & F_INIT) != 0u;");
    w.open("if from_init || (p.flags & F_RESUME) != 0u {");
    w.line("let off = select(p.state.y, p.state.x, from_init);");
    w.open(&format!(
        "for (var r = 0u; r < min(p.f - row0, {rows}u); r++) {{"
    ));
    w.line("let rb = off + (srow + r) * p.vs + col0;");
    for j in 0..groups {
        let comps: Vec<String> = (0..4)
            .map(|cc| {
                let col = j * step + cc;
                format!("ld_state(rb + {col}u, col0 + {col}u < p.dv, from_init)")
            })
            .collect();
        w.line(&format!("let x{j} = vec4<f32>({});", comps.join(", ")));
    }
    for r in 0..rows {
        for j in 0..groups {
            let v = val(r, j);
            w.line(&format!("{v} = select({v}, x{j}, r == {r}u);"));
        }
    }
    w.close();
    w.close();
}

/// The final state (`F_WRITE_STATE`, `[N, HV, F, Vs]`) from the same register tile, a row
/// per loop iteration.
pub(super) fn emit_store_state(
    w: &mut Wgsl,
    rows: u32,
    groups: u32,
    step: u32,
    val: &dyn Fn(u32, u32) -> String,
) {
    w.open("if (p.flags & F_WRITE_STATE) != 0u {");
    w.open(&format!(
        "for (var r = 0u; r < min(p.f - row0, {rows}u); r++) {{"
    ));
    for j in 0..groups {
        w.line(&format!("var x{j} = {};", val(0, j)));
        for r in 1..rows {
            w.line(&format!("x{j} = select(x{j}, {}, r == {r}u);", val(r, j)));
        }
    }
    w.line("let rb = p.state.y + (srow + r) * p.vs + col0;");
    for j in 0..groups {
        for cc in 0..4 {
            let col = j * step + cc;
            w.line(&format!(
                "if col0 + {col}u < p.dv {{ s_out[rb + {col}u] = x{j}[{cc}]; }}"
            ));
        }
    }
    w.close();
    w.close();
}

/// `ld4_q`/`ld4_k`/`ld4_v(b, t, h, i, ok)`: elements `i .. i + 4` of a row (zeros where they
/// do not exist), one vec4 load when the key is aligned.
pub(super) fn emit_loaders4(w: &mut Wgsl, key: &ChunkKey, names: &[&str]) {
    for &name in names {
        let dim = if name == "v" { "p.dv" } else { "p.dk" };
        let idx = format!(
            "p.{name}_st.x + b * p.{name}_st.y + t * p.{name}_st.z + h * p.{name}_st.w + i"
        );
        if key.aligned {
            w.raw(&format!(
                "fn ld4_{name}(b: u32, t: u32, h: u32, i: u32, ok: bool) -> vec4<f32> {{
    let o = ok && i < {dim};
    let idx = ({idx}) / 4u;
    return select(vec4<f32>(0.0), vec4<f32>({name}[select(0u, idx, o)]), o);
}}
"
            ));
        } else {
            w.raw(&format!(
                "fn ld1_{name}(idx: u32, ok: bool) -> f32 {{
    return select(0.0, f32({name}[select(0u, idx, ok)]), ok);
}}
fn ld4_{name}(b: u32, t: u32, h: u32, i: u32, ok: bool) -> vec4<f32> {{
    let idx = {idx};
    return vec4<f32>(ld1_{name}(idx, ok && i < {dim}), ld1_{name}(idx + 1u, ok && i + 1u < {dim}), ld1_{name}(idx + 2u, ok && i + 2u < {dim}), ld1_{name}(idx + 3u, ok && i + 3u < {dim}));
}}
"
            ));
        }
    }
}

/// The output pass's loaders: `ld4_q`, `ld4_k`, and `ld4_v` from v, or for the delta rules
/// from the solved `u` (`chunk_delta.rs`).
pub(super) fn emit_output_loaders(w: &mut Wgsl, key: &ChunkKey) {
    if key.delta {
        emit_loaders4(w, key, &["q", "k"]);
        super::chunk_delta::emit_u_access(w);
    } else {
        emit_loaders4(w, key, &["q", "k", "v"]);
    }
}

/// `feat(x, okc)`: the feature map of four loaded features, zero where they do not exist.
pub(super) fn emit_feat(w: &mut Wgsl, map: FeatureMap) {
    emit_phi(w, map);
    let body = match map {
        FeatureMap::Identity | FeatureMap::Taylor => "x",
        _ => "select(vec4<f32>(0.0), phi(x), okc)",
    };
    w.raw(&format!(
        "fn feat(x: vec4<f32>, okc: vec4<bool>) -> vec4<f32> {{ return {body}; }}\n"
    ));
}

/// `fq4`/`fk4(b, t, h, f, ok)`: features `f .. f + 4` of a token's query or key (zeros past
/// F or where not `ok`). Taylor's (`1`, `x_a`, `x_a x_b / sqrt(2)`, x scaled by
/// `sqrt(scale)`, in the recurrent kernel's order) take one or two scalar loads each, so its
/// keys are never `aligned`.
pub(super) fn emit_features4(w: &mut Wgsl, map: FeatureMap, names: &[&str]) {
    for &n in names {
        if map != FeatureMap::Taylor {
            w.raw(&format!(
                "fn f{n}4(b: u32, t: u32, h: u32, f: u32, ok: bool) -> vec4<f32> {{ return feat(ld4_{n}(b, t, h, f, ok), okk(ok, f)); }}\n"
            ));
            continue;
        }
        w.raw(&format!(
            "fn tay_{n}(base: u32, f: u32, ok: bool) -> f32 {{
    let k = p.dk;
    let live = ok && f < p.f;
    let quad = f > k;
    let c = select(0u, f - 1u - k, quad);
    let a = select(select(f - 1u, 0u, f == 0u), c / k, quad);
    let xa = ld1_{n}(base + a, live) * p.feat_scale;
    let xb = select(1.0, ld1_{n}(base + c % k, live && quad) * p.feat_scale * 0.70710678118654752, quad);
    return select(0.0, select(xa * xb, 1.0, f == 0u), live);
}}
fn f{n}4(b: u32, t: u32, h: u32, f: u32, ok: bool) -> vec4<f32> {{
    let base = p.{n}_st.x + b * p.{n}_st.y + t * p.{n}_st.z + h * p.{n}_st.w;
    return vec4<f32>(tay_{n}(base, f, ok), tay_{n}(base, f + 1u, ok), tay_{n}(base, f + 2u, ok), tay_{n}(base, f + 3u, ok));
}}
"
        ));
    }
}

/// The state pass's final state, `[N, HV, F, Vs]` under `F_WRITE_STATE`: `rows` rows from
/// `row0`, `groups` vec4s of columns `step` apart from `col0` (`val(row, group)`), z from the
/// workgroup of the first columns.
pub(super) fn emit_final_state(
    w: &mut Wgsl,
    rows: u32,
    groups: u32,
    step: u32,
    val: &dyn Fn(u32, u32) -> String,
    z: Option<&dyn Fn(u32) -> String>,
) {
    w.open("if (p.flags & F_WRITE_STATE) != 0u {");
    for r in 0..rows {
        w.open(&format!("if row0 + {r}u < p.f {{"));
        w.line(&format!(
            "let rb = p.state.y + (srow + {r}u) * p.vs + col0;"
        ));
        for j in 0..groups {
            for cc in 0..4 {
                let col = j * step + cc;
                w.line(&format!(
                    "if col0 + {col}u < p.dv {{ s_out[rb + {col}u] = {}[{cc}]; }}",
                    val(r, j)
                ));
            }
        }
        if let Some(z) = z {
            w.line(&format!(
                "if wid.x == 0u {{ s_out[rb - col0 + p.dv] = {}; }}",
                z(r)
            ));
        }
        w.close();
    }
    w.close();
}
