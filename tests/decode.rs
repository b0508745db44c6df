//! Decode (split-KV over contiguous, paged and quantized caches) and the merge of partial
//! results, against the dense f64 reference with the pages gathered on the host.

mod common;

use common::{amp_for_logit_std, ctx, for_each_case, fresh_seed, random};
use rand::{Rng, SeedableRng};
use wgpu_attention::decode::merge_reference;
use wgpu_attention::decode::reference::{decode_reference, DecodeInputs, HostCache};
use wgpu_attention::flash::reference::compare;
use wgpu_attention::*;

/// One decode problem on the host.
struct Problem {
    q: Vec<f32>,
    q_shape: [usize; 4],
    k: Vec<f32>,
    v: Vec<f32>,
    cache_shape: [usize; 4],
    dv: usize,
    table: Option<(Vec<i32>, usize)>,
    bias: Option<(Vec<f32>, [usize; 2])>,
    format: KvFormat,
    f16_q: bool,
    opts: DecodeOptions,
}

impl Problem {
    /// Runs it on the device (outputs poisoned with NaN first) and compares with the reference;
    /// returns the comparison and the plan's label.
    fn run(&self) -> (reference::Comparison, String) {
        let ctx = ctx();
        let [b, lq, hq, _] = self.q_shape;
        let q = if self.f16_q {
            let h: Vec<half::f16> = self.q.iter().map(|&x| half::f16::from_f32(x)).collect();
            Tensor::from_f16(ctx, &h, &self.q_shape).unwrap()
        } else {
            Tensor::from_f32(ctx, &self.q, &self.q_shape).unwrap()
        };
        let [n0, n1, hkv, _] = self.cache_shape;
        let k = KvCache::upload(ctx, &self.k, self.cache_shape, self.format).unwrap();
        let v = KvCache::upload(ctx, &self.v, [n0, n1, hkv, self.dv], self.format).unwrap();
        let mut opts = self.opts.clone();
        if let Some((t, mb)) = &self.table {
            opts.block_table = Some(Tensor::from_i32(ctx, t, &[b, *mb]).unwrap());
        }
        let lk = self.table.as_ref().map_or(n1, |(_, mb)| mb * n1);
        if let Some((bias, [bb, bh])) = &self.bias {
            opts.bias = Some(Tensor::from_f32(ctx, bias, &[*bb, *bh, lq, lk]).unwrap());
        }
        let dtype = if self.f16_q { DType::F16 } else { DType::F32 };
        let out = Tensor::filled(ctx, &[b, lq, hq, self.dv], dtype, f32::NAN).unwrap();
        let lse = Tensor::filled(ctx, &[b, hq, lq], DType::F32, f32::NAN).unwrap();
        let plan = decode_attention_into(ctx, &q, &k, &v, &out, Some(&lse), &opts).unwrap();
        // the reference reads what the device holds: the dequantized cache, q as rounded
        let kh = k.to_vec_f32(ctx).unwrap();
        let vh = v.to_vec_f32(ctx).unwrap();
        let qh = q.to_vec_f32(ctx).unwrap();
        let inp = DecodeInputs {
            q: &qh,
            q_shape: self.q_shape,
            k: HostCache {
                values: &kh,
                shape: self.cache_shape,
            },
            v: HostCache {
                values: &vh,
                shape: [n0, n1, hkv, self.dv],
            },
            block_table: self.table.as_ref().map(|(t, mb)| (t.as_slice(), *mb)),
            bias: self.bias.as_ref().map(|(x, s)| (x.as_slice(), *s)),
        };
        let (r, plain) = decode_reference(&inp, &self.opts, self.f16_q).unwrap();
        let got = out.to_vec_f32(ctx).unwrap();
        let got_lse = lse.to_vec_f32(ctx).unwrap();
        (
            compare(&got, Some(&got_lse), &r, plain.as_deref()),
            plan.label(),
        )
    }
}

