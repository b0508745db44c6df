//! The chunkwise-parallel linear-attention kernels (fla's `chunk` form): a sequence is cut into
//! chunks of `C` tokens and (the delta rules' solve and state passes are `chunk_delta.rs`'s;
//! their output pass is this one, reading `u` for `v`)
//!
//! - the **state pass** (`Stage::States`) walks the chunks of one (sequence, value head, tile of
//!   64 state rows x 32 columns, 64 x 64 with subgroups) in order, writes the state *before*
//!   each chunk to a buffer,
//!   and applies the chunk at once, `S <- exp(b_C) S + sum_s (k_s exp(b_C - b_s)) v_s^T`
//!   (`b` the gates summed from the chunk's start): a register-tiled `K^T V`, not `C` rank-1
//!   updates;
//! - the **output pass** (`Stage::Output`) gives every chunk its own workgroup, all in
//!   parallel: `o_t = exp(b_t) q_t S_c + sum_{s <= t} exp(b_t - b_s) (q_t . k_s) v_s`, the
//!   inter-chunk term from the stored state and the intra-chunk term as a masked `C x C` block.
//!
//! Every exponent is a sum of gates over tokens that lie in order (`b_t - b_s` with `s <= t`,
//! `b_C - b_s`, `b_t`), so none is positive: strong decays underflow to zero, never overflow.
//! GLA's per-row gates cannot be factored out of `q_t . k_s`; the output pass takes their
//! `exp(b_t - b_s)` per feature and pair (a smaller chunk keeps that affordable).
//!
//! Each pass has two variants. The *subgroup* one (8 lanes a workgroup, subgroups of 8 or
//! more; a lane is its `subgroup_invocation_id`, the index shuffles address, not its index in
//! the workgroup, which a GPU need not map to the same) has every lane load only its own rows
//! and columns and hands them round with `subgroupShuffle`: lavapipe loops over the lanes for every storage or workgroup load, so an
//! operand all lanes read at one address costs eight loads there. The *plain* one (SwiftShader,
//! the browser, GLA, a normalized output) holds `R = 4` rows per invocation and stages shared
//! operands in workgroup memory, features in slabs of 16, so K up to 256 fits in 16 KiB.

use super::shader::{
    emit_loaders, emit_phi, emit_sequence, flags, Decay, LinearParams, PARAMS_WGSL,
};
use super::FeatureMap;
use crate::pipeline::{declare_bindings, BindingDecl, Kernel, UniformLayout};
use crate::tensor::DType;
use crate::wgsl::Wgsl;

/// Which pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Stage {
    /// The delta rules' parallel per-chunk solve (`chunk_delta.rs`): `W` and `U'`.
    Solve,
    /// The sequential walk over chunks that stores each chunk's starting state.
    States,
    /// The parallel per-chunk output.
    Output,
    /// The fused kernel (`chunk_fused.rs`): outputs and states in one sequential walk.
    Fused,
}

/// Tokens per chunk of the delta rules.
pub const C_DELTA: u32 = 32;
/// Rows (state rows or tokens) per invocation.
pub const R: u32 = 4;
/// Features per slab of the output pass.
const FS: u32 = 16;
/// State rows per workgroup of the state pass (`64 / R` invocations).
pub const STATE_ROWS: u32 = 64;
/// State columns per workgroup of the state pass.
pub const STATE_COLS: u32 = 32;
/// Output columns per workgroup of the output pass.
pub const OUT_COLS: u32 = 64;
/// Lanes per workgroup of the subgroup variants (one subgroup of at least 8).
pub const SG_LANES: u32 = 8;
/// Columns per workgroup of the subgroup output pass (lane `l` owns `4l ..` and `32 + 4l ..`);
/// its chunk is 32 tokens, four per lane's query and key loads.
pub const SG_TILE: u32 = 64;
/// Chunks per workgroup of the subgroup output pass.
pub const SG_CHUNKS_PER_WG: u32 = 4;
/// Column groups of four per lane in the subgroup output pass.
const SG_GROUPS: u32 = SG_TILE / (4 * SG_LANES);
/// The subgroup state pass's tile: `32 SG_RG` rows, `32 SG_CG` columns. 64 x 64 ran the
/// state pass 12-24% faster than 32 x 64 on lavapipe (T = 16384, K = V = 64) once its state
/// load and store became row loops (`emit_load_state`); unrolled, they took 44 s
/// of its compile (benches/RESULTS.md).
pub const SG_RG: u32 = 2;
pub const SG_CG: u32 = 2;

/// One specialization of a chunk pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ChunkKey {
    pub stage: Stage,
    pub dtype: DType,
    pub map: FeatureMap,
    pub decay: Decay,
    pub normalize: bool,
    /// q, k, v and O read and written as vec4s: K and V multiples of 4, and every offset and
    /// stride too (else one element at a time).
    pub aligned: bool,
    /// The subgroup variant: every lane loads its own rows and columns and shuffles share them
    /// (no workgroup memory, no barriers). Needs SUBGROUP with subgroups of at least 8 lanes;
    /// not for GLA or a normalized output.
    pub sg: bool,
    /// The delta rules (`chunk_delta.rs`): the output pass reads `u` in place of `v`.
    pub delta: bool,
    /// L2-normalized q and k (delta rules).
    pub l2: bool,
    /// State rows of the delta state pass (K padded to 64; 0 for every other pass).
    pub fp: u32,
}

impl ChunkKey {
    /// Tokens per chunk: 32, or 16 for GLA (its per-feature pair decays cost `C K`
    /// exponentials per token).
    pub fn c(&self) -> u32 {
        if self.decay == Decay::Vector {
            16
        } else {
            32
        }
    }

    pub fn new(
        stage: Stage,
        dtype: DType,
        map: FeatureMap,
        decay: Decay,
        normalize: bool,
        aligned: bool,
    ) -> Self {
        ChunkKey {
            stage,
            dtype,
            map,
            decay,
            normalize,
            aligned,
            sg: false,
            delta: false,
            l2: false,
            fp: 0,
        }
    }

    /// A pass of the delta rules (`gated`: gated DeltaNet's scalar gate); `k` is K.
    pub fn delta(stage: Stage, dtype: DType, gated: bool, l2: bool, aligned: bool, k: u32) -> Self {
        let decay = if gated { Decay::Scalar } else { Decay::None };
        let mut key = ChunkKey::new(stage, dtype, FeatureMap::Identity, decay, false, aligned);
        key.delta = true;
        key.l2 = l2;
        if stage == Stage::States {
            key.fp = k.div_ceil(64) * 64;
        }
        key
    }

