//! Shared test harness: one GPU context per test binary (a missing adapter fails loudly), fresh
//! random inputs, NaN-poisoned outputs, comparison with the f64 reference.
#![allow(dead_code)]

use std::sync::OnceLock;

use rand::{Rng, SeedableRng};
use wgpu_attention::flash::reference::{attention_plain_f16, attention_reference, RefInputs};
use wgpu_attention::*;

pub fn ctx() -> &'static GpuContext {
    static CTX: OnceLock<GpuContext> = OnceLock::new();
    CTX.get_or_init(|| match GpuContext::new() {
        Ok(c) => {
            eprintln!("GPU tests on: {}", c.describe());
            c
        }
        Err(e) => panic!("GPU tests need an adapter and found none ({e}). Install mesa-vulkan-drivers (lavapipe)."),
    })
}

/// Fresh random data in [-amp, amp); returns the seed for the failure message.
pub fn random(n: usize, amp: f32, seed: u64) -> Vec<f32> {
    let mut r = rand::rngs::StdRng::seed_from_u64(seed);
    (0..n).map(|_| r.random_range(-amp..amp)).collect()
}

pub fn fresh_seed() -> u64 {
    rand::rng().random()
}

/// One attention case.
#[derive(Clone, Debug)]
pub struct Case {
    pub shape: AttnShape,
    pub dtype: DType,
    pub opts: FlashOptions,
    /// Bias broadcast dims `[bb, bh]` when a bias is wanted.
    pub bias: Option<[usize; 2]>,
    /// Input amplitude (large values push logits past f16's range).
    pub amp: f32,
    /// Lay Q, K, V out as [B, H, L, D] and pass them as strided views.
    pub bhsd: bool,
}

impl Case {
    pub fn new(
        batch: usize,
        lq: usize,
        lk: usize,
        hq: usize,
        hkv: usize,
        d: usize,
        dv: usize,
    ) -> Self {
        Case {
            shape: AttnShape {
                batch,
                lq,
                lk,
                hq,
                hkv,
                d,
                dv,
            },
            dtype: DType::F32,
            opts: FlashOptions::default(),
            bias: None,
            amp: 1.0,
            bhsd: false,
        }
    }
    pub fn strategy(mut self, s: Strategy) -> Self {
        self.opts.strategy = StrategyChoice::Force(s);
        self
    }
    pub fn f16(mut self) -> Self {
        self.dtype = DType::F16;
        self
    }
    pub fn with(mut self, f: impl FnOnce(&mut FlashOptions)) -> Self {
        f(&mut self.opts);
        self
    }
}

/// Errors of one run.
#[derive(Debug)]
pub struct Errors {
    pub max_abs: f64,
    pub max_ref: f64,
    pub plain_f16_abs: f64,
    pub lse_max_abs: f64,
}

fn to_bhsd(x: &[f32], [b, l, h, d]: [usize; 4]) -> Vec<f32> {
    let mut out = vec![0.0; x.len()];
    for bi in 0..b {
        for li in 0..l {
            for hi in 0..h {
                for di in 0..d {
                    out[((bi * h + hi) * l + li) * d + di] = x[((bi * l + li) * h + hi) * d + di];
                }
            }
        }
    }
    out
}

fn upload(ctx: &GpuContext, x: &[f32], dims: [usize; 4], dtype: DType, bhsd: bool) -> Tensor {
    if bhsd {
        assert_eq!(dtype, DType::F32, "bhsd test views are f32");
        let [b, l, h, d] = dims;
        return Tensor::from_bhsd(ctx, &to_bhsd(x, dims), [b, h, l, d]).unwrap();
    }
    match dtype {
        DType::F32 => Tensor::from_f32(ctx, x, &dims).unwrap(),
        DType::F16 => {
            let h: Vec<half::f16> = x.iter().map(|&v| half::f16::from_f32(v)).collect();
            Tensor::from_f16(ctx, &h, &dims).unwrap()
        }
    }
}

/// Runs the case on the GPU (outputs poisoned with NaN first) and against the reference.
pub fn run(case: &Case) -> Errors {
    let seed = fresh_seed();
    run_seeded(case, seed)
}

