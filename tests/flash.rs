//! Flash attention against the f64 reference: awkward shapes, head dims, GQA, every option alone
//! and combined, f32 and f16, both strategies, on whatever adapter the tests run (lavapipe and
//! SwiftShader in CI). Outputs are NaN-poisoned before each run (see common::run_seeded).

mod common;
use common::*;
use wgpu_attention::*;

/// B=2 (so per-batch options differ), 8 query heads over 2 kv heads, D=40 (a padded bucket).
/// The options tests' shape: D = 20 pads its head-dim bucket (32) like D = 40 pads 48, at a
/// smaller kernel (cold compiles grow with the bucket; the head-dim tests cover 40, 96, 256).
fn base(lq: usize, lk: usize) -> Case {
    Case::new(2, lq, lk, 8, 2, 20, 20)
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
    let cases: Vec<Case> = [(60, 60), (16, 96), (40, 40)]
        .into_iter()
        .map(|(d, dv)| Case::new(1, 37, 70, 2, 1, d, dv).with(|o| o.causal = true))
        .collect();
    check_axis(&cases);
}

#[test]
fn head_dim_256() {
    head_dim_case(256, 256);
}

/// The largest bucket: its kernels are the slowest to compile (on lavapipe, cold: Tiled about
/// 60 s, Subgroup 48 s, one kernel each). `WGPU_ATTENTION_EXHAUSTIVE=1` (the thorough run) checks
/// both against the reference; the default run leaves them out for the test command's cold
/// budget and says so. Every 512 specialization is still validated by naga in tests/naga.rs,
/// and the plan and the buffers of a D = 512 call are still checked here (a typed result, no
/// dispatch).
#[test]
fn head_dim_512() {
    let case = Case::new(1, 37, 70, 2, 1, 512, 512).with(|o| o.causal = true);
    if exhaustive() {
        check_all(&case);
        return;
    }
    let plan = flash::plan(ctx(), &case.shape, DType::F32, &case.opts).expect("a D = 512 plan");
    assert_eq!(plan.key.d4 * 4, 512, "{plan:?}");
    eprintln!(
        "D = 512: planned {}, not run (its cold compile is about a minute on lavapipe); \
         WGPU_ATTENTION_EXHAUSTIVE=1 runs it against the reference",
        plan.label()
    );
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
    // a dtype axis: each case through one strategy in turn (all under EXHAUSTIVE)
    check_axis(&[
        base(113, 203).f16(),
        base(113, 203).f16().with(|o| o.causal = true),
        Case::new(1, 33, 47, 2, 2, 60, 60)
            .f16()
            .with(|o| o.causal = true),
        base(70, 65).f16(),
    ]);
}

#[test]
fn f16_logits_past_65504_do_not_overflow() {
    let c = Case::new(1, 20, 31, 2, 1, 16, 16)
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
    for_each_case("flash", 12, |seed| {
        let c = random_flash_case(seed);
        if let Some(cmp) = check_seeded(&c, seed) {
            assert!(cmp.passed, "{c:?}: {cmp:?}");
        }
        format!("{c:?}")
    });
}

/// The fewest tiles that still show every rows value and every workgroup size at least once
/// (each compiles a kernel, the cost on SwiftShader, which has no disk cache).
fn covering(tiles: &[Tile]) -> Vec<Tile> {
    let mut rows = std::collections::BTreeSet::new();
    let mut wgs = std::collections::BTreeSet::new();
    let mut out = Vec::new();
    // first tiles that are new on both axes, then whatever one axis still lacks
    for both in [true, false] {
        for &t in tiles {
            let (new_r, new_w) = (!rows.contains(&t.rows), !wgs.contains(&t.wg));
            if (both && new_r && new_w) || (!both && (new_r || new_w)) {
                rows.insert(t.rows);
                wgs.insert(t.wg);
                out.push(t);
            }
        }
    }
    out
}

