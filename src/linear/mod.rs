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

pub mod chunk;
pub mod chunk_delta;
pub mod chunk_fused;
pub mod reference;
pub mod shader;

use wgpu::util::DeviceExt;

use crate::context::GpuContext;
use crate::error::{AttnError, Result};
use crate::pipeline::Kernel;
use crate::resources::{check_no_alias, BoundRange};
use crate::tensor::{DType, Tensor};
use chunk::{ChunkKey, Stage};
use shader::{flags, Decay, LinearKey, LinearParams};

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

/// The kernels a plan runs.
#[non_exhaustive]
#[derive(Clone, Debug)]
pub enum LinearKernel {
    Recurrent {
        key: LinearKey,
        grid: [u32; 3],
    },
    Chunk(ChunkPlan),
    /// `chunk_fused.rs`: one dispatch per piece of chunks.
    Fused {
        key: ChunkKey,
        grid: [u32; 3],
    },
}

/// The chunk passes of a plan.
#[derive(Clone, Debug)]
pub struct ChunkPlan {
    /// The delta rules' solve pass (`chunk_delta.rs`), one workgroup per chunk of a piece.
    pub solve: Option<(ChunkKey, [u32; 3])>,
    pub states: ChunkKey,
    pub output: ChunkKey,
    pub states_grid: [u32; 3],
    /// For a piece of `chunks_per_piece` chunks.
    pub output_grid: [u32; 3],
    pub chunks_per_piece: u32,
}

/// What the plan chose.
#[non_exhaustive]
#[derive(Clone, Debug)]
pub struct LinearPlan {
    pub kernel: LinearKernel,
    /// Ranges of the dispatches: tokens (recurrent) or chunks (chunk). lavapipe stops loops
    /// past 65535 iterations, and the chunk states of a piece must fit one binding, so long
    /// sequences run in pieces, the state carried through the final-state buffer.
    pub pieces: Vec<(u32, u32)>,
}

impl LinearPlan {
    /// The kernel labels, as `info` and `--json` print them.
    pub fn label(&self) -> String {
        match &self.kernel {
            LinearKernel::Recurrent { key, .. } => key.label(),
            LinearKernel::Fused { key, .. } => key.label(),
            LinearKernel::Chunk(cp) => {
                let solve = cp
                    .solve
                    .as_ref()
                    .map_or(String::new(), |(k, _)| format!("{} + ", k.label()));
                format!("{solve}{} + {}", cp.states.label(), cp.output.label())
            }
        }
    }
    /// `Recurrent`, `Chunk` or `FusedChunk`.
    pub fn mode(&self) -> Mode {
        match self.kernel {
            LinearKernel::Recurrent { .. } => Mode::Recurrent,
            LinearKernel::Chunk(_) => Mode::Chunk,
            LinearKernel::Fused { .. } => Mode::FusedChunk,
        }
    }
}

fn dims4(t: &Tensor, what: &str, layout: &str) -> Result<[usize; 4]> {
    t.shape()
        .try_into()
        .map_err(|_| AttnError::shape(what, format!("rank 4 {layout}"), t.shape()))
}

fn u32_of(x: usize, what: &str) -> Result<u32> {
    u32::try_from(x).map_err(|_| AttnError::Limit {
        what: what.into(),
        needed: x as u64,
        limit: u32::MAX as u64,
    })
}

