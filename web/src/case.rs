//! One attention call as the page describes it: build random inputs, run the library's kernel,
//! time it, check it against the f64 reference, and describe the pattern and one query's weights
//! for the heat maps. Plain Rust (no wasm-bindgen), so it also runs natively in `cargo test`.

use std::sync::Arc;
use wgpu_attention::bench::{pseudo_random, time_passes_async, Timing};
use wgpu_attention::flash::reference::{
    attention_plain_f16, attention_reference, compare, round_f16, visible, Comparison, RefInputs,
};
use wgpu_attention::neighborhood::reference::{neighborhood_plain_f16, neighborhood_reference};
use wgpu_attention::neighborhood::NaSpec;
use wgpu_attention::sparse::attention::{encode_sparse_attention, sparse_reference, SparseOptions};
use wgpu_attention::sparse::routing::TopK;
use wgpu_attention::sparse::{BlockLayout, BlockMask};
use wgpu_attention::wgpu;
use wgpu_attention::{
    encode_flash_attention, encode_neighborhood_attention, AttnError, AttnShape, DType,
    FlashOptions, GpuContext, NeighborhoodOptions, Result, Tensor,
};

pub use crate::config::{Config, Pattern, Report, Variant, Weights};

const MAX_CELLS: usize = 128;

fn side(s: i64) -> Option<u32> {
    u32::try_from(s).ok()
}

/// Everything the kernel call needs, built from a config.
struct Problem {
    shape: AttnShape,
    dtype: DType,
    flash: FlashOptions,
    na: Option<(NeighborhoodOptions, NaSpec)>,
    /// Sparse cases: the options (a block mask, or top-k routing on the device), and the
    /// block mask of the reference and the drawing.
    sparse: Option<SparseOptions>,
    mask: Option<Arc<BlockMask>>,
    /// The token grid of a neighborhood case (empty for sequences).
    grid: Vec<usize>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
}

/// The dense options of a dense, window or sparse case (a tile forced where the case names
/// one).
fn flash_options(cfg: &Config) -> FlashOptions {
    let tile = cfg
        .tile
        .map(|[wg, rows]| wgpu_attention::softmax::Tile::new(wg, rows));
    match cfg.variant {
        Variant::Dense | Variant::Sparse => FlashOptions::default()
            .causal(cfg.causal)
            .tile(tile.filter(|_| cfg.variant == Variant::Dense)),
        Variant::Window => FlashOptions::default()
            .causal(cfg.causal)
            .window((side(cfg.window[0]), side(cfg.window[1])))
            .sinks(cfg.sinks)
            .tile(tile),
        Variant::Neighborhood | Variant::Linear | Variant::Decode => FlashOptions::default(),
    }
}

/// A sparse case's options and block mask: a seeded random mask at the case's density, or
/// routing on the device that keeps every allowed block (the mask is then every block: the
/// reference's).
fn sparse_problem(
    cfg: &Config,
    lq: usize,
    lk: usize,
    flash: &FlashOptions,
    seed: u64,
) -> Result<(SparseOptions, Arc<BlockMask>)> {
    let layout = BlockLayout {
        batch: 1,
        heads: 1,
        lq,
        lk,
        q_block: cfg.block[0],
        kv_block: cfg.block[1],
    };
    let (nq, nk) = layout.blocks();
    if cfg.topk > 0 && cfg.topk < nk {
        return Err(AttnError::invalid(
            "topk",
            format!("at least the {nk} key blocks (the page checks routing that keeps every allowed block)"),
            cfg.topk,
        ));
    }
    let on: Vec<bool> = pseudo_random(nq * nk, seed)
        .iter()
        .map(|x| f64::from(x + 1.0) * 0.5 < cfg.density || cfg.topk > 0)
        .collect();
    let mask = Arc::new(BlockMask::from_dense(&on, layout)?);
    let options = match cfg.topk {
        0 => SparseOptions::default()
            .flash(flash.clone())
            .block_mask(Some(mask.clone())),
        // routed on the device: the mask (every block) is the reference's
        k => SparseOptions::default()
            .flash(flash.clone())
            .topk(Some(TopK {
                k,
                block: cfg.block[0],
                local: 1,
                sinks: 1,
            }))
            .block_mask(None),
    };
    Ok((options, mask))
}

