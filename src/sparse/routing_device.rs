//! Top-k routing on the device (see [`super::routing`]): the selection per query block
//! ([`RouteKey`], scores in f32) and the attention kernel's block table for the plan's row
//! tiles ([`TableKey`]), recorded into the caller's encoder after the pooling, with no
//! readback.

use super::routing::{check_route, encode_pool, scale_of, TopK};
use crate::context::GpuContext;
use crate::error::{AttnError, Result};
use crate::pipeline::{
    declare_bindings, dispatch_grid, encode_once, folded_grid, BindingDecl, Kernel, UniformLayout,
};
use crate::resources::BoundRange;
use crate::softmax::{AttnShape, FlashOptions};
use crate::sparse::snippet::u;
use crate::sparse::BlockLayout;
use crate::tensor::{DType, Tensor};
use crate::wgsl::Wgsl;
use wgpu::util::DeviceExt;

/// Uniforms of the selection kernel.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, bytemuck::Pod, bytemuck::Zeroable)]
pub struct RouteParams {
    pub hq: u32,
    /// Query heads per key head (GQA).
    pub group: u32,
    pub nq: u32,
    pub nk: u32,
    pub d: u32,
    pub block: u32,
    pub k: u32,
    pub local: u32,
    pub sinks: u32,
    pub slots: u32,
    pub causal: u32,
    pub has_lens: u32,
    pub lq: u32,
    pub lk: u32,
    pub scale: f32,
    pub hkv: u32,
}

const ROUTE_PARAMS_WGSL: &str = "struct RouteParams {
    hq: u32, group: u32, nq: u32, nk: u32,
    d: u32, block: u32, k: u32, local: u32,
    sinks: u32, slots: u32, causal: u32, has_lens: u32,
    lq: u32, lk: u32, scale: f32, hkv: u32,
}
";

const ROUTE_WG: u32 = 64;

/// The selection kernel: one workgroup per (query block, query head, batch). Each invocation
/// owns the key blocks `lid, lid + 64, ..`: it scores them (`scale * mean_q . mean_k`), then in
/// each of `k` rounds offers its best unkept allowed block to a tree reduction (best score,
/// ties to the lower index) and keeps the winner if it owns it; then the local and sink blocks.
/// Invocation 0 writes the row's list, ascending and padded with -1. The `keep` flags
/// (`[B, Hq, nQ, nK]`, 1 = kept) are what the table kernel reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RouteKey;

const ROUTE_MAIN: &str = "var<workgroup> best_s: array<f32, 64>;
var<workgroup> best_i: array<u32, 64>;
var<workgroup> winner: u32;

const NONE: u32 = 0xffffffffu;

// key block kj holds valid keys and, causal, its first key is visible to the query block's last
// query (`last`, shifted by the bottom-right alignment `diag_off`)
fn allowed(kj: u32, key_blocks: u32, last: i32, diag_off: i32) -> bool {
    return kj < key_blocks && (p.causal == 0u || i32(kj * p.block) <= last + diag_off);
}

