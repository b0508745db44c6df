//! The linear family's checks: shapes and dtypes of q, k, v and every option against them, so
//! the plan and the encoders never see a bad call.

use super::{sequences, FeatureMap, LinearOptions, LinearShape, Rule, MAX_K, MAX_TAYLOR_K};
pub(super) use crate::error::u32_of;
use crate::error::{AttnError, Result};
use crate::tensor::{DType, Tensor};

pub(super) fn dims4(t: &Tensor, what: &str, layout: &str) -> Result<[usize; 4]> {
    t.shape()
        .try_into()
        .map_err(|_| AttnError::shape(what, format!("rank 4 {layout}"), t.shape()))
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
    check_gate_and_beta(s, opts)?;
    if let Some(st) = &opts.initial_state {
        check_state("initial_state", st, &s.state_shape(opts))?;
    }
    Ok(())
}

/// The gate `g` and `beta`: present with the shape the rule reads, absent where it reads none.
fn check_gate_and_beta(s: &LinearShape, opts: &LinearOptions) -> Result<()> {
    let rule = opts.rule;
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
    Ok(())
}

/// A state tensor: `[N, HV, F, Vs]` f32, contiguous (the kernel indexes it row-major).
pub(super) fn check_state(what: &str, t: &Tensor, want: &[usize]) -> Result<()> {
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

pub(super) fn check_f32(what: &str, t: &Tensor, want: &[usize]) -> Result<()> {
    t.dtype().require(what, DType::F32)?;
    if t.shape() != want {
        return Err(AttnError::shape(what, format!("{want:?}"), t.shape()));
    }
    Ok(())
}
