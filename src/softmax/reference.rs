//! The f64 reference core (engine) of every softmax family: every option of a dense call, no
//! tiling, no tricks, with hooks ([`RefHooks`]) where a family scores or masks differently
//! (sparse: score_mod and block masks; neighborhood: its windows). Tests and the CLI's
//! `--check` compare the GPU against it.

use super::{AttnShape, FlashOptions};
use crate::error::{AttnError, Result};

/// Host-side data for the reference. Layouts are row-major `[B, L, H, D]`; `bias` is
/// `[bb, bh, Lq, Lk]` with `bb` in {1, B} and `bh` in {1, Hq}.
pub struct RefInputs<'a> {
    pub shape: AttnShape,
    pub q: &'a [f32],
    pub k: &'a [f32],
    pub v: &'a [f32],
    pub bias: Option<(&'a [f32], [usize; 2])>,
}

impl RefInputs<'_> {
    /// Checks that the slices and the options fit `shape`, so the reference never indexes out
    /// of bounds: a typed error naming the input and the lengths.
    pub fn check(&self, opts: &FlashOptions) -> Result<()> {
        let s = self.shape;
        let len = |what: &str, got: usize, dims: &[usize]| -> Result<()> {
            let want = dims
                .iter()
                .try_fold(1usize, |n, &x| n.checked_mul(x))
                .ok_or_else(|| {
                    AttnError::invalid(what, "a shape whose size fits usize", format!("{dims:?}"))
                })?;
            if got != want {
                return Err(AttnError::shape(
                    what,
                    format!("{want} values for {dims:?}"),
                    format!("{got} values"),
                ));
            }
            Ok(())
        };
        if s.hkv == 0 || !s.hq.is_multiple_of(s.hkv) {
            return Err(AttnError::shape(
                "q heads",
                "Hkv >= 1 dividing Hq (GQA/MQA)",
                format!("Hq = {}, Hkv = {}", s.hq, s.hkv),
            ));
        }
        len("q", self.q.len(), &[s.batch, s.lq, s.hq, s.d])?;
        len("k", self.k.len(), &[s.batch, s.lk, s.hkv, s.d])?;
        len("v", self.v.len(), &[s.batch, s.lk, s.hkv, s.dv])?;
        if let Some((bias, [bb, bh])) = self.bias {
            if !(bb == 1 || bb == s.batch) || !(bh == 1 || bh == s.hq) {
                return Err(AttnError::shape(
                    "bias",
                    format!("[1|{}, 1|{}, Lq, Lk]", s.batch, s.hq),
                    [bb, bh],
                ));
            }
            len("bias", bias.len(), &[bb, bh, s.lq, s.lk])?;
        }
        for (what, lens, max) in [
            ("q_lens", &opts.q_lens, s.lq),
            ("kv_lens", &opts.kv_lens, s.lk),
        ] {
            if let Some(l) = lens {
                len(what, l.len(), &[s.batch])?;
                if let Some(&bad) = l.iter().find(|&&x| x as usize > max) {
                    return Err(AttnError::invalid(what, format!("lengths <= {max}"), bad));
                }
            }
        }
        if let Some(a) = &opts.alibi_slopes {
            len("alibi_slopes", a.len(), &[s.hq])?;
        }
        Ok(())
    }
}

/// Output of the reference: O `[B, Lq, Hq, Dv]` and LSE `[B, Hq, Lq]` (natural log).
pub struct RefOutput {
    pub out: Vec<f64>,
    pub lse: Vec<f64>,
}

/// Whether query `i` sees key `j`, given the sequence's own lengths (FlashAttention alignment).
pub fn visible(opts: &FlashOptions, i: usize, j: usize, qlen: usize, kvlen: usize) -> bool {
    if i >= qlen || j >= kvlen {
        return false;
    }
    let diag = i as i64 + kvlen as i64 - qlen as i64;
    let j = j as i64;
    if opts.causal && j > diag {
        return false;
    }
    let (left, right) = opts.window;
    let in_window =
        left.is_none_or(|l| j >= diag - l as i64) && right.is_none_or(|r| j <= diag + r as i64);
    in_window || j < opts.sinks as i64
}

