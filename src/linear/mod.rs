//! Linear attention: the recurrences of flash-linear-attention (fla), with its conventions, so a
//! user ports a call by renaming.
//!
//! q, k `[B, T, H, K]`; v `[B, T, HV, V]` with HV a multiple of H (value head `hv` reads q/k head
//! `hv / (HV / H)`); O `[B, T, HV, V]` in v's dtype. The state of one (sequence, value head) is
//! `S`, F x V in f32 (F = K, or `1 + K + K^2` for the Taylor map), plus the column
//! `z` (the sum of the keys' features) when the output is normalized: state tensors are
//! `[N, HV, F, V]`, or `[N, HV, F, V + 1]` with z last. `scale` (default `K^-0.5`) multiplies
//! the query's features; the output at token t reads the state after token t,
//! `o_t = S_t^T (scale phi(q_t))`. Gates are natural-log decays, f32.
//!
//! | rule | recurrence |
//! |---|---|
//! | `Linear` | `S_t = S_{t-1} + phi(k_t) v_t^T` (feature map, optional normalization) |
//! | `Retention` | `S_t = exp(g_h) S_{t-1} + k_t v_t^T`, default `g_h = ln(1 - 2^(-5-h))` |
//! | `SimpleGla` | `S_t = exp(g_t) S_{t-1} + k_t v_t^T`, g `[B, T, HV]` |
//! | `Gla` | `S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T`, g `[B, T, HV, K]` |
//! | `Delta` | `S_t = (I - b_t k_t k_t^T) S_{t-1} + b_t k_t v_t^T`, beta `[B, T, HV]` |
//! | `GatedDelta` | `S_t = exp(g_t) (I - b_t k_t k_t^T) S_{t-1} + b_t k_t v_t^T` |
//!
//! Normalized output (`normalize`, and always with the Taylor map, as Based does):
//! `o_t = S_t^T q'_t / (q'_t . z_t + eps)`, `eps` 1e-10 (1e-6 for Taylor). Variable-length
//! packed sequences: `cu_seqlens` with B = 1, one state per sequence.

mod check;
pub mod chunk;
pub mod chunk_delta;
mod chunk_delta_states;
mod chunk_emit;
pub mod chunk_fused;
mod chunk_output;
mod chunk_states;
mod encode;
mod encode_chunk;
mod plan;
mod recurrent;
pub mod reference;
pub mod shader;

pub use check::{check_inputs, check_options, unit_rows};
pub use encode::encode_linear_attention;
pub use plan::{
    all_kernels, fused_unsupported, plan, subgroups_of_8, ChunkPlan, LinearKernel, LinearPlan,
};

use crate::context::GpuContext;
use crate::error::{AttnError, Result};
use crate::tensor::{DType, Tensor};
use shader::Decay;

/// The update rule (see the module docs).
#[non_exhaustive]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Rule {
    #[default]
    Linear,
    Retention,
    SimpleGla,
    Gla,
    Delta,
    GatedDelta,
}

impl Rule {
    pub const ALL: [Rule; 6] = [
        Rule::Linear,
        Rule::Retention,
        Rule::SimpleGla,
        Rule::Gla,
        Rule::Delta,
        Rule::GatedDelta,
    ];
    /// The CLI's name (`simple-gla`).
    pub fn name(self) -> &'static str {
        match self {
            Rule::Linear => "linear",
            Rule::Retention => "retention",
            Rule::SimpleGla => "simple-gla",
            Rule::Gla => "gla",
            Rule::Delta => "delta",
            Rule::GatedDelta => "gated-delta",
        }
    }
    pub fn parse(s: &str) -> Option<Rule> {
        Rule::ALL
            .into_iter()
            .find(|r| r.name() == s || r.name().replace('-', "_") == s)
    }
    fn decay(self) -> Decay {
        match self {
            Rule::Linear | Rule::Delta => Decay::None,
            Rule::Retention | Rule::SimpleGla | Rule::GatedDelta => Decay::Scalar,
            Rule::Gla => Decay::Vector,
        }
    }
    /// Whether the rule is a delta rule (takes beta).
    pub fn delta(self) -> bool {
        matches!(self, Rule::Delta | Rule::GatedDelta)
    }
}

