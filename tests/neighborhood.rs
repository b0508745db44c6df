//! Neighborhood attention (NATTEN semantics) against the f64 reference: 1D, 2D and 3D, borders,
//! dilation that does not divide the axis, kernel equal to the axis, 1x1 kernels, even kernels,
//! causal axes, strides, GQA, f16, both strategies, NaN-poisoned outputs.

mod common;
use common::*;
use wgpu_attention::flash::reference::{compare, RefInputs};
use wgpu_attention::neighborhood::reference::{neighborhood_plain_f16, neighborhood_reference};
use wgpu_attention::neighborhood::NaSpec;
use wgpu_attention::*;

#[derive(Clone, Debug)]
struct NaCase {
    batch: usize,
    spatial: Vec<usize>,
    hq: usize,
    hkv: usize,
    d: usize,
    dv: usize,
    dtype: DType,
    opts: NeighborhoodOptions,
    /// Q/K amplitude (see `common::amp_for_logit_std`).
    amp: f32,
}

fn case(spatial: &[usize], kernel: &[usize]) -> NaCase {
    NaCase {
        batch: 2,
        spatial: spatial.to_vec(),
        hq: 4,
        hkv: 2,
        d: 40,
        dv: 40,
        dtype: DType::F32,
        opts: NeighborhoodOptions::new(kernel),
        amp: 2.0,
    }
}

impl NaCase {
    fn dil(mut self, d: &[usize]) -> Self {
        self.opts.dilation = d.to_vec();
        self
    }
    fn stride(mut self, s: &[usize]) -> Self {
        self.opts.stride = s.to_vec();
        self
    }
    fn causal(mut self, c: &[bool]) -> Self {
        self.opts.causal = c.to_vec();
        self
    }
}

fn upload(ctx: &GpuContext, x: &[f32], shape: &[usize], dtype: DType) -> Tensor {
    match dtype {
        DType::F16 => {
            let h: Vec<half::f16> = x.iter().map(|&v| half::f16::from_f32(v)).collect();
            Tensor::from_f16(ctx, &h, shape).unwrap()
        }
        _ => Tensor::from_f32(ctx, x, shape).unwrap(),
    }
}

/// Runs the case with one strategy against the reference; false when the strategy refused it.
fn run(c: &NaCase, st: Strategy) -> bool {
    run_seeded(c, st, fresh_seed())
}

fn run_seeded(c: &NaCase, st: Strategy, seed: u64) -> bool {
    let ctx = ctx();
    if c.dtype == DType::F16 && !ctx.caps.f16 {
        eprintln!(
            "no SHADER_F16: f16 neighborhood case skipped (the typed error is tested in flash)"
        );
        return false;
    }
    let l: usize = c.spatial.iter().product();
    let dims = |h: usize, d: usize| {
        let mut s = vec![c.batch];
        s.extend(&c.spatial);
        s.extend([h, d]);
        s
    };
    let round = |v: Vec<f32>| -> Vec<f32> {
        match c.dtype {
            DType::F16 => v
                .into_iter()
                .map(|x| half::f16::from_f32(x).to_f32())
                .collect(),
            _ => v,
        }
    };
    let q = round(random(c.batch * l * c.hq * c.d, c.amp, seed));
    let k = round(random(c.batch * l * c.hkv * c.d, c.amp, seed ^ 1));
    let v = round(random(c.batch * l * c.hkv * c.dv, 1.0, seed ^ 2));
    let qt = upload(ctx, &q, &dims(c.hq, c.d), c.dtype);
    let kt = upload(ctx, &k, &dims(c.hkv, c.d), c.dtype);
    let vt = upload(ctx, &v, &dims(c.hkv, c.dv), c.dtype);
    let out = Tensor::filled(ctx, &dims(c.hq, c.dv), c.dtype, f32::NAN).unwrap();
    let mut lse_shape = dims(c.hq, 0);
    lse_shape.pop();
    let lse = Tensor::filled(ctx, &lse_shape, DType::F32, f32::NAN).unwrap();
    let mut opts = c.opts.clone();
    opts.strategy = StrategyChoice::Force(st);
    match neighborhood_attention_into(ctx, &qt, &kt, &vt, &out, Some(&lse), &opts) {
        // the Sweep kernel takes only some problems; the others are a typed refusal
        Err(AttnError::Invalid { what, .. })
            if st == Strategy::Sweep && what == "strategy Sweep" =>
        {
            return false;
        }
        r => r.unwrap_or_else(|e| panic!("{c:?} {st:?}: {e}")),
    };
    let got = out.to_vec_f32(ctx).unwrap();
    let got_lse = lse.to_vec_f32(ctx).unwrap();

    let axes = c.opts.axes(&c.spatial).unwrap();
    let spec = NaSpec::new(&axes).unwrap();
    let inp = RefInputs {
        shape: AttnShape {
            batch: c.batch,
            lq: l,
            lk: l,
            hq: c.hq,
            hkv: c.hkv,
            d: c.d,
            dv: c.dv,
        },
        q: &q,
        k: &k,
        v: &v,
        bias: None,
    };
    let r = neighborhood_reference(&inp, &spec, c.opts.scale).unwrap();
    let plain =
        (c.dtype == DType::F16).then(|| neighborhood_plain_f16(&inp, &spec, c.opts.scale).unwrap());
    let cmp = compare(&got, Some(&got_lse), &r, plain.as_deref());
    assert!(cmp.passed, "{c:?} {st:?} seed {seed}: {cmp:?}");
    true
}

