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

use crate::pipeline::{BindingDecl, Kernel, UniformLayout};
use crate::tensor::DType;
use crate::wgsl::Wgsl;

pub use super::generate::generate;
pub(crate) use super::generate::{group_body, store_row};

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