use wgpu_attention::flash::reference;

/// A random decode problem: few queries, GQA groups, every cache layout and format, lengths
/// from 0 to the cache, the dense options in random combination, logits of standard deviation
/// 1 to 4. Head dims come from a few buckets, so the cases share specializations.
fn random_problem(seed: u64) -> Problem {
    let mut r = rand::rngs::StdRng::seed_from_u64(seed);
    let f16 = ctx().caps.f16;
    let mut formats = vec![KvFormat::F32, KvFormat::Q8_0, KvFormat::Q4_0];
    if f16 {
        formats.push(KvFormat::F16);
    }
    let format = formats[r.random_range(0..formats.len())];
    let d = if format.is_quantized() {
        [64, 96, 128][r.random_range(0..3)]
    } else {
        [40, 64, 96, 128][r.random_range(0..4)]
    };
    let dv = if r.random_bool(0.8) || format.is_quantized() {
        d
    } else {
        40
    };
    let b = r.random_range(1..=3);
    let lq = if r.random_bool(0.6) {
        1
    } else {
        r.random_range(2..=16)
    };
    let hkv = r.random_range(1..=3);
    let hq = hkv * [1, 2, 4][r.random_range(0..3)];
    let paged = r.random_bool(0.6);
    let (cache_shape, table, lk) = if paged {
        let page = [1, 3, 16, 17, 32][r.random_range(0..5)];
        let mb = r.random_range(1..=(600 / page).max(1));
        let pages = r.random_range(1..=b * mb);
        // random pages: shared between sequences and out of order
        let t: Vec<i32> = (0..b * mb)
            .map(|_| r.random_range(0..pages as i32))
            .collect();
        ([pages, page, hkv, d], Some((t, mb)), mb * page)
    } else {
        let lk = r.random_range(1..=700);
        ([b, lk, hkv, d], None, lk)
    };
    let mut opts = DecodeOptions::default().causal(r.random_bool(0.5));
    if r.random_bool(0.6) {
        opts.cache_seqlens = Some(
            (0..b)
                .map(|_| match r.random_range(0..4) {
                    0 => 0,
                    1 => lk as u32,
                    _ => r.random_range(0..=lk as u32),
                })
                .collect(),
        );
    }
    if r.random_bool(0.25) {
        let side = |r: &mut rand::rngs::StdRng| r.random_bool(0.7).then(|| r.random_range(0..200));
        opts.window = (side(&mut r), side(&mut r));
        if r.random_bool(0.5) {
            opts.sinks = r.random_range(0..70);
        }
    }
    if r.random_bool(0.2) {
        opts.softcap = Some(r.random_range(1.0..30.0));
    }
    if r.random_bool(0.2) {
        opts.alibi_slopes = Some(
            (1..=hq)
                .map(|i| 2f32.powf(-8.0 * i as f32 / hq as f32))
                .collect(),
        );
    }
    let bias = r.random_bool(0.2).then(|| {
        let bb = if r.random_bool(0.5) { 1 } else { b };
        let bh = if r.random_bool(0.5) { 1 } else { hq };
        (random(bb * bh * lq * lk, 2.0, r.random()), [bb, bh])
    });
    opts.num_splits = match r.random_range(0..4) {
        0 => Some(1),
        1 => Some(r.random_range(2..9)),
        _ => None,
    };
    let scale = 1.0 / (d as f64).sqrt();
    let amp = amp_for_logit_std(r.random_range(1.0..4.0), scale, d);
    let [n0, n1, _, _] = cache_shape;
    Problem {
        q: random(b * lq * hq * d, amp, r.random()),
        q_shape: [b, lq, hq, d],
        k: random(n0 * n1 * hkv * d, amp, r.random()),
        v: random(n0 * n1 * hkv * dv, 1.0, r.random()),
        cache_shape,
        dv,
        table,
        bias,
        format,
        f16_q: f16 && r.random_bool(0.2),
        opts,
    }
}