/// Every strategy the adapter can run; returns whether the Sweep kernel took the case.
fn check_na(c: &NaCase) -> bool {
    let mut swept = false;
    for st in strategies() {
        run(c, st);
        if st == Strategy::Subgroup {
            swept = run(c, Strategy::Sweep);
        }
    }
    swept
}

#[test]
fn na1d_borders_even_kernels_dilation_stride_causal() {
    check_na(&case(&[113], &[7]));
    check_na(&case(&[113], &[8])); // even kernel: 4 left, 3 right
    check_na(&case(&[113], &[7]).dil(&[3])); // 3 does not divide 113
    check_na(&case(&[113], &[6]).stride(&[4]));
    check_na(&case(&[113], &[9]).causal(&[true]));
    check_na(&case(&[113], &[9]).causal(&[true]).stride(&[3]).dil(&[2]));
    check_na(&case(&[37], &[37])); // kernel = axis: dense
    check_na(&case(&[1], &[1])); // a single token
    check_na(&case(&[50], &[1])); // 1-wide kernel: each token sees its leader only
}

#[test]
fn na2d() {
    check_na(&case(&[19, 23], &[5, 7]));
    check_na(&case(&[19, 23], &[4, 3]).dil(&[2, 3]));
    check_na(&case(&[19, 23], &[5, 6]).stride(&[2, 3]));
    check_na(&case(&[19, 23], &[5, 5]).causal(&[true, false]));
    check_na(&case(&[19, 23], &[5, 5]).causal(&[false, true]).dil(&[1, 2]));
    check_na(&case(&[19, 23], &[1, 1]));
    check_na(&case(&[9, 11], &[9, 11])); // kernel = grid
    check_na(&case(&[16, 16], &[13, 13]));
}

/// The Sweep kernel (CPU adapters): x borders (shifted windows finished in pinned slots), even
/// and causal x kernels, dilation on x that does not divide it, x equal to its kernel, strides
/// on the inner axes, a leading unit axis, and more planes than slots by far.
#[test]
fn na_sweep_borders_dilation_causal() {
    assert!(
        ctx().caps.subgroups,
        "the Sweep kernel needs SUBGROUP, which this adapter lacks"
    );
    for c in [
        case(&[23, 19], &[7, 5]),
        case(&[23, 19], &[8, 3]),
        case(&[23, 19], &[6, 5]).dil(&[3, 1]),
        case(&[13, 10], &[13, 3]),
        case(&[20, 9], &[5, 3]).causal(&[true, true]),
        case(&[20, 9], &[4, 4])
            .causal(&[false, true])
            .stride(&[1, 2]),
        case(&[9, 5, 11], &[3, 5, 4])
            .dil(&[2, 1, 2])
            .stride(&[1, 2, 3]),
        case(&[1, 12, 12], &[1, 5, 5]),
        case(&[70, 3], &[13, 3]),
    ] {
        assert!(check_na(&c), "{c:?}: the Sweep kernel refused it");
    }
    // x strided, or a 1D problem: a typed refusal, and the Subgroup kernel takes them
    assert!(!check_na(&case(&[19, 23], &[5, 6]).stride(&[2, 3])));
    assert!(!check_na(&case(&[40], &[5])));
}