/// Checks q, k, v and returns the problem sizes.
pub fn check_inputs(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<LinearShape> {
    let [b, t, h, kd] = dims4(q, "q", "[B, T, H, K]")?;
    let kk = dims4(k, "k", "[B, T, H, K]")?;
    if kk != [b, t, h, kd] {
        return Err(AttnError::shape(
            "k",
            format!("{:?} (as q)", [b, t, h, kd]),
            kk,
        ));
    }
    if [b, t, h].contains(&0) {
        // as every family: zero-sized inputs are refused, not run as an empty call
        return Err(AttnError::shape(
            "q",
            "non-zero batch, length and heads",
            q.shape(),
        ));
    }
    let [vb, vt, hv, vd] = dims4(v, "v", "[B, T, HV, V]")?;
    if vb != b || vt != t || hv == 0 || !hv.is_multiple_of(h) || vd == 0 {
        return Err(AttnError::shape(
            "v",
            format!("[{b}, {t}, HV, V] with HV a multiple of H = {h} and V >= 1"),
            v.shape(),
        ));
    }
    q.dtype().require_float("q")?;
    for (x, what) in [(k, "k"), (v, "v")] {
        if x.dtype() != q.dtype() {
            return Err(AttnError::DType {
                what: what.into(),
                expected: q.dtype().to_string(),
                actual: x.dtype().to_string(),
            });
        }
    }
    if kd == 0 || kd > MAX_K {
        return Err(AttnError::HeadDim {
            what: "K (q/k head dim)",
            got: kd,
            max: MAX_K,
        });
    }
    Ok(LinearShape {
        batch: b,
        t,
        h,
        hv,
        k: kd,
        v: vd,
    })
}

/// Checks every option against the shape.
pub fn check_options(s: &LinearShape, opts: &LinearOptions) -> Result<()> {
    let rule = opts.rule;
    if opts.feature_map != FeatureMap::Identity && rule != Rule::Linear {
        return Err(AttnError::invalid(
            "feature_map",
            "identity for every rule but linear",
            format!("{} with rule {}", opts.feature_map.name(), rule.name()),
        ));
    }
    if opts.feature_map == FeatureMap::Taylor && s.k > MAX_TAYLOR_K {
        return Err(AttnError::HeadDim {
            what: "K with the Taylor feature map",
            got: s.k,
            max: MAX_TAYLOR_K,
        });
    }
    if opts.normalize && rule != Rule::Linear {
        return Err(AttnError::invalid(
            "normalize",
            "only with rule linear",
            rule.name(),
        ));
    }
    if opts.qk_l2norm && !rule.delta() {
        return Err(AttnError::invalid(
            "qk_l2norm",
            "only with the delta rules",
            rule.name(),
        ));
    }
    if !opts.causal && rule != Rule::Linear {
        return Err(AttnError::invalid(
            "causal = false (global attention)",
            "only with rule linear",
            rule.name(),
        ));
    }
    if let Some(sc) = opts.scale {
        if !sc.is_finite() || (opts.feature_map == FeatureMap::Taylor && sc < 0.0) {
            return Err(AttnError::invalid(
                "scale",
                "a finite number (>= 0 with the Taylor map)",
                sc,
            ));
        }
    }
    sequences(s, opts)?;
    // the gate
    let g_shape: Option<Vec<usize>> = match rule {
        Rule::Linear | Rule::Delta => None,
        Rule::Retention => Some(vec![s.hv]),
        Rule::SimpleGla | Rule::GatedDelta => Some(vec![s.batch, s.t, s.hv]),
        Rule::Gla => Some(vec![s.batch, s.t, s.hv, s.k]),
    };
    match (&g_shape, &opts.g) {
        (None, Some(_)) => {
            return Err(AttnError::invalid(
                "g",
                "no gate for this rule",
                rule.name(),
            ))
        }
        (Some(_), None) if rule != Rule::Retention => {
            return Err(AttnError::invalid(
                "g",
                format!("a gate for rule {}", rule.name()),
                "none",
            ))
        }
        (Some(want), Some(g)) => check_f32("g", g, want)?,
        _ => {}
    }
    match (rule.delta(), &opts.beta) {
        (true, Some(b)) => check_f32("beta", b, &[s.batch, s.t, s.hv])?,
        (true, None) => {
            return Err(AttnError::invalid(
                "beta",
                format!("beta [B, T, HV] for rule {}", rule.name()),
                "none",
            ))
        }
        (false, Some(_)) => {
            return Err(AttnError::invalid(
                "beta",
                "no beta for this rule",
                rule.name(),
            ))
        }
        (false, None) => {}
    }
    if let Some(st) = &opts.initial_state {
        check_state("initial_state", st, &s.state_shape(opts))?;
    }
    Ok(())
}

/// A state tensor: `[N, HV, F, Vs]` f32, contiguous (the kernel indexes it row-major).
fn check_state(what: &str, t: &Tensor, want: &[usize]) -> Result<()> {
    check_f32(what, t, want)?;
    if !t.is_contiguous() {
        return Err(AttnError::invalid(
            what,
            "a contiguous tensor",
            format!("strides {:?}", t.strides()),
        ));
    }
    Ok(())
}

/// Scales each row of `dim` values to unit length (rows of zeros stay near zero): the keys
/// the delta rule is fed, as fla's tests do, since it contracts only for `|k|^2 beta <= 2`.
pub fn unit_rows(x: &mut [f32], dim: usize) {
    for row in x.chunks_mut(dim.max(1)) {
        let n = row.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-3);
        row.iter_mut().for_each(|v| *v /= n);
    }
}

fn check_f32(what: &str, t: &Tensor, want: &[usize]) -> Result<()> {
    t.dtype().require(what, DType::F32)?;
    if t.shape() != want {
        return Err(AttnError::shape(what, format!("{want:?}"), t.shape()));
    }
    Ok(())
}

/// The kernels and the dispatches for this problem on this adapter.
pub fn plan(
    ctx: &GpuContext,
    s: &LinearShape,
    dtype: DType,
    opts: &LinearOptions,
) -> Result<LinearPlan> {
    check_options(s, opts)?;
    if dtype == DType::F16 && !ctx.caps.f16 {
        return Err(AttnError::MissingFeature {
            feature: "SHADER_F16",
            adapter: ctx.adapter_info.name.clone(),
            needed_for: "f16 linear attention".into(),
        });
    }
    let longest = longest_sequence(s, opts);
    let chunked = match opts.mode {
        Mode::FusedChunk => return plan_fused(ctx, s, dtype, opts, longest),
        Mode::Chunk => true,
        Mode::Recurrent => false,
        Mode::Auto => {
            let cpu = ctx.adapter_info.device_type == wgpu::DeviceType::Cpu;
            // a CPU adapter: the fused kernel wherever it runs, decode steps included
            // (see plan_fused)
            let fused = cpu
                && opts.subgroups != Some(false)
                && subgroups_of_8(ctx)
                && fused_unsupported(s, opts).is_none();
            if fused {
                return plan_fused(ctx, s, dtype, opts, longest);
            }
            longest >= auto_chunk_min_t(opts, chunk_subgroups(ctx, opts)?, cpu)
        }
    };
    if chunked {
        plan_chunk(ctx, s, dtype, opts, longest)
    } else {
        plan_recurrent(ctx, s, dtype, opts)
    }
}

/// Whether the chunk kernels run their subgroup variant. lavapipe loops over the lanes for
/// every storage or workgroup load, so a value all lanes need costs eight loads there: the
/// subgroup variants load each value once and shuffle.
fn chunk_subgroups(ctx: &GpuContext, opts: &LinearOptions) -> Result<bool> {
    let (decay, normalize) = (opts.rule.decay(), LinearShape::normalized(opts));
    let sg_ok = subgroups_of_8(ctx);
    match opts.subgroups {
        None => Ok(sg_ok && ChunkKey::sg_supported(decay, normalize)),
        Some(false) => Ok(false),
        Some(true) if !sg_ok => Err(AttnError::MissingFeature {
            feature: "SUBGROUP (subgroups of 8 lanes or more)",
            adapter: ctx.adapter_info.name.clone(),
            needed_for: "the subgroup chunk kernels".into(),
        }),
        Some(true) if !ChunkKey::sg_supported(decay, normalize) => Err(AttnError::invalid(
            "subgroups",
            "None or false for GLA and a normalized output (no subgroup variant)",
            "true",
        )),
        Some(true) => Ok(true),
    }
}

