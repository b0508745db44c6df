//! The page's linear-attention variant: random inputs for a rule, one timed call, the check of
//! O and the final state against the f64 reference, the causal pattern, and the decayed
//! scores of one query for the heat map. Plain Rust, like `case.rs`.

use wgpu_attention::bench::{pseudo_random, time_passes_async};
use wgpu_attention::linear::reference::{compare_linear, LinearRefInputs};
use wgpu_attention::linear::{self, LinearShape};
use wgpu_attention::{
    encode_linear_attention, AttnError, DType, FeatureMap, GpuContext, LinearOptions, Mode, Result,
    Rule, Tensor,
};

use crate::case::{Config, Pattern, Report, Weights};

const MAX_CELLS: usize = 128;

/// Runs a `Variant::Linear` case.
pub async fn run(ctx: &GpuContext, cfg: &Config) -> Result<Report> {
    let (rule, map, mode, s) = parse_config(cfg)?;
    let HostInputs { q, k, v, g, beta } = host_inputs(&s, rule, cfg.seed.wrapping_mul(5));
    let mut opts = LinearOptions::default()
        .rule(rule)
        .feature_map(map)
        .normalize(map != FeatureMap::Identity && rule == Rule::Linear)
        .mode(mode);
    let qk_dims = [s.batch, s.t, s.h, s.k];
    let qt = Tensor::from_f32(ctx, &q, &qk_dims)?;
    let kt = Tensor::from_f32(ctx, &k, &qk_dims)?;
    let vt = Tensor::from_f32(ctx, &v, &[s.batch, s.t, s.hv, s.v])?;
    let gate_dims = match rule {
        Rule::Gla => vec![s.batch, s.t, s.hv, s.k],
        _ => vec![s.batch, s.t, s.hv],
    };
    opts.g = (g.as_ref())
        .map(|x| Tensor::from_f32(ctx, x, &gate_dims))
        .transpose()?;
    opts.beta = beta
        .as_ref()
        .map(|x| Tensor::from_f32(ctx, x, &[s.batch, s.t, s.hv]))
        .transpose()?;
    let out = Tensor::filled(ctx, &[s.batch, s.t, s.hv, s.v], DType::F32, f32::NAN)?;
    let fin = Tensor::filled(ctx, &s.state_shape(&opts), DType::F32, f32::NAN)?;
    let mut kernel = String::new();
    let timing = if ctx.caps.timestamps {
        Some(
            time_passes_async(ctx, 1, cfg.repeats, |enc, ts| {
                let plan =
                    encode_linear_attention(ctx, enc, &qt, &kt, &vt, &out, Some(&fin), &opts, ts)?;
                kernel = plan.label();
                Ok(())
            })
            .await?,
        )
    } else {
        ctx.submit(|enc| {
            let plan =
                encode_linear_attention(ctx, enc, &qt, &kt, &vt, &out, Some(&fin), &opts, None)?;
            kernel = plan.label();
            Ok(())
        })?;
        None
    };
    ctx.finished().await?;
    let got = out.to_vec_f32_async(ctx).await?;
    let got_state = fin.to_vec_f32_async(ctx).await?;
    let ri = LinearRefInputs {
        shape: s,
        q: &q,
        k: &k,
        v: &v,
        g: g.as_deref(),
        beta: beta.as_deref(),
        initial_state: None,
    };
    let (mut check, state) = compare_linear(&ri, &opts, false, &got, &got_state)?;
    if !state.passed {
        check.passed = false;
        check.problem = Some(format!(
            "final state: max abs err {:.3e} over tolerance {:.3e}",
            state.max_abs, state.tolerance_abs
        ));
    }
    let flops = s.flops(&opts);
    let pairs = s.t as u64 * (s.t as u64 + 1) / 2;
    Ok(Report {
        name: cfg.name.clone(),
        variant: cfg.variant,
        kernel,
        dtype: cfg.dtype.clone(),
        shape: [s.batch, s.t, s.t, s.h, s.hv, s.k],
        gpu_ms: timing.as_ref().map(|t| t.median_ms),
        samples_ms: timing.as_ref().map_or(vec![], |t| t.samples_ms.clone()),
        clock: timing.as_ref().map(|t| t.clock),
        gflops: timing.as_ref().map(|t| flops / (t.median_ms * 1e6)),
        visible_pairs: pairs,
        check,
        pattern: causal_pattern(s.t),
        weights: weights(&s, &q, &k, g.as_deref(), rule, cfg.query),
    })
}

