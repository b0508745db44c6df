//! Sparse attention's first GPU piece: WGSL `mask_mod` / `score_mod` snippets checked by naga,
//! and `create_block_mask` evaluating a snippet on the GPU, against the host builder's block
//! mask from the same mask written in Rust.

mod common;
use common::*;
use rand::{Rng, SeedableRng};
use wgpu_attention::sparse::snippet::{
    create_block_mask, eval_snippet, Aux, Snippet, SnippetKind, EXAMPLES, SCORE_EXAMPLES,
};
use wgpu_attention::sparse::{masks, BlockLayout, BlockMask, MaskMod};

fn layout(batch: usize, heads: usize, lq: usize, lk: usize, bq: usize, bk: usize) -> BlockLayout {
    BlockLayout {
        batch,
        heads,
        lq,
        lk,
        q_block: bq,
        kv_block: bk,
    }
}

/// The GPU's block mask for `src` equals the host builder's for `twin`.
fn same_mask(src: &str, aux: &[Aux], twin: &MaskMod, l: BlockLayout) {
    let snippet = Snippet::new(SnippetKind::MaskMod, src, aux).unwrap();
    let gpu = create_block_mask(ctx(), &snippet, aux, l).unwrap();
    let host = BlockMask::from_mask_mod(twin, l).unwrap();
    assert_eq!(gpu, host, "{} on {l:?}", twin.name);
    // the test could fail: the mask has skipped or partial blocks where it should
    assert!(gpu.visited_blocks() > 0, "{l:?}");
}

#[test]
fn shipped_examples_equal_their_rust_twins() {
    let (lq, lk) = (113, 200);
    for (bq, bk) in [(16, 32), (64, 128), (256, 16)] {
        let l = layout(1, 1, lq, lk, bq, bk);
        // causal, bottom-right aligned
        let src = EXAMPLES[0].1;
        same_mask(
            src,
            &[Aux::I32(vec![lk as i32 - lq as i32])],
            &masks::causal(lq, lk),
            l,
        );
        // prefix-LM with a prefix of 40
        let prefix = 40usize;
        let twin = MaskMod::new("prefix", move |_, _, q, k| k < prefix || k <= q);
        same_mask(EXAMPLES[2].1, &[Aux::U32(vec![prefix as u32])], &twin, l);
    }
    // document masking, self-attention over 4 documents
    let offsets = [0usize, 17, 90, 91, 150];
    let ids = masks::document_ids(&offsets, 150);
    for (bq, bk) in [(16, 16), (32, 64)] {
        same_mask(
            EXAMPLES[1].1,
            &[Aux::U32(ids.clone())],
            &masks::document(ids.clone(), ids.clone()),
            layout(1, 1, 150, 150, bq, bk),
        );
    }
}

/// Every builder's WGSL twin ([`MaskMod::snippet`]) decides every pair as the builder's
/// closure does (evaluated elementwise on the GPU, per batch and head), and makes the same
/// block mask on the GPU as the closure on the host, at awkward lengths and block sizes.
#[test]
fn builders_wgsl_twins_equal_their_closures() {
    let docs = masks::document_ids(&[0, 17, 90, 91, 150], 150);
    let mut checked = 0;
    for (lq, lk) in [(150, 150), (37, 150), (150, 113)] {
        let mut masks = vec![
            masks::causal(lq, lk),
            masks::sliding_window(lq, lk, Some(20), Some(3)),
            masks::sliding_window(lq, lk, None, Some(0)),
            masks::sliding_window(lq, lk, Some(5), None),
            masks::prefix_lm(lq, lk, 40),
            masks::global_tokens(vec![0, 64, 149])
                .unwrap()
                .or(&masks::sliding_window(lq, lk, Some(8), Some(8))),
            masks::document(docs[..lq].to_vec(), docs[..lk].to_vec()).and(&masks::causal(lq, lk)),
            masks::strided(lq, lk, 7).unwrap(),
            masks::fixed(lq, lk, 16, 3).unwrap(),
            masks::bigbird(lq, lk, 16, 1, 1, 2, 7).unwrap(),
            masks::bigbird(lq, lk, 32, 0, 0, 0, 7)
                .unwrap()
                .and(&masks::causal(lq, lk)),
        ];
        if lq == lk {
            masks.push(masks::longlora_shifted(lq, 4, 32, true).unwrap());
            masks.push(masks::longlora_shifted(lq, 4, 50, false).unwrap());
        }
        if lq == 150 && lk == 150 {
            // a 10 x 15 token grid
            masks.push(masks::maxvit_block(10, 15, 5).unwrap());
            masks.push(masks::maxvit_grid(10, 15, 5).unwrap());
        }
        for m in &masks {
            let (sn, aux) = m.snippet().unwrap_or_else(|e| panic!("{m:?}: {e}"));
            let heads = if m.name.starts_with("longlora") { 4 } else { 1 };
            for h in 0..heads {
                let got = eval_snippet(ctx(), &sn, &aux, (0, h), 0..lq, 0..lk, None).unwrap();
                for (e, &g) in got.iter().enumerate() {
                    let (q, k) = (e / lk, e % lk);
                    assert_eq!(g == 1.0, m.eval(0, h, q, k), "{m:?} h{h} q{q} k{k}");
                }
            }
            let l = layout(1, heads, lq, lk, 16, 32);
            let gpu = create_block_mask(ctx(), &sn, &aux, l).unwrap();
            assert_eq!(gpu, BlockMask::from_mask_mod(m, l).unwrap(), "{m:?}");
            checked += 1;
        }
    }
    assert_eq!(checked, 3 * 11 + 2 + 2);
    // the samples naga checks in tests/naga.rs all have their twin
    let samples = masks::samples();
    assert_eq!(samples.len(), 11);
    for (m, ..) in &samples {
        assert!(m.snippet().is_ok(), "{m:?}");
    }
    // a closure has no twin, and a combination past four aux buffers is refused
    let own = MaskMod::new("own", |_, _, q, k| k <= q);
    assert!(matches!(own.snippet(), Err(AttnError::Invalid { .. })));
    let d = masks::document(docs.clone(), docs.clone());
    let err = d.and(&d).and(&d).snippet().unwrap_err().to_string();
    assert!(err.contains("at most 4"), "{err}");
}

