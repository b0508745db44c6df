//! WGSL generation for the tiled FlashAttention-2 forward kernel.
//!
//! One generator, two strategies (see ARCHITECTURE.md, "variant policy"):
//! - [`Strategy::Tiled`]: FlashAttention-2 tiles. A workgroup owns `WG * R` query rows; K/V tiles
//!   of `BC` keys stream through workgroup memory. No subgroup operations: runs everywhere,
//!   the browser included.
//! - [`Strategy::Subgroup`]: for CPU adapters (lavapipe, SwiftShader) where workgroup memory
//!   is plain memory and what costs is loads per FMA. Each lane loads one K row and one V row
//!   into registers and the subgroup hands them round with `subgroupShuffle`; every lane owns `R`
//!   query rows, so each shuffled value feeds `R` FMAs.
//!
//! Everything inside a key group (`U` keys x head dim) is unrolled in the generated text: Mesa's
//! llvmpipe stops any loop after 65535 iterations per invocation, so only the key-block loops may
//! remain loops, and the plan bounds their trip count.
//!
//! Maths (FlashAttention-2, base 2): for each query row, running max `m`, running sum `l`,
//! accumulator `acc`. For a group of keys with scores `s_u` (already times log2 e):
//! `m' = max(m, s_u)`, `c = 2^(m - m')`, `p_u = 2^(s_u - m')`, `l = c l + sum p_u`,
//! `acc = c acc + sum p_u v_u`. At the end `O = acc / l` and `LSE = (m + log2 l) ln 2`.

use crate::pipeline::{declare_bindings, BindingDecl, Kernel};
use crate::tensor::DType;
use crate::wgsl::Wgsl;

/// How the kernel shares K/V between invocations.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Strategy {
    /// K/V tiles in workgroup memory (FlashAttention-2). No subgroup operations.
    Tiled,
    /// K/V rows in registers, handed round the subgroup with shuffles. Needs SUBGROUP.
    Subgroup,
    /// Neighborhood attention on CPU adapters: each lane owns one position of the inner axes
    /// and the subgroup sweeps the outer axis (x) one key plane at a time, keeping `rows` query
    /// slots (x's kernel size) live, so each loaded key plane serves every query whose window
    /// holds it. Q, K and V are read through textures (bindings 9 to 11, copied from the
    /// buffers in the same command encoder). Needs SUBGROUP.
    Sweep,
}

/// Everything that is text specialization for the flash kernel. Shapes, scale, masks and
/// lengths are uniforms, not part of the key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlashKey {
    pub strategy: Strategy,
    pub dtype: DType,
    /// Head dim bucket of Q/K, in vec4s (`D <= 4 * d4`).
    pub d4: u32,
    /// Head dim bucket of V/O, in vec4s.
    pub dv4: u32,
    /// Query rows per invocation (Sweep: query slots, the x kernel size).
    pub rows: u32,
    /// Keys per workgroup-memory tile (Tiled only; 0 for Subgroup and Sweep, whose block is the
    /// subgroup).
    pub block: u32,
    /// Keys per unrolled group.
    pub group: u32,
    /// Invocations per workgroup.
    pub wg: u32,
    /// Score modifications compiled in (softcap, ALiBi, bias; which of them apply is a uniform
    /// flag). Off, the kernel has none of their code and loads.
    pub mods: bool,
    /// Neighborhood attention (NATTEN): queries are tiles of a 3-axis grid, keys are the
    /// union box of their windows flattened, the mask is the neighborhood (no `mods`).
    pub na: bool,
    /// Sweep only: pinned slots for the queries at x's borders, whose shifted window outlives
    /// their slot (k / 2 non-causal, 0 causal).
    pub pins: u32,
}

impl FlashKey {
    pub fn label(&self) -> String {
        format!(
            "flash_{:?}_{}_d{}_dv{}_r{}_b{}_u{}_wg{}{}{}{}",
            self.strategy,
            self.dtype,
            self.d4 * 4,
            self.dv4 * 4,
            self.rows,
            self.block,
            self.group,
            self.wg,
            if self.mods { "_mods" } else { "" },
            if self.na { "_na" } else { "" },
            if self.strategy == Strategy::Sweep {
                format!("_p{}", self.pins)
            } else {
                String::new()
            }
        )
        .to_lowercase()
    }

    /// Bind group 0: params, Q, K, V, O, LSE, bias, ALiBi slopes, lengths (optional inputs
    /// get a dummy buffer, so every specialization binds alike), and for the Sweep kernel the
    /// Q/K/V textures.
    pub fn bindings(&self) -> Vec<BindingDecl> {
        let t = self.dtype.wgsl();
        let mut b = vec![
            BindingDecl::uniform("p", "Params"),
            BindingDecl::read("q_buf", t, "[B, Lq, Hq, D]"),
            BindingDecl::read("k_buf", t, "[B, Lk, Hkv, D]"),
            BindingDecl::read("v_buf", t, "[B, Lk, Hkv, Dv]"),
            BindingDecl::read_write("o_buf", t, "[B, Lq, Hq, Dv]"),
            BindingDecl::read_write("lse_buf", "f32", "[B, Hq, Lq] (strides in p.lse)"),
            BindingDecl::read("bias_buf", "f32", "[B|1, Hq|1, Lq, Lk]"),
            BindingDecl::read("alibi_buf", "f32", "[Hq]"),
            BindingDecl::read("lens_buf", "u32", "[2B]: q lens, kv lens"),
        ];
        if self.strategy == Strategy::Sweep {
            b.push(BindingDecl::texture(
                "q_tex",
                "Q, K, V as texels of 4 elements",
            ));
            b.push(BindingDecl::texture("k_tex", ""));
            b.push(BindingDecl::texture("v_tex", ""));
        }
        b
    }

