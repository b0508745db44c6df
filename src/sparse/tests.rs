//! The sparse module's unit tests (host-side: masks, layouts, tables; the GPU suites are in tests/).

use super::masks::*;
use super::*;

fn lay(b: usize, h: usize, lq: usize, lk: usize, q_block: usize, kv_block: usize) -> BlockLayout {
    BlockLayout {
        batch: b,
        heads: h,
        lq,
        lk,
        q_block,
        kv_block,
    }
}

/// The block mask of a mask_mod, with the mask_mod on partial blocks, is the mask_mod.
fn same_as_mask(
    m: &MaskMod,
    batch: usize,
    heads: usize,
    lq: usize,
    lk: usize,
    bq: usize,
    bk: usize,
) {
    let bm = BlockMask::from_mask_mod(m, lay(batch, heads, lq, lk, bq, bk)).unwrap();
    for b in 0..batch {
        for h in 0..heads {
            for q in 0..lq {
                for k in 0..lk {
                    assert_eq!(
                        bm.visible(Some(m), b, h, q, k),
                        m.eval(b, h, q, k),
                        "{m:?} b{b} h{h} q{q} k{k} blocks {bq}x{bk}"
                    );
                }
            }
        }
    }
}

#[test]
fn causal_blocks_are_full_below_partial_on_and_skipped_above_the_diagonal() {
    let bm = BlockMask::from_mask_mod(&causal(300, 300), lay(1, 1, 300, 300, 64, 64)).unwrap();
    assert_eq!(bm.blocks(), (5, 5));
    for i in 0..4u32 {
        assert_eq!(bm.full[i as usize], (0..i).collect::<Vec<_>>(), "row {i}");
        assert_eq!(bm.partial[i as usize], vec![i], "row {i}");
    }
    // the last query tile (rows 256..300 of 320) is padded: partial throughout
    assert_eq!(bm.full[4], Vec::<u32>::new());
    assert_eq!(bm.partial[4], vec![0, 1, 2, 3, 4]);
    // a padded tail tile is never full, even where every pair it has is visible
    let bm = BlockMask::from_mask_mod(&sinks(1000), lay(1, 1, 100, 100, 64, 32)).unwrap();
    assert_eq!(bm.full[0], vec![0, 1, 2]);
    assert_eq!(bm.partial[0], vec![3]);
    assert_eq!(bm.full[1], Vec::<u32>::new());
    assert_eq!(bm.partial[1], vec![0, 1, 2, 3]);
}

#[test]
fn builders_agree_with_their_mask_mods_at_awkward_sizes() {
    let docs = document_ids(&[0, 17, 90, 91, 150], 150);
    for (lq, lk) in [(150, 150), (37, 150), (150, 113)] {
        for m in [
            causal(lq, lk),
            sliding_window(lq, lk, Some(20), Some(3)),
            sliding_window(lq, lk, None, Some(0)),
            prefix_lm(lq, lk, 40),
            global_tokens(vec![0, 64, 149])
                .unwrap()
                .or(&sliding_window(lq, lk, Some(8), Some(8))),
            document(docs[..lq].to_vec(), docs[..lk].to_vec()).and(&causal(lq, lk)),
            sinks(4).or(&sliding_window(lq, lk, Some(16), Some(0))),
        ] {
            same_as_mask(&m, 1, 1, lq, lk, 16, 32);
            same_as_mask(&m, 1, 1, lq, lk, 48, 16);
        }
    }
}

#[test]
fn batch_and_head_axes_broadcast_or_not() {
    // head-dependent: even heads causal, odd heads everything
    let m = MaskMod::new("per-head", |_, h, q, k| h % 2 == 1 || k <= q);
    same_as_mask(&m, 2, 3, 40, 40, 16, 16);
    let bm = BlockMask::from_mask_mod(&causal(40, 40), lay(1, 1, 40, 40, 16, 16)).unwrap();
    // one list serves every batch and head
    assert!(bm.visible(None, 5, 7, 39, 0));
    assert!(!bm.visible(None, 5, 7, 0, 39));
}

#[test]
fn dense_block_masks_and_bad_sizes() {
    // [1, 1, 2, 3]: blocks (0,0), (0,2), (1,1)
    let dense = [true, false, true, false, true, false];
    let bm = BlockMask::from_dense(&dense, lay(1, 1, 32, 48, 16, 16)).unwrap();
    assert_eq!(bm.full, vec![vec![0, 2], vec![1]]);
    assert_eq!(bm.visited_blocks(), 3);
    assert!(bm.visible(None, 0, 0, 3, 40) && !bm.visible(None, 0, 0, 3, 20));
    let err = BlockMask::from_dense(&dense, lay(1, 1, 32, 64, 16, 16)).unwrap_err();
    assert!(err.to_string().contains("[1, 1, 2, 4]"), "{err}");
    for bad in [0, 8, 24, 272] {
        let err =
            BlockMask::from_mask_mod(&causal(64, 64), lay(1, 1, 64, 64, bad, 16)).unwrap_err();
        assert!(err.to_string().contains("multiple of 16"), "{err}");
    }
}

