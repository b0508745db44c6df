//! Block-sparse attention on the flash call path (FlexAttention's `flex_attention`): a
//! [`BlockMask`], a WGSL `mask_mod` evaluated on its partial blocks, a WGSL `score_mod`, and
//! every option of a dense call (causal, window and sinks, lengths, softcap, ALiBi, bias, LSE).
//!
//! Order for one score (FlexAttention's): `s = scale * q . k`; softcap, ALiBi, bias; the
//! user's `score_mod`; then every mask ANDed: causal, window/sinks, lengths, the block mask and,
//! on partial blocks only, the `mask_mod`. A row that sees no key gives O = 0 and LSE = -inf.
//!
//! The plan takes dense attention's strategy and tile, with the tile shrunk so a workgroup's
//! rows sit inside one query block where a candidate allows (its key passes are then exactly
//! that block's list), and the Tiled kernel's key tile shrunk to divide the key block.

use std::sync::Arc;

use super::layout::{SparseLayout, TableSource};
use crate::context::GpuContext;
use crate::error::{AttnError, Result};
use crate::softmax::call::{check_inputs, encode_with, Call};
use crate::softmax::plan::tunable;
use crate::softmax::reference::{
    attention_reference_hooked, score_of, RefHooks, RefInputs, RefOutput,
};
use crate::softmax::shader::Strategy;
use crate::softmax::{AttentionOutput, AttnShape, FlashOptions, SoftmaxPlan};
use crate::sparse::routing::{encode_route, TopK};
use crate::sparse::shader::{geometry, FULL, PARTIAL};
use crate::sparse::snippet::{
    check_aux, create_block_mask, eval_snippet, Aux, Snippet, SnippetKind,
};
use crate::sparse::{BlockLayout, BlockMask, MaskMod};
use crate::tensor::{DType, Tensor};

/// A sparse call's plan: the engine's [`SoftmaxPlan`] (kernel key, grid).
pub type SparsePlan = SoftmaxPlan;

/// FlexAttention's default block size.
pub const DEFAULT_BLOCK: usize = 128;

/// A sparse attention call's options: a dense call's, and what makes it sparse.
#[non_exhaustive]
#[derive(Clone, Debug, Default)]
pub struct SparseOptions {
    /// Every dense option applies (its masks are ANDed with the block mask).
    pub flash: FlashOptions,
    /// The blocks to visit. `None`: made from `mask_mod` on the GPU ([`create_block_mask`])
    /// with `block_size`, or every block full when there is no `mask_mod` either.
    pub block_mask: Option<Arc<BlockMask>>,
    /// `fn mask_mod(b, h, q_idx, kv_idx) -> bool`, evaluated on partial blocks.
    pub mask_mod: Option<Snippet>,
    /// `fn score_mod(score, b, h, q_idx, kv_idx) -> f32`, after the built-in modifications.
    pub score_mod: Option<Snippet>,
    /// The snippets' `aux0`..`aux3` (both snippets read the same buffers).
    pub aux: Vec<Aux>,
    /// Query and key block sizes when the block mask is made here; `None` is 128 x 128.
    pub block_size: Option<(usize, usize)>,
    /// How a row's scores become weights: softmax (the default) or sigmoid.
    pub normalizer: Normalizer,
    /// Content-routed blocks: the block mask is each query block's top-k key blocks by pooled
    /// scores, routed per call from q and k on the device and recorded into the same encoder
    /// ([`encode_route`]; not with `block_mask` or `mask_mod`).
    pub topk: Option<TopK>,
}

crate::setters!(SparseOptions {
    flash: FlashOptions,
    block_mask: Option<Arc<BlockMask>>,
    mask_mod: Option<Snippet>,
    score_mod: Option<Snippet>,
    aux: Vec<Aux>,
    block_size: Option<(usize, usize)>,
    normalizer: Normalizer,
    topk: Option<TopK>,
});

