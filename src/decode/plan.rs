//! The decode plan: the specialization (head-dim capacities, rows per workgroup) and the key
//! splits.

use super::shader::{DecodeKey, DIM_BUCKETS, ROW_CHOICES, TILE, WORKGROUP_BUDGET};
use super::DecodeOptions;
use crate::context::GpuContext;
use crate::error::{u32_of, Result};
use crate::pipeline::Kernel;
use crate::softmax::AttnShape;
use crate::tensor::DType;

/// The decisions of one decode call.
#[non_exhaustive]
#[derive(Clone, Copy, Debug)]
pub struct DecodePlan {
    pub key: DecodeKey,
    /// Key splits per (batch, KV head, row chunk): the grid's x.
    pub splits: u32,
    pub grid: [u32; 3],
    /// Keys one workgroup may visit at most (the longest sequence).
    pub max_keys: u32,
    /// Keys per split for every sequence (balanced by key count), or 0: each sequence's keys
    /// in `splits` runs (a caller's `num_splits`).
    pub per_split: u32,
}

impl DecodePlan {
    pub fn label(&self) -> String {
        format!("{} x{} splits", self.key.label(), self.splits)
    }
}

fn bucket(x: usize) -> u32 {
    DIM_BUCKETS
        .into_iter()
        .find(|&c| c as usize >= x)
        .unwrap_or(DIM_BUCKETS[DIM_BUCKETS.len() - 1])
}

/// The plan for a checked problem: the specialization (head-dim capacities, rows per
/// workgroup: every row of a KV head's group where they fit, up to 8), then the splits.
/// A caller's `num_splits` cuts each sequence into that many runs (raised where a run would
/// take more than [`DecodeKey::tiles_per_split_max`] tiles). Otherwise the work is balanced by
/// key count (Lean Attention's stream-K, at split granularity): every split takes the same
/// number of keys, enough splits in all to fill the adapter (64 workgroups on a CPU adapter,
/// 1024 on a GPU) with at least 4 tiles each, so a long sequence gets many splits and a short
/// one few, and the grid is as wide as the longest sequence needs.
pub fn plan(
    ctx: &GpuContext,
    s: &AttnShape,
    dtype: DType,
    kv: super::KvFormat,
    opts: &DecodeOptions,
) -> Result<DecodePlan> {
    let rows_needed = (s.hq / s.hkv) * s.lq;
    let (d, dv) = (bucket(s.d), bucket(s.dv));
    let key_for = |rows| DecodeKey {
        dtype,
        kv,
        d,
        dv,
        rows,
    };
    let fits: Vec<u32> = ROW_CHOICES
        .into_iter()
        .filter(|&r| key_for(r).workgroup_bytes() <= WORKGROUP_BUDGET)
        .collect();
    let rows = fits
        .iter()
        .copied()
        .find(|&r| r as usize >= rows_needed)
        .or(fits.last().copied())
        .unwrap_or(1);
    let key = key_for(rows);
    let chunks = rows_needed.div_ceil(rows as usize);
    let max_keys = opts
        .cache_seqlens
        .as_ref()
        .and_then(|l| l.iter().max().map(|&x| x as usize))
        .unwrap_or(s.lk);
    let tiles = max_keys.div_ceil(TILE as usize).max(1);
    let min_splits = tiles.div_ceil(key.tiles_per_split_max() as usize);
    let (splits, per_split) = match opts.num_splits {
        Some(n) => ((n as usize).max(min_splits).max(1), 0),
        None => {
            let target: usize = match ctx.adapter_info.device_type {
                wgpu::DeviceType::Cpu => 64,
                _ => 1024,
            };
            // tiles of every (sequence, KV head, row chunk), in all
            let per_seq = |n: usize| n.div_ceil(TILE as usize).max(1);
            let seq_tiles: usize = match &opts.cache_seqlens {
                Some(l) => l.iter().map(|&n| per_seq(n as usize)).sum(),
                None => s.batch * per_seq(s.lk),
            };
            let all = seq_tiles * s.hkv * chunks;
            let cap = key.tiles_per_split_max() as usize;
            let per = all.div_ceil(target).clamp(4, cap.max(4)).min(cap);
            (tiles.div_ceil(per), per * TILE as usize)
        }
    };
    let grid = crate::pipeline::dispatch_grid(
        ctx,
        [
            ("key splits", splits),
            ("KV heads x row chunks", s.hkv * chunks),
            ("batch", s.batch),
        ],
    )?;
    Ok(DecodePlan {
        key,
        splits: grid[0],
        grid,
        max_keys: u32_of(max_keys, "keys")?,
        per_split: u32_of(per_split, "keys per split")?,
    })
}