// (s, i) beats (t, j): a real entry with a higher score, or the same score and a lower index
fn beats(s: f32, i: u32, t: f32, j: u32) -> bool {
    if (i == NONE) { return false; }
    if (j == NONE) { return true; }
    return s > t || (s == t && i < j);
}

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let qi = wid.x;
    let h = wid.y;
    let b = wid.z;
    let row = (b * p.hq + h) * p.nq + qi;
    var qlen = p.lq;
    var kvlen = p.lk;
    if (p.has_lens != 0u) {
        qlen = min(lens[2u * b], p.lq);
        kvlen = min(lens[2u * b + 1u], p.lk);
    }
    let live = qi * p.block < qlen && kvlen > 0u;
    let last = i32(min((qi + 1u) * p.block, max(qlen, 1u))) - 1;
    let diag_off = i32(kvlen) - i32(qlen);
    let key_blocks = (kvlen + p.block - 1u) / p.block;
    let qrow = row * p.d;
    let krow0 = (b * p.hkv + h / p.group) * p.nk;
    // scores of this invocation's blocks; not allowed: never offered
    for (var kj = lid; kj < p.nk; kj += 64u) {
        keep[row * p.nk + kj] = 0u;
        var s = 0.0;
        for (var c = 0u; c < p.d; c++) {
            s += qm[qrow + c] * km[(krow0 + kj) * p.d + c];
        }
        scores[row * p.nk + kj] = p.scale * s;
    }
    for (var round = 0u; round < p.k; round++) {
        var bs = 0.0;
        var bi = NONE;
        for (var kj = lid; kj < p.nk; kj += 64u) {
            let s = scores[row * p.nk + kj];
            if (live && allowed(kj, key_blocks, last, diag_off) && keep[row * p.nk + kj] == 0u && beats(s, kj, bs, bi)) {
                bs = s;
                bi = kj;
            }
        }
        best_s[lid] = bs;
        best_i[lid] = bi;
        workgroupBarrier();
        for (var stride = 32u; stride > 0u; stride = stride / 2u) {
            if (lid < stride && beats(best_s[lid + stride], best_i[lid + stride], best_s[lid], best_i[lid])) {
                best_s[lid] = best_s[lid + stride];
                best_i[lid] = best_i[lid + stride];
            }
            workgroupBarrier();
        }
        if (lid == 0u) { winner = best_i[0]; }
        // uniform for the loop's barriers (Tint checks it)
        let won = workgroupUniformLoad(&winner);
        if (won == NONE) { break; }
        if (won % 64u == lid) {
            keep[row * p.nk + won] = 1u;
        }
    }
    // the diagonal block and those before it, and the first blocks, when allowed
    let diag = u32(clamp(last + diag_off, 0, i32(max(kvlen, 1u)) - 1)) / p.block;
    for (var kj = lid; kj < p.nk; kj += 64u) {
        let near = kj <= diag && diag - kj < p.local;
        if (live && allowed(kj, key_blocks, last, diag_off) && (near || kj < p.sinks)) {
            keep[row * p.nk + kj] = 1u;
        }
    }
    storageBarrier();
    workgroupBarrier();
    if (lid == 0u) {
        var n = 0u;
        for (var kj = 0u; kj < p.nk; kj++) {
            if (keep[row * p.nk + kj] != 0u && n < p.slots) {
                selected[row * p.slots + n] = i32(kj);
                n++;
            }
        }
        for (; n < p.slots; n++) {
            selected[row * p.slots + n] = -1;
        }
    }
}
";

impl Kernel for RouteKey {
    fn label(&self) -> String {
        "sparse_route".into()
    }
    fn source(&self) -> String {
        let mut w = Wgsl::new(&format!(
            "{}: top-k key blocks per query block on the device (generated by wgpu-attention, src/sparse/routing.rs)",
            self.label()
        ));
        w.raw(ROUTE_PARAMS_WGSL);
        w.raw(&declare_bindings(&self.bindings()));
        w.raw(ROUTE_MAIN);
        w.finish()
    }
    fn bindings(&self) -> Vec<BindingDecl> {
        vec![
            BindingDecl::uniform("p", "RouteParams"),
            BindingDecl::read("qm", "f32", "query block means [B, Hq, nQ, D]"),
            BindingDecl::read("km", "f32", "key block means [B, Hkv, nK, D]"),
            BindingDecl::read("lens", "u32", "(q_len, kv_len) per batch"),
            BindingDecl::read_write("scores", "f32", "scratch [B, Hq, nQ, nK]"),
            BindingDecl::read_write("keep", "u32", "kept blocks [B, Hq, nQ, nK]"),
            BindingDecl::read_write("selected", "i32", "[B, Hq, nQ, slots]"),
        ]
    }
    fn workgroup_bytes(&self) -> u32 {
        2 * 4 * ROUTE_WG + 4
    }
    fn capabilities(&self) -> naga::valid::Capabilities {
        naga::valid::Capabilities::empty()
    }
    fn uniforms(&self) -> Vec<UniformLayout> {
        vec![
            crate::uniform_layout!(RouteParams, "RouteParams"; hq, group, nq, nk, d, block, k,
            local, sinks, slots, causal, has_lens, lq, lk, scale, hkv),
        ]
    }
}

/// Uniforms of the table kernel.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, bytemuck::Pod, bytemuck::Zeroable)]
pub struct TableParams {
    /// Lists (batch x heads x row tiles) and state words.
    pub lists: u32,
    pub words: u32,
    pub tiles: u32,
    pub tile_rows: u32,
    pub block: u32,
    pub nq: u32,
    pub nk: u32,
    pub lq: u32,
    /// Where the state table starts (lists are `nk` words apart).
    pub state_base: u32,
    /// `B * Hq * nQ * nK`: the keep flags.
    pub flags: u32,
    /// Invocations per grid row (the grid is 2D past the dispatch limit).
    pub row: u32,
    pub pad: u32,
}