pub fn run_seeded(case: &Case, seed: u64) -> Errors {
    let ctx = ctx();
    let s = case.shape;
    let round = |v: Vec<f32>| -> Vec<f32> {
        if case.dtype == DType::F16 {
            v.into_iter()
                .map(|x| half::f16::from_f32(x).to_f32())
                .collect()
        } else {
            v
        }
    };
    let q = round(random(s.batch * s.lq * s.hq * s.d, case.amp, seed));
    let k = round(random(s.batch * s.lk * s.hkv * s.d, case.amp, seed ^ 1));
    let v = round(random(s.batch * s.lk * s.hkv * s.dv, 1.0, seed ^ 2));
    let mut opts = case.opts.clone();
    let bias_host = case.bias.map(|[bb, bh]| {
        let mut x = random(bb * bh * s.lq * s.lk, 2.0, seed ^ 3);
        // a few -inf entries: additive masks must mask
        for (i, e) in x.iter_mut().enumerate() {
            if i % 7 == 3 {
                *e = f32::NEG_INFINITY;
            }
        }
        (x, [bb, bh])
    });
    if let Some((x, [bb, bh])) = &bias_host {
        opts.bias = Some(Tensor::from_f32(ctx, x, &[*bb, *bh, s.lq, s.lk]).unwrap());
    }
    let qt = upload(ctx, &q, [s.batch, s.lq, s.hq, s.d], case.dtype, case.bhsd);
    let kt = upload(ctx, &k, [s.batch, s.lk, s.hkv, s.d], case.dtype, case.bhsd);
    let vt = upload(ctx, &v, [s.batch, s.lk, s.hkv, s.dv], case.dtype, case.bhsd);
    let out = Tensor::filled(ctx, &[s.batch, s.lq, s.hq, s.dv], case.dtype, f32::NAN).unwrap();
    let lse = Tensor::filled(ctx, &[s.batch, s.hq, s.lq], DType::F32, f32::NAN).unwrap();
    flash_attention_into(ctx, &qt, &kt, &vt, &out, Some(&lse), &opts)
        .unwrap_or_else(|e| panic!("{case:?}: dispatch failed: {e}"));
    let got = out.to_vec_f32(ctx).unwrap();
    let got_lse = lse.to_vec_f32(ctx).unwrap();

    let inp = RefInputs {
        shape: s,
        q: &q,
        k: &k,
        v: &v,
        bias: bias_host.as_ref().map(|(x, d)| (x.as_slice(), *d)),
    };
    let r = attention_reference(&inp, &opts);
    let mut max_abs = 0.0f64;
    let mut max_ref = 0.0f64;
    for (i, (&g, &e)) in got.iter().zip(&r.out).enumerate() {
        assert!(
            g.is_finite(),
            "{case:?} seed {seed}: out[{i}] = {g} (not written or NaN), expected {e}"
        );
        max_abs = max_abs.max((g as f64 - e).abs());
        max_ref = max_ref.max(e.abs());
    }
    let mut lse_max_abs = 0.0f64;
    for (i, (&g, &e)) in got_lse.iter().zip(&r.lse).enumerate() {
        if e == f64::NEG_INFINITY {
            assert!(
                g == f32::NEG_INFINITY,
                "{case:?} seed {seed}: lse[{i}] = {g}, expected -inf"
            );
        } else {
            assert!(
                g.is_finite(),
                "{case:?} seed {seed}: lse[{i}] = {g}, expected {e}"
            );
            lse_max_abs = lse_max_abs.max((g as f64 - e).abs() / e.abs().max(1.0));
        }
    }
    let plain_f16_abs = if case.dtype == DType::F16 {
        let plain = attention_plain_f16(&inp, &opts);
        plain
            .iter()
            .zip(&r.out)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max)
    } else {
        0.0
    };
    Errors {
        max_abs,
        max_ref,
        plain_f16_abs,
        lse_max_abs,
    }
}

/// Runs and asserts the crate's tolerances: f32 relative error under 2e-5 of the largest output
/// (far under 1e-4); f16 at most twice the error of a plain f16 implementation plus a small atol.
pub fn check(case: &Case) {
    let seed = fresh_seed();
    let e = run_seeded(case, seed);
    let scale = e.max_ref.max(1e-3);
    match case.dtype {
        DType::F32 => {
            assert!(
                e.max_abs <= 2e-5 * scale,
                "{case:?} seed {seed}: f32 error {e:?} over 2e-5 relative"
            );
            assert!(
                e.lse_max_abs <= 2e-5,
                "{case:?} seed {seed}: LSE error {e:?}"
            );
        }
        DType::F16 => {
            let atol = 1e-4 * scale;
            assert!(
                e.max_abs <= 2.0 * e.plain_f16_abs + atol,
                "{case:?} seed {seed}: f16 error {e:?} over 2x plain f16 + {atol}"
            );
            assert!(
                e.lse_max_abs <= 1e-4,
                "{case:?} seed {seed}: LSE error {e:?}"
            );
        }
    }
}