/// Attention in f64, straight from the definition. `round_p` rounds the probabilities before
/// `P V` (identity for the reference; f16 rounding for the "plain f16" error yardstick).
pub fn attention_reference_with(
    inp: &RefInputs,
    opts: &FlashOptions,
    round_p: impl Fn(f64) -> f64,
) -> Result<RefOutput> {
    inp.check(opts)?;
    let s = inp.shape;
    let lens = |b: usize| {
        (
            opts.q_lens.as_ref().map_or(s.lq, |l| l[b] as usize),
            opts.kv_lens.as_ref().map_or(s.lk, |l| l[b] as usize),
        )
    };
    let mask = |b: usize, i: usize, j: usize| {
        let (qlen, kvlen) = lens(b);
        visible(opts, i, j, qlen, kvlen)
    };
    attention_reference_masked(inp, opts, &mask, round_p)
}

/// The reference with an arbitrary mask `mask(batch, query, key)` in place of
/// [`visible`] (neighborhood attention uses it); every other option applies as usual.
pub fn attention_reference_masked(
    inp: &RefInputs,
    opts: &FlashOptions,
    mask: &dyn Fn(usize, usize, usize) -> bool,
    round_p: impl Fn(f64) -> f64,
) -> Result<RefOutput> {
    let hooks = RefHooks {
        mask: &|b, _, i, j| mask(b, i, j),
        score: &|_, _, _, _, x| x,
        sigmoid_bias: None,
    };
    attention_reference_hooked(inp, opts, &hooks, round_p)
}

/// What another family changes in the reference: the mask `mask(batch, head, query, key)` in
/// place of [`visible`], and `score(batch, head, query, key, s)` run on each visible score
/// after the built-in modifications (the sparse family's `score_mod`); with `sigmoid_bias`
/// the weights are `sigmoid(s + bias)`, not a softmax (the sparse family's sigmoid normalizer:
/// no row sum, LSE left at -inf).
pub struct RefHooks<'a> {
    pub mask: &'a dyn Fn(usize, usize, usize, usize) -> bool,
    pub score: &'a dyn Fn(usize, usize, usize, usize, f64) -> f64,
    pub sigmoid_bias: Option<f64>,
}

/// The score of query `i` and key `j` of batch `b`, query head `h`: `scale * q . k`, then
/// softcap, ALiBi and bias as `opts` asks (no mask), in f64. Checks the inputs
/// ([`RefInputs::check`]) and the indices first: a typed error, never an out-of-bounds index.
pub fn raw_score(
    inp: &RefInputs,
    opts: &FlashOptions,
    (b, h): (usize, usize),
    (i, j): (usize, usize),
) -> Result<f64> {
    inp.check(opts)?;
    let s = inp.shape;
    for (what, x, n) in [
        ("batch", b, s.batch),
        ("head", h, s.hq),
        ("query", i, s.lq),
        ("key", j, s.lk),
    ] {
        if x >= n {
            return Err(AttnError::invalid(
                format!("{what} index"),
                format!("below {n}"),
                x,
            ));
        }
    }
    Ok(score_of(inp, opts, b, h, i, j))
}

/// [`raw_score`] of checked inputs and indices (the reference loops check once).
pub(crate) fn score_of(
    inp: &RefInputs,
    opts: &FlashOptions,
    b: usize,
    h: usize,
    i: usize,
    j: usize,
) -> f64 {
    let s = inp.shape;
    let scale = scale_of(inp, opts);
    let qlen = opts.q_lens.as_ref().map_or(s.lq, |l| l[b] as usize);
    let kvlen = opts.kv_lens.as_ref().map_or(s.lk, |l| l[b] as usize);
    let mut x = qk_of(inp, b, h, i, j) * scale;
    if let Some(c) = opts.softcap {
        let c = c as f64;
        x = c * (x / c).tanh();
    }
    if let Some(sl) = &opts.alibi_slopes {
        let dist = (i as i64 + kvlen as i64 - qlen as i64 - j as i64).abs() as f64;
        x -= sl[h] as f64 * dist;
    }
    if let Some((bias, [bb, bh])) = inp.bias {
        let bi = if bb == 1 { 0 } else { b };
        let hi = if bh == 1 { 0 } else { h };
        x += bias[((bi * bh + hi) * s.lq + i) * s.lk + j] as f64;
    }
    x
}