    /// The fused kernel (`chunk_fused.rs`; subgroups only).
    pub fn fused(dtype: DType, map: FeatureMap, decay: Decay, aligned: bool) -> Self {
        ChunkKey::new(Stage::Fused, dtype, map, decay, false, aligned).with_subgroups()
    }

    /// The subgroup variant of this key.
    pub fn with_subgroups(mut self) -> Self {
        self.sg = true;
        self
    }

    /// Whether a subgroup variant exists for these options.
    pub fn sg_supported(decay: Decay, normalize: bool) -> bool {
        // (the Taylor map is always normalized)
        decay != Decay::Vector && !normalize
    }

    /// State rows and columns per workgroup of the state pass, columns of the output pass.
    pub fn state_tile(&self) -> (u32, u32) {
        if self.sg {
            (32 * SG_RG, 32 * SG_CG)
        } else {
            (STATE_ROWS, STATE_COLS)
        }
    }
    /// Chunks one workgroup of the output pass runs.
    pub fn chunks_per_workgroup(&self) -> u32 {
        if self.sg {
            SG_CHUNKS_PER_WG
        } else {
            1
        }
    }
    pub fn out_cols(&self) -> u32 {
        if self.sg {
            SG_TILE
        } else {
            OUT_COLS
        }
    }

    /// Invocations per workgroup.
    pub fn wg(&self) -> u32 {
        if self.delta && self.stage != Stage::Output {
            return match self.stage {
                Stage::States => super::chunk_delta::state_vt4(self.fp),
                _ if self.sg => SG_LANES,
                _ => super::chunk_delta::SOLVE_WG,
            };
        }
        if self.sg {
            return SG_LANES;
        }
        match self.stage {
            Stage::States | Stage::Solve => STATE_ROWS / R,
            Stage::Output | Stage::Fused => self.c() / R,
        }
    }

    /// Every key a call can plan (the rules without the delta rule, maps but Taylor).
    pub fn all() -> Vec<ChunkKey> {
        let mut out = Vec::new();
        for stage in [Stage::States, Stage::Output] {
            for dtype in [DType::F32, DType::F16] {
                for al in [false, true] {
                    for map in [FeatureMap::Identity, FeatureMap::Elu1, FeatureMap::Relu] {
                        for norm in [false, true] {
                            out.push(ChunkKey::new(stage, dtype, map, Decay::None, norm, al));
                        }
                    }
                    for decay in [Decay::Scalar, Decay::Vector] {
                        let map = FeatureMap::Identity;
                        out.push(ChunkKey::new(stage, dtype, map, decay, false, al));
                    }
                    for map in [FeatureMap::Identity, FeatureMap::Elu1, FeatureMap::Relu] {
                        let k = ChunkKey::new(stage, dtype, map, Decay::None, false, al);
                        out.push(k.with_subgroups());
                    }
                    let k =
                        ChunkKey::new(stage, dtype, FeatureMap::Identity, Decay::Scalar, false, al);
                    out.push(k.with_subgroups());
                }
            }
        }
        for dtype in [DType::F32, DType::F16] {
            for al in [false, true] {
                for map in [FeatureMap::Identity, FeatureMap::Elu1, FeatureMap::Relu] {
                    out.push(ChunkKey::fused(dtype, map, Decay::None, al));
                }
                out.push(ChunkKey::fused(
                    dtype,
                    FeatureMap::Identity,
                    Decay::Scalar,
                    al,
                ));
            }
        }
        for stage in [Stage::States, Stage::Output] {
            for dtype in [DType::F32, DType::F16] {
                let map = FeatureMap::Taylor;
                out.push(ChunkKey::new(stage, dtype, map, Decay::None, true, false));
            }
        }
        out.extend(Self::all_delta());
        out
    }

    /// The delta rules' keys: the solve, the state pass for every K bucket, both output
    /// variants.
    pub fn all_delta() -> Vec<ChunkKey> {
        let mut out = Vec::new();
        for dtype in [DType::F32, DType::F16] {
            for al in [false, true] {
                for gated in [false, true] {
                    for l2 in [false, true] {
                        let solve = ChunkKey::delta(Stage::Solve, dtype, gated, l2, al, 0);
                        out.push(solve);
                        out.push(solve.with_subgroups());
                        for k in [64, 128, 192, 256] {
                            out.push(ChunkKey::delta(Stage::States, dtype, gated, l2, al, k));
                        }
                        let o = ChunkKey::delta(Stage::Output, dtype, gated, l2, al, 0);
                        out.push(o);
                        out.push(o.with_subgroups());
                    }
                }
            }
        }
        out
    }

    /// Vec4s of the output pass's shared array: key slab, state slab, GLA gate slab, query slab
    /// (then the values of the chunk, in the same place).
    fn out_layout(&self) -> (u32, u32, u32, u32) {
        let fs4 = FS / 4;
        let soff = self.c() * fs4;
        let goff = soff + FS * (OUT_COLS / 4);
        let qoff = goff
            + if self.decay == Decay::Vector {
                self.c() * fs4
            } else {
                0
            };
        let end = qoff + self.c() * fs4;
        (soff, goff, qoff, end.max(self.c() * OUT_COLS / 4))
    }
}

impl Kernel for ChunkKey {
    fn label(&self) -> String {
        let decay = self.decay.suffix();
        let map = if self.delta { "delta" } else { self.map.name() };
        format!(
            "linear_chunk_{}_{}_{map}{decay}{}{}_c{}{}{}{}",
            match self.stage {
                Stage::Solve => "w",
                Stage::States => "h",
                Stage::Output => "o",
                Stage::Fused => "f",
            },
            self.dtype,
            if self.l2 { "_l2" } else { "" },
            if self.normalize { "_norm" } else { "" },
            self.c(),
            if self.fp > 0 {
                format!("_f{}", self.fp)
            } else {
                String::new()
            },
            if self.sg || (self.delta && self.stage != Stage::Output) {
                String::new()
            } else {
                format!("_r{R}")
            },
            if self.aligned { "_v4" } else { "" },
        ) + if self.sg { "_sg" } else { "" }
    }

    fn source(&self) -> String {
        match (self.stage, self.sg) {
            (Stage::Solve, false) => super::chunk_delta::generate_solve(self),
            (Stage::Solve, true) => super::chunk_delta::generate_solve_sg(self),
            (Stage::States, _) if self.delta => super::chunk_delta::generate_states(self),
            (Stage::States, false) => generate_states(self),
            (Stage::Output, false) => generate_output(self),
            (Stage::States, true) => generate_states_sg(self),
            (Stage::Output, true) => generate_output_sg(self),
            (Stage::Fused, _) => super::chunk_fused::generate(self),
        }
    }

