//! What every softmax-attention family shares (dense, neighborhood, and sparse next): the
//! kernel generator and its key ([`shader`]), the budgets that size a specialization, the plan
//! checks every family makes (head-dim buckets, subgroup sizes, llvmpipe's loop limit, grid
//! limits), and the resources of a call (bound sub-ranges of tensors, aliasing checks, the
//! Sweep kernel's textures). A family adds its [`shader::Geometry`] and its plan; it copies
//! none of this.

pub mod shader;

use crate::context::GpuContext;
use crate::error::{AttnError, Result};
use crate::flash::AttnShape;
use crate::pipeline::Kernel;
use crate::tensor::{DType, Tensor};
use shader::{FlashKey, Geo, Strategy, TEXTURE_WIDTH};

/// Head-dim buckets: D is rounded up to one of these and padded lanes read as zero.
pub const HEAD_DIM_BUCKETS: [u32; 13] = [16, 32, 48, 64, 80, 96, 128, 160, 192, 256, 320, 384, 512];
/// The largest D or Dv the kernels are built for.
pub const MAX_HEAD_DIM: usize = 512;
/// Workgroup memory the tiled strategy plans for: the WebGPU default limit, so every adapter fits.
pub const TILE_BUDGET_BYTES: u32 = 16 * 1024;
/// Registers for q rows and accumulators per invocation, in vec4s (`rows * (D + Dv) / 4`):
/// CPU adapters (subgroup strategy) have registers to spare, GPUs (tiled) need occupancy.
const REGISTER_BUDGET_VEC4: [u32; 2] = [128, 256];
/// Unrolled vec4 operations in one key group (`rows * group * (D + Dv) / 4`).
const UNROLL_BUDGET_VEC4: u32 = 512;

/// The head-dim bucket for `d`, or `None` when `d` is 0 or over [`MAX_HEAD_DIM`].
pub fn head_dim_bucket(d: usize) -> Option<u32> {
    HEAD_DIM_BUCKETS
        .iter()
        .copied()
        .find(|&b| d >= 1 && d <= b as usize)
}

pub(crate) fn register_budget(strategy: Strategy) -> u32 {
    match strategy {
        Strategy::Tiled => REGISTER_BUDGET_VEC4[0],
        Strategy::Subgroup | Strategy::Sweep => REGISTER_BUDGET_VEC4[1],
    }
}

/// The kernel specialization for a strategy, dtype, head-dim buckets, (for the subgroup
/// strategy) the adapter's subgroup size range and a family's geometry: rows, key groups and
/// tiles from the register, unroll and workgroup-memory budgets. Families build their keys
/// through it.
#[allow(clippy::too_many_arguments)]
pub fn kernel_key(
    strategy: Strategy,
    dtype: DType,
    d_bucket: u32,
    dv_bucket: u32,
    subgroup: (u32, u32),
    mods: bool,
    geometry: Geo,
) -> FlashKey {
    let (d4, dv4) = (d_bucket / 4, dv_bucket / 4);
    let width = d4 + dv4;
    // Rows per invocation: more rows, fewer loads per FMA, but R * (D + Dv) floats of registers
    // (q and the accumulator). Measured on lavapipe at L2048 D64: R = 2 / 4 / 8 gives 6.7 / 10.9
    // / 15.4 GFLOP/s; R = 16 gives 20.7 but triples the compile time, and at D = 256 R = 4
    // already takes a minute to compile.
    let budget = register_budget(strategy);
    let fit_rows = (budget / width).clamp(1, 8);
    let rows = 1u32 << (31 - fit_rows.leading_zeros()); // a power of two
    match strategy {
        Strategy::Tiled => {
            let fit = TILE_BUDGET_BYTES / (16 * width);
            let block = 1u32 << (31 - fit.min(32).leading_zeros());
            // Keys per unrolled group: the unrolled body is rows * group * (D + Dv) / 4 vec4
            // operations; SwiftShader's compile time grows fast with it.
            let mut group = block.min(8);
            while group > 1 && rows * group * width > UNROLL_BUDGET_VEC4 {
                group /= 2;
            }
            FlashKey {
                strategy,
                dtype,
                d4,
                dv4,
                rows,
                block,
                group,
                wg: 64,
                mods,
                geometry,
                pins: 0,
                lanes: 0,
                stages: 1,
            }
        }
        Strategy::Subgroup | Strategy::Sweep => {
            let (min, max) = subgroup;
            FlashKey {
                strategy,
                dtype,
                d4,
                dv4,
                rows,
                block: 0,
                // Two keys per shuffle round: divides every subgroup size >= 2, and measured on
                // lavapipe (D64, R4) U = 2 / 4 / 8 gives 10.9 / 10.5 / 9.7 GFLOP/s.
                group: 2,
                // a workgroup must fill whole subgroups of the largest size
                wg: if max > 64 { 128 } else { 64 },
                mods,
                geometry,
                pins: 0,
                // (the Sweep kernel's own key loop stops at a partial group: it keeps the loop)
                lanes: if strategy == Strategy::Subgroup && min == max && max == shader::FIXED_LANES
                {
                    max
                } else {
                    0
                },
                stages: 1,
            }
        }
    }
}