/// The softmax scale: the caller's, else `1 / sqrt(D)`.
pub(crate) fn scale_of(inp: &RefInputs, opts: &FlashOptions) -> f64 {
    opts.scale
        .map(f64::from)
        .unwrap_or(1.0 / (inp.shape.d as f64).sqrt())
}

/// `q_i . k_j` of batch `b`, query head `h` (its KV head's key), in f64; checked inputs.
pub(crate) fn qk_of(inp: &RefInputs, b: usize, h: usize, i: usize, j: usize) -> f64 {
    let s = inp.shape;
    let hk = h / (s.hq / s.hkv);
    let qrow = &inp.q[((b * s.lq + i) * s.hq + h) * s.d..][..s.d];
    let krow = &inp.k[((b * s.lk + j) * s.hkv + hk) * s.d..][..s.d];
    qrow.iter()
        .zip(krow)
        .map(|(&a, &c)| a as f64 * c as f64)
        .sum()
}

/// The reference with another family's [`RefHooks`].
pub fn attention_reference_hooked(
    inp: &RefInputs,
    opts: &FlashOptions,
    hooks: &RefHooks,
    round_p: impl Fn(f64) -> f64,
) -> Result<RefOutput> {
    inp.check(opts)?;
    let s = inp.shape;
    let group = s.hq / s.hkv;
    let mut out = vec![0.0; s.batch * s.lq * s.hq * s.dv];
    let mut lse = vec![f64::NEG_INFINITY; s.batch * s.hq * s.lq];
    let mut scores = vec![0.0f64; s.lk];
    for b in 0..s.batch {
        for h in 0..s.hq {
            let hk = h / group;
            for i in 0..s.lq {
                let mut max = f64::NEG_INFINITY;
                for (j, sc) in scores.iter_mut().enumerate() {
                    *sc = f64::NEG_INFINITY;
                    if !(hooks.mask)(b, h, i, j) {
                        continue;
                    }
                    let x = (hooks.score)(b, h, i, j, score_of(inp, opts, b, h, i, j));
                    *sc = x;
                    max = max.max(x);
                }
                if max == f64::NEG_INFINITY {
                    continue; // no visible key: O = 0, LSE = -inf
                }
                let orow = &mut out[((b * s.lq + i) * s.hq + h) * s.dv..][..s.dv];
                if let Some(bias) = hooks.sigmoid_bias {
                    for (j, &x) in scores.iter().enumerate() {
                        if x == f64::NEG_INFINITY {
                            continue;
                        }
                        let p = round_p(1.0 / (1.0 + (-(x + bias)).exp()));
                        let vrow = &inp.v[((b * s.lk + j) * s.hkv + hk) * s.dv..][..s.dv];
                        for (o, &vv) in orow.iter_mut().zip(vrow) {
                            *o += p * vv as f64;
                        }
                    }
                    continue;
                }
                let sum: f64 = scores.iter().map(|&x| (x - max).exp()).sum();
                lse[(b * s.hq + h) * s.lq + i] = max + sum.ln();
                for (j, &x) in scores.iter().enumerate() {
                    if x == f64::NEG_INFINITY {
                        continue;
                    }
                    let p = round_p((x - max).exp() / sum);
                    let vrow = &inp.v[((b * s.lk + j) * s.hkv + hk) * s.dv..][..s.dv];
                    for (o, &vv) in orow.iter_mut().zip(vrow) {
                        *o += p * vv as f64;
                    }
                }
            }
        }
    }
    Ok(RefOutput { out, lse })
}

/// The f64 reference.
pub fn attention_reference(inp: &RefInputs, opts: &FlashOptions) -> Result<RefOutput> {
    attention_reference_with(inp, opts, |p| p)
}