/// Tokens of the longest sequence.
fn longest_sequence(s: &LinearShape, opts: &LinearOptions) -> usize {
    match &opts.cu_seqlens {
        Some(cu) => cu
            .windows(2)
            .map(|w| w[1].saturating_sub(w[0]) as usize)
            .max()
            .unwrap_or(0),
        None => s.t,
    }
}

fn check_grid(ctx: &GpuContext, grid: &[u64; 3]) -> Result<()> {
    let max = u64::from(ctx.limits.max_compute_workgroups_per_dimension);
    if let Some(&g) = grid.iter().find(|&&g| g > max || g == 0) {
        return Err(if g == 0 {
            AttnError::invalid("problem", "at least one sequence", "none")
        } else {
            AttnError::Limit {
                what: "workgroups per dispatch dimension".into(),
                needed: g,
                limit: max,
            }
        });
    }
    Ok(())
}

/// Bytes of chunk states one piece may hold (besides the binding limit).
const CHUNK_STATES_BYTES: u64 = 64 << 20;

fn plan_chunk(
    ctx: &GpuContext,
    s: &LinearShape,
    dtype: DType,
    opts: &LinearOptions,
    longest: usize,
) -> Result<LinearPlan> {
    let normalize = LinearShape::normalized(opts);
    let decay = opts.rule.decay();
    // vec4 loads where K and V allow (the call checks the tensors' offsets and strides)
    // (Taylor's features are products of scalar loads)
    let aligned =
        s.k.is_multiple_of(4) && s.v.is_multiple_of(4) && opts.feature_map != FeatureMap::Taylor;
    let sg = chunk_subgroups(ctx, opts)?;
    let delta = opts.rule.delta();
    let k_u32 = u32_of(s.k, "K")?;
    let key = |stage| {
        let k = if delta {
            let gated = decay == Decay::Scalar;
            ChunkKey::delta(stage, dtype, gated, opts.qk_l2norm, aligned, k_u32)
        } else {
            ChunkKey::new(stage, dtype, opts.feature_map, decay, normalize, aligned)
        };
        // (the delta rules' state pass has one variant)
        if sg && (!delta || stage != Stage::States) {
            k.with_subgroups()
        } else {
            k
        }
    };
    let (states, output) = (key(Stage::States), key(Stage::Output));
    let c = u64::from(states.c());
    let n = s.sequences(opts) as u64;
    let hv = s.hv as u64;
    let chunks = (longest as u64).div_ceil(c).max(1);
    // one slot of chunk states: [N, HV, Fp, W4] vec4s, and the delta rules' per-token
    // scratch of a chunk
    let slot = n * hv * (chunk_state_vec4s(s, opts) + delta_scratch_vec4s(s, opts)) * 16;
    let budget = CHUNK_STATES_BYTES.min(ctx.limits.max_storage_buffer_binding_size);
    let by_memory = budget / slot.max(1);
    if by_memory == 0 {
        return Err(AttnError::Limit {
            what: "bytes of one chunk's states (all sequences and heads)".into(),
            needed: slot,
            limit: budget,
        });
    }
    // the state pass's loops per chunk (the serial gate sum, the keys, the tokens, the
    // values), against lavapipe's count
    let loops = if delta {
        chunk_delta::state_loops_per_chunk(&states, k_u32)
    } else {
        4 * c + 8
    };
    let by_loops = match ctx.caps.loop_limit {
        None => u64::MAX,
        // (and the state's row-loop load and store)
        Some(limit) => ((limit / 2).saturating_sub(chunk::STATE_ROW_LOOPS) / loops).max(1),
    };
    let nvt_o = (s.v as u64).div_ceil(u64::from(output.out_cols()));
    let max_dim = u64::from(ctx.limits.max_compute_workgroups_per_dimension);
    let by_grid = (max_dim / nvt_o).max(1);
    let per_piece = chunks.min(by_memory).min(by_loops).min(by_grid);
    let (tile_rows, tile_cols) = if delta {
        // every row, 4 WG columns
        (s.k as u32, 4 * states.wg())
    } else {
        states.state_tile()
    };
    let states_grid = [
        (s.v as u64).div_ceil(u64::from(tile_cols)),
        (s.feature_dim(opts) as u64).div_ceil(u64::from(tile_rows)),
        n * hv,
    ];
    let solve_grid = [per_piece, hv, n];
    check_grid(ctx, &solve_grid)?;
    let output_grid = [
        per_piece.div_ceil(u64::from(output.chunks_per_workgroup())) * nvt_o,
        hv,
        n,
    ];
    check_grid(ctx, &states_grid)?;
    check_grid(ctx, &output_grid)?;
    let per = u32_of(per_piece as usize, "chunks per piece")?;
    let total = u32_of(chunks as usize, "chunks")?;
    let pieces = chunk_pieces(total, per);
    Ok(LinearPlan {
        kernel: LinearKernel::Chunk(ChunkPlan {
            solve: delta.then(|| (key(Stage::Solve), solve_grid.map(|g| g as u32))),
            states,
            output,
            states_grid: states_grid.map(|g| g as u32),
            output_grid: output_grid.map(|g| g as u32),
            chunks_per_piece: per,
        }),
        pieces,
    })
}

/// Whether the adapter has subgroups of 8 lanes or more: what the subgroup chunk passes and
/// the fused chunk kernel need.
pub fn subgroups_of_8(ctx: &GpuContext) -> bool {
    ctx.caps.subgroups && ctx.caps.subgroup_min >= chunk::SG_LANES
}

/// What the fused chunk kernel needs that these options lack, if anything.
pub fn fused_unsupported(s: &LinearShape, opts: &LinearOptions) -> Option<&'static str> {
    if opts.rule.delta() || opts.rule == Rule::Gla {
        Some("Linear, Retention or SimpleGla")
    } else if !opts.causal {
        Some("causal attention")
    } else if LinearShape::normalized(opts) {
        Some("an output that is not normalized (no Taylor map, no normalize)")
    } else if s.feature_dim(opts) > chunk_fused::FUSED_ROWS as usize {
        Some("K of at most 64")
    } else {
        None
    }
}