/// A query tile: invocations per workgroup, query rows per invocation and (Tiled) K/V stages in
/// workgroup memory. Each kernel key has a default from the budgets ([`kernel_key`]); a family
/// may offer others ([`tile_candidates`]) for its plan to choose from by problem size and for
/// `wgpu-attention tune` to measure.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct Tile {
    pub wg: u32,
    pub rows: u32,
    /// K/V tiles in workgroup memory (Tiled: 1, or 2 to load the next while computing this
    /// one, [`FlashKey::stages`]); 1 for the other strategies.
    #[serde(default = "one_stage")]
    pub stages: u32,
}

fn one_stage() -> u32 {
    1
}

impl Tile {
    /// A one-stage tile.
    pub fn new(wg: u32, rows: u32) -> Self {
        Tile {
            wg,
            rows,
            stages: 1,
        }
    }
}

impl std::fmt::Display for Tile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "wg{}xr{}", self.wg, self.rows)?;
        if self.stages > 1 {
            write!(f, "s{}", self.stages)?;
        }
        Ok(())
    }
}

/// The `Display` form back: `wg64xr8`, or `wg64xr8s2` for two stages. Whether a plan offers
/// the tile is the plan's check (`FlashOptions::tile`).
impl std::str::FromStr for Tile {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let bad = || format!("expected wgWxrR or wgWxrRs2 (e.g. wg64xr8), got '{s}'");
        let rest = s.strip_prefix("wg").ok_or_else(bad)?;
        let (wg, rest) = rest.split_once("xr").ok_or_else(bad)?;
        let (rows, stages) = rest.split_once('s').unwrap_or((rest, "1"));
        let num = |x: &str| x.parse::<u32>().ok().filter(|&v| v > 0).ok_or_else(bad);
        Ok(Tile {
            wg: num(wg)?,
            rows: num(rows)?,
            stages: num(stages)?,
        })
    }
}

impl FlashKey {
    /// This key's tile.
    pub fn tile(&self) -> Tile {
        Tile {
            wg: self.wg,
            rows: self.rows,
            stages: self.stages,
        }
    }
}

/// Workgroup memory a two-stage Tiled key may declare: twice the one-stage budget, the limit of
/// most GPUs and of both CPU drivers here (WebGPU's default is 16 KiB; the plan offers two
/// stages only where the device's limit holds them).
pub const STAGED_BUDGET_BYTES: u32 = 2 * TILE_BUDGET_BYTES;