/// Every builder's mask through the kernel ([`SparseOptions::from_mask_mod`], blocks of 16 x
/// 32 so most masks have full, partial and skipped blocks): the block mask made from its twin,
/// the twin evaluated on partial blocks, against the f64 reference; a combination on every
/// strategy; and a block mask with partial blocks but no mask_mod to evaluate there is refused.
#[test]
fn builders_through_the_kernel() {
    for (m, lq, lk, heads) in masks::samples() {
        let sp = SparseOptions::from_mask_mod(&m, Some((16, 32))).unwrap();
        let mut case = Case::new(1, lq, lk, heads, 1, 16, 16);
        case.amp = amp_for_logit_std(3.0, 1.0 / 4.0, 16);
        assert_sparse(&case, &sp, &format!("{m:?}"));
    }
    let (lq, lk) = (113, 150);
    let docs = masks::document_ids(&[0, 17, 90, 91, 150], 150);
    let m = masks::document(docs[..lq].to_vec(), docs.clone())
        .and(&masks::causal(lq, lk))
        .or(&masks::sinks(3));
    let sp = SparseOptions::from_mask_mod(&m, Some(BLOCKS[1])).unwrap();
    for st in snippet_strategies() {
        let mut case = Case::new(1, lq, lk, 2, 1, 16, 16);
        case.opts.strategy = st;
        assert_sparse(&case, &sp, &format!("{m:?} {st:?}"));
    }
    let host = BlockMask::from_mask_mod(&m, layout(1, 1, lq, lk, 32, 32)).unwrap();
    assert!(host.partial().iter().any(|p| !p.is_empty()));
    let q = Tensor::from_f32(ctx(), &vec![0.5; lq * 2 * 64], &[1, lq, 2, 64]).unwrap();
    let kv = Tensor::from_f32(ctx(), &vec![0.5; lk * 64], &[1, lk, 1, 64]).unwrap();
    let Err(err) = sparse_attention(ctx(), &q, &kv, &kv, &sparse_with(host)) else {
        panic!("partial blocks without a mask_mod ran");
    };
    assert!(
        err.to_string()
            .contains("partial blocks only with a mask_mod"),
        "{err}"
    );
}

/// Per batch and head (`b`, `h` reach the snippet), and an f32 aux buffer.
#[test]
fn batch_head_and_f32_aux() {
    let src = "fn mask_mod(b: u32, h: u32, q_idx: u32, kv_idx: u32) -> bool {
    // a window whose width comes from a per-head table
    let d = f32(q_idx) - f32(kv_idx);
    return d >= 0.0 && d < aux0[h] + f32(b);
}";
    let widths = vec![5.0f32, 40.0, 77.5];
    let w2 = widths.clone();
    let twin = MaskMod::new("window per head", move |b, h, q, k| {
        let d = q as f32 - k as f32;
        d >= 0.0 && d < w2[h] + b as f32
    });
    same_mask(
        src,
        &[Aux::F32(widths)],
        &twin,
        layout(2, 3, 130, 130, 16, 32),
    );
}

/// Random layouts and a random modular pattern; the seed is printed on failure.
#[test]
fn random_layouts() {
    let cases = std::env::var("WGPU_ATTENTION_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(6usize);
    for _ in 0..cases {
        let seed = fresh_seed();
        let mut r = rand::rngs::StdRng::seed_from_u64(seed);
        let pick = |r: &mut rand::rngs::StdRng| 16 * r.random_range(1..=16usize);
        let l = layout(
            r.random_range(1..=2),
            r.random_range(1..=2),
            r.random_range(1..=300),
            r.random_range(1..=300),
            pick(&mut r),
            pick(&mut r),
        );
        let m = r.random_range(2..=7u32);
        let src = format!(
            "fn mask_mod(b: u32, h: u32, q_idx: u32, kv_idx: u32) -> bool {{
    return (q_idx / 7u + kv_idx / 5u + b + h) % {m}u != 0u;
}}"
        );
        let twin = MaskMod::new("random pattern", move |b, h, q, k| {
            (q / 7 + k / 5 + b + h) % m as usize != 0
        });
        let snippet = Snippet::new(SnippetKind::MaskMod, &src, &[]).unwrap();
        let gpu = create_block_mask(ctx(), &snippet, &[], l).unwrap();
        let host = BlockMask::from_mask_mod(&twin, l).unwrap();
        assert_eq!(gpu, host, "seed {seed}: {l:?}, m = {m}");
    }
}