#[test]
fn random_cases() {
    for_each_case("decode", 16, |seed| {
        let p = random_problem(seed);
        let (c, label) = p.run();
        assert!(c.passed, "{label}: {c:?}");
        format!(
            "{label}, q {:?}, cache {:?} {}, paged {}, max rel {:.2e}",
            p.q_shape,
            p.cache_shape,
            p.format,
            p.table.is_some(),
            c.max_rel
        )
    });
}

/// 300000 keys: past lavapipe's loop limit and past what one workgroup may walk; the plan
/// splits (and raises a caller's count that is too low) instead of refusing.
#[test]
fn long_cache_is_split_not_refused() {
    let seed = fresh_seed();
    let (lk, hq, hkv, d) = (300_000, 4, 1, 64);
    let amp = amp_for_logit_std(3.0, 1.0 / 8.0, d);
    let p = Problem {
        q: random(hq * d, amp, seed),
        q_shape: [1, 1, hq, d],
        k: random(lk * hkv * d, amp, seed + 1),
        v: random(lk * hkv * d, 1.0, seed + 2),
        cache_shape: [1, lk, hkv, d],
        dv: d,
        table: None,
        bias: None,
        format: KvFormat::Q8_0,
        f16_q: false,
        opts: DecodeOptions::default(),
    };
    let (c, label) = p.run();
    assert!(c.passed, "seed {seed}, {label}: {c:?}");
    eprintln!("{label}: max rel {:.2e}", c.max_rel);
    // a caller's single split is raised to what the loop budget allows
    let shape = AttnShape {
        batch: 1,
        lq: 1,
        lk,
        hq,
        hkv,
        d,
        dv: d,
    };
    let one = DecodeOptions::default().num_splits(Some(1));
    let plan = decode::plan(ctx(), &shape, DType::F32, KvFormat::Q8_0, &one).unwrap();
    let tiles = lk.div_ceil(64) as u32;
    assert!(
        plan.splits * plan.key.tiles_per_split_max() >= tiles,
        "{plan:?}"
    );
    assert!(plan.splits >= 10, "{plan:?}");
}

/// Parts over disjoint key sets (some empty), merged, against one pass over their union.
#[test]
fn merge_matches_one_pass_over_the_union() {
    let ctx = ctx();
    for_each_case("merge", 6, |seed| {
        let mut r = rand::rngs::StdRng::seed_from_u64(seed);
        let (b, lq, hq, hkv, d) = (2, r.random_range(1..5), 4, 2, 64);
        let lk = r.random_range(1..400);
        let amp = amp_for_logit_std(r.random_range(1.0..4.0), 0.125, d);
        let q = random(b * lq * hq * d, amp, r.random());
        let k = random(b * lk * hkv * d, amp, r.random());
        let v = random(b * lk * hkv * d, 1.0, r.random());
        let nparts = r.random_range(2..=8);
        // cut points, repeats allowed: empty parts
        let mut cuts: Vec<usize> = (0..nparts - 1).map(|_| r.random_range(0..=lk)).collect();
        cuts.push(0);
        cuts.push(lk);
        cuts.sort();
        let qt = Tensor::from_f32(ctx, &q, &[b, lq, hq, d]).unwrap();
        let mut outs = Vec::new();
        for w in cuts.windows(2) {
            let n = w[1] - w[0];
            // a part's keys as a cache of its own; an empty part has length 0
            let rows = n.max(1);
            let slice = |x: &[f32]| -> Vec<f32> {
                let mut s = Vec::new();
                for bi in 0..b {
                    for j in 0..rows {
                        let jj = (w[0] + j).min(lk - 1);
                        let at = (bi * lk + jj) * hkv * d;
                        s.extend_from_slice(&x[at..at + hkv * d]);
                    }
                }
                s
            };
            let kc = KvCache::upload(ctx, &slice(&k), [b, rows, hkv, d], KvFormat::F32).unwrap();
            let vc = KvCache::upload(ctx, &slice(&v), [b, rows, hkv, d], KvFormat::F32).unwrap();
            let opts = DecodeOptions::default()
                .return_lse(true)
                .cache_seqlens(Some(vec![n as u32; b]));
            outs.push(decode_attention(ctx, &qt, &kc, &vc, &opts).unwrap());
        }
        let parts: Vec<AttentionPart> = outs
            .iter()
            .map(|o| AttentionPart {
                out: &o.out,
                lse: o.lse.as_ref().unwrap(),
            })
            .collect();
        let merged = merge_attention(ctx, &parts).unwrap();
        let inp = DecodeInputs {
            q: &q,
            q_shape: [b, lq, hq, d],
            k: HostCache {
                values: &k,
                shape: [b, lk, hkv, d],
            },
            v: HostCache {
                values: &v,
                shape: [b, lk, hkv, d],
            },
            block_table: None,
            bias: None,
        };
        let (want, _) = decode_reference(&inp, &DecodeOptions::default(), false).unwrap();
        let got = merged.out.to_vec_f32(ctx).unwrap();
        let got_lse = merged.lse.unwrap().to_vec_f32(ctx).unwrap();
        let c = compare(&got, Some(&got_lse), &want, None);
        assert!(c.passed, "cuts {cuts:?}: {c:?}");
        format!("{nparts} parts, cuts {cuts:?}, max rel {:.2e}", c.max_rel)
    });
}

