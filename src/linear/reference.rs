//! The linear family's CPU reference in f64: the recurrences of the module docs, token by token,
//! written for reading, not speed. [`linear_plain_f16`] is the same maths with every value
//! rounded to f16 (state included): the f16 tolerance is twice its error.

use super::{FeatureMap, LinearOptions, LinearShape, Rule};
use crate::error::{AttnError, Result};
use crate::softmax::reference::{compare, Comparison, RefOutput};

/// Host copies of a call's inputs (row-major, the shapes of [`super::linear_attention`]).
#[derive(Clone, Copy, Debug)]
pub struct LinearRefInputs<'a> {
    pub shape: LinearShape,
    /// `[B, T, H, K]`
    pub q: &'a [f32],
    /// `[B, T, H, K]`
    pub k: &'a [f32],
    /// `[B, T, HV, V]`
    pub v: &'a [f32],
    /// The gate as the rule reads it (see [`LinearOptions::g`]); retention: `[HV]` or `None`.
    pub g: Option<&'a [f32]>,
    /// `[B, T, HV]`
    pub beta: Option<&'a [f32]>,
    /// `[N, HV, F, Vs]` (see [`LinearShape::state_shape`]).
    pub initial_state: Option<&'a [f32]>,
}

/// O `[B, T, HV, V]` and the final state `[N, HV, F, Vs]`.
#[derive(Clone, Debug)]
pub struct LinearRefOutput {
    pub out: Vec<f64>,
    pub final_state: Vec<f64>,
}

/// Rounding of every intermediate value: none (f64) or to f16.
#[derive(Clone, Copy)]
enum Arith {
    F64,
    F16,
}

impl Arith {
    fn r(self, x: f64) -> f64 {
        match self {
            Arith::F64 => x,
            Arith::F16 => half::f16::from_f64(x).to_f64(),
        }
    }
}

/// The feature vector of one raw q or k row (`x`, K values): the map, the L2 norm where asked,
/// and for q the scale (Taylor: `sqrt(scale)` on both, inside the map).
fn features(x: &[f64], opts: &LinearOptions, scale: f64, is_q: bool, a: Arith) -> Vec<f64> {
    let mut x: Vec<f64> = x.to_vec();
    if opts.qk_l2norm {
        let n = a.r(x.iter().map(|v| v * v).sum::<f64>() + 1e-6).sqrt();
        x.iter_mut().for_each(|v| *v = a.r(*v / n));
    }
    let mut f = match opts.feature_map {
        FeatureMap::Identity => x,
        FeatureMap::Elu1 => x
            .iter()
            .map(|&v| a.r(if v > 0.0 { v + 1.0 } else { v.exp() }))
            .collect(),
        FeatureMap::Relu => x.iter().map(|&v| v.max(0.0)).collect(),
        FeatureMap::Taylor => {
            let c = scale.sqrt();
            let y: Vec<f64> = x.iter().map(|&v| a.r(v * c)).collect();
            let mut f = vec![1.0];
            f.extend(&y);
            for &ya in &y {
                for &yb in &y {
                    f.push(a.r(ya * yb * std::f64::consts::FRAC_1_SQRT_2));
                }
            }
            return f;
        }
    };
    if is_q {
        f.iter_mut().for_each(|v| *v = a.r(*v * scale));
    }
    f
}

/// The f64 reference.
pub fn linear_reference(inp: &LinearRefInputs, opts: &LinearOptions) -> Result<LinearRefOutput> {
    run(inp, opts, Arith::F64)
}

/// The same maths with every intermediate value (the state too) rounded to f16: O only.
pub fn linear_plain_f16(inp: &LinearRefInputs, opts: &LinearOptions) -> Result<Vec<f64>> {
    Ok(run(inp, opts, Arith::F16)?.out)
}