/// The Sweep kernel reads Q/K/V through textures of 4-element texels: a K view that starts off a
/// texel is a typed refusal when Sweep is forced, and the automatic plan takes the Subgroup
/// kernel instead, with the same result.
#[test]
fn na_sweep_needs_texel_aligned_kv() {
    let ctx = ctx();
    let (shape, n) = ([1usize, 9, 7, 2, 16], 9 * 7 * 2 * 16);
    let data = random(n + 2, 1.0, fresh_seed());
    let q = Tensor::from_f32(ctx, &data[2..], &shape).unwrap();
    let strides = q.strides().to_vec();
    // the same values two elements into a longer buffer
    let shifted = Tensor::from_f32(ctx, &data, &[n + 2])
        .unwrap()
        .with_layout(shape.to_vec(), strides, 2)
        .unwrap();
    let opts = |st| (NeighborhoodOptions::new(&[5, 3])).strategy(st);
    let run = |k: &Tensor, st| {
        let out = Tensor::filled(ctx, &shape, DType::F32, f32::NAN).unwrap();
        neighborhood_attention_into(ctx, &q, k, k, &out, None, &opts(st))
            .map(|plan| (plan.key.strategy, out.to_vec_f32(ctx).unwrap()))
    };
    let e = run(&shifted, StrategyChoice::Force(Strategy::Sweep)).err();
    assert!(
        matches!(&e, Some(AttnError::Invalid { what, .. }) if what == "strategy Sweep")
            && e.as_ref().unwrap().to_string().contains("multiples of 4"),
        "{e:?}"
    );
    let (st, got) = run(&shifted, StrategyChoice::Auto).unwrap();
    let (_, want) = run(&q, StrategyChoice::Force(Strategy::Subgroup)).unwrap();
    assert_eq!(st, Strategy::Subgroup);
    assert!(got.iter().all(|x| x.is_finite()));
    assert_eq!(
        got, want,
        "the fallback must compute what the Subgroup kernel computes"
    );
    // aligned K/V: the automatic plan on a CPU adapter is the Sweep kernel
    let (st, _) = run(&q, StrategyChoice::Auto).unwrap();
    assert!(st == Strategy::Sweep || !ctx.caps.cpu, "{st:?}");
}

#[test]
fn na3d() {
    check_na(&case(&[6, 7, 9], &[3, 3, 3]));
    check_na(
        &case(&[6, 7, 9], &[2, 3, 4])
            .dil(&[2, 1, 2])
            .stride(&[2, 1, 3]),
    );
    check_na(&case(&[6, 7, 9], &[3, 3, 3]).causal(&[true, false, true]));
}

#[test]
fn na_heads_dims_and_f16() {
    let mut c = case(&[12, 13], &[5, 5]);
    (c.hq, c.hkv) = (8, 1); // MQA
    check_na(&c);
    let mut c = case(&[12, 13], &[3, 5]);
    (c.d, c.dv) = (96, 64);
    check_na(&c);
    let mut c = case(&[12, 13], &[5, 3]).dil(&[2, 2]);
    c.dtype = DType::F16;
    check_na(&c);
}

