//! Resources (core): how a tensor is bound to a kernel. A view binds the sub-range of its buffer
//! that it spans (`BoundRange`), outputs may not alias inputs or each other
//! (`check_no_alias`), read-only storage data is uploaded or bound as it is (`StorageData`),
//! and the Sweep kernel's Q/K/V reach it as textures (`make_textures`).

use crate::context::GpuContext;
use crate::error::{AttnError, Result};
use crate::pipeline::Kernel;
use crate::tensor::{DType, Tensor};

/// Texels per row of the Sweep kernel's input textures (a power of two: the kernel splits a
/// texel index with a mask and a shift).
pub const TEXTURE_WIDTH: u32 = 4096;

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

/// A kernel's bind group entries in its declared binding order, each resource found by the
/// declared name in `named` (a later entry of a name wins): families bind by the names their
/// kernels declare, never by a hand-kept index. A declared name with nothing to bind is an
/// error (a bug of the family's encoder, reported rather than bound wrong).
pub(crate) fn entries_by_name<'a>(
    kernel: &dyn Kernel,
    named: &[(&str, wgpu::BindingResource<'a>)],
) -> Result<Vec<wgpu::BindGroupEntry<'a>>> {
    (0u32..)
        .zip(kernel.bindings())
        .map(|(binding, decl)| {
            let (_, resource) = named
                .iter()
                .rev()
                .find(|(n, _)| *n == decl.name)
                .ok_or_else(|| {
                    AttnError::Gpu(format!(
                        "{}: nothing to bind to `{}`",
                        kernel.label(),
                        decl.name
                    ))
                })?;
            Ok(wgpu::BindGroupEntry {
                binding,
                resource: resource.clone(),
            })
        })
        .collect()
}
