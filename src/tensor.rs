//! GPU tensors: a buffer with a shape, element strides and a dtype.
//!
//! The default layout is row-major (for attention `[batch, seq, heads, dim]`, as FlashAttention,
//! NATTEN and fla use). Other layouts, such as `[batch, heads, seq, dim]`, are the same buffer
//! with other strides: see [`Tensor::from_bhsd`]. The last axis must be contiguous.

use wgpu::util::DeviceExt;

use crate::context::GpuContext;
use crate::error::{AttnError, Result};

pub use crate::dtype::DType;

/// A buffer viewed as a strided tensor. Cheap to clone (the buffer is reference counted).
#[derive(Clone, Debug)]
pub struct Tensor {
    buffer: wgpu::Buffer,
    shape: Vec<usize>,
    strides: Vec<usize>,
    offset: usize,
    dtype: DType,
}

fn contiguous_strides(shape: &[usize]) -> Vec<usize> {
    let mut strides = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        strides[i] = strides[i + 1] * shape[i + 1];
    }
    strides
}

/// The element count of `shape`, or a typed error where it overflows `usize`.
fn checked_numel(shape: &[usize]) -> Result<usize> {
    shape
        .iter()
        .try_fold(1usize, |n, &x| n.checked_mul(x))
        .ok_or_else(|| {
            AttnError::invalid(
                "tensor shape",
                "an element count that fits usize",
                format!("{shape:?}"),
            )
        })
}

fn padded_bytes(bytes: &[u8]) -> Vec<u8> {
    let mut v = bytes.to_vec();
    v.resize(bytes.len().div_ceil(4).max(1) * 4, 0);
    v
}

const USAGE: wgpu::BufferUsages = wgpu::BufferUsages::STORAGE
    .union(wgpu::BufferUsages::COPY_SRC)
    .union(wgpu::BufferUsages::COPY_DST);

impl Tensor {
    fn check_len(shape: &[usize], len: usize) -> Result<()> {
        let n = checked_numel(shape)?;
        if n != len {
            return Err(AttnError::shape(
                "tensor data",
                format!("{n} elements for shape {shape:?}"),
                format!("{len} elements"),
            ));
        }
        Ok(())
    }