/// What a snippet may not do, and naga's errors pointing at the snippet's own line.
#[test]
fn bad_snippets_are_refused_with_their_line() {
    let refused = [
        (
            "@group(0) @binding(0) var<storage> x: array<f32>;\nfn mask_mod(b: u32, h: u32, q_idx: u32, kv_idx: u32) -> bool { return true; }",
            "line 1",
        ),
        (
            "enable f16;\nfn mask_mod(b: u32, h: u32, q_idx: u32, kv_idx: u32) -> bool { return true; }",
            "`enable` at line 1",
        ),
        (
            "fn mask_mod(b: u32, h: u32, q_idx: u32, kv_idx: u32) -> bool { return true; }\n\n@compute @workgroup_size(1) fn main() {}",
            "line 3",
        ),
        // a syntax error on the snippet's second line
        (
            "fn mask_mod(b: u32, h: u32, q_idx: u32, kv_idx: u32) -> bool {\n    return q_idx <= ;\n}",
            "line 2 of the snippet",
        ),
        // a type error on the third line
        (
            "fn mask_mod(b: u32, h: u32, q_idx: u32, kv_idx: u32) -> bool {\n    let x = 1.0;\n    return x + q_idx;\n}",
            "of the snippet",
        ),
        // wrong signature, and no function at all
        (
            "fn mask_mod(q_idx: u32, kv_idx: u32) -> bool { return true; }",
            "must define",
        ),
        ("const X: u32 = 3u;", "must define"),
        // an aux buffer it was not given
        (
            "fn mask_mod(b: u32, h: u32, q_idx: u32, kv_idx: u32) -> bool { return aux0[0] > 0u; }",
            "of the snippet",
        ),
    ];
    for (src, want) in refused {
        let err = Snippet::new(SnippetKind::MaskMod, src, &[]).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains(want), "{src:?}: wanted {want:?} in: {msg}");
        assert!(msg.contains("mask_mod"), "{msg}");
    }
    // a comment may mention what code may not
    let ok = "// not @group(0)\nfn mask_mod(b: u32, h: u32, q_idx: u32, kv_idx: u32) -> bool { /* enable */ return true; }";
    Snippet::new(SnippetKind::MaskMod, ok, &[]).unwrap();
    // score_mod's signature
    let sm = "fn score_mod(score: f32, b: u32, h: u32, q_idx: u32, kv_idx: u32) -> f32 { return score * 0.5; }";
    Snippet::new(SnippetKind::ScoreMod, sm, &[]).unwrap();
    let err = Snippet::new(SnippetKind::ScoreMod, EXAMPLES[0].1, &[Aux::I32(vec![0])])
        .unwrap_err()
        .to_string();
    assert!(err.contains("score_mod"), "{err}");
    // five aux buffers; aux buffers other than the checked ones; a score_mod for a mask
    let five = vec![Aux::U32(vec![1]); 5];
    assert!(Snippet::new(SnippetKind::MaskMod, EXAMPLES[1].1, &five).is_err());
    let s = Snippet::new(SnippetKind::MaskMod, EXAMPLES[1].1, &[Aux::U32(vec![0; 8])]).unwrap();
    let l = layout(1, 1, 8, 8, 16, 16);
    let err = create_block_mask(ctx(), &s, &[Aux::F32(vec![0.0; 8])], l).unwrap_err();
    assert!(err.to_string().contains("aux"), "{err}");
    let err = create_block_mask(ctx(), &s, &[Aux::U32(vec![])], l).unwrap_err();
    assert!(err.to_string().contains("aux0"), "{err}");
    let bad_block = layout(1, 1, 8, 8, 24, 16);
    let err = create_block_mask(ctx(), &s, &[Aux::U32(vec![0; 8])], bad_block).unwrap_err();
    assert!(err.to_string().contains("multiple of 16"), "{err}");
    let sm = Snippet::new(SnippetKind::ScoreMod, sm, &[]).unwrap();
    assert!(create_block_mask(ctx(), &sm, &[], l).is_err());
}

/// The classification itself, spelled out (the GPU and host paths share it): causal over
/// 64 x 64 in blocks of 16 has the blocks left of the diagonal full and the diagonal partial;
/// at Lq = Lk = 56 the last row of blocks is cut by Lq, so nothing in it is full.
#[test]
fn causal_blocks_spelled_out() {
    let s = Snippet::new(SnippetKind::MaskMod, EXAMPLES[0].1, &[Aux::I32(vec![0])]).unwrap();
    let bm = create_block_mask(
        ctx(),
        &s,
        &[Aux::I32(vec![0])],
        layout(1, 1, 64, 64, 16, 16),
    )
    .unwrap();
    for i in 0..4u32 {
        assert_eq!(bm.full()[i as usize], (0..i).collect::<Vec<_>>(), "row {i}");
        assert_eq!(bm.partial()[i as usize], vec![i], "row {i}");
    }
    let bm = create_block_mask(
        ctx(),
        &s,
        &[Aux::I32(vec![0])],
        layout(1, 1, 56, 56, 16, 16),
    )
    .unwrap();
    assert_eq!(bm.full()[3], Vec::<u32>::new());
    assert_eq!(bm.partial()[3], vec![0, 1, 2, 3]);
    assert_eq!(bm.full()[2], vec![0, 1]);
}

/// The reference's evaluator: mask_mods at every pair of a rectangle equal their Rust twins.
#[test]
fn evaluator_masks_equal_their_twins() {
    let (lq, lk) = (60, 100);
    let causal = Snippet::new(SnippetKind::MaskMod, EXAMPLES[0].1, &[Aux::I32(vec![40])]).unwrap();
    let twin = masks::causal(lq, lk);
    let (q, k) = (3..50, 10..90);
    let got = eval_snippet(
        ctx(),
        &causal,
        &[Aux::I32(vec![40])],
        (0, 0),
        q.clone(),
        k.clone(),
        None,
    )
    .unwrap();
    let want: Vec<f32> = q
        .clone()
        .flat_map(|i| k.clone().map(move |j| (i, j)))
        .map(|(i, j)| if twin.eval(0, 0, i, j) { 1.0 } else { 0.0 })
        .collect();
    assert_eq!(got, want);
    assert!(want.contains(&0.0) && want.contains(&1.0));
}

/// The shipped score_mods against the same maths in f64 (scores with standard deviation 3).
#[test]
fn evaluator_score_mods_match_f64() {
    let seed = fresh_seed();
    let mut r = rand::rngs::StdRng::seed_from_u64(seed);
    let (lq, lk, heads) = (37, 150, 3);
    let (q, k) = (0..lq, 0..lk);
    let n = lq * lk;
    let scores: Vec<f32> = (0..n).map(|_| 3.0 * r.random_range(-1.7f32..1.7)).collect();
    let slopes: Vec<f32> = (0..heads).map(|h| 0.5f32.powi(h as i32 + 1)).collect();
    let table: Vec<f32> = (0..129).map(|_| r.random_range(-1.0f32..1.0)).collect();
    let temp: Vec<f32> = (0..lq).map(|_| r.random_range(0.2f32..2.0)).collect();
    let qe: Vec<f32> = (0..lq * 4).map(|_| r.random_range(-1.0f32..1.0)).collect();
    let ke: Vec<f32> = (0..lk * 4).map(|_| r.random_range(-1.0f32..1.0)).collect();
    type Ref<'a> = Box<dyn Fn(f64, usize, usize, usize) -> f64 + 'a>;
    let cases: Vec<(Vec<Aux>, Ref)> = vec![
        (vec![], Box::new(|s, _, _, _| 30.0 * (s / 30.0).tanh())),
        (
            vec![Aux::F32(slopes.clone())],
            Box::new(|s, h, i, j| s - slopes[h] as f64 * (i as f64 - j as f64).abs()),
        ),
        (
            vec![Aux::F32(table.clone())],
            Box::new(|s, _, i, j| {
                s + table[((j as i64 - i as i64).clamp(-64, 64) + 64) as usize] as f64
            }),
        ),
        (
            vec![Aux::F32(temp.clone())],
            Box::new(|s, _, i, _| s * temp[i] as f64),
        ),
        (
            vec![Aux::F32(qe.clone()), Aux::F32(ke.clone())],
            Box::new(|s, _, i, j| {
                s + (0..4)
                    .map(|c| qe[i * 4 + c] as f64 * ke[j * 4 + c] as f64)
                    .sum::<f64>()
            }),
        ),
    ];
    for ((name, src, _), (aux, reference)) in SCORE_EXAMPLES.iter().zip(cases) {
        let snippet = Snippet::new(SnippetKind::ScoreMod, src, &aux).unwrap();
        for h in 0..heads {
            let got = eval_snippet(
                ctx(),
                &snippet,
                &aux,
                (0, h),
                q.clone(),
                k.clone(),
                Some(&scores),
            )
            .unwrap();
            for (e, (&g, &s)) in got.iter().zip(&scores).enumerate() {
                let want = reference(s as f64, h, e / lk, e % lk);
                // f32 arithmetic on a handful of terms: a few ulps of the largest
                let tol = 4e-6 * (1.0 + want.abs());
                assert!(
                    (g as f64 - want).abs() <= tol,
                    "seed {seed}: {name}, head {h}, pair {e}: {g} against {want}"
                );
            }
        }
    }
}