/// The feature map of the `Linear` rule, applied in the kernel to the raw q and k.
#[non_exhaustive]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum FeatureMap {
    #[default]
    Identity,
    /// `elu(x) + 1`
    Elu1,
    /// `max(x, 0)`
    Relu,
    /// Based's second-order Taylor map, `phi(q).phi(k) = 1 + s + s^2 / 2` with `s = scale q.k`
    /// (the scale sits inside the map); K <= 16; always normalized (eps 1e-6).
    Taylor,
}

impl FeatureMap {
    pub const ALL: [FeatureMap; 4] = [
        FeatureMap::Identity,
        FeatureMap::Elu1,
        FeatureMap::Relu,
        FeatureMap::Taylor,
    ];
    pub fn name(self) -> &'static str {
        match self {
            FeatureMap::Identity => "identity",
            FeatureMap::Elu1 => "elu1",
            FeatureMap::Relu => "relu",
            FeatureMap::Taylor => "taylor",
        }
    }
    pub fn parse(s: &str) -> Option<FeatureMap> {
        FeatureMap::ALL.into_iter().find(|m| m.name() == s)
    }
}

/// Which kernel. `Auto` takes `Chunk` where the longest sequence has [`auto_chunk_min_t`]
/// tokens, else `Recurrent`.
#[non_exhaustive]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Mode {
    #[default]
    Auto,
    /// Token by token (decode, and the second implementation tests compare against).
    Recurrent,
    /// Chunkwise parallel: a state pass over chunks, then every chunk's output in parallel.
    Chunk,
    /// Chunkwise in one sequential kernel (fla's `fused_chunk`): each workgroup walks its
    /// chunks with the state in registers, computing each chunk's outputs, then applying it.
    /// Causal `Linear` (identity, ELU+1, ReLU, not normalized), `Retention` and `SimpleGla`
    /// with K up to 64, on adapters with subgroups of 8 lanes or more.
    FusedChunk,
}

/// `Auto` runs the chunk kernels from this many tokens in the longest sequence. Measured at
/// H = 8, K = V = 64 (single runs): on SwiftShader the chunk kernels tie the recurrent one at
/// T = 64 (10.2 against 10.8 ms) and win at 256 (23 against 33); with subgroups on lavapipe
/// they win from T = 16 (0.54 against 0.80 ms; 0.58 against 0.38 at T = 4).
pub const AUTO_CHUNK_MIN_T: usize = 64;
pub const AUTO_CHUNK_MIN_T_SUBGROUPS: usize = 16;
/// The delta rules with the subgroup solve pass: on lavapipe the chunk kernels won from
/// T = 32 (2.0 against 2.7 ms; 20.7 against 38.7 at T = 1024, 88 against 158 at 4096; gated
/// DeltaNet with L2 norm, H = 8, K = V = 64, single runs).
pub const AUTO_CHUNK_MIN_T_DELTA_SUBGROUPS: usize = 32;
/// The delta rules without subgroups, on a GPU. Not measured on one yet: the choice follows
/// fla, whose chunk kernels exist because T sequential steps leave a GPU idle, while the solve
/// and output passes run every chunk in parallel. On a CPU adapter without subgroups of 8
/// (SwiftShader, the page's fallback adapter) `Auto` keeps them recurrent: there the chunk
/// passes measured 1.06-1.15x slower from T = 64 to 1024 (207 against 195 ms at T = 1024,
/// same shape), the loop-form solve pass the larger part.
pub const AUTO_CHUNK_MIN_T_DELTA: usize = 64;
/// The Taylor map (its `1 + K + K^2` feature rows make the recurrent kernel's per-token work
/// large): the chunk kernels won from T = 16 (lavapipe 5.3 against 11.4 ms, SwiftShader 16.9
/// against 29.3; 2.6 and 4.1x at T = 256; K = 16, V = 64, H = 8, single runs).
pub const AUTO_CHUNK_MIN_T_TAYLOR: usize = 16;

