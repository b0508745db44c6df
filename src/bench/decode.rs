//! `bench --decode` scenarios: split-KV decode over a cache in each format against the memory
//! floor (a plain copy kernel moving as many bytes as the decode reads from K and V), the same decode in
//! one split, and the dense flash kernel at Lq = 1 (float caches), recorded for one
//! interleaved run.

use super::{pseudo_random, Record};
use crate::context::GpuContext;
use crate::decode::{encode_decode_attention, DecodeOptions, KvCache, KvFormat};
use crate::error::Result;
use crate::flash::{encode_flash_attention, FlashOptions};
use crate::tensor::{DType, Tensor};

/// GQA 32/8 at D = 128, one query per sequence (the decode shape).
pub const HQ: usize = 32;
pub const HKV: usize = 8;
pub const D: usize = 128;

/// One point: `batch` sequences of `lk` cached keys in `format`.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct DecodePoint {
    pub batch: usize,
    pub lk: usize,
    pub format: &'static str,
}

impl DecodePoint {
    pub fn kv_format(&self) -> Result<KvFormat> {
        KvFormat::parse(self.format)
    }
    /// Bytes of K and V one decode reads: every cached key of every KV head.
    pub fn kv_bytes(&self) -> Result<u64> {
        let n = self.batch * self.lk * HKV * D;
        Ok(2 * self.kv_format()?.bytes_for(n)? as u64)
    }
}

/// The recorders of one point, in this order: the decode with the planned splits, the decode
/// in one split, and for float caches the flash kernel over the same K and V at Lq = 1. Each
/// returns its kernel's label.
pub fn records<'a>(ctx: &'a GpuContext, p: &DecodePoint) -> Result<Vec<Record<'a>>> {
    let format = p.kv_format()?;
    let (b, lk) = (p.batch, p.lk);
    let q_dtype = if format == KvFormat::F16 {
        DType::F16
    } else {
        DType::F32
    };
    let qh = pseudo_random(b * HQ * D, 1);
    let q = match q_dtype {
        DType::F16 => {
            let h: Vec<half::f16> = qh.iter().map(|&x| half::f16::from_f32(x)).collect();
            Tensor::from_f16(ctx, &h, &[b, 1, HQ, D])?
        }
        _ => Tensor::from_f32(ctx, &qh, &[b, 1, HQ, D])?,
    };
    let shape = [b, lk, HKV, D];
    let kv = |seed| KvCache::upload(ctx, &pseudo_random(b * lk * HKV * D, seed), shape, format);
    let (k, v) = (kv(2)?, kv(3)?);
    let out = Tensor::filled(ctx, &[b, 1, HQ, D], q_dtype, 0.0)?;
    let mut recs: Vec<Record<'a>> = Vec::new();
    for splits in [None, Some(1)] {
        let (q, k, v, out) = (q.clone(), k.clone(), v.clone(), out.clone());
        let opts = DecodeOptions::default().num_splits(splits);
        recs.push(Box::new(move |enc, ts| {
            let plan = encode_decode_attention(ctx, enc, &q, &k, &v, &out, None, &opts, ts)?;
            Ok(plan.label())
        }));
    }
    if !format.is_quantized() {
        let (kt, vt) = (k.data().clone(), v.data().clone());
        let opts = FlashOptions::default();
        recs.push(Box::new(move |enc, ts| {
            let plan = encode_flash_attention(ctx, enc, &q, &kt, &vt, &out, None, &opts, ts)?;
            Ok(plan.label())
        }));
    }
    Ok(recs)
}

/// The memory floor's recorder: a plain copy kernel over `bytes` (a multiple of 16), twice
/// in one timed pair; the bandwidth it reaches is `2 * bytes` over its time.
pub fn copy_record(ctx: &GpuContext, bytes: u64) -> Result<Record<'_>> {
    ctx.check_binding("copy floor", bytes)?;
    let buf = |label| {
        ctx.scoped(|| {
            Ok(ctx.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some(label),
                size: bytes,
                usage: wgpu::BufferUsages::STORAGE,
                mapped_at_creation: false,
            }))
        })
    };
    let (src, dst) = (buf("copy src")?, buf("copy dst")?);
    Ok(Box::new(move |enc, ts| {
        // one timestamp pair around both passes: the first writes the start, the second the end
        crate::baseline::encode_copy(ctx, enc, &src, &dst, bytes, ts.map(|(s, i)| (s, i, false)))?;
        crate::baseline::encode_copy(ctx, enc, &dst, &src, bytes, ts.map(|(s, i)| (s, i, true)))?;
        Ok(format!("copy 2 x {bytes} bytes"))
    }))
}

/// The uneven batch: one sequence of `long` cached keys and 31 of `short`, a paged q8_0 cache
/// (pages of 256 tokens; q8_0 keeps it within one binding on lavapipe). Records, in order:
/// the planned decode (balanced by key count), the same grid width as fixed per-sequence
/// splits, and one split per sequence.
pub fn uneven_records(ctx: &GpuContext, long: usize, short: usize) -> Result<Vec<Record<'_>>> {
    const PAGE: usize = 256;
    let b = 32;
    let lens: Vec<u32> = std::iter::once(long)
        .chain(std::iter::repeat_n(short, b - 1))
        .map(|n| n as u32)
        .collect();
    let pages_of = |n: usize| n.div_ceil(PAGE);
    let mb = pages_of(long);
    let pages: usize = lens.iter().map(|&n| pages_of(n as usize)).sum();
    let mut table = vec![0i32; b * mb];
    let mut next = 0i32;
    for (i, &n) in lens.iter().enumerate() {
        for j in 0..pages_of(n as usize) {
            table[i * mb + j] = next;
            next += 1;
        }
    }
    let shape = [pages, PAGE, HKV, D];
    let n = pages * PAGE * HKV * D;
    let kv = |seed| KvCache::upload(ctx, &pseudo_random(n, seed), shape, KvFormat::Q8_0);
    let (k, v) = (kv(2)?, kv(3)?);
    let q = Tensor::from_f32(ctx, &pseudo_random(b * HQ * D, 1), &[b, 1, HQ, D])?;
    let out = Tensor::filled(ctx, &[b, 1, HQ, D], DType::F32, 0.0)?;
    let base = DecodeOptions::default()
        .block_table(Some(Tensor::from_i32(ctx, &table, &[b, mb])?))
        .cache_seqlens(Some(lens));
    let s = crate::softmax::AttnShape {
        batch: b,
        lq: 1,
        lk: mb * PAGE,
        hq: HQ,
        hkv: HKV,
        d: D,
        dv: D,
    };
    let balanced = crate::decode::plan(ctx, &s, DType::F32, KvFormat::Q8_0, &base)?;
    let mut recs: Vec<Record<'_>> = Vec::new();
    for splits in [None, Some(balanced.splits), Some(1)] {
        let (q, k, v, out) = (q.clone(), k.clone(), v.clone(), out.clone());
        let opts = base.clone().num_splits(splits);
        recs.push(Box::new(move |enc, ts| {
            let plan = encode_decode_attention(ctx, enc, &q, &k, &v, &out, None, &opts, ts)?;
            Ok(match plan.per_split {
                0 => format!("{} (fixed)", plan.label()),
                per => format!("{} of {per} keys (balanced)", plan.label()),
            })
        }));
    }
    Ok(recs)
}