// ---- sparse attention: the kernels against the f64 reference ----

use std::sync::Arc;
use wgpu_attention::sparse::attention::{sparse_attention, Normalizer, SparseOptions};
use wgpu_attention::{flash_attention, AttnError, DType, FlashOptions, StrategyChoice, Tensor};

/// A random dense block mask of `density` over `l` (seeded), as FlexAttention's
/// `BlockMask.from_kv_blocks` with every block full.
fn random_blocks(l: BlockLayout, density: f64, seed: u64) -> BlockMask {
    // printed, so a failing test's output names the mask it ran with
    eprintln!("random block mask: seed {seed}, density {density:.2}, {l:?}");
    let mut r = rand::rngs::StdRng::seed_from_u64(seed);
    let (nq, nk) = l.blocks();
    let on: Vec<bool> = (0..l.batch * l.heads * nq * nk)
        .map(|_| r.random_bool(density))
        .collect();
    BlockMask::from_dense(&on, l).unwrap()
}

fn sparse_with(mask: BlockMask) -> SparseOptions {
    SparseOptions::default().block_mask(Some(Arc::new(mask)))
}

fn assert_sparse(case: &Case, sp: &SparseOptions, what: &str) {
    let seed = fresh_seed();
    let c = run_sparse(case, seed, sp);
    assert!(c.passed, "{what}: {case:?} seed {seed}: {c:?}");
}

/// The strategies a snippet's geometry is tested on: the one the plan picks on this adapter,
/// or every one under `WGPU_ATTENTION_EXHAUSTIVE=1`. Each snippet is a kernel of its own, and
/// SwiftShader (no shader cache) compiles each for seconds; the plain geometry runs on every
/// strategy in the other tests.
fn snippet_strategies() -> Vec<StrategyChoice> {
    if exhaustive() {
        return strategies()
            .into_iter()
            .map(StrategyChoice::Force)
            .collect();
    }
    eprintln!("snippets run on the planned strategy only (WGPU_ATTENTION_EXHAUSTIVE=1: all)");
    vec![StrategyChoice::Auto]
}

/// Block sizes of the fixed tests: the random cases draw from the same, so that they run
/// through kernels the fixed tests compile anyway.
const BLOCKS: [(usize, usize); 2] = [(16, 16), (64, 32)];

/// Random block masks at densities 0 (every row empty: O = 0, LSE = -inf), 5%, 50% and 100%,
/// batch and head lists broadcast or not, on every strategy.
#[test]
fn block_masks_at_densities() {
    for st in strategies() {
        for (i, &(density, (bq, bk), lb, lh)) in [
            (0.0, BLOCKS[0], 1, 1),
            (0.05, BLOCKS[0], 2, 3),
            (0.5, BLOCKS[1], 1, 3),
            (1.0, BLOCKS[1], 2, 1),
        ]
        .iter()
        .enumerate()
        {
            let case = Case::new(2, 113, 200, 3, 1, 16, 16).strategy(st);
            let l = layout(lb, lh, 113, 200, bq, bk);
            let mask = random_blocks(l, density, fresh_seed());
            assert_sparse(
                &case,
                &sparse_with(mask),
                &format!("density {density} #{i} {st:?}"),
            );
        }
    }
}

/// Causal and a window with sinks on top of a block mask, lengths per batch, GQA, Lq = 1,
/// and D = 40 with Dv = 96 on the planned strategy.
#[test]
fn block_masks_compose_with_the_dense_options() {
    for st in strategies() {
        let case = Case::new(2, 100, 160, 4, 2, 16, 16).strategy(st).with(|o| {
            o.causal = true;
            o.window = (Some(50), None);
            o.sinks = 3;
            o.kv_lens = Some(vec![160, 97]);
        });
        let (bq, bk) = BLOCKS[1];
        let mask = random_blocks(layout(1, 4, 100, 160, bq, bk), 0.6, fresh_seed());
        assert_sparse(&case, &sparse_with(mask), &format!("composed {st:?}"));
        let one = Case::new(1, 1, 1000, 2, 2, 16, 16).strategy(st);
        let mask = random_blocks(layout(1, 1, 1, 1000, bq, bk), 0.5, fresh_seed());
        assert_sparse(&one, &sparse_with(mask), &format!("Lq = 1 {st:?}"));
    }
    let (bq, bk) = BLOCKS[1];
    let odd = Case::new(1, 90, 70, 2, 1, 40, 96).with(|o| o.q_lens = Some(vec![77]));
    let mask = random_blocks(layout(1, 2, 90, 70, bq, bk), 0.7, fresh_seed());
    assert_sparse(&odd, &sparse_with(mask), "D = 40, Dv = 96");
}

/// The shipped mask_mods through the kernel (the block mask made on the GPU from the snippet,
/// the snippet evaluated on partial blocks).
#[test]
fn mask_mod_snippets_through_the_kernel() {
    let (lq, lk) = (113, 150);
    let offsets = [0usize, 17, 90, 91, 150];
    let ids = masks::document_ids(&offsets, 150);
    let cases: Vec<(&str, Vec<Aux>)> = vec![
        (EXAMPLES[0].1, vec![Aux::I32(vec![lk as i32 - lq as i32])]),
        (EXAMPLES[1].1, vec![Aux::U32(ids)]),
        (EXAMPLES[2].1, vec![Aux::U32(vec![40])]),
    ];
    for st in snippet_strategies() {
        for (src, aux) in &cases {
            let sp = SparseOptions::default()
                .mask_mod(Some(Snippet::new(SnippetKind::MaskMod, src, aux).unwrap()))
                .aux(aux.clone())
                .block_size(Some(BLOCKS[1]));
            let mut case = Case::new(1, lq, lk, 2, 1, 16, 16);
            case.opts.strategy = st;
            assert_sparse(&case, &sp, src);
        }
    }
}

