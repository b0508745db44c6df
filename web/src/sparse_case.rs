//! The page's sparse panel: a WGSL `mask_mod` typed in the page becomes a block mask on the GPU
//! (FlexAttention's `create_block_mask`), or naga's error quoting the snippet's line.

use serde::{Deserialize, Serialize};
use wgpu_attention::sparse::snippet::{create_block_mask_async, Aux, Snippet, SnippetKind};
use wgpu_attention::sparse::BlockLayout;
use wgpu_attention::{GpuContext, Result};

/// What the panel sends.
#[derive(Clone, Debug, Deserialize)]
pub struct MaskConfig {
    pub source: String,
    pub lq: usize,
    pub lk: usize,
    pub q_block: usize,
    pub kv_block: usize,
    /// `aux0` as i32s (none when empty).
    #[serde(default)]
    pub aux0: Vec<i32>,
}

/// The block mask for the heat map: per query block, the full and the partial key blocks.
#[derive(Clone, Debug, Serialize)]
pub struct MaskReport {
    pub nq: usize,
    pub nk: usize,
    pub full: Vec<Vec<u32>>,
    pub partial: Vec<Vec<u32>>,
    /// Key blocks the attention kernel would visit, of `nq * nk`.
    pub visited: usize,
    pub kernel: String,
}

pub async fn block_mask(ctx: &GpuContext, cfg: &MaskConfig) -> Result<MaskReport> {
    let aux: Vec<Aux> = if cfg.aux0.is_empty() {
        vec![]
    } else {
        vec![Aux::I32(cfg.aux0.clone())]
    };
    let snippet = Snippet::new(SnippetKind::MaskMod, &cfg.source, &aux)?;
    let layout = BlockLayout {
        batch: 1,
        heads: 1,
        lq: cfg.lq,
        lk: cfg.lk,
        q_block: cfg.q_block,
        kv_block: cfg.kv_block,
    };
    let bm = create_block_mask_async(ctx, &snippet, &aux, layout).await?;
    let (nq, nk) = bm.blocks();
    let visited = bm.visited_blocks();
    let (full, partial) = bm.into_lists();
    Ok(MaskReport {
        nq,
        nk,
        visited,
        full,
        partial,
        kernel: format!("sparse_block_count_{}", snippet.hash()),
    })
}
