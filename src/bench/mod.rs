//! The bench scenarios (a driver): a shape registry and runners for the attention kernels and
//! the baselines, timed by [`crate::timing`]. Used by `cargo bench` and `wgpu-attention bench`.

pub mod backward;
pub mod decode;

use crate::baseline::{encode_matmul, encode_naive_attention};
use crate::context::GpuContext;
use crate::error::{AttnError, Result};
use crate::flash::{encode_flash_attention, AttnShape, FlashOptions, StrategyChoice};
use crate::neighborhood::{encode_neighborhood_attention, NaSpec, NeighborhoodOptions};
use crate::tensor::{DType, Tensor};
pub use crate::timing::{
    median, median_paired, pseudo_random, time_interleaved, time_interleaved_async, time_passes,
    time_passes_async, Clock, Record, Timing, ROUNDS, WARMUP,
};

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

/// One measured row of a sweep. `x_naive` and `x_matmul` are medians of per-round ratios
/// measured in the same interleaved run: the naive kernel's time over this kernel's, and this
/// kernel's GFLOP/s over the matmul baseline's.
#[derive(Clone, Debug, serde::Serialize)]
pub struct BenchRow {
    pub case: BenchCase,
    pub kernel: String,
    /// Median GPU time.
    pub gpu_ms: f64,
    pub min_ms: f64,
    pub max_ms: f64,
    /// GFLOP/s at the median time.
    pub gflops: f64,
    pub x_naive: Option<f64>,
    pub x_matmul: Option<f64>,
    pub clock: Clock,
}

fn row(case: &BenchCase, kernel: String, t: &Timing, flops: f64) -> BenchRow {
    BenchRow {
        case: case.clone(),
        kernel,
        gpu_ms: t.median_ms,
        min_ms: t.min_ms,
        max_ms: t.max_ms,
        gflops: flops / (t.median_ms * 1e6),
        x_naive: None,
        x_matmul: None,
        clock: t.clock,
    }
}

/// A case's q, k, v (pseudo-random, fixed seeds) and its output, f32 `[B, L, H, D]`.
pub fn case_tensors(ctx: &GpuContext, s: &AttnShape) -> Result<[Tensor; 4]> {
    let t = |dims: [usize; 4], seed| {
        Tensor::from_f32(ctx, &pseudo_random(dims.iter().product(), seed), &dims)
    };
    Ok([
        t([s.batch, s.lq, s.hq, s.d], 1)?,
        t([s.batch, s.lk, s.hkv, s.d], 2)?,
        t([s.batch, s.lk, s.hkv, s.dv], 3)?,
        Tensor::filled(ctx, &[s.batch, s.lq, s.hq, s.dv], DType::F32, 0.0)?,
    ])
}

/// Inputs for flash attention on a case ([`case_tensors`]) and a recorder of one pass with
/// `strategy`.
pub fn flash_pass<'a>(
    ctx: &'a GpuContext,
    case: &BenchCase,
    strategy: StrategyChoice,
) -> Result<Record<'a>> {
    let [q, k, v, out] = case_tensors(ctx, &case.shape())?;
    let opts = FlashOptions {
        causal: case.causal,
        window: case
            .window
            .map_or((None, None), |(l, r)| (Some(l), Some(r))),
        strategy,
        ..Default::default()
    };
    Ok(Box::new(move |enc, ts| {
        let plan = encode_flash_attention(ctx, enc, &q, &k, &v, &out, None, &opts, ts)?;
        Ok(format!("flash-{:?}", plan.key.strategy).to_lowercase())
    }))
}

/// A recorder of one pass of sparse attention on a case's q, k, v ([`case_tensors`], the
/// inputs of [`flash_pass`]) with `opts` (its `flash` options take the case's causal flag).
pub fn sparse_pass<'a>(
    ctx: &'a GpuContext,
    case: &BenchCase,
    mut opts: crate::sparse::attention::SparseOptions,
) -> Result<Record<'a>> {
    let s = case.shape();
    let [q, k, v, out] = case_tensors(ctx, &s)?;
    opts.flash.causal = case.causal;
    // the block mask made once, outside the timed passes
    opts.block_mask = Some(crate::sparse::attention::resolve_block_mask(
        ctx, &s, &opts,
    )?);
    Ok(Box::new(move |enc, ts| {
        let plan = crate::sparse::attention::encode_sparse_attention(
            ctx, enc, &q, &k, &v, &out, None, &opts, ts,
        )?;
        Ok(format!("sparse-{:?}", plan.key.strategy).to_lowercase())
    }))
}

