//! Shared test harness: one GPU context per test binary (a missing adapter fails loudly), fresh
//! random inputs, NaN-poisoned outputs, comparison with the f64 reference.
#![allow(dead_code)]

use std::sync::OnceLock;

use rand::{Rng, SeedableRng};
use wgpu_attention::flash::reference::{
    attention_plain_f16, attention_reference, compare, round_f16, Comparison, RefInputs,
};
use wgpu_attention::sparse::attention::{
    sparse_attention_into, sparse_reference, Normalizer, SparseOptions,
};
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

/// A new seed, printed: whatever a test draws from it (inputs, block masks, aux data) can be
/// replayed from a failing test's output.
pub fn fresh_seed() -> u64 {
    let seed = rand::rng().random();
    eprintln!("fresh seed {seed}");
    seed
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
    /// Make the first query row and first key row of batch 0 all 60: a logit of 3600 * D,
    /// far past f16's 65504.
    pub big_logits: bool,
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
            // U(-2, 2) inputs: logits with a standard deviation of 4/3 at the default scale
            amp: 2.0,
            bhsd: false,
            big_logits: false,
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
    pub fn bias(mut self, bb: usize, bh: usize) -> Self {
        self.bias = Some([bb, bh]);
        self
    }
    pub fn bhsd(mut self) -> Self {
        self.bhsd = true;
        self
    }
    pub fn big_logits(mut self) -> Self {
        self.big_logits = true;
        self
    }
    pub fn with(mut self, f: impl FnOnce(&mut FlashOptions)) -> Self {
        f(&mut self.opts);
        self
    }
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
        DType::F16 => {
            let h: Vec<half::f16> = x.iter().map(|&v| half::f16::from_f32(v)).collect();
            Tensor::from_f16(ctx, &h, &dims).unwrap()
        }
        _ => Tensor::from_f32(ctx, x, &dims).unwrap(),
    }
}

/// Runs the case on the GPU (outputs poisoned with NaN first) and against the reference.
pub fn run(case: &Case) -> Comparison {
    let seed = fresh_seed();
    run_seeded(case, seed)
}

pub fn run_seeded(case: &Case, seed: u64) -> Comparison {
    run_family(case, seed, None)
}

/// [`run_seeded`] as a sparse call with `sparse`'s block mask, snippets and aux buffers (its
/// `flash` options are the case's), against the sparse reference.
pub fn run_sparse(case: &Case, seed: u64, sparse: &SparseOptions) -> Comparison {
    run_family(case, seed, Some(sparse))
}

fn run_family(case: &Case, seed: u64, sparse: Option<&SparseOptions>) -> Comparison {
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
    let mut q = round(random(s.batch * s.lq * s.hq * s.d, case.amp, seed));
    let mut k = round(random(s.batch * s.lk * s.hkv * s.d, case.amp, seed ^ 1));
    if case.big_logits {
        q[..s.d].fill(60.0);
        k[..s.d].fill(60.0);
    }
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
    // sigmoid attention has no LSE (refused): O alone is compared
    let with_lse = sparse.is_none_or(|sp| sp.normalizer == Normalizer::Softmax);
    let lse_out = with_lse.then_some(&lse);
    let sparse = sparse.map(|sp| sp.clone().flash(opts.clone()));
    let mask = sparse.as_ref().map(|sp| {
        wgpu_attention::sparse::attention::resolve_block_mask(ctx, &s, sp)
            .unwrap_or_else(|e| panic!("{case:?}: block mask failed: {e}"))
    });
    match (&sparse, &mask) {
        (Some(sp), Some(m)) => {
            let sp = sp.clone().block_mask(Some(m.clone()));
            sparse_attention_into(ctx, &qt, &kt, &vt, &out, lse_out, &sp)
        }
        _ => flash_attention_into(ctx, &qt, &kt, &vt, &out, Some(&lse), &opts),
    }
    .unwrap_or_else(|e| panic!("{case:?}: dispatch failed: {e}"));
    let got = out.to_vec_f32(ctx).unwrap();
    let got_lse = with_lse.then(|| lse.to_vec_f32(ctx).unwrap());

    let inp = RefInputs {
        shape: s,
        q: &q,
        k: &k,
        v: &v,
        bias: bias_host.as_ref().map(|(x, d)| (x.as_slice(), *d)),
    };
    let (r, plain) = match (&sparse, &mask) {
        (Some(sp), Some(m)) => {
            let refer = |round: &dyn Fn(f64) -> f64| {
                sparse_reference(ctx, &inp, sp, m, round)
                    .unwrap_or_else(|e| panic!("{case:?}: sparse reference failed: {e}"))
            };
            let r = refer(&|p| p);
            let plain = (case.dtype == DType::F16)
                .then(|| refer(&round_f16).out.into_iter().map(round_f16).collect());
            (r, plain)
        }
        _ => {
            let r = attention_reference(&inp, &opts).unwrap();
            let plain =
                (case.dtype == DType::F16).then(|| attention_plain_f16(&inp, &opts).unwrap());
            (r, plain)
        }
    };
    compare(&got, got_lse.as_deref(), &r, plain.as_deref())
}