const TABLE_PARAMS_WGSL: &str = "struct TableParams {
    lists: u32, words: u32, tiles: u32, tile_rows: u32,
    block: u32, nq: u32, nk: u32, lq: u32,
    state_base: u32, flags: u32, row: u32, pad: u32,
}
";

/// The block table of the attention kernel from the `keep` flags, in the host's format
/// ([`crate::sparse::attention::block_tables`]): invocation `i < lists` writes row tile `i`'s
/// list (the ascending union of its query blocks' kept blocks, at `2 * lists + i * nK`) and its
/// header (start, count); the next `words` invocations pack 16 block states each (2 = full).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TableKey;

const TABLE_MAIN: &str = "@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.y * p.row + gid.x;
    if (i < p.lists) {
        let bh = i / p.tiles;
        let t = i % p.tiles;
        let first = t * p.tile_rows / p.block;
        let last = min((min((t + 1u) * p.tile_rows, p.lq) - 1u) / p.block, p.nq - 1u);
        let start = 2u * p.lists + i * p.nk;
        var n = 0u;
        for (var kj = 0u; kj < p.nk; kj++) {
            var any = false;
            for (var qi = first; qi <= last; qi++) {
                any = any || keep[(bh * p.nq + qi) * p.nk + kj] != 0u;
            }
            if (any) {
                tab[start + n] = kj;
                n++;
            }
        }
        tab[2u * i] = start;
        tab[2u * i + 1u] = n;
    } else if (i < p.lists + p.words) {
        let w = i - p.lists;
        var bits = 0u;
        for (var j = 0u; j < 16u; j++) {
            let e = 16u * w + j;
            if (e < p.flags && keep[e] != 0u) {
                bits = bits | (2u << (2u * j));
            }
        }
        tab[p.state_base + w] = bits;
    }
}
";

impl Kernel for TableKey {
    fn label(&self) -> String {
        "sparse_route_table".into()
    }
    fn source(&self) -> String {
        let mut w = Wgsl::new(&format!(
            "{}: the block table from routed blocks (generated by wgpu-attention, src/sparse/routing.rs)",
            self.label()
        ));
        w.raw(TABLE_PARAMS_WGSL);
        w.raw(&declare_bindings(&self.bindings()));
        w.raw(TABLE_MAIN);
        w.finish()
    }
    fn bindings(&self) -> Vec<BindingDecl> {
        vec![
            BindingDecl::uniform("p", "TableParams"),
            BindingDecl::read("keep", "u32", "kept blocks [B, Hq, nQ, nK]"),
            BindingDecl::read_write("tab", "u32", "list headers, lists, block states"),
        ]
    }
    fn workgroup_bytes(&self) -> u32 {
        0
    }
    fn capabilities(&self) -> naga::valid::Capabilities {
        naga::valid::Capabilities::empty()
    }
    fn uniforms(&self) -> Vec<UniformLayout> {
        vec![
            crate::uniform_layout!(TableParams, "TableParams"; lists, words, tiles, tile_rows,
            block, nq, nk, lq, state_base, flags, row, pad),
        ]
    }
}

/// A routing recorded on the device ([`encode_route`]): the attention kernel's block table for
/// row tiles of `tile_rows`, and the selection.
#[derive(Clone, Debug)]
pub struct DeviceRouting {
    /// Headers, lists and block states, in the layout of
    /// [`crate::sparse::attention::block_tables`] (lists `nK` words apart).
    pub table: Tensor,
    /// `[B, Hq, nQ, slots]` i32: each query block's key blocks, ascending, padded with -1.
    pub selected: Tensor,
    pub tile_rows: usize,
    pub layout: BlockLayout,
}

impl DeviceRouting {
    /// Lists (batch x heads x row tiles) and where the states start (headers, then the
    /// lists `nK` words apart).
    pub fn table_layout(layout: &BlockLayout, tile_rows: usize) -> (usize, usize) {
        let (_, nk) = layout.blocks();
        let lists = layout.batch * layout.heads * layout.lq.div_ceil(tile_rows.max(1));
        (lists, 2 * lists + lists * nk)
    }
}