#[test]
fn na_bad_inputs_are_typed_errors() {
    let ctx = ctx();
    let t = |shape: &[usize]| Tensor::filled(ctx, shape, DType::F32, 0.5).unwrap();
    let q = t(&[1, 8, 8, 2, 16]);
    let na = |q: &Tensor, k: &Tensor, o: NeighborhoodOptions| {
        neighborhood_attention(ctx, q, k, k, &o).err()
    };
    // kernel larger than the axis, dilation * kernel larger, stride > kernel, zero kernel
    for o in [
        NeighborhoodOptions::new(&[9, 3]),
        NeighborhoodOptions::new(&[3, 3]).tap(|o| o.dilation = vec![1, 3]),
        NeighborhoodOptions::new(&[3, 3]).tap(|o| o.stride = vec![4, 1]),
        NeighborhoodOptions::new(&[0, 3]),
        NeighborhoodOptions::new(&[3]),
    ] {
        let e = na(&q, &q, o.clone());
        assert!(matches!(e, Some(AttnError::Invalid { .. })), "{o:?}: {e:?}");
    }
    // spatial shapes that differ, rank 3
    let e = na(&q, &t(&[1, 8, 7, 2, 16]), NeighborhoodOptions::new(&[3, 3]));
    assert!(matches!(e, Some(AttnError::Shape { .. })), "{e:?}");
    let e = na(
        &t(&[8, 2, 16]),
        &t(&[8, 2, 16]),
        NeighborhoodOptions::new(&[3]),
    );
    assert!(matches!(e, Some(AttnError::Shape { .. })), "{e:?}");
}

trait Tap: Sized {
    fn tap(mut self, f: impl FnOnce(&mut Self)) -> Self {
        f(&mut self);
        self
    }
}
impl Tap for NeighborhoodOptions {}

/// The neighborhood family's random case for `seed`: rank 1 to 3, axis lengths, kernel sizes,
/// dilations, strides and causal axes in random combination (within NATTEN's constraints),
/// GQA, f16, logits with a standard deviation of 1 to 4. Head dims stay in the bucket of the
/// fixed tests and first-axis kernels among those they compile for the Sweep kernel, so the
/// shapes run through specializations built anyway.
fn random_na_case(seed: u64) -> (NaCase, Strategy) {
    use rand::{Rng, SeedableRng};
    let mut r = rand::rngs::StdRng::seed_from_u64(seed);
    let rank = r.random_range(1..=3);
    let mut spatial = Vec::new();
    let (mut kernel, mut dil, mut stride, mut causal) = (vec![], vec![], vec![], vec![]);
    for a in 0..rank {
        let n: usize = match rank {
            1 => r.random_range(1..200),
            2 => r.random_range(1..24),
            _ => r.random_range(1..10),
        };
        // the first axis of a 2D/3D problem is what the Sweep kernel sweeps
        let k = if a == 0 && rank > 1 && n >= 3 {
            let fits: Vec<usize> = [3usize, 5, 7].into_iter().filter(|&k| k <= n).collect();
            fits[r.random_range(0..fits.len())]
        } else {
            r.random_range(1..=n.min(9))
        };
        let d = r.random_range(1..=(n / k).clamp(1, 3));
        let causal_axis = r.random_bool(0.25) && !(a == 0 && rank > 1 && k != 5);
        spatial.push(n);
        kernel.push(k);
        dil.push(d);
        stride.push(if a == 0 && rank > 1 {
            1
        } else {
            r.random_range(1..=k)
        });
        causal.push(causal_axis);
    }
    let mut c = case(&spatial, &kernel)
        .dil(&dil)
        .stride(&stride)
        .causal(&causal);
    c.batch = r.random_range(1..=2);
    c.hkv = r.random_range(1..=2);
    c.hq = c.hkv * r.random_range(1..=3);
    (c.d, c.dv) = (r.random_range(33..=48), r.random_range(33..=48));
    if r.random_bool(0.25) {
        c.dtype = DType::F16;
        // the Sweep kernel shares its bucket: D = Dv for f16 keeps to compiled keys
        c.dv = c.d;
    }
    c.amp = amp_for_logit_std(r.random_range(1.0..4.0), 1.0 / (c.d as f64).sqrt(), c.d);
    let mut st = strategies();
    if ctx().caps.subgroups && c.dtype == DType::F32 {
        st.push(Strategy::Sweep);
    }
    let s = st[r.random_range(0..st.len())];
    (c, s)
}