/// Runs on fresh random inputs and asserts the crate's tolerances (see
/// [`wgpu_attention::flash::reference::compare`]): f32 under 2e-5 of the largest output, f16 at
/// most twice the error of a plain f16 implementation plus a small atol. An f16 case on an
/// adapter without SHADER_F16 must instead fail with the typed error.
pub fn check(case: &Case) -> Option<Comparison> {
    let seed = fresh_seed();
    let c = check_seeded(case, seed);
    if let Some(c) = &c {
        assert!(c.passed, "{case:?} seed {seed}: {c:?}");
    }
    c
}

/// [`check`] on the inputs of `seed`, returning the comparison unasserted.
pub fn check_seeded(case: &Case, seed: u64) -> Option<Comparison> {
    if case.dtype == DType::F16 && !ctx().caps.f16 {
        expect_missing_f16(case);
        return None;
    }
    Some(run_seeded(case, seed))
}

fn expect_missing_f16(case: &Case) {
    let ctx = ctx();
    let s = case.shape;
    let t = |l: usize, h: usize, d: usize| {
        let x = vec![half::f16::from_f32(0.5); s.batch * l * h * d];
        Tensor::from_f16(ctx, &x, &[s.batch, l, h, d]).unwrap()
    };
    let err = flash_attention(
        ctx,
        &t(s.lq, s.hq, s.d),
        &t(s.lk, s.hkv, s.d),
        &t(s.lk, s.hkv, s.dv),
        &case.opts,
    );
    assert!(
        matches!(
            err,
            Err(AttnError::MissingFeature {
                feature: "SHADER_F16",
                ..
            })
        ),
        "f16 on an adapter without SHADER_F16 must be a typed error"
    );
}

/// The strategies this adapter can run (both where it has subgroups).
pub fn strategies() -> Vec<Strategy> {
    let mut v = vec![Strategy::Tiled];
    if ctx().caps.subgroups {
        v.push(Strategy::Subgroup);
    } else {
        eprintln!("adapter has no SUBGROUP: the subgroup strategy is not tested here");
    }
    v
}

/// `WGPU_ATTENTION_EXHAUSTIVE=1`: the cases the default run leaves out because their cold
/// compiles cost more than they add (each such test says what it skipped).
pub fn exhaustive() -> bool {
    std::env::var("WGPU_ATTENTION_EXHAUSTIVE").is_ok_and(|v| v == "1")
}

/// Checks the case with every strategy the adapter can run.
pub fn check_all(case: &Case) {
    for st in strategies() {
        check(&case.clone().strategy(st));
    }
}

/// For a test of one specialization axis (head dims, ...): case i with the i-th strategy the
/// adapter can run (cycling), so every axis value and every strategy runs at least once
/// without compiling their cross product cold; `WGPU_ATTENTION_EXHAUSTIVE=1` checks every case
/// with every strategy.
pub fn check_axis(cases: &[Case]) {
    let sts = strategies();
    for (i, case) in cases.iter().enumerate() {
        if exhaustive() || sts.len() <= 1 {
            check_all(case);
            continue;
        }
        let st = sts[i % sts.len()];
        eprintln!("{st:?} only (WGPU_ATTENTION_EXHAUSTIVE=1: every strategy) for {case:?}");
        check(&case.clone().strategy(st));
    }
}

/// Input amplitude for logits with standard deviation `sigma`: `q.k * scale` of U(-a, a)
/// entries has standard deviation `a^2 / 3 * scale * sqrt(D)`.
pub fn amp_for_logit_std(sigma: f64, scale: f64, d: usize) -> f32 {
    (3.0 * sigma / (scale * (d as f64).sqrt())).sqrt() as f32
}