/// The host slices against the shape and the rule: what the kernel's checks are for tensors,
/// here for a caller's slices (a missing gate or a short slice is a typed error, not a panic).
fn check_host(inp: &LinearRefInputs, opts: &LinearOptions) -> Result<()> {
    let s = inp.shape;
    if s.h == 0 || s.hv == 0 || !s.hv.is_multiple_of(s.h) {
        return Err(AttnError::shape(
            "reference heads",
            format!("HV a multiple of H = {} (both >= 1)", s.h),
            s.hv,
        ));
    }
    let per_head = s.batch * s.t * s.hv;
    let gate = match opts.rule {
        Rule::Linear | Rule::Delta => None,
        Rule::Retention => inp.g.map(|_| s.hv),
        Rule::SimpleGla | Rule::GatedDelta => Some(per_head),
        Rule::Gla => Some(per_head * s.k),
    };
    let beta = matches!(opts.rule, Rule::Delta | Rule::GatedDelta).then_some(per_head);
    let state = inp
        .initial_state
        .map(|_| s.state_shape(opts).iter().product::<usize>());
    let want = [
        ("q", Some(s.batch * s.t * s.h * s.k), Some(inp.q)),
        ("k", Some(s.batch * s.t * s.h * s.k), Some(inp.k)),
        ("v", Some(s.batch * s.t * s.hv * s.v), Some(inp.v)),
        ("g", gate, inp.g),
        ("beta", beta, inp.beta),
        ("initial_state", state, inp.initial_state),
    ];
    for (what, n, x) in want {
        let got = x.map(<[f32]>::len);
        if let (Some(n), got) = (n, got) {
            if got != Some(n) {
                return Err(AttnError::shape(
                    format!("reference input {what}"),
                    format!("{n} values for rule {}", opts.rule.name()),
                    got.map_or("none".to_string(), |g| format!("{g} values")),
                ));
            }
        }
    }
    Ok(())
}

fn run(inp: &LinearRefInputs, opts: &LinearOptions, a: Arith) -> Result<LinearRefOutput> {
    check_host(inp, opts)?;
    let s = inp.shape;
    let seqs = super::sequences(&s, opts)?;
    let (f, vs) = (s.feature_dim(opts), s.state_cols(opts));
    let mut out = vec![0.0; s.batch * s.t * s.hv * s.v];
    let mut fin = vec![0.0; seqs.len() * s.hv * f * vs];
    for (n, &(b, t0, len)) in seqs.iter().enumerate() {
        for hv in 0..s.hv {
            let head = RefHead {
                inp,
                opts,
                a,
                b,
                hv,
                scale: opts.scale.map_or(1.0 / (s.k as f64).sqrt(), f64::from),
            };
            let base = (n * s.hv + hv) * f * vs;
            // st[i][j]: row i of F, column j of Vs (the last is z when normalizing)
            let mut st: Vec<Vec<f64>> = (0..f)
                .map(|i| {
                    (0..vs)
                        .map(|j| {
                            inp.initial_state
                                .map_or(0.0, |x| x[base + i * vs + j] as f64)
                        })
                        .collect()
                })
                .collect();
            if opts.causal {
                for t in t0..t0 + len {
                    head.update(&mut st, t);
                    head.output(&st, t, &mut out);
                }
            } else {
                for t in t0..t0 + len {
                    head.update(&mut st, t);
                }
                for t in t0..t0 + len {
                    head.output(&st, t, &mut out);
                }
            }
            for (i, row) in st.iter().enumerate() {
                for (j, &x) in row.iter().enumerate() {
                    fin[base + i * vs + j] = x;
                }
            }
        }
    }
    Ok(LinearRefOutput {
        out,
        final_state: fin,
    })
}

/// One (sequence, value head) of the reference: its state update and output per token.
struct RefHead<'a> {
    inp: &'a LinearRefInputs<'a>,
    opts: &'a LinearOptions,
    a: Arith,
    /// the sequence's batch row
    b: usize,
    hv: usize,
    scale: f64,
}