/// Seeded random neighborhood cases: `WGPU_ATTENTION_CASES=N` for more,
/// `WGPU_ATTENTION_SEED=S` to replay a failure.
#[test]
fn random_cases() {
    for_each_case("neighborhood", 16, |seed| {
        let (c, st) = random_na_case(seed);
        let ran = run_seeded(&c, st, seed);
        format!("{c:?} {st:?}{}", if ran { "" } else { " (refused: typed)" })
    });
}

/// NATTEN's additional keys and values: every query attends to them besides its neighborhood
/// (causal axes included), merged through the LSE; against the reference over each batch's
/// tokens followed by the extra ones.
#[test]
fn na_additional_keys() {
    let ctx = ctx();
    let seed = fresh_seed();
    for (spatial, kernel, causal, s_add) in [
        (vec![37usize], vec![7usize], vec![true], 5usize),
        (vec![9, 11], vec![3, 5], vec![false, true], 1),
    ] {
        let (b, hq, hkv, d) = (2, 4, 2, 32);
        let l: usize = spatial.iter().product();
        let amp = amp_for_logit_std(3.0, 1.0 / (d as f64).sqrt(), d);
        let dims = |h: usize| {
            let mut v = vec![b];
            v.extend(&spatial);
            v.extend([h, d]);
            v
        };
        let (q, k, v) = (
            random(b * l * hq * d, amp, seed),
            random(b * l * hkv * d, amp, seed + 1),
            random(b * l * hkv * d, 1.0, seed + 2),
        );
        let (xk, xv) = (
            random(b * s_add * hkv * d, amp, seed + 3),
            random(b * s_add * hkv * d, 1.0, seed + 4),
        );
        let t = |x: &[f32], s: &[usize]| Tensor::from_f32(ctx, x, s).unwrap();
        let opts = NeighborhoodOptions::new(&kernel)
            .causal(causal.clone())
            .return_lse(true)
            .additional_keys(Some(t(&xk, &[b, s_add, hkv, d])))
            .additional_values(Some(t(&xv, &[b, s_add, hkv, d])));
        let (qt, kt, vt) = (t(&q, &dims(hq)), t(&k, &dims(hkv)), t(&v, &dims(hkv)));
        let out = Tensor::filled(ctx, &dims(hq), DType::F32, f32::NAN).unwrap();
        let mut lse_shape = dims(hq);
        lse_shape.pop();
        let lse = Tensor::filled(ctx, &lse_shape, DType::F32, f32::NAN).unwrap();
        neighborhood_attention_into(ctx, &qt, &kt, &vt, &out, Some(&lse), &opts).unwrap();
        let spec = NaSpec::new(&opts.axes(&spatial).unwrap()).unwrap();
        let inp = RefInputs {
            shape: AttnShape {
                batch: b,
                lq: l,
                lk: l,
                hq,
                hkv,
                d,
                dv: d,
            },
            q: &q,
            k: &k,
            v: &v,
            bias: None,
        };
        let r = wgpu_attention::neighborhood::reference::neighborhood_reference_with_extra(
            &inp, &spec, None, &xk, &xv,
        )
        .unwrap();
        let got = out.to_vec_f32(ctx).unwrap();
        let cmp = compare(&got, Some(&lse.to_vec_f32(ctx).unwrap()), &r, None);
        assert!(cmp.passed, "{spatial:?} seed {seed}: {cmp:?}");
        // only one of the two, or keys of the wrong shape: typed errors
        let half = opts.clone().additional_values(None);
        assert!(neighborhood_attention(ctx, &qt, &kt, &vt, &half).is_err());
        let bad = opts
            .clone()
            .additional_keys(Some(t(&xk[..b * s_add * hkv * 16], &[b, s_add, hkv, 16])));
        let e = neighborhood_attention(ctx, &qt, &kt, &vt, &bad).unwrap_err();
        assert!(matches!(e, AttnError::Shape { .. }), "{e}");
    }
}
