//! Sparse attention (issue 13): FlexAttention's `BlockMask` and `mask_mod`s on the host, WGSL
//! `mask_mod`/`score_mod` snippets checked by naga with `create_block_mask` evaluating a
//! snippet on the GPU ([`snippet`]), and block-sparse attention itself ([`attention`]: the
//! flash call path with the [`shader::BlockSparse`] geometry, whose key passes walk a block
//! list, the snippets spliced in), with sigmoid attention as a normalizer, and content-routed
//! top-k blocks ([`routing`]).
//!
//! A `mask_mod(b, h, q_idx, kv_idx) -> bool` says whether query `q_idx` sees key `kv_idx`
//! (positions in the sequence, `h` the query head). A [`BlockMask`] cuts the (query, key)
//! plane into `q_block x kv_block` tiles and lists, per (batch, head, query block), the key
//! blocks to visit in ascending order: **full** blocks (every pair visible: no per-element
//! mask needed) and **partial** ones (the mask is evaluated). Batch and head axes of size 1
//! broadcast. Padded tail tiles (past Lq or Lk) are never full. Masks that depend on Lq and Lk
//! align as the library's `causal` does: bottom-right (query i sees key j iff
//! `j <= i + Lk - Lq`), as FlashAttention does.

pub mod attention;
pub mod masks;
pub mod routing;
mod routing_device;
pub mod shader;
pub mod snippet;

pub use attention::{
    encode_sparse_attention, sparse_attention, sparse_attention_into, Normalizer, SparseOptions,
    SparsePlan,
};

use std::sync::Arc;

use crate::error::{AttnError, Result};
use snippet::{Aux, Snippet, SnippetKind};

/// `mask_mod(b, h, q_idx, kv_idx)`: whether the query sees the key.
pub type MaskFn = Arc<dyn Fn(usize, usize, usize, usize) -> bool + Send + Sync>;

/// A named `mask_mod` (the name shows in errors and labels), with the WGSL twin the kernel
/// evaluates on partial blocks when a builder made it ([`MaskMod::snippet`]).
#[derive(Clone)]
pub struct MaskMod {
    pub name: String,
    pub f: MaskFn,
    /// The same mask in WGSL; `None` for a closure of the caller's ([`MaskMod::new`]).
    pub wgsl: Option<MaskWgsl>,
}

/// A builder's mask in WGSL: a `bool` expression over `b`, `h`, `q_idx` and `kv_idx` (the
/// `mask_mod` parameters) that reads its aux buffers as `$0`, `$1`, .. (renumbered when masks
/// combine; [`MaskMod::snippet`] names them `aux0`..`aux3`).
#[derive(Clone, Debug, PartialEq)]
pub struct MaskWgsl {
    pub expr: String,
    pub aux: Vec<Aux>,
}

impl MaskWgsl {
    fn new(expr: impl Into<String>, aux: Vec<Aux>) -> Option<MaskWgsl> {
        Some(MaskWgsl {
            expr: expr.into(),
            aux,
        })
    }

    /// `self op other`, the other's aux references shifted past this one's.
    fn combine(&self, op: &str, other: &MaskWgsl) -> MaskWgsl {
        let n = self.aux.len();
        let mut shifted = String::with_capacity(other.expr.len());
        let mut chars = other.expr.chars().peekable();
        while let Some(c) = chars.next() {
            shifted.push(c);
            if c == '$' {
                let mut digits = String::new();
                while let Some(d) = chars.next_if(char::is_ascii_digit) {
                    digits.push(d);
                }
                let i: usize = digits.parse().unwrap_or(0);
                shifted.push_str(&(i + n).to_string());
            }
        }
        let mut aux = self.aux.clone();
        aux.extend(other.aux.iter().cloned());
        MaskWgsl {
            expr: format!("({}) {op} ({shifted})", self.expr),
            aux,
        }
    }
}

impl std::fmt::Debug for MaskMod {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MaskMod({})", self.name)
    }
}

