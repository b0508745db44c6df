//! The f64 reference of the backward pass (engine): the gradients of every softmax family's
//! forward ([`super::reference`]) straight from the definition, with the same hooks. Tests
//! compare the GPU backward against it and check it by finite differences.
//!
//! With `s` the modified score of (query `i`, key `j`), `P = softmax(s)` over the visible keys
//! and `O = P V`, for a loss with gradient `dO`:
//! `dV_j = sum_i P_ij dO_i`, `dP_ij = dO_i . V_j`, `Delta_i = sum_j P_ij dP_ij` (= `dO_i . O_i`),
//! `dS_ij = P_ij (dP_ij - Delta_i)`, then back through the score: `dQ_i = sum_j g_ij K_j`,
//! `dK_j = sum_i g_ij Q_i` with `g_ij = dS_ij * ds/d(q.k)` (`scale`, times `1 - tanh^2` under a
//! softcap), and `dBias_ij = dS_ij` summed over the bias's broadcast axes. Query heads that
//! share a KV head add into its dK and dV. Rows that see no key give zero gradients.

use super::reference::{qk_of, scale_of, score_of, RefHooks, RefInputs};
use super::FlashOptions;
use crate::error::{AttnError, Result};

/// Gradients in f64, in the layouts of the inputs: dQ `[B, Lq, Hq, D]`, dK `[B, Lk, Hkv, D]`,
/// dV `[B, Lk, Hkv, Dv]`, dBias `[bb, bh, Lq, Lk]` (the bias's own broadcast shape) when the
/// inputs have a bias.
#[derive(Clone, Debug)]
pub struct RefGrads {
    pub dq: Vec<f64>,
    pub dk: Vec<f64>,
    pub dv: Vec<f64>,
    pub dbias: Option<Vec<f64>>,
}

/// `d s / d (q . k)` of the score of (b, h, i, j): the scale, through the softcap's tanh.
fn score_slope(
    inp: &RefInputs,
    opts: &FlashOptions,
    b: usize,
    h: usize,
    i: usize,
    j: usize,
) -> f64 {
    let scale = scale_of(inp, opts);
    let Some(c) = opts.softcap else {
        return scale;
    };
    let c = c as f64;
    let t = (qk_of(inp, b, h, i, j) * scale / c).tanh();
    scale * (1.0 - t * t)
}

/// The gradients of the dense forward (every option of [`FlashOptions`]) for the upstream
/// gradient `dout` (`[B, Lq, Hq, Dv]`).
pub fn attention_backward_reference(
    inp: &RefInputs,
    opts: &FlashOptions,
    dout: &[f32],
) -> Result<RefGrads> {
    dense_backward(inp, opts, dout, |x| x)
}

/// The dense mask ([`super::reference::visible`] at each sequence's lengths) through the
/// hooked backward.
fn dense_backward(
    inp: &RefInputs,
    opts: &FlashOptions,
    dout: &[f32],
    round: impl Fn(f64) -> f64,
) -> Result<RefGrads> {
    let s = inp.shape;
    let lens = |b: usize| {
        (
            opts.q_lens.as_ref().map_or(s.lq, |l| l[b] as usize),
            opts.kv_lens.as_ref().map_or(s.lk, |l| l[b] as usize),
        )
    };
    let mask = |b: usize, _h: usize, i: usize, j: usize| {
        let (qlen, kvlen) = lens(b);
        super::reference::visible(opts, i, j, qlen, kvlen)
    };
    let hooks = RefHooks {
        mask: &mask,
        score: &|_, _, _, _, x| x,
        sigmoid_bias: None,
    };
    attention_backward_reference_hooked(inp, opts, dout, &hooks, round)
}

/// A plain f16 implementation of the same maths: scores and sums as the f16 kernels keep
/// them (f32, here f64), the weights P, dS and the gradients rounded to f16. Its error against
/// the f64 reference is the yardstick for the f16 backward (FlashAttention's test rule: at
/// most twice this, plus a small atol).
pub fn attention_backward_plain_f16(
    inp: &RefInputs,
    opts: &FlashOptions,
    dout: &[f32],
) -> Result<RefGrads> {
    let r = super::reference::round_f16;
    let mut g = dense_backward(inp, opts, dout, r)?;
    for x in g.dq.iter_mut().chain(&mut g.dk).chain(&mut g.dv) {
        *x = r(*x);
    }
    Ok(g)
}