/// Inputs for linear attention (pseudo-random q, k, v; gates in [-1, 0); beta in [0, 1); unit
/// keys for the delta rules) and a recorder of one pass.
pub fn linear_pass<'a>(
    ctx: &'a GpuContext,
    s: crate::linear::LinearShape,
    mut opts: crate::linear::LinearOptions,
) -> Result<Record<'a>> {
    use crate::linear::Rule;
    let qk = [s.batch, s.t, s.h, s.k];
    let q = Tensor::from_f32(ctx, &pseudo_random(qk.iter().product(), 1), &qk)?;
    let mut kx = pseudo_random(qk.iter().product(), 2);
    let delta = matches!(opts.rule, Rule::Delta | Rule::GatedDelta);
    if delta {
        crate::linear::unit_rows(&mut kx, s.k);
    }
    let k = Tensor::from_f32(ctx, &kx, &qk)?;
    let vs = [s.batch, s.t, s.hv, s.v];
    let v = Tensor::from_f32(ctx, &pseudo_random(vs.iter().product(), 3), &vs)?;
    let per_head = [s.batch, s.t, s.hv];
    let n = per_head.iter().product();
    let unit = |seed| -> Vec<f32> {
        pseudo_random(n, seed)
            .iter()
            .map(|x| 0.5 * (x + 1.0))
            .collect()
    };
    let gate = |x: Vec<f32>| -> Vec<f32> { x.iter().map(|x| -x.abs().max(1e-3)).collect() };
    match opts.rule {
        Rule::SimpleGla | Rule::GatedDelta => {
            opts.g = Some(Tensor::from_f32(ctx, &gate(unit(4)), &per_head)?)
        }
        Rule::Gla => {
            let gs = [s.batch, s.t, s.hv, s.k];
            let g = gate(pseudo_random(gs.iter().product(), 4));
            opts.g = Some(Tensor::from_f32(ctx, &g, &gs)?)
        }
        _ => {}
    }
    if delta {
        opts.beta = Some(Tensor::from_f32(ctx, &unit(5), &per_head)?);
    }
    let out = Tensor::filled(ctx, &vs, DType::F32, 0.0)?;
    Ok(Box::new(move |enc, ts| {
        let plan =
            crate::linear::encode_linear_attention(ctx, enc, &q, &k, &v, &out, None, &opts, ts)?;
        Ok(plan.label())
    }))
}

/// A recorder of one pass of the naive attention baseline on a case.
pub fn naive_pass<'a>(ctx: &'a GpuContext, case: &BenchCase) -> Result<Record<'a>> {
    let s = case.shape();
    let buf = |n: usize, seed| Tensor::from_f32(ctx, &pseudo_random(n, seed), &[n]);
    let q = buf(s.batch * s.lq * s.hq * s.d, 1)?;
    let k = buf(s.batch * s.lk * s.hkv * s.d, 2)?;
    let v = buf(s.batch * s.lk * s.hkv * s.dv, 3)?;
    let o = buf(s.batch * s.lq * s.hq * s.dv, 4)?;
    let causal = case.causal;
    Ok(Box::new(move |enc, ts| {
        encode_naive_attention(
            ctx,
            enc,
            &s,
            causal,
            q.buffer(),
            k.buffer(),
            v.buffer(),
            o.buffer(),
            ts,
        )?;
        Ok("naive".into())
    }))
}

/// A recorder of one pass of the f32 matmul baseline at `n x n x n`.
pub fn matmul_pass(ctx: &GpuContext, n: u32) -> Result<Record<'_>> {
    let len = (n as usize).pow(2);
    let a = Tensor::from_f32(ctx, &pseudo_random(len, 5), &[len])?;
    let b = Tensor::from_f32(ctx, &pseudo_random(len, 6), &[len])?;
    let c = Tensor::from_f32(ctx, &vec![0.0; len], &[len])?;
    Ok(Box::new(move |enc, ts| {
        encode_matmul(ctx, enc, (n, n, n), a.buffer(), b.buffer(), c.buffer(), ts)?;
        Ok("matmul".into())
    }))
}

/// The matmul baseline's case and FLOPs at `n x n x n`.
fn matmul_case(n: u32) -> (BenchCase, f64) {
    let case = BenchCase::new(
        &format!("matmul-{n}"),
        (1, n as usize, 1, n as usize),
        false,
    );
    (case, 2.0 * (n as f64).powi(3))
}