impl SparseOptions {
    /// FlexAttention's `create_block_mask(mask_mod, ..)` with a builder's mask
    /// ([`crate::sparse::masks`], combinators included): its WGSL twin
    /// ([`MaskMod::snippet`]) as the `mask_mod` with its aux buffers, the block mask made from
    /// it on the GPU per call in blocks of `block_size` (`None`: 128 x 128).
    pub fn from_mask_mod(mask: &MaskMod, block_size: Option<(usize, usize)>) -> Result<Self> {
        let (snippet, aux) = mask.snippet()?;
        Ok(SparseOptions {
            mask_mod: Some(snippet),
            aux,
            block_size,
            ..Default::default()
        })
    }
}

/// How a row's scores become the weights of its values.
#[non_exhaustive]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub enum Normalizer {
    /// `softmax(s)` over the row's visible keys.
    #[default]
    Softmax,
    /// Sigmoid attention (FlashSigmoid, "Theory, Analysis, and Best Practices for Sigmoid
    /// Self-Attention"): weight `sigmoid(s + bias)` for each visible key on its own, no row
    /// normalization, so a row has no LSE (refused). `bias: None` is `-ln(Lk)`.
    Sigmoid { bias: Option<f32> },
}

impl Normalizer {
    /// The sigmoid bias in natural units for keys of length `lk`; `None` for softmax.
    pub fn sigmoid_bias(&self, lk: usize) -> Option<f64> {
        match *self {
            Normalizer::Softmax => None,
            Normalizer::Sigmoid { bias } => {
                Some(bias.map_or_else(|| -(lk.max(1) as f64).ln(), f64::from))
            }
        }
    }
}

/// The block mask a call runs with: the caller's, or one made from its `mask_mod`, or every
/// block full. Checked against the problem.
pub fn resolve_block_mask(
    ctx: &GpuContext,
    s: &AttnShape,
    opts: &SparseOptions,
) -> Result<Arc<BlockMask>> {
    check_options(s, opts)?;
    let (bq, bk) = opts.block_size.unwrap_or((DEFAULT_BLOCK, DEFAULT_BLOCK));
    // made from the mask_mod per (batch, head); all full broadcasts
    let (batch, heads) = match opts.mask_mod {
        Some(_) => (s.batch, s.hq),
        None => (1, 1),
    };
    let layout = BlockLayout {
        batch,
        heads,
        lq: s.lq,
        lk: s.lk,
        q_block: bq,
        kv_block: bk,
    };
    if opts.block_mask.is_none() && opts.topk.is_some() {
        return Err(AttnError::invalid(
            "block mask",
            "a block mask routed from q and k (route_blocks; sparse_attention routes itself)",
            "top-k routing without q and k",
        ));
    }
    let mask = match (&opts.block_mask, &opts.mask_mod) {
        (Some(m), _) => m.clone(),
        (None, Some(mm)) => Arc::new(create_block_mask(ctx, mm, &opts.aux, layout)?),
        (None, None) => {
            let (nq, nk) = layout.blocks();
            Arc::new(BlockMask::from_dense(&vec![true; nq * nk], layout)?)
        }
    };
    check_mask(&mask, s)?;
    let partial: usize = mask.partial.iter().map(Vec::len).sum();
    if partial > 0 && opts.mask_mod.is_none() {
        return Err(AttnError::invalid(
            "block mask",
            "partial blocks only with a mask_mod to evaluate on them (a builder's \
             MaskMod::snippet, or SparseOptions::from_mask_mod, gives its WGSL twin)",
            format!("{partial} partial blocks and no mask_mod"),
        ));
    }
    Ok(mask)
}