/// The device merge equals the host's f64 merge, every part empty included (O = 0, LSE = -inf).
#[test]
fn merge_of_empty_parts_is_zero_and_minus_infinity() {
    let ctx = ctx();
    let seed = fresh_seed();
    let (b, l, h, dv) = (1, 3, 2, 8);
    let n = b * l * h * dv;
    let o1 = random(n, 1.0, seed);
    let o2 = random(n, 1.0, seed + 1);
    // row 0 empty in both parts, row 1 only in part 1, the rest in both
    let ninf = f32::NEG_INFINITY;
    let l1 = vec![ninf, 0.5, -1.0, 2.0, 0.0, 1.0];
    let l2 = vec![ninf, ninf, 3.0, -2.0, 0.25, 1.0];
    let t = |x: &[f32], s: &[usize]| Tensor::from_f32(ctx, x, s).unwrap();
    let (to1, to2) = (t(&o1, &[b, l, h, dv]), t(&o2, &[b, l, h, dv]));
    let (tl1, tl2) = (t(&l1, &[b, h, l]), t(&l2, &[b, h, l]));
    let parts = [
        AttentionPart {
            out: &to1,
            lse: &tl1,
        },
        AttentionPart {
            out: &to2,
            lse: &tl2,
        },
    ];
    let m = merge_attention(ctx, &parts).unwrap();
    let got = m.out.to_vec_f32(ctx).unwrap();
    let got_lse = m.lse.unwrap().to_vec_f32(ctx).unwrap();
    // host order: rows (b, h, l); O is [b, l, h, dv]
    let rows = |o: &[f32]| -> Vec<f32> {
        let mut v = Vec::new();
        for hi in 0..h {
            for li in 0..l {
                let at = (li * h + hi) * dv;
                v.extend_from_slice(&o[at..at + dv]);
            }
        }
        v
    };
    let (want, want_lse) = merge_reference(&[(&rows(&o1), &l1), (&rows(&o2), &l2)], dv);
    let got_rows = rows(&got);
    for (i, (g, w)) in got_rows.iter().zip(&want).enumerate() {
        assert!((*g as f64 - w).abs() < 1e-5, "out {i}: {g} vs {w}");
    }
    for (g, w) in got_lse.iter().zip(&want_lse) {
        assert!(
            (*g as f64 == *w) || (*g as f64 - w).abs() < 1e-5,
            "lse {g} vs {w}"
        );
    }
    assert_eq!(got_lse[0], ninf);
    assert!(got_rows[..dv].iter().all(|&x| x == 0.0));
}