/// The seeds of a random-case test: `WGPU_ATTENTION_SEED=S` replays one case,
/// `WGPU_ATTENTION_CASES=N` runs N fresh ones (default `default_n`).
pub fn case_seeds(default_n: usize) -> Vec<u64> {
    if let Some(s) = std::env::var("WGPU_ATTENTION_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        return vec![s];
    }
    let n = std::env::var("WGPU_ATTENTION_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default_n);
    (0..n).map(|_| fresh_seed()).collect()
}

/// Runs `body(seed)` for every seed of [`case_seeds`]; a failure names the seed and how to
/// replay it, then fails the test.
pub fn for_each_case(family: &str, default_n: usize, body: impl Fn(u64) -> String) {
    let seeds = case_seeds(default_n);
    for &seed in &seeds {
        let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| body(seed)));
        match res {
            Ok(desc) => eprintln!("{family} case {seed}: {desc}"),
            Err(e) => {
                let msg = e
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                panic!("{family} random case failed: seed {seed} (replay with WGPU_ATTENTION_SEED={seed}): {msg}");
            }
        }
    }
    eprintln!("{family}: {} random cases passed", seeds.len());
}

/// The flash family's random case for `seed`: shapes (B 1..=3, Lq and Lk 1..300, D and Dv
/// apart, GQA ratios), options in random combination, logits with a standard deviation of 1
/// to 4. Head dims come from a few buckets (padded inside each), so the many shapes run
/// through the specializations the fixed tests compile anyway: cold compiles dominate the
/// suite's time on CPU adapters.
pub fn random_flash_case(seed: u64) -> Case {
    let mut r = rand::rngs::StdRng::seed_from_u64(seed);
    // (D range, Dv range, score modifications allowed, f16 allowed)
    let buckets: [(
        std::ops::RangeInclusive<usize>,
        std::ops::RangeInclusive<usize>,
        bool,
        bool,
    ); 5] = [
        (17..=32, 17..=32, true, true),
        (49..=64, 49..=64, false, true),
        (1..=16, 81..=96, false, false),
        (1..=16, 1..=16, false, false),
        (193..=256, 193..=256, false, false),
    ];
    let (dr, dvr, mods_ok, f16_ok) = buckets[r.random_range(0..buckets.len())].clone();
    let batch = r.random_range(1..=3);
    let mut lq = r.random_range(1..300);
    let mut lk = if r.random_bool(0.2) {
        lq
    } else {
        r.random_range(1..300)
    };
    let hkv = r.random_range(1..=3);
    let hq = hkv * r.random_range(1..=4);
    let (d, dv) = (r.random_range(dr), r.random_range(dvr));
    // bound the f64 reference's work (a few tenths of a second a case)
    while batch * hq * lq * lk * (d + dv) > 40_000_000 {
        if lq > lk {
            lq = lq / 2 + 1;
        } else {
            lk = lk / 2 + 1;
        }
    }
    let mut c = Case::new(batch, lq, lk, hq, hkv, d, dv);
    let o = &mut c.opts;
    o.causal = r.random_bool(0.5);
    if r.random_bool(0.2) {
        o.scale = Some(r.random_range(0.5..2.0) / (d as f32).sqrt());
    }
    if mods_ok {
        if r.random_bool(0.25) {
            o.softcap = Some(r.random_range(1.0..30.0));
        }
        if r.random_bool(0.25) {
            o.alibi_slopes = Some(
                (1..=hq)
                    .map(|i| 2f32.powf(-8.0 * i as f32 / hq as f32))
                    .collect(),
            );
        }
        if r.random_bool(0.25) {
            c.bias = Some([
                if r.random_bool(0.5) { 1 } else { batch },
                if r.random_bool(0.5) { 1 } else { hq },
            ]);
        }
    }
    if r.random_bool(0.2) {
        c.opts.q_lens = Some((0..batch).map(|_| r.random_range(0..=lq as u32)).collect());
    }
    if r.random_bool(0.2) {
        c.opts.kv_lens = Some((0..batch).map(|_| r.random_range(0..=lk as u32)).collect());
    }
    if r.random_bool(0.3) {
        let side = |r: &mut rand::rngs::StdRng| r.random_bool(0.7).then(|| r.random_range(0..64));
        c.opts.window = (side(&mut r), side(&mut r));
        if r.random_bool(0.5) {
            c.opts.sinks = r.random_range(0..12);
        }
    }
    if f16_ok && r.random_bool(0.3) {
        c.dtype = DType::F16;
    } else if r.random_bool(0.2) {
        c.bhsd = true;
    }
    let scale = c.opts.scale.map_or(1.0 / (d as f64).sqrt(), f64::from);
    c.amp = amp_for_logit_std(r.random_range(1.0..4.0), scale, d);
    let st = strategies();
    c.opts.strategy = StrategyChoice::Force(st[r.random_range(0..st.len())]);
    c
}