impl MaskMod {
    pub fn new(
        name: impl Into<String>,
        f: impl Fn(usize, usize, usize, usize) -> bool + Send + Sync + 'static,
    ) -> Self {
        MaskMod {
            name: name.into(),
            f: Arc::new(f),
            wgsl: None,
        }
    }
    /// With its WGSL twin (the builders' way).
    fn with_wgsl(mut self, wgsl: Option<MaskWgsl>) -> Self {
        self.wgsl = wgsl;
        self
    }
    pub fn eval(&self, b: usize, h: usize, q: usize, kv: usize) -> bool {
        (self.f)(b, h, q, kv)
    }
    /// Both masks (FlexAttention's `and_masks`).
    pub fn and(&self, other: &MaskMod) -> MaskMod {
        let (a, o) = (self.f.clone(), other.f.clone());
        MaskMod::new(
            format!("({} & {})", self.name, other.name),
            move |b, h, q, k| a(b, h, q, k) && o(b, h, q, k),
        )
        .with_wgsl(self.combine_wgsl("&&", other))
    }
    /// Either mask (FlexAttention's `or_masks`).
    pub fn or(&self, other: &MaskMod) -> MaskMod {
        let (a, o) = (self.f.clone(), other.f.clone());
        MaskMod::new(
            format!("({} | {})", self.name, other.name),
            move |b, h, q, k| a(b, h, q, k) || o(b, h, q, k),
        )
        .with_wgsl(self.combine_wgsl("||", other))
    }
    fn combine_wgsl(&self, op: &str, other: &MaskMod) -> Option<MaskWgsl> {
        Some(self.wgsl.as_ref()?.combine(op, other.wgsl.as_ref()?))
    }

    /// The WGSL `mask_mod` snippet of a builder's mask (combinators included) and the aux
    /// buffers it reads, for [`SparseOptions`]' `mask_mod` and
    /// `aux` ([`attention::SparseOptions::from_mask_mod`] sets both): the kernel evaluates it
    /// on partial blocks. Refused for a caller's closure (no twin) and past four aux buffers.
    pub fn snippet(&self) -> Result<(Snippet, Vec<Aux>)> {
        let Some(w) = &self.wgsl else {
            return Err(AttnError::invalid(
                "mask_mod",
                "a builder's mask (a closure has no WGSL twin: write a WGSL mask_mod snippet)",
                format!("the closure {}", self.name),
            ));
        };
        if w.aux.len() > snippet::MAX_AUX {
            return Err(AttnError::invalid(
                "mask_mod aux buffers",
                format!("at most {} in all", snippet::MAX_AUX),
                format!("{} in {}", w.aux.len(), self.name),
            ));
        }
        let body = w.expr.replace('$', "aux");
        let src = format!(
            "// {}\nfn mask_mod(b: u32, h: u32, q_idx: u32, kv_idx: u32) -> bool {{\n    return {body};\n}}",
            self.name.replace('\n', " ")
        );
        let sn = Snippet::new(SnippetKind::MaskMod, &src, &w.aux)?;
        Ok((sn, w.aux.clone()))
    }
}

/// The tiling of a block mask: batch and head extents of its lists (1 broadcasts), the
/// sequence lengths and the block sizes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockLayout {
    pub batch: usize,
    pub heads: usize,
    pub lq: usize,
    pub lk: usize,
    pub q_block: usize,
    pub kv_block: usize,
}

impl BlockLayout {
    /// A checked layout: batch, heads and lengths at least 1, block sizes multiples of 16 from
    /// 16 to 256.
    pub fn new(
        batch: usize,
        heads: usize,
        (lq, lk): (usize, usize),
        (q_block, kv_block): (usize, usize),
    ) -> Result<BlockLayout> {
        let l = BlockLayout {
            batch,
            heads,
            lq,
            lk,
            q_block,
            kv_block,
        };
        l.check()?;
        Ok(l)
    }

    /// Query and key blocks (a block size of 0, refused by every call, counts as 1 here).
    pub fn blocks(&self) -> (usize, usize) {
        (
            self.lq.div_ceil(self.q_block.max(1)),
            self.lk.div_ceil(self.kv_block.max(1)),
        )
    }

    /// Query-block rows of the lists: `batch * heads * nQ`, `None` on overflow.
    fn rows(&self) -> Option<usize> {
        self.batch
            .checked_mul(self.heads)?
            .checked_mul(self.blocks().0)
    }

    pub(crate) fn check(&self) -> Result<()> {
        check_block_size("query block size", self.q_block)?;
        check_block_size("key block size", self.kv_block)?;
        if self.lq == 0 || self.lk == 0 || self.batch == 0 || self.heads == 0 {
            return Err(AttnError::invalid(
                "block layout",
                "batch, heads, Lq and Lk >= 1",
                format!("{self:?}"),
            ));
        }
        Ok(())
    }
}

