//! `bench --backward` scenarios: the dense forward (with the LSE the backward needs) and the
//! dense backward on the same inputs, recorded for one interleaved run, so their ratio compares
//! rounds taken side by side.

use super::{pseudo_random, Record};
use crate::context::GpuContext;
use crate::error::Result;
use crate::flash::backward::{encode_flash_attention_backward, FlashGrads};
use crate::flash::{encode_flash_attention, FlashOptions};
use crate::pipeline::Kernel;
use crate::softmax::AttentionOutput;
use crate::tensor::{DType, Tensor};

/// One point: B = 1, `heads` query and KV heads, L queries and keys, head dim `d`.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct BackwardPoint {
    pub l: usize,
    pub heads: usize,
    pub d: usize,
    pub causal: bool,
}

/// The recorders of one point, in this order: the forward (O and LSE), the backward (dQ, dK,
/// dV from the forward's O and LSE, computed once before timing). Each returns its label.
pub fn records<'a>(ctx: &'a GpuContext, p: &BackwardPoint) -> Result<Vec<Record<'a>>> {
    let dims = [1, p.l, p.heads, p.d];
    let n = p.l * p.heads * p.d;
    let t = |seed| Tensor::from_f32(ctx, &pseudo_random(n, seed), &dims);
    let (q, k, v, dout) = (t(1)?, t(2)?, t(3)?, t(4)?);
    let opts = FlashOptions::default().causal(p.causal).return_lse(true);
    let out = Tensor::filled(ctx, &dims, DType::F32, 0.0)?;
    let lse = Tensor::filled(ctx, &[1, p.heads, p.l], DType::F32, 0.0)?;
    crate::flash::flash_attention_into(ctx, &q, &k, &v, &out, Some(&lse), &opts)?;
    let fwd = AttentionOutput::new(out.clone(), Some(lse.clone()));
    let zeros = |d: [usize; 4]| Tensor::filled(ctx, &d, DType::F32, 0.0);
    let grads = FlashGrads::new(zeros(dims)?, zeros(dims)?, zeros(dims)?);
    let mut recs: Vec<Record<'a>> = Vec::new();
    {
        let (q, k, v, opts) = (q.clone(), k.clone(), v.clone(), opts.clone());
        // the forward writes its own O and LSE: the backward's inputs stay as they were
        let (o2, l2) = (
            zeros(dims)?,
            Tensor::filled(ctx, &[1, p.heads, p.l], DType::F32, 0.0)?,
        );
        recs.push(Box::new(move |enc, ts| {
            let plan = encode_flash_attention(ctx, enc, &q, &k, &v, &o2, Some(&l2), &opts, ts)?;
            Ok(format!("forward {}", plan.label()))
        }));
    }
    recs.push(Box::new(move |enc, ts| {
        let plan =
            encode_flash_attention_backward(ctx, enc, &q, &k, &v, &fwd, &dout, &grads, &opts, ts)?;
        Ok(format!("backward {}", plan.dkdv.label()))
    }));
    Ok(recs)
}
