//! The shared WGSL generator of the FlashAttention-2 forward kernel, for every family whose
//! kernel is a softmax over keys (dense and local attention today; sparse next). A family says
//! where its query rows and keys come from through a [`Geometry`]; this file owns the rest:
//! loaders (buffers and textures), the online-softmax update, the epilogue that writes O and
//! LSE, and the key loops of each strategy.
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

use std::fmt;
use std::hash::{Hash, Hasher};

use crate::pipeline::{declare_bindings, BindingDecl, Kernel, UniformLayout};
use crate::tensor::DType;
use crate::wgsl::Wgsl;

pub use crate::tuning::Strategy;

/// Where a family's query rows and keys come from and how a score is masked: the hooks the
/// shared generator calls. A family implements it once (a unit struct in a `static`) and puts it
/// in its [`FlashKey`]s; the shared generator names no family.
///
/// What the generated code may rely on: `p` (the shared [`FlashParams`]), `wid`, `lid`,
/// `qtile` (the query tile this pass of the workgroup owns: `wid.x`, or one of a pair, see
/// [`Geometry::pairs_tiles`]) and on subgroup strategies `sg_size` and `lane`; the prologue
/// must define `b`, `h`, `k_head`, `v_head` and for each row `r < key.rows` `tok{r}` (the row written) and `ok{r}` (whether
/// it is written); `open_passes` opens one or more scopes (closed by the generator) that define
/// `pass_lo`, `pass_hi` and set `range_lo`, `range_hi`. Keys `j` in `[pass_lo, pass_hi)` load
/// through `key_row(j)` (Tiled) or [`Geometry::lane_key`] (subgroup strategies).
pub trait Geometry: Sync + Send + 'static {
    /// Part of the label (the cache key), unique per geometry: `""` for dense sequences.
    fn suffix(&self) -> &'static str;
    /// The family's generator file, named in the generated header.
    fn source_file(&self) -> &'static str;
    /// Bindings after the shared ones (a family's own uniform block), in order.
    fn bindings(&self) -> Vec<BindingDecl> {
        Vec::new()
    }
    /// The Rust layouts of the uniform structs of [`Geometry::bindings`] (checked by naga).
    fn uniforms(&self) -> Vec<UniformLayout> {
        Vec::new()
    }
    /// Module-scope WGSL: `key_row(j)`, mask helpers, the family's uniform struct.
    fn helpers(&self, w: &mut Wgsl, key: &FlashKey);
    /// Writes a kernel body of the geometry's own and returns true (the Sweep strategy), or
    /// returns false for the shared body.
    fn own_body(&self, _w: &mut Wgsl, _key: &FlashKey) -> bool {
        false
    }
    /// The start of the entry point (see the trait docs for what it defines).
    fn prologue(&self, w: &mut Wgsl, key: &FlashKey);
    /// Opens the key passes (see the trait docs).
    fn open_passes(&self, w: &mut Wgsl, key: &FlashKey);
    /// Subgroup strategies: defines `kj`, the K/V row of key `kb + lane`.
    fn lane_key(&self, w: &mut Wgsl);
    /// Sigmoid attention (FlashSigmoid): the WGSL expression of the bias `b` in log2 units;
    /// weights are `sigmoid(s + b)` each, not normalized over the row. `None` (the default):
    /// softmax.
    fn sigmoid_bias(&self) -> Option<&'static str> {
        None
    }
    /// Tiled strategy: whether a workgroup may own two query tiles, `wid.x` and its mirror
    /// `ntiles - 1 - wid.x`, one after the other when the call sets `F_PAIR` (causal calls,
    /// whose tiles' key ranges grow with the tile: every pair then does the same work). The
    /// prologue must derive its rows from `qtile`. Default: no.
    fn pairs_tiles(&self) -> bool {
        false
    }
    /// Tiled strategy: whether `key_row(j)` is in bounds for any `j`, so a two-stage key
    /// ([`FlashKey::stages`]) may load the tile after a pass's last without a branch. Default: no.
    fn prefetches(&self) -> bool {
        false
    }
    /// Tiled strategy: a WGSL condition, false when none of this invocation's rows can see a
    /// key of the tile `[kb, kb + block)`, so it skips the tile's arithmetic (the tile is still
    /// loaded: the workgroup shares it). `None`: every invocation computes every tile.
    fn tile_guard(&self, _key: &FlashKey) -> Option<String> {
        None
    }
    /// Lines per key group (`g`, keys `kb + g + u` for `u < key.group`) that the masks need.
    fn group_keys(&self, w: &mut Wgsl, key: &FlashKey);
    /// The masked base-2 score of row `r`, key `u` of the group, from the raw `s{r}_{u}`
    /// (already scaled): `MASKED` where the key is not visible.
    fn score(&self, key: &FlashKey, r: u32, u: u32) -> String;
}