/// [`attention_backward_reference`] with another family's mask (its `score` hook must be the
/// identity: a score_mod's derivative is not known here; the sigmoid normalizer is supported).
/// `round` rounds the weights P and dS as they are made (identity for the reference; f16
/// rounding for the plain f16 yardstick).
pub fn attention_backward_reference_hooked(
    inp: &RefInputs,
    opts: &FlashOptions,
    dout: &[f32],
    hooks: &RefHooks,
    round: impl Fn(f64) -> f64,
) -> Result<RefGrads> {
    inp.check(opts)?;
    let s = inp.shape;
    if dout.len() != s.batch * s.lq * s.hq * s.dv {
        return Err(AttnError::shape(
            "dout",
            format!(
                "{} values for [B, Lq, Hq, Dv]",
                s.batch * s.lq * s.hq * s.dv
            ),
            format!("{} values", dout.len()),
        ));
    }
    let group = s.hq / s.hkv;
    let mut g = RefGrads {
        dq: vec![0.0; s.batch * s.lq * s.hq * s.d],
        dk: vec![0.0; s.batch * s.lk * s.hkv * s.d],
        dv: vec![0.0; s.batch * s.lk * s.hkv * s.dv],
        dbias: inp
            .bias
            .map(|(_, [bb, bh])| vec![0.0; bb * bh * s.lq * s.lk]),
    };
    let mut sc = vec![f64::NEG_INFINITY; s.lk];
    let mut p = vec![0.0f64; s.lk];
    for b in 0..s.batch {
        for h in 0..s.hq {
            let hk = h / group;
            for i in 0..s.lq {
                let mut max = f64::NEG_INFINITY;
                for (j, x) in sc.iter_mut().enumerate() {
                    *x = f64::NEG_INFINITY;
                    if (hooks.mask)(b, h, i, j) {
                        *x = (hooks.score)(b, h, i, j, score_of(inp, opts, b, h, i, j));
                        max = max.max(*x);
                    }
                }
                if max == f64::NEG_INFINITY {
                    continue; // no visible key: O = 0 whatever q, k, v: zero gradients
                }
                // the weights P (softmax, or the sigmoid normalizer's) and dS / dP
                let mut ds_dp = vec![0.0f64; s.lk];
                match hooks.sigmoid_bias {
                    Some(bias) => {
                        for j in 0..s.lk {
                            let (pj, dj) = if sc[j] == f64::NEG_INFINITY {
                                (0.0, 0.0)
                            } else {
                                let y = 1.0 / (1.0 + (-(sc[j] + bias)).exp());
                                (y, y * (1.0 - y))
                            };
                            p[j] = round(pj);
                            ds_dp[j] = dj;
                        }
                    }
                    None => {
                        let sum: f64 = sc.iter().map(|&x| (x - max).exp()).sum();
                        for j in 0..s.lk {
                            p[j] = round((sc[j] - max).exp() / sum);
                        }
                    }
                }
                let dorow = &dout[((b * s.lq + i) * s.hq + h) * s.dv..][..s.dv];
                let dp: Vec<f64> = (0..s.lk)
                    .map(|j| {
                        if p[j] == 0.0 && ds_dp[j] == 0.0 {
                            return 0.0;
                        }
                        let vrow = &inp.v[((b * s.lk + j) * s.hkv + hk) * s.dv..][..s.dv];
                        dorow
                            .iter()
                            .zip(vrow)
                            .map(|(&a, &c)| a as f64 * c as f64)
                            .sum()
                    })
                    .collect();
                let delta: f64 = (0..s.lk).map(|j| p[j] * dp[j]).sum();
                for j in 0..s.lk {
                    if sc[j] == f64::NEG_INFINITY {
                        continue;
                    }
                    let ds = round(match hooks.sigmoid_bias {
                        Some(_) => ds_dp[j] * dp[j],
                        None => p[j] * (dp[j] - delta),
                    });
                    let dvrow = &mut g.dv[((b * s.lk + j) * s.hkv + hk) * s.dv..][..s.dv];
                    for (x, &d) in dvrow.iter_mut().zip(dorow) {
                        *x += p[j] * d as f64;
                    }
                    if let (Some(db), Some((_, [bb, bh]))) = (g.dbias.as_mut(), inp.bias) {
                        let bi = if bb == 1 { 0 } else { b };
                        let hi = if bh == 1 { 0 } else { h };
                        db[((bi * bh + hi) * s.lq + i) * s.lk + j] += ds;
                    }
                    let gs = ds * score_slope(inp, opts, b, h, i, j);
                    let qrow = &inp.q[((b * s.lq + i) * s.hq + h) * s.d..][..s.d];
                    let krow = &inp.k[((b * s.lk + j) * s.hkv + hk) * s.d..][..s.d];
                    let dqrow = &mut g.dq[((b * s.lq + i) * s.hq + h) * s.d..][..s.d];
                    for (x, &kk) in dqrow.iter_mut().zip(krow) {
                        *x += gs * kk as f64;
                    }
                    let dkrow = &mut g.dk[((b * s.lk + j) * s.hkv + hk) * s.d..][..s.d];
                    for (x, &qq) in dkrow.iter_mut().zip(qrow) {
                        *x += gs * qq as f64;
                    }
                }
            }
        }
    }
    Ok(g)
}

#[cfg(test)]
mod tests {
    use super::super::reference::attention_reference;
    use super::*;
    use crate::softmax::AttnShape;