impl Problem {
    fn new(cfg: &Config) -> Result<Self> {
        let dtype = match cfg.dtype.as_str() {
            "f32" => DType::F32,
            "f16" => DType::F16,
            other => return Err(AttnError::invalid("dtype", "\"f32\" or \"f16\"", other)),
        };
        if matches!(cfg.variant, Variant::Linear | Variant::Decode) {
            return Err(AttnError::invalid(
                "variant",
                "a dense, window, neighborhood or sparse variant (linear and decode cases run \
                 through run_case)",
                format!("{:?}", cfg.variant),
            ));
        }
        let (lq, lk, na) = match cfg.variant {
            Variant::Neighborhood => {
                let opts = NeighborhoodOptions::default()
                    .kernel_size(cfg.kernel.clone())
                    .dilation(cfg.dilation.clone())
                    .stride(cfg.stride.clone())
                    .causal(cfg.grid_causal.clone());
                let spec = NaSpec::new(&opts.axes(&cfg.grid)?)?;
                (spec.len(), spec.len(), Some((opts, spec)))
            }
            _ => (cfg.lq, cfg.lk, None),
        };
        let shape = AttnShape {
            batch: cfg.batch,
            lq,
            lk,
            hq: cfg.heads,
            hkv: cfg.kv_heads,
            d: cfg.d,
            dv: cfg.d,
        };
        let flash = flash_options(cfg);
        // random in [-1, 1), rounded to f16 first where the kernel reads f16
        let round = |x: Vec<f32>| match dtype {
            DType::F16 => x
                .into_iter()
                .map(|v| half::f16::from_f32(v).to_f32())
                .collect(),
            _ => x,
        };
        let seed = cfg.seed.wrapping_mul(3);
        let q = round(pseudo_random(cfg.batch * lq * cfg.heads * cfg.d, seed));
        let k = round(pseudo_random(
            cfg.batch * lk * cfg.kv_heads * cfg.d,
            seed + 1,
        ));
        let v = round(pseudo_random(
            cfg.batch * lk * cfg.kv_heads * cfg.d,
            seed + 2,
        ));
        let (sparse, mask) = match cfg.variant {
            Variant::Sparse => {
                let (options, mask) = sparse_problem(cfg, lq, lk, &flash, seed + 3)?;
                (Some(options), Some(mask))
            }
            _ => (None, None),
        };
        Ok(Problem {
            shape,
            dtype,
            flash,
            sparse,
            mask,
            grid: if na.is_some() {
                cfg.grid.clone()
            } else {
                vec![]
            },
            na,
            q,
            k,
            v,
        })
    }

    /// The tensor shape of a `[B, L, H, D]` input in this problem's layout.
    fn dims(&self, l: usize, h: usize) -> Vec<usize> {
        let mut dims = vec![self.shape.batch];
        match self.na {
            Some(_) => dims.extend(&self.grid),
            None => dims.push(l),
        }
        dims.extend([h, self.shape.d]);
        dims
    }

    fn upload(&self, ctx: &GpuContext, data: &[f32], dims: &[usize]) -> Result<Tensor> {
        // the page's dtypes are f32 and f16 (parsed above)
        match self.dtype {
            DType::F16 => {
                let h: Vec<half::f16> = data.iter().map(|&x| half::f16::from_f32(x)).collect();
                Tensor::from_f16(ctx, &h, dims)
            }
            _ => Tensor::from_f32(ctx, data, dims),
        }
    }

    fn sees(&self, i: usize, j: usize) -> bool {
        let listed = |m: &Arc<BlockMask>| m.state(0, 0, i, j) != 0;
        match &self.na {
            Some((_, spec)) => spec.sees(i, j),
            None => {
                visible(&self.flash, i, j, self.shape.lq, self.shape.lk)
                    && self.mask.as_ref().is_none_or(listed)
            }
        }
    }

    fn pairs(&self) -> u64 {
        match &self.na {
            Some((_, spec)) => spec.pairs(),
            None => (0..self.shape.lq)
                .map(|i| (0..self.shape.lk).filter(|&j| self.sees(i, j)).count() as u64)
                .sum(),
        }
    }

