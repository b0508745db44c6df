//! The dense backward against the f64 reference gradients (themselves checked by finite
//! differences in src/softmax/reference_grad.rs): every option with a gradient, awkward
//! shapes, f32 and f16, GQA, fully masked rows; gradients poisoned with NaN before each run;
//! bit-identical reruns; typed errors for bad input.

mod common;
use common::*;
use rand::{Rng, SeedableRng};
use wgpu_attention::*;

/// How one gradient compares with the reference: f32 within `2e-5 * max|ref|` (far under 1e-4
/// relative), f16 within twice the plain f16 implementation's error plus `1e-4 * max|ref|`.
fn compare_grad(
    name: &str,
    got: &[f32],
    want: &[f64],
    plain: Option<&[f64]>,
) -> std::result::Result<String, String> {
    let max_ref = want.iter().fold(0.0f64, |m, x| m.max(x.abs())).max(1e-3);
    let mut max_abs = 0.0f64;
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        if !g.is_finite() {
            return Err(format!("{name}[{i}] = {g}, expected {w}"));
        }
        max_abs = max_abs.max((g as f64 - w).abs());
    }
    let tol = match plain {
        None => 2e-5 * max_ref,
        Some(p) => {
            let e = p
                .iter()
                .zip(want)
                .fold(0.0f64, |m, (a, b)| m.max((a - b).abs()));
            2.0 * e + 1e-4 * max_ref
        }
    };
    let line = format!("{name}: max |err| {max_abs:.2e} <= {tol:.2e} (max |ref| {max_ref:.2e})");
    if got.len() != want.len() || max_abs > tol {
        return Err(format!(
            "{line} FAILED ({} values, expected {})",
            got.len(),
            want.len()
        ));
    }
    Ok(line)
}

fn round_to(x: Vec<f32>, dtype: DType) -> Vec<f32> {
    match dtype {
        DType::F16 => x
            .into_iter()
            .map(|v| half::f16::from_f32(v).to_f32())
            .collect(),
        _ => x,
    }
}

fn upload(x: &[f32], dims: &[usize], dtype: DType) -> Tensor {
    match dtype {
        DType::F16 => {
            let h: Vec<half::f16> = x.iter().map(|&v| half::f16::from_f32(v)).collect();
            Tensor::from_f16(ctx(), &h, dims).unwrap()
        }
        _ => Tensor::from_f32(ctx(), x, dims).unwrap(),
    }
}

