//! The one bench harness: a shape registry, GPU timing from timestamp queries (median of repeats
//! after warm-up), and runners for the attention kernels and the baselines. Used by
//! `cargo bench` and `wgpu-attention bench`.

use crate::baseline::{encode_matmul, encode_naive_attention};
use crate::context::GpuContext;
use crate::error::{AttnError, Result};
use crate::flash::{encode_flash_attention, AttnShape, FlashOptions, StrategyChoice};
use crate::neighborhood::{encode_neighborhood_attention, NaSpec, NeighborhoodOptions};
use crate::tensor::{DType, Tensor};

/// How a time was measured.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum Clock {
    /// GPU timestamp queries around the compute pass.
    GpuTimestamps,
    /// Wall clock around submit-and-wait (adapters without TIMESTAMP_QUERY).
    WallClock,
}

/// Median and all samples, in milliseconds.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Timing {
    pub median_ms: f64,
    pub samples_ms: Vec<f64>,
    pub clock: Clock,
}

/// Times `record` (which records one pass, writing timestamps at the given query indices when
/// asked) `repeats` times after `warmup` untimed runs. Blocks (native only).
pub fn time_passes(
    ctx: &GpuContext,
    warmup: usize,
    repeats: usize,
    record: impl FnMut(&mut wgpu::CommandEncoder, Option<(&wgpu::QuerySet, u32)>) -> Result<()>,
) -> Result<Timing> {
    pollster::block_on(time_passes_async(ctx, warmup, repeats, record))
}

/// [`time_passes`] as a future, for the browser: every wait is a callback that resolves when the
/// device has polled (natively) or the browser's queue has finished (WebGPU). Without timestamp
/// queries it falls back to the wall clock, which a browser build does not have: there it
/// returns [`AttnError::MissingFeature`].
pub async fn time_passes_async(
    ctx: &GpuContext,
    warmup: usize,
    repeats: usize,
    mut record: impl FnMut(&mut wgpu::CommandEncoder, Option<(&wgpu::QuerySet, u32)>) -> Result<()>,
) -> Result<Timing> {
    let repeats = repeats.max(1);
    for _ in 0..warmup {
        ctx.submit(|enc| record(enc, None))?;
        ctx.finished().await?;
    }
    let mut samples = Vec::with_capacity(repeats);
    let clock = if ctx.caps.timestamps {
        Clock::GpuTimestamps
    } else {
        Clock::WallClock
    };
    if clock == Clock::GpuTimestamps {
        let set = ctx.device.create_query_set(&wgpu::QuerySetDescriptor {
            label: Some("bench timestamps"),
            ty: wgpu::QueryType::Timestamp,
            count: 2,
        });
        let resolve = ctx.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("timestamp resolve"),
            size: 16,
            usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: false,
        });
        let period = ctx.queue.get_timestamp_period() as f64;
        for _ in 0..repeats {
            let read = ctx.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("timestamp readback"),
                size: 16,
                usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            });
            ctx.submit(|enc| {
                record(enc, Some((&set, 0)))?;
                enc.resolve_query_set(&set, 0..2, &resolve, 0);
                enc.copy_buffer_to_buffer(&resolve, 0, &read, 0, 16);
                Ok(())
            })?;
            let (tx, rx) = futures::channel::oneshot::channel();
            read.map_async(wgpu::MapMode::Read, .., move |r| {
                let _ = tx.send(r);
            });
            ctx.wait()?;
            rx.await
                .map_err(|_| AttnError::Gpu("timestamp readback dropped".into()))?
                .map_err(|e| AttnError::Gpu(format!("timestamp readback: {e}")))?;
            let view = read
                .get_mapped_range(..)
                .map_err(|e| AttnError::Gpu(format!("timestamp mapping: {e:?}")))?;
            let ts: &[u64] = bytemuck::cast_slice(&view);
            samples.push(ts[1].wrapping_sub(ts[0]) as f64 * period / 1e6);
        }
    } else {
        for _ in 0..repeats {
            samples.push(wall_clock_ms(ctx, &mut record).await?);
        }
    }
    let mut sorted = samples.clone();
    sorted.sort_by(f64::total_cmp);
    Ok(Timing {
        median_ms: sorted[sorted.len() / 2],
        samples_ms: samples,
        clock,
    })
}

#[cfg(not(target_arch = "wasm32"))]
async fn wall_clock_ms(
    ctx: &GpuContext,
    record: &mut impl FnMut(&mut wgpu::CommandEncoder, Option<(&wgpu::QuerySet, u32)>) -> Result<()>,
) -> Result<f64> {
    let start = std::time::Instant::now();
    ctx.submit(|enc| record(enc, None))?;
    ctx.finished().await?;
    Ok(start.elapsed().as_secs_f64() * 1e3)
}