#[test]
fn bad_decode_inputs_are_typed_errors() {
    let ctx = ctx();
    let q = Tensor::from_f32(ctx, &[0.0; 2 * 4 * 64], &[2, 1, 4, 64]).unwrap();
    let kc = |shape: [usize; 4], f: KvFormat| {
        KvCache::upload(ctx, &vec![0.5; shape.iter().product()], shape, f).unwrap()
    };
    let k = kc([2, 10, 2, 64], KvFormat::F32);
    let ok = DecodeOptions::default();
    let err = |o: &DecodeOptions, k: &KvCache, v: &KvCache| {
        decode_attention(ctx, &q, k, v, o).map(|_| ()).unwrap_err()
    };
    assert!(decode_attention(ctx, &q, &k, &k, &ok).is_ok());
    // lengths past the cache
    let e = err(&ok.clone().cache_seqlens(Some(vec![3, 11])), &k, &k);
    assert!(matches!(e, AttnError::Invalid { .. }), "{e}");
    // heads that do not divide
    let k3 = kc([2, 10, 3, 64], KvFormat::F32);
    assert!(matches!(err(&ok, &k3, &k3), AttnError::Shape { .. }));
    // a cache per page without a table, a table of the wrong dtype and shape
    let pages = kc([5, 16, 2, 64], KvFormat::F32);
    assert!(matches!(err(&ok, &pages, &pages), AttnError::Shape { .. }));
    let ft = Tensor::from_f32(ctx, &[0.0; 4], &[2, 2]).unwrap();
    let e = err(&ok.clone().block_table(Some(ft)), &pages, &pages);
    assert!(matches!(e, AttnError::DType { .. }), "{e}");
    let it = Tensor::from_i32(ctx, &[0; 3], &[1, 3]).unwrap();
    assert!(matches!(
        err(&ok.clone().block_table(Some(it)), &pages, &pages),
        AttnError::Shape { .. }
    ));
    // k and v in different formats; a D that is no multiple of 32 for blocks
    let kq = kc([2, 10, 2, 64], KvFormat::Q8_0);
    let e = err(&ok, &k, &kq);
    assert!(matches!(e, AttnError::Invalid { .. }), "{e}");
    let e =
        KvCache::upload(ctx, &[0.0; 2 * 10 * 2 * 40], [2, 10, 2, 40], KvFormat::Q4_0).unwrap_err();
    assert!(matches!(e, AttnError::Shape { .. }), "{e}");
    // softcap <= 0, slopes of the wrong count
    assert!(matches!(
        err(&ok.clone().softcap(Some(0.0)), &k, &k),
        AttnError::Invalid { .. }
    ));
    assert!(matches!(
        err(&ok.clone().alibi_slopes(Some(vec![1.0])), &k, &k),
        AttnError::Shape { .. }
    ));
    // merges: no parts, parts that disagree
    assert!(merge_attention(ctx, &[]).is_err());
    let o = Tensor::from_f32(ctx, &[0.0; 8], &[1, 1, 1, 8]).unwrap();
    let o2 = Tensor::from_f32(ctx, &[0.0; 16], &[1, 2, 1, 8]).unwrap();
    let l = Tensor::from_f32(ctx, &[0.0], &[1, 1, 1]).unwrap();
    let e = merge_attention(
        ctx,
        &[
            AttentionPart { out: &o, lse: &l },
            AttentionPart { out: &o2, lse: &l },
        ],
    )
    .unwrap_err();
    assert!(matches!(e, AttnError::Shape { .. }), "{e}");
}