/// Times flash attention (with the given strategy) alone on a case.
pub fn bench_flash(
    ctx: &GpuContext,
    case: &BenchCase,
    strategy: StrategyChoice,
    warmup: usize,
    repeats: usize,
) -> Result<BenchRow> {
    let mut r = [flash_pass(ctx, case, strategy)?];
    let (label, t) = time_interleaved(ctx, warmup, repeats, &mut r)?.remove(0);
    Ok(row(case, label, &t, case.flops()))
}

/// Flash attention against its baselines on one case, interleaved round by round: flash, then
/// (unless `naive` is false) the naive kernel on the same case, then the matmul baseline at
/// `matmul_n`^3. Rows in that order, flash's with the paired ratios filled in.
pub fn compare_case(
    ctx: &GpuContext,
    case: &BenchCase,
    naive: bool,
    matmul_n: u32,
    warmup: usize,
    rounds: usize,
) -> Result<Vec<BenchRow>> {
    let mut records = vec![flash_pass(ctx, case, StrategyChoice::Auto)?];
    if naive {
        records.push(naive_pass(ctx, case)?);
    }
    records.push(matmul_pass(ctx, matmul_n)?);
    let mut timed = time_interleaved(ctx, warmup, rounds, &mut records)?;
    let (mm_label, mm) = timed
        .pop()
        .ok_or_else(|| AttnError::Gpu("no timing".into()))?;
    let (mm_case, mm_flops) = matmul_case(matmul_n);
    let flops = case.flops();
    let (label, flash) = &timed[0];
    let mut first = row(case, label.clone(), flash, flops);
    first.x_matmul = Some(median_paired(flash, &mm, |f, m| {
        (flops / f) / (mm_flops / m)
    }));
    let mut rows = vec![first];
    if let Some((label, n)) = timed.get(1) {
        rows[0].x_naive = Some(median_paired(flash, n, |f, n| n / f));
        let mut r = row(case, label.clone(), n, flops);
        r.x_naive = Some(1.0);
        r.x_matmul = Some(median_paired(n, &mm, |f, m| (flops / f) / (mm_flops / m)));
        rows.push(r);
    }
    rows.push(row(&mm_case, mm_label, &mm, mm_flops));
    Ok(rows)
}

/// One pattern of a local sweep against dense attention over the same tokens, from one
/// interleaved run: `speedup` and `efficiency` are medians of per-round ratios.
#[derive(Clone, Debug, serde::Serialize)]
pub struct LocalPoint {
    /// `window L+R` or `NA XxY kKxK`.
    pub pattern: String,
    pub kernel: String,
    pub gpu_ms: f64,
    pub min_ms: f64,
    pub max_ms: f64,
    /// GFLOP/s of the work the pattern leaves (`2 (D + Dv)` per visible pair), at the median.
    pub gflops: f64,
    /// Median over rounds of `dense ms / this ms`.
    pub speedup: f64,
    /// `dense pairs / pairs the pattern lets through` (exact count): the speed-up if cost
    /// followed the pattern exactly.
    pub ideal: f64,
    /// `speedup / ideal`.
    pub efficiency: f64,
}

/// A neighborhood pattern for [`local_sweep`]: the token grid and the kernel size per axis.
pub type NaGridCase = (Vec<usize>, Vec<usize>);

/// Sliding windows and neighborhood patterns against dense attention over the same tokens
/// (`dense`: B, L, H, D; every NA grid must hold `dense.lq = dense.lk` tokens), all interleaved
/// round by round: dense, each window, each grid. Returns the dense row and one point per
/// pattern.
pub fn local_sweep(
    ctx: &GpuContext,
    dense: &BenchCase,
    windows: &[(u32, u32)],
    grids: &[NaGridCase],
    warmup: usize,
    rounds: usize,
) -> Result<(BenchRow, Vec<LocalPoint>)> {
    let mut records = vec![flash_pass(ctx, dense, StrategyChoice::Auto)?];
    // (name, visible pairs) per pattern, in record order
    let mut patterns = Vec::new();
    for &w in windows {
        let mut c = dense.clone();
        c.window = Some(w);
        records.push(flash_pass(ctx, &c, StrategyChoice::Auto)?);
        patterns.push((format!("window {}+{}", w.0, w.1), c.visible_pairs()));
    }
    for (spatial, kernel) in grids {
        let (r, pairs) = na_pass(ctx, dense, spatial, kernel)?;
        records.push(r);
        let dims = |v: &[usize]| {
            v.iter()
                .map(|x| x.to_string())
                .collect::<Vec<_>>()
                .join("x")
        };
        patterns.push((format!("NA {} k{}", dims(spatial), dims(kernel)), pairs));
    }
    let timed = time_interleaved(ctx, warmup, rounds, &mut records)?;
    let (dl, dt) = &timed[0];
    let dense_row = row(dense, dl.clone(), dt, dense.flops());
    let dense_pairs = (dense.lq * dense.lk) as f64;
    let points = patterns
        .into_iter()
        .zip(&timed[1..])
        .map(|((pattern, pairs), (kernel, t))| {
            let speedup = median_paired(dt, t, |d, x| d / x);
            let ideal = dense_pairs / pairs as f64;
            LocalPoint {
                pattern,
                kernel: kernel.clone(),
                gpu_ms: t.median_ms,
                min_ms: t.min_ms,
                max_ms: t.max_ms,
                gflops: dense.shape().flops_for_pairs(pairs) / (t.median_ms * 1e6),
                speedup,
                ideal,
                efficiency: speedup / ideal,
            }
        })
        .collect();
    Ok((dense_row, points))
}