/// The case's rule, feature map, mode and shape, checked.
fn parse_config(cfg: &Config) -> Result<(Rule, FeatureMap, Mode, LinearShape)> {
    let rule = Rule::parse(&cfg.rule).ok_or_else(|| {
        AttnError::invalid(
            "rule",
            "linear, retention, simple-gla, gla, delta or gated-delta",
            &cfg.rule,
        )
    })?;
    let map = FeatureMap::parse(&cfg.feature_map).ok_or_else(|| {
        AttnError::invalid(
            "feature_map",
            "identity, elu1, relu or taylor",
            &cfg.feature_map,
        )
    })?;
    let mode = Mode::parse(&cfg.mode)
        .ok_or_else(|| AttnError::invalid("mode", "auto, recurrent or chunk", &cfg.mode))?;
    if cfg.dtype != "f32" {
        return Err(AttnError::invalid(
            "dtype",
            "f32 (the page's linear variant)",
            &cfg.dtype,
        ));
    }
    if cfg.repeats == 0 {
        return Err(AttnError::invalid("repeats", "at least 1", 0));
    }
    let hv = if cfg.value_heads == 0 {
        cfg.heads
    } else {
        cfg.value_heads
    };
    let s = LinearShape {
        batch: cfg.batch,
        t: cfg.lq,
        h: cfg.heads,
        hv,
        k: cfg.d,
        v: cfg.d,
    };
    if cfg.query >= s.t {
        return Err(AttnError::invalid(
            "query",
            format!("an index below T = {}", s.t),
            cfg.query,
        ));
    }
    Ok((rule, map, mode, s))
}

/// A case's random inputs on the host: gates in (-1, 0) where the rule reads them, beta in
/// (0, 1) for the delta rules (whose keys are unit rows).
struct HostInputs {
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    g: Option<Vec<f32>>,
    beta: Option<Vec<f32>>,
}

fn host_inputs(s: &LinearShape, rule: Rule, seed: u64) -> HostInputs {
    let n_qk = s.batch * s.t * s.h * s.k;
    let q = pseudo_random(n_qk, seed);
    let mut k = pseudo_random(n_qk, seed + 1);
    let delta = matches!(rule, Rule::Delta | Rule::GatedDelta);
    if delta {
        linear::unit_rows(&mut k, s.k);
    }
    let v = pseudo_random(s.batch * s.t * s.hv * s.v, seed + 2);
    let per_head = s.batch * s.t * s.hv;
    // gates in (-1, 0), beta in (0, 1)
    let gate = |n: usize| -> Vec<f32> {
        pseudo_random(n, seed + 3)
            .iter()
            .map(|x| -0.5 * (x.abs() + 1e-3))
            .collect()
    };
    let g = match rule {
        Rule::SimpleGla | Rule::GatedDelta => Some(gate(per_head)),
        Rule::Gla => Some(gate(per_head * s.k)),
        _ => None,
    };
    let beta: Option<Vec<f32>> = delta.then(|| {
        pseudo_random(per_head, seed + 4)
            .iter()
            .map(|x| 0.5 * (x + 1.0))
            .collect()
    });
    HostInputs { q, k, v, g, beta }
}

/// Token t reads tokens 0..=t (through the state): the causal triangle, pooled.
fn causal_pattern(t: usize) -> Pattern {
    let n = t.min(MAX_CELLS);
    let mut cells = Vec::with_capacity(n * n);
    for r in 0..n {
        for c in 0..n {
            // share of (i, j) pairs of the cell with j <= i
            let (i0, i1) = (r * t / n, (r + 1) * t / n);
            let (j0, j1) = (c * t / n, (c + 1) * t / n);
            let mut seen = 0usize;
            for i in i0..i1 {
                seen += (j0..j1).filter(|&j| j <= i).count();
            }
            let total = ((i1 - i0) * (j1 - j0)).max(1);
            cells.push((seen as f64 / total as f64 * 255.0).round() as u8);
        }
    }
    Pattern {
        rows: n,
        cols: n,
        cells,
    }
}

/// How much token j feeds query i (batch 0, q/k head 0, value head 0): `|q_i . k_j|` times
/// the decay between them for the scalar gates (retention, simple GLA, gated DeltaNet); raw
/// feature-free scores otherwise (GLA's per-row decay and the delta rule's corrections have
/// no single weight per pair).
fn weights(
    s: &LinearShape,
    q: &[f32],
    k: &[f32],
    g: Option<&[f32]>,
    rule: Rule,
    i: usize,
) -> Weights {
    let row = |x: &[f32], t: usize| -> Vec<f64> {
        x[t * s.h * s.k..][..s.k]
            .iter()
            .map(|&v| v as f64)
            .collect()
    };
    let qi = row(q, i);
    // log decay from token j to i: sum of g over j+1..=i
    let log_decay = |j: usize| -> f64 {
        match (rule, g) {
            (Rule::Retention, _) => (i - j) as f64 * linear::retention_log_decay(0),
            (Rule::SimpleGla | Rule::GatedDelta, Some(g)) => {
                (j + 1..=i).map(|t| g[t * s.hv] as f64).sum()
            }
            _ => 0.0,
        }
    };
    let values = (0..s.t)
        .map(|j| {
            if j > i {
                return 0.0;
            }
            let kj = row(k, j);
            let dot: f64 = qi.iter().zip(&kj).map(|(a, b)| a * b).sum();
            (dot.abs() * log_decay(j).exp()) as f32
        })
        .collect();
    Weights {
        query: i,
        values,
        grid: vec![],
    }
}