    fn check(
        &self,
        ctx: &GpuContext,
        got: &[f32],
        lse: &[f32],
    ) -> wgpu_attention::Result<Comparison> {
        let ri = RefInputs {
            shape: self.shape,
            q: &self.q,
            k: &self.k,
            v: &self.v,
            bias: None,
        };
        let f16 = self.dtype == DType::F16;
        if let Some(sp) = &self.sparse {
            let mask = self
                .mask
                .as_deref()
                .ok_or_else(|| AttnError::invalid("sparse case", "a block mask", "none"))?;
            // no snippets here: the sparse reference runs on the CPU alone
            let r = sparse_reference(ctx, &ri, sp, mask, |p| p)?;
            let plain = f16
                .then(|| {
                    sparse_reference(ctx, &ri, sp, mask, round_f16)
                        .map(|o| o.out.into_iter().map(round_f16).collect::<Vec<_>>())
                })
                .transpose()?;
            return Ok(compare(got, Some(lse), &r, plain.as_deref()));
        }
        match &self.na {
            Some((o, spec)) => {
                let r = neighborhood_reference(&ri, spec, o.scale)?;
                let plain = f16
                    .then(|| neighborhood_plain_f16(&ri, spec, o.scale))
                    .transpose()?;
                Ok(compare(got, Some(lse), &r, plain.as_deref()))
            }
            None => {
                let r = attention_reference(&ri, &self.flash)?;
                let plain = f16
                    .then(|| attention_plain_f16(&ri, &self.flash))
                    .transpose()?;
                Ok(compare(got, Some(lse), &r, plain.as_deref()))
            }
        }
    }

    fn pattern(&self) -> Pattern {
        let (lq, lk) = (self.shape.lq, self.shape.lk);
        let (rows, cols) = (lq.min(MAX_CELLS), lk.min(MAX_CELLS));
        let mut seen = vec![0u32; rows * cols];
        let mut total = vec![0u32; rows * cols];
        for i in 0..lq {
            let r = i * rows / lq;
            for j in 0..lk {
                let c = r * cols + j * cols / lk;
                total[c] += 1;
                seen[c] += self.sees(i, j) as u32;
            }
        }
        let cells = seen
            .iter()
            .zip(&total)
            .map(|(&s, &t)| (s as f64 / t.max(1) as f64 * 255.0).round() as u8)
            .collect();
        Pattern { rows, cols, cells }
    }

    /// Softmax weights of query `i` (batch 0, head 0) over the keys, in f64.
    fn weights(&self, i: usize) -> Weights {
        let s = &self.shape;
        let scale = 1.0 / (s.d as f64).sqrt();
        let qrow = &self.q[i * s.hq * s.d..][..s.d];
        let scores: Vec<Option<f64>> = (0..s.lk)
            .map(|j| {
                self.sees(i, j).then(|| {
                    let krow = &self.k[j * s.hkv * s.d..][..s.d];
                    qrow.iter()
                        .zip(krow)
                        .map(|(&a, &b)| a as f64 * b as f64)
                        .sum::<f64>()
                        * scale
                })
            })
            .collect();
        let max = scores
            .iter()
            .flatten()
            .fold(f64::NEG_INFINITY, |m, &x| m.max(x));
        let sum: f64 = scores.iter().flatten().map(|x| (x - max).exp()).sum();
        let values = scores
            .iter()
            .map(|x| x.map_or(0.0, |x| ((x - max).exp() / sum) as f32))
            .collect();
        Weights {
            query: i,
            values,
            grid: self.grid.clone(),
        }
    }
}

/// A case with its inputs and outputs on the device, so that it can run again and again: the
/// page's run and the peer benchmark (`benches/ort_peer.py`), which times it against another
/// library round by round.
pub struct Prepared {
    p: Problem,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
}

impl Prepared {
    /// Builds the random inputs of `cfg` and uploads them; the outputs start as NaN.
    pub fn new(ctx: &GpuContext, cfg: &Config) -> Result<Prepared> {
        let p = Problem::new(cfg)?;
        let s = p.shape;
        let q = p.upload(ctx, &p.q, &p.dims(s.lq, s.hq))?;
        let k = p.upload(ctx, &p.k, &p.dims(s.lk, s.hkv))?;
        let v = p.upload(ctx, &p.v, &p.dims(s.lk, s.hkv))?;
        let out = Tensor::filled(ctx, q.shape(), p.dtype, f32::NAN)?;
        let lse_dims = match p.na {
            Some(_) => q.shape()[..q.shape().len() - 1].to_vec(),
            None => vec![s.batch, s.hq, s.lq],
        };
        let lse = Tensor::filled(ctx, &lse_dims, DType::F32, f32::NAN)?;
        Ok(Prepared {
            p,
            q,
            k,
            v,
            out,
            lse,
        })
    }