/// Runs the forward (with LSE) and the backward on the case's inputs for `seed` (gradients
/// NaN-poisoned first) and compares dQ, dK and dV with the reference.
fn run_backward(case: &Case, seed: u64) -> std::result::Result<String, String> {
    let ctx = ctx();
    let s = case.shape;
    let dt = case.dtype;
    let q = round_to(random(s.batch * s.lq * s.hq * s.d, case.amp, seed), dt);
    let k = round_to(random(s.batch * s.lk * s.hkv * s.d, case.amp, seed ^ 1), dt);
    let v = round_to(random(s.batch * s.lk * s.hkv * s.dv, 1.0, seed ^ 2), dt);
    let dout = round_to(random(s.batch * s.lq * s.hq * s.dv, 1.0, seed ^ 4), dt);
    let mut opts = case.opts.clone().return_lse(true);
    let bias = case.bias.map(|[bb, bh]| {
        let mut x = random(bb * bh * s.lq * s.lk, 2.0, seed ^ 3);
        for (i, e) in x.iter_mut().enumerate() {
            if i % 7 == 3 {
                *e = f32::NEG_INFINITY; // additive masks mask in the backward too
            }
        }
        (x, [bb, bh])
    });
    if let Some((x, [bb, bh])) = &bias {
        opts.bias = Some(Tensor::from_f32(ctx, x, &[*bb, *bh, s.lq, s.lk]).unwrap());
    }
    let qt = upload(&q, &[s.batch, s.lq, s.hq, s.d], dt);
    let kt = upload(&k, &[s.batch, s.lk, s.hkv, s.d], dt);
    let vt = upload(&v, &[s.batch, s.lk, s.hkv, s.dv], dt);
    let dot = upload(&dout, &[s.batch, s.lq, s.hq, s.dv], dt);
    let fwd = flash_attention(ctx, &qt, &kt, &vt, &opts).map_err(|e| format!("forward: {e}"))?;
    let poisoned = |dims: &[usize]| Tensor::filled(ctx, dims, dt, f32::NAN).unwrap();
    let g =
        FlashGrads::new(
            poisoned(&[s.batch, s.lq, s.hq, s.d]),
            poisoned(&[s.batch, s.lk, s.hkv, s.d]),
            poisoned(&[s.batch, s.lk, s.hkv, s.dv]),
        )
        .with_dbias(case.bias.map(|[bb, bh]| {
            Tensor::filled(ctx, &[bb, bh, s.lq, s.lk], DType::F32, f32::NAN).unwrap()
        }));
    flash_attention_backward_into(ctx, &qt, &kt, &vt, &fwd, &dot, &g, &opts)
        .map_err(|e| format!("backward: {e}"))?;
    let inp = RefInputs {
        shape: s,
        q: &q,
        k: &k,
        v: &v,
        bias: bias.as_ref().map(|(x, d)| (x.as_slice(), *d)),
    };
    let r = attention_backward_reference(&inp, &opts, &dout).map_err(|e| e.to_string())?;
    let plain =
        (dt == DType::F16).then(|| attention_backward_plain_f16(&inp, &opts, &dout).unwrap());
    let mut lines = Vec::new();
    for (name, t, want, p) in [
        ("dq", &g.dq, &r.dq, plain.as_ref().map(|p| &p.dq)),
        ("dk", &g.dk, &r.dk, plain.as_ref().map(|p| &p.dk)),
        ("dv", &g.dv, &r.dv, plain.as_ref().map(|p| &p.dv)),
    ] {
        let got = t.to_vec_f32(ctx).unwrap();
        lines.push(compare_grad(name, &got, want, p.map(|x| x.as_slice()))?);
    }
    if let (Some(t), Some(want)) = (&g.dbias, &r.dbias) {
        let got = t.to_vec_f32(ctx).unwrap();
        let p = plain.as_ref().and_then(|p| p.dbias.as_deref());
        lines.push(compare_grad("dbias", &got, want, p)?);
    }
    Ok(lines.join("; "))
}

fn check_backward(case: &Case) {
    if case.dtype == DType::F16 && !ctx().caps.f16 {
        eprintln!("skipped on this adapter (no SHADER_F16): {case:?}");
        return;
    }
    let seed = fresh_seed();
    match run_backward(case, seed) {
        Ok(line) => eprintln!("{line}"),
        Err(e) => panic!("{case:?} seed {seed}: {e}"),
    }
}

/// The options tests' shape: B = 2, GQA 4/2, D = 20 and Dv = 28 (padded buckets), Lq != Lk.
fn base(lq: usize, lk: usize) -> Case {
    Case::new(2, lq, lk, 4, 2, 20, 28)
}

#[test]
fn backward_every_option() {
    check_backward(&base(57, 83));
    check_backward(&base(57, 83).with(|o| o.causal = true));
    // Lq > Lk causal: the first rows see no key and get zero gradients
    check_backward(&base(90, 40).with(|o| o.causal = true));
    check_backward(&base(57, 83).with(|o| o.scale = Some(0.3)));
    check_backward(&base(57, 83).with(|o| {
        o.softcap = Some(2.5);
        o.alibi_slopes = Some(vec![0.1, 0.05, 0.3, 0.2]);
    }));
    check_backward(&base(57, 83).with(|o| {
        o.window = (Some(7), Some(5));
        o.sinks = 3;
    }));
    check_backward(&base(120, 120).with(|o| {
        o.causal = true;
        o.window = (Some(20), None);
    }));
    check_backward(&base(57, 83).with(|o| {
        o.q_lens = Some(vec![57, 20]);
        o.kv_lens = Some(vec![9, 83]);
        o.causal = true;
    }));
}