/// New tokens appended in place (crossing pages, into every format), then attended over in
/// the same call; the rows around them untouched; a sequence without room refused before
/// anything is written.
#[test]
fn append_then_attend() {
    let ctx = ctx();
    for_each_case("decode append", 6, |seed| {
        let mut r = rand::rngs::StdRng::seed_from_u64(seed);
        let mut formats = vec![KvFormat::F32, KvFormat::Q8_0, KvFormat::Q4_0];
        if ctx.caps.f16 {
            formats.push(KvFormat::F16);
        }
        let format = formats[r.random_range(0..formats.len())];
        let (b, hq, hkv, d) = (2, 4, 2, 64);
        let page = [3, 16, 17][r.random_range(0..3)];
        let mb = 40usize.div_ceil(page) + 1;
        let pages = b * mb;
        // every sequence its own pages, in a shuffled order
        let mut order: Vec<i32> = (0..pages as i32).collect();
        for i in (1..order.len()).rev() {
            order.swap(i, r.random_range(0..=i));
        }
        let cap = mb * page;
        let s_new = r.random_range(1..=5);
        let lens: Vec<u32> = (0..b)
            .map(|_| r.random_range(0..=(cap - s_new) as u32))
            .collect();
        let amp = amp_for_logit_std(r.random_range(1.0..4.0), 0.125, d);
        let shape = [pages, page, hkv, d];
        let n = pages * page * hkv * d;
        let k = KvCache::upload(ctx, &random(n, amp, r.random()), shape, format).unwrap();
        let v = KvCache::upload(ctx, &random(n, 1.0, r.random()), shape, format).unwrap();
        let kn_host = random(b * s_new * hkv * d, amp, r.random());
        let vn_host = random(b * s_new * hkv * d, 1.0, r.random());
        let q_host = random(b * hq * d, amp, r.random());
        let kb = k.to_vec_f32(ctx).unwrap();
        let t = |x: &[f32]| Tensor::from_f32(ctx, x, &[b, s_new, hkv, d]).unwrap();
        let table = Tensor::from_i32(ctx, &order, &[b, mb]).unwrap();
        let q = Tensor::from_f32(ctx, &q_host, &[b, 1, hq, d]).unwrap();
        let opts = DecodeOptions::default()
            .causal(true)
            .block_table(Some(table))
            .cache_seqlens(Some(lens.clone()))
            .k_new(Some(t(&kn_host)))
            .v_new(Some(t(&vn_host)))
            .return_lse(true);
        // no room: refused, nothing written
        let mut full = lens.clone();
        full[1] = (cap - s_new + 1) as u32;
        let e =
            decode_attention(ctx, &q, &k, &v, &opts.clone().cache_seqlens(Some(full))).unwrap_err();
        assert!(matches!(e, AttnError::Limit { .. }), "{e}");
        assert_eq!(k.to_vec_f32(ctx).unwrap(), kb, "a refused append wrote");
        let res = decode_attention(ctx, &q, &k, &v, &opts).unwrap();
        let ka = k.to_vec_f32(ctx).unwrap();
        let va = v.to_vec_f32(ctx).unwrap();
        // the new rows hold the new tokens (as the format stores them), the others are as before
        let row = hkv * d;
        let step = |x: &[f32]| match format {
            KvFormat::F32 => 0.0,
            KvFormat::F16 => x.iter().fold(0.0f32, |m, v| m.max(v.abs())) / 1024.0,
            KvFormat::Q8_0 => x.iter().fold(0.0f32, |m, v| m.max(v.abs())) / 127.0,
            _ => x.iter().fold(0.0f32, |m, v| m.max(v.abs())) / 8.0,
        };
        let mut written = vec![false; pages * page];
        for bi in 0..b {
            for s in 0..s_new {
                let j = lens[bi] as usize + s;
                let at = order[bi * mb + j / page] as usize * page + j % page;
                written[at] = true;
                let src = &kn_host[(bi * s_new + s) * row..][..row];
                for (c, blk) in src.chunks(32).enumerate() {
                    let tol = step(blk) * 1.01 + 1e-6;
                    for (i, &x) in blk.iter().enumerate() {
                        let got = ka[at * row + c * 32 + i];
                        assert!((got - x).abs() <= tol, "{format} row {at}: {x} -> {got}");
                    }
                }
            }
        }
        for (at, &w) in written.iter().enumerate() {
            if !w {
                assert_eq!(
                    ka[at * row..][..row],
                    kb[at * row..][..row],
                    "row {at} changed"
                );
            }
        }
        let grown: Vec<u32> = lens.iter().map(|&l| l + s_new as u32).collect();
        let ref_opts = DecodeOptions::default()
            .causal(true)
            .cache_seqlens(Some(grown));
        let inp = DecodeInputs {
            q: &q_host,
            q_shape: [b, 1, hq, d],
            k: HostCache { values: &ka, shape },
            v: HostCache { values: &va, shape },
            block_table: Some((&order, mb)),
            bias: None,
        };
        let (want, _) = decode_reference(&inp, &ref_opts, false).unwrap();
        let got = res.out.to_vec_f32(ctx).unwrap();
        let got_lse = res.lse.unwrap().to_vec_f32(ctx).unwrap();
        let c = compare(&got, Some(&got_lse), &want, None);
        assert!(c.passed, "{c:?}");
        format!(
            "{format}, page {page}, lens {lens:?} + {s_new}, max rel {:.2e}",
            c.max_rel
        )
    });
}

