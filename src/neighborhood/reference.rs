//! Plain f64 reference of [`neighborhood_attention`](super::neighborhood_attention): dense
//! attention over the flattened tokens with the mask [`NaSpec::sees`], straight from the
//! definition in the module docs.

use super::NaSpec;
use crate::error::{AttnError, Result};
use crate::softmax::reference::{
    attention_plain_f16_masked, attention_reference_masked, RefInputs, RefOutput,
};
use crate::softmax::FlashOptions;

fn opts(scale: Option<f32>) -> FlashOptions {
    FlashOptions {
        scale,
        ..Default::default()
    }
}

/// O `[B, L, Hq, Dv]` (L the flattened spatial tokens) and LSE heads-last `[B, L, Hq]`.
/// `inp.shape` has `lq = lk = spec.len()`.
pub fn neighborhood_reference(
    inp: &RefInputs,
    spec: &NaSpec,
    scale: Option<f32>,
) -> Result<RefOutput> {
    check_tokens(inp, spec)?;
    let r = attention_reference_masked(inp, &opts(scale), &|_, i, j| spec.sees(i, j), |p| p)?;
    let s = inp.shape;
    // the flash reference's LSE is [B, Hq, L]: NATTEN's is heads-last
    Ok(RefOutput {
        lse: heads_last(&r.lse, s),
        out: r.out,
    })
}

/// With NATTEN's additional tokens: `extra_k` `[B, S_add, Hkv, D]` and `extra_v`
/// `[B, S_add, Hkv, Dv]`, seen by every query. The reference attends over each batch's tokens
/// followed by its extra ones, the neighborhood mask on the first and none on the rest.
pub fn neighborhood_reference_with_extra(
    inp: &RefInputs,
    spec: &NaSpec,
    scale: Option<f32>,
    extra_k: &[f32],
    extra_v: &[f32],
) -> Result<RefOutput> {
    check_tokens(inp, spec)?;
    let s = inp.shape;
    let (rk, rv) = (s.hkv * s.d, s.hkv * s.dv);
    let s_add = extra_k.len() / (s.batch * rk).max(1);
    if extra_k.len() != s.batch * s_add * rk || extra_v.len() != s.batch * s_add * rv {
        return Err(AttnError::shape(
            "extra tokens",
            format!("[{}, S_add, {}, D|Dv] values", s.batch, s.hkv),
            (extra_k.len(), extra_v.len()),
        ));
    }
    let cat = |base: &[f32], extra: &[f32], row: usize| -> Vec<f32> {
        (0..s.batch)
            .flat_map(|b| {
                let own = &base[b * s.lk * row..(b + 1) * s.lk * row];
                let add = &extra[b * s_add * row..(b + 1) * s_add * row];
                own.iter().chain(add).copied()
            })
            .collect()
    };
    let (k, v) = (cat(inp.k, extra_k, rk), cat(inp.v, extra_v, rv));
    let mut shape = s;
    shape.lk = s.lk + s_add;
    let all = RefInputs {
        shape,
        q: inp.q,
        k: &k,
        v: &v,
        bias: None,
    };
    let l = s.lk;
    let mask = |_: usize, i: usize, j: usize| j >= l || spec.sees(i, j);
    let r = attention_reference_masked(&all, &opts(scale), &mask, |p| p)?;
    Ok(RefOutput {
        lse: heads_last(&r.lse, s),
        out: r.out,
    })
}

/// The flash reference's LSE `[B, Hq, L]` in NATTEN's heads-last order `[B, L, Hq]`.
fn heads_last(lse: &[f64], s: crate::softmax::AttnShape) -> Vec<f64> {
    let mut out = vec![0.0; lse.len()];
    for b in 0..s.batch {
        for h in 0..s.hq {
            for i in 0..s.lq {
                out[(b * s.lq + i) * s.hq + h] = lse[(b * s.hq + h) * s.lq + i];
            }
        }
    }
    out
}

fn check_tokens(inp: &RefInputs, spec: &NaSpec) -> Result<()> {
    let s = inp.shape;
    if s.lq != spec.len() || s.lk != spec.len() {
        return Err(AttnError::shape(
            "q/k tokens",
            format!("{} (the neighborhood grid)", spec.len()),
            (s.lq, s.lk),
        ));
    }
    Ok(())
}

/// The plain f16 yardstick (see [`crate::softmax::reference::attention_plain_f16`]).
pub fn neighborhood_plain_f16(
    inp: &RefInputs,
    spec: &NaSpec,
    scale: Option<f32>,
) -> Result<Vec<f64>> {
    check_tokens(inp, spec)?;
    attention_plain_f16_masked(inp, &opts(scale), &|_, i, j| spec.sees(i, j))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::neighborhood::NaAxis;
    use crate::softmax::AttnShape;

    /// With a kernel as large as the axis and no causality, neighborhood attention is dense.
    #[test]
    fn full_kernel_is_dense_attention() {
        let spec = NaSpec::new(&[
            NaAxis {
                n: 3,
                kernel: 3,
                dilation: 1,
                stride: 1,
                causal: false,
            },
            NaAxis {
                n: 4,
                kernel: 4,
                dilation: 1,
                stride: 2,
                causal: false,
            },
        ])
        .unwrap();
        assert!((0..12).all(|i| (0..12).all(|j| spec.sees(i, j))));
        assert_eq!(spec.pairs(), 144);
    }

    /// A hand-worked 1D case: n = 3, k = 1 means each token attends to itself: O = V.
    #[test]
    fn unit_kernel_returns_v() {
        let spec = NaSpec::new(&[NaAxis {
            n: 3,
            kernel: 1,
            dilation: 1,
            stride: 1,
            causal: false,
        }])
        .unwrap();
        let shape = AttnShape {
            batch: 1,
            lq: 3,
            lk: 3,
            hq: 1,
            hkv: 1,
            d: 2,
            dv: 2,
        };
        let q = [0.3, -1.0, 2.0, 0.5, -0.7, 0.1];
        let v = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        let inp = RefInputs {
            shape,
            q: &q,
            k: &q,
            v: &v,
            bias: None,
        };
        let r = neighborhood_reference(&inp, &spec, Some(1.0)).unwrap();
        for (o, e) in r.out.iter().zip(v) {
            assert!((o - e as f64).abs() < 1e-12);
        }
        // LSE of a single key is its score
        assert!((r.lse[0] - (0.09 + 1.0)).abs() < 1e-6, "{}", r.lse[0]);
    }
}
