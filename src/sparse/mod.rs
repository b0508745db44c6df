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
mod layout;
pub mod masks;
pub mod routing;
mod routing_device;
pub mod shader;
pub mod snippet;
mod snippet_eval;
mod snippet_mask;

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
mod tests;