/// Records top-k routing into `enc` with no readback: q and k pooled to block means, the
/// selection per query block ([`RouteKey`]: scores in f32, so blocks whose scores tie within
/// f32 rounding may be chosen otherwise than by the host's f64 [`super::routing::route_blocks`]), and the block
/// table for row tiles of `tile_rows` ([`TableKey`]).
pub fn encode_route(
    ctx: &GpuContext,
    enc: &mut wgpu::CommandEncoder,
    q: &Tensor,
    k: &Tensor,
    opts: &FlashOptions,
    topk: &TopK,
    tile_rows: usize,
) -> Result<DeviceRouting> {
    let s = check_route(q, k, opts, topk)?;
    if tile_rows == 0 {
        return Err(AttnError::invalid("tile rows", "at least 1", 0));
    }
    let layout = topk.layout(&s);
    check_route_trips(ctx, &s, topk, &layout, tile_rows)?;
    ctx.scoped(|| {
        let sel = encode_select(ctx, enc, [q, k], opts, topk, &s, &layout)?;
        let table = encode_table(ctx, enc, &sel, &s, topk, &layout, tile_rows)?;
        Ok(DeviceRouting {
            table,
            selected: sel.selected,
            tile_rows,
            layout,
        })
    })
}

/// lavapipe's loop limit: the heaviest invocation's trips in the selection and table kernels.
fn check_route_trips(
    ctx: &GpuContext,
    s: &AttnShape,
    topk: &TopK,
    layout: &BlockLayout,
    tile_rows: usize,
) -> Result<()> {
    let (_, nk) = layout.blocks();
    let slots = topk.slots(s);
    let per_lane = nk.div_ceil(ROUTE_WG as usize) as u64;
    let route_trips = per_lane * (s.d as u64 + 2)
        + topk.k.min(nk) as u64 * (per_lane + 8)
        + nk as u64
        + slots as u64;
    crate::softmax::check_trips(ctx, route_trips, s.lk)?;
    let span = tile_rows.div_ceil(topk.block) as u64 + 1;
    crate::softmax::check_trips(ctx, nk as u64 * (span + 1), s.lk)
}

/// A storage buffer of `words` u32 that the kernels fill entirely (nothing uploaded).
fn route_scratch(
    ctx: &GpuContext,
    what: &'static str,
    words: usize,
    usage: wgpu::BufferUsages,
) -> Result<wgpu::Buffer> {
    let bytes = (words.max(1) as u64).saturating_mul(4);
    ctx.check_binding(what, bytes)?;
    Ok(ctx.device.create_buffer(&wgpu::BufferDescriptor {
        label: Some(what),
        size: bytes,
        usage: wgpu::BufferUsages::STORAGE | usage,
        mapped_at_creation: false,
    }))
}

/// What the selection pass leaves: the chosen blocks, and one flag word per (row, key block).
struct Selection {
    selected: Tensor,
    keep: wgpu::Buffer,
    flags: usize,
}

/// Records the pooling of q and k to block means and the selection per query block.
fn encode_select(
    ctx: &GpuContext,
    enc: &mut wgpu::CommandEncoder,
    [q, k]: [&Tensor; 2],
    opts: &FlashOptions,
    topk: &TopK,
    s: &AttnShape,
    layout: &BlockLayout,
) -> Result<Selection> {
    let (nq, nk) = layout.blocks();
    let slots = topk.slots(s);
    let qm = encode_pool(ctx, enc, q, "q", topk.block, opts.q_lens.as_deref())?;
    let km = encode_pool(ctx, enc, k, "k", topk.block, opts.kv_lens.as_deref())?;
    let rows = s.batch * s.hq * nq;
    let flags = rows.checked_mul(nk).ok_or_else(|| {
        AttnError::invalid(
            "top-k routing",
            "blocks that fit usize",
            format!("{rows} x {nk}"),
        )
    })?;
    let lens: Vec<u32> = (0..s.batch)
        .flat_map(|b| {
            [
                opts.q_lens.as_ref().map_or(s.lq as u32, |l| l[b]),
                opts.kv_lens.as_ref().map_or(s.lk as u32, |l| l[b]),
            ]
        })
        .collect();
    let lens_buf = ctx
        .device
        .create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some("route lens"),
            contents: bytemuck::cast_slice(&lens),
            usage: wgpu::BufferUsages::STORAGE,
        });
    let none = wgpu::BufferUsages::empty();
    let scores = route_scratch(ctx, "route scores", flags, none)?;
    let keep = route_scratch(ctx, "route flags", flags, none)?;
    let selected = Tensor::from_buffer(
        route_scratch(
            ctx,
            "route selection",
            rows * slots,
            wgpu::BufferUsages::COPY_SRC,
        )?,
        vec![s.batch, s.hq, nq, slots],
        vec![s.hq * nq * slots, nq * slots, slots, 1],
        0,
        DType::I32,
    )?;
    let grid = dispatch_grid(
        ctx,
        [
            ("query blocks", nq),
            ("query heads", s.hq),
            ("batch", s.batch),
        ],
    )?;
    let params = route_params(s, opts, topk, layout)?;
    let (qr, kr) = (
        BoundRange::whole(qm.buffer()),
        BoundRange::whole(km.buffer()),
    );
    let sel = BoundRange::new(ctx, &selected, "selected")?;
    let resources = vec![
        qr.resource(),
        kr.resource(),
        lens_buf.as_entire_binding(),
        scores.as_entire_binding(),
        keep.as_entire_binding(),
        sel.resource(),
    ];
    let bytes = bytemuck::bytes_of(&params);
    encode_once(ctx, enc, &RouteKey, bytes, resources, grid)?;
    Ok(Selection {
        selected,
        keep,
        flags,
    })
}