/// The options' own consistency: snippet kinds and aux buffers, top-k alone, the sigmoid
/// normalizer without LSE and with a finite bias.
fn check_options(s: &AttnShape, opts: &SparseOptions) -> Result<()> {
    for sn in [&opts.mask_mod, &opts.score_mod].into_iter().flatten() {
        check_aux(sn, &opts.aux)?;
    }
    for (sn, kind) in [
        (&opts.mask_mod, SnippetKind::MaskMod),
        (&opts.score_mod, SnippetKind::ScoreMod),
    ] {
        if let Some(sn) = sn.as_ref().filter(|sn| sn.kind != kind) {
            return Err(AttnError::invalid(
                kind.name(),
                format!("a {} snippet", kind.name()),
                sn.kind.name(),
            ));
        }
    }
    if opts.topk.is_some() && (opts.block_mask.is_some() || opts.mask_mod.is_some()) {
        return Err(AttnError::invalid(
            "topk",
            "top-k routing alone as the source of blocks (no block_mask, no mask_mod)",
            "top-k routing with a block mask or mask_mod",
        ));
    }
    if opts.normalizer != Normalizer::Softmax && opts.flash.return_lse {
        return Err(AttnError::invalid(
            "return_lse",
            "no LSE with the sigmoid normalizer (its weights have no row sum)",
            "return_lse = true",
        ));
    }
    if let Some(b) = opts
        .normalizer
        .sigmoid_bias(s.lk)
        .filter(|b| !b.is_finite())
    {
        return Err(AttnError::invalid("sigmoid bias", "a finite number", b));
    }
    if opts.mask_mod.is_none() && opts.score_mod.is_none() && !opts.aux.is_empty() {
        return Err(AttnError::invalid(
            "aux buffers",
            "none without a mask_mod or score_mod",
            opts.aux.len(),
        ));
    }
    Ok(())
}

/// A block layout fits the problem: valid block sizes, its lengths, batch and heads (or 1).
pub(super) fn check_layout(l: &BlockLayout, s: &AttnShape) -> Result<()> {
    l.check()?;
    let ok = l.lq == s.lq
        && l.lk == s.lk
        && (l.batch == 1 || l.batch == s.batch)
        && (l.heads == 1 || l.heads == s.hq);
    if !ok {
        return Err(AttnError::shape(
            "block mask",
            format!(
                "lengths Lq = {}, Lk = {}, batch {}|1, heads {}|1",
                s.lq, s.lk, s.batch, s.hq
            ),
            format!(
                "Lq = {}, Lk = {}, batch {}, heads {}",
                l.lq, l.lk, l.batch, l.heads
            ),
        ));
    }
    Ok(())
}

/// The block mask fits the problem: its layout ([`check_layout`]; its lists were checked when
/// it was made, [`BlockMask::new`]).
pub(super) fn check_mask(m: &BlockMask, s: &AttnShape) -> Result<()> {
    check_layout(m.layout(), s)
}

/// The tiles a sparse key may take: the budgets' rows or more (up to twice, at most 8) with 16
/// to 128 invocations (Tiled, where dense attention would offer tiles: [`tunable`]),
/// else its default. Fewer than dense attention's (no fewer rows), to bound what naga checks;
/// the workgroup size is what fits a tile inside a query block, and more rows per invocation
/// keep a small workgroup's K/V tile loads paid by as many rows as a dense one's (on lavapipe
/// 4 rows x 16 invocations ran blocks of 128 at half the speed per block of 8 x 128).
pub fn sparse_tiles(key: &crate::softmax::shader::FlashKey) -> Vec<crate::softmax::Tile> {
    if key.strategy != Strategy::Tiled || !tunable(key) {
        return vec![key.tile()];
    }
    crate::softmax::tile_candidates(key)
        .into_iter()
        .filter(|t| t.rows >= key.rows)
        .collect()
}