impl RefHead<'_> {
    /// Element offset of token `t`'s row of `[B, T, heads, dim]`.
    fn tok(&self, t: usize, heads: usize, dim: usize) -> usize {
        ((self.b * self.inp.shape.t + t) * heads) * dim
    }

    /// The feature map of q or k at token `t` (the query head of this value head's group).
    fn feat(&self, x: &[f32], t: usize, is_q: bool) -> Vec<f64> {
        let s = &self.inp.shape;
        let hq = self.hv / (s.hv / s.h);
        let o = self.tok(t, s.h, s.k) + hq * s.k;
        let raw: Vec<f64> = x[o..o + s.k].iter().map(|&v| v as f64).collect();
        features(&raw, self.opts, self.scale, is_q, self.a)
    }

    /// The decay of each state row at gate index `gi`.
    fn decay(&self, gi: usize) -> Vec<f64> {
        let (s, a, f) = (
            &self.inp.shape,
            self.a,
            self.inp.shape.feature_dim(self.opts),
        );
        let g = self.inp.g.unwrap_or(&[]); // present where the rule reads it (check_host)
        match self.opts.rule {
            Rule::Linear | Rule::Delta => vec![1.0; f],
            Rule::Retention => {
                // the default decays reach the kernel as f32, as a caller's would
                let g =
                    (self.inp.g).map_or(super::retention_log_decay(self.hv) as f32, |g| g[self.hv]);
                vec![(g as f64).exp(); f]
            }
            Rule::SimpleGla | Rule::GatedDelta => vec![a.r((g[gi] as f64).exp()); f],
            Rule::Gla => (0..f)
                .map(|i| a.r((g[gi * s.k + i] as f64).exp()))
                .collect(),
        }
    }

    /// Token `t`'s update of the state: decay, then (delta rules: the prediction's error
    /// times beta) k's features times v added.
    fn update(&self, st: &mut [Vec<f64>], t: usize) {
        let (s, a, hv) = (&self.inp.shape, self.a, self.hv);
        let (f, vs) = (s.feature_dim(self.opts), s.state_cols(self.opts));
        let kf = self.feat(self.inp.k, t, false);
        let vrow = self.tok(t, s.hv, s.v) + hv * s.v;
        let mut vt: Vec<f64> = (self.inp.v[vrow..vrow + s.v].iter())
            .map(|&x| x as f64)
            .collect();
        if vs > s.v {
            vt.push(1.0); // z accumulates k: the column whose v is 1
        }
        let gi = (self.b * s.t + t) * s.hv + hv;
        for (row, d) in st.iter_mut().zip(&self.decay(gi)) {
            row.iter_mut().for_each(|x| *x = a.r(*x * d));
        }
        let delta = matches!(self.opts.rule, Rule::Delta | Rule::GatedDelta);
        let beta = if delta {
            self.inp.beta.unwrap_or(&[])[gi] as f64
        } else {
            1.0
        };
        for j in 0..vs {
            // delta: subtract what the (decayed) state already predicts for k
            let pred = if delta {
                a.r((0..f).map(|i| kf[i] * st[i][j]).sum())
            } else {
                0.0
            };
            let u = a.r(beta * a.r(vt[j] - pred));
            for i in 0..f {
                st[i][j] = a.r(st[i][j] + a.r(kf[i] * u));
            }
        }
    }

    /// Token `t`'s output from the state: q's features times the state (normalized by the z
    /// column when normalizing).
    fn output(&self, st: &[Vec<f64>], t: usize, out: &mut [f64]) {
        let (s, a) = (&self.inp.shape, self.a);
        let (f, vs) = (s.feature_dim(self.opts), s.state_cols(self.opts));
        let qf = self.feat(self.inp.q, t, true);
        let dot = |j: usize| a.r((0..f).map(|i| qf[i] * st[i][j]).sum());
        let den = if vs > s.v {
            a.r(dot(s.v) + s.eps(self.opts))
        } else {
            1.0
        };
        let o = self.tok(t, s.hv, s.v) + self.hv * s.v;
        for j in 0..s.v {
            out[o + j] = a.r(dot(j) / den);
        }
    }
}

/// Compares a GPU run with the reference on the same inputs: O (f16 inputs: at most twice the
/// error of [`linear_plain_f16`], see [`crate::softmax::reference::compare`]) and the final state
/// (f32 whatever the inputs: f32's tolerance). The tolerances the tests and `--check` share.
pub fn compare_linear(
    inp: &LinearRefInputs,
    opts: &LinearOptions,
    f16: bool,
    got: &[f32],
    got_state: &[f32],
) -> Result<(Comparison, Comparison)> {
    let r = linear_reference(inp, opts)?;
    let plain = f16.then(|| linear_plain_f16(inp, opts)).transpose()?;
    let as_ref = |out: Vec<f64>| RefOutput { out, lse: vec![] };
    Ok((
        compare(got, None, &as_ref(r.out), plain.as_deref()),
        compare(got_state, None, &as_ref(r.final_state), None),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A caller's slices that do not fit the shape or the rule: typed errors, never a panic.
    #[test]
    fn bad_host_inputs_are_typed_errors() {
        let shape = LinearShape {
            batch: 1,
            t: 3,
            h: 1,
            hv: 1,
            k: 2,
            v: 2,
        };
        let x = [0.5f32; 6];
        let inp = LinearRefInputs {
            shape,
            q: &x,
            k: &x,
            v: &x,
            g: None,
            beta: None,
            initial_state: None,
        };
        let ok = linear_reference(&inp, &LinearOptions::default()).unwrap();
        assert_eq!(ok.out.len(), 6);
        for (rule, what) in [(Rule::Gla, "g"), (Rule::Delta, "beta")] {
            let opts = LinearOptions {
                rule,
                ..Default::default()
            };
            let err = linear_reference(&inp, &opts).unwrap_err();
            assert!(err.to_string().contains(what), "{err}");
        }
        let short = LinearRefInputs { v: &x[..5], ..inp };
        let err = linear_plain_f16(&short, &LinearOptions::default()).unwrap_err();
        assert!(err.to_string().contains("reference input v"), "{err}");
    }
}