/// A recorder of neighborhood attention over `spatial` with `kernel` (B, H, D from `dense`,
/// whose `lq = lk` must be the grid's token count), and the pattern's visible pairs.
fn na_pass<'a>(
    ctx: &'a GpuContext,
    dense: &BenchCase,
    spatial: &[usize],
    kernel: &[usize],
) -> Result<(Record<'a>, u64)> {
    let c = dense;
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
    let record: Record = Box::new(move |enc, ts| {
        let plan = encode_neighborhood_attention(ctx, enc, &q, &k, &v, &out, None, &opts, ts)?;
        Ok(plan.key.label())
    });
    Ok((record, spec.pairs()))
}

/// A text table of a sweep: median, min and max time, GFLOP/s at the median, and the paired
/// ratios to the naive kernel and the matmul baseline.
pub fn table(rows: &[BenchRow]) -> String {
    let mut s = format!(
        "{:<20} {:<16} {:>11} {:>11} {:>11} {:>9} {:>8} {:>9}\n",
        "case", "kernel", "median ms", "min ms", "max ms", "GFLOP/s", "x naive", "x matmul"
    );
    let opt = |x: Option<f64>| x.map_or("-".into(), |x| format!("{x:.2}"));
    for r in rows {
        s += &format!(
            "{:<20} {:<16} {:>11.3} {:>11.3} {:>11.3} {:>9.2} {:>8} {:>9}\n",
            r.case.name,
            r.kernel,
            r.gpu_ms,
            r.min_ms,
            r.max_ms,
            r.gflops,
            opt(r.x_naive),
            opt(r.x_matmul)
        );
    }
    s
}

/// The whole sweep over [`registry`]: per case, flash attention (the plan's strategy), the naive
/// kernel (unless `naive` is false) and the matmul baseline (1024^3), interleaved. `progress` is
/// called with a message before each case.
pub fn sweep(
    ctx: &GpuContext,
    quick: bool,
    rounds: usize,
    naive: bool,
    mut progress: impl FnMut(&str),
) -> Result<Vec<BenchRow>> {
    let mut rows = Vec::new();
    for c in registry(quick) {
        progress(&c.name);
        rows.extend(compare_case(ctx, &c, naive, 1024, WARMUP, rounds)?);
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timing(samples: &[f64]) -> Timing {
        Timing::from_samples(samples.to_vec(), Clock::GpuTimestamps)
    }

    #[test]
    fn median_min_max_of_odd_and_even_counts() {
        let t = timing(&[5.0, 1.0, 3.0]);
        assert_eq!((t.min_ms, t.median_ms, t.max_ms), (1.0, 3.0, 5.0));
        assert_eq!(t.samples_ms, [5.0, 1.0, 3.0], "samples stay in round order");
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
        assert!(median(&[]).is_nan());
    }

    #[test]
    fn paired_ratios_follow_the_rounds_not_the_sorted_samples() {
        // a slow phase in round 2 hits both kernels: the per-round ratio stays 2
        let a = timing(&[10.0, 30.0, 10.0]);
        let b = timing(&[5.0, 15.0, 5.0]);
        assert_eq!(median_paired(&a, &b, |x, y| x / y), 2.0);
        // medians of each side would say 10 / 5 too, but not when the phases differ
        let a = timing(&[10.0, 30.0, 30.0]);
        let b = timing(&[5.0, 15.0, 5.0]);
        assert_eq!(median_paired(&a, &b, |x, y| x / y), 2.0);
        assert_eq!(a.median_ms / b.median_ms, 6.0);
    }
}
