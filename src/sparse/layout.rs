//! The sparse family on the engine's call path: where a call's block table comes from, and
//! the [`CallLayout`] that plans the kernel key, its tile and the family's buffers.

use std::sync::Arc;

use super::attention::SparsePlan;
use super::attention::{block_tables, check_layout, check_mask, sparse_tiles};
use crate::context::GpuContext;
use crate::error::{AttnError, Result};
use crate::resources::StorageData;
use crate::softmax::call::{CallLayout, FamilyData};
use crate::softmax::plan::{base_key, heuristic_tile, wanted_tile};
use crate::softmax::shader::{Geo, Strategy};
use crate::softmax::{AttnShape, FlashOptions, StrategyChoice};
use crate::sparse::routing::DeviceRouting;
use crate::sparse::shader::SparseParams;
use crate::sparse::snippet::{u, Aux};
use crate::sparse::{BlockLayout, BlockMask};
use crate::tensor::DType;

/// Where a call's block table comes from.
pub(super) enum TableSource {
    /// Built here from the block mask, uploaded with the call.
    Host(Arc<BlockMask>),
    /// Routed on the device ([`encode_route`]) for row tiles of its `tile_rows`.
    Device(DeviceRouting),
    /// Not built yet: planning only (to learn the row tiles a device table must have).
    Pending(BlockLayout),
}

/// The sparse family on the flash call path.
pub(super) struct SparseLayout {
    pub(super) source: TableSource,
    pub(super) geo: Geo,
    pub(super) aux: Vec<Aux>,
    /// Sigmoid attention's bias in log2 units (0 for softmax).
    pub(super) sig_bias: f32,
}

/// The largest power of two (at most `cap`) that divides `n`.
fn pow2_dividing(n: u32, cap: u32) -> u32 {
    let mut p = cap.max(1);
    while p > 1 && !n.is_multiple_of(p) {
        p /= 2;
    }
    p
}

impl SparseLayout {
    pub(super) fn layout(&self) -> &BlockLayout {
        match &self.source {
            TableSource::Host(m) => &m.layout,
            TableSource::Device(r) => &r.layout,
            TableSource::Pending(l) => l,
        }
    }

    /// Query rows per row tile of this plan: a workgroup's (Tiled), a subgroup's of the
    /// largest size (Subgroup; smaller subgroups sit inside one such tile).
    pub(super) fn tile_rows(ctx: &GpuContext, plan: &SparsePlan) -> u32 {
        match plan.key.strategy {
            Strategy::Tiled => plan.key.rows_per_workgroup(),
            Strategy::Subgroup | Strategy::Sweep => ctx.caps.subgroup_max.max(1) * plan.key.rows,
        }
    }
}

impl SparseLayout {
    /// The kernel key, its grid, and the rows of its row tiles.
    pub(super) fn plan_key(
        &self,
        ctx: &GpuContext,
        s: &AttnShape,
        dtype: DType,
        opts: &FlashOptions,
    ) -> Result<(SparsePlan, u32)> {
        // base_key refuses a forced Sweep (neighborhood calls only)
        let mut key = base_key(ctx, s, dtype, opts, self.geo)?;
        if key.strategy == Strategy::Subgroup && key.wg > 64 {
            // subgroups over 64 lanes: GPUs, which take the Tiled kernel (see sparse_tiles)
            if opts.strategy != StrategyChoice::Auto {
                return Err(AttnError::invalid(
                    "strategy Subgroup",
                    "subgroups of at most 64 lanes for sparse attention",
                    ctx.caps.subgroup_max,
                ));
            }
            let mut o = opts.clone();
            o.strategy = StrategyChoice::Force(Strategy::Tiled);
            key = base_key(ctx, s, dtype, &o, self.geo)?;
        }
        let l = self.layout();
        let (bq, bk) = (l.q_block as u32, l.kv_block as u32);
        let candidates = sparse_tiles(&key);
        let tile = match opts.tile {
            Some(t) => wanted_tile(&key, &candidates, t)?,
            None => {
                // tiles inside one query block, where there are any
                let inside: Vec<_> = candidates
                    .iter()
                    .copied()
                    .filter(|t| key.strategy != Strategy::Tiled || bq.is_multiple_of(t.wg * t.rows))
                    .collect();
                let from = if inside.is_empty() {
                    &candidates
                } else {
                    &inside
                };
                let t = heuristic_tile(ctx, &key, from, s, true, false);
                // the GPU heuristic falls back to the key's default tile when no candidate
                // fits its register budget: take the largest tile that stays inside instead
                match from.contains(&t) {
                    true => t,
                    false => from
                        .iter()
                        .copied()
                        .max_by_key(|t| t.wg * t.rows)
                        .unwrap_or(t),
                }
            }
        };
        let mut key = crate::softmax::with_tile(key, tile);
        if key.strategy == Strategy::Tiled {
            key.block = pow2_dividing(bk, key.block);
            key.group = key.group.min(key.block);
        }
        let plan = SparsePlan {
            key,
            grid: [0; 3],
            pair_tiles: false,
        };
        let g = Self::tile_rows(ctx, &plan);
        let (_, nk) = l.blocks();
        // Trips of the key loops: every key block, its steps and groups.
        let step = match key.strategy {
            Strategy::Tiled => key.block,
            Strategy::Subgroup | Strategy::Sweep => ctx.caps.subgroup_min.max(1),
        } as u64;
        let steps = (bk as u64).div_ceil(step);
        let trips = nk as u64 * (1 + steps * (1 + step / key.group as u64));
        crate::softmax::check_trips(ctx, trips, s.lk)?;
        let x = (s.lq as u64).div_ceil(key.rows_per_workgroup() as u64);
        let plan = SparsePlan {
            key,
            grid: crate::softmax::grid(ctx, x, s)?,
            pair_tiles: false,
        };
        Ok((plan, g))
    }
}