/// The kernel's tables for row tiles of `g` query rows: per (batch|1, head|1, row tile) the
/// (start, count) of its key blocks (the union of its query blocks' full and partial lists,
/// ascending), then the lists; and the 2-bit block states, 16 to a u32 (bound after the lists,
/// at `SparseParams::state_base`).
pub fn block_tables(m: &BlockMask, g: usize) -> Result<(Vec<u32>, Vec<u32>)> {
    if g == 0 {
        return Err(AttnError::invalid("row tile", "at least 1 query row", g));
    }
    let l = &m.layout;
    let (nq, nk) = l.blocks();
    let tiles = l.lq.div_ceil(g);
    let n_lists = l.batch * l.heads * tiles;
    let mut lists = vec![0u32; 2 * n_lists];
    let mut seen = vec![false; nk];
    for bh in 0..l.batch * l.heads {
        for t in 0..tiles {
            let first = t * g / l.q_block;
            let last = (((t + 1) * g).min(l.lq) - 1) / l.q_block;
            seen.fill(false);
            for qi in first..=last.min(nq - 1) {
                let r = bh * nq + qi;
                for &j in m.full[r].iter().chain(&m.partial[r]) {
                    seen[j as usize] = true;
                }
            }
            let li = bh * tiles + t;
            let start = lists.len() as u32;
            lists.extend((0..nk as u32).filter(|&j| seen[j as usize]));
            lists[2 * li] = start;
            lists[2 * li + 1] = lists.len() as u32 - start;
        }
    }
    let n = l.batch * l.heads * nq * nk;
    let mut states = vec![0u32; n.div_ceil(16).max(1)];
    for r in 0..l.batch * l.heads * nq {
        for (list, st) in [(&m.partial[r], PARTIAL), (&m.full[r], FULL)] {
            for &j in list {
                let e = r * nk + j as usize;
                states[e / 16] |= st << ((e % 16) * 2);
            }
        }
    }
    Ok((lists, states))
}

/// Records sparse attention into `encoder` (for embedders that batch their own work). The
/// block mask is made here when `opts` has none (see [`SparseOptions::block_mask`]): from a
/// `mask_mod`, that submits its own small pass first; top-k routing (`opts.topk`) is recorded
/// into `encoder` before the attention, with no readback ([`encode_route`]).
#[allow(clippy::too_many_arguments)]
pub fn encode_sparse_attention(
    ctx: &GpuContext,
    encoder: &mut wgpu::CommandEncoder,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    out: &Tensor,
    lse: Option<&Tensor>,
    opts: &SparseOptions,
    timestamps: Option<(&wgpu::QuerySet, u32)>,
) -> Result<SparsePlan> {
    let s = check_inputs(q, k, v)?;
    if lse.is_some() && opts.normalizer != Normalizer::Softmax {
        return Err(AttnError::invalid(
            "lse",
            "no LSE output with the sigmoid normalizer (its weights have no row sum)",
            "an LSE tensor",
        ));
    }
    let layout = match (&opts.topk, &opts.block_mask) {
        (Some(t), None) => {
            check_options(&s, opts)?;
            // the row tiles the plan will take, then the table for them
            let mut layout = sparse_layout(opts, TableSource::Pending(t.layout(&s)), s.lk);
            let (_, g) = layout.plan_key(ctx, &s, q.dtype(), &opts.flash)?;
            let routed = encode_route(ctx, encoder, q, k, &opts.flash, t, g as usize)?;
            layout.source = TableSource::Device(routed);
            layout
        }
        _ => {
            let mask = resolve_block_mask(ctx, &s, opts)?;
            sparse_layout(opts, TableSource::Host(mask), s.lk)
        }
    };
    let call = Call {
        q,
        k,
        v,
        out,
        lse,
        opts: &opts.flash,
    };
    encode_with(ctx, encoder, &call, &layout, timestamps)
}

/// The layout of a call: its geometry (the snippets, the normalizer) and its table's source.
fn sparse_layout(opts: &SparseOptions, source: TableSource, lk: usize) -> SparseLayout {
    let aux_types: Vec<&'static str> = opts.aux.iter().map(Aux::wgsl).collect();
    let sig_bias = opts.normalizer.sigmoid_bias(lk);
    SparseLayout {
        source,
        geo: geometry(
            opts.mask_mod.as_ref(),
            opts.score_mod.as_ref(),
            &aux_types,
            sig_bias.is_some(),
        ),
        aux: opts.aux.clone(),
        sig_bias: sig_bias.map_or(0.0, |b| (b * std::f64::consts::LOG2_E) as f32),
    }
}