/// The shipped score_mods against the reference (which runs the snippet on f64 scores rounded
/// to f32), every block full, with the built-in causal mask on.
#[test]
fn score_mod_snippets_through_the_kernel() {
    let (lq, lk) = (70, 90);
    for (i, (name, src, types)) in SCORE_EXAMPLES.iter().enumerate() {
        let aux: Vec<Aux> = match i {
            1 => vec![Aux::F32(vec![0.25, 0.0625])],
            2 => vec![Aux::F32(random(129, 1.0, fresh_seed()))],
            3 => vec![Aux::F32(
                random(lq, 2.0, fresh_seed())
                    .iter()
                    .map(|x| x.abs())
                    .collect(),
            )],
            4 => vec![
                Aux::F32(random(lq * 4, 1.0, fresh_seed())),
                Aux::F32(random(lk * 4, 1.0, fresh_seed())),
            ],
            _ => vec![],
        };
        assert_eq!(aux.len(), types.len(), "{name}");
        let sp = SparseOptions::default()
            .score_mod(Some(
                Snippet::new(SnippetKind::ScoreMod, src, &aux).unwrap(),
            ))
            .aux(aux)
            .block_size(Some(BLOCKS[1]));
        for st in snippet_strategies() {
            let mut case = Case::new(1, lq, lk, 2, 2, 16, 16).with(|o| o.causal = true);
            case.opts.strategy = st;
            assert_sparse(&case, &sp, name);
        }
    }
}

/// Sigmoid attention (FlashSigmoid): each visible key's weight is `sigmoid(s + bias)`, no row
/// sum. With the default bias `-ln(Lk)` and a given one, a block mask under causal + window +
/// sinks + lengths + GQA on every strategy; a score_mod and f16 on the planned strategy.
#[test]
fn sigmoid_normalizer() {
    let (bq, bk) = BLOCKS[1];
    for st in strategies() {
        for bias in [None, Some(1.5)] {
            let case = Case::new(2, 100, 160, 4, 2, 16, 16).strategy(st).with(|o| {
                o.causal = true;
                o.window = (Some(70), None);
                o.sinks = 2;
                o.kv_lens = Some(vec![160, 97]);
            });
            let mask = random_blocks(layout(1, 4, 100, 160, bq, bk), 0.6, fresh_seed());
            let sp = sparse_with(mask).normalizer(Normalizer::Sigmoid { bias });
            assert_sparse(&case, &sp, &format!("sigmoid bias {bias:?} {st:?}"));
        }
    }
    let sp = SparseOptions::default()
        .normalizer(Normalizer::Sigmoid { bias: None })
        .score_mod(Some(
            Snippet::new(SnippetKind::ScoreMod, SCORE_EXAMPLES[0].1, &[]).unwrap(),
        ))
        .block_size(Some(BLOCKS[1]));
    let case = Case::new(1, 113, 90, 2, 1, 16, 16);
    assert_sparse(&case, &sp, "sigmoid with a score_mod");
    let mut f16 = Case::new(1, 113, 200, 2, 2, 16, 16).with(|o| o.causal = true);
    f16.dtype = DType::F16;
    if ctx().caps.f16 {
        let sp = SparseOptions::default().normalizer(Normalizer::Sigmoid { bias: None });
        assert_sparse(&f16, &sp, "sigmoid f16");
    } else {
        eprintln!("sigmoid f16 skipped: this adapter has no SHADER_F16");
    }
}

