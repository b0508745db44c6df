//! Flash attention against the f64 reference: awkward shapes, head dims, GQA, every option alone
//! and combined, f32 and f16, both strategies, on whatever adapter the tests run (lavapipe and
//! SwiftShader in CI). Outputs are NaN-poisoned before each run (see common::run_seeded).

mod common;
use common::*;
use wgpu_attention::*;

/// B=2 (so per-batch options differ), 8 query heads over 2 kv heads, D=40 (a padded bucket).
fn base(lq: usize, lk: usize) -> Case {
    Case::new(2, lq, lk, 8, 2, 40, 40)
}

#[test]
fn awkward_lengths() {
    for (lq, lk) in [(113, 203), (239, 1), (1, 239), (1, 1), (70, 65)] {
        check_all(&base(lq, lk));
        check_all(&base(lq, lk).with(|o| o.causal = true));
    }
}

#[test]
fn long_square_causal_and_not() {
    check_all(&Case::new(1, 1023, 1024, 8, 2, 40, 40));
    check_all(&Case::new(1, 1023, 1024, 8, 2, 40, 40).with(|o| o.causal = true));
}

// One test per large head dim: each compiles kernels that take 20-50 s cold on lavapipe, and
// separate tests run side by side under nextest.
fn head_dim_case(d: usize, dv: usize) {
    check_all(&Case::new(1, 37, 70, 2, 1, d, dv).with(|o| o.causal = true));
}

#[test]
fn head_dims_small() {
    for (d, dv) in [(40, 40), (60, 60), (16, 96)] {
        head_dim_case(d, dv);
    }
}

#[test]
fn head_dim_256() {
    head_dim_case(256, 256);
}

/// The largest bucket: its kernels are the slowest to compile (on lavapipe, cold: Tiled 30 s,
/// Subgroup 48 s). By default only the Tiled kernel (what GPUs and the browser run) is tested
/// here; `WGPU_ATTENTION_EXHAUSTIVE=1` adds the Subgroup kernel. Every 512 specialization is
/// still validated by naga in tests/naga.rs.
#[test]
fn head_dim_512() {
    let case = Case::new(1, 37, 70, 2, 1, 512, 512).with(|o| o.causal = true);
    if exhaustive() {
        check_all(&case);
    } else {
        eprintln!("D = 512: Tiled only (WGPU_ATTENTION_EXHAUSTIVE=1 adds the Subgroup kernel)");
        check(&case.strategy(Strategy::Tiled));
    }
}

#[test]
fn gqa_and_mqa() {
    check_all(&Case::new(1, 50, 61, 8, 2, 40, 40));
    check_all(&Case::new(1, 50, 61, 8, 1, 40, 40).with(|o| o.causal = true));
    check_all(&Case::new(2, 20, 33, 3, 3, 40, 40));
}

#[test]
fn causal_is_bottom_right_aligned() {
    // Lq > Lk: the first Lq - Lk rows see no key (O = 0, LSE = -inf); Lq < Lk: all see some.
    check_all(&base(90, 40).with(|o| o.causal = true));
    check_all(&base(40, 90).with(|o| o.causal = true));
}

#[test]
fn each_option_alone() {
    check_all(&base(57, 83).with(|o| o.scale = Some(0.3)));
    check_all(&base(57, 83).with(|o| o.softcap = Some(2.5)).amp_(3.0));
    check_all(&base(57, 83).with(|o| o.alibi_slopes = Some(slopes(8))));
    for (bb, bh) in [(1, 1), (2, 1), (1, 8), (2, 8)] {
        check_all(&base(57, 83).bias(bb, bh));
    }
    check_all(&base(57, 83).with(|o| o.q_lens = Some(vec![57, 20])));
    check_all(&base(57, 83).with(|o| o.kv_lens = Some(vec![9, 83])));
    check_all(&base(57, 83).with(|o| o.window = (Some(7), None)));
    check_all(&base(57, 83).with(|o| o.window = (None, Some(5))));
    check_all(&base(57, 83).with(|o| o.window = (Some(0), Some(0))));
}