/// FlexAttention's block mask: per (batch|1, head|1, query block), the ascending full and
/// partial key blocks. Its fields are private so that a mask is always well formed: made by
/// [`BlockMask::new`] (checked), by a builder or on the GPU, and read through
/// [`BlockMask::full`] and [`BlockMask::partial`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockMask {
    layout: BlockLayout,
    /// `full[(b * heads + h) * nq + i]`: the key blocks every pair of which is visible.
    full: Vec<Vec<u32>>,
    /// The key blocks some pair of which is visible (the mask is evaluated there).
    partial: Vec<Vec<u32>>,
}

/// Block sizes accepted: multiples of 16 from 16 to 256 (FlexAttention's default is 128).
pub fn check_block_size(what: &str, n: usize) -> Result<()> {
    if n == 0 || n > 256 || !n.is_multiple_of(16) {
        return Err(AttnError::invalid(
            what,
            "a multiple of 16 from 16 to 256",
            n,
        ));
    }
    Ok(())
}

impl BlockMask {
    /// A block mask from its lists, checked: a valid layout, one full and one partial list
    /// per query-block row `(b * heads + h) * nQ + i`, each ascending below nK, no block in
    /// both.
    pub fn new(layout: BlockLayout, full: Vec<Vec<u32>>, partial: Vec<Vec<u32>>) -> Result<Self> {
        layout.check()?;
        let (_, nk) = layout.blocks();
        let rows = layout.rows().ok_or_else(|| {
            AttnError::invalid(
                "block layout",
                "batch * heads * nQ within usize",
                format!("{layout:?}"),
            )
        })?;
        if full.len() != rows || partial.len() != rows {
            return Err(AttnError::invalid(
                "block mask",
                format!("{rows} lists of full and of partial blocks"),
                format!("{} and {}", full.len(), partial.len()),
            ));
        }
        for list in full.iter().chain(&partial) {
            if !list.windows(2).all(|w| w[0] < w[1])
                || list.last().is_some_and(|&j| j as usize >= nk)
            {
                return Err(AttnError::invalid(
                    "block mask",
                    format!("ascending key blocks below {nk}"),
                    format!("{list:?}"),
                ));
            }
        }
        for (r, (f, p)) in full.iter().zip(&partial).enumerate() {
            if let Some(j) = f.iter().find(|j| p.binary_search(j).is_ok()) {
                return Err(AttnError::invalid(
                    "block mask",
                    "a key block either full or partial in a row",
                    format!("block {j} in both lists of row {r}"),
                ));
            }
        }
        Ok(BlockMask {
            layout,
            full,
            partial,
        })
    }

    /// The layout the lists are for.
    pub fn layout(&self) -> &BlockLayout {
        &self.layout
    }

    /// Full key blocks of each query-block row `(b * heads + h) * nQ + i`.
    pub fn full(&self) -> &[Vec<u32>] {
        &self.full
    }

    /// Partial key blocks of each query-block row.
    pub fn partial(&self) -> &[Vec<u32>] {
        &self.partial
    }

    /// The lists, taken out: (full, partial).
    pub fn into_lists(self) -> (Vec<Vec<u32>>, Vec<Vec<u32>>) {
        (self.full, self.partial)
    }

    /// Query and key blocks.
    pub fn blocks(&self) -> (usize, usize) {
        self.layout.blocks()
    }

    /// From a mask_mod evaluated on every pair (on the CPU): all visible = full, some =
    /// partial, none = skipped; tiles cut by Lq or Lk are never full. `batch`/`heads` of 1
    /// evaluate at b = 0 / h = 0 and broadcast.
    pub fn from_mask_mod(mask: &MaskMod, layout: BlockLayout) -> Result<BlockMask> {
        layout.check()?;
        let l = layout;
        let (nq, _) = l.blocks();
        Ok(BlockMask::from_counts(layout, |r, j| {
            let (b, h, i) = (r / (l.heads * nq), r / nq % l.heads, r % nq);
            let rows = i * l.q_block..((i + 1) * l.q_block).min(l.lq);
            let cols = j * l.kv_block..((j + 1) * l.kv_block).min(l.lk);
            rows.map(|q| cols.clone().filter(|&k| mask.eval(b, h, q, k)).count())
                .sum()
        }))
    }