#[cfg(target_arch = "wasm32")]
async fn wall_clock_ms(
    ctx: &GpuContext,
    _record: &mut impl FnMut(&mut wgpu::CommandEncoder, Option<(&wgpu::QuerySet, u32)>) -> Result<()>,
) -> Result<f64> {
    Err(AttnError::MissingFeature {
        feature: "TIMESTAMP_QUERY",
        adapter: ctx.adapter_info.name.clone(),
        needed_for: "timing in a browser (wasm has no wall clock)".into(),
    })
}

/// One benchmark shape.
#[derive(Clone, Debug, serde::Serialize)]
pub struct BenchCase {
    pub name: String,
    pub batch: usize,
    pub lq: usize,
    pub lk: usize,
    pub hq: usize,
    pub hkv: usize,
    pub d: usize,
    pub causal: bool,
    pub dtype: String,
    /// Sliding window `(left, right)`, `None` for dense.
    pub window: Option<(u32, u32)>,
}

impl BenchCase {
    fn new(name: &str, (batch, l, h, d): (usize, usize, usize, usize), causal: bool) -> Self {
        BenchCase {
            name: name.into(),
            batch,
            lq: l,
            lk: l,
            hq: h,
            hkv: h,
            d,
            causal,
            dtype: "f32".into(),
            window: None,
        }
    }
    /// Query-key pairs the mask lets through, per batch and head (exact count).
    pub fn visible_pairs(&self) -> u64 {
        let diag_off = self.lk as i64 - self.lq as i64;
        (0..self.lq as i64)
            .map(|i| {
                let d = i + diag_off;
                let mut lo = 0;
                let mut hi = self.lk as i64 - 1;
                if self.causal {
                    hi = hi.min(d);
                }
                if let Some((l, r)) = self.window {
                    lo = lo.max(d - l as i64);
                    hi = hi.min(d + r as i64);
                }
                (hi - lo + 1).max(0) as u64
            })
            .sum()
    }

    /// FLOPs of the work the mask leaves: `2 * (D + Dv)` per visible pair. For a dense
    /// non-causal case this is the usual `4 * B * H * Lq * Lk * D`.
    pub fn flops(&self) -> f64 {
        if self.window.is_none() {
            return self.shape().flops(self.causal);
        }
        self.shape().flops_for_pairs(self.visible_pairs())
    }

    pub fn shape(&self) -> AttnShape {
        AttnShape {
            batch: self.batch,
            lq: self.lq,
            lk: self.lk,
            hq: self.hq,
            hkv: self.hkv,
            d: self.d,
            dv: self.d,
        }
    }
}

/// The shared registry. `quick` keeps the sweep short enough for a CPU adapter.
pub fn registry(quick: bool) -> Vec<BenchCase> {
    let mut cases = vec![
        BenchCase::new("L2048-D64", (1, 2048, 8, 64), false),
        BenchCase::new("L2048-D64-causal", (1, 2048, 8, 64), true),
        BenchCase::new("L1024-D128", (1, 1024, 8, 128), false),
    ];
    if !quick {
        cases.push(BenchCase::new("L4096-D64", (1, 4096, 8, 64), false));
        cases.push(BenchCase::new("L1024-D256", (1, 1024, 4, 256), false));
        cases.push(BenchCase::new("L512-D512", (1, 512, 4, 512), false));
    }
    cases
}