#[test]
fn attention_sinks_with_sliding_window() {
    // StreamingLLM-style: the first `sinks` keys stay visible past the window's left edge
    check_all(&base(120, 150).with(|o| {
        o.window = (Some(9), None);
        o.sinks = 4;
    }));
    check_all(&base(120, 150).with(|o| {
        o.causal = true;
        o.window = (Some(20), Some(0));
        o.sinks = 13;
    }));
    // sinks wider than the window's left edge ever reaches, and sinks without a window
    check_all(&base(40, 37).with(|o| {
        o.window = (Some(2), Some(2));
        o.sinks = 37;
    }));
    // sinks right of the window of the first rows (many workgroups / subgroups)
    check_all(&Case::new(1, 600, 610, 2, 1, 40, 40).with(|o| {
        o.window = (Some(2), Some(2));
        o.sinks = 300;
    }));
    check_all(&base(40, 37).with(|o| {
        o.causal = true;
        o.sinks = 3;
    }));
}

#[test]
fn options_combined() {
    let all = |o: &mut FlashOptions| {
        o.causal = true;
        o.scale = Some(0.2);
        o.softcap = Some(3.0);
        o.alibi_slopes = Some(slopes(8));
        o.q_lens = Some(vec![40, 61]);
        o.kv_lens = Some(vec![77, 30]);
        o.window = (Some(11), Some(3));
        o.sinks = 2;
    };
    check_all(&base(61, 77).bias(2, 1).with(all));
    check_all(&base(61, 77).bias(1, 8).with(all).f16());
    // varlen with causal: alignment at each sequence's own lengths
    check_all(&base(64, 64).with(|o| {
        o.causal = true;
        o.q_lens = Some(vec![17, 64]);
        o.kv_lens = Some(vec![40, 5]);
    }));
}

#[test]
fn fully_masked_rows_give_zero_and_neg_inf_lse() {
    // batch 0 has no keys at all; a -inf bias row masks the rest
    check_all(&base(30, 41).with(|o| o.kv_lens = Some(vec![0, 41])));
    check_all(&base(30, 41).with(|o| o.q_lens = Some(vec![0, 30])));
}

#[test]
fn f16_in_f16_out() {
    check_all(&base(113, 203).f16());
    check_all(&base(113, 203).f16().with(|o| o.causal = true));
    check_all(
        &Case::new(1, 33, 47, 2, 2, 60, 60)
            .f16()
            .with(|o| o.causal = true),
    );
}

#[test]
fn f16_logits_past_65504_do_not_overflow() {
    let c = Case::new(1, 20, 31, 2, 1, 64, 64)
        .f16()
        .big_logits()
        .with(|o| o.scale = Some(1.0));
    check_all(&c);
}

#[test]
fn bhsd_strided_views() {
    check_all(&base(45, 66).bhsd());
    check_all(&base(45, 66).bhsd().with(|o| o.causal = true));
}

#[test]
fn lk_past_the_lavapipe_loop_limit() {
    // 70000 keys: a kernel that loops once per key would stop early on llvmpipe.
    check_all(&Case::new(1, 3, 70_000, 1, 1, 16, 16));
    check_all(&Case::new(1, 3, 70_000, 1, 1, 16, 16).with(|o| o.causal = true));
}

fn slopes(h: usize) -> Vec<f32> {
    // ALiBi's geometric slopes 2^(-8 i / h)
    (1..=h)
        .map(|i| 2f32.powf(-8.0 * i as f32 / h as f32))
        .collect()
}

trait Amp {
    fn amp_(self, a: f32) -> Self;
}
impl Amp for Case {
    fn amp_(mut self, a: f32) -> Self {
        self.amp = a;
        self
    }
}

/// Seeded random cases (see `common::random_flash_case`): `WGPU_ATTENTION_CASES=N` for more,
/// `WGPU_ATTENTION_SEED=S` to replay a failure.
#[test]
fn random_cases() {
    for_each_case("flash", 24, |seed| {
        let c = random_flash_case(seed);
        if let Some(cmp) = check_seeded(&c, seed) {
            assert!(cmp.passed, "{c:?}: {cmp:?}");
        }
        format!("{c:?}")
    });
}