/// A [`Geometry`] in a key: compared, hashed and printed by its suffix.
#[derive(Clone, Copy)]
pub struct Geo(pub &'static dyn Geometry);

impl PartialEq for Geo {
    fn eq(&self, other: &Self) -> bool {
        self.0.suffix() == other.0.suffix()
    }
}
impl Eq for Geo {}
impl Hash for Geo {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.0.suffix().hash(state)
    }
}
impl fmt::Debug for Geo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Geo({:?})", self.0.suffix())
    }
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
    /// Where query rows and keys come from, and the mask: the family's hooks.
    pub geometry: Geo,
    /// Sweep only: pinned slots for the queries at x's borders, whose shifted window outlives
    /// their slot (k / 2 non-causal, 0 causal).
    pub pins: u32,
    /// Subgroup: the subgroup size the key loop is unrolled for, so every shuffle has a
    /// constant lane index (0: a loop over the runtime `sg_size`). Set where the adapter
    /// reports exactly one size, of 8 lanes ([`FIXED_LANES`]).
    pub lanes: u32,
    /// Tiled: K/V tiles in workgroup memory, 1 or 2. With 2 each iteration issues the next
    /// tile's loads into registers, computes this tile, then stores them into the other stage:
    /// one barrier per tile instead of two, and a GPU overlaps the loads' latency with the
    /// arithmetic. Only where the geometry's `key_row` clamps (the fetch past a pass's end
    /// must stay in bounds: [`Geometry::prefetches`]).
    pub stages: u32,
}

/// The one subgroup size whose shuffles the kernels unroll: lavapipe's. Mesa's gallivm lowers
/// a shuffle whose lane index is not a constant to a loop over the 8 lanes; with a constant
/// index it is a register move. Measured on lavapipe (dense, B = 1, H = 8, L = 2048, D = 64,
/// f32, 8 rows): 34.7-37.5 against 28.7-31.5 GFLOP/s in interleaved runs, cold compile time
/// unchanged (12.9 against 12.8 s); benches/RESULTS.md. A GPU's 32 or 64 lanes would unroll
/// the body 16 or 32 times, so wider subgroups keep the loop.
pub const FIXED_LANES: u32 = 8;

impl FlashKey {
    pub fn label(&self) -> String {
        format!(
            "flash_{:?}_{}_d{}_dv{}_r{}_b{}_u{}_wg{}{}{}{}{}{}",
            self.strategy,
            self.dtype,
            self.d4 * 4,
            self.dv4 * 4,
            self.rows,
            self.block,
            self.group,
            self.wg,
            if self.lanes > 0 {
                format!("_l{}", self.lanes)
            } else {
                String::new()
            },
            if self.stages > 1 {
                format!("_s{}", self.stages)
            } else {
                String::new()
            },
            if self.mods { "_mods" } else { "" },
            self.geometry.0.suffix(),
            if self.strategy == Strategy::Sweep {
                format!("_p{}", self.pins)
            } else {
                String::new()
            }
        )
        .to_lowercase()
    }

    /// Bind group 0: params, Q, K, V, O, LSE, (with `mods`) bias and ALiBi slopes, lengths
    /// (optional inputs get a dummy buffer), for the Sweep kernel the Q/K/V textures, then the
    /// geometry's own.
    pub fn bindings(&self) -> Vec<BindingDecl> {
        let t = self.dtype.wgsl();
        let mut b = vec![
            BindingDecl::uniform("p", "Params"),
            BindingDecl::read("q_buf", t, "[B, Lq, Hq, D]"),
            BindingDecl::read("k_buf", t, "[B, Lk, Hkv, D]"),
            BindingDecl::read("v_buf", t, "[B, Lk, Hkv, Dv]"),
            BindingDecl::read_write("o_buf", t, "[B, Lq, Hq, Dv]"),
            BindingDecl::read_write("lse_buf", "f32", "[B, Hq, Lq] (strides in p.lse)"),
        ];
        // the score modifications' inputs exist only in keys that have them: the storage
        // buffers of a stage are few (8 by WebGPU's default, 10 on SwiftShader)
        if self.mods {
            b.push(BindingDecl::read("bias_buf", "f32", "[B|1, Hq|1, Lq, Lk]"));
            b.push(BindingDecl::read("alibi_buf", "f32", "[Hq]"));
        }
        b.push(BindingDecl::read(
            "lens_buf",
            "u32",
            "[2B]: q lens, kv lens",
        ));
        if self.strategy == Strategy::Sweep {
            b.push(BindingDecl::texture(
                "q_tex",
                "Q, K, V as texels of 4 elements",
            ));
            b.push(BindingDecl::texture("k_tex", ""));
            b.push(BindingDecl::texture("v_tex", ""));
        }
        b.extend(self.geometry.0.bindings());
        b
    }

    /// Query rows covered by one workgroup.
    pub fn rows_per_workgroup(&self) -> u32 {
        self.wg * self.rows
    }

    /// Bytes of workgroup memory the kernel declares.
    pub fn workgroup_bytes(&self) -> u32 {
        match self.strategy {
            Strategy::Tiled => self.stages.max(1) * self.block * (self.d4 + self.dv4) * 16,
            Strategy::Subgroup | Strategy::Sweep => 0,
        }
    }
}

impl Kernel for FlashKey {
    fn label(&self) -> String {
        FlashKey::label(self)
    }
    fn source(&self) -> String {
        generate(self)
    }
    fn bindings(&self) -> Vec<BindingDecl> {
        FlashKey::bindings(self)
    }
    fn workgroup_bytes(&self) -> u32 {
        FlashKey::workgroup_bytes(self)
    }
    fn uniforms(&self) -> Vec<UniformLayout> {
        let mut u = vec![
            crate::uniform_layout!(FlashParams, "Params"; batch, hq, hkv, lq, lk, d,
            dv, flags, q, k, v, o, bias, scale, softcap, win_left, win_right, kv_start, kv_end,
            sinks, _pad, lse),
        ];
        u.extend(self.geometry.0.uniforms());
        u
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
    /// Tiled workgroups own a pair of mirrored query tiles ([`super::Geometry::pairs_tiles`]).
    pub const PAIR_TILES: u32 = 512;

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
        ("F_PAIR", PAIR_TILES),
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