/// `total` chunks in ranges of `per`.
fn chunk_pieces(total: u32, per: u32) -> Vec<(u32, u32)> {
    (0..total.div_ceil(per))
        .map(|i| (i * per, (i * per).saturating_add(per).min(total)))
        .collect()
}

/// The fused chunk kernel's plan (`Mode::FusedChunk`), or why it cannot run these options.
///
/// `Auto` takes it on CPU adapters at every length (lavapipe, K = V = 64: 1.2-1.9x faster
/// than the two passes from T = 1024 to 65536 at H = 8, benches/RESULTS.md; with one
/// workgroup, simple GLA at H = 1, T = 1024: 1.47 against 2.85 ms, single runs; and faster
/// than the recurrent kernel down to decode steps, simple GLA, H = 8, medians of 15 runs:
/// T = 1 0.18 against 0.51 ms, T = 4 0.22 against 0.68, T = 16 0.36 against 1.87). A GPU keeps
/// the two passes: the fused kernel's one workgroup per sequence, head and 64 columns would
/// leave most of its compute units idle (not measured: no GPU has run it).
fn plan_fused(
    ctx: &GpuContext,
    s: &LinearShape,
    dtype: DType,
    opts: &LinearOptions,
    longest: usize,
) -> Result<LinearPlan> {
    if let Some(why) = fused_unsupported(s, opts) {
        return Err(AttnError::invalid(
            "mode",
            format!("chunk, recurrent or auto, or fused-chunk with {why}"),
            "fused-chunk",
        ));
    }
    if opts.subgroups == Some(false) {
        return Err(AttnError::invalid(
            "subgroups",
            "None or true for the fused chunk kernel (it has no variant without subgroups)",
            "false",
        ));
    }
    if !subgroups_of_8(ctx) {
        return Err(AttnError::MissingFeature {
            feature: "SUBGROUP (subgroups of 8 lanes or more)",
            adapter: ctx.adapter_info.name.clone(),
            needed_for: "the fused chunk kernel".into(),
        });
    }
    let aligned = s.k.is_multiple_of(4) && s.v.is_multiple_of(4);
    let key = ChunkKey::fused(dtype, opts.feature_map, opts.rule.decay(), aligned);
    let grid = [
        (s.v as u64).div_ceil(u64::from(chunk_fused::FUSED_COLS)),
        1,
        s.sequences(opts) as u64 * s.hv as u64,
    ];
    check_grid(ctx, &grid)?;
    let chunks = (longest as u64).div_ceil(u64::from(key.c())).max(1);
    let per_piece = match ctx.caps.loop_limit {
        None => chunks,
        Some(limit) => ((limit / 2).saturating_sub(chunk::STATE_ROW_LOOPS)
            / chunk_fused::loops_per_chunk(&key))
        .max(1),
    };
    let per = u32_of(per_piece.min(chunks) as usize, "chunks per piece")?;
    let total = u32_of(chunks as usize, "chunks")?;
    let pieces = chunk_pieces(total, per);
    Ok(LinearPlan {
        kernel: LinearKernel::Fused {
            key,
            grid: grid.map(|g| g as u32),
        },
        pieces,
    })
}

/// vec4s of a row of the delta rules' W or U scratch: K or V padded to 64 (the WGSL's `kp4()`,
/// `vu4()`).
fn delta_row_vec4s(x: usize) -> u64 {
    (x as u64).div_ceil(64) * 16
}

/// vec4s of the delta rules' scratch per chunk: per token `(beta, b, 1/|k|, 1/|q|)`, a row of
/// W and of U.
fn delta_scratch_vec4s(s: &LinearShape, opts: &LinearOptions) -> u64 {
    if !opts.rule.delta() {
        return 0;
    }
    u64::from(chunk::C_DELTA) * (1 + delta_row_vec4s(s.k) + delta_row_vec4s(s.v))
}

/// vec4s of one chunk state: F padded to the state pass's 64 rows, times `W4` (V padded to the
/// output pass's 64 columns, plus one for z).
fn chunk_state_vec4s(s: &LinearShape, opts: &LinearOptions) -> u64 {
    let fp = (s.feature_dim(opts) as u64).div_ceil(u64::from(chunk::STATE_ROWS))
        * u64::from(chunk::STATE_ROWS);
    let w4 = (s.v as u64).div_ceil(u64::from(chunk::OUT_COLS)) * u64::from(chunk::OUT_COLS) / 4
        + u64::from(LinearShape::normalized(opts));
    fp * w4
}

fn plan_recurrent(
    ctx: &GpuContext,
    s: &LinearShape,
    dtype: DType,
    opts: &LinearOptions,
) -> Result<LinearPlan> {
    let key = LinearKey::new(
        dtype,
        s.k,
        opts.rule,
        opts.feature_map,
        LinearShape::normalized(opts),
        opts.qk_l2norm,
    );
    // one invocation per column of V (each keeps z itself when normalizing)
    let cols = s.v as u64;
    let grid = [
        cols.div_ceil(u64::from(key.wg)),
        s.hv as u64,
        s.sequences(opts) as u64,
    ];
    check_grid(ctx, &grid)?;
    let t = u32_of(s.t, "T")?;
    // lavapipe counts the loop iterations of an invocation: a piece runs `len` tokens and
    // `len / tb` blocks. Measured: T = 61424 in one piece stopped after token 58255 (its
    // count is not exactly ours), so a piece takes half the limit
    let piece = match ctx.caps.loop_limit {
        None => t.max(1),
        Some(limit) => {
            let usable = limit / 2;
            let tb = u64::from(key.tb);
            let p = usable * tb / (tb + 1) / tb * tb;
            u32::try_from(p.max(tb)).unwrap_or(u32::MAX)
        }
    };
    let ranges: Vec<(u32, u32)> = (0..t.max(1).div_ceil(piece))
        .map(|i| (i * piece, (i * piece).saturating_add(piece).min(t)))
        .collect();
    Ok(LinearPlan {
        kernel: LinearKernel::Recurrent {
            key,
            grid: grid.map(|g| g as u32),
        },
        pieces: ranges,
    })
}