/// The tiles a key may be rebuilt with, its default among them:
/// - Tiled: 16, 32, 64 or 128 invocations, and rows from a quarter to twice the budget's
///   (at most 8), so a workgroup owns 16 to 1024 query rows. Fewer rows per workgroup make
///   more workgroups (a GPU needs several per compute unit) and skip more of a causal or
///   windowed problem's tiles; more rows reuse each K/V tile more. Each also with two K/V
///   stages ([`FlashKey::stages`]) where the geometry can prefetch and they fit
///   [`STAGED_BUDGET_BYTES`].
/// - Subgroup: half to twice the budget's rows (at most 16), same workgroup: on lavapipe
///   16 rows at D = 64 ran faster than 8 but compile three times longer (benches/RESULTS.md).
/// - Sweep: none but the default (its rows are the window's slots).
pub fn tile_candidates(key: &FlashKey) -> Vec<Tile> {
    let r0 = key.rows;
    let rows = |lo: u32, hi: u32| {
        [r0 / 4, r0 / 2, r0, r0 * 2]
            .into_iter()
            .filter(move |&r| r >= lo.max(1) && r <= hi)
    };
    let mut out: Vec<Tile> = match key.strategy {
        Strategy::Tiled => [16, 32, 64, 128]
            .into_iter()
            .flat_map(|wg| rows(r0 / 4, 8).map(move |rows| Tile::new(wg, rows)))
            .flat_map(|t| {
                let two = Tile { stages: 2, ..t };
                let staged = key.geometry.0.prefetches()
                    && with_tile(*key, two).workgroup_bytes() <= STAGED_BUDGET_BYTES;
                std::iter::once(t).chain(staged.then_some(two))
            })
            .collect(),
        Strategy::Subgroup => rows(r0 / 2, 16)
            .map(|rows| Tile::new(key.wg, rows))
            .collect(),
        Strategy::Sweep => vec![],
    };
    if !out.contains(&key.tile()) {
        out.push(key.tile());
    }
    out.sort_by_key(|t| (t.wg * t.rows, t.rows, t.stages));
    out.dedup();
    out
}

/// `key` rebuilt with `tile` (one of [`tile_candidates`]): the key group shrinks where more
/// rows would pass the unroll budget.
pub fn with_tile(key: FlashKey, tile: Tile) -> FlashKey {
    let mut k = FlashKey {
        wg: tile.wg,
        rows: tile.rows,
        stages: tile.stages,
        ..key
    };
    if k.strategy == Strategy::Tiled {
        let width = k.d4 + k.dv4;
        k.group = k.block.min(8);
        while k.group > 1 && k.rows * k.group * width > UNROLL_BUDGET_VEC4 {
            k.group /= 2;
        }
    }
    k
}

/// Keys sorted by label, without repeats (enumerations overlap where budgets clamp).
pub fn sorted(mut keys: Vec<FlashKey>) -> Vec<FlashKey> {
    keys.sort_by_key(|k| k.label());
    keys.dedup();
    keys
}

/// Keys as [`Kernel`]s, for the host layer's registry.
pub fn boxed(keys: Vec<FlashKey>) -> Vec<Box<dyn Kernel>> {
    keys.into_iter()
        .map(|k| Box::new(k) as Box<dyn Kernel>)
        .collect()
}

/// Subgroup sizes every subgroup specialization is enumerated for (the naga test builds all).
pub const SUBGROUP_SIZES: [u32; 6] = [4, 8, 16, 32, 64, 128];

/// Every `(min, max)` subgroup size range an adapter may report, from [`SUBGROUP_SIZES`].
pub fn subgroup_ranges() -> Vec<(u32, u32)> {
    let mut r = Vec::new();
    for &lo in &SUBGROUP_SIZES {
        for &hi in SUBGROUP_SIZES.iter().filter(|&&h| h >= lo) {
            r.push((lo, hi));
        }
    }
    r
}

/// Calls `f(strategy, dtype, d_bucket, dv_bucket, subgroup)` for every Tiled and Subgroup
/// specialization of the shared kernel any adapter may get: both dtypes, every pair of head-dim
/// buckets, every subgroup size range. A family's enumeration of its keys starts here.
pub fn for_each_shared_shape(mut f: impl FnMut(Strategy, DType, u32, u32, (u32, u32))) {
    for dtype in [DType::F32, DType::F16] {
        for &d in &HEAD_DIM_BUCKETS {
            for &dv in &HEAD_DIM_BUCKETS {
                f(Strategy::Tiled, dtype, d, dv, (0, 0));
                for r in subgroup_ranges() {
                    f(Strategy::Subgroup, dtype, d, dv, r);
                }
            }
        }
    }
}

/// The head-dim buckets of D and Dv, or which of them has none.
pub fn head_dims(shape: &AttnShape) -> Result<(u32, u32)> {
    let d = head_dim_bucket(shape.d).ok_or(AttnError::HeadDim {
        what: "D (q/k head dim)",
        got: shape.d,
        max: MAX_HEAD_DIM,
    })?;
    let dv = head_dim_bucket(shape.dv).ok_or(AttnError::HeadDim {
        what: "Dv (v head dim)",
        got: shape.dv,
        max: MAX_HEAD_DIM,
    })?;
    Ok((d, dv))
}

