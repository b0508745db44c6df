//! What every softmax family shares at its surface: the options of a call (a dense call's; the
//! neighborhood and sparse families map theirs onto them), the problem sizes read off the
//! tensors, the output and the plan.

use crate::softmax::shader::FlashKey;
use crate::tensor::Tensor;
use crate::tuning::{Strategy, Tile};

/// Which strategy to use: chosen from the adapter unless forced.
#[non_exhaustive]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum StrategyChoice {
    /// Subgroup shuffles on CPU adapters that have subgroups; workgroup-memory tiles elsewhere.
    #[default]
    Auto,
    Force(Strategy),
}

/// Optional knobs of a flash attention call. `Default` is plain softmax attention.
#[non_exhaustive]
#[derive(Clone, Debug, Default)]
pub struct FlashOptions {
    /// Bottom-right aligned causal mask.
    pub causal: bool,
    /// Softmax scale; `None` is `1 / sqrt(D)`.
    pub scale: Option<f32>,
    /// Tanh softcap `c`: `s = c * tanh(s / c)` after scaling. Must be > 0.
    pub softcap: Option<f32>,
    /// ALiBi slopes, one per query head: adds `-slope * |i + Lk - Lq - j|`.
    pub alibi_slopes: Option<Vec<f32>>,
    /// Additive f32 bias `[B|1, Hq|1, Lq, Lk]` (size-1 axes broadcast); `-inf` masks.
    pub bias: Option<Tensor>,
    /// Valid query rows per batch (`<= Lq`); rows past it are written as 0.
    pub q_lens: Option<Vec<u32>>,
    /// Valid keys per batch (`<= Lk`).
    pub kv_lens: Option<Vec<u32>>,
    /// Sliding window `(left, right)`: query i sees key j iff
    /// `i + Lk - Lq - left <= j <= i + Lk - Lq + right`; `None` on a side is unbounded.
    pub window: (Option<u32>, Option<u32>),
    /// The first `sinks` keys stay visible to every query, whatever the window (not past causality).
    pub sinks: u32,
    /// Also return the log-sum-exp `[B, Hq, Lq]`.
    pub return_lse: bool,
    pub strategy: StrategyChoice,
    /// The query tile, where the caller wants a given one (one of [`crate::flash::tile_choices`]: the planned
    /// key's [`crate::softmax::tile_candidates`] that fit the device's workgroup memory; `tune`
    /// measures them this way).
    /// `None`: the tile `wgpu-attention tune` measured for this class on this adapter, else the
    /// plan's heuristic ([`crate::softmax::plan::heuristic_tile`]).
    pub tile: Option<Tile>,
}

crate::setters!(FlashOptions {
    causal: bool,
    scale: Option<f32>,
    softcap: Option<f32>,
    alibi_slopes: Option<Vec<f32>>,
    bias: Option<Tensor>,
    q_lens: Option<Vec<u32>>,
    kv_lens: Option<Vec<u32>>,
    window: (Option<u32>, Option<u32>),
    sinks: u32,
    return_lse: bool,
    strategy: StrategyChoice,
    tile: Option<Tile>,
});

/// Problem sizes, read off the tensors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttnShape {
    pub batch: usize,
    pub lq: usize,
    pub lk: usize,
    pub hq: usize,
    pub hkv: usize,
    pub d: usize,
    pub dv: usize,
}

impl AttnShape {
    /// FLOPs of the dense problem: `4 * B * Hq * Lq * Lk * D` (for D = Dv; QK^T and PV).
    pub fn flops(&self, causal: bool) -> f64 {
        let f = self.flops_for_pairs(self.lq as u64 * self.lk as u64);
        if causal {
            f / 2.0
        } else {
            f
        }
    }

    /// FLOPs of the work a mask leaves: `2 * (D + Dv)` per visible (query, key) pair, with
    /// `pairs` counted per batch and head.
    pub fn flops_for_pairs(&self, pairs: u64) -> f64 {
        2.0 * (self.batch * self.hq) as f64 * pairs as f64 * (self.d + self.dv) as f64
    }
}

/// What a call of a softmax family (dense, neighborhood, sparse) returns: O and, when asked
/// for, LSE.
#[non_exhaustive]
#[derive(Clone, Debug)]
pub struct AttentionOutput {
    pub out: Tensor,
    pub lse: Option<Tensor>,
}

impl AttentionOutput {
    /// An output made elsewhere (the caller's own O and LSE, for a backward call).
    pub fn new(out: Tensor, lse: Option<Tensor>) -> Self {
        AttentionOutput { out, lse }
    }
}

/// The decisions for one call: kernel specialization and grid.
#[non_exhaustive]
#[derive(Clone, Copy, Debug)]
pub struct SoftmaxPlan {
    pub key: FlashKey,
    pub grid: [u32; 3],
    /// Tiled causal calls on CPU adapters: each workgroup owns query tile `x` and its mirror
    /// `ntiles - 1 - x` (the grid has half the tiles), so every workgroup sees the same number
    /// of keys ([`crate::softmax::plan::pairs_tiles`]).
    pub pair_tiles: bool,
}

impl SoftmaxPlan {
    /// The kernel's label, with ` (tile pairs)` when workgroups own mirrored tile pairs.
    pub fn label(&self) -> String {
        match self.pair_tiles {
            true => format!("{} (tile pairs)", self.key.label()),
            false => self.key.label(),
        }
    }
}