impl CallLayout for SparseLayout {
    fn check(&self, s: &AttnShape) -> Result<()> {
        match &self.source {
            TableSource::Host(m) => check_mask(m, s),
            TableSource::Device(DeviceRouting { layout: l, .. }) | TableSource::Pending(l) => {
                check_layout(l, s)
            }
        }
    }
    fn lse_heads_last(&self) -> bool {
        false
    }
    fn plan(
        &self,
        ctx: &GpuContext,
        s: &AttnShape,
        dtype: DType,
        opts: &FlashOptions,
    ) -> Result<(SparsePlan, FamilyData)> {
        let (plan, g) = self.plan_key(ctx, s, dtype, opts)?;
        let l = self.layout();
        let (bq, bk) = (l.q_block as u32, l.kv_block as u32);
        let (nq, nk) = l.blocks();
        let tiles = s.lq.div_ceil(g as usize);
        let (table, state_base) = match &self.source {
            TableSource::Host(m) => {
                let (mut tab, states) = block_tables(m, g as usize)?;
                let base = tab.len();
                tab.extend(states);
                (
                    StorageData::Bytes(bytemuck::cast_slice(&tab).to_vec()),
                    base,
                )
            }
            TableSource::Device(r) => {
                if r.tile_rows != g as usize {
                    return Err(AttnError::invalid(
                        "routed block table",
                        format!("row tiles of {g} rows, as this call's plan"),
                        format!("row tiles of {}", r.tile_rows),
                    ));
                }
                let (_, base) = DeviceRouting::table_layout(l, g as usize);
                (StorageData::View(r.table.clone()), base)
            }
            TableSource::Pending(_) => {
                return Err(AttnError::Gpu(
                    "sparse attention planned without its block table".into(),
                ))
            }
        };
        // a size-1 axis broadcasts: stride 0
        let stride = |n: usize, x: usize, what: &str| if n == 1 { Ok(0) } else { u(x, what) };
        let params = SparseParams {
            q_block: bq,
            kv_block: bk,
            nq: u(nq, "query blocks")?,
            nk: u(nk, "key blocks")?,
            tile_rows: g,
            tiles: u(tiles, "row tiles")?,
            list_b: stride(l.batch, l.heads * tiles, "list stride")?,
            list_h: stride(l.heads, tiles, "list stride")?,
            state_b: stride(l.batch, l.heads * nq * nk, "block table stride")?,
            state_h: stride(l.heads, nq * nk, "block table stride")?,
            state_base: u(state_base, "block list words")?,
            sig_bias: self.sig_bias,
        };
        let mut storage = vec![table];
        storage.extend(self.aux.iter().map(Aux::storage));
        let family = FamilyData {
            uniform: bytemuck::bytes_of(&params).to_vec(),
            storage,
        };
        Ok((plan, family))
    }
}