/// Runs sparse attention into caller-provided outputs and submits the work.
pub fn sparse_attention_into(
    ctx: &GpuContext,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    out: &Tensor,
    lse: Option<&Tensor>,
    opts: &SparseOptions,
) -> Result<SparsePlan> {
    ctx.submit(|enc| encode_sparse_attention(ctx, enc, q, k, v, out, lse, opts, None))
}

/// Sparse attention: returns O `[B, Lq, Hq, Dv]` and, with `opts.flash.return_lse`, LSE
/// `[B, Hq, Lq]`.
pub fn sparse_attention(
    ctx: &GpuContext,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    opts: &SparseOptions,
) -> Result<AttentionOutput> {
    let s = check_inputs(q, k, v)?;
    let out = Tensor::filled(ctx, &[s.batch, s.lq, s.hq, s.dv], q.dtype(), 0.0)?;
    let lse = opts
        .flash
        .return_lse
        .then(|| Tensor::filled(ctx, &[s.batch, s.hq, s.lq], DType::F32, 0.0))
        .transpose()?;
    sparse_attention_into(ctx, q, k, v, &out, lse.as_ref(), opts)?;
    Ok(AttentionOutput { out, lse })
}

/// The f64 reference of a sparse call, `mask` the block mask it runs with
/// ([`resolve_block_mask`]) and `round_p` as in the dense reference. The snippets run on the
/// GPU ([`eval_snippet`]): `mask_mod` at every pair, `score_mod` on the f64 scores rounded to
/// f32; the softmax and the products are done here in f64.
pub fn sparse_reference(
    ctx: &GpuContext,
    inp: &RefInputs,
    opts: &SparseOptions,
    mask: &BlockMask,
    round_p: impl Fn(f64) -> f64,
) -> Result<RefOutput> {
    let s = inp.shape;
    let fo = &opts.flash;
    inp.check(fo)?;
    // the snippets' values per (batch, head) hold one f32 per (query, key) pair
    let pairs = s.lq.checked_mul(s.lk).ok_or_else(|| AttnError::Limit {
        what: "(query, key) pairs the sparse reference evaluates".into(),
        needed: (s.lq as u64).saturating_mul(s.lk as u64),
        limit: usize::MAX as u64,
    })?;
    let per_bh = |f: &mut dyn FnMut(usize, usize) -> Result<Vec<f32>>| -> Result<Vec<Vec<f32>>> {
        let mut all = Vec::with_capacity(s.batch * s.hq);
        for b in 0..s.batch {
            for h in 0..s.hq {
                all.push(f(b, h)?);
            }
        }
        Ok(all)
    };
    let mm = match &opts.mask_mod {
        Some(sn) => Some(per_bh(&mut |b, h| {
            eval_snippet(ctx, sn, &opts.aux, (b, h), 0..s.lq, 0..s.lk, None)
        })?),
        None => None,
    };
    let sm = match &opts.score_mod {
        Some(sn) => Some(per_bh(&mut |b, h| {
            let mut raw = Vec::with_capacity(pairs);
            for i in 0..s.lq {
                for j in 0..s.lk {
                    raw.push(score_of(inp, fo, b, h, i, j) as f32);
                }
            }
            eval_snippet(ctx, sn, &opts.aux, (b, h), 0..s.lq, 0..s.lk, Some(&raw))
        })?),
        None => None,
    };
    let lens = |b: usize| {
        (
            fo.q_lens.as_ref().map_or(s.lq, |l| l[b] as usize),
            fo.kv_lens.as_ref().map_or(s.lk, |l| l[b] as usize),
        )
    };
    let mask_fn = |b: usize, h: usize, i: usize, j: usize| {
        let (qlen, kvlen) = lens(b);
        if !crate::softmax::reference::visible(fo, i, j, qlen, kvlen) {
            return false;
        }
        let e = i * s.lk + j;
        let table = mm.as_ref().map(|t| &t[b * s.hq + h]);
        match mask.state(b, h, i, j) {
            FULL => true,
            PARTIAL => table.is_none_or(|t| t[e] != 0.0),
            _ => false,
        }
    };
    let score_fn = |b: usize, h: usize, i: usize, j: usize, x: f64| match &sm {
        Some(t) => t[b * s.hq + h][i * s.lk + j] as f64,
        None => x,
    };
    let hooks = RefHooks {
        mask: &mask_fn,
        score: &score_fn,
        sigmoid_bias: opts.normalizer.sigmoid_bias(s.lk),
    };
    attention_reference_hooked(inp, fo, &hooks, round_p)
}