/// Top-k routing (MoBA/NSA-style): the GPU's selection against the f64 routing (block means
/// of the inputs in f64), allowing only swaps between blocks whose f64 scores tie within f32
/// rounding; the lists ascending and padded with -1; then attention over the selection against
/// the reference. Causal with lengths and GQA, and non-causal with Lq != Lk.
#[test]
fn topk_routing() {
    use wgpu_attention::flash::reference::RefInputs;
    use wgpu_attention::sparse::attention::block_tables;
    use wgpu_attention::sparse::routing::{
        encode_route, reference_scores, route_blocks, route_reference, TopK,
    };
    let c = ctx();
    for (i, (causal, lq, lk, topk)) in [
        (
            true,
            200,
            200,
            TopK {
                k: 2,
                block: 32,
                local: 1,
                sinks: 1,
            },
        ),
        (
            false,
            113,
            260,
            TopK {
                k: 3,
                block: 16,
                local: 2,
                sinks: 0,
            },
        ),
        (
            true,
            1,
            1000,
            TopK {
                k: 4,
                block: 64,
                local: 1,
                sinks: 2,
            },
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let mut case = Case::new(2, lq, lk, 4, 2, 16, 16).with(|o| o.causal = causal);
        if i == 0 {
            case.opts.q_lens = Some(vec![200, 150]);
            case.opts.kv_lens = Some(vec![200, 170]);
        }
        let s = case.shape;
        let seed = fresh_seed();
        // the inputs run_sparse makes from this seed
        let q = random(s.batch * s.lq * s.hq * s.d, case.amp, seed);
        let k = random(s.batch * s.lk * s.hkv * s.d, case.amp, seed ^ 1);
        let v = random(s.batch * s.lk * s.hkv * s.dv, 1.0, seed ^ 2);
        let qt = Tensor::from_f32(c, &q, &[s.batch, s.lq, s.hq, s.d]).unwrap();
        let kt = Tensor::from_f32(c, &k, &[s.batch, s.lk, s.hkv, s.d]).unwrap();
        let got = route_blocks(c, &qt, &kt, &case.opts, &topk).unwrap();
        let inp = RefInputs {
            shape: s,
            q: &q,
            k: &k,
            v: &v,
            bias: None,
        };
        let want = route_reference(&inp, &case.opts, &topk).unwrap();
        let scores = reference_scores(&inp, &case.opts, &topk).unwrap();
        let (nq, nk) = topk.layout(&s).blocks();
        assert_eq!(got.slots, want.slots, "seed {seed}");
        assert_eq!(got.selected.len(), s.batch * s.hq * nq * got.slots);
        check_selection(
            &got.selected,
            &want.selected,
            want.slots,
            &scores,
            nk,
            seed,
            "host",
        );
        // the device routing (f32 scores and selection, no readback), and its block table
        // against the host's for the same selection
        let tile_rows = [16, 64, 128][i];
        let dev = c
            .submit(|enc| encode_route(c, enc, &qt, &kt, &case.opts, &topk, tile_rows))
            .unwrap();
        let dev_sel = dev.selected.to_vec_i32(c).unwrap();
        check_selection(
            &dev_sel,
            &want.selected,
            want.slots,
            &scores,
            nk,
            seed,
            "device",
        );
        let dev_mask = mask_of(&dev_sel, got.slots, topk.layout(&s));
        let (lists, states) = block_tables(&dev_mask, tile_rows).unwrap();
        let tab = dev.table.to_vec_u32(c).unwrap();
        let n_lists = s.batch * s.hq * s.lq.div_ceil(tile_rows);
        for li in 0..n_lists {
            let (hs, hn) = (lists[2 * li] as usize, lists[2 * li + 1] as usize);
            let (ds, dn) = (tab[2 * li] as usize, tab[2 * li + 1] as usize);
            assert_eq!(
                &tab[ds..ds + dn],
                &lists[hs..hs + hn],
                "list {li} of the device table, seed {seed}"
            );
        }
        assert_eq!(
            &tab[tab.len() - states.len()..],
            &states[..],
            "states, seed {seed}"
        );
        // the call's own routing runs on the device: its outputs are the block mask of the
        // device's selection, to the bit, and that mask against the reference
        let cmp = run_sparse(
            &case,
            seed,
            &SparseOptions::default().block_mask(Some(Arc::new(dev_mask.clone()))),
        );
        assert!(
            cmp.passed,
            "device top-k case {i}: {case:?} seed {seed}: {cmp:?}"
        );
        let sp = SparseOptions::default().block_mask(Some(Arc::new(got.mask)));
        let cmp = run_sparse(&case, seed, &sp);
        assert!(cmp.passed, "top-k case {i}: {case:?} seed {seed}: {cmp:?}");
        // the same through sparse_attention's own routing
        let sp = SparseOptions::default().topk(Some(topk));
        let mut o = case.opts.clone();
        o.return_lse = false;
        let vt = Tensor::from_f32(c, &v, &[s.batch, s.lk, s.hkv, s.dv]).unwrap();
        let routed = sparse_attention(c, &qt, &kt, &vt, &sp.flash(o.clone()))
            .unwrap()
            .out
            .to_vec_f32(c)
            .unwrap();
        let direct = sparse_attention(
            c,
            &qt,
            &kt,
            &vt,
            &SparseOptions::default()
                .flash(o)
                .block_mask(Some(Arc::new(dev_mask))),
        )
        .unwrap()
        .out
        .to_vec_f32(c)
        .unwrap();
        let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        assert_eq!(
            bits(&routed),
            bits(&direct),
            "top-k case {i}: routing inside the call"
        );
    }
}

/// The block mask of a selection `[B, Hq, nQ, slots]` (every listed block full).
fn mask_of(sel: &[i32], slots: usize, layout: BlockLayout) -> BlockMask {
    let (_, nk) = layout.blocks();
    let mut on = vec![false; sel.len() / slots * nk];
    for (r, row) in sel.chunks(slots).enumerate() {
        for &j in row.iter().filter(|&&j| j >= 0) {
            on[r * nk + j as usize] = true;
        }
    }
    BlockMask::from_dense(&on, layout).unwrap()
}

/// A routing's selection against the f64 one: padding and order, and rows that differ only by
/// swaps between blocks whose f64 scores tie within f32 rounding.
#[allow(clippy::too_many_arguments)]
fn check_selection(
    got: &[i32],
    want: &[i32],
    slots: usize,
    scores: &[f64],
    nk: usize,
    seed: u64,
    what: &str,
) {
    assert_eq!(got.len(), want.len(), "{what}");
    let mut swaps = 0;
    for (r, (g, w)) in got.chunks(slots).zip(want.chunks(slots)).enumerate() {
        let valid = g.iter().take_while(|&&x| x >= 0).count();
        assert!(
            g[valid..].iter().all(|&x| x == -1),
            "row {r}: {g:?} seed {seed}"
        );
        assert!(
            g[..valid].windows(2).all(|p| p[0] < p[1]),
            "row {r}: {g:?} seed {seed}"
        );
        if g == w {
            continue;
        }
        // a swap is allowed only between blocks that tie within f32 rounding
        let sc = &scores[r * nk..][..nk];
        let tol = 1e-4 * (1.0 + sc.iter().fold(0.0f64, |m, x| m.max(x.abs())));
        let only = |a: &[i32], b: &[i32]| -> Vec<f64> {
            a.iter()
                .filter(|x| **x >= 0 && !b.contains(x))
                .map(|&x| sc[x as usize])
                .collect()
        };
        let (gs, ws) = (only(g, w), only(w, g));
        assert_eq!(
            gs.len(),
            ws.len(),
            "row {r}: got {g:?}, f64 routing {w:?} seed {seed}"
        );
        for (a, b) in gs.iter().zip(&ws) {
            assert!(
                (a - b).abs() <= tol,
                "row {r}: got {g:?}, f64 routing {w:?}, scores {a} vs {b} seed {seed}"
            );
        }
        swaps += 1;
    }
    eprintln!("{what} top-k: {swaps} rows differ from the f64 routing by near-ties");
}

/// Max |a - b| over two outputs, and the largest |a|.
fn max_diff(a: &Tensor, b: &Tensor) -> (f64, f64) {
    let (a, b) = (a.to_vec_f32(ctx()).unwrap(), b.to_vec_f32(ctx()).unwrap());
    let d = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs() as f64)
        .fold(0.0, f64::max);
    let m = a.iter().map(|x| x.abs() as f64).fold(0.0, f64::max);
    (d, m)
}

