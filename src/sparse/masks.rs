//! The mask builders: each gives the `mask_mod` of a pattern as a Rust closure (its block mask on the
//! host from [`super::BlockMask::from_mask_mod`]) with its WGSL twin, the snippet the kernel evaluates
//! on partial blocks ([`MaskMod::snippet`]; `and`/`or` combine both, aux buffers renumbered).
//! Data a pattern needs (document ids, global positions, BigBird's random blocks as a bitmap)
//! travels as aux buffers; lengths and sizes are literals in the snippet.

use super::{Aux, MaskMod, MaskWgsl};
use crate::error::{AttnError, Result};

/// The diagonal offset of bottom-right alignment: query i sits at key position `i + off`.
fn offset(lq: usize, lk: usize) -> i64 {
    lk as i64 - lq as i64
}

/// A WGSL `i32` literal, clamped to its range (indices are `u32`, so a clamped bound or
/// offset decides as the unclamped one would).
fn lit_i(x: i64) -> String {
    format!("({}i)", x.clamp(i32::MIN as i64 + 1, i32::MAX as i64))
}
/// A WGSL `u32` literal, clamped to its range.
fn lit_u(x: usize) -> String {
    format!("{}u", x.min(u32::MAX as usize))
}

/// A bitmap of `n` bits with the given ones set, in `u32` words.
fn bitmap(n: usize, ones: impl IntoIterator<Item = usize>) -> Vec<u32> {
    let mut w = vec![0u32; n.div_ceil(32).max(1)];
    for i in ones.into_iter().filter(|&i| i < n) {
        w[i / 32] |= 1 << (i % 32);
    }
    w
}
/// Bit `idx` (a `u32` WGSL expression) of the bitmap of `n` bits in aux buffer `slot`.
fn bit(slot: &str, idx: &str, n: usize) -> String {
    format!(
        "({idx} < {} && ((${slot}[({idx}) / 32u] >> (({idx}) % 32u)) & 1u) != 0u)",
        lit_u(n)
    )
}

/// Causal, bottom-right aligned: `kv <= q + Lk - Lq`.
pub fn causal(lq: usize, lk: usize) -> MaskMod {
    let off = offset(lq, lk);
    MaskMod::new("causal", move |_, _, q, k| k as i64 <= q as i64 + off).with_wgsl(MaskWgsl::new(
        format!("i32(kv_idx) <= i32(q_idx) + {}", lit_i(off)),
        vec![],
    ))
}

/// Sliding window around the (bottom-right aligned) diagonal: `q + off - left <= kv <=
/// q + off + right`; `None` on a side is unbounded (`u32`, as `FlashOptions::window`).
pub fn sliding_window(lq: usize, lk: usize, left: Option<u32>, right: Option<u32>) -> MaskMod {
    let off = offset(lq, lk);
    let d = format!("(i32(kv_idx) - i32(q_idx) - {})", lit_i(off));
    let mut sides: Vec<String> = Vec::new();
    if let Some(l) = left {
        sides.push(format!("{d} >= {}", lit_i(-i64::from(l))));
    }
    if let Some(r) = right {
        sides.push(format!("{d} <= {}", lit_i(i64::from(r))));
    }
    if sides.is_empty() {
        sides.push("true".into());
    }
    MaskMod::new(format!("window({left:?},{right:?})"), move |_, _, q, k| {
        let d = k as i64 - (q as i64 + off);
        left.is_none_or(|l| d >= -i64::from(l)) && right.is_none_or(|r| d <= i64::from(r))
    })
    .with_wgsl(MaskWgsl::new(sides.join(" && "), vec![]))
}

/// The first `n` keys (attention sinks, StreamingLLM), visible to every query (`u32`, as
/// `FlashOptions::sinks`).
pub fn sinks(n: u32) -> MaskMod {
    MaskMod::new(format!("sinks({n})"), move |_, _, _, k| k < n as usize).with_wgsl(MaskWgsl::new(
        format!("kv_idx < {}", lit_u(n as usize)),
        vec![],
    ))
}

/// Global tokens (Longformer, BigBird): these positions see every key and are seen by every
/// query.
pub fn global_tokens(positions: Vec<usize>) -> Result<MaskMod> {
    let mut p = positions;
    p.sort_unstable();
    p.dedup();
    if let Some(&last) = p.last().filter(|&&l| l >= u32::MAX as usize) {
        return Err(AttnError::invalid(
            "global token position",
            format!("below {} (kernel indices are u32)", u32::MAX),
            last,
        ));
    }
    Ok(global_sorted(p))
}