#[test]
fn backward_awkward_lengths_and_bias() {
    for (lq, lk) in [(1, 1), (1, 113), (113, 1), (113, 203)] {
        check_backward(&base(lq, lk));
    }
    check_backward(&Case::new(1, 1000, 1000, 2, 1, 20, 28).with(|o| o.causal = true));
    // dBias: not broadcast, and summed over both broadcast axes
    for (bb, bh) in [(1, 1), (2, 4), (2, 1)] {
        check_backward(&base(57, 83).bias(bb, bh).with(|o| o.causal = true));
    }
}

/// The large head dims (their kernels unroll D / 4 registers a row: the slowest backward
/// kernels to compile). scripts/test.sh runs this test on SwiftShader, beside the browser,
/// instead of on lavapipe, where its cold compile took over a minute of the lavapipe phase.
#[test]
fn backward_head_dims() {
    check_backward(&Case::new(1, 37, 70, 2, 1, 96, 96).with(|o| o.causal = true));
    check_backward(&Case::new(1, 37, 70, 2, 2, 256, 256));
}

#[test]
fn backward_f16() {
    check_backward(
        &Case::new(2, 70, 57, 4, 1, 64, 64)
            .f16()
            .with(|o| o.causal = true),
    );
}

/// Two runs on the same inputs give the same bits (no atomics; a fixed summation order).
#[test]
fn backward_is_deterministic() {
    let ctx = ctx();
    let c = base(113, 203).with(|o| o.causal = true);
    let s = c.shape;
    let seed = fresh_seed();
    let t = |n: &[usize], salt: u64| {
        Tensor::from_f32(ctx, &random(n.iter().product(), 2.0, seed ^ salt), n).unwrap()
    };
    let q = t(&[s.batch, s.lq, s.hq, s.d], 0);
    let k = t(&[s.batch, s.lk, s.hkv, s.d], 1);
    let v = t(&[s.batch, s.lk, s.hkv, s.dv], 2);
    let dout = t(&[s.batch, s.lq, s.hq, s.dv], 3);
    let opts = c.opts.clone().return_lse(true);
    let out = flash_attention(ctx, &q, &k, &v, &opts).unwrap();
    let bits = || {
        let g = flash_attention_backward(ctx, &q, &k, &v, &out, &dout, &opts).unwrap();
        [g.dq, g.dk, g.dv].map(|t| {
            t.to_vec_f32(ctx)
                .unwrap()
                .into_iter()
                .map(f32::to_bits)
                .collect::<Vec<_>>()
        })
    };
    assert!(bits() == bits(), "seed {seed}: two runs differ");
}