/// Every sparse attention specialization the host can build, for naga in `cargo test`: the
/// plain geometry on every shape, tile and key tile the plan may pick, and each shipped
/// example snippet's and builder twin's geometry on the f32 D = 64 keys of both strategies (a snippet changes
/// only its own text; the rest of the kernel is the plain geometry's).
pub fn all_kernels() -> Vec<Box<dyn crate::pipeline::Kernel>> {
    use crate::softmax::{kernel_key, with_tile};
    use crate::sparse::snippet::{EXAMPLES, SCORE_EXAMPLES};
    let plain = geometry(None, None, &[], false);
    let sigmoid = geometry(None, None, &[], true);
    let mut keys = Vec::new();
    // the key, and its twin with a key tile of 16 (a key block of 16, 48, 80, .. shrinks the
    // Tiled key tile to 16)
    let with_k16 = |keys: &mut Vec<_>, k: crate::softmax::shader::FlashKey| {
        if k.strategy == Strategy::Subgroup && k.wg > 64 {
            return; // never planned (see SparseLayout::plan)
        }
        keys.push(k);
        if k.strategy == Strategy::Tiled && k.block > 16 {
            let mut k16 = k;
            k16.block = 16;
            k16.group = k16.group.min(16);
            keys.push(k16);
        }
    };
    crate::softmax::for_each_shared_shape(|strategy, dtype, d, dv, sg| {
        for mods in [false, true] {
            let key = kernel_key(strategy, dtype, d, dv, sg, mods, plain);
            for t in sparse_tiles(&key) {
                with_k16(&mut keys, with_tile(key, t));
            }
        }
        // the sigmoid normalizer changes the key loop's arithmetic and the epilogue: every
        // shape at its default tile
        with_k16(
            &mut keys,
            kernel_key(strategy, dtype, d, dv, sg, false, sigmoid),
        );
    });
    let snippets = EXAMPLES
        .iter()
        .map(|(_, src, t)| (SnippetKind::MaskMod, *src, t.to_vec()))
        .chain(
            SCORE_EXAMPLES
                .iter()
                .map(|(_, src, t)| (SnippetKind::ScoreMod, *src, t.to_vec())),
        );
    // a broken example or twin is reported by the snippet tests
    let examples = snippets.filter_map(|(kind, src, types)| {
        let values: Vec<Aux> = types.iter().map(|t| Aux::placeholder(t)).collect();
        Snippet::new(kind, src, &values).ok()
    });
    let twins = crate::sparse::masks::samples()
        .into_iter()
        .filter_map(|(m, ..)| m.snippet().ok().map(|(sn, _)| sn));
    for sn in examples.chain(twins) {
        let geo = match sn.kind {
            SnippetKind::MaskMod => geometry(Some(&sn), None, &sn.aux, false),
            SnippetKind::ScoreMod => geometry(None, Some(&sn), &sn.aux, false),
        };
        for (strategy, sg) in [(Strategy::Tiled, (0, 0)), (Strategy::Subgroup, (8, 8))] {
            keys.push(kernel_key(strategy, DType::F32, 64, 64, sg, false, geo));
        }
    }
    crate::softmax::boxed(crate::softmax::sorted(keys))
}
