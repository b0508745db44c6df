//! The page's backward self-test case: dense attention's gradients (dQ, dK, dV) in the
//! browser against the f64 reference gradients computed in the same wasm. Plain Rust, like
//! `case.rs`.

use wgpu_attention::bench::pseudo_random;
use wgpu_attention::{
    attention_backward_reference, flash_attention, flash_attention_backward, AttnShape,
    FlashOptions, GpuContext, RefInputs, Result, Tensor,
};

use crate::SelftestCase;

/// GQA 4/2, Lq = 37 against Lk = 113, D = 40, causal with a softcap and a window with sinks.
pub async fn backward_case(ctx: &GpuContext) -> SelftestCase {
    let name = "dense backward causal Lq=37 Lk=113 GQA 4/2 D=40 softcap window+sinks";
    let (passed, kernel, max_abs, tolerance_abs, problem) = match run(ctx).await {
        Ok((kernel, max_abs, tol)) => (max_abs <= tol, kernel, Some(max_abs), Some(tol), None),
        Err(e) => (false, String::new(), None, None, Some(e.to_string())),
    };
    SelftestCase {
        name: name.into(),
        passed,
        kernel,
        max_abs,
        tolerance_abs,
        gpu_ms: None,
        problem,
    }
}

/// The dK/dV kernel's label, and the error and tolerance of the gradient whose error is the
/// largest share of its tolerance (the crate's f32 rule: 2e-5 of the gradient's largest
/// reference value).
async fn run(ctx: &GpuContext) -> Result<(String, f64, f64)> {
    let s = AttnShape {
        batch: 1,
        lq: 37,
        lk: 113,
        hq: 4,
        hkv: 2,
        d: 40,
        dv: 40,
    };
    let q = pseudo_random(s.lq * s.hq * s.d, 11);
    let k = pseudo_random(s.lk * s.hkv * s.d, 12);
    let v = pseudo_random(s.lk * s.hkv * s.dv, 13);
    let dout = pseudo_random(s.lq * s.hq * s.dv, 14);
    let opts = FlashOptions::default()
        .causal(true)
        .softcap(Some(3.0))
        .window((Some(40), None))
        .sinks(2)
        .return_lse(true);
    let t = |x: &[f32], l: usize, h: usize, d: usize| Tensor::from_f32(ctx, x, &[1, l, h, d]);
    let (qt, kt, vt) = (
        t(&q, s.lq, s.hq, s.d)?,
        t(&k, s.lk, s.hkv, s.d)?,
        t(&v, s.lk, s.hkv, s.dv)?,
    );
    let dot = t(&dout, s.lq, s.hq, s.dv)?;
    let out = flash_attention(ctx, &qt, &kt, &vt, &opts)?;
    let g = flash_attention_backward(ctx, &qt, &kt, &vt, &out, &dot, &opts)?;
    ctx.finished().await?;
    let inp = RefInputs {
        shape: s,
        q: &q,
        k: &k,
        v: &v,
        bias: None,
    };
    let r = attention_backward_reference(&inp, &opts, &dout)?;
    // the gradient whose error is the largest share of its tolerance decides
    let mut worst: Option<(f64, f64)> = None;
    for (got, want) in [(&g.dq, &r.dq), (&g.dk, &r.dk), (&g.dv, &r.dv)] {
        let got = got.to_vec_f32_async(ctx).await?;
        let max_ref = want.iter().fold(1e-3f64, |m, x| m.max(x.abs()));
        let tol = 2e-5 * max_ref;
        // a NaN (an unwritten element) fails the case
        let err = got
            .iter()
            .zip(want.iter())
            .fold(0.0f64, |m, (&a, &b)| match a.is_finite() {
                true => m.max((a as f64 - b).abs()),
                false => f64::INFINITY,
            });
        if worst.is_none_or(|(e, t)| err / tol > e / t) {
            worst = Some((err, tol));
        }
    }
    let (err, tol) = worst.unwrap_or((f64::INFINITY, 0.0));
    let plan =
        wgpu_attention::flash::backward::plan(ctx, &s, wgpu_attention::DType::F32, false, None)?;
    use wgpu_attention::pipeline::Kernel;
    Ok((plan.dkdv.label(), err, tol))
}