#[test]
fn backward_bad_inputs() {
    let ctx = ctx();
    let c = base(8, 8);
    let s = c.shape;
    let t = |n: &[usize]| Tensor::filled(ctx, n, DType::F32, 0.5).unwrap();
    let (q, k, v) = (
        t(&[s.batch, s.lq, s.hq, s.d]),
        t(&[s.batch, s.lk, s.hkv, s.d]),
        t(&[s.batch, s.lk, s.hkv, s.dv]),
    );
    let dout = t(&[s.batch, s.lq, s.hq, s.dv]);
    let no_lse = flash_attention(ctx, &q, &k, &v, &FlashOptions::default()).unwrap();
    let e = flash_attention_backward(ctx, &q, &k, &v, &no_lse, &dout, &FlashOptions::default());
    assert!(
        matches!(e, Err(AttnError::Invalid { .. })),
        "missing LSE: {e:?}"
    );
    let opts = FlashOptions::default().return_lse(true);
    let out = flash_attention(ctx, &q, &k, &v, &opts).unwrap();
    let bad_shape = t(&[s.batch, s.lq, s.hq, s.dv + 1]);
    let e = flash_attention_backward(ctx, &q, &k, &v, &out, &bad_shape, &opts);
    assert!(
        matches!(e, Err(AttnError::Shape { .. })),
        "dout shape: {e:?}"
    );
    let bad_dtype = Tensor::from_u32(
        ctx,
        &vec![0; s.batch * s.lq * s.hq * s.dv],
        &[s.batch, s.lq, s.hq, s.dv],
    )
    .unwrap();
    let e = flash_attention_backward(ctx, &q, &k, &v, &out, &bad_dtype, &opts);
    assert!(
        matches!(e, Err(AttnError::DType { .. })),
        "dout dtype: {e:?}"
    );
    let e = flash_attention_backward(
        ctx,
        &q,
        &k,
        &v,
        &out,
        &dout,
        &opts.clone().softcap(Some(-1.0)),
    );
    assert!(
        matches!(e, Err(AttnError::Invalid { .. })),
        "softcap: {e:?}"
    );
    // past the largest head dim: a typed limit
    let big = t(&[1, 2, 1, 300]);
    let out_big = AttentionOutput::new(t(&[1, 2, 1, 300]), Some(t(&[1, 1, 2])));
    let e = flash_attention_backward(ctx, &big, &big, &big, &out_big, &t(&[1, 2, 1, 300]), &opts);
    assert!(matches!(e, Err(AttnError::Limit { .. })), "D = 300: {e:?}");
    // past lavapipe's loop limit: refused with a typed limit, never run short
    let long = AttnShape {
        batch: 1,
        lq: 1,
        lk: 70_000,
        hq: 1,
        hkv: 1,
        d: 20,
        dv: 20,
    };
    let p = wgpu_attention::flash::backward::plan(ctx, &long, DType::F32, false, None);
    match ctx.caps.loop_limit {
        Some(_) => assert!(
            matches!(p, Err(AttnError::Limit { .. })),
            "Lk = 70000: {p:?}"
        ),
        None => eprintln!("no loop limit on this adapter: Lk = 70000 plans ({p:?})"),
    }
    // gradients may not share a buffer with an input
    let g = FlashGrads::new(
        q.clone(),
        t(&[s.batch, s.lk, s.hkv, s.d]),
        t(&[s.batch, s.lk, s.hkv, s.dv]),
    );
    let e = flash_attention_backward_into(ctx, &q, &k, &v, &out, &dout, &g, &opts);
    assert!(
        matches!(e, Err(AttnError::Invalid { .. })),
        "aliased dq: {e:?}"
    );
}

/// Seeded random cases over the options with a gradient (the kernels of the fixed tests:
/// D and Dv from their buckets), logits of standard deviation 1 to 4.
#[test]
fn backward_random_cases() {
    for_each_case("flash backward", 4, |seed| {
        let mut r = rand::rngs::StdRng::seed_from_u64(seed);
        let batch = r.random_range(1..=2);
        let hkv = r.random_range(1..=2);
        let hq = hkv * r.random_range(1..=3);
        let lq = r.random_range(1..200);
        let lk = if r.random_bool(0.2) {
            lq
        } else {
            r.random_range(1..200)
        };
        let d = r.random_range(17..=20);
        let dv = r.random_range(25..=28);
        let mut c = Case::new(batch, lq, lk, hq, hkv, d, dv);
        let sigma = r.random_range(1.0..4.0);
        c.amp = amp_for_logit_std(sigma, 1.0 / (d as f64).sqrt(), d);
        let o = &mut c.opts;
        o.causal = r.random_bool(0.5);
        if r.random_bool(0.3) {
            o.softcap = Some(r.random_range(1.0..10.0));
        }
        if r.random_bool(0.3) {
            o.alibi_slopes = Some((0..hq).map(|_| r.random_range(0.0..0.5)).collect());
        }
        if r.random_bool(0.3) {
            o.window = (
                Some(r.random_range(0..50)),
                r.random_bool(0.5).then(|| r.random_range(0..50)),
            );
            o.sinks = r.random_range(0..4);
        }
        if r.random_bool(0.3) {
            o.q_lens = Some((0..batch).map(|_| r.random_range(0..=lq as u32)).collect());
            o.kv_lens = Some((0..batch).map(|_| r.random_range(0..=lk as u32)).collect());
        }
        let desc = format!("{c:?} sigma {sigma:.1}");
        match run_backward(&c, seed) {
            Ok(line) => format!("{desc}: {line}"),
            Err(e) => panic!("{desc}: {e}"),
        }
    });
}