    /// Query rows covered by one workgroup.
    pub fn rows_per_workgroup(&self) -> u32 {
        self.wg * self.rows
    }

    /// Bytes of workgroup memory the kernel declares.
    pub fn workgroup_bytes(&self) -> u32 {
        match self.strategy {
            Strategy::Tiled => self.block * (self.d4 + self.dv4) * 16,
            Strategy::Subgroup | Strategy::Sweep => 0,
        }
    }
}

impl Kernel for FlashKey {
    fn label(&self) -> String {
        FlashKey::label(self)
    }
    fn source(&self) -> String {
        flash_source(self)
    }
    fn bindings(&self) -> Vec<BindingDecl> {
        FlashKey::bindings(self)
    }
    fn workgroup_bytes(&self) -> u32 {
        FlashKey::workgroup_bytes(self)
    }
    fn uniform(&self) -> crate::pipeline::UniformLayout {
        crate::uniform_layout!(FlashParams, "Params"; batch, hq, hkv, lq, lk, d, dv, flags, q, k,
            v, o, bias, scale, softcap, win_left, win_right, kv_start, kv_end, sinks, _pad, lse,
            na_n, na_kernel, na_dil, na_stride, na_sub, na_wgrid, na_tiles)
    }
    fn capabilities(&self) -> naga::valid::Capabilities {
        use naga::valid::Capabilities as C;
        let mut caps = C::empty();
        if self.dtype == DType::F16 {
            caps |= C::SHADER_FLOAT16;
        }
        if self.strategy != Strategy::Tiled {
            caps |= C::SUBGROUP;
        }
        caps
    }
}

/// Bits of `Params::flags`, declared once: the WGSL constants are generated from [`flags::ALL`].
pub mod flags {
    pub const CAUSAL: u32 = 1;
    pub const SOFTCAP: u32 = 2;
    pub const ALIBI: u32 = 4;
    pub const BIAS: u32 = 8;
    pub const LSE: u32 = 16;
    pub const Q_LENS: u32 = 32;
    pub const KV_LENS: u32 = 64;
    pub const WINDOW_LEFT: u32 = 128;
    pub const WINDOW_RIGHT: u32 = 256;
    /// Neighborhood: axis `a` is causal (bit `NA_CAUSAL << a`).
    pub const NA_CAUSAL: u32 = 512;

    /// Every flag with its WGSL name.
    pub const ALL: [(&str, u32); 10] = [
        ("F_CAUSAL", CAUSAL),
        ("F_SOFTCAP", SOFTCAP),
        ("F_ALIBI", ALIBI),
        ("F_BIAS", BIAS),
        ("F_LSE", LSE),
        ("F_QLENS", Q_LENS),
        ("F_KVLENS", KV_LENS),
        ("F_WLEFT", WINDOW_LEFT),
        ("F_WRIGHT", WINDOW_RIGHT),
        ("F_NA_CAUSAL", NA_CAUSAL),
    ];

    /// The WGSL constants of [`ALL`].
    pub fn wgsl() -> String {
        ALL.iter()
            .map(|(name, bit)| format!("const {name}: u32 = {bit}u;\n"))
            .collect()
    }
}

/// The uniform block, mirrored field for field by `Params` in WGSL.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, bytemuck::Pod, bytemuck::Zeroable)]
pub struct FlashParams {
    pub batch: u32,
    pub hq: u32,
    pub hkv: u32,
    pub lq: u32,
    pub lk: u32,
    pub d: u32,
    pub dv: u32,
    pub flags: u32,
    /// Offset and strides (batch, seq, head) in elements; the dim axis is contiguous.
    pub q: [u32; 4],
    pub k: [u32; 4],
    pub v: [u32; 4],
    pub o: [u32; 4],
    /// Bias offset and strides (batch, head, query); 0 stride broadcasts. Key axis contiguous.
    pub bias: [u32; 4],
    pub scale: f32,
    pub softcap: f32,
    pub win_left: i32,
    pub win_right: i32,
    /// Only keys in `[kv_start, kv_end)` are visited by this dispatch.
    pub kv_start: u32,
    pub kv_end: u32,
    pub sinks: u32,
    pub _pad: u32,
    /// LSE offset and strides (batch, head, query) in elements.
    pub lse: [u32; 4],
    /// Neighborhood (NA kernels only): axis lengths, tiles per dilation group.
    pub na_n: [u32; 4],
    /// Kernel size, dilation and stride per axis (4th lane unused).
    pub na_kernel: [u32; 4],
    pub na_dil: [u32; 4],
    pub na_stride: [u32; 4],
    /// Query sub-box of one subgroup per axis, and its size.
    pub na_sub: [u32; 4],
    /// Sub-boxes per workgroup tile per axis, and their count.
    pub na_wgrid: [u32; 4],
    /// Workgroup tiles per dilation group per axis.
    pub na_tiles: [u32; 4],
}

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
    na_n: vec4<u32>, // neighborhood: axis lengths, tiles per dilation group
    na_kernel: vec4<u32>,
    na_dil: vec4<u32>,
    na_stride: vec4<u32>,
    na_sub: vec4<u32>,   // query box of one subgroup (x, y, z, size)
    na_wgrid: vec4<u32>, // boxes per workgroup tile (x, y, z, count)
    na_tiles: vec4<u32>, // workgroup tiles per dilation group (x, y, z)
}
";