    /// From the visible pairs of every tile, `count(r, j)` for query-block row
    /// `r = (b * heads + h) * nQ + i` and key block `j`: all = full (never a tile cut by Lq or
    /// Lk), some = partial, none = skipped.
    pub(crate) fn from_counts(
        layout: BlockLayout,
        mut count: impl FnMut(usize, usize) -> usize,
    ) -> BlockMask {
        let l = layout;
        let (nq, nk) = l.blocks();
        let n = l.batch * l.heads * nq;
        let (mut full, mut partial) = (Vec::with_capacity(n), Vec::with_capacity(n));
        for r in 0..n {
            let i = r % nq;
            let rows = l.lq.min((i + 1) * l.q_block) - i * l.q_block;
            let (mut f, mut p) = (Vec::new(), Vec::new());
            for j in 0..nk {
                let cols = l.lk.min((j + 1) * l.kv_block) - j * l.kv_block;
                let cut = (i + 1) * l.q_block > l.lq || (j + 1) * l.kv_block > l.lk;
                let seen = count(r, j);
                if seen == rows * cols && !cut {
                    f.push(j as u32);
                } else if seen > 0 {
                    p.push(j as u32);
                }
            }
            full.push(f);
            partial.push(p);
        }
        BlockMask {
            layout,
            full,
            partial,
        }
    }

    /// From a dense boolean block mask `[batch|1, heads|1, nQ, nK]` (row-major): every listed
    /// block is full.
    pub fn from_dense(blocks: &[bool], layout: BlockLayout) -> Result<BlockMask> {
        layout.check()?;
        let (batch, heads) = (layout.batch, layout.heads);
        let (nq, nk) = layout.blocks();
        if blocks.len() != batch * heads * nq * nk {
            return Err(AttnError::invalid(
                "block mask",
                format!(
                    "[{batch}, {heads}, {nq}, {nk}] = {} blocks",
                    batch * heads * nq * nk
                ),
                format!("{} blocks", blocks.len()),
            ));
        }
        let full = blocks
            .chunks(nk)
            .map(|row| {
                row.iter()
                    .enumerate()
                    .filter(|(_, &on)| on)
                    .map(|(j, _)| j as u32)
                    .collect()
            })
            .collect();
        Ok(BlockMask {
            layout,
            full,
            partial: vec![Vec::new(); batch * heads * nq],
        })
    }

    fn row(&self, b: usize, h: usize, q: usize) -> usize {
        let l = &self.layout;
        let (nq, _) = l.blocks();
        let b = if l.batch == 1 { 0 } else { b };
        let h = if l.heads == 1 { 0 } else { h };
        (b * l.heads + h) * nq + q / l.q_block
    }

    /// Whether query `q` sees key `kv` through the block mask and `mask` (evaluated on partial
    /// blocks only): the semantics the kernel will have, and the reference's.
    pub fn visible(&self, mask: Option<&MaskMod>, b: usize, h: usize, q: usize, kv: usize) -> bool {
        let r = self.row(b, h, q);
        let j = (kv / self.layout.kv_block) as u32;
        if self.full[r].binary_search(&j).is_ok() {
            return true;
        }
        self.partial[r].binary_search(&j).is_ok() && mask.is_none_or(|m| m.eval(b, h, q, kv))
    }

    /// The state of the block of query `q` and key `kv`: [`shader::FULL`], [`shader::PARTIAL`]
    /// or [`shader::SKIPPED`].
    pub fn state(&self, b: usize, h: usize, q: usize, kv: usize) -> u32 {
        let r = self.row(b, h, q);
        let j = (kv / self.layout.kv_block) as u32;
        if self.full[r].binary_search(&j).is_ok() {
            shader::FULL
        } else if self.partial[r].binary_search(&j).is_ok() {
            shader::PARTIAL
        } else {
            shader::SKIPPED
        }
    }

    /// Key blocks visited per (batch, head, query block), summed: the work the kernel does.
    pub fn visited_blocks(&self) -> usize {
        self.full.iter().chain(&self.partial).map(Vec::len).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::masks::*;
    use super::*;

    fn lay(
        b: usize,
        h: usize,
        lq: usize,
        lk: usize,
        q_block: usize,
        kv_block: usize,
    ) -> BlockLayout {
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
                global_tokens(vec![0, 64, 149]).unwrap().or(&sliding_window(
                    lq,
                    lk,
                    Some(8),
                    Some(8),
                )),
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
}