/// Deterministic pseudo-random f32s in [-1, 1) (xorshift; the bench needs no rand state).
pub fn pseudo_random(n: usize, seed: u64) -> Vec<f32> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ((x >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// One measured row of a sweep.
#[derive(Clone, Debug, serde::Serialize)]
pub struct BenchRow {
    pub case: BenchCase,
    pub kernel: String,
    pub gpu_ms: f64,
    pub gflops: f64,
    pub clock: Clock,
}

/// Times flash attention (with the given strategy) on a case.
pub fn bench_flash(
    ctx: &GpuContext,
    case: &BenchCase,
    strategy: StrategyChoice,
    warmup: usize,
    repeats: usize,
) -> Result<BenchRow> {
    let s = case.shape();
    let q = Tensor::from_f32(
        ctx,
        &pseudo_random(s.batch * s.lq * s.hq * s.d, 1),
        &[s.batch, s.lq, s.hq, s.d],
    )?;
    let k = Tensor::from_f32(
        ctx,
        &pseudo_random(s.batch * s.lk * s.hkv * s.d, 2),
        &[s.batch, s.lk, s.hkv, s.d],
    )?;
    let v = Tensor::from_f32(
        ctx,
        &pseudo_random(s.batch * s.lk * s.hkv * s.dv, 3),
        &[s.batch, s.lk, s.hkv, s.dv],
    )?;
    let out = Tensor::filled(ctx, &[s.batch, s.lq, s.hq, s.dv], DType::F32, 0.0)?;
    let opts = FlashOptions {
        causal: case.causal,
        window: case
            .window
            .map_or((None, None), |(l, r)| (Some(l), Some(r))),
        strategy,
        ..Default::default()
    };
    let mut label = String::new();
    let t = time_passes(ctx, warmup, repeats, |enc, ts| {
        let plan = encode_flash_attention(ctx, enc, &q, &k, &v, &out, None, &opts, ts)?;
        label = format!("flash-{:?}", plan.key.strategy).to_lowercase();
        Ok(())
    })?;
    Ok(row(case, label, &t, case.flops()))
}

/// One point of a window sweep: the windowed time against dense at the same shape.
#[derive(Clone, Debug, serde::Serialize)]
pub struct WindowPoint {
    pub window: (u32, u32),
    pub gpu_ms: f64,
    pub dense_ms: f64,
    /// Measured `dense_ms / gpu_ms`.
    pub speedup: f64,
    /// `dense keys / keys the window lets through`: the speed-up if cost followed the window
    /// exactly.
    pub ideal: f64,
    /// `speedup / ideal`.
    pub efficiency: f64,
}

/// Sliding-window attention against dense at one shape, for each `(left, right)` window.
pub fn bench_windows(
    ctx: &GpuContext,
    dense: &BenchCase,
    windows: &[(u32, u32)],
    warmup: usize,
    repeats: usize,
) -> Result<(BenchRow, Vec<WindowPoint>)> {
    let d = bench_flash(ctx, dense, StrategyChoice::Auto, warmup, repeats)?;
    let mut points = Vec::new();
    for &w in windows {
        let mut c = dense.clone();
        c.window = Some(w);
        c.name = format!("{}-win{}+{}", dense.name, w.0, w.1);
        let r = bench_flash(ctx, &c, StrategyChoice::Auto, warmup, repeats)?;
        let ideal = dense.visible_pairs() as f64 / c.visible_pairs() as f64;
        let speedup = d.gpu_ms / r.gpu_ms;
        points.push(WindowPoint {
            window: w,
            gpu_ms: r.gpu_ms,
            dense_ms: d.gpu_ms,
            speedup,
            ideal,
            efficiency: speedup / ideal,
        });
    }
    Ok((d, points))
}

/// One point of a neighborhood sweep: NATTEN-style attention against dense over the same tokens.
#[derive(Clone, Debug, serde::Serialize)]
pub struct NaPoint {
    pub spatial: Vec<usize>,
    pub kernel_size: Vec<usize>,
    pub kernel: String,
    pub gpu_ms: f64,
    pub dense_ms: f64,
    /// GFLOP/s of the work the neighborhood leaves (`2 (D + Dv)` per visible pair).
    pub gflops: f64,
    pub speedup: f64,
    /// `dense pairs / neighborhood pairs` (exact count).
    pub ideal: f64,
    pub efficiency: f64,
}

/// Neighborhood attention for each `(spatial, kernel)` against `dense` (whose `lq = lk` must
/// be the token count of every grid), B, H and D from `dense`.
pub fn bench_neighborhood(
    ctx: &GpuContext,
    dense: &BenchRow,
    grids: &[(Vec<usize>, Vec<usize>)],
    warmup: usize,
    repeats: usize,
) -> Result<Vec<NaPoint>> {
    let c = &dense.case;
    let mut points = Vec::new();
    for (spatial, kernel) in grids {
        let opts = NeighborhoodOptions::new(kernel);
        let spec = NaSpec::new(&opts.axes(spatial)?)?;
        let l = spec.len();
        if l != c.lq || l != c.lk {
            return Err(AttnError::shape(
                "neighborhood grid",
                format!("{} tokens (the dense case)", c.lq),
                spatial,
            ));
        }
        let shape = |h: usize| {
            let mut v = vec![c.batch];
            v.extend(spatial);
            v.extend([h, c.d]);
            v
        };
        let n = c.batch * l * c.d;
        let q = Tensor::from_f32(ctx, &pseudo_random(n * c.hq, 1), &shape(c.hq))?;
        let k = Tensor::from_f32(ctx, &pseudo_random(n * c.hkv, 2), &shape(c.hkv))?;
        let v = Tensor::from_f32(ctx, &pseudo_random(n * c.hkv, 3), &shape(c.hkv))?;
        let out = Tensor::filled(ctx, &shape(c.hq), DType::F32, 0.0)?;
        let mut label = String::new();
        let t = time_passes(ctx, warmup, repeats, |enc, ts| {
            let plan = encode_neighborhood_attention(ctx, enc, &q, &k, &v, &out, None, &opts, ts)?;
            label = plan.key.label();
            Ok(())
        })?;
        let ideal = (c.lq * c.lk) as f64 / spec.pairs() as f64;
        let speedup = dense.gpu_ms / t.median_ms;
        points.push(NaPoint {
            spatial: spatial.clone(),
            kernel_size: kernel.clone(),
            kernel: label,
            gpu_ms: t.median_ms,
            dense_ms: dense.gpu_ms,
            gflops: c.shape().flops_for_pairs(spec.pairs()) / (t.median_ms * 1e6),
            speedup,
            ideal,
            efficiency: speedup / ideal,
        });
    }
    Ok(points)
}

/// Times the naive attention baseline on a case.
pub fn bench_naive(
    ctx: &GpuContext,
    case: &BenchCase,
    warmup: usize,
    repeats: usize,
) -> Result<BenchRow> {
    let s = case.shape();
    let buf = |n: usize, seed| Tensor::from_f32(ctx, &pseudo_random(n, seed), &[n]);
    let q = buf(s.batch * s.lq * s.hq * s.d, 1)?;
    let k = buf(s.batch * s.lk * s.hkv * s.d, 2)?;
    let v = buf(s.batch * s.lk * s.hkv * s.dv, 3)?;
    let o = buf(s.batch * s.lq * s.hq * s.dv, 4)?;
    let t = time_passes(ctx, warmup, repeats, |enc, ts| {
        encode_naive_attention(
            ctx,
            enc,
            &s,
            case.causal,
            q.buffer(),
            k.buffer(),
            v.buffer(),
            o.buffer(),
            ts,
        )
    })?;
    Ok(row(case, "naive".into(), &t, s.flops(case.causal)))
}

/// Times the f32 matmul baseline at `n x n x n`.
pub fn bench_matmul(ctx: &GpuContext, n: u32, warmup: usize, repeats: usize) -> Result<BenchRow> {
    let len = (n * n) as usize;
    let a = Tensor::from_f32(ctx, &pseudo_random(len, 5), &[len])?;
    let b = Tensor::from_f32(ctx, &pseudo_random(len, 6), &[len])?;
    let c = Tensor::from_f32(ctx, &vec![0.0; len], &[len])?;
    let t = time_passes(ctx, warmup, repeats, |enc, ts| {
        encode_matmul(ctx, enc, (n, n, n), a.buffer(), b.buffer(), c.buffer(), ts)
    })?;
    let case = BenchCase::new(
        &format!("matmul-{n}"),
        (1, n as usize, 1, n as usize),
        false,
    );
    Ok(row(&case, "matmul".into(), &t, 2.0 * (n as f64).powi(3)))
}

fn row(case: &BenchCase, kernel: String, t: &Timing, flops: f64) -> BenchRow {
    BenchRow {
        case: case.clone(),
        kernel,
        gpu_ms: t.median_ms,
        gflops: flops / (t.median_ms * 1e6),
        clock: t.clock,
    }
}

/// A text table of a sweep: time, GFLOP/s, and the ratios to the naive kernel on the same case
/// and to the matmul baseline's GFLOP/s (both measured in the same run).
pub fn table(rows: &[BenchRow]) -> String {
    let matmul = rows.iter().find(|r| r.kernel == "matmul").map(|r| r.gflops);
    let mut s = format!(
        "{:<20} {:<16} {:>11} {:>9} {:>9} {:>9}\n",
        "case", "kernel", "GPU ms", "GFLOP/s", "x naive", "x matmul"
    );
    for r in rows {
        let naive = rows
            .iter()
            .find(|n| n.kernel == "naive" && n.case.name == r.case.name)
            .map(|n| n.gflops);
        let ratio = |base: Option<f64>| match base {
            Some(b) if r.kernel != "matmul" && b > 0.0 => format!("{:.2}", r.gflops / b),
            _ => "-".into(),
        };
        s += &format!(
            "{:<20} {:<16} {:>11.3} {:>9.2} {:>9} {:>9}\n",
            r.case.name,
            r.kernel,
            r.gpu_ms,
            r.gflops,
            ratio(naive),
            ratio(matmul)
        );
    }
    s
}

/// The whole sweep over [`registry`]: the matmul baseline (1024^3), then per case flash attention
/// (the plan's strategy) and, unless `naive` is false, the naive kernel. `progress` is called
/// with a message before each measurement.
pub fn sweep(
    ctx: &GpuContext,
    quick: bool,
    repeats: usize,
    naive: bool,
    mut progress: impl FnMut(&str),
) -> Result<Vec<BenchRow>> {
    let mut rows = Vec::new();
    progress("matmul baseline");
    rows.push(bench_matmul(ctx, 1024, 1, repeats)?);
    for c in registry(quick) {
        progress(&format!("{} flash", c.name));
        rows.push(bench_flash(ctx, &c, StrategyChoice::Auto, 1, repeats)?);
        if naive {
            progress(&format!("{} naive", c.name));
            rows.push(bench_naive(ctx, &c, 1, repeats)?);
        }
    }
    Ok(rows)
}