/// A plain f16 implementation of the same maths: scores in f32 (as the kernel keeps them),
/// probabilities and output rounded to f16. Its error against the f64 reference is the yardstick
/// for the f16 kernel (FlashAttention's test rule: at most twice this, plus a small atol).
pub fn attention_plain_f16(inp: &RefInputs, opts: &FlashOptions) -> Result<Vec<f64>> {
    let o = attention_reference_with(inp, opts, round_f16)?;
    Ok(o.out.into_iter().map(round_f16).collect())
}

/// [`attention_plain_f16`] with the mask of [`attention_reference_masked`].
pub fn attention_plain_f16_masked(
    inp: &RefInputs,
    opts: &FlashOptions,
    mask: &dyn Fn(usize, usize, usize) -> bool,
) -> Result<Vec<f64>> {
    let o = attention_reference_masked(inp, opts, mask, round_f16)?;
    Ok(o.out.into_iter().map(round_f16).collect())
}

pub fn round_f16(x: f64) -> f64 {
    half::f16::from_f64(x).to_f64()
}

/// How a GPU result compares with the f64 reference, and whether it passes the crate's rule:
/// f32 within `2e-5 * max|ref|` (far under 1e-4 relative); f16 within twice the error of
/// [`attention_plain_f16`] plus `1e-4 * max|ref|` (FlashAttention's rule). LSE entries must
/// match -inf exactly where the reference has it and be within 2e-5 (f32) / 1e-4 (f16)
/// relative elsewhere. Any non-finite output fails (an unwritten, NaN-poisoned element).
#[derive(Clone, Debug, serde::Serialize)]
pub struct Comparison {
    pub max_abs: f64,
    /// `max_abs / max|ref|`.
    pub max_rel: f64,
    pub max_ref: f64,
    /// Error of the plain f16 implementation (f16 only, else 0).
    pub plain_f16_abs: f64,
    pub tolerance_abs: f64,
    pub lse_max_rel: f64,
    pub lse_tolerance: f64,
    /// First problem found (non-finite element, wrong -inf), if any.
    pub problem: Option<String>,
    pub passed: bool,
}

/// Compares `got` (O) and optionally `got_lse` with the reference. `plain_f16` is the output of
/// [`attention_plain_f16`] for f16 inputs, `None` for f32.
pub fn compare(
    got: &[f32],
    got_lse: Option<&[f32]>,
    r: &RefOutput,
    plain_f16: Option<&[f64]>,
) -> Comparison {
    let mut problem = None;
    let mut max_abs = 0.0f64;
    let mut max_ref = 0.0f64;
    if got.len() != r.out.len() {
        problem = Some(format!("{} outputs, expected {}", got.len(), r.out.len()));
    }
    for (i, (&g, &e)) in got.iter().zip(&r.out).enumerate() {
        if !g.is_finite() && problem.is_none() {
            problem = Some(format!("out[{i}] = {g}, expected {e}"));
        }
        max_abs = max_abs.max((g as f64 - e).abs());
        max_ref = max_ref.max(e.abs());
    }
    let mut lse_max_rel = 0.0f64;
    for (i, (&g, &e)) in got_lse.unwrap_or(&[]).iter().zip(&r.lse).enumerate() {
        let bad = if e == f64::NEG_INFINITY {
            g != f32::NEG_INFINITY
        } else {
            lse_max_rel = lse_max_rel.max((g as f64 - e).abs() / e.abs().max(1.0));
            !g.is_finite()
        };
        if bad && problem.is_none() {
            problem = Some(format!("lse[{i}] = {g}, expected {e}"));
        }
    }
    let scale = max_ref.max(1e-3);
    let plain_f16_abs = plain_f16.map_or(0.0, |p| {
        p.iter()
            .zip(&r.out)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max)
    });
    let (tolerance_abs, lse_tolerance) = match plain_f16 {
        None => (2e-5 * scale, 2e-5),
        Some(_) => (2.0 * plain_f16_abs + 1e-4 * scale, 1e-4),
    };
    let passed = problem.is_none() && max_abs <= tolerance_abs && lse_max_rel <= lse_tolerance;
    Comparison {
        max_abs,
        max_rel: max_abs / scale,
        max_ref,
        plain_f16_abs,
        tolerance_abs,
        lse_max_rel,
        lse_tolerance,
        problem,
        passed,
    }
}