/// The tiles the plan may pick (`flash::tile_choices`, what `tune` measures) compute the same
/// attention: each on its own fresh inputs, causal and not in turn, at awkward lengths. By
/// default a covering set: every rows value and every workgroup size at least once (each kernel
/// compiles for seconds); `WGPU_ATTENTION_EXHAUSTIVE=1` runs all. A tile outside
/// the choices is a typed error naming them.
#[test]
fn every_tile_choice() {
    let ctx = ctx();
    for st in strategies() {
        let case = Case::new(1, 113, 203, 4, 2, 40, 40).strategy(st);
        let tiles =
            flash::tile_choices(ctx, &case.shape, DType::F32, &case.opts).expect("tile choices");
        assert!(tiles.len() > 1, "{st:?}: {tiles:?}");
        let all = tiles.len();
        let tiles = if exhaustive() {
            tiles
        } else {
            covering(&tiles)
        };
        if tiles.len() < all {
            eprintln!(
                "{st:?}: {} of {all} tiles (WGPU_ATTENTION_EXHAUSTIVE=1 runs all)",
                tiles.len()
            );
        }
        for (i, &t) in tiles.iter().enumerate() {
            let start = std::time::Instant::now();
            check(&case.clone().with(|o| {
                o.tile = Some(t);
                o.causal = i % 2 == 1;
            }));
            eprintln!("{st:?} {t}: {:.1} s", start.elapsed().as_secs_f64());
        }
        let bad = Tile::new(48, 3);
        let q = Tensor::from_f32(ctx, &random(113 * 4 * 40, 1.0, 1), &[1, 113, 4, 40]).unwrap();
        let k = Tensor::from_f32(ctx, &random(203 * 2 * 40, 1.0, 2), &[1, 203, 2, 40]).unwrap();
        let opts = case.opts.clone().tile(Some(bad));
        let Err(err) = flash_attention(ctx, &q, &k, &k, &opts) else {
            panic!("tile {bad} was accepted");
        };
        assert!(
            matches!(&err, AttnError::Invalid { .. }) && err.to_string().contains("wg48xr3"),
            "{err}"
        );
    }
}

/// Causal Tiled calls on CPU adapters pair mirrored query tiles in one workgroup
/// (`FlashPlan::pair_tiles`); windowed calls and GPUs do not. With the smallest tile (the one
/// `every_tile_choice` compiles first): odd tile counts (the middle tile runs alone), even
/// ones, Lq > Lk (rows that see no key), Lq < Lk, per-batch lengths and GQA, against the
/// reference; then the untuned plan's own tile over three tiles.
#[test]
fn causal_tile_pairs() {
    let ctx = ctx();
    let causal = |c: Case| {
        c.strategy(Strategy::Tiled).with(|o| {
            o.causal = true;
        })
    };
    let big = causal(Case::new(1, 1000, 1000, 4, 2, 40, 40));
    let plan = flash::plan(ctx, &big.shape, DType::F32, &big.opts).unwrap();
    let windowed = big.clone().with(|o| o.window = (Some(64), Some(0)));
    let plan_w = flash::plan(ctx, &windowed.shape, DType::F32, &windowed.opts).unwrap();
    assert!(
        !plan_w.pair_tiles,
        "a left window gives every tile the same keys"
    );
    if !ctx.caps.cpu {
        assert!(!plan.pair_tiles, "GPUs keep one tile per workgroup");
        eprintln!("not a CPU adapter: causal tiles are not paired here (plan checked only)");
        return;
    }
    assert!(plan.pair_tiles, "{plan:?}");
    let rpw = plan.key.rows_per_workgroup() as usize;
    assert_eq!(plan.grid[0] as usize, 1000usize.div_ceil(rpw).div_ceil(2));
    let tiles = flash::tile_choices(ctx, &big.shape, DType::F32, &big.opts).unwrap();
    let small = tiles[0];
    let n = (small.wg * small.rows) as usize;
    let cases = [
        (3 * n - 5, 3 * n + 30, None),
        (
            4 * n,
            4 * n - 5,
            Some((vec![4 * n - 7, 2 * n + 3], vec![4 * n - 5, n])),
        ),
        (5 * n + 1, 5 * n + 1, None),
        (7 * n, 2 * n, None),
    ];
    for (lq, lk, lens) in cases {
        check(&causal(Case::new(2, lq, lk, 4, 2, 40, 40)).with(|o| {
            o.tile = Some(small);
            if let Some((ql, kl)) = lens.clone() {
                o.q_lens = Some(ql.into_iter().map(|x| x as u32).collect());
                o.kv_lens = Some(kl.into_iter().map(|x| x as u32).collect());
            }
        }));
    }
    // three tiles of the untuned plan: tile 0 paired with tile 2, tile 1 alone
    check(&causal(Case::new(
        1,
        2 * rpw + 100,
        2 * rpw + 100,
        2,
        1,
        40,
        40,
    )));
}