/// Whether the subgroup strategies can run: SUBGROUP with a size range of 2..=128.
pub fn subgroups_usable(ctx: &GpuContext) -> bool {
    let caps = &ctx.caps;
    caps.subgroups
        && caps.subgroup_min >= 2
        && caps.subgroup_max <= 128
        && caps.subgroup_min <= caps.subgroup_max
}

/// The error for a subgroup strategy forced on an adapter without usable subgroups.
pub fn no_subgroups(ctx: &GpuContext, strategy: Strategy) -> AttnError {
    AttnError::MissingFeature {
        feature: "SUBGROUP (with subgroup sizes 2..=128)",
        adapter: ctx.adapter_info.name.clone(),
        needed_for: format!("the {strategy:?} strategy"),
    }
}

/// Refuses a plan whose key loops would run more iterations per invocation than the driver's
/// loop limit allows (llvmpipe stops loops silently); `trips` as the family counts them.
pub fn check_trips(ctx: &GpuContext, trips: u64, lk: usize) -> Result<()> {
    if let Some(limit) = ctx.caps.loop_limit {
        // a margin for the loops outside the key loops (and a limit under it refuses all)
        let usable = limit.saturating_sub(64);
        if trips > usable {
            return Err(AttnError::Limit {
                what: format!(
                    "loop iterations per invocation for Lk = {lk} ({} driver stops loops silently)",
                    ctx.adapter_info.driver
                ),
                needed: trips,
                limit: usable,
            });
        }
    }
    Ok(())
}

/// The dispatch grid `[x, heads, batch]`, refused past the adapter's per-dimension limit.
pub fn grid(ctx: &GpuContext, x: u64, shape: &AttnShape) -> Result<[u32; 3]> {
    let max = ctx.limits.max_compute_workgroups_per_dimension;
    let grid = [x, shape.hq as u64, shape.batch as u64];
    if let Some(&g) = grid.iter().find(|&&g| g > max as u64) {
        return Err(AttnError::Limit {
            what: "workgroups per dispatch dimension".into(),
            needed: g,
            limit: max as u64,
        });
    }
    // each is at most `max`, a u32
    Ok(grid.map(|g| g as u32))
}

/// The texels of a Q/K/V texture that holds tensor `t`'s whole buffer, or why it cannot: the
/// Sweep kernel reads element `e` as component `e % 4` of texel `e / 4`, so a head-dim run
/// must start on a texel (offset and strides multiples of 4 elements).
pub(crate) fn texture_texels(ctx: &GpuContext, t: &Tensor) -> std::result::Result<u64, String> {
    let texel_bytes = 4 * t.dtype().size() as u64;
    let (offset, strides) = (t.offset(), t.strides());
    if !offset.is_multiple_of(4) || strides.iter().any(|&s| !s.is_multiple_of(4) && s != 1) {
        return Err(format!(
            "Q/K/V offsets and strides that are multiples of 4 elements (got offset {offset}, strides {strides:?})"
        ));
    }
    let buf = t.buffer();
    if !buf.usage().contains(wgpu::BufferUsages::COPY_SRC) {
        return Err("Q/K/V buffers with COPY_SRC usage".into());
    }
    if !buf.size().is_multiple_of(texel_bytes) {
        return Err(format!(
            "Q/K/V buffers of whole texels of 4 elements ({texel_bytes} bytes; got {} bytes)",
            buf.size()
        ));
    }
    let texels = buf.size() / texel_bytes;
    let max_rows = ctx.limits.max_texture_dimension_2d as u64;
    if TEXTURE_WIDTH as u64 > max_rows || texels.div_ceil(TEXTURE_WIDTH as u64) > max_rows {
        return Err(format!(
            "Q/K/V buffers of at most {} texels of 4 elements (max_texture_dimension_2d {max_rows}; got {texels})",
            (TEXTURE_WIDTH as u64).saturating_mul(max_rows)
        ));
    }
    Ok(texels)
}