/// Masking and score modification shared by both strategies.
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

/// Sequence kernels: key `j` lives at row `j` (clamped: overhanging lanes load a valid row).
const SEQ_WGSL: &str = "
fn key_row(j: u32) -> u32 { return min(j, p.lk - 1u); }
";

/// Neighborhood kernels: NATTEN's window on one axis, in dilation-group coordinates, and the keys
/// of the flattened key box (`key_at`, `key_row`). Definitions: `src/neighborhood/mod.rs`.
const NA_WGSL: &str = "
var<private> na_gc: vec3<u32>;   // dilation group of this workgroup
var<private> na_lo: vec3<i32>;   // first key of the key box, group coordinates
var<private> na_span: vec3<u32>; // size of the key box

// Group coordinates of key j of the key box, flattened with z fastest (j past the end reads the
// last key: callers mask it out by index).
fn key_at(j: u32) -> vec3<i32> {
    let jj = min(j, max(na_span.x * na_span.y * na_span.z, 1u) - 1u);
    let r = jj / na_span.z;
    return na_lo + vec3<i32>(vec3<u32>(r / na_span.y, r % na_span.y, jj % na_span.z));
}

fn key_row(j: u32) -> u32 { return na_token(na_gc, vec3<u32>(key_at(j))); }

// positions x < n with x % d == g
fn na_len(n: u32, d: u32, g: u32) -> u32 { return (n - g + d - 1u) / d; }

// First key of query x's window on an axis of (group) length n: the window of the stride
// group's leader, shifted inside the axis (non-causal) or ending at the leader (causal).
fn na_start(x: i32, n: i32, k: i32, s: i32, causal: bool) -> i32 {
    let left = k / 2;
    let right = k / 2 + k % 2 - 1;
    let lead = min((x / s) * s + s / 2, n - 1);
    let shifted = select(max(lead - left, 0), n - k, lead + right >= n);
    let lead_c = min((x / s) * s + s - 1, n - 1);
    return select(shifted, max(lead_c - left - right, 0), causal);
}

// One past the last key: k keys on, or up to the query itself when causal.
fn na_end(x: i32, start: i32, n: i32, k: i32, causal: bool) -> i32 {
    return select(start + k, min(x + 1, n), causal);
}

fn na_mask(raw: f32, vis: bool) -> f32 {
    let t = raw * LOG2E;
    return select(MASKED, select(t, MASKED, t <= MASKED), vis);
}
";

/// `modify()`: masking and, when the key has `mods`, the score modifications in FlashAttention's
/// order (scale is folded into q; then softcap, ALiBi, bias). Returns the score in base 2, or
/// MASKED. Branch-free like `visible()`.
fn modify_fn(w: &mut Wgsl, mods: bool) {
    w.raw(
        "fn modify(raw: f32, b: u32, h: u32, i: u32, j: u32, qlen: u32, kvlen: u32) -> f32 {
    var s = raw;",
    );
    if mods {
        w.raw(
            "    s = select(s, p.softcap * tanh_safe(s / p.softcap), has(F_SOFTCAP));
    let dist = f32(abs(i32(i) + i32(kvlen) - i32(qlen) - i32(j)));
    s = s - select(0.0, alibi_buf[h], has(F_ALIBI)) * dist;
    let bias_at = p.bias.x + b * p.bias.y + h * p.bias.z + i * p.bias.w + j;
    s = s + select(0.0, bias_buf[bias_at], has(F_BIAS));",
        );
    }
    w.raw(
        "    let t = s * LOG2E;
    // -inf from an additive mask becomes MASKED; NaN stays NaN.
    return select(MASKED, select(t, MASKED, t <= MASKED), visible(i, j, qlen, kvlen));
}",
    );
}

/// Texels per row of the Sweep kernel's input textures (a power of two: the kernel splits a
/// texel index with a mask and a shift).
pub const TEXTURE_WIDTH: u32 = 4096;