/// The structured-sparsity builders, pair by pair against their papers' definitions.
#[test]
fn strided_and_fixed_patterns() {
    let st = strided(64, 64, 4).unwrap();
    // the last 4 keys, then every 4th before them, never the future
    let seen: Vec<usize> = (0..64).filter(|&k| st.eval(0, 0, 20, k)).collect();
    assert_eq!(seen, vec![0, 4, 8, 12, 16, 17, 18, 19, 20]);
    let fx = fixed(64, 64, 8, 2).unwrap();
    // block 2 (keys 16..24) up to 20, and the last 2 of blocks 0 and 1
    let seen: Vec<usize> = (0..64).filter(|&k| fx.eval(0, 0, 20, k)).collect();
    assert_eq!(seen, vec![6, 7, 14, 15, 16, 17, 18, 19, 20]);
    assert!(strided(8, 8, 0).is_err() && fixed(8, 8, 4, 5).is_err());
    // bottom-right alignment: with Lk = Lq + 10 query 0 sits at key 10
    assert!(strided(6, 16, 4).unwrap().eval(0, 0, 0, 10));
    assert!(!strided(6, 16, 4).unwrap().eval(0, 0, 0, 11));
}

#[test]
fn bigbird_window_global_and_seeded_random_blocks() {
    let (l, bs) = (16 * 20, 16);
    let bb = bigbird(l, l, bs, 1, 1, 2, 7).unwrap();
    let row = |m: &MaskMod, qb: usize| -> Vec<usize> {
        (0..20)
            .filter(|&kb| m.eval(0, 0, qb * bs, kb * bs))
            .collect()
    };
    for qb in 1..20 {
        let r = row(&bb, qb);
        // the global block, the window, and two random ones (some may coincide)
        assert!(
            r.contains(&0) && r.contains(&qb) && r.contains(&(qb - 1)),
            "{r:?}"
        );
        let fixed = [0, qb - 1, qb, (qb + 1).min(19)];
        let extra = r.iter().filter(|k| !fixed.contains(k)).count();
        assert!(extra <= 2, "row {qb}: {r:?}");
        // tokens of one block share its row
        assert_eq!(
            (0..l).filter(|&k| bb.eval(0, 0, qb * bs + 5, k)).count(),
            r.len() * bs
        );
    }
    // the global block sees everything
    assert_eq!(row(&bb, 0).len(), 20);
    // the same seed gives the same mask, another seed another
    let again = bigbird(l, l, bs, 1, 1, 2, 7).unwrap();
    let other = bigbird(l, l, bs, 1, 1, 2, 8).unwrap();
    let all = |m: &MaskMod| (0..20).map(|q| row(m, q)).collect::<Vec<_>>();
    assert_eq!(all(&bb), all(&again));
    assert_ne!(all(&bb), all(&other));
}

#[test]
fn longlora_shifts_half_the_heads() {
    let m = longlora_shifted(32, 4, 8, false).unwrap();
    // unshifted heads: groups 0..8, 8..16, ...
    assert!(m.eval(0, 0, 7, 0) && !m.eval(0, 1, 8, 7));
    // shifted heads: groups 4..12, 12..20, ..., and 28..32 + 0..4 wrapped
    assert!(m.eval(0, 2, 8, 7) && !m.eval(0, 3, 4, 3) && m.eval(0, 2, 1, 30));
    let c = longlora_shifted(32, 4, 8, true).unwrap();
    assert!(!c.eval(0, 2, 7, 8) && c.eval(0, 2, 8, 7));
    assert!(longlora_shifted(32, 4, 0, true).is_err());
}

#[test]
fn maxvit_block_and_grid() {
    // an 8 x 12 grid of tokens, row-major
    let blk = maxvit_block(8, 12, 4).unwrap();
    let grid = maxvit_grid(8, 12, 2).unwrap();
    let at = |y: usize, x: usize| y * 12 + x;
    assert!(blk.eval(0, 0, at(1, 1), at(3, 3)) && !blk.eval(0, 0, at(1, 1), at(1, 4)));
    // grid 2 x 2: tokens 4 rows and 6 columns apart share a group
    assert!(grid.eval(0, 0, at(1, 1), at(5, 7)) && grid.eval(0, 0, at(1, 1), at(1, 7)));
    assert!(!grid.eval(0, 0, at(1, 1), at(2, 1)));
    for t in 0..96 {
        let n = (0..96).filter(|&k| grid.eval(0, 0, t, k)).count();
        assert_eq!(n, 4, "token {t}: a 2 x 2 group");
        let n = (0..96).filter(|&k| blk.eval(0, 0, t, k)).count();
        assert_eq!(n, 16, "token {t}: a 4 x 4 window");
    }
    assert!(maxvit_block(8, 12, 5).is_err() && maxvit_grid(8, 12, 0).is_err());
}