    fn upload(ctx: &GpuContext, bytes: &[u8], shape: &[usize], dtype: DType) -> Result<Self> {
        ctx.check_binding("tensor", bytes.len() as u64)?;
        let buffer = ctx.scoped(|| {
            Ok(ctx
                .device
                .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                    label: Some("wgpu-attention tensor"),
                    contents: &padded_bytes(bytes),
                    usage: USAGE,
                }))
        })?;
        Ok(Tensor {
            buffer,
            shape: shape.to_vec(),
            strides: contiguous_strides(shape),
            offset: 0,
            dtype,
        })
    }

    /// Uploads row-major f32 data.
    pub fn from_f32(ctx: &GpuContext, data: &[f32], shape: &[usize]) -> Result<Self> {
        Self::check_len(shape, data.len())?;
        Self::upload(ctx, bytemuck::cast_slice(data), shape, DType::F32)
    }

    /// Uploads row-major i32 data (snippets' aux buffers).
    pub fn from_i32(ctx: &GpuContext, data: &[i32], shape: &[usize]) -> Result<Self> {
        Self::check_len(shape, data.len())?;
        Self::upload(ctx, bytemuck::cast_slice(data), shape, DType::I32)
    }

    /// Uploads row-major u32 data (snippets' aux buffers).
    pub fn from_u32(ctx: &GpuContext, data: &[u32], shape: &[usize]) -> Result<Self> {
        Self::check_len(shape, data.len())?;
        Self::upload(ctx, bytemuck::cast_slice(data), shape, DType::U32)
    }

    /// Uploads row-major f16 data.
    pub fn from_f16(ctx: &GpuContext, data: &[half::f16], shape: &[usize]) -> Result<Self> {
        Self::check_len(shape, data.len())?;
        Self::upload(ctx, bytemuck::cast_slice(data), shape, DType::F16)
    }

    /// Uploads f32 data laid out `[batch, heads, seq, dim]` and returns it as a
    /// `[batch, seq, heads, dim]` tensor (a strided view of the same buffer, no copy).
    pub fn from_bhsd(ctx: &GpuContext, data: &[f32], bhsd: [usize; 4]) -> Result<Self> {
        let [b, h, s, d] = bhsd;
        let t = Self::from_f32(ctx, data, &bhsd)?;
        t.with_layout(vec![b, s, h, d], vec![h * s * d, d, s * d, 1], 0)
    }

    /// A float tensor of `shape` with every element equal to `value` (tests poison outputs
    /// with NaN); integer dtypes are refused.
    pub fn filled(ctx: &GpuContext, shape: &[usize], dtype: DType, value: f32) -> Result<Self> {
        dtype.require_float("filled tensor")?;
        let n = checked_numel(shape)?;
        ctx.check_binding("tensor", (n as u64).saturating_mul(dtype.size() as u64))?;
        match dtype {
            DType::F16 => Self::from_f16(ctx, &vec![half::f16::from_f32(value); n], shape),
            _ => Self::from_f32(ctx, &vec![value; n], shape),
        }
    }

    /// Wraps a buffer the caller owns. `strides` and `offset` are in elements; the buffer needs
    /// STORAGE usage (and COPY_SRC to be read back with [`Tensor::to_vec_f32`]).
    pub fn from_buffer(
        buffer: wgpu::Buffer,
        shape: Vec<usize>,
        strides: Vec<usize>,
        offset: usize,
        dtype: DType,
    ) -> Result<Self> {
        let t = Tensor {
            buffer,
            shape: Vec::new(),
            strides: Vec::new(),
            offset: 0,
            dtype,
        };
        t.with_layout(shape, strides, offset)
    }

    /// The same buffer seen with another shape, strides and offset (checked to stay inside it,
    /// with every index computed in checked arithmetic: a view whose last element overflows
    /// `usize` is an error, never a wrapped index).
    pub fn with_layout(
        &self,
        shape: Vec<usize>,
        strides: Vec<usize>,
        offset: usize,
    ) -> Result<Self> {
        if shape.len() != strides.len() {
            return Err(AttnError::shape(
                "strides",
                format!("{} strides", shape.len()),
                strides,
            ));
        }
        if shape.last().is_some() && strides.last() != Some(&1) {
            return Err(AttnError::invalid(
                "strides",
                "last axis contiguous (stride 1)",
                format!("{strides:?}"),
            ));
        }
        let overflow = || {
            AttnError::invalid(
                "tensor view",
                "a shape, strides and offset whose element indices fit usize",
                format!("shape {shape:?} strides {strides:?} offset {offset}"),
            )
        };
        shape
            .iter()
            .try_fold(1usize, |n, &x| n.checked_mul(x))
            .ok_or_else(overflow)?;
        let last = shape
            .iter()
            .zip(&strides)
            .try_fold(offset, |acc, (&n, &s)| {
                n.saturating_sub(1)
                    .checked_mul(s)
                    .and_then(|x| acc.checked_add(x))
            })
            .ok_or_else(overflow)?;
        let elems = self.buffer.size() / self.dtype.size() as u64;
        if shape.iter().product::<usize>() > 0 && last as u64 >= elems {
            return Err(AttnError::shape(
                "tensor view",
                format!("within a buffer of {elems} elements"),
                format!(
                    "shape {shape:?} strides {strides:?} offset {offset} reaching element {last}"
                ),
            ));
        }
        if last > u32::MAX as usize {
            return Err(AttnError::Limit {
                what: "tensor element index".into(),
                needed: last as u64,
                limit: u32::MAX as u64,
            });
        }
        Ok(Tensor {
            buffer: self.buffer.clone(),
            shape,
            strides,
            offset,
            dtype: self.dtype,
        })
    }

    /// The bytes `[start, end)` this view's elements span in its buffer (`start == end` for an
    /// empty view). Never overflows: [`Tensor::with_layout`] checked the last index.
    pub fn byte_range(&self) -> (u64, u64) {
        let e = self.dtype.size() as u64;
        let start = self.offset as u64 * e;
        if self.numel() == 0 {
            return (start, start);
        }
        let last: u64 = self
            .shape
            .iter()
            .zip(&self.strides)
            .map(|(&n, &s)| (n as u64 - 1) * s as u64)
            .sum::<u64>()
            + self.offset as u64;
        (start, (last + 1) * e)
    }

    /// Whether distinct indices always address distinct elements (an output view where two
    /// rows share memory would be a race: a zero stride, or strides that interleave axes).
    pub fn is_non_overlapping(&self) -> bool {
        let mut axes: Vec<(usize, usize)> = self
            .shape
            .iter()
            .zip(&self.strides)
            .filter(|(&n, _)| n > 1)
            .map(|(&n, &s)| (s, n))
            .collect();
        axes.sort_unstable();
        // each axis must step past everything the faster axes span
        let mut span: u64 = 1; // elements from one index of the fastest axes to past their last
        for (s, n) in axes {
            if (s as u64) < span {
                return false;
            }
            span += s as u64 * (n as u64 - 1);
        }
        true
    }

    /// Checks that the buffer has `usage` (e.g. STORAGE to be bound by a kernel).
    pub fn require_usage(&self, what: &str, usage: wgpu::BufferUsages) -> Result<()> {
        let has = self.buffer.usage();
        if !has.contains(usage) {
            return Err(AttnError::invalid(
                format!("{what} buffer usage"),
                format!("{usage:?}"),
                format!("{has:?}"),
            ));
        }
        Ok(())
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }
    pub fn strides(&self) -> &[usize] {
        &self.strides
    }
    pub fn offset(&self) -> usize {
        self.offset
    }
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    pub fn buffer(&self) -> &wgpu::Buffer {
        &self.buffer
    }
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Row-major strides of `shape` (the last axis fastest).
    pub(crate) fn contiguous_strides_of(shape: &[usize]) -> Vec<usize> {
        contiguous_strides(shape)
    }

    /// The same view of the same buffer (shape, strides, offset, dtype).
    pub fn same_view(&self, other: &Tensor) -> bool {
        self.buffer == other.buffer
            && self.shape == other.shape
            && self.strides == other.strides
            && self.offset == other.offset
            && self.dtype == other.dtype
    }

    /// Row-major with no gaps and no offset (outputs that kernels index directly).
    pub fn is_contiguous(&self) -> bool {
        self.offset == 0 && self.strides == contiguous_strides(&self.shape)
    }

    /// Downloads the tensor in row-major order of its shape, as f32 (float tensors; integer
    /// ones are refused rather than rounded). Blocks.
    pub fn to_vec_f32(&self, ctx: &GpuContext) -> Result<Vec<f32>> {
        pollster::block_on(self.to_vec_f32_async(ctx))
    }

    /// Downloads the tensor. Natively the first poll of the future waits for the device; in a
    /// browser the future resolves when the copy has finished, without blocking the page.
    /// The buffer needs COPY_SRC usage (a typed error otherwise); only the bytes the view spans
    /// are copied.
    pub fn to_vec_f32_async(
        &self,
        ctx: &GpuContext,
    ) -> impl std::future::Future<Output = Result<Vec<f32>>> {
        let dtype = self.dtype;
        let decode = move |bytes: &[u8]| -> Vec<f32> {
            match dtype {
                DType::F16 => bytemuck::cast_slice::<u8, half::f16>(bytes)
                    .iter()
                    .map(|h| h.to_f32())
                    .collect(),
                // refused before the readback for the integer types
                _ => bytemuck::cast_slice::<u8, f32>(bytes).to_vec(),
            }
        };
        self.read_async(
            ctx,
            dtype.require_float("tensor read back as f32"),
            decode,
            f32::NAN,
        )
    }

    /// Downloads an i32 tensor (the routing's selection) in row-major order. Blocks.
    pub fn to_vec_i32(&self, ctx: &GpuContext) -> Result<Vec<i32>> {
        Ok(bytemuck::cast_vec(self.read_words(ctx, DType::I32)?))
    }

    /// Downloads a u32 tensor (a routed block table) in row-major order. Blocks.
    pub fn to_vec_u32(&self, ctx: &GpuContext) -> Result<Vec<u32>> {
        self.read_words(ctx, DType::U32)
    }

    /// [`Tensor::to_vec_u32`] without blocking (the browser's form).
    pub fn to_vec_u32_async(
        &self,
        ctx: &GpuContext,
    ) -> impl std::future::Future<Output = Result<Vec<u32>>> {
        self.read_words_async(ctx, DType::U32)
    }

    /// The 4-byte elements of a tensor of dtype `want`, as raw words. Blocks.
    fn read_words(&self, ctx: &GpuContext, want: DType) -> Result<Vec<u32>> {
        pollster::block_on(self.read_words_async(ctx, want))
    }

    fn read_words_async(
        &self,
        ctx: &GpuContext,
        want: DType,
    ) -> impl std::future::Future<Output = Result<Vec<u32>>> {
        let check = match self.dtype == want {
            true => Ok(()),
            false => Err(AttnError::DType {
                what: format!("tensor read back as {want}"),
                expected: want.to_string(),
                actual: self.dtype.to_string(),
            }),
        };
        let decode = |bytes: &[u8]| bytemuck::cast_slice::<u8, u32>(bytes).to_vec();
        self.read_async(ctx, check, decode, 0)
    }

    /// The readback shared by the `to_vec_*` calls: after `check`, the view's bytes copied out,
    /// mapped, decoded to elements and gathered row-major (`fill` where none was read).
    fn read_async<T: Copy>(
        &self,
        ctx: &GpuContext,
        check: Result<()>,
        decode: impl FnOnce(&[u8]) -> Vec<T>,
        fill: T,
    ) -> impl std::future::Future<Output = Result<Vec<T>>> {
        let started = check.and_then(|()| self.start_readback(ctx));
        let this = self.clone();
        let device = ctx.device.clone();
        async move {
            let (staging, base, rx) = started?;
            device
                .poll(wgpu::PollType::Wait {
                    submission_index: None,
                    timeout: None,
                })
                .map_err(|e| AttnError::Gpu(e.to_string()))?;
            rx.await
                .map_err(|_| AttnError::Gpu("readback was cancelled".into()))?
                .map_err(|e| AttnError::Gpu(format!("readback failed: {e}")))?;
            let view = staging
                .get_mapped_range(..)
                .map_err(|e| AttnError::Gpu(format!("readback mapping failed: {e:?}")))?;
            let raw = decode(&view);
            drop(view);
            staging.unmap();
            Ok(this.gather(&raw, base, fill))
        }
    }

    /// Copies the view's bytes into a mappable buffer and asks for the mapping: the staging
    /// buffer, the element index its first element has in this tensor's buffer, and the
    /// mapping's callback.
    #[allow(clippy::type_complexity)]
    fn start_readback(
        &self,
        ctx: &GpuContext,
    ) -> Result<(
        wgpu::Buffer,
        usize,
        futures::channel::oneshot::Receiver<std::result::Result<(), wgpu::BufferAsyncError>>,
    )> {
        self.require_usage("readback source", wgpu::BufferUsages::COPY_SRC)?;
        let (start, end) = self.byte_range();
        // copies move whole 4-byte words
        let base = start / 4 * 4;
        let end = end.div_ceil(4) * 4;
        if end > self.buffer.size() {
            return Err(AttnError::invalid(
                "readback source",
                "a buffer whose size is a multiple of 4 bytes",
                format!("{} bytes", self.buffer.size()),
            ));
        }
        let size = (end - base).max(4);
        let staging = ctx.scoped(|| {
            let staging = ctx.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("wgpu-attention readback"),
                size,
                usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            });
            let mut enc = ctx.device.create_command_encoder(&Default::default());
            enc.copy_buffer_to_buffer(&self.buffer, base, &staging, 0, end - base);
            ctx.queue.submit([enc.finish()]);
            Ok(staging)
        })?;
        let (tx, rx) = futures::channel::oneshot::channel();
        staging.map_async(wgpu::MapMode::Read, .., move |r| {
            let _ = tx.send(r);
        });
        Ok((staging, (base / self.dtype.size() as u64) as usize, rx))
    }

    /// Picks this view's elements, row-major, out of the whole buffer's contents.
    fn gather<T: Copy>(&self, raw: &[T], base: usize, fill: T) -> Vec<T> {
        let n = self.numel();
        let mut out = Vec::with_capacity(n);
        let mut idx = vec![0usize; self.shape.len()];
        for _ in 0..n {
            let off = self.offset - base
                + idx
                    .iter()
                    .zip(&self.strides)
                    .map(|(i, s)| i * s)
                    .sum::<usize>();
            out.push(raw.get(off).copied().unwrap_or(fill));
            for ax in (0..idx.len()).rev() {
                idx[ax] += 1;
                if idx[ax] < self.shape[ax] {
                    break;
                }
                idx[ax] = 0;
            }
        }
        out
    }
}