/// Two K/V stages (`Tile::stages`): the next tile's loads go out before this tile's arithmetic
/// and land in the other stage after it. The untuned plan keeps one stage; a caller's (or
/// `tune`'s) two-stage tile runs every pass shape: sinks and window passes (each pass primes its
/// own first tile), paired causal tiles, a last partial key tile (the fetch past it is
/// clamped), per-batch lengths, GQA, Lq = 1, D = 80 with 128 invocations (the last load step
/// partial), and with `WGPU_ATTENTION_EXHAUSTIVE=1` D = 256 (8-key tiles; 80 s of cold
/// compiling on lavapipe).
#[test]
fn two_stage_tiles() {
    let ctx = ctx();
    let tiled = |c: Case| c.strategy(Strategy::Tiled);
    let staged = |c: &Case| {
        let tiles = flash::tile_choices(ctx, &c.shape, DType::F32, &c.opts).unwrap();
        let plan = flash::plan(ctx, &c.shape, DType::F32, &c.opts).unwrap();
        assert_eq!(plan.key.stages, 1, "the untuned plan keeps one stage");
        tiles.into_iter().find(|t| t.stages == 2)
    };
    let first = tiled(Case::new(2, 113, 1000, 4, 2, 40, 40));
    let Some(two) = staged(&first) else {
        let limit = ctx.limits.max_compute_workgroup_storage_size;
        eprintln!("workgroup memory of {limit} bytes holds no two-stage tile: not tested here");
        return;
    };
    let with = |c: Case, f: fn(&mut FlashOptions)| {
        c.with(move |o| {
            o.tile = Some(two);
            f(o)
        })
    };
    check(&with(first.clone(), |_| {}));
    check(&with(first.clone(), |o| {
        o.window = (Some(40), Some(3));
        o.sinks = 5;
    }));
    check(&with(first.clone(), |o| {
        o.causal = true;
        o.kv_lens = Some(vec![999, 70]);
        o.q_lens = Some(vec![113, 1]);
    }));
    check(&with(tiled(Case::new(1, 1000, 1000, 2, 1, 40, 40)), |o| {
        o.causal = true
    }));
    check(&with(tiled(Case::new(1, 1, 37, 2, 2, 40, 40)), |_| {}));
    let mut others = vec![(80, 128)];
    if exhaustive() {
        others.push((256, 16));
    } else {
        eprintln!("D = 256 left out (WGPU_ATTENTION_EXHAUSTIVE=1 runs it)");
    }
    for (d, wg) in others {
        let c = tiled(Case::new(1, 70, 45, 2, 1, d, d));
        let tiles = flash::tile_choices(ctx, &c.shape, DType::F32, &c.opts).unwrap();
        let Some(t) = tiles.into_iter().find(|t| t.stages == 2 && t.wg == wg) else {
            eprintln!("no two-stage tile of {wg} invocations at D = {d} here: not tested");
            continue;
        };
        check(&c.with(|o| {
            o.tile = Some(t);
            o.causal = true;
        }));
    }
}

