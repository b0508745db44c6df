//! GPU timing (core): timestamp queries around compute passes, the median of repeats after
//! warm-up, and interleaved rounds of several candidates (this VM has slow phases of minutes, so
//! a baseline is timed in the same rounds as what it is compared with).

use crate::context::GpuContext;
use crate::error::{AttnError, Result};

/// How a time was measured.
#[non_exhaustive]
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum Clock {
    /// GPU timestamp queries around the compute pass.
    GpuTimestamps,
    /// Wall clock around submit-and-wait (adapters without TIMESTAMP_QUERY).
    WallClock,
}

/// How many warm-up runs and timed rounds `cargo bench`, `wgpu-attention bench` and the figures
/// in benches/RESULTS.md use, unless told otherwise.
pub const WARMUP: usize = 1;
/// See [`WARMUP`].
pub const ROUNDS: usize = 5;

/// Min, median, max and all samples (in round order), in milliseconds.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Timing {
    pub min_ms: f64,
    pub median_ms: f64,
    pub max_ms: f64,
    pub samples_ms: Vec<f64>,
    pub clock: Clock,
}

impl Timing {
    pub(crate) fn from_samples(samples: Vec<f64>, clock: Clock) -> Timing {
        let (min, max) = match samples.is_empty() {
            true => (f64::NAN, f64::NAN),
            false => (
                samples.iter().copied().fold(f64::INFINITY, f64::min),
                samples.iter().copied().fold(f64::NEG_INFINITY, f64::max),
            ),
        };
        Timing {
            min_ms: min,
            median_ms: median(&samples),
            max_ms: max,
            samples_ms: samples,
            clock,
        }
    }
}

/// The median of `x` (mean of the middle two for even lengths); NaN when empty.
pub fn median(x: &[f64]) -> f64 {
    let mut s = x.to_vec();
    s.sort_by(f64::total_cmp);
    match s.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => s[n / 2],
        n => 0.5 * (s[n / 2 - 1] + s[n / 2]),
    }
}

/// The median over rounds of `f(a_i, b_i)`, for two timings taken in the same interleaved run
/// (so a slow phase of the machine falls on both sides of each pair).
pub fn median_paired(a: &Timing, b: &Timing, f: impl Fn(f64, f64) -> f64) -> f64 {
    let r: Vec<f64> = (a.samples_ms.iter().zip(&b.samples_ms))
        .map(|(&x, &y)| f(x, y))
        .collect();
    median(&r)
}

/// Records one pass of a kernel, writing timestamps at the given query indices when asked;
/// returns the kernel's label.
pub type Record<'a> = Box<
    dyn FnMut(&mut wgpu::CommandEncoder, Option<(&wgpu::QuerySet, u32)>) -> Result<String> + 'a,
>;

/// Times `record` `repeats` times after `warmup` untimed runs. Blocks (native only).
pub fn time_passes(
    ctx: &GpuContext,
    warmup: usize,
    repeats: usize,
    record: impl FnMut(&mut wgpu::CommandEncoder, Option<(&wgpu::QuerySet, u32)>) -> Result<()>,
) -> Result<Timing> {
    pollster::block_on(time_passes_async(ctx, warmup, repeats, record))
}

/// Interleaved timing of several kernels: `warmup` untimed runs of each, then `rounds` rounds
/// of one timed run of each in order (A B C A B C ...). Returns each kernel's label and timing;
/// sample `i` of every timing comes from round `i`, for [`median_paired`]. Blocks (native only).
pub fn time_interleaved(
    ctx: &GpuContext,
    warmup: usize,
    rounds: usize,
    records: &mut [Record],
) -> Result<Vec<(String, Timing)>> {
    pollster::block_on(time_interleaved_async(ctx, warmup, rounds, records))
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
    let mut one: Record = Box::new(move |enc, ts| record(enc, ts).map(|()| String::new()));
    let mut t =
        time_interleaved_async(ctx, warmup, repeats, std::slice::from_mut(&mut one)).await?;
    Ok(t.remove(0).1)
}

/// [`time_interleaved`] as a future (see [`time_passes_async`]).
pub async fn time_interleaved_async(
    ctx: &GpuContext,
    warmup: usize,
    rounds: usize,
    records: &mut [Record<'_>],
) -> Result<Vec<(String, Timing)>> {
    let rounds = rounds.max(1);
    let mut labels = vec![String::new(); records.len()];
    for _ in 0..warmup {
        for (r, label) in records.iter_mut().zip(&mut labels) {
            ctx.submit(|enc| {
                *label = r(enc, None)?;
                Ok(())
            })?;
            ctx.finished().await?;
        }
    }
    let clock = if ctx.caps.timestamps {
        Clock::GpuTimestamps
    } else {
        Clock::WallClock
    };
    let mut samples = vec![Vec::with_capacity(rounds); records.len()];
    let stamps = (clock == Clock::GpuTimestamps).then(|| Stamps::new(ctx));
    for _ in 0..rounds {
        for ((r, label), out) in records.iter_mut().zip(&mut labels).zip(&mut samples) {
            let ms = match &stamps {
                Some(s) => s.time(ctx, r, label).await?,
                None => wall_clock_ms(ctx, r, label).await?,
            };
            out.push(ms);
        }
    }
    Ok(labels
        .into_iter()
        .zip(samples)
        .map(|(l, s)| (l, Timing::from_samples(s, clock)))
        .collect())
}

/// A timestamp query pair and its resolve buffer, reused across samples.
struct Stamps {
    set: wgpu::QuerySet,
    resolve: wgpu::Buffer,
    period: f64,
}

impl Stamps {
    fn new(ctx: &GpuContext) -> Stamps {
        Stamps {
            set: ctx.device.create_query_set(&wgpu::QuerySetDescriptor {
                label: Some("bench timestamps"),
                ty: wgpu::QueryType::Timestamp,
                count: 2,
            }),
            resolve: ctx.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("timestamp resolve"),
                size: 16,
                usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
                mapped_at_creation: false,
            }),
            period: ctx.queue.get_timestamp_period() as f64,
        }
    }

    /// One timed run of `record`, in milliseconds.
    async fn time(
        &self,
        ctx: &GpuContext,
        record: &mut Record<'_>,
        label: &mut String,
    ) -> Result<f64> {
        let read = ctx.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("timestamp readback"),
            size: 16,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        ctx.submit(|enc| {
            *label = record(enc, Some((&self.set, 0)))?;
            enc.resolve_query_set(&self.set, 0..2, &self.resolve, 0);
            enc.copy_buffer_to_buffer(&self.resolve, 0, &read, 0, 16);
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
        Ok(ts[1].wrapping_sub(ts[0]) as f64 * self.period / 1e6)
    }
}

#[cfg(not(target_arch = "wasm32"))]
async fn wall_clock_ms(
    ctx: &GpuContext,
    record: &mut Record<'_>,
    label: &mut String,
) -> Result<f64> {
    let start = std::time::Instant::now();
    ctx.submit(|enc| {
        *label = record(enc, None)?;
        Ok(())
    })?;
    ctx.finished().await?;
    Ok(start.elapsed().as_secs_f64() * 1e3)
}

#[cfg(target_arch = "wasm32")]
async fn wall_clock_ms(
    ctx: &GpuContext,
    _record: &mut Record<'_>,
    _label: &mut String,
) -> Result<f64> {
    Err(AttnError::MissingFeature {
        feature: "TIMESTAMP_QUERY",
        adapter: ctx.adapter_info.name.clone(),
        needed_for: "timing in a browser (wasm has no wall clock)".into(),
    })
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