    /// Records one call into `enc`; returns the kernel's label.
    fn record(
        &self,
        ctx: &GpuContext,
        enc: &mut wgpu::CommandEncoder,
        ts: Option<(&wgpu::QuerySet, u32)>,
    ) -> Result<String> {
        let (q, k, v, out, lse) = (&self.q, &self.k, &self.v, &self.out, Some(&self.lse));
        let plan = match (&self.p.na, &self.p.sparse) {
            (Some((o, _)), _) => encode_neighborhood_attention(ctx, enc, q, k, v, out, lse, o, ts)?,
            (None, Some(sp)) => encode_sparse_attention(ctx, enc, q, k, v, out, lse, sp, ts)?,
            (None, None) => encode_flash_attention(ctx, enc, q, k, v, out, lse, &self.p.flash, ts)?,
        };
        Ok(plan.label())
    }

    /// One call, submitted alone; resolves when the device has finished it. The peer benchmark
    /// times this with the page's clock, as it times the other library's `run`.
    pub async fn submit(&self, ctx: &GpuContext) -> Result<()> {
        ctx.submit(|enc| self.record(ctx, enc, None).map(|_| ()))?;
        ctx.finished().await
    }

    /// GPU time of `repeats` calls after `warmup` (timestamp queries); the kernel's label with it.
    pub async fn gpu_time(
        &self,
        ctx: &GpuContext,
        warmup: usize,
        repeats: usize,
    ) -> Result<(String, Timing)> {
        let mut kernel = String::new();
        let t = time_passes_async(ctx, warmup, repeats, |enc, ts| {
            kernel = self.record(ctx, enc, ts)?;
            Ok(())
        })
        .await?;
        Ok((kernel, t))
    }

    /// The inputs as f32 (`[B, L, H, D]`), for feeding the same numbers to another library.
    pub fn inputs(&self) -> [&[f32]; 3] {
        [&self.p.q, &self.p.k, &self.p.v]
    }

    /// The output as f32, read back (resolves after the device has finished).
    pub async fn output(&self, ctx: &GpuContext) -> Result<Vec<f32>> {
        ctx.finished().await?;
        self.out.to_vec_f32_async(ctx).await
    }
}

/// Runs one case on `ctx`: the kernel (timed where the adapter has timestamps), the reference
/// check, the pattern and the weights of `cfg.query`.
pub async fn run_case(ctx: &GpuContext, cfg: &Config) -> Result<Report> {
    if cfg.variant == Variant::Linear {
        return crate::linear_case::run(ctx, cfg).await;
    }
    if cfg.variant == Variant::Decode {
        return crate::decode_case::run(ctx, cfg).await;
    }
    let prep = Prepared::new(ctx, cfg)?;
    let s = prep.p.shape;
    if cfg.query >= s.lq {
        return Err(AttnError::invalid(
            "query",
            format!("an index below Lq = {}", s.lq),
            cfg.query,
        ));
    }
    if cfg.repeats == 0 {
        return Err(AttnError::invalid("repeats", "at least 1", 0));
    }
    let (kernel, timing) = if ctx.caps.timestamps {
        let (kernel, t) = prep.gpu_time(ctx, 1, cfg.repeats).await?;
        (kernel, Some(t))
    } else {
        let mut kernel = String::new();
        ctx.submit(|enc| {
            kernel = prep.record(ctx, enc, None)?;
            Ok(())
        })?;
        (kernel, None)
    };
    // where the browser reported an error (an invalid pipeline), say so instead of NaN outputs
    ctx.finished().await?;
    let got = prep.out.to_vec_f32_async(ctx).await?;
    let got_lse = prep.lse.to_vec_f32_async(ctx).await?;
    let p = &prep.p;
    let pairs = p.pairs();
    let flops = s.flops_for_pairs(pairs);
    Ok(Report {
        name: cfg.name.clone(),
        variant: cfg.variant,
        kernel,
        dtype: cfg.dtype.clone(),
        shape: [s.batch, s.lq, s.lk, s.hq, s.hkv, s.d],
        gpu_ms: timing.as_ref().map(|t| t.median_ms),
        samples_ms: timing.as_ref().map_or(vec![], |t| t.samples_ms.clone()),
        clock: timing.as_ref().map(|t| t.clock),
        gflops: timing.as_ref().map(|t| flops / (t.median_ms * 1e6)),
        visible_pairs: pairs,
        check: p.check(ctx, &got, &got_lse)?,
        pattern: p.pattern(),
        weights: p.weights(cfg.query),
    })
}
