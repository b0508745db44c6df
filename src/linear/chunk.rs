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

use super::shader::{Decay, LinearParams};
use super::FeatureMap;
use crate::pipeline::{BindingDecl, Kernel, UniformLayout};
use crate::tensor::DType;

pub use super::chunk_emit::STATE_ROW_LOOPS;
pub(super) use super::chunk_emit::{
    emit_feat, emit_features4, emit_final_state, emit_load_state, emit_loaders4,
    emit_output_loaders, emit_store_state, header, LD_STATE_WGSL,
};

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
pub(super) const FS: u32 = 16;
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
pub(super) const SG_GROUPS: u32 = SG_TILE / (4 * SG_LANES);
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
    pub(super) fn out_layout(&self) -> (u32, u32, u32, u32) {
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
            (Stage::States, false) => super::chunk_states::generate_states(self),
            (Stage::Output, false) => super::chunk_output::generate_output(self),
            (Stage::States, true) => super::chunk_states::generate_states_sg(self),
            (Stage::Output, true) => super::chunk_output::generate_output_sg(self),
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