/// Every kernel the linear family can build (for naga in `cargo test`).
pub fn all_kernels() -> Vec<Box<dyn Kernel>> {
    let rec = LinearKey::all()
        .into_iter()
        .map(|k| Box::new(k) as Box<dyn Kernel>);
    let chunk = ChunkKey::all()
        .into_iter()
        .map(|k| Box::new(k) as Box<dyn Kernel>);
    rec.chain(chunk).collect()
}

/// `[off, batch, token, head]` element strides of a rank-3/4 tensor's first axes; broadcast
/// axes get stride 0.
fn strides(t: &Tensor, bound: &BoundRange) -> Result<[u32; 4]> {
    let st = t.strides();
    let get = |i: usize| st.get(i).map_or(Ok(0), |&x| u32_of(x, "tensor stride"));
    Ok([bound.elem_offset, get(0)?, get(1)?, get(2)?])
}

/// Records the linear attention into `encoder`. `final_state`, when given, receives the state
/// after the last token (`[N, HV, F, Vs]` f32, contiguous). `timestamps` brackets all
/// dispatches.
#[allow(clippy::too_many_arguments)]
pub fn encode_linear_attention(
    ctx: &GpuContext,
    encoder: &mut wgpu::CommandEncoder,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    out: &Tensor,
    final_state: Option<&Tensor>,
    opts: &LinearOptions,
    timestamps: Option<(&wgpu::QuerySet, u32)>,
) -> Result<LinearPlan> {
    let s = check_inputs(q, k, v)?;
    let mut plan = plan(ctx, &s, q.dtype(), opts)?;
    let want_out = [s.batch, s.t, s.hv, s.v];
    out.dtype().require("out", v.dtype())?;
    if out.shape() != want_out {
        return Err(AttnError::shape(
            "out",
            format!("{want_out:?}"),
            out.shape(),
        ));
    }
    // vec4 access needs every row to start on a vec4
    let fours = |t: &Tensor| {
        t.offset().is_multiple_of(4) && t.strides().iter().take(3).all(|x| x.is_multiple_of(4))
    };
    if ![q, k, v, out].into_iter().all(fours) {
        match &mut plan.kernel {
            LinearKernel::Chunk(cp) => {
                cp.states.aligned = false;
                cp.output.aligned = false;
            }
            LinearKernel::Fused { key, .. } => key.aligned = false,
            LinearKernel::Recurrent { .. } => {}
        }
    }
    let state_shape = s.state_shape(opts);
    if let Some(fs) = final_state {
        check_state("final_state", fs, &state_shape)?;
    }
    let mut inputs: Vec<(&str, &Tensor)> = vec![("q", q), ("k", k), ("v", v)];
    for (name, t) in [
        ("g", &opts.g),
        ("beta", &opts.beta),
        ("initial_state", &opts.initial_state),
    ] {
        if let Some(t) = t {
            inputs.push((name, t));
        }
    }
    let mut outputs: Vec<(&str, &Tensor)> = vec![("out", out)];
    if let Some(fs) = final_state {
        outputs.push(("final_state", fs));
    }
    check_no_alias(&inputs, &outputs)?;
    // the state carried between pieces (and written at the end) needs a buffer
    // (global attention in chunks reads the final state for every chunk's output)
    let chunked = plan.mode() == Mode::Chunk;
    let carry = plan.pieces.len() > 1 || (chunked && !opts.causal);
    let scratch = if final_state.is_none() && carry {
        Some(Tensor::filled(ctx, &state_shape, DType::F32, 0.0)?)
    } else {
        None
    };
    let state_out = final_state.or(scratch.as_ref());
    // retention's default decays, one per head
    let default_g = if opts.rule == Rule::Retention && opts.g.is_none() {
        let g: Vec<f32> = (0..s.hv).map(|h| retention_log_decay(h) as f32).collect();
        Some(Tensor::from_f32(ctx, &g, &[s.hv])?)
    } else {
        None
    };
    let g = opts.g.as_ref().or(default_g.as_ref());

    let bq = BoundRange::new(ctx, q, "q")?;
    let bk = BoundRange::new(ctx, k, "k")?;
    let bv = BoundRange::new(ctx, v, "v")?;
    let bo = BoundRange::new(ctx, out, "out")?;
    let bg = g.map(|t| BoundRange::new(ctx, t, "g")).transpose()?;
    let bb = opts
        .beta
        .as_ref()
        .map(|t| BoundRange::new(ctx, t, "beta"))
        .transpose()?;
    let bi = opts
        .initial_state
        .as_ref()
        .map(|t| BoundRange::new(ctx, t, "initial_state"))
        .transpose()?;
    let bs = state_out
        .map(|t| BoundRange::new(ctx, t, "final_state"))
        .transpose()?;
    let g_st = match (g, &bg) {
        // one decay per head, whatever the batch and token
        (Some(t), Some(r)) if opts.rule == Rule::Retention => {
            [r.elem_offset, 0, 0, u32_of(t.strides()[0], "g stride")?]
        }
        (Some(t), Some(r)) => strides(t, r)?,
        _ => [0; 4],
    };
    let g_si = match g {
        Some(t) if opts.rule == Rule::Gla => u32_of(t.strides()[3], "g stride")?,
        _ => 0,
    };
    let scale = opts.scale.unwrap_or(1.0 / (s.k as f32).sqrt());
    let mut fl = 0u32;
    if opts.cu_seqlens.is_some() {
        fl |= flags::VARLEN;
    }
    if state_out.is_some() {
        fl |= flags::WRITE_STATE;
    }
    let base = LinearParams {
        n_seq: u32_of(s.sequences(opts), "sequences")?,
        t: u32_of(s.t, "T")?,
        h: u32_of(s.h, "H")?,
        hv: u32_of(s.hv, "HV")?,
        dk: u32_of(s.k, "K")?,
        dv: u32_of(s.v, "V")?,
        f: u32_of(s.feature_dim(opts), "F")?,
        vs: u32_of(s.state_cols(opts), "state columns")?,
        flags: fl,
        t_from: 0,
        t_to: 0,
        group: u32_of(s.hv / s.h, "HV / H")?,
        scale: if opts.feature_map == FeatureMap::Taylor {
            1.0
        } else {
            scale
        },
        eps: s.eps(opts) as f32,
        feat_scale: if opts.feature_map == FeatureMap::Taylor {
            scale.sqrt()
        } else {
            1.0
        },
        g_si,
        q_st: strides(q, &bq)?,
        k_st: strides(k, &bk)?,
        v_st: strides(v, &bv)?,
        o_st: strides(out, &bo)?,
        g_st,
        beta_st: match (&opts.beta, &bb) {
            (Some(t), Some(r)) => strides(t, r)?,
            _ => [0; 4],
        },
        state: [
            bi.as_ref().map_or(0, |r| r.elem_offset),
            bs.as_ref().map_or(0, |r| r.elem_offset),
            0,
            0,
        ],
        chunk: [0; 4],
    };
    let b = Bound {
        q: &bq,
        k: &bk,
        v: &bv,
        o: &bo,
        g: bg.as_ref(),
        beta: bb.as_ref(),
        init: bi.as_ref(),
        state: bs.as_ref(),
    };
    match &plan.kernel {
        LinearKernel::Recurrent { key, grid } => {
            encode_recurrent(ctx, encoder, key, grid, &plan, &base, &b, opts, timestamps)?
        }
        LinearKernel::Chunk(cp) => encode_chunk(
            ctx,
            encoder,
            &s,
            cp,
            &plan.pieces,
            &base,
            &b,
            opts,
            timestamps,
        )?,
        LinearKernel::Fused { key, grid } => encode_fused(
            ctx,
            encoder,
            key,
            grid,
            &plan.pieces,
            &base,
            &b,
            opts,
            timestamps,
        )?,
    }
    Ok(plan)
}