/// The fewest tokens in the longest sequence for which `Auto` runs the chunk kernels
/// (`subgroups`: their subgroup variant runs; `cpu`: a CPU adapter; see the constants for the
/// measurements).
pub fn auto_chunk_min_t(opts: &LinearOptions, subgroups: bool, cpu: bool) -> usize {
    if opts.rule.delta() {
        return if subgroups {
            AUTO_CHUNK_MIN_T_DELTA_SUBGROUPS
        } else if cpu {
            usize::MAX
        } else {
            AUTO_CHUNK_MIN_T_DELTA
        };
    }
    if opts.feature_map == FeatureMap::Taylor {
        return AUTO_CHUNK_MIN_T_TAYLOR;
    }
    if subgroups {
        AUTO_CHUNK_MIN_T_SUBGROUPS
    } else {
        AUTO_CHUNK_MIN_T
    }
}

impl Mode {
    pub fn parse(s: &str) -> Option<Mode> {
        match s {
            "auto" => Some(Mode::Auto),
            "recurrent" => Some(Mode::Recurrent),
            "chunk" => Some(Mode::Chunk),
            "fused-chunk" => Some(Mode::FusedChunk),
            _ => None,
        }
    }
}

/// Options of a linear attention call. `Default` is causal `Linear` with the identity map.
#[non_exhaustive]
#[derive(Clone, Debug)]
pub struct LinearOptions {
    pub rule: Rule,
    /// `Linear` only.
    pub feature_map: FeatureMap,
    /// Normalize the output by `q' . z` (`Linear` only; implied by the Taylor map).
    pub normalize: bool,
    /// L2-normalize q and k, `x / sqrt(sum x^2 + 1e-6)`, before the scale (delta rules only).
    pub qk_l2norm: bool,
    /// `false`: global attention `O = phi(Q) (phi(K)^T V)` over each whole sequence (`Linear` only).
    pub causal: bool,
    /// Multiplies the query features; `None` is `K^-0.5`.
    pub scale: Option<f32>,
    pub mode: Mode,
    /// Natural-log gates, f32: `SimpleGla`/`GatedDelta` `[B, T, HV]`, `Gla` `[B, T, HV, K]`,
    /// `Retention` `[HV]` (one decay per head; `None`: `ln(1 - 2^(-5-h))`).
    pub g: Option<Tensor>,
    /// Delta rules: `[B, T, HV]`, f32.
    pub beta: Option<Tensor>,
    /// `[N, HV, F, Vs]` f32, contiguous (see [`LinearShape::state_shape`]).
    pub initial_state: Option<Tensor>,
    /// Return the final state (same shape as the initial one).
    pub output_final_state: bool,
    /// Packed variable-length sequences (B = 1): sequence n is tokens `cu[n]..cu[n+1]`,
    /// ascending from 0 to T.
    pub cu_seqlens: Option<Vec<u32>>,
    /// The chunk kernels' variant: `None` lets the plan choose (subgroup shuffles where the
    /// adapter has subgroups of 8 lanes or more and the options allow), `Some(false)` the
    /// variant without subgroups (what a browser runs), `Some(true)` requires the subgroup one.
    pub subgroups: Option<bool>,
}

crate::setters!(LinearOptions {
    rule: Rule,
    feature_map: FeatureMap,
    normalize: bool,
    qk_l2norm: bool,
    causal: bool,
    scale: Option<f32>,
    mode: Mode,
    g: Option<Tensor>,
    beta: Option<Tensor>,
    initial_state: Option<Tensor>,
    output_final_state: bool,
    cu_seqlens: Option<Vec<u32>>,
    subgroups: Option<bool>,
});

impl Default for LinearOptions {
    fn default() -> Self {
        LinearOptions {
            rule: Rule::Linear,
            feature_map: FeatureMap::Identity,
            normalize: false,
            qk_l2norm: false,
            causal: true,
            scale: None,
            mode: Mode::Auto,
            g: None,
            beta: None,
            initial_state: None,
            output_final_state: false,
            cu_seqlens: None,
            subgroups: None,
        }
    }
}

/// Problem sizes, read off q and v.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinearShape {
    pub batch: usize,
    pub t: usize,
    pub h: usize,
    pub hv: usize,
    pub k: usize,
    pub v: usize,
}

/// Largest K (the state's rows in registers); the Taylor map allows 16.
pub const MAX_K: usize = 256;
pub const MAX_TAYLOR_K: usize = 16;