/// The selection kernel's uniforms.
fn route_params(
    s: &AttnShape,
    opts: &FlashOptions,
    topk: &TopK,
    layout: &BlockLayout,
) -> Result<RouteParams> {
    let (nq, nk) = layout.blocks();
    let slots = topk.slots(s);
    Ok(RouteParams {
        hq: u(s.hq, "heads")?,
        group: u(s.hq / s.hkv, "head group")?,
        nq: u(nq, "query blocks")?,
        nk: u(nk, "key blocks")?,
        d: u(s.d, "head dim")?,
        block: u(topk.block, "block")?,
        k: u(topk.k.min(nk), "k")?,
        local: u(topk.local.min(nk), "local blocks")?,
        sinks: u(topk.sinks.min(nk), "sink blocks")?,
        slots: u(slots, "slots")?,
        causal: u32::from(opts.causal),
        has_lens: u32::from(opts.q_lens.is_some() || opts.kv_lens.is_some()),
        lq: u(s.lq, "Lq")?,
        lk: u(s.lk, "Lk")?,
        scale: scale_of(s, opts) as f32,
        hkv: u(s.hkv, "key heads")?,
    })
}

/// Records the block table for row tiles of `tile_rows` from the selection's flags.
fn encode_table(
    ctx: &GpuContext,
    enc: &mut wgpu::CommandEncoder,
    sel: &Selection,
    s: &AttnShape,
    topk: &TopK,
    layout: &BlockLayout,
    tile_rows: usize,
) -> Result<Tensor> {
    let (nq, nk) = layout.blocks();
    let (lists, state_base) = DeviceRouting::table_layout(layout, tile_rows);
    let words = sel.flags.div_ceil(16).max(1);
    let total = state_base + words;
    let table = Tensor::from_buffer(
        route_scratch(
            ctx,
            "routed block table",
            total,
            wgpu::BufferUsages::COPY_SRC,
        )?,
        vec![total],
        vec![1],
        0,
        DType::U32,
    )?;
    let (grid, row) = folded_grid(ctx, "routed block table entries", lists + words, 64)?;
    let params = TableParams {
        lists: u(lists, "row tile lists")?,
        words: u(words, "state words")?,
        tiles: u(s.lq.div_ceil(tile_rows), "row tiles")?,
        tile_rows: u(tile_rows, "tile rows")?,
        block: u(topk.block, "block")?,
        nq: u(nq, "query blocks")?,
        nk: u(nk, "key blocks")?,
        lq: u(s.lq, "Lq")?,
        state_base: u(state_base, "block table words")?,
        flags: u(sel.flags, "block flags")?,
        row: row * 64,
        pad: 0,
    };
    let tr = BoundRange::new(ctx, &table, "routed block table")?;
    let resources = vec![sel.keep.as_entire_binding(), tr.resource()];
    let bytes = bytemuck::bytes_of(&params);
    encode_once(ctx, enc, &TableKey, bytes, resources, grid)?;
    Ok(table)
}