/// The page pool's tables drive the kernel: sequences grown token by token across pages,
/// StreamingLLM eviction, against the reference over the pages the pool kept.
#[test]
fn page_pool_drives_decode() {
    let ctx = ctx();
    let seed = fresh_seed();
    let (pages, page, hkv, hq, d) = (12, 16, 1, 2, 32);
    let mut pool = PagePool::new(pages, page, 8).unwrap();
    let a = pool.add_sequence();
    let b = pool.add_sequence();
    pool.append(a, 70).unwrap();
    pool.append(b, 33).unwrap();
    let kh = random(pages * page * hkv * d, 1.5, seed);
    let vh = random(pages * page * hkv * d, 1.0, seed + 1);
    let shape = [pages, page, hkv, d];
    let k = KvCache::upload(ctx, &kh, shape, KvFormat::F32).unwrap();
    let v = KvCache::upload(ctx, &vh, shape, KvFormat::F32).unwrap();
    let qh = random(2 * hq * d, 1.5, seed + 2);
    let q = Tensor::from_f32(ctx, &qh, &[2, 1, hq, d]).unwrap();
    for step in 0..2 {
        if step == 1 {
            let gone = pool.evict_streaming(a, 4, 20).unwrap();
            assert_eq!(
                gone.len(),
                2,
                "70 tokens, sinks in page 0, window from token 50"
            );
        }
        let (table, lens) = pool.tables();
        let opts = DecodeOptions::default()
            .block_table(Some(Tensor::from_i32(ctx, &table, &[2, 8]).unwrap()))
            .cache_seqlens(Some(lens.clone()))
            .return_lse(true);
        let res = decode_attention(ctx, &q, &k, &v, &opts).unwrap();
        let inp = DecodeInputs {
            q: &qh,
            q_shape: [2, 1, hq, d],
            k: HostCache { values: &kh, shape },
            v: HostCache { values: &vh, shape },
            block_table: Some((&table, 8)),
            bias: None,
        };
        let (want, _) = decode_reference(&inp, &opts, false).unwrap();
        let got = res.out.to_vec_f32(ctx).unwrap();
        let c = compare(
            &got,
            Some(&res.lse.unwrap().to_vec_f32(ctx).unwrap()),
            &want,
            None,
        );
        assert!(c.passed, "seed {seed}, step {step}, lens {lens:?}: {c:?}");
    }
}