/// The bound buffers of a call.
struct Bound<'a> {
    q: &'a BoundRange<'a>,
    k: &'a BoundRange<'a>,
    v: &'a BoundRange<'a>,
    o: &'a BoundRange<'a>,
    g: Option<&'a BoundRange<'a>>,
    beta: Option<&'a BoundRange<'a>>,
    init: Option<&'a BoundRange<'a>>,
    /// The state carried between pieces and written at the end (final state or scratch).
    state: Option<&'a BoundRange<'a>>,
}

fn cu_buffer(ctx: &GpuContext, opts: &LinearOptions) -> Option<wgpu::Buffer> {
    // offsets only for packed sequences (the kernels read them under F_VARLEN)
    opts.cu_seqlens.as_ref().map(|cu| {
        ctx.device
            .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some("linear cu_seqlens"),
                contents: bytemuck::cast_slice(cu),
                usage: wgpu::BufferUsages::STORAGE,
            })
    })
}

/// A compute pass, its start and end timestamped when asked.
fn begin_pass<'e>(
    encoder: &'e mut wgpu::CommandEncoder,
    label: &str,
    timestamps: Option<(&wgpu::QuerySet, u32)>,
) -> wgpu::ComputePass<'e> {
    encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
        label: Some(label),
        timestamp_writes: timestamps.map(|(set, i)| wgpu::ComputePassTimestampWrites {
            query_set: set,
            beginning_of_pass_write_index: Some(i),
            end_of_pass_write_index: Some(i + 1),
        }),
    })
}

fn params_buffer(ctx: &GpuContext, p: &LinearParams) -> wgpu::Buffer {
    ctx.device
        .create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some("linear params"),
            contents: bytemuck::bytes_of(p),
            usage: wgpu::BufferUsages::UNIFORM,
        })
}

#[allow(clippy::too_many_arguments)]
fn encode_recurrent(
    ctx: &GpuContext,
    encoder: &mut wgpu::CommandEncoder,
    key: &LinearKey,
    grid: &[u32; 3],
    plan: &LinearPlan,
    base: &LinearParams,
    bound: &Bound,
    opts: &LinearOptions,
    timestamps: Option<(&wgpu::QuerySet, u32)>,
) -> Result<()> {
    // one dispatch per piece; global attention runs the update pieces, then the output ones
    let mut steps: Vec<LinearParams> = Vec::new();
    let phases: &[u32] = if opts.causal {
        &[flags::UPDATE | flags::OUTPUT]
    } else {
        &[flags::UPDATE, flags::OUTPUT]
    };
    for (pi, &phase) in phases.iter().enumerate() {
        for (i, &(from, to)) in plan.pieces.iter().enumerate() {
            let mut p = *base;
            p.t_from = from;
            p.t_to = to;
            p.flags |= phase;
            let first = pi == 0 && i == 0;
            if first {
                if opts.initial_state.is_some() {
                    p.flags |= flags::INIT;
                }
            } else {
                p.flags |= flags::RESUME;
            }
            // a lone output phase of global attention reads the state and leaves it be
            if phase == flags::OUTPUT {
                p.flags &= !flags::WRITE_STATE;
            }
            steps.push(p);
        }
    }
    let cu_buf = cu_buffer(ctx, opts);
    let dummy = BoundRange::whole(&ctx.dummy);
    let dummy_rw = BoundRange::whole(&ctx.dummy_rw);
    let cu = cu_buf
        .as_ref()
        .map_or(BoundRange::whole(&ctx.dummy), BoundRange::whole);
    let rest = [
        bound.q.entry(1),
        bound.k.entry(2),
        bound.v.entry(3),
        bound.g.unwrap_or(&dummy).entry(4),
        bound.beta.unwrap_or(&dummy).entry(5),
        bound.init.unwrap_or(&dummy).entry(6),
        cu.entry(7),
        bound.o.entry(8),
        bound.state.unwrap_or(&dummy_rw).entry(9),
    ];
    encode_steps(
        ctx,
        encoder,
        key,
        grid,
        &steps,
        &rest,
        "linear attention",
        timestamps,
    )
}