/// Snippets equal to the built-ins give the built-ins' outputs: causal as a mask_mod, softcap
/// and ALiBi as score_mods, against dense calls with the flags.
#[test]
fn snippets_equal_the_built_ins() {
    let c = ctx();
    let (l, h, d) = (97, 2, 16);
    let seed = fresh_seed();
    let amp = amp_for_logit_std(3.0, 1.0 / (d as f64).sqrt(), d);
    let t = |s: u64| Tensor::from_f32(c, &random(l * h * d, amp, s), &[1, l, h, d]).unwrap();
    let (q, k, v) = (t(seed), t(seed ^ 1), t(seed ^ 2));
    let slopes = vec![0.5f32, 0.125];
    let pairs: Vec<(SnippetKind, &str, Vec<Aux>, FlashOptions)> = vec![
        (
            SnippetKind::MaskMod,
            EXAMPLES[0].1,
            vec![Aux::I32(vec![0])],
            FlashOptions::default().causal(true),
        ),
        (
            SnippetKind::ScoreMod,
            SCORE_EXAMPLES[0].1,
            vec![],
            FlashOptions::default().softcap(Some(30.0)),
        ),
        (
            SnippetKind::ScoreMod,
            SCORE_EXAMPLES[1].1,
            vec![Aux::F32(slopes.clone())],
            FlashOptions::default().alibi_slopes(Some(slopes.clone())),
        ),
    ];
    for st in snippet_strategies() {
        for (kind, src, aux, builtin) in &pairs {
            let sn = Snippet::new(*kind, src, aux).unwrap();
            let mut sp = SparseOptions::default()
                .aux(aux.clone())
                .block_size(Some(BLOCKS[1]));
            sp.flash.strategy = st;
            match kind {
                SnippetKind::MaskMod => sp.mask_mod = Some(sn),
                SnippetKind::ScoreMod => sp.score_mod = Some(sn),
                other => panic!("no test for snippet kind {other:?}"),
            }
            let mut dense = builtin.clone();
            dense.strategy = st;
            let a = sparse_attention(c, &q, &k, &v, &sp).unwrap();
            let b = flash_attention(c, &q, &k, &v, &dense).unwrap();
            let (diff, max) = max_diff(&a.out, &b.out);
            assert!(
                max > 0.0 && diff <= 2e-5 * max,
                "{src} {st:?} seed {seed}: {diff} of {max}"
            );
        }
    }
}

/// The sparse family's random cases: shapes, lengths and heads, the fixed tests' block sizes,
/// a random block mask (any strategy) or the prefix-LM mask_mod, sometimes the softcap
/// score_mod over a block mask (the planned strategy), the dense masks.
#[test]
fn random_sparse_cases() {
    for_each_case("sparse", 4, |seed| {
        let mut r = rand::rngs::StdRng::seed_from_u64(seed);
        let (bq, bk) = BLOCKS[r.random_range(0..BLOCKS.len())];
        let batch = r.random_range(1..=2);
        let lq = r.random_range(1..260);
        let lk = r.random_range(1..260);
        let hkv = r.random_range(1..=2);
        let hq = hkv * r.random_range(1..=2);
        // the head-dim bucket the fixed sparse tests compile (cold compiles are the suite's time)
        let d = r.random_range(9..=16);
        let mut case = Case::new(batch, lq, lk, hq, hkv, d, d);
        case.amp = amp_for_logit_std(r.random_range(1.0..4.0), 1.0 / (d as f64).sqrt(), d);
        if r.random_bool(0.3) {
            case.opts.causal = true;
        }
        if r.random_bool(0.2) {
            case.opts.window = (Some(r.random_range(0..100)), None);
        }
        let mut sp = SparseOptions::default();
        match r.random_range(0..3) {
            0 | 1 => {
                let l = layout(
                    [1, batch][r.random_range(0..2)],
                    [1, hq][r.random_range(0..2)],
                    lq,
                    lk,
                    bq,
                    bk,
                );
                sp.block_mask = Some(Arc::new(random_blocks(l, r.random_range(0.0..1.0), seed)));
                if r.random_bool(0.3) {
                    let src = SCORE_EXAMPLES[0].1;
                    sp.score_mod = Some(Snippet::new(SnippetKind::ScoreMod, src, &[]).unwrap());
                } else {
                    let all = strategies();
                    case.opts.strategy = StrategyChoice::Force(all[r.random_range(0..all.len())]);
                }
            }
            _ => {
                let prefix = r.random_range(0..lk as u32 + 1);
                sp.aux = vec![Aux::U32(vec![prefix])];
                sp.mask_mod =
                    Some(Snippet::new(SnippetKind::MaskMod, EXAMPLES[2].1, &sp.aux).unwrap());
                sp.block_size = Some(BLOCKS[1]);
            }
        }
        if r.random_bool(0.25) {
            let bias = r.random_bool(0.5).then(|| r.random_range(-4.0..2.0));
            sp.normalizer = Normalizer::Sigmoid { bias };
        }
        let c = run_sparse(&case, seed, &sp);
        assert!(c.passed, "{case:?} blocks {bq}x{bk}: {c:?}");
        format!(
            "{case:?} blocks {bq}x{bk} mask_mod {} score_mod {} {:?}: max rel {:.1e}",
            sp.mask_mod.is_some(),
            sp.score_mod.is_some(),
            sp.normalizer,
            c.max_rel
        )
    });
}