/// [`global_tokens`] of sorted, distinct positions below `u32::MAX`.
fn global_sorted(p: Vec<usize>) -> MaskMod {
    // a bitmap over positions 0..=max in aux0
    let wgsl = match p.last() {
        None => MaskWgsl::new("false", vec![]),
        Some(&last) => MaskWgsl::new(
            format!(
                "{} || {}",
                bit("0", "q_idx", last + 1),
                bit("0", "kv_idx", last + 1)
            ),
            vec![Aux::U32(bitmap(last + 1, p.iter().copied()))],
        ),
    };
    MaskMod::new(format!("global({})", p.len()), move |_, _, q, k| {
        p.binary_search(&q).is_ok() || p.binary_search(&k).is_ok()
    })
    .with_wgsl(wgsl)
}

/// Prefix-LM: the first `prefix` keys are visible to every query, the rest causally.
pub fn prefix_lm(lq: usize, lk: usize, prefix: usize) -> MaskMod {
    // kernel indices are u32: a longer prefix covers every key as u32::MAX does
    sinks(u32::try_from(prefix).unwrap_or(u32::MAX)).or(&causal(lq, lk))
}

/// Document masking from per-token document ids (queries and keys of one packed sequence):
/// a query sees the keys of its own document only (AND it with `causal` for causal
/// documents).
pub fn document(q_docs: Vec<u32>, kv_docs: Vec<u32>) -> MaskMod {
    // aux0: the queries' ids, aux1: the keys'
    let wgsl = if q_docs.is_empty() || kv_docs.is_empty() {
        MaskWgsl::new("false", vec![])
    } else {
        MaskWgsl::new(
            format!(
                "q_idx < {} && kv_idx < {} && $0[q_idx] == $1[kv_idx]",
                lit_u(q_docs.len()),
                lit_u(kv_docs.len())
            ),
            vec![Aux::U32(q_docs.clone()), Aux::U32(kv_docs.clone())],
        )
    };
    MaskMod::new(
        "document",
        move |_, _, q, k| matches!((q_docs.get(q), kv_docs.get(k)), (Some(a), Some(b)) if a == b),
    )
    .with_wgsl(wgsl)
}

/// Document ids from offsets (`cu_seqlens`: document d is tokens `offsets[d]..offsets[d+1]`).
pub fn document_ids(offsets: &[usize], len: usize) -> Vec<u32> {
    let mut ids = vec![u32::MAX; len];
    for (d, w) in offsets.windows(2).enumerate() {
        for id in ids.iter_mut().take(w[1].min(len)).skip(w[0]) {
            *id = d as u32;
        }
    }
    ids
}
fn positive(what: &str, n: usize) -> Result<()> {
    if n == 0 {
        return Err(AttnError::invalid(what, "at least 1", 0));
    }
    Ok(())
}

/// Sparse Transformer's strided pattern (Child et al.), causal: a query sees the `stride`
/// keys before it (itself included) and every `stride`-th key before those,
/// `0 <= d < stride || d % stride == 0` with `d = q + off - kv`.
pub fn strided(lq: usize, lk: usize, stride: usize) -> Result<MaskMod> {
    positive("stride", stride)?;
    let off = offset(lq, lk);
    let s = stride as i64;
    let d = format!("(i32(q_idx) + {} - i32(kv_idx))", lit_i(off));
    let si = lit_i(s);
    Ok(
        MaskMod::new(format!("strided({stride})"), move |_, _, q, k| {
            let d = q as i64 + off - k as i64;
            d >= 0 && (d < s || d % s == 0)
        })
        .with_wgsl(MaskWgsl::new(
            format!("{d} >= 0i && ({d} < {si} || {d} % {si} == 0i)"),
            vec![],
        )),
    )
}