/// One kernel dispatched once per step, the same buffers bound at 1.. and the step's
/// parameters at 0.
#[allow(clippy::too_many_arguments)]
fn encode_steps(
    ctx: &GpuContext,
    encoder: &mut wgpu::CommandEncoder,
    kernel: &dyn Kernel,
    grid: &[u32; 3],
    steps: &[LinearParams],
    rest: &[wgpu::BindGroupEntry],
    label: &str,
    timestamps: Option<(&wgpu::QuerySet, u32)>,
) -> Result<()> {
    ctx.scoped(|| {
        let pipeline = ctx.pipeline(kernel)?;
        let layout = pipeline.get_bind_group_layout(0);
        let groups: Vec<wgpu::BindGroup> = steps
            .iter()
            .map(|p| {
                let params = params_buffer(ctx, p);
                let mut entries = vec![BoundRange::whole(&params).entry(0)];
                entries.extend(rest.iter().cloned());
                ctx.device.create_bind_group(&wgpu::BindGroupDescriptor {
                    label: Some(label),
                    layout: &layout,
                    entries: &entries,
                })
            })
            .collect();
        let mut pass = begin_pass(encoder, label, timestamps);
        pass.set_pipeline(&pipeline);
        let [x, y, z] = *grid;
        for bg in &groups {
            pass.set_bind_group(0, bg, &[]);
            pass.dispatch_workgroups(x, y, z);
        }
        Ok(())
    })
}

/// The fused chunk kernel: one dispatch per piece of chunks, the state carried through the
/// final-state buffer.
#[allow(clippy::too_many_arguments)]
fn encode_fused(
    ctx: &GpuContext,
    encoder: &mut wgpu::CommandEncoder,
    key: &ChunkKey,
    grid: &[u32; 3],
    pieces: &[(u32, u32)],
    base: &LinearParams,
    bound: &Bound,
    opts: &LinearOptions,
    timestamps: Option<(&wgpu::QuerySet, u32)>,
) -> Result<()> {
    let steps: Vec<LinearParams> = pieces
        .iter()
        .enumerate()
        .map(|(i, &(from, to))| {
            let mut p = *base;
            p.chunk = [from, to, 0, 0];
            if i > 0 {
                p.flags |= flags::RESUME;
            } else if opts.initial_state.is_some() {
                p.flags |= flags::INIT;
            }
            p
        })
        .collect();
    let cu_buf = cu_buffer(ctx, opts);
    let dummy = BoundRange::whole(&ctx.dummy);
    let dummy_rw = BoundRange::whole(&ctx.dummy_rw);
    let cu = cu_buf
        .as_ref()
        .map_or(BoundRange::whole(&ctx.dummy), BoundRange::whole);
    let rest = [
        bound.q.entry(1),
        bound.k.entry(2),
        bound.v.entry(3),
        bound.g.unwrap_or(&dummy).entry(4),
        bound.init.unwrap_or(&dummy).entry(5),
        cu.entry(6),
        bound.state.unwrap_or(&dummy_rw).entry(7),
        bound.o.entry(8),
    ];
    let label = "linear attention (fused chunks)";
    encode_steps(ctx, encoder, key, grid, &steps, &rest, label, timestamps)
}