/// `ld_q`, `ld_k`, `ld_v` (vec4 `c` of the head dim at element `base`; elements past the head
/// dim read as 0 so padded lanes add nothing) and `st_o`.
///
/// `textured` (the Sweep kernel): Q, K and V are read through textures, element `e` of a buffer
/// being component `e % 4` of texel `e / 4`, rows of [`TEXTURE_WIDTH`] texels (the host copies
/// the buffers in, with offsets and strides that are multiples of 4). On llvmpipe a texel fetch
/// is a branch-free gather of 16 bytes per lane, where a storage-buffer load is a loop over
/// lanes with a branch per component.
fn loaders(w: &mut Wgsl, t: &str, textured: bool) {
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
fn store_row(w: &mut Wgsl, dv4: u32, m: &str, l: &str, acc: &str) {
    w.line(&format!("let inv = select(0.0, 1.0 / {l}, {l} > 0.0);"));
    w.line("let ob = p.o.x + b * p.o.y + row * p.o.z + h * p.o.w;");
    for i in 0..dv4 {
        w.line(&format!("st_o(ob, {}u, {acc}[{i}] * inv);", i * 4));
    }
    w.open("if (has(F_LSE)) {");
    w.line(&format!(
        "lse_buf[p.lse.x + b * p.lse.y + h * p.lse.z + row * p.lse.w] = select(neg_inf(), ({m} + log2({l})) * LN2, {l} > 0.0);"
    ));
    w.close();
}

/// Generates the WGSL source of one flash specialization.
pub fn flash_source(key: &FlashKey) -> String {
    let t = key.dtype.wgsl();
    let (r_n, u_n, d4, dv4) = (key.rows, key.group, key.d4, key.dv4);
    let mut w = Wgsl::new(&format!(
        "Generated by wgpu-attention (src/flash/shader.rs) for {key:?}.\nDo not edit: change the generator."
    ));
    if key.dtype == DType::F16 {
        w.line("enable f16;");
    }
    w.raw(PARAMS_WGSL);
    w.raw(&declare_bindings(&key.bindings()));
    w.raw(&flags::wgsl());
    w.raw(COMMON_WGSL);
    if key.na {
        w.raw(NA_WGSL);
        w.raw(NA_GRID_WGSL);
    } else {
        w.raw(SEQ_WGSL);
        modify_fn(&mut w, key.mods);
    }
    loaders(&mut w, t, key.strategy == Strategy::Sweep);
    if key.strategy == Strategy::Tiled {
        w.line(&format!(
            "var<workgroup> k_tile: array<vec4<f32>, {}>; // [BC, D/4]",
            key.block * d4
        ));
        w.line(&format!(
            "var<workgroup> v_tile: array<vec4<f32>, {}>; // [BC, Dv/4]",
            key.block * dv4
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
    if key.strategy == Strategy::Sweep {
        sweep_kernel(&mut w, key);
        w.close();
        return w.finish();
    }
    if key.na {
        na_prologue(&mut w, key, r_n);
    } else {
        seq_prologue(&mut w, key);
    }
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
            open_passes(&mut w, key);
            w.open("for (var kb = pass_lo; kb < pass_hi; kb += sg_size) {");
            w.line("// each lane holds one K row and one V row of this block");
            if key.na {
                w.line("let kc = key_at(kb + lane);");
                w.line("let kj = na_token(na_gc, vec3<u32>(kc));");
            } else {
                w.line("let kj = key_row(kb + lane);");
            }
            for i in 0..d4 {
                w.line(&format!("kr[{i}] = ld_k(k_head + kj * p.k.z, {}u);", i * 4));
            }
            for i in 0..dv4 {
                w.line(&format!("vr[{i}] = ld_v(v_head + kj * p.v.z, {}u);", i * 4));
            }
            w.open(&format!("for (var g = 0u; g < sg_size; g += {u_n}u) {{"));
            let (keys, score) = row_masks(key);
            group_body(&mut w, key, r_n, "", &keys, &score, |x, u, i| {
                format!("subgroupShuffle({x}[{i}], g + {u}u)")
            });
            w.close();
            w.close();
            w.close();
        }
        Strategy::Tiled => {
            let bc = key.block;
            open_passes(&mut w, key);
            w.open(&format!(
                "for (var kb = pass_lo; kb < pass_hi; kb += {bc}u) {{"
            ));
            w.line("// cooperative load of a K/V tile into workgroup memory");
            for (tile, n4, ld, head, stride) in [
                ("k_tile", d4, "ld_k", "k_head", "p.k.z"),
                ("v_tile", dv4, "ld_v", "v_head", "p.v.z"),
            ] {
                let total = bc * n4;
                for step in 0..total.div_ceil(key.wg) {
                    let guard = if (step + 1) * key.wg > total {
                        format!("if (lid + {}u < {total}u) ", step * key.wg)
                    } else {
                        String::new()
                    };
                    w.line(&format!(
                        "{guard}{{ let x = lid + {o}u; let kj = key_row(kb + x / {n4}u); {tile}[x] = {ld}({head} + kj * {stride}, (x % {n4}u) * 4u); }}",
                        o = step * key.wg
                    ));
                }
            }
            w.line("workgroupBarrier();");
            if bc == u_n {
                w.open("{");
                w.line("let g = 0u;");
            } else {
                w.open(&format!("for (var g = 0u; g < {bc}u; g += {u_n}u) {{"));
            }
            let (keys, score) = row_masks(key);
            group_body(&mut w, key, r_n, "", &keys, &score, |x, u, i| {
                let (tile, n4) = if x == "kr" {
                    ("k_tile", d4)
                } else {
                    ("v_tile", dv4)
                };
                format!("{tile}[(g + {u}u) * {n4}u + {i}u]")
            });
            w.close();
            w.line("workgroupBarrier();");
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
        );
        w.close();
    }
    w.close();
    w.finish()
}

/// Sequence kernels: rows `row0 .. row0 + R` of the sequence; the key range `[kv_lo, kv_hi)`
/// from causality and the window, bounded per subgroup (Subgroup) or workgroup (Tiled).
fn seq_prologue(w: &mut Wgsl, key: &FlashKey) {
    let r_n = key.rows;
    w.raw(&format!(
        "    let b = wid.z;
    let h = wid.y;
    let hk = h / (p.hq / p.hkv);          // GQA: query head h reads kv head h / (Hq / Hkv)
    var qlen = p.lq;
    var kvlen = p.lk;
    if (has(F_QLENS)) {{ qlen = min(lens_buf[b], p.lq); }}
    if (has(F_KVLENS)) {{ kvlen = min(lens_buf[p.batch + b], p.lk); }}
    let tile0 = wid.x * {rpw}u;            // first query row of this workgroup
    let row0 = tile0 + lid * {r_n}u;       // this invocation's rows: row0 .. row0 + R
{bounds}
    let diag_off = i32(kvlen) - i32(qlen);
    var hi = min(i32(kvlen), i32(p.kv_end));
    var lo = i32(p.kv_start);
    if (has(F_CAUSAL)) {{ hi = min(hi, last + diag_off + 1); }}
    let hi_sinks = min(hi, i32(min(p.sinks, p.kv_end))); // sinks right of the window still count
    if (has(F_WRIGHT)) {{ hi = max(min(hi, last + diag_off + p.win_right + 1), hi_sinks); }}
    if (has(F_WLEFT)) {{ lo = max(lo, first + diag_off - p.win_left); }}
    if (last < first) {{ hi = lo; }}
    let kv_lo = u32(max(lo, 0));
    let kv_hi = u32(max(hi, max(lo, 0)));
    let k_head = p.k.x + b * p.k.y + hk * p.k.w;
    let v_head = p.v.x + b * p.v.y + hk * p.v.w;
",
        rpw = key.rows_per_workgroup(),
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

/// Grid helpers of neighborhood kernels (axis order x, y, z; z innermost in memory).
const NA_GRID_WGSL: &str = "
fn na_split(i: u32, box: vec3<u32>) -> vec3<u32> {
    return vec3<u32>(i / (box.y * box.z), (i / box.z) % box.y, i % box.z);
}

// token index of group coordinates x in dilation group g
fn na_token(g: vec3<u32>, x: vec3<u32>) -> u32 {
    let pos = g + p.na_dil.xyz * x;
    return (pos.x * p.na_n.y + pos.y) * p.na_n.z + pos.z;
}

fn na_causal(a: u32) -> bool { return has(F_NA_CAUSAL << a); }

fn na_starts(x: vec3<i32>, n: vec3<i32>) -> vec3<i32> {
    let k = vec3<i32>(p.na_kernel.xyz);
    let s = vec3<i32>(p.na_stride.xyz);
    return vec3<i32>(na_start(x.x, n.x, k.x, s.x, na_causal(0u)),
                     na_start(x.y, n.y, k.y, s.y, na_causal(1u)),
                     na_start(x.z, n.z, k.z, s.z, na_causal(2u)));
}

fn na_ends(x: vec3<i32>, start: vec3<i32>, n: vec3<i32>) -> vec3<i32> {
    let k = vec3<i32>(p.na_kernel.xyz);
    return vec3<i32>(na_end(x.x, start.x, n.x, k.x, na_causal(0u)),
                     na_end(x.y, start.y, n.y, k.y, na_causal(1u)),
                     na_end(x.z, start.z, n.z, k.z, na_causal(2u)));
}
";

/// Neighborhood kernels: the workgroup owns one tile of one dilation group (every coordinate
/// below is in group coordinates); each row knows its window `[ws, we)` per axis, and the key
/// box `[lo, hi)` is the union of the windows of the subgroup's rows (Subgroup) or of the
/// workgroup's tile (Tiled): keys outside it are never loaded.
fn na_prologue(w: &mut Wgsl, key: &FlashKey, r_n: u32) {
    w.raw(
        "    let b = wid.z;
    let h = wid.y;
    let hk = h / (p.hq / p.hkv);            // GQA: query head h reads kv head h / (Hq / Hkv)
    let gc = na_split(wid.x / p.na_n.w, p.na_dil.xyz); // dilation group of this workgroup
    let ng = vec3<u32>(na_len(p.na_n.x, p.na_dil.x, gc.x), na_len(p.na_n.y, p.na_dil.y, gc.y),
                       na_len(p.na_n.z, p.na_dil.z, gc.z));
    let ngi = vec3<i32>(ng);
    na_gc = gc;
    let tile = p.na_sub.xyz * p.na_wgrid.xyz;
    let origin = na_split(wid.x % p.na_n.w, p.na_tiles.xyz) * tile;
    let k_head = p.k.x + b * p.k.y + hk * p.k.w;
    let v_head = p.v.x + b * p.v.y + hk * p.v.w;",
    );
    for r in 0..r_n {
        w.line(&format!("let loc{r} = lid * {r_n}u + {r}u;"));
        w.line(&format!(
            "let x{r} = origin + p.na_sub.xyz * na_split(loc{r} / p.na_sub.w, p.na_wgrid.xyz) + na_split(loc{r} % p.na_sub.w, p.na_sub.xyz);"
        ));
        w.line(&format!(
            "let ok{r} = (loc{r} / p.na_sub.w < p.na_wgrid.w) & all(x{r} < ng);"
        ));
        w.line(&format!(
            "let xc{r} = vec3<i32>(min(x{r}, ng - vec3<u32>(1u)));"
        ));
        w.line(&format!("let tok{r} = na_token(gc, vec3<u32>(xc{r}));"));
        w.line(&format!("let ws{r} = na_starts(xc{r}, ngi);"));
        w.line(&format!("let we{r} = na_ends(xc{r}, ws{r}, ngi);"));
    }
    match key.strategy {
        Strategy::Subgroup | Strategy::Sweep => {
            w.line("var lo_l = vec3<i32>(1 << 30);");
            w.line("var hi_l = vec3<i32>(0);");
            for r in 0..r_n {
                w.line(&format!("lo_l = select(lo_l, min(lo_l, ws{r}), ok{r});"));
                w.line(&format!("hi_l = select(hi_l, max(hi_l, we{r}), ok{r});"));
            }
            w.line("// keys this subgroup can see (uniform over the subgroup)");
            w.line("let lo = subgroupMin(lo_l);");
            w.line("let hi = subgroupMax(hi_l);");
        }
        Strategy::Tiled => {
            // windows are monotone in the query coordinate: the tile's corners bound them
            w.line("// keys this workgroup's tile can see (uniform over the workgroup)");
            w.line("let last = vec3<i32>(min(origin + tile, ng)) - 1;");
            w.line("let lo = na_starts(vec3<i32>(origin), ngi);");
            w.line(
                "let hi = select(na_ends(last, na_starts(last, ngi), ngi), vec3<i32>(0), origin >= ng);",
            );
        }
    }
}

/// Two passes over keys: the attention sinks left of the window (`[kv_start, min(sinks, kv_lo))`),
/// then the window's own range `[kv_lo, kv_hi)`. Bounds are uniform, as barriers and shuffles
/// need.
///
/// Neighborhood kernels: one pass over the key box `[lo, hi)` flattened (z fastest), so a block
/// of keys may span lines of the innermost axis and no block is padded at the end of a line
/// (a 20 x 20 box is 50 blocks of 8, not 20 lines of 3). Each key's coordinates are checked
/// against each row's window on every axis.
fn open_passes(w: &mut Wgsl, key: &FlashKey) {
    if !key.na {
        w.open("for (var kpass = 0u; kpass < 2u; kpass++) {");
        w.line("let pass_lo = select(kv_lo, p.kv_start, kpass == 0u);");
        w.line("let pass_hi = select(kv_hi, min(min(p.sinks, kv_lo), p.kv_end), kpass == 0u);");
        w.line("range_lo = pass_lo;");
        w.line("range_hi = pass_hi;");
        return;
    }
    w.line("na_lo = lo;");
    w.line("let span = vec3<u32>(max(hi - lo, vec3<i32>(0)));");
    w.line("na_span = span;");
    w.open("{");
    w.line("let pass_lo = 0u;");
    w.line("let pass_hi = span.x * span.y * span.z;");
    w.line("range_lo = pass_lo;");
    w.line("range_hi = pass_hi;");
}

/// One group of `U` keys: scores, masking, online-softmax update, P·V, for `rows` query rows
/// whose state is named `{pre}q{r}`, `{pre}m{r}`, `{pre}l{r}`, `{pre}acc{r}`. `fetch(x, u, i)`
/// returns the expression for vec4 `i` of key (x = "kr") or value (x = "vr") number `g + u`;
/// `keys` emits what the masks need per key, `score(r, u)` the masked score of row r, key u.
fn group_body(
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
    for i in 0..key.dv4 {
        for r in 0..r_n {
            w.line(&format!("{pre}acc{r}[{i}] *= c{r};"));
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

/// The masks of the Subgroup and Tiled kernels: per-key lines and per-row scores.
fn row_masks(key: &FlashKey) -> (impl Fn(&mut Wgsl) + '_, impl Fn(u32, u32) -> String + '_) {
    let keys = move |w: &mut Wgsl| {
        if key.na {
            for u in 0..key.group {
                w.line(&match key.strategy {
                    Strategy::Tiled => format!("let kc{u} = key_at(kb + g + {u}u);"),
                    _ => format!("let kc{u} = subgroupShuffle(kc, g + {u}u);"),
                });
                w.line(&format!("let kin{u} = kb + g + {u}u < pass_hi;"));
            }
        }
    };
    let score = move |r: u32, u: u32| {
        if key.na {
            format!("na_mask(s{r}_{u}, ok{r} & kin{u} & all(kc{u} >= ws{r}) & all(kc{u} < we{r}))")
        } else {
            format!("modify(s{r}_{u}, b, h, tok{r}, kb + g + {u}u, qlen, kvlen)")
        }
    };
    (keys, score)
}

/// The Sweep kernel (neighborhood attention on CPU adapters), see [`Strategy::Sweep`].
///
/// Each lane owns one position (y, z) of the inner axes; the subgroup walks the key planes
/// `x' = 0 .. n_x` of its dilation group and streams each plane's union box (y, z) once. Slot `r`
/// holds query `x = x' + before - (S - 1) + r`: a query enters the newest slot `before` planes
/// ahead of its own and leaves slot 0 `after` planes past it, so along x it sees the planes
/// `[x - before, x + after]` clipped to the axis. That is NATTEN's window for every query but
/// those at x's borders, whose non-causal window is shifted inside the axis: after the sweep,
/// `pins` pinned slots finish them (the top ones continue from where their slot stopped, the
/// bottom ones compute the planes they missed and merge with their slot's state). Along y and z
/// the mask is per lane, as in the Subgroup kernel.
fn sweep_kernel(w: &mut Wgsl, key: &FlashKey) {
    let (s_n, p_n, d4, dv4, u_n) = (key.rows, key.pins, key.d4, key.dv4, key.group);
    na_prologue(w, key, 1);
    w.raw(
        "    let nx = ngi.x;
    let kx = i32(p.na_kernel.x);
    let causal_x = na_causal(0u);
    let before = select(kx / 2, kx - 1, causal_x); // planes a query's slot opens ahead of it
    let after = kx - 1 - before;                  // and stays open past it
    let top = select(before, 0, causal_x);        // queries x < top: window shifted up the axis
    let bottom = select(after, 0, causal_x);      // queries x >= nx - bottom: shifted down
    let span = vec3<u32>(1u, vec2<u32>(max(hi.yz - lo.yz, vec2<i32>(0))));
    na_span = span;
    let nbox = span.y * span.z;                   // keys of one plane's union box
    let lane_yz = vec2<u32>(xc0.yz);",
    );
    let load_q = |w: &mut Wgsl, name: &str, x: &str| {
        w.open("{");
        w.line(&format!(
            "let t = na_token(gc, vec3<u32>(u32(clamp({x}, 0, nx - 1)), lane_yz));"
        ));
        w.line("let qb = p.q.x + b * p.q.y + t * p.q.z + h * p.q.w;");
        for i in 0..d4 {
            w.line(&format!("{name}[{i}] = ld_q(qb, {}u) * p.scale;", i * 4));
        }
        w.close();
    };
    let write = |w: &mut Wgsl, pre: &str, r: u32, x: &str, cond: &str| {
        w.open(&format!("if ({cond}) {{"));
        w.line(&format!(
            "let row = na_token(gc, vec3<u32>(u32({x}), lane_yz));"
        ));
        let state = |v: &str| format!("{pre}{v}{r}");
        store_row(w, dv4, &state("m"), &state("l"), &state("acc"));
        w.close();
    };
    // One plane (x = xs): its union box in blocks of one key per lane, shuffled round.
    let plane = |w: &mut Wgsl, rows: u32, pre: &str, live: bool| {
        w.line("na_lo = vec3<i32>(xs, lo.y, lo.z);");
        w.open("for (var kb = 0u; kb < nbox; kb += sg_size) {");
        w.line("let kc = key_at(kb + lane);");
        w.line("let kj = na_token(na_gc, vec3<u32>(kc));");
        for i in 0..d4 {
            w.line(&format!("kr[{i}] = ld_k(k_head + kj * p.k.z, {}u);", i * 4));
        }
        for i in 0..dv4 {
            w.line(&format!("vr[{i}] = ld_v(v_head + kj * p.v.z, {}u);", i * 4));
        }
        w.line("let gend = min(sg_size, nbox - kb);");
        w.open(&format!("for (var g = 0u; g < gend; g += {u_n}u) {{"));
        let keys = |w: &mut Wgsl| {
            for u in 0..u_n {
                w.line(&format!("let kc{u} = subgroupShuffle(kc, g + {u}u);"));
                w.line(&format!(
                    "let vis{u} = ok0 & (kb + g + {u}u < nbox) & all(kc{u}.yz >= ws0.yz) & all(kc{u}.yz < we0.yz);"
                ));
            }
        };
        let score = |r: u32, u: u32| {
            let live = if live {
                format!(" & live{r}")
            } else {
                String::new()
            };
            format!("na_mask(s{r}_{u}, vis{u}{live})")
        };
        group_body(w, key, rows, pre, &keys, &score, |x, u, i| {
            format!("subgroupShuffle({x}[{i}], g + {u}u)")
        });
        w.close();
        w.close();
    };

    for r in 0..s_n {
        w.line(&format!(
            "var q{r}: array<vec4<f32>, {d4}>; var acc{r}: array<vec4<f32>, {dv4}>; var m{r} = MASKED; var l{r} = 0.0;"
        ));
    }
    w.line(&format!(
        "// before plane 0, slot r holds query before - {s_n} + r (it shifts down first)"
    ));
    for r in 1..s_n {
        load_q(w, &format!("q{r}"), &format!("before - {s_n} + {r}"));
    }
    for j in 0..p_n {
        w.line(&format!(
            "var zq{j}: array<vec4<f32>, {d4}>; var zacc{j}: array<vec4<f32>, {dv4}>; var zm{j} = MASKED; var zl{j} = 0.0;"
        ));
    }
    w.line(&format!("var kr: array<vec4<f32>, {d4}>;"));
    w.line(&format!("var vr: array<vec4<f32>, {dv4}>;"));

    w.open("for (var xs = 0; xs < nx; xs++) {");
    w.line("let xr = xs - 1 - after; // the query leaving slot 0: its last plane was xs - 1");
    // Pin j takes a state (q, acc, m, l as expressions of the element index) where `cond`.
    let pin = |w: &mut Wgsl,
               j: u32,
               q: &dyn Fn(u32) -> String,
               acc: &str,
               m: &str,
               l: &str,
               cond: &str| {
        for i in 0..d4 {
            w.line(&format!(
                "zq{j}[{i}] = select(zq{j}[{i}], {}, {cond});",
                q(i)
            ));
        }
        for i in 0..dv4 {
            let a = acc.replace("{i}", &i.to_string());
            w.line(&format!(
                "zacc{j}[{i}] = select(zacc{j}[{i}], {a}, {cond});"
            ));
        }
        w.line(&format!("zm{j} = select(zm{j}, {m}, {cond});"));
        w.line(&format!("zl{j} = select(zl{j}, {l}, {cond});"));
    };
    for j in 0..p_n {
        w.line(&format!(
            "let hit{j} = xr == {j}; // a top border query continues in a pin"
        ));
        let hit = format!("hit{j}");
        pin(w, j, &|i| format!("q0[{i}]"), "acc0[{i}]", "m0", "l0", &hit);
    }
    write(w, "", 0, "xr", "ok0 & (xr >= top)");
    for r in 0..s_n - 1 {
        let n = r + 1;
        w.line(&format!(
            "q{r} = q{n}; acc{r} = acc{n}; m{r} = m{n}; l{r} = l{n};"
        ));
    }
    let last = s_n - 1;
    load_q(w, &format!("q{last}"), "xs + before");
    w.line(&format!(
        "acc{last} = array<vec4<f32>, {dv4}>(); m{last} = MASKED; l{last} = 0.0;"
    ));
    plane(w, s_n, "", false);
    w.close();
    write(w, "", 0, "nx - 1 - after", "ok0");

    if p_n > 0 {
        w.line("// border queries: the top ones continue, the bottom ones start fresh");
        w.open("for (var ph = 0; ph < 2; ph++) {");
        w.line("let bot = ph == 1;");
        w.line("let count = select(top, bottom, bot);");
        for j in 0..p_n {
            w.line(&format!("let xz{j} = select({j}, nx - bottom + {j}, bot);"));
            w.open("{");
            w.line(&format!("var fresh: array<vec4<f32>, {d4}>;"));
            load_q(w, "fresh", &format!("xz{j}"));
            let fresh = |i: u32| format!("fresh[{i}]");
            pin(w, j, &fresh, "vec4<f32>(0.0)", "MASKED", "0.0", "bot");
            w.close();
        }
        w.open("for (var t = 0; t < count; t++) {");
        w.line("let xs = select(after + 1 + t, nx - kx + t, bot);");
        for j in 0..p_n {
            w.line(&format!(
                "let live{j} = select(t >= {j}, t <= {j}, bot) & ({j} < count);"
            ));
        }
        plane(w, p_n, "z", true);
        w.close();
        w.line("// a bottom query's other planes are in slot j + 1: merge the two states");
        for j in 0..p_n {
            let n = j + 1;
            w.line(&format!("let mm{j} = max(zm{j}, m{n});"));
            w.line(&format!("let ca{j} = exp2(zm{j} - mm{j});"));
            w.line(&format!("let cb{j} = exp2(m{n} - mm{j});"));
            w.line(&format!(
                "zl{j} = select(zl{j}, zl{j} * ca{j} + l{n} * cb{j}, bot);"
            ));
            for i in 0..dv4 {
                w.line(&format!(
                    "zacc{j}[{i}] = select(zacc{j}[{i}], zacc{j}[{i}] * ca{j} + acc{n}[{i}] * cb{j}, bot);"
                ));
            }
            w.line(&format!("zm{j} = select(zm{j}, mm{j}, bot);"));
            write(
                w,
                "z",
                j,
                &format!("xz{j}"),
                &format!("ok0 & ({j} < count)"),
            );
        }
        w.close();
    }
}
