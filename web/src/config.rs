//! What the page and the self-test say about a case: its configuration (`Config`, `Variant`)
//! and what a run reports back (`Report`, with the `Pattern` and `Weights` of the heat maps).
//! Plain data, serialized to and from the page's JavaScript.

use serde::{Deserialize, Serialize};
use wgpu_attention::bench::Clock;
use wgpu_attention::flash::reference::Comparison;

/// Which kernel mode a case runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Variant {
    /// Full (or causal) attention over sequences, with GQA when `kv_heads < heads`.
    Dense,
    /// Sliding window `(left, right)` plus attention sinks, over sequences.
    Window,
    /// NATTEN neighborhood attention over a 1D, 2D or 3D grid of tokens.
    Neighborhood,
    /// Linear attention (fla's rules) over `lq` tokens: `heads` q/k heads, `value_heads` value
    /// heads, K = V = `d`.
    Linear,
    /// Block-sparse attention (FlexAttention's block masks) over sequences: a seeded random
    /// block mask of `density`, blocks of `block` (query, key), with `causal`.
    Sparse,
    /// Decode over a paged KV cache of `kv_format` in pages of `page_size`: `lk` cached tokens
    /// per sequence, then `lq` steps of one new token each (appended in place, then attended).
    Decode,
}

/// A case, as JSON from the page. Missing fields take the defaults below.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub name: String,
    pub variant: Variant,
    pub batch: usize,
    pub heads: usize,
    pub kv_heads: usize,
    /// Query and key lengths (sequence variants; the grid decides them for neighborhoods).
    pub lq: usize,
    pub lk: usize,
    pub d: usize,
    /// `"f32"` or `"f16"` (f16 needs the adapter's `shader-f16`).
    pub dtype: String,
    pub causal: bool,
    /// Window sides; a negative side is unbounded (as FlashAttention's -1).
    pub window: [i64; 2],
    pub sinks: u32,
    /// Neighborhood: grid shape, then per-axis kernel, dilation, stride and causality.
    pub grid: Vec<usize>,
    pub kernel: Vec<usize>,
    pub dilation: Vec<usize>,
    pub stride: Vec<usize>,
    pub grid_causal: Vec<bool>,
    /// Linear: the rule (`linear`, `retention`, `simple-gla`, `gla`, `delta`, `gated-delta`),
    /// the feature map, the mode (`auto`, `chunk`, `recurrent`) and the value heads (0: as
    /// `heads`).
    pub rule: String,
    pub feature_map: String,
    pub mode: String,
    pub value_heads: usize,
    /// Sparse: query and key block sizes, and the share of blocks listed.
    pub block: [usize; 2],
    pub density: f64,
    /// Sparse: with `topk > 0`, content-routed blocks (the best `topk` key blocks of
    /// `block[0]` per query block, routed on the device) instead of the random mask. The check
    /// needs `topk` at least the key blocks (every allowed block kept: the case's masks alone).
    pub topk: usize,
    /// Decode: the cache's page size and format (`f32`, `f16`, `q8_0`, `q4_0`).
    pub page_size: usize,
    pub kv_format: String,
    /// The query whose attention weights the page draws (batch 0, head 0).
    pub query: usize,
    /// Dense and window: the query tile `[invocations, rows]` instead of the plan's (one of
    /// the plan's candidates, else a typed error naming them), for measuring tiles here.
    pub tile: Option<[u32; 2]>,
    /// Timed runs after one warm-up; the median is reported.
    pub repeats: usize,
    pub seed: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            name: String::new(),
            variant: Variant::Dense,
            batch: 1,
            heads: 4,
            kv_heads: 4,
            lq: 256,
            lk: 256,
            d: 64,
            dtype: "f32".into(),
            causal: false,
            window: [-1, -1],
            sinks: 0,
            grid: vec![16, 16],
            kernel: vec![7, 7],
            dilation: vec![],
            stride: vec![],
            grid_causal: vec![],
            rule: "linear".into(),
            feature_map: "identity".into(),
            mode: "auto".into(),
            value_heads: 0,
            block: [64, 64],
            density: 0.5,
            topk: 0,
            page_size: 16,
            kv_format: "f32".into(),
            query: 0,
            tile: None,
            repeats: 5,
            seed: 1,
        }
    }
}

/// The pattern (which keys each query sees), pooled to at most `MAX_CELLS` x `MAX_CELLS` cells.
#[derive(Clone, Debug, Serialize)]
pub struct Pattern {
    pub rows: usize,
    pub cols: usize,
    /// Fraction of visible (query, key) pairs per cell, 0..=255, row-major.
    pub cells: Vec<u8>,
}

/// The attention weights of one query (batch 0, head 0) over all keys, from the f64 reference.
#[derive(Clone, Debug, Serialize)]
pub struct Weights {
    pub query: usize,
    pub values: Vec<f32>,
    /// The key grid for neighborhoods (the page draws the weights in that shape).
    pub grid: Vec<usize>,
}

/// What one run reports to the page.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub name: String,
    pub variant: Variant,
    pub kernel: String,
    pub dtype: String,
    /// `[batch, lq, lk, heads, kv_heads, d]`.
    pub shape: [usize; 6],
    /// Median GPU time (timestamp queries); `None` where the adapter has no timestamps.
    pub gpu_ms: Option<f64>,
    pub samples_ms: Vec<f64>,
    pub clock: Option<Clock>,
    pub gflops: Option<f64>,
    /// Visible (query, key) pairs per batch and head.
    pub visible_pairs: u64,
    pub check: Comparison,
    pub pattern: Pattern,
    pub weights: Weights,
}