/// Sparse Transformer's fixed pattern, causal: a query sees the earlier keys of its own
/// block of `block` positions, and the last `summary` positions of every earlier block.
pub fn fixed(lq: usize, lk: usize, block: usize, summary: usize) -> Result<MaskMod> {
    positive("block", block)?;
    if summary == 0 || summary > block {
        return Err(AttnError::invalid(
            "summary",
            format!("1 to the block ({block})"),
            summary,
        ));
    }
    let off = offset(lq, lk);
    // k <= qk makes qk >= 0 before the divisions: truncating = flooring there
    let qk = format!("(i32(q_idx) + {})", lit_i(off));
    let (bl, c) = (lit_i(block as i64), lit_i(summary as i64));
    let wgsl = MaskWgsl::new(
        format!(
            "i32(kv_idx) <= {qk} && (i32(kv_idx) / {bl} == {qk} / {bl} || i32(kv_idx) % {bl} >= {bl} - {c})"
        ),
        vec![],
    );
    Ok(
        MaskMod::new(format!("fixed({block},{summary})"), move |_, _, q, k| {
            let qk = q as i64 + off;
            let k = k as i64;
            let (bl, c) = (block as i64, summary as i64);
            k <= qk && (k.div_euclid(bl) == qk.div_euclid(bl) || k % bl >= bl - c)
        })
        .with_wgsl(wgsl),
    )
}

/// A deterministic generator (splitmix64) for seeded patterns.
fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// BigBird (Zaheer et al.) in blocks of `block` tokens: a query block sees the key blocks
/// within `window` blocks of its own (`|qb - kb| <= window`), the first `global` blocks
/// (which also see every block), and `random` key blocks drawn per query block from
/// `seed` (distinct; fewer when there are fewer blocks). Not causal: AND it with
/// [`causal`] for a decoder.
pub fn bigbird(
    lq: usize,
    lk: usize,
    block: usize,
    window: usize,
    global: usize,
    random: usize,
    seed: u64,
) -> Result<MaskMod> {
    positive("block", block)?;
    let (nq, nk) = (lq.div_ceil(block), lk.div_ceil(block));
    let mut state = seed;
    let picks: Vec<Vec<usize>> = (0..nq)
        .map(|_| {
            let mut pool: Vec<usize> = (0..nk).collect();
            let n = random.min(nk);
            // a partial Fisher-Yates shuffle: the first n of the pool
            for i in 0..n {
                let j = i + (splitmix(&mut state) % (nk - i) as u64) as usize;
                pool.swap(i, j);
            }
            let mut p = pool[..n].to_vec();
            p.sort_unstable();
            p
        })
        .collect();
    let b = lit_u(block);
    let (qb, kb) = (format!("(q_idx / {b})"), format!("(kv_idx / {b})"));
    let mut terms = vec![
        format!("max({qb}, {kb}) - min({qb}, {kb}) <= {}", lit_u(window)),
        format!("{qb} < {g} || {kb} < {g}", g = lit_u(global)),
    ];
    let mut aux = Vec::new();
    // the random blocks as a bitmap over (query block, key block) in aux0
    if picks.iter().any(|p| !p.is_empty()) {
        let n = nq
            .checked_mul(nk)
            .filter(|&n| n <= u32::MAX as usize)
            .ok_or_else(|| {
                AttnError::invalid(
                    "bigbird blocks",
                    "at most 2^32 (query block, key block) pairs",
                    format!("{nq} x {nk}"),
                )
            })?;
        terms.push(format!(
            "({kb} < {} && {})",
            lit_u(nk),
            bit("0", &format!("{qb} * {} + {kb}", lit_u(nk)), n)
        ));
        let ones = picks
            .iter()
            .enumerate()
            .flat_map(|(i, p)| p.iter().map(move |&j| i * nk + j));
        aux.push(Aux::U32(bitmap(n, ones)));
    }
    let wgsl = MaskWgsl::new(terms.join(" || "), aux);
    Ok(MaskMod::new(
        format!("bigbird({block},{window},{global},{random},{seed})"),
        move |_, _, q, k| {
            let (qb, kb) = (q / block, k / block);
            qb.abs_diff(kb) <= window
                || qb < global
                || kb < global
                || picks.get(qb).is_some_and(|p| p.binary_search(&kb).is_ok())
        },
    )
    .with_wgsl(wgsl))
}

/// LongLoRA's shifted sparse attention (S²-Attn): tokens in groups of `group`; heads
/// `h < heads / 2` attend within their group, the other half within groups shifted by
/// half a group (the sequence rolled by `group / 2`, so the last half group and the first
/// form one); `causal` adds `kv <= q` (self-attention: Lq = Lk = `len`).
pub fn longlora_shifted(len: usize, heads: usize, group: usize, causal: bool) -> Result<MaskMod> {
    positive("group", group)?;
    positive("heads", heads)?;
    positive("len", len)?;
    let shift = group / 2;
    let gid = |x: &str| {
        format!(
            "select(({x} + {}) % {} / {g}, {x} / {g}, h < {})",
            lit_u(len - shift % len),
            lit_u(len),
            lit_u(heads / 2),
            g = lit_u(group)
        )
    };
    let mut expr = format!("{} == {}", gid("q_idx"), gid("kv_idx"));
    if causal {
        expr.push_str(" && kv_idx <= q_idx");
    }
    Ok(
        MaskMod::new(format!("longlora({group},{heads})"), move |_, h, q, k| {
            let gid = |x: usize| {
                if h < heads / 2 {
                    x / group
                } else {
                    (x + len - shift % len) % len / group
                }
            };
            gid(q) == gid(k) && (!causal || k <= q)
        })
        .with_wgsl(MaskWgsl::new(expr, vec![])),
    )
}