/// Bad sparse calls are typed errors that say what was expected.
#[test]
fn bad_sparse_calls_are_refused() {
    let c = ctx();
    let t = |l: usize| Tensor::filled(c, &[1, l, 2, 64], DType::F32, 0.5).unwrap();
    let (q, k) = (t(64), t(80));
    // a block mask for other lengths
    let sp = sparse_with(random_blocks(layout(1, 1, 64, 64, 16, 16), 0.5, 1));
    let e = sparse_attention(c, &q, &k, &k, &sp).err().unwrap();
    assert!(matches!(e, AttnError::Shape { .. }), "{e}");
    assert!(e.to_string().contains("Lk = 80"), "{e}");
    // aux buffers other than the snippet was checked with
    let sn = Snippet::new(SnippetKind::MaskMod, EXAMPLES[0].1, &[Aux::I32(vec![0])]).unwrap();
    let sp = SparseOptions::default()
        .mask_mod(Some(sn))
        .aux(vec![Aux::F32(vec![0.0])]);
    let e = sparse_attention(c, &q, &k, &k, &sp).err().unwrap();
    assert!(e.to_string().contains("aux"), "{e}");
    // a block size that is not a multiple of 16
    let sp = SparseOptions::default().block_size(Some((24, 16)));
    let e = sparse_attention(c, &q, &k, &k, &sp).err().unwrap();
    assert!(e.to_string().contains("multiple of 16"), "{e}");
    // top-k routing: blocks on the grid, and the only source of blocks
    use wgpu_attention::sparse::routing::TopK;
    let topk = |block| TopK {
        k: 1,
        block,
        local: 0,
        sinks: 0,
    };
    let sp = SparseOptions::default().topk(Some(topk(24)));
    let e = sparse_attention(c, &q, &k, &k, &sp).err().unwrap();
    assert!(e.to_string().contains("multiple of 16"), "{e}");
    let sp = SparseOptions::default()
        .topk(Some(topk(16)))
        .mask_mod(Some(
            Snippet::new(SnippetKind::MaskMod, EXAMPLES[0].1, &[Aux::I32(vec![0])]).unwrap(),
        ))
        .aux(vec![Aux::I32(vec![0])]);
    let e = sparse_attention(c, &q, &k, &k, &sp).err().unwrap();
    assert!(e.to_string().contains("top-k"), "{e}");
    // sigmoid attention has no LSE; its bias must be finite
    let mut sp = SparseOptions::default().normalizer(Normalizer::Sigmoid { bias: None });
    sp.flash.return_lse = true;
    let e = sparse_attention(c, &q, &k, &k, &sp).err().unwrap();
    assert!(e.to_string().contains("sigmoid"), "{e}");
    let sp = SparseOptions::default().normalizer(Normalizer::Sigmoid {
        bias: Some(f32::NAN),
    });
    let e = sparse_attention(c, &q, &k, &k, &sp).err().unwrap();
    assert!(e.to_string().contains("finite"), "{e}");
}

/// Aux buffers as device tensors (an embedder's own data, integer dtypes included) give the
/// same outputs as the same data from the host, bit for bit, and against the reference; an
/// f16, strided or misaligned aux tensor, an integer q and an integer readback are refused.
#[test]
fn aux_tensors_equal_host_aux() {
    let c = ctx();
    let (lq, lk, h, d) = (113, 150, 2, 16);
    let seed = fresh_seed();
    let amp = amp_for_logit_std(3.0, 1.0 / (d as f64).sqrt(), d);
    let t =
        |l: usize, s: u64| Tensor::from_f32(c, &random(l * h * d, amp, s), &[1, l, h, d]).unwrap();
    let (q, k, v) = (t(lq, seed), t(lk, seed ^ 1), t(lk, seed ^ 2));
    let ids = masks::document_ids(&[0, 17, 90, 91, 150], 150);
    let table = random(129, 1.0, seed ^ 3);
    // document masking (u32 ids), causal (an i32 offset), a relative bias table (f32)
    let host = [
        (
            EXAMPLES[1].1,
            SnippetKind::MaskMod,
            Aux::U32(ids.clone()),
            Aux::Tensor(Tensor::from_u32(c, &ids, &[5, 30]).unwrap()),
        ),
        (
            EXAMPLES[0].1,
            SnippetKind::MaskMod,
            Aux::I32(vec![lk as i32 - lq as i32]),
            Aux::Tensor(Tensor::from_i32(c, &[lk as i32 - lq as i32], &[1]).unwrap()),
        ),
        (
            SCORE_EXAMPLES[2].1,
            SnippetKind::ScoreMod,
            Aux::F32(table.clone()),
            Aux::Tensor(Tensor::from_f32(c, &table, &[129]).unwrap()),
        ),
    ];
    for (src, kind, on_host, on_device) in host {
        let run = |aux: Aux| {
            let sn = Snippet::new(kind, src, std::slice::from_ref(&aux)).unwrap();
            let mut sp = SparseOptions::default()
                .aux(vec![aux])
                .block_size(Some(BLOCKS[1]));
            match kind {
                SnippetKind::MaskMod => sp.mask_mod = Some(sn),
                SnippetKind::ScoreMod => sp.score_mod = Some(sn),
                other => panic!("no test for snippet kind {other:?}"),
            }
            let o = sparse_attention(c, &q, &k, &v, &sp).unwrap();
            (o.out.to_vec_f32(c).unwrap(), sp)
        };
        let (a, _) = run(on_host);
        let (b, sp) = run(on_device);
        assert!(a.iter().any(|x| *x != 0.0), "{src}");
        assert_eq!(
            a.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            b.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            "{src}: device aux differs from host aux"
        );
        assert_sparse(&Case::new(1, lq, lk, h, h, d, d), &sp, src);
    }

    // refusals
    let refused = |aux: Aux, want: &str| {
        let sn = Snippet::new(
            SnippetKind::ScoreMod,
            SCORE_EXAMPLES[2].1,
            &[Aux::F32(vec![0.0])],
        );
        let sp = SparseOptions::default()
            .score_mod(Some(sn.unwrap()))
            .aux(vec![aux]);
        let Err(e) = sparse_attention(c, &q, &k, &v, &sp) else {
            panic!("{want}: ran");
        };
        assert!(e.to_string().contains(want), "{want}: {e}");
    };
    let half: Vec<half::f16> = table.iter().map(|&x| half::f16::from_f32(x)).collect();
    refused(
        Aux::Tensor(Tensor::from_f16(c, &half, &[129]).unwrap()),
        "f32, i32 or u32",
    );
    let wide = Tensor::from_f32(c, &random(2 * 130, 1.0, 1), &[2, 130]).unwrap();
    let strided = wide.with_layout(vec![2, 129], vec![130, 1], 0).unwrap();
    refused(Aux::Tensor(strided), "contiguous");
    let shifted = wide.with_layout(vec![129], vec![1], 1).unwrap();
    refused(Aux::Tensor(shifted), "storage offset alignment");
    let ints = Tensor::from_i32(c, &vec![1; lq * h * d], &[1, lq, h, d]).unwrap();
    let Err(e) = sparse_attention(c, &ints, &k, &v, &SparseOptions::default()) else {
        panic!("an i32 q ran");
    };
    assert!(matches!(e, AttnError::DType { .. }), "{e}");
    assert!(matches!(ints.to_vec_f32(c), Err(AttnError::DType { .. })));
}