/// Copies a buffer into a Q/K/V texture row by row: the full rows, then the partial last one.
pub(crate) fn copy_to_texture(
    encoder: &mut wgpu::CommandEncoder,
    buffer: &wgpu::Buffer,
    texture: &wgpu::Texture,
    texels: u64,
    texel_bytes: u64,
) {
    let width = TEXTURE_WIDTH as u64;
    let (full, rest) = (texels / width, texels % width);
    let layout = |offset| wgpu::TexelCopyBufferLayout {
        offset,
        bytes_per_row: Some((width * texel_bytes) as u32),
        rows_per_image: None,
    };
    // rows and widths fit u32: the texture was created with them
    for (row, rows, cols) in [(0, full, width), (full, (rest > 0) as u64, rest)] {
        if rows == 0 {
            continue;
        }
        encoder.copy_buffer_to_texture(
            wgpu::TexelCopyBufferInfo {
                buffer,
                layout: layout(row * width * texel_bytes),
            },
            wgpu::TexelCopyTextureInfo {
                texture,
                mip_level: 0,
                origin: wgpu::Origin3d {
                    x: 0,
                    y: row as u32,
                    z: 0,
                },
                aspect: wgpu::TextureAspect::All,
            },
            wgpu::Extent3d {
                width: cols as u32,
                height: rows as u32,
                depth_or_array_layers: 1,
            },
        );
    }
}

/// A read-only storage buffer a kernel binds beside its shared ones (the sparse family's
/// block tables and aux buffers): host bytes uploaded per call, or a caller's tensor bound as
/// it is (no copy).
pub(crate) enum StorageData {
    Bytes(Vec<u8>),
    View(Tensor),
}

impl StorageData {
    /// Bytes uploaded per call (0 for a tensor).
    pub fn host_bytes(&self) -> u64 {
        match self {
            StorageData::Bytes(b) => b.len() as u64,
            StorageData::View(_) => 0,
        }
    }
    /// Uploads the bytes (a tensor is kept as it is).
    pub fn upload(&self, ctx: &GpuContext, label: &str) -> Result<HeldStorage> {
        use wgpu::util::DeviceExt;
        match self {
            StorageData::View(t) => Ok(HeldStorage::View(t.clone())),
            StorageData::Bytes(bytes) => {
                ctx.check_binding(label, bytes.len() as u64)?;
                // storage bindings are whole words, and never empty
                let mut padded = bytes.clone();
                padded.resize(bytes.len().div_ceil(4).max(1) * 4, 0);
                ctx.scoped(|| {
                    Ok(HeldStorage::Owned(ctx.device.create_buffer_init(
                        &wgpu::util::BufferInitDescriptor {
                            label: Some(label),
                            contents: &padded,
                            usage: wgpu::BufferUsages::STORAGE,
                        },
                    )))
                })
            }
        }
    }
}

/// A [`StorageData`] on the device, ready to bind.
pub(crate) enum HeldStorage {
    Owned(wgpu::Buffer),
    View(Tensor),
}

impl HeldStorage {
    /// The binding: a whole uploaded buffer, or the tensor's range, whose first element must
    /// sit at the range's start (kernels index these from 0): refused otherwise.
    pub fn range<'a>(&'a self, ctx: &GpuContext, what: &str) -> Result<BoundRange<'a>> {
        match self {
            HeldStorage::Owned(b) => Ok(BoundRange::whole(b)),
            HeldStorage::View(t) => {
                let r = BoundRange::new(ctx, t, what)?;
                if r.elem_offset != 0 {
                    return Err(AttnError::invalid(
                        what,
                        format!(
                            "a tensor starting at a multiple of {} bytes (the storage offset alignment)",
                            ctx.limits.min_storage_buffer_offset_alignment
                        ),
                        format!("element offset {}", t.offset()),
                    ));
                }
                Ok(r)
            }
        }
    }
}

/// A tensor's bytes as a binding: the sub-range its view spans, started on the adapter's
/// storage-offset alignment (so a view into a pooled allocation binds without the whole
/// buffer), and the element offset of the view inside that range.
pub(crate) struct BoundRange<'a> {
    buffer: &'a wgpu::Buffer,
    offset: u64,
    size: u64,
    pub elem_offset: u32,
}