    fn bindings(&self) -> Vec<BindingDecl> {
        let e = if self.aligned {
            format!("vec4<{}>", self.dtype.wgsl())
        } else {
            self.dtype.wgsl().to_string()
        };
        let e = e.as_str();
        if self.delta {
            return super::chunk_delta::bindings(self, e);
        }
        match self.stage {
            Stage::Solve => Vec::new(),
            Stage::States => vec![
                BindingDecl::uniform("p", "LinParams"),
                BindingDecl::read("k", e, "[B, T, H, K]"),
                BindingDecl::read("v", e, "[B, T, HV, V]"),
                BindingDecl::read("g", "f32", "gates (natural log)"),
                BindingDecl::read("s_in", "f32", "initial state [N, HV, F, Vs]"),
                BindingDecl::read("cu", "u32", "cu_seqlens"),
                BindingDecl::read_write("states", "vec4<f32>", "chunk states [N, HV, P, Fp, W4]"),
                BindingDecl::read_write("s_out", "f32", "state [N, HV, F, Vs]"),
            ],
            Stage::Output => vec![
                BindingDecl::uniform("p", "LinParams"),
                BindingDecl::read("q", e, "[B, T, H, K]"),
                BindingDecl::read("k", e, "[B, T, H, K]"),
                BindingDecl::read("v", e, "[B, T, HV, V]"),
                BindingDecl::read("g", "f32", "gates (natural log)"),
                BindingDecl::read("cu", "u32", "cu_seqlens"),
                BindingDecl::read("states", "vec4<f32>", "chunk states [N, HV, P, Fp, W4]"),
                BindingDecl::read_write("o", e, "[B, T, HV, V]"),
            ],
            Stage::Fused => vec![
                BindingDecl::uniform("p", "LinParams"),
                BindingDecl::read("q", e, "[B, T, H, K]"),
                BindingDecl::read("k", e, "[B, T, H, K]"),
                BindingDecl::read("v", e, "[B, T, HV, V]"),
                BindingDecl::read("g", "f32", "gates (natural log)"),
                BindingDecl::read("s_in", "f32", "initial state [N, HV, F, Vs]"),
                BindingDecl::read("cu", "u32", "cu_seqlens"),
                BindingDecl::read_write("s_out", "f32", "state [N, HV, F, Vs]"),
                BindingDecl::read_write("o", e, "[B, T, HV, V]"),
            ],
        }
    }

    fn workgroup_bytes(&self) -> u32 {
        if self.delta && self.stage != Stage::Output && !self.sg {
            return super::chunk_delta::workgroup_bytes(self);
        }
        let delta_out = if self.delta && !self.sg {
            8 * self.c()
        } else {
            0
        };
        if self.sg {
            return 0;
        }
        delta_out
            + match self.stage {
                Stage::Solve | Stage::Fused => 0,
                Stage::States => {
                    let scalar = if self.decay == Decay::Scalar {
                        4 * (self.c() + 1)
                    } else {
                        0
                    };
                    16 * self.c() * (STATE_COLS / 4) + 16 * self.c() * self.wg() + scalar
                }
                Stage::Output => {
                    let (_, _, _, sm) = self.out_layout();
                    16 * sm + 4 * self.c() * self.c() + 4 * self.c() * 2 + 4 * FS
                }
            }
    }

    fn capabilities(&self) -> naga::valid::Capabilities {
        use naga::valid::Capabilities as C;
        let mut caps = C::empty();
        if self.dtype == DType::F16 {
            caps |= C::SHADER_FLOAT16;
        }
        if self.sg {
            caps |= C::SUBGROUP;
        }
        caps
    }