/// One mask of each builder (and both combinators) at a small size, with the shape it was
/// built for, `(mask, Lq, Lk, query heads)`: the twins whose kernels naga checks and
/// translates in `cargo test` (a twin differs from these in its literals and aux data
/// only), and that the tests run through the kernel.
pub fn samples() -> Vec<(MaskMod, usize, usize, usize)> {
    let (l, lq) = (96, 80);
    let docs = document_ids(&[0, 30, 96], l);
    let mut out: Vec<_> = [
        causal(lq, l).or(&sinks(4)),
        sliding_window(lq, l, Some(8), Some(2)),
        prefix_lm(lq, l, 16),
        global_sorted(vec![0, 50]),
        document(docs[..lq].to_vec(), docs).and(&causal(lq, l)),
    ]
    .into_iter()
    .chain(
        [
            strided(lq, l, 8),
            fixed(lq, l, 16, 4),
            bigbird(lq, l, 16, 1, 1, 1, 3),
        ]
        .into_iter()
        .flatten(),
    )
    .map(|m| (m, lq, l, 1))
    .collect();
    // self-attention over 96 tokens: 4 heads (half of them shifted), an 8 x 12 grid
    out.extend(longlora_shifted(l, 4, 32, true).map(|m| (m, l, l, 4)));
    out.extend(maxvit_block(8, 12, 4).map(|m| (m, l, l, 1)));
    out.extend(maxvit_grid(8, 12, 4).map(|m| (m, l, l, 1)));
    out
}

fn grid_check(what: &str, side: usize, n: usize) -> Result<()> {
    if n == 0 || side == 0 || !side.is_multiple_of(n) {
        return Err(AttnError::invalid(
            what,
            format!("a divisor of the grid side {side}"),
            n,
        ));
    }
    Ok(())
}

/// MaxViT's block attention on an `height x width` token grid (row-major): a token sees
/// the tokens of its own `window x window` window.
pub fn maxvit_block(height: usize, width: usize, window: usize) -> Result<MaskMod> {
    grid_check("window (height)", height, window)?;
    grid_check("window (width)", width, window)?;
    Ok(
        MaskMod::new(format!("maxvit_block({window})"), move |_, _, q, k| {
            let (qy, qx, ky, kx) = (q / width, q % width, k / width, k % width);
            qy / window == ky / window && qx / window == kx / window
        })
        .with_wgsl(MaskWgsl::new(
            format!(
            "q_idx / {w} / {n} == kv_idx / {w} / {n} && q_idx % {w} / {n} == kv_idx % {w} / {n}",
            w = lit_u(width),
            n = lit_u(window)
        ),
            vec![],
        )),
    )
}

/// MaxViT's grid attention: a `grid x grid` grid dilated over the image, so a token sees
/// the tokens `height / grid` rows and `width / grid` columns apart from it
/// (`y % (height / grid)` and `x % (width / grid)` equal).
pub fn maxvit_grid(height: usize, width: usize, grid: usize) -> Result<MaskMod> {
    grid_check("grid (height)", height, grid)?;
    grid_check("grid (width)", width, grid)?;
    let (sy, sx) = (height / grid, width / grid);
    Ok(MaskMod::new(
        format!("maxvit_grid({grid})"),
        move |_, _, q, k| {
            let (qy, qx, ky, kx) = (q / width, q % width, k / width, k % width);
            qy % sy == ky % sy && qx % sx == kx % sx
        },
    )
    .with_wgsl(MaskWgsl::new(
        format!(
            "q_idx / {w} % {sy} == kv_idx / {w} % {sy} && q_idx % {w} % {sx} == kv_idx % {w} % {sx}",
            w = lit_u(width),
            sy = lit_u(sy),
            sx = lit_u(sx)
        ),
        vec![],
    )))
}