impl LinearShape {
    /// The state's rows: K, or `1 + K + K^2` for the Taylor map.
    pub fn feature_dim(&self, opts: &LinearOptions) -> usize {
        match opts.feature_map {
            FeatureMap::Taylor => 1 + self.k + self.k * self.k,
            _ => self.k,
        }
    }
    /// Whether the output is normalized (z is a state column).
    pub fn normalized(opts: &LinearOptions) -> bool {
        opts.normalize || opts.feature_map == FeatureMap::Taylor
    }
    /// The state's columns: V, plus z when normalized.
    pub fn state_cols(&self, opts: &LinearOptions) -> usize {
        self.v + usize::from(Self::normalized(opts))
    }
    /// Sequences: `cu_seqlens.len() - 1`, else B.
    pub fn sequences(&self, opts: &LinearOptions) -> usize {
        opts.cu_seqlens
            .as_ref()
            .map_or(self.batch, |c| c.len().saturating_sub(1))
    }
    /// `[N, HV, F, Vs]`.
    pub fn state_shape(&self, opts: &LinearOptions) -> [usize; 4] {
        [
            self.sequences(opts),
            self.hv,
            self.feature_dim(opts),
            self.state_cols(opts),
        ]
    }
    fn eps(&self, opts: &LinearOptions) -> f64 {
        if opts.feature_map == FeatureMap::Taylor {
            1e-6
        } else {
            1e-10
        }
    }
    /// FLOPs of one causal pass, for GFLOP/s: per token and value head, the update and the
    /// output (2 F V each), the delta rule's prediction (2 F V more).
    pub fn flops(&self, opts: &LinearOptions) -> f64 {
        let per = 2.0 * self.feature_dim(opts) as f64 * self.state_cols(opts) as f64;
        let n = if opts.rule.delta() { 3.0 } else { 2.0 };
        n * per * (self.batch * self.t * self.hv) as f64
    }
}

/// The default retention decay of value head `h`, `ln(1 - 2^(-5-h))` (RetNet).
pub fn retention_log_decay(h: usize) -> f64 {
    (1.0 - 2f64.powi(-5 - h as i32)).ln()
}

/// Each sequence as (batch, first token, length).
pub(crate) fn sequences(
    s: &LinearShape,
    opts: &LinearOptions,
) -> Result<Vec<(usize, usize, usize)>> {
    match &opts.cu_seqlens {
        None => Ok((0..s.batch).map(|b| (b, 0, s.t)).collect()),
        Some(cu) => {
            let ok = s.batch == 1
                && cu.len() >= 2
                && cu[0] == 0
                && cu.last().map(|&x| x as usize) == Some(s.t)
                && cu.windows(2).all(|w| w[0] <= w[1]);
            if !ok {
                return Err(AttnError::invalid(
                    "cu_seqlens",
                    format!("B = 1 and offsets ascending from 0 to T = {}", s.t),
                    format!("B = {}, {cu:?}", s.batch),
                ));
            }
            Ok(cu
                .windows(2)
                .map(|w| (0, w[0] as usize, (w[1] - w[0]) as usize))
                .collect())
        }
    }
}

/// Output of [`linear_attention`].
#[non_exhaustive]
#[derive(Debug)]
pub struct LinearOutput {
    /// `[B, T, HV, V]`, v's dtype.
    pub out: Tensor,
    /// `[N, HV, F, Vs]` f32, when asked for.
    pub final_state: Option<Tensor>,
}

/// Runs into caller-provided outputs and submits the work.
pub fn linear_attention_into(
    ctx: &GpuContext,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    out: &Tensor,
    final_state: Option<&Tensor>,
    opts: &LinearOptions,
) -> Result<LinearPlan> {
    ctx.submit(|enc| encode_linear_attention(ctx, enc, q, k, v, out, final_state, opts, None))
}

/// Runs linear attention and returns new O (and the final state when
/// `opts.output_final_state`).
pub fn linear_attention(
    ctx: &GpuContext,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    opts: &LinearOptions,
) -> Result<LinearOutput> {
    let s = check_inputs(q, k, v)?;
    check_options(&s, opts)?;
    let out = Tensor::filled(ctx, &[s.batch, s.t, s.hv, s.v], v.dtype(), 0.0)?;
    let final_state = if opts.output_final_state {
        Some(Tensor::filled(ctx, &s.state_shape(opts), DType::F32, 0.0)?)
    } else {
        None
    };
    linear_attention_into(ctx, q, k, v, &out, final_state.as_ref(), opts)?;
    Ok(LinearOutput { out, final_state })
}