/// The chunk passes: per piece the state pass (storing each chunk's starting state) and the
/// output pass; global attention runs every state piece, then the output pieces against the
/// final state.
#[allow(clippy::too_many_arguments)]
fn encode_chunk(
    ctx: &GpuContext,
    encoder: &mut wgpu::CommandEncoder,
    s: &LinearShape,
    cp: &ChunkPlan,
    pieces: &[(u32, u32)],
    base: &LinearParams,
    bound: &Bound,
    opts: &LinearOptions,
    timestamps: Option<(&wgpu::QuerySet, u32)>,
) -> Result<()> {
    let ChunkPlan {
        solve,
        states,
        output,
        states_grid,
        output_grid,
        chunks_per_piece,
    } = cp;
    // chunk states [N, HV, P, Fp, W4] (vec4s; global attention: one slot, the final state)
    let slot = chunk_state_vec4s(s, opts);
    let slots = if opts.causal {
        u64::from(*chunks_per_piece)
    } else {
        1
    };
    let per_nh = slot * slots;
    let total = per_nh * u64::from(base.n_seq) * u64::from(base.hv);
    let (slot, per_nh) = (
        u32_of(slot as usize, "chunk state")?,
        u32_of(per_nh as usize, "chunk states")?,
    );
    // (pass, params) in order
    let mut steps: Vec<(Stage, LinearParams)> = Vec::new();
    for (i, &(from, to)) in pieces.iter().enumerate() {
        let mut p = *base;
        p.chunk = [from, to, per_nh, slot];
        if i == 0 {
            if opts.initial_state.is_some() {
                p.flags |= flags::INIT;
            }
        } else {
            p.flags |= flags::RESUME;
        }
        // (WRITE_STATE is in base whenever there is a state to carry or return)
        p.flags |= if opts.causal {
            flags::CHUNKS
        } else {
            flags::GLOBAL
        };
        if solve.is_some() {
            steps.push((Stage::Solve, p));
        }
        steps.push((Stage::States, p));
        if opts.causal {
            let mut o = *base;
            o.chunk = [from, to, per_nh, slot];
            o.flags &= flags::VARLEN;
            steps.push((Stage::Output, o));
        }
    }
    if !opts.causal {
        for &(from, to) in pieces {
            let mut o = *base;
            o.chunk = [from, to, per_nh, 0];
            o.flags = (o.flags & flags::VARLEN) | flags::GLOBAL;
            steps.push((Stage::Output, o));
        }
    }
    ctx.scoped(|| {
        let dev = &ctx.device;
        let states_pipe = ctx.pipeline(states)?;
        let output_pipe = ctx.pipeline(output)?;
        let solve_pipe = solve.as_ref().map(|(k, _)| ctx.pipeline(k)).transpose()?;
        let scratch = |label: &'static str, vec4s: u64| -> Result<wgpu::Buffer> {
            let bytes = vec4s.saturating_mul(16);
            ctx.check_binding(label, bytes)?;
            Ok(dev.create_buffer(&wgpu::BufferDescriptor {
                label: Some(label),
                size: bytes.max(16),
                usage: wgpu::BufferUsages::STORAGE,
                mapped_at_creation: false,
            }))
        };
        let chunk_states = scratch("linear chunk states", total)?;
        // the delta rules' per-token scratch of a piece: (beta, b, 1/|k|, 1/|q|), W, U
        let toks = u64::from(*chunks_per_piece)
            * u64::from(chunk::C_DELTA)
            * u64::from(base.n_seq)
            * u64::from(base.hv);
        let delta_bufs = match solve {
            Some(_) => Some((
                scratch("linear delta tokens", toks)?,
                scratch("linear delta W", toks * delta_row_vec4s(s.k))?,
                scratch("linear delta U", toks * delta_row_vec4s(s.v))?,
            )),
            None => None,
        };
        let delta_ranges = delta_bufs.as_ref().map(|(t, w, u)| {
            (
                BoundRange::whole(t),
                BoundRange::whole(w),
                BoundRange::whole(u),
            )
        });
        let cu_buf = cu_buffer(ctx, opts);
        let dummy = BoundRange::whole(&ctx.dummy);
        let dummy_rw = BoundRange::whole(&ctx.dummy_rw);
        let cu = cu_buf
            .as_ref()
            .map_or(BoundRange::whole(&ctx.dummy), BoundRange::whole);
        let cs = BoundRange::whole(&chunk_states);
        let groups: Vec<(Stage, wgpu::BindGroup)> = steps
            .iter()
            .map(|(stage, p)| {
                let params = params_buffer(ctx, p);
                let pr = BoundRange::whole(&params);
                let (layout, entries) = match (stage, &delta_ranges, &solve_pipe) {
                    (Stage::Solve, Some((tk, wr, ur)), Some(sp)) => (
                        sp.get_bind_group_layout(0),
                        vec![
                            pr.entry(0),
                            bound.q.entry(1),
                            bound.k.entry(2),
                            bound.v.entry(3),
                            bound.g.unwrap_or(&dummy).entry(4),
                            bound.beta.unwrap_or(&dummy).entry(5),
                            cu.entry(6),
                            tk.entry(7),
                            wr.entry(8),
                            ur.entry(9),
                        ],
                    ),
                    (Stage::States, Some((tk, wr, ur)), _) => (
                        states_pipe.get_bind_group_layout(0),
                        vec![
                            pr.entry(0),
                            bound.k.entry(1),
                            bound.init.unwrap_or(&dummy).entry(2),
                            cu.entry(3),
                            tk.entry(4),
                            wr.entry(5),
                            ur.entry(6),
                            cs.entry(7),
                            bound.state.unwrap_or(&dummy_rw).entry(8),
                        ],
                    ),
                    (Stage::Output, Some((tk, _, ur)), _) => (
                        output_pipe.get_bind_group_layout(0),
                        vec![
                            pr.entry(0),
                            bound.q.entry(1),
                            bound.k.entry(2),
                            ur.entry(3),
                            bound.g.unwrap_or(&dummy).entry(4),
                            cu.entry(5),
                            cs.entry(6),
                            bound.o.entry(7),
                            tk.entry(8),
                        ],
                    ),
                    (Stage::Solve | Stage::Fused, _, _) => {
                        return Err(AttnError::invalid(
                            "chunk plan",
                            "a solve pass only for the delta rules, no fused kernel",
                            format!("{stage:?}"),
                        ))
                    }
                    (Stage::States, None, _) => (
                        states_pipe.get_bind_group_layout(0),
                        vec![
                            pr.entry(0),
                            bound.k.entry(1),
                            bound.v.entry(2),
                            bound.g.unwrap_or(&dummy).entry(3),
                            bound.init.unwrap_or(&dummy).entry(4),
                            cu.entry(5),
                            cs.entry(6),
                            bound.state.unwrap_or(&dummy_rw).entry(7),
                        ],
                    ),
                    (Stage::Output, None, _) => (
                        output_pipe.get_bind_group_layout(0),
                        vec![
                            pr.entry(0),
                            bound.q.entry(1),
                            bound.k.entry(2),
                            bound.v.entry(3),
                            bound.g.unwrap_or(&dummy).entry(4),
                            cu.entry(5),
                            cs.entry(6),
                            bound.o.entry(7),
                        ],
                    ),
                };
                let bg = dev.create_bind_group(&wgpu::BindGroupDescriptor {
                    label: Some("linear chunk bind group"),
                    layout: &layout,
                    entries: &entries,
                });
                Ok((*stage, bg))
            })
            .collect::<Result<_>>()?;
        let mut pass = begin_pass(encoder, "linear attention (chunks)", timestamps);
        for (stage, bg) in &groups {
            let [x, y, z] = match (stage, &solve_pipe, solve) {
                (Stage::Solve, Some(sp), Some((_, grid))) => {
                    pass.set_pipeline(sp);
                    *grid
                }
                (Stage::Solve | Stage::Fused, _, _) => continue,
                (Stage::States, _, _) => {
                    pass.set_pipeline(&states_pipe);
                    *states_grid
                }
                (Stage::Output, _, _) => {
                    pass.set_pipeline(&output_pipe);
                    *output_grid
                }
            };
            pass.set_bind_group(0, bg, &[]);
            pass.dispatch_workgroups(x, y, z);
        }
        Ok(())
    })
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