/// A tuned tile is what the plan picks for its class (and only for its class); an explicit
/// tile still wins; forgetting the tuning brings back the heuristic.
#[test]
fn plans_follow_the_tuning() {
    use wgpu_attention::tune::{Entry, ShapeClass, Tuning};
    let ctx = ctx();
    let shape = Case::new(1, 300, 300, 2, 2, 64, 64).shape;
    let opts = FlashOptions::default()
        .strategy(StrategyChoice::Force(Strategy::Tiled))
        .causal(true);
    let untuned = flash::plan(ctx, &shape, DType::F32, &opts).unwrap().key;
    let full = opts.clone().causal(false);
    let untuned_full = flash::plan(ctx, &shape, DType::F32, &full).unwrap().key;
    let tiles = flash::tile_choices(ctx, &shape, DType::F32, &opts).unwrap();
    let other = *tiles.iter().find(|&&t| t != untuned.tile()).unwrap();
    let class = ShapeClass::new(Strategy::Tiled, DType::F32, 64, true, shape.lq);
    let entry = Entry {
        tile: other,
        kernel: String::new(),
        default_tile: untuned.tile(),
        default_ms: 2.0,
        best_ms: 1.0,
        shape: [1, 300, 300, 2, 2, 64],
    };
    let saved = ctx.tuning();
    ctx.set_tuning(Some(Tuning {
        adapter: ctx.describe(),
        version: env!("CARGO_PKG_VERSION").into(),
        classes: [(class.name(), entry)].into_iter().collect(),
    }));
    let tuned = flash::plan(ctx, &shape, DType::F32, &opts).unwrap().key;
    let other_class = flash::plan(ctx, &shape, DType::F32, &full).unwrap().key;
    let explicit = opts.clone().tile(Some(untuned.tile()));
    let forced = flash::plan(ctx, &shape, DType::F32, &explicit).unwrap().key;
    ctx.set_tuning(saved);
    assert_eq!(tuned.tile(), other, "{}", class.name());
    assert_eq!(other_class.tile(), untuned_full.tile());
    assert_eq!(forced.tile(), untuned.tile());
}

/// `tune` on a tiny plan: one entry per class, each a tile the plan offers for that class's
/// problem, its default the untuned plan's tile, its kernel the plan's with that tile, and
/// both medians measured (finite, positive).
#[test]
fn tune_measures_every_class() {
    use wgpu_attention::tune::{tune, TunePlan};
    let ctx = ctx();
    if !ctx.caps.timestamps {
        eprintln!("adapter has no TIMESTAMP_QUERY: tune is not tested here");
        return;
    }
    let plan = TunePlan {
        strategies: vec![StrategyChoice::Auto],
        dtypes: vec![DType::F32],
        dims: vec![16],
        lengths: [40, 2100],
        heads: 1,
        rounds: 1,
        keep: 1,
    };
    let t = tune(ctx, &plan, |_| ()).unwrap();
    assert_eq!(t.classes.len(), 4, "{:?}", t.classes.keys());
    for (class, e) in &t.classes {
        let [batch, lq, lk, hq, hkv, d] = e.shape;
        let shape = AttnShape {
            batch,
            lq,
            lk,
            hq,
            hkv,
            d,
            dv: d,
        };
        let opts = FlashOptions::default().causal(class.contains("causal"));
        let choices = flash::tile_choices(ctx, &shape, DType::F32, &opts).unwrap();
        assert!(
            choices.contains(&e.tile),
            "{class}: {e:?} not in {choices:?}"
        );
        let untuned = flash::plan(ctx, &shape, DType::F32, &opts).unwrap().key;
        assert_eq!(e.default_tile, untuned.tile(), "{class}: {e:?}");
        let forced = flash::plan(ctx, &shape, DType::F32, &opts.clone().tile(Some(e.tile)));
        assert_eq!(e.kernel, forced.unwrap().key.label(), "{class}: {e:?}");
        for ms in [e.best_ms, e.default_ms] {
            assert!(ms.is_finite() && ms > 0.0, "{class}: {e:?}");
        }
    }
}