    /// A small deterministic generator (the tests need no crate of random numbers).
    fn values(n: usize, seed: u64, amp: f32) -> Vec<f32> {
        let mut x = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((x >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * amp
            })
            .collect()
    }

    /// `sum(O * dO)` in f64: the loss whose gradient the backward returns.
    fn loss(inp: &RefInputs, opts: &FlashOptions, dout: &[f32]) -> f64 {
        let o = attention_reference(inp, opts).unwrap();
        o.out.iter().zip(dout).map(|(a, &b)| a * b as f64).sum()
    }

    /// Central differences of the loss against every analytic gradient, on tiny shapes with
    /// every option that has a gradient path (scale, causal, window, sinks, GQA, softcap,
    /// ALiBi, bias, per-batch lengths).
    #[test]
    fn gradients_match_finite_differences() {
        let s = AttnShape {
            batch: 2,
            lq: 5,
            lk: 7,
            hq: 4,
            hkv: 2,
            d: 3,
            dv: 2,
        };
        let q = values(s.batch * s.lq * s.hq * s.d, 1, 1.5);
        let k = values(s.batch * s.lk * s.hkv * s.d, 2, 1.5);
        let v = values(s.batch * s.lk * s.hkv * s.dv, 3, 1.0);
        let bias = values(s.batch * s.lq * s.lk, 4, 1.0);
        let dout = values(s.batch * s.lq * s.hq * s.dv, 5, 1.0);
        let slopes = vec![0.1, 0.2, 0.3, 0.4];
        let variants: Vec<(FlashOptions, bool)> = vec![
            (FlashOptions::default(), false),
            (FlashOptions::default().causal(true).scale(Some(0.7)), false),
            (
                FlashOptions::default()
                    .softcap(Some(1.5))
                    .alibi_slopes(Some(slopes)),
                true,
            ),
            (
                FlashOptions::default()
                    .window((Some(1), Some(1)))
                    .sinks(1)
                    .q_lens(Some(vec![5, 3]))
                    .kv_lens(Some(vec![7, 4])),
                false,
            ),
            (
                FlashOptions::default().causal(true).window((Some(2), None)),
                true,
            ),
        ];
        for (opts, with_bias) in variants {
            let (q0, k0, v0, b0) = (q.clone(), k.clone(), v.clone(), bias.clone());
            let mk = |q: &'_ [f32], k: &'_ [f32], v: &'_ [f32], b: &'_ [f32]| -> f64 {
                let r = RefInputs {
                    shape: s,
                    q,
                    k,
                    v,
                    bias: with_bias.then_some((b, [s.batch, 1])),
                };
                loss(&r, &opts, &dout)
            };
            let r = RefInputs {
                shape: s,
                q: &q0,
                k: &k0,
                v: &v0,
                bias: with_bias.then_some((&b0[..], [s.batch, 1])),
            };
            let g = attention_backward_reference(&r, &opts, &dout).unwrap();
            let h = 1.0 / 256.0;
            let check = |name: &str, analytic: &[f64], which: usize| {
                for (idx, &a) in analytic.iter().enumerate() {
                    let (mut qp, mut kp, mut vp, mut bp) =
                        (q0.clone(), k0.clone(), v0.clone(), b0.clone());
                    let (mut qm, mut km, mut vm, mut bm) =
                        (q0.clone(), k0.clone(), v0.clone(), b0.clone());
                    let (xp, xm) = match which {
                        0 => (&mut qp, &mut qm),
                        1 => (&mut kp, &mut km),
                        2 => (&mut vp, &mut vm),
                        _ => (&mut bp, &mut bm),
                    };
                    xp[idx] += h;
                    xm[idx] -= h;
                    let fd = (mk(&qp, &kp, &vp, &bp) - mk(&qm, &km, &vm, &bm)) / (2.0 * h as f64);
                    assert!(
                        (fd - a).abs() <= 2e-3 * (1.0 + a.abs()),
                        "{name}[{idx}]: analytic {a}, finite differences {fd}, {opts:?}"
                    );
                }
            };
            check("dq", &g.dq, 0);
            check("dk", &g.dk, 1);
            check("dv", &g.dv, 2);
            if let Some(db) = &g.dbias {
                check("dbias", db, 3);
            }
        }
    }

    #[test]
    fn wrong_dout_is_a_typed_error() {
        let s = AttnShape {
            batch: 1,
            lq: 2,
            lk: 2,
            hq: 1,
            hkv: 1,
            d: 4,
            dv: 4,
        };
        let x = vec![0.5; 8];
        let r = RefInputs {
            shape: s,
            q: &x,
            k: &x,
            v: &x,
            bias: None,
        };
        let e = attention_backward_reference(&r, &FlashOptions::default(), &[0.0; 7]);
        assert!(matches!(e, Err(AttnError::Shape { .. })), "{e:?}");
    }
}
