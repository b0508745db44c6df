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
    let mut lse = vec![0.0; r.lse.len()];
    for b in 0..s.batch {
        for h in 0..s.hq {
            for i in 0..s.lq {
                lse[(b * s.lq + i) * s.hq + h] = r.lse[(b * s.hq + h) * s.lq + i];
            }
        }
    }
    Ok(RefOutput { out: r.out, lse })
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