    fn uniforms(&self) -> Vec<UniformLayout> {
        vec![
            crate::uniform_layout!(LinearParams, "LinParams"; n_seq, t, h, hv, dk, dv, f,
            vs, flags, t_from, t_to, group, scale, eps, feat_scale, g_si, q_st, k_st, v_st,
            o_st, g_st, beta_st, state, chunk),
        ]
    }
}

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
fn emit_output_loaders(w: &mut Wgsl, key: &ChunkKey) {
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
fn emit_features4(w: &mut Wgsl, map: FeatureMap, names: &[&str]) {
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

/// The state pass. Invocation `lid` owns state rows `row0 .. row0 + 4` and 32 columns; per
/// chunk it stores them (under `F_CHUNKS`), stages the chunk's decayed keys for its rows and
/// the chunk's values, and adds `k~^T v` with the values read at one address by all.
pub fn generate_states(key: &ChunkKey) -> String {
    let vt4 = STATE_COLS / 4;
    let mut w = Wgsl::new(&format!(
        "{}: chunked linear attention, state pass (generated by wgpu-attention)",
        key.label()
    ));
    header(&mut w, key);
    w.line(&format!(
        "const VT4: u32 = {vt4}u; // vec4 columns per workgroup"
    ));
    w.line("var<workgroup> su: array<vec4<f32>, C * VT4>; // the chunk's values");
    w.line("var<workgroup> sk: array<vec4<f32>, C * WG>; // each invocation's decayed key rows");
    if key.decay == Decay::Scalar {
        w.line("var<workgroup> sg: array<f32, C + 1u>; // exp(b_C - b_s), then b_C");
    }
    emit_loaders(&mut w, &["g"], key.decay != Decay::None);
    emit_loaders4(&mut w, key, &["k", "v"]);
    emit_feat(&mut w, key.map);
    emit_features4(&mut w, key.map, &["k"]);
    w.raw(LD_STATE_WGSL);
    w.line("@compute @workgroup_size(WG)");
    w.open("fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid3: vec3<u32>) {");
    w.line("let lid = lid3.x;");
    w.line(&format!("let col0 = wid.x * {STATE_COLS}u;"));
    w.line(&format!("let row0 = wid.y * {STATE_ROWS}u + lid * 4u;"));
    w.line("let n = wid.z / p.hv;");
    w.line("let hv = wid.z % p.hv;");
    w.line("let hq = hv / p.group;");
    w.line("let W4 = w4();");
    emit_sequence(&mut w);
    w.line("let nch = (len + C - 1u) / C;");
    w.line("let srow = (n * p.hv + hv) * p.f + row0; // this invocation's first state row");
    for i in 0..R {
        w.line(&format!("var s{i}: array<vec4<f32>, VT4>;"));
        if key.normalize {
            w.line(&format!("var z{i} = 0.0;"));
        }
    }
    w.line("let from_init = (p.flags & F_INIT) != 0u;");
    w.open("if from_init || (p.flags & F_RESUME) != 0u {");
    w.line("let off = select(p.state.y, p.state.x, from_init);");
    for i in 0..R {
        w.line(&format!("let rok{i} = row0 + {i}u < p.f;"));
        for j in 0..vt4 {
            let comps: Vec<String> = (0..4)
                .map(|cc| {
                    let col = j * 4 + cc;
                    format!("ld_state(off + (srow + {i}u) * p.vs + col0 + {col}u, rok{i} && col0 + {col}u < p.dv, from_init)")
                })
                .collect();
            w.line(&format!("s{i}[{j}] = vec4<f32>({});", comps.join(", ")));
        }
        if key.normalize {
            w.line(&format!(
                "z{i} = ld_state(off + (srow + {i}u) * p.vs + p.dv, rok{i}, from_init);"
            ));
        }
    }
    w.close();
    // the padded chunk states: whole vec4s, no bounds (rows past F and columns past V hold
    // zeros, and every output column reads only its own state column)
    let store_chunk = |w: &mut Wgsl, cb: &str| {
        w.line(&format!("let cb = {cb};"));
        for i in 0..R {
            w.line(&format!(
                "let rb{i} = cb + (row0 + {i}u) * W4 + wid.x * VT4;"
            ));
            for j in 0..vt4 {
                w.line(&format!("states[rb{i} + {j}u] = s{i}[{j}];"));
            }
            if key.normalize {
                w.line(&format!(
                    "if wid.x == 0u {{ states[cb + (row0 + {i}u) * W4 + W4 - 1u] = vec4<f32>(z{i}, 0.0, 0.0, 0.0); }}"
                ));
            }
        }
    };
    w.line("let c_to = min(p.chunk.y, nch);");
    w.open("for (var c = p.chunk.x; c < c_to; c++) {");
    w.line("let tc = t0 + c * C;");
    w.line("let nt = min(C, len - c * C);");
    w.open("if (p.flags & F_CHUNKS) != 0u {");
    store_chunk(
        &mut w,
        "(n * p.hv + hv) * p.chunk.z + (c - p.chunk.x) * p.chunk.w",
    );
    w.close();
    w.line("workgroupBarrier(); // the previous chunk is done with the shared arrays");
    if key.decay == Decay::Scalar {
        w.open("for (var e = lid; e < C; e += WG) {");
        w.line("sg[e] = ld_g(b, tc + e, hv, 0u, e < nt);");
        w.close();
        w.line("workgroupBarrier();");
        w.open("if lid == 0u {");
        w.line("var run = 0.0;");
        w.open("for (var e = C; e > 0u; e--) {");
        w.line("let x = sg[e - 1u];");
        w.line("sg[e - 1u] = exp(run);");
        w.line("run += x;");
        w.close();
        w.line("sg[C] = run;");
        w.close();
        w.line("workgroupBarrier();");
    }
    if key.decay == Decay::Vector {
        w.line("var run = vec4<f32>(0.0); // the gates of the tokens after u, per row");
    }
    // keys of this invocation's rows, last token first (GLA sums its gates on the way)
    w.line("let f = row0;");
    w.open("for (var uu = 0u; uu < C; uu++) {");
    w.line("let u = C - 1u - uu;");
    w.line("let tt = tc + u;");
    w.line("let ok = u < nt;");
    w.line("let kx = fk4(b, tt, hq, f, ok);");
    let stored = match key.decay {
        Decay::None => "kx",
        Decay::Scalar => "kx * sg[u]",
        Decay::Vector => "kx * exp(run)",
    };
    w.line(&format!("sk[u * WG + lid] = {stored};"));
    if key.decay == Decay::Vector {
        let g: Vec<String> = (0..4)
            .map(|cc| format!("ld_g(b, tt, hv, f + {cc}u, ok && f + {cc}u < p.dk)"))
            .collect();
        w.line(&format!("run += vec4<f32>({});", g.join(", ")));
    }
    w.close();
    w.open("for (var e = lid; e < C * VT4; e += WG) {");
    w.line("let u = e / VT4;");
    w.line("su[e] = ld4_v(b, tc + u, hv, col0 + (e % VT4) * 4u, u < nt);");
    w.close();
    w.line("workgroupBarrier();");
    // decay the state over the chunk: S += S (exp(b_C) - 1)
    match key.decay {
        Decay::None => {}
        Decay::Scalar => w.line("let dec = vec4<f32>(expm1(vec4<f32>(sg[C])).x);"),
        Decay::Vector => w.line("let dec = expm1(run);"),
    }
    if key.decay != Decay::None {
        for i in 0..R {
            let d = if key.decay == Decay::Scalar {
                "dec".to_string()
            } else {
                format!("vec4<f32>(dec[{i}])")
            };
            for j in 0..vt4 {
                w.line(&format!("s{i}[{j}] += s{i}[{j}] * {d};"));
            }
            if key.normalize {
                w.line(&format!("z{i} += z{i} * {d}.x;"));
            }
        }
    }
    w.open("for (var u = 0u; u < C; u++) {");
    w.line("let kk = sk[u * WG + lid];");
    for j in 0..vt4 {
        w.line(&format!("let v{j} = su[u * VT4 + {j}u];"));
        for i in 0..R {
            w.line(&format!("s{i}[{j}] += kk[{i}] * v{j};"));
        }
    }
    if key.normalize {
        for i in 0..R {
            w.line(&format!("z{i} += kk[{i}];"));
        }
    }
    w.close(); // tokens
    w.close(); // chunks
    w.open("if (p.flags & F_GLOBAL) != 0u {");
    w.line("// global attention: the final state, for every chunk's output");
    store_chunk(&mut w, "(n * p.hv + hv) * p.chunk.z");
    w.close();
    let z = |i: u32| format!("z{i}");
    emit_final_state(
        &mut w,
        R,
        vt4,
        4,
        &|i, j| format!("s{i}[{j}]"),
        key.normalize.then_some(&z as &dyn Fn(u32) -> String),
    );
    w.close(); // main
    w.finish()
}

/// The output pass: one workgroup per (chunk, 64 columns of V, value head, sequence),
/// invocation `lid` owning the chunk's tokens `4 lid .. 4 lid + 4`.
pub fn generate_output(key: &ChunkKey) -> String {
    let fs4 = FS / 4;
    let vt4 = OUT_COLS / 4;
    let (soff, goff, qoff, sm) = key.out_layout();
    let vector = key.decay == Decay::Vector;
    let mut w = Wgsl::new(&format!(
        "{}: chunked linear attention, output pass (generated by wgpu-attention)",
        key.label()
    ));
    header(&mut w, key);
    w.line(&format!("const FS: u32 = {FS}u; // features per slab"));
    w.line(&format!("const FS4: u32 = {fs4}u;"));
    w.line(&format!(
        "const VT4: u32 = {vt4}u; // vec4 columns per workgroup"
    ));
    w.line(&format!(
        "const SOFF: u32 = {soff}u; // state slab [FS][VT4] in sm"
    ));
    if vector {
        w.line(&format!(
            "const GOFF: u32 = {goff}u; // summed gates [C][FS4] in sm"
        ));
    }
    w.line(&format!(
        "const QOFF: u32 = {qoff}u; // query slab [C][FS4] in sm"
    ));
    w.line(&format!(
        "var<workgroup> sm: array<vec4<f32>, {sm}u>; // key slab [C][FS4] at 0, ...; then values [C][VT4], then results"
    ));
    w.line("var<workgroup> sa: array<f32, C * C>; // q_t . k_s, then masked and decayed");
    w.line("var<workgroup> sb: array<f32, C>; // summed gates b_t");
    w.line("var<workgroup> sd: array<f32, C>; // normalizer per token");
    w.line("var<workgroup> sz: array<f32, FS>; // z slab");
    if key.delta && key.l2 {
        w.line("var<workgroup> srn: array<vec2<f32>, C>; // 1 / |k_t|, 1 / |q_t|");
    }
    emit_loaders(&mut w, &["g"], false);
    emit_output_loaders(&mut w, key);
    emit_feat(&mut w, key.map);
    emit_features4(&mut w, key.map, &["q", "k"]);
    w.line("@compute @workgroup_size(WG)");
    w.open("fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid3: vec3<u32>) {");
    w.line("let lid = lid3.x;");
    w.line(&format!(
        "let nvt = (p.dv + {}u) / {OUT_COLS}u;",
        OUT_COLS - 1
    ));
    w.line("let c = p.chunk.x + wid.x / nvt;");
    w.line("let vt = wid.x % nvt;");
    w.line(&format!("let col0 = vt * {OUT_COLS}u;"));
    w.line("let hv = wid.y;");
    w.line("let n = wid.z;");
    w.line("let hq = hv / p.group;");
    w.line("let W4 = w4();");
    emit_sequence(&mut w);
    w.open("if c * C >= len {");
    w.line("return;");
    w.close();
    w.line("let tc = t0 + c * C;");
    w.line("let nt = min(C, len - c * C);");
    w.line("let glob = (p.flags & F_GLOBAL) != 0u;");
    w.line("let sbase = (n * p.hv + hv) * p.chunk.z + (c - p.chunk.x) * p.chunk.w;");
    w.line("let r0 = lid * 4u; // this invocation's tokens r0 .. r0 + 4");
    if key.delta {
        w.line("let tb = tok_base(n, hv, c);");
        w.line("ubase = tb * vu4();");
        w.line("utc = tc;");
    }
    w.open("for (var e = lid; e < C * C; e += WG) {");
    w.line("sa[e] = 0.0;");
    w.close();
    w.open("for (var e = lid; e < C; e += WG) {");
    let g0 = if key.decay == Decay::Scalar {
        "ld_g(b, tc + e, hv, 0u, e < nt)"
    } else {
        "0.0"
    };
    w.line(&format!("sb[e] = {g0};"));
    if key.delta && key.l2 {
        w.line("srn[e] = tok[tb + e].zw;");
    }
    w.close();
    w.line("workgroupBarrier();");
    if key.decay == Decay::Scalar {
        w.open("if lid == 0u {");
        w.line("var run = 0.0;");
        w.open("for (var e = 0u; e < C; e++) {");
        w.line("run += sb[e];");
        w.line("sb[e] = run;");
        w.close();
        w.close();
    }
    for i in 0..R {
        w.line(&format!("var acc{i}: array<vec4<f32>, VT4>;"));
        w.line(&format!("var den{i} = 0.0;"));
    }
    w.open("for (var f0 = 0u; f0 < p.f; f0 += FS) {");
    w.line("workgroupBarrier(); // the previous slab is done with sm");
    w.open("for (var e = lid; e < C * FS4; e += WG) {");
    w.line("let u = e / FS4;");
    w.line("let f = f0 + (e % FS4) * 4u;");
    w.line("let tt = tc + u;");
    let (rk, rq) = if key.delta && key.l2 {
        (" * srn[u].x", " * srn[u].y")
    } else {
        ("", "")
    };
    w.line(&format!("sm[e] = fk4(b, tt, hq, f, u < nt){rk};"));
    w.line(&format!(
        "sm[QOFF + e] = fq4(b, tt, hq, f, u < nt) * p.scale{rq};"
    ));
    if vector {
        let g: Vec<String> = (0..4)
            .map(|cc| format!("ld_g(b, tt, hv, f + {cc}u, u < nt && f + {cc}u < p.dk)"))
            .collect();
        w.line(&format!("sm[GOFF + e] = vec4<f32>({});", g.join(", ")));
    }
    w.close();
    w.open("for (var e = lid; e < FS * VT4; e += WG) {");
    w.line("sm[SOFF + e] = states[sbase + (f0 + e / VT4) * W4 + vt * VT4 + e % VT4];");
    w.close();
    if key.normalize {
        w.open("for (var e = lid; e < FS; e += WG) {");
        w.line("sz[e] = states[sbase + (f0 + e) * W4 + W4 - 1u].x;");
        w.close();
    }
    w.line("workgroupBarrier();");
    // this invocation's query rows of the slab, in registers (loaded together with the keys:
    // SwiftShader's compiler stalls on the selects of sixteen unrolled loads)
    let own_rows = |w: &mut Wgsl, name: &str, off: &str| {
        for i in 0..R {
            w.line(&format!("var {name}{i}: array<vec4<f32>, FS4>;"));
            for f4 in 0..fs4 {
                w.line(&format!(
                    "{name}{i}[{f4}] = sm[{off} + (r0 + {i}u) * FS4 + {f4}u];"
                ));
            }
        }
    };
    own_rows(&mut w, "q", "QOFF");
    if vector {
        // gates summed over the chunk's tokens, per feature
        w.open("for (var e = lid; e < FS4; e += WG) {");
        w.line("var run = vec4<f32>(0.0);");
        w.open("for (var u = 0u; u < C; u++) {");
        w.line("run += sm[GOFF + u * FS4 + e];");
        w.line("sm[GOFF + u * FS4 + e] = run;");
        w.close();
        w.close();
        w.line("workgroupBarrier();");
        own_rows(&mut w, "gq", "GOFF");
    }
    // GLA's inter-chunk term reads the query decayed to the token (exp(b_t) <= 1), in place
    // of this invocation's own rows
    if vector {
        for i in 0..R {
            for f4 in 0..fs4 {
                w.line(&format!(
                    "sm[QOFF + (r0 + {i}u) * FS4 + {f4}u] = q{i}[{f4}] * exp(gq{i}[{f4}]);"
                ));
            }
        }
    }
    // intra-chunk scores
    w.open("if !glob {");
    w.open("for (var s = 0u; s < C; s++) {");
    for i in 0..R {
        w.line(&format!("var a{i} = 0.0;"));
    }
    for f4 in 0..fs4 {
        w.line(&format!("let k{f4} = sm[s * FS4 + {f4}u];"));
        if vector {
            w.line(&format!("let g{f4} = sm[GOFF + s * FS4 + {f4}u];"));
        }
        for i in 0..R {
            if vector {
                // only s <= t survives the mask, where the exponent is <= 0
                w.line(&format!(
                    "a{i} += dot(q{i}[{f4}] * exp(min(gq{i}[{f4}] - g{f4}, vec4<f32>(0.0))), k{f4});"
                ));
            } else {
                w.line(&format!("a{i} += dot(q{i}[{f4}], k{f4});"));
            }
        }
    }
    for i in 0..R {
        w.line(&format!("sa[(r0 + {i}u) * C + s] += a{i};"));
    }
    w.close();
    w.close();
    // inter-chunk term: q_t S_c over the slab's features
    w.open("for (var f4 = 0u; f4 < FS4; f4++) {");
    for i in 0..R {
        w.line(&format!("let qa{i} = sm[QOFF + (r0 + {i}u) * FS4 + f4];"));
    }
    for cc in 0..4 {
        w.line(&format!("let srow{cc} = SOFF + (f4 * 4u + {cc}u) * VT4;"));
        for j in 0..vt4 {
            w.line(&format!("let s{cc}_{j} = sm[srow{cc} + {j}u];"));
            for i in 0..R {
                w.line(&format!("acc{i}[{j}] += qa{i}[{cc}] * s{cc}_{j};"));
            }
        }
        if key.normalize {
            w.line(&format!("let zz{cc} = sz[f4 * 4u + {cc}u];"));
            for i in 0..R {
                w.line(&format!("den{i} += qa{i}[{cc}] * zz{cc};"));
            }
        }
    }
    w.close();
    w.close(); // slabs
    if key.decay == Decay::Scalar {
        for i in 0..R {
            w.line(&format!("let bt{i} = sb[r0 + {i}u];"));
            w.line(&format!("let e{i} = exp(bt{i});"));
            for j in 0..vt4 {
                w.line(&format!("acc{i}[{j}] *= e{i};"));
            }
            w.line(&format!("den{i} *= e{i};"));
        }
    }
    // mask (and decay) the scores of this invocation's rows
    w.open("if !glob {");
    w.open("for (var s = 0u; s < C; s++) {");
    for i in 0..R {
        let x = if key.decay == Decay::Scalar {
            format!("sa[(r0 + {i}u) * C + s] * exp(bt{i} - sb[s])")
        } else {
            format!("sa[(r0 + {i}u) * C + s]")
        };
        w.line(&format!(
            "sa[(r0 + {i}u) * C + s] = select(0.0, {x}, s <= r0 + {i}u);"
        ));
    }
    w.close();
    w.close();
    w.line("workgroupBarrier(); // every slab read done: sm takes the values");
    w.open("for (var e = lid; e < C * VT4; e += WG) {");
    w.line("let u = e / VT4;");
    w.line("sm[e] = ld4_v(b, tc + u, hv, col0 + (e % VT4) * 4u, u < nt);");
    w.close();
    w.line("workgroupBarrier();");
    w.open("if !glob {");
    w.open("for (var s = 0u; s < C; s++) {");
    for i in 0..R {
        w.line(&format!("let a{i} = sa[(r0 + {i}u) * C + s];"));
        w.line(&format!("den{i} += a{i};"));
    }
    for j in 0..vt4 {
        w.line(&format!("let v{j} = sm[s * VT4 + {j}u];"));
        for i in 0..R {
            w.line(&format!("acc{i}[{j}] += a{i} * v{j};"));
        }
    }
    w.close();
    w.close();
    w.line("workgroupBarrier(); // the values are read: sm takes the results");
    for i in 0..R {
        for j in 0..vt4 {
            w.line(&format!("sm[(r0 + {i}u) * VT4 + {j}u] = acc{i}[{j}];"));
        }
        let d = if key.normalize {
            format!("1.0 / (den{i} + p.eps)")
        } else {
            "1.0".into()
        };
        w.line(&format!("sd[r0 + {i}u] = {d};"));
    }
    w.line("workgroupBarrier();");
    let t = key.dtype.wgsl();
    if key.aligned {
        w.open("for (var e = lid; e < C * VT4; e += WG) {");
        w.line("let u = e / VT4;");
        w.line("let col = col0 + (e % VT4) * 4u;");
        w.open("if u < nt && col < p.dv {");
        w.line(&format!(
            "o[(p.o_st.x + b * p.o_st.y + (tc + u) * p.o_st.z + hv * p.o_st.w + col) / 4u] = vec4<{t}>(sm[e] * sd[u]);"
        ));
        w.close();
        w.close();
    } else {
        w.open(&format!(
            "for (var e = lid; e < C * {OUT_COLS}u; e += WG) {{"
        ));
        w.line(&format!("let u = e / {OUT_COLS}u;"));
        w.line(&format!("let j = e % {OUT_COLS}u;"));
        w.line("let col = col0 + j;");
        w.open("if u < nt && col < p.dv {");
        w.line(&format!(
            "o[p.o_st.x + b * p.o_st.y + (tc + u) * p.o_st.z + hv * p.o_st.w + col] = {t}(sm[u * VT4 + j / 4u][j % 4u] * sd[u]);"
        ));
        w.close();
        w.close();
    }
    w.close(); // main
    w.finish()
}

/// The subgroup state pass: a workgroup of 8 lanes owns `32 RG` state rows x `32 CG` columns,
/// lane `l` columns `32 j + 4l .. + 4` of every row. Per token each lane loads its own columns
/// of v and rows `32 g + 4l .. + 4` of k; shuffles give every lane all the rows.
pub fn generate_states_sg(key: &ChunkKey) -> String {
    let mut w = Wgsl::new(&format!(
        "{}: chunked linear attention, state pass with subgroups (generated by wgpu-attention)",
        key.label()
    ));
    header(&mut w, key);
    emit_loaders(&mut w, &["g"], key.decay != Decay::None);
    emit_loaders4(&mut w, key, &["k", "v"]);
    emit_feat(&mut w, key.map);
    w.raw(LD_STATE_WGSL);
    let (rg, cg) = (SG_RG, SG_CG);
    let rows = 32 * rg;
    let idx = |r: u32, j: u32| r * cg + j;
    w.line("@compute @workgroup_size(WG)");
    w.open("fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(subgroup_invocation_id) lane: u32) {");
    w.line(&format!(
        "let col0 = wid.x * {}u + lane * 4u; // this lane's columns: col0 + 32 j .. + 4",
        32 * cg
    ));
    w.line(&format!("let row0 = wid.y * {rows}u;"));
    w.line("let n = wid.z / p.hv;");
    w.line("let hv = wid.z % p.hv;");
    w.line("let hq = hv / p.group;");
    w.line("let W4 = w4();");
    emit_sequence(&mut w);
    w.line("let nch = (len + C - 1u) / C;");
    w.line("let srow = (n * p.hv + hv) * p.f + row0;");
    w.line(&format!(
        "var s = array<vec4<f32>, {}>(); // [row][group]: rows row0 .., this lane's columns",
        rows * cg
    ));
    emit_load_state(&mut w, rows, cg, 32, &|r, j| format!("s[{}]", idx(r, j)));
    let store_chunk = |w: &mut Wgsl, cb: &str| {
        w.line(&format!("let cb = {cb} + row0 * W4 + col0 / 4u;"));
        for r in 0..rows {
            for j in 0..cg {
                w.line(&format!(
                    "states[cb + {r}u * W4 + {}u] = s[{}];",
                    j * 8,
                    idx(r, j)
                ));
            }
        }
    };
    w.line("let c_to = min(p.chunk.y, nch);");
    w.open("for (var c = p.chunk.x; c < c_to; c++) {");
    w.line("let tc = t0 + c * C;");
    w.line("let nt = min(C, len - c * C);");
    w.open("if (p.flags & F_CHUNKS) != 0u {");
    store_chunk(
        &mut w,
        "(n * p.hv + hv) * p.chunk.z + (c - p.chunk.x) * p.chunk.w",
    );
    w.close();
    if key.decay == Decay::Scalar {
        // lane l holds the gates of tokens l, l + 8, l + 16, l + 24
        let g: Vec<String> = (0..4)
            .map(|m| {
                format!(
                    "ld_g(b, tc + lane + {}u, hv, 0u, lane + {}u < nt)",
                    8 * m,
                    8 * m
                )
            })
            .collect();
        w.line(&format!("let gl = vec4<f32>({});", g.join(", ")));
        w.line("let total = subgroupAdd(gl.x + gl.y + gl.z + gl.w);");
        w.line("let dec = vec4<f32>(expm1(vec4<f32>(total)).x);");
        for r in 0..rows * cg {
            w.line(&format!("s[{r}] += s[{r}] * dec;"));
        }
        w.line("var run = 0.0; // the gates of the tokens after u");
    }
    w.line("// tokens last to first (the decay of a key is the sum of the gates after it)");
    w.open("for (var uu = 0u; uu < C; uu++) {");
    w.line("let u = C - 1u - uu;");
    w.line("let ok = u < nt;");
    for g in 0..rg {
        w.line(&format!("let kr{g} = row0 + {}u + lane * 4u;", g * 32));
        w.line(&format!(
            "var kq{g} = feat(ld4_k(b, tc + u, hq, kr{g}, ok), okk(ok, kr{g}));"
        ));
    }
    if key.decay == Decay::Scalar {
        w.line("let dk = exp(run);");
        for g in 0..rg {
            w.line(&format!("kq{g} *= dk;"));
        }
        w.line("run += subgroupShuffle(gl[u / 8u], u % 8u);");
    }
    for j in 0..cg {
        w.line(&format!(
            "let v{j} = ld4_v(b, tc + u, hv, col0 + {}u, ok);",
            j * 32
        ));
    }
    for g in 0..rg {
        for gi in 0..SG_LANES {
            w.line(&format!("let k{g}_{gi} = subgroupShuffle(kq{g}, {gi}u);"));
            for i in 0..4 {
                let r = g * 32 + gi * 4 + i;
                for j in 0..cg {
                    w.line(&format!("s[{}] += k{g}_{gi}[{i}] * v{j};", idx(r, j)));
                }
            }
        }
    }
    w.close(); // tokens
    w.close(); // chunks
    w.open("if (p.flags & F_GLOBAL) != 0u {");
    store_chunk(&mut w, "(n * p.hv + hv) * p.chunk.z");
    w.close();
    emit_store_state(&mut w, rows, cg, 32, &|r, j| format!("s[{}]", idx(r, j)));
    w.close(); // main
    w.finish()
}

/// The subgroup output pass: a workgroup of 8 lanes owns one chunk of 32 tokens and 64 columns
/// of V, lane `l` columns `4l ..` and `32 + 4l ..` of every token. Per four features each lane
/// loads its columns of four state rows and the features of tokens `l, l + 8, l + 16, l + 24`
/// (query and key); shuffles hand every lane each token's query. Lane `l` keeps the scores
/// `q_t . k_s` of its four keys `s`, and shuffles hand them round again for `A V`.
pub fn generate_output_sg(key: &ChunkKey) -> String {
    let c = 32u32;
    let cg = SG_GROUPS;
    let mut w = Wgsl::new(&format!(
        "{}: chunked linear attention, output pass with subgroups (generated by wgpu-attention)",
        key.label()
    ));
    header(&mut w, key);
    emit_loaders(&mut w, &["g"], false);
    emit_output_loaders(&mut w, key);
    emit_feat(&mut w, key.map);
    w.line("@compute @workgroup_size(WG)");
    w.open("fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(subgroup_invocation_id) lane: u32) {");
    w.line(&format!(
        "let nvt = (p.dv + {}u) / {SG_TILE}u;",
        SG_TILE - 1
    ));
    w.line(&format!(
        "let c0 = p.chunk.x + wid.x / nvt * {SG_CHUNKS_PER_WG}u;"
    ));
    w.line(&format!(
        "let col0 = (wid.x % nvt) * {SG_TILE}u + lane * 4u; // this lane's columns: col0 + 32 j .. + 4"
    ));
    w.line("let hv = wid.y;");
    w.line("let n = wid.z;");
    w.line("let hq = hv / p.group;");
    w.line("let W4 = w4();");
    emit_sequence(&mut w);
    w.line("// a few chunks per workgroup: lavapipe's cost per workgroup is not small");
    w.open(&format!(
        "for (var ci = 0u; ci < {SG_CHUNKS_PER_WG}u; ci++) {{"
    ));
    w.line("let c = c0 + ci;");
    w.open("if c >= p.chunk.y || c * C >= len {");
    w.line("break;");
    w.close();
    w.line("let tc = t0 + c * C;");
    w.line("let nt = min(C, len - c * C);");
    w.line("let glob = (p.flags & F_GLOBAL) != 0u;");
    w.line("let sbase = (n * p.hv + hv) * p.chunk.z + (c - p.chunk.x) * p.chunk.w + col0 / 4u;");
    if key.delta {
        w.line("let tb = tok_base(n, hv, c);");
        w.line("ubase = tb * vu4();");
        w.line("utc = tc;");
        if key.l2 {
            for m in 0..4 {
                w.line(&format!("let tk{m} = tok[tb + lane + {}u];", 8 * m));
            }
        }
    }
    // zeros written out: declared in a loop, and headless Chromium (Tint on SwiftShader) did not
    // zero a bare `var x: array<..>;` again on each iteration (wrong delta-rule chunks there)
    w.line(&format!(
        "var acc = array<vec4<f32>, {0}>(); // [token][group]: o_t, this lane's columns",
        c * cg
    ));
    for m in 0..4 {
        w.line(&format!(
            "var a{m} = array<vec4<f32>, 8>(); // q_t . k_s for s = lane + {}, t = 4i .. 4i + 4",
            8 * m
        ));
    }
    w.open("for (var f = 0u; f < p.f; f += 4u) {");
    for i in 0..4 {
        for j in 0..cg {
            w.line(&format!(
                "let sr{i}_{j} = states[sbase + (f + {i}u) * W4 + {}u];",
                j * 8
            ));
        }
    }
    for m in 0..4 {
        w.line(&format!("let okm{m} = lane + {}u < nt;", 8 * m));
        let (rk, rq) = if key.delta && key.l2 {
            (format!(" * tk{m}.z"), format!(" * tk{m}.w"))
        } else {
            (String::new(), String::new())
        };
        w.line(&format!(
            "let qb{m} = feat(ld4_q(b, tc + lane + {}u, hq, f, okm{m}), okk(okm{m}, f)) * p.scale{rq};",
            8 * m
        ));
        w.line(&format!(
            "let kb{m} = feat(ld4_k(b, tc + lane + {}u, hq, f, okm{m}), okk(okm{m}, f)){rk};",
            8 * m
        ));
    }
    for t in 0..c {
        let (m, l) = (t / 8, t % 8);
        w.line(&format!("let q{t} = subgroupShuffle(qb{m}, {l}u);"));
        for j in 0..cg {
            w.line(&format!(
                "acc[{}] += q{t}.x * sr0_{j} + q{t}.y * sr1_{j} + q{t}.z * sr2_{j} + q{t}.w * sr3_{j};",
                t * cg + j
            ));
        }
    }
    w.open("if !glob {");
    // key s = lane + 8m is masked for every t < 8m: those scores stay zero
    for t in 0..c {
        let comp = ["x", "y", "z", "w"][(t % 4) as usize];
        for m in (0..4).filter(|m| t >= 8 * m) {
            w.line(&format!("a{m}[{}].{comp} += dot(q{t}, kb{m});", t / 4));
        }
    }
    w.close();
    w.close(); // features
    if key.decay == Decay::Scalar {
        let g: Vec<String> = (0..4)
            .map(|m| {
                format!(
                    "ld_g(b, tc + lane + {}u, hv, 0u, lane + {}u < nt)",
                    8 * m,
                    8 * m
                )
            })
            .collect();
        w.line(&format!("let gl = vec4<f32>({});", g.join(", ")));
        // b_t, the gates summed from the chunk's start through t, in every lane
        w.line("var run = 0.0;");
        for t in 0..c {
            w.line(&format!(
                "run += subgroupShuffle(gl[{}], {}u);",
                t / 8,
                t % 8
            ));
            w.line(&format!("let b{t} = run;"));
            w.line(&format!("let e{t} = exp(b{t});"));
            for j in 0..cg {
                w.line(&format!("acc[{}] *= e{t};", t * cg + j));
            }
        }
        // b_s of this lane's keys
        w.line("var bs = vec4<f32>(b0, b8, b16, b24);");
        for l in 1..SG_LANES {
            w.line(&format!(
                "bs = select(bs, vec4<f32>(b{}, b{}, b{}, b{}), lane == {l}u);",
                l,
                l + 8,
                l + 16,
                l + 24
            ));
        }
    }
    w.open("if !glob {");
    w.line("let sidx = vec4<u32>(lane, lane + 8u, lane + 16u, lane + 24u);");
    for t in 0..c {
        let comp = ["x", "y", "z", "w"][(t % 4) as usize];
        let i = t / 4;
        w.line(&format!(
            "let sc{t} = vec4<f32>(a0[{i}].{comp}, a1[{i}].{comp}, a2[{i}].{comp}, a3[{i}].{comp});"
        ));
        let x = if key.decay == Decay::Scalar {
            format!("sc{t} * exp(min(vec4<f32>(b{t}) - bs, vec4<f32>(0.0)))")
        } else {
            format!("sc{t}")
        };
        w.line(&format!(
            "let ms{t} = select(vec4<f32>(0.0), {x}, sidx <= vec4<u32>({t}u));"
        ));
        for m in 0..4 {
            let mc = ["x", "y", "z", "w"][m];
            w.line(&format!("a{m}[{i}].{comp} = ms{t}.{mc};"));
        }
    }
    // A V: key s = 8m + j is lane j's m-th
    w.open("for (var j = 0u; j < 8u; j++) {");
    for m in 0..4 {
        for g in 0..cg {
            w.line(&format!(
                "let v{m}_{g} = ld4_v(b, tc + {}u + j, hv, col0 + {}u, {}u + j < nt);",
                8 * m,
                32 * g,
                8 * m
            ));
        }
        // tokens 4i .. 4i + 4 all before key 8m see none of its scores
        for i in (0..8).filter(|i| 4 * i + 3 >= 8 * m) {
            w.line(&format!("let x{m}_{i} = subgroupShuffle(a{m}[{i}], j);"));
            for cc in 0..4 {
                let comp = ["x", "y", "z", "w"][cc];
                for g in 0..cg {
                    w.line(&format!(
                        "acc[{}] += x{m}_{i}.{comp} * v{m}_{g};",
                        (i * 4 + cc as u32) * cg + g
                    ));
                }
            }
        }
    }
    w.close();
    w.close(); // !glob
    let t = key.dtype.wgsl();
    for u in 0..c {
        w.open(&format!("if {u}u < nt {{"));
        w.line(&format!(
            "let ob = p.o_st.x + b * p.o_st.y + (tc + {u}u) * p.o_st.z + hv * p.o_st.w + col0;"
        ));
        for g in 0..cg {
            let col = 32 * g;
            if key.aligned {
                w.line(&format!(
                    "if col0 + {col}u < p.dv {{ o[(ob + {col}u) / 4u] = vec4<{t}>(acc[{}]); }}",
                    u * cg + g
                ));
            } else {
                for cc in 0..4 {
                    w.line(&format!(
                        "if col0 + {}u < p.dv {{ o[ob + {}u] = {t}(acc[{}][{cc}]); }}",
                        col + cc,
                        col + cc,
                        u * cg + g
                    ));
                }
            }
        }
        w.close();
    }
    w.close(); // chunks
    w.close(); // main
    w.finish()
}