impl<'a> BoundRange<'a> {
    pub fn new(ctx: &GpuContext, t: &'a Tensor, what: &str) -> Result<Self> {
        t.require_usage(what, wgpu::BufferUsages::STORAGE)?;
        let (start, end) = t.byte_range();
        let align = u64::from(ctx.limits.min_storage_buffer_offset_alignment.max(4));
        let offset = start / align * align;
        // storage bindings are whole 4-byte words
        let end = end.div_ceil(4) * 4;
        if end > t.buffer().size() {
            return Err(AttnError::invalid(
                format!("{what} buffer"),
                format!("at least {end} bytes (the view's last element, rounded up to 4 bytes)"),
                format!("{} bytes", t.buffer().size()),
            ));
        }
        let size = (end - offset).max(4);
        ctx.check_binding(what, size)?;
        let elem_offset =
            u32::try_from((start - offset) / t.dtype().size() as u64).map_err(|_| {
                AttnError::invalid(what, "a storage offset alignment under 4 GiB", align)
            })?;
        Ok(BoundRange {
            buffer: t.buffer(),
            offset,
            size,
            elem_offset,
        })
    }

    pub fn whole(buffer: &'a wgpu::Buffer) -> Self {
        BoundRange {
            buffer,
            offset: 0,
            size: buffer.size(),
            elem_offset: 0,
        }
    }

    pub fn entry(&self, binding: u32) -> wgpu::BindGroupEntry<'a> {
        wgpu::BindGroupEntry {
            binding,
            resource: self.resource(),
        }
    }

    pub fn resource(&self) -> wgpu::BindingResource<'a> {
        wgpu::BindingResource::Buffer(wgpu::BufferBinding {
            buffer: self.buffer,
            offset: self.offset,
            size: std::num::NonZeroU64::new(self.size),
        })
    }
}

/// Outputs must not share a buffer with an input or with each other: wgpu refuses one buffer
/// bound read-only and writable in one dispatch, and two outputs over the same bytes race.
pub(crate) fn check_no_alias(
    inputs: &[(&str, &Tensor)],
    outputs: &[(&str, &Tensor)],
) -> Result<()> {
    for (i, (name, o)) in outputs.iter().enumerate() {
        let others = inputs.iter().chain(&outputs[..i]);
        if let Some((other, _)) = others.into_iter().find(|(_, t)| t.buffer() == o.buffer()) {
            return Err(AttnError::invalid(
                *name,
                "a buffer of its own (outputs may not share a buffer with an input or another output)",
                format!("the buffer of {other}"),
            ));
        }
        if !o.is_non_overlapping() {
            return Err(AttnError::invalid(
                format!("{name} strides"),
                "strides under which no two elements share memory (no zero or interleaved strides)",
                format!("shape {:?} strides {:?}", o.shape(), o.strides()),
            ));
        }
    }
    Ok(())
}

/// The Sweep kernel's Q, K and V textures, 4096 texels a row, with their texel counts.
pub(crate) fn make_textures(
    ctx: &GpuContext,
    dtype: DType,
    counts: [u64; 3],
) -> [(wgpu::Texture, u64); 3] {
    // inputs are f32 or f16 (integer dtypes are refused by the input checks)
    let format = match dtype {
        DType::F16 => wgpu::TextureFormat::Rgba16Float,
        _ => wgpu::TextureFormat::Rgba32Float,
    };
    let make = |label, texels: u64| {
        let tex = ctx.device.create_texture(&wgpu::TextureDescriptor {
            label: Some(label),
            size: wgpu::Extent3d {
                width: TEXTURE_WIDTH,
                // rows within max_texture_dimension_2d (checked): the cast cannot truncate
                height: texels.div_ceil(TEXTURE_WIDTH as u64) as u32,
                depth_or_array_layers: 1,
            },
            mip_level_count: 1,
            sample_count: 1,
            dimension: wgpu::TextureDimension::D2,
            format,
            usage: wgpu::TextureUsages::TEXTURE_BINDING | wgpu::TextureUsages::COPY_DST,
            view_formats: &[],
        });
        (tex, texels)
    };
    let [tq, tk, tv] = counts;
    [
        make("flash Q texture", tq),
        make("flash K texture", tk),
        make("flash V texture", tv),
    ]
}
