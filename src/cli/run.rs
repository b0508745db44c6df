//! `wgpu-attention run`: one softmax-attention call (dense, neighborhood, sparse) from .npy
//! files or random inputs, optionally checked against the f64 reference.

use std::path::PathBuf;

use rand::{Rng, SeedableRng};
use wgpu_attention::bench::{self};
use wgpu_attention::*;

use super::npy;
pub use super::report::{check, report};
use super::{CliResult, DTypeArg, Failure, StrategyArg};

#[derive(clap::Args)]
pub struct RunArgs {
    /// Q as .npy [B, Lq, Hq, D] (f32 or f16); needs --k and --v.
    #[arg(long)]
    pub q: Option<PathBuf>,
    /// K as .npy [B, Lk, Hkv, D].
    #[arg(long)]
    pub k: Option<PathBuf>,
    /// V as .npy [B, Lk, Hkv, Dv].
    #[arg(long)]
    pub v: Option<PathBuf>,
    /// Random inputs of this shape: B,LQ,LK,HQ,HKV,D[,DV].
    #[arg(long)]
    pub shape: Option<String>,
    /// Seed of the random inputs.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// dtype of random inputs (files keep their own).
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: DTypeArg,
    /// Bottom-right aligned causal mask.
    #[arg(long)]
    pub causal: bool,
    /// Softmax scale (default 1/sqrt(D)).
    #[arg(long)]
    pub scale: Option<f32>,
    /// Tanh softcap c: s = c * tanh(s / c).
    #[arg(long)]
    pub softcap: Option<f32>,
    /// ALiBi slopes, .npy [Hq] f32.
    #[arg(long)]
    pub alibi: Option<PathBuf>,
    /// Additive bias, .npy [B|1, Hq|1, Lq, Lk] f32.
    #[arg(long)]
    pub bias: Option<PathBuf>,
    /// Query lengths per batch, .npy [B] int32.
    #[arg(long)]
    pub q_lens: Option<PathBuf>,
    /// Key lengths per batch, .npy [B] int32.
    #[arg(long)]
    pub kv_lens: Option<PathBuf>,
    /// Sliding window LEFT,RIGHT around the diagonal (-1 leaves a side unbounded).
    #[arg(long, allow_hyphen_values = true)]
    pub window: Option<String>,
    /// Attention sinks: the first N keys stay visible besides the window.
    #[arg(long, default_value_t = 0)]
    pub sinks: u32,
    /// Dense calls: this query tile instead of the plan's, as `info` and `tune` print it:
    /// wgWxrR, with a trailing s2 for two K/V stages (e.g. wg64xr8s2).
    #[arg(long)]
    pub tile: Option<String>,
    /// Neighborhood attention (NATTEN) with these kernel sizes, one per spatial axis; the rank
    /// of the inputs ([B, X, (Y, (Z,)) H, D]) decides 1D, 2D or 3D.
    #[arg(long)]
    pub na_kernel: Option<String>,
    /// Neighborhood dilation per axis (default 1).
    #[arg(long)]
    pub na_dilation: Option<String>,
    /// Neighborhood causality per axis, 0 or 1 (default 0).
    #[arg(long)]
    pub na_causal: Option<String>,
    /// Neighborhood stride per axis (default 1).
    #[arg(long)]
    pub na_stride: Option<String>,
    /// Neighborhood: NATTEN's additional keys, .npy [B, S_add, Hkv, D] (every query attends to
    /// them besides its neighborhood); with --na-extra-v.
    #[arg(long)]
    pub na_extra_k: Option<PathBuf>,
    /// Neighborhood: NATTEN's additional values, .npy [B, S_add, Hkv, Dv].
    #[arg(long)]
    pub na_extra_v: Option<PathBuf>,
    /// Spatial grid X[,Y[,Z]] for random neighborhood inputs (--shape's LQ and LK = its product).
    #[arg(long)]
    pub na_grid: Option<String>,
    /// Sparse: a dense block mask, .npy bool or uint8 [B|1, Hq|1, nQ, nK] (every true block
    /// visited, in full), blocks of --block-size.
    #[arg(long)]
    pub block_mask: Option<PathBuf>,
    /// Sparse: block sizes BQ,BK (multiples of 16 from 16 to 256; default 128,128).
    #[arg(long)]
    pub block_size: Option<String>,
    /// Sparse: a WGSL file defining
    /// `fn mask_mod(b: u32, h: u32, q_idx: u32, kv_idx: u32) -> bool` (evaluated on the GPU
    /// to make the block mask when --block-mask is absent, and on its partial blocks).
    #[arg(long)]
    pub mask_mod: Option<PathBuf>,
    /// Sparse: a WGSL file defining
    /// `fn score_mod(score: f32, b: u32, h: u32, q_idx: u32, kv_idx: u32) -> f32`.
    #[arg(long)]
    pub score_mod: Option<PathBuf>,
    /// Sparse: a buffer the snippets read as aux0, aux1, .. (repeatable; .npy float32, int32
    /// or uint32 of any shape, flattened).
    #[arg(long)]
    pub aux: Vec<PathBuf>,
    /// Sparse: softmax, or sigmoid[:BIAS] (sigmoid attention: each weight sigmoid(s + BIAS),
    /// no row sum, no LSE; BIAS defaults to -ln(LK)).
    #[arg(long)]
    pub normalizer: Option<String>,
    /// Sparse: content-routed blocks: each query block attends to its K best key blocks by
    /// pooled scores (mean q . mean k), in blocks of --block-size N,N.
    #[arg(long)]
    pub topk_blocks: Option<usize>,
    /// Sparse, with --topk-blocks: the diagonal key block and the L - 1 before it are kept.
    #[arg(long, default_value_t = 0)]
    pub local_blocks: usize,
    /// Sparse, with --topk-blocks: the first S key blocks are kept.
    #[arg(long, default_value_t = 0)]
    pub sink_blocks: usize,
    /// Sparse, with --topk-blocks: writes the selected key blocks here (.npy int32
    /// [B, Hq, nQ, slots], ascending, padded with -1).
    #[arg(long)]
    pub selected: Option<PathBuf>,
    /// Decode: the K cache, .npy [pages, page_size, Hkv, D] with --block-table, else
    /// [B, Lk, Hkv, D] (f32 or f16); --q is then [B, Sq, Hq, D] and --k/--v, if given, are new
    /// tokens [B, S_new, Hkv, D] appended at --cache-seqlens before attending.
    #[arg(long)]
    pub k_cache: Option<PathBuf>,
    /// Decode: the V cache, .npy [pages|B, page_size|Lk, Hkv, Dv].
    #[arg(long)]
    pub v_cache: Option<PathBuf>,
    /// Decode: the block table, .npy int32 [B, max_blocks] (page indices).
    #[arg(long)]
    pub block_table: Option<PathBuf>,
    /// Decode: tokens already in the cache per sequence, .npy int32 [B].
    #[arg(long)]
    pub cache_seqlens: Option<PathBuf>,
    /// Decode: key splits per (batch, KV head), N or auto.
    #[arg(long)]
    pub kv_splits: Option<String>,
    /// Decode: how the cache is stored: f32, f16, q8_0 or q4_0 (ggml's blocks; float .npy
    /// caches are quantized by the library's quantizer). Default: the cache file's dtype.
    #[arg(long)]
    pub kv_format: Option<String>,
    /// Kernel strategy.
    #[arg(long, value_enum, default_value = "auto")]
    pub strategy: StrategyArg,
    /// Writes O here (.npy, dtype of the inputs).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Writes LSE [B, Hq, Lq] f32 here (.npy); neighborhood: [B, X, (Y, (Z,)) Hq].
    #[arg(long)]
    pub lse: Option<PathBuf>,
    /// Compares with the f64 reference; exits 1 over tolerance.
    #[arg(long)]
    pub check: bool,
    /// Prints one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// Timed runs after one warm-up; the median is reported.
    #[arg(long, default_value_t = 1)]
    pub repeat: usize,
}

/// Host copies of the inputs (f32 values; exact for f16) and their dtype.
pub struct Inputs {
    pub q: npy::Array,
    pub k: npy::Array,
    pub v: npy::Array,
}

pub fn parse_shape(s: &str) -> CliResult<[usize; 7]> {
    let bad = || {
        Failure::Input(format!(
            "--shape: expected B,LQ,LK,HQ,HKV,D[,DV] (positive integers), got '{s}'"
        ))
    };
    let v: Vec<usize> = s
        .split(',')
        .map(|x| x.trim().parse::<usize>().map_err(|_| bad()))
        .collect::<CliResult<_>>()?;
    if !(v.len() == 6 || v.len() == 7) || v.contains(&0) {
        return Err(bad());
    }
    Ok([
        v[0],
        v[1],
        v[2],
        v[3],
        v[4],
        v[5],
        *v.get(6).unwrap_or(&v[5]),
    ])
}

pub fn parse_window(s: &str) -> CliResult<(Option<u32>, Option<u32>)> {
    let side = |x: &str| -> CliResult<Option<u32>> {
        match x.trim().parse::<i64>() {
            Ok(-1) => Ok(None),
            Ok(v) if (0..=i32::MAX as i64).contains(&v) => Ok(Some(v as u32)),
            _ => Err(Failure::Input(format!(
                "--window: expected LEFT,RIGHT (each >= 0, or -1 for unbounded), got '{s}'"
            ))),
        }
    };
    match s.split_once(',') {
        Some((l, r)) => Ok((side(l)?, side(r)?)),
        None => Err(Failure::Input(format!(
            "--window: expected LEFT,RIGHT (each >= 0, or -1 for unbounded), got '{s}'"
        ))),
    }
}

pub fn load_inputs(a: &RunArgs) -> CliResult<Inputs> {
    match (&a.q, &a.k, &a.v, &a.shape) {
        (Some(q), Some(k), Some(v), None) => {
            let (q, k, v) = (
                npy::read_float(q)?,
                npy::read_float(k)?,
                npy::read_float(v)?,
            );
            Ok(Inputs { q, k, v })
        }
        (None, None, None, Some(s)) => {
            let [b, lq, lk, hq, hkv, d, dv] = parse_shape(s)?;
            let dtype = match a.dtype {
                DTypeArg::F32 => DType::F32,
                DTypeArg::F16 => DType::F16,
            };
            let mut rng = rand::rngs::StdRng::seed_from_u64(a.seed);
            let mut gen = |shape: Vec<usize>| {
                let n = shape.iter().product();
                let data = (0..n)
                    .map(|_| {
                        let x: f32 = rng.random_range(-1.0..1.0);
                        match dtype {
                            DType::F16 => half::f16::from_f32(x).to_f32(),
                            _ => x,
                        }
                    })
                    .collect();
                npy::Array { shape, dtype, data }
            };
            Ok(Inputs {
                q: gen(vec![b, lq, hq, d]),
                k: gen(vec![b, lk, hkv, d]),
                v: gen(vec![b, lk, hkv, dv]),
            })
        }
        _ => Err(Failure::Input(
            "give either --q, --k and --v (.npy files) or --shape B,LQ,LK,HQ,HKV,D[,DV]".into(),
        )),
    }
}

pub fn upload(ctx: &GpuContext, a: &npy::Array) -> CliResult<Tensor> {
    // .npy inputs are read as f32 or f16 (npy::read)
    Ok(match a.dtype {
        DType::F16 => {
            let h: Vec<half::f16> = a.data.iter().map(|&x| half::f16::from_f32(x)).collect();
            Tensor::from_f16(ctx, &h, &a.shape)?
        }
        _ => Tensor::from_f32(ctx, &a.data, &a.shape)?,
    })
}

pub fn run(a: &RunArgs) -> CliResult<()> {
    if a.repeat == 0 {
        return Err(Failure::Input(
            "--repeat: expected at least 1, got 0".into(),
        ));
    }
    if super::decode::wanted(a) {
        return super::decode::run(a);
    }
    let inp = load_inputs(a)?;
    if a.na_kernel.is_some() {
        return super::na::run(a, inp);
    }
    let ctx = GpuContext::new()?;
    let (q, k, v) = (
        upload(&ctx, &inp.q)?,
        upload(&ctx, &inp.k)?,
        upload(&ctx, &inp.v)?,
    );
    let s = flash::check_inputs(&q, &k, &v)?;
    let (opts, bias_host) = flash_options(a, &ctx, &s)?;
    // a sparse call: its block mask made once, before the timed runs
    let sparse = sparse_options(a, &ctx, [&q, &k], &s, &opts)?;
    let out = Tensor::filled(&ctx, &[s.batch, s.lq, s.hq, s.dv], q.dtype(), f32::NAN)?;
    // sigmoid attention has no LSE: --check compares O alone (--lse is refused)
    let sigmoid = sparse
        .as_ref()
        .is_some_and(|sp| sp.normalizer != sparse::attention::Normalizer::Softmax);
    let want_lse = a.lse.is_some() || (a.check && !sigmoid);
    let lse = if want_lse {
        Some(Tensor::filled(
            &ctx,
            &[s.batch, s.hq, s.lq],
            DType::F32,
            f32::NAN,
        )?)
    } else {
        None
    };
    let mut label = String::new();
    let t = bench::time_passes(&ctx, 1, a.repeat, |enc, ts| {
        let plan = match &sparse {
            Some(sp) => sparse::attention::encode_sparse_attention(
                &ctx,
                enc,
                &q,
                &k,
                &v,
                &out,
                lse.as_ref(),
                sp,
                ts,
            )?,
            None => {
                flash::encode_flash_attention(&ctx, enc, &q, &k, &v, &out, lse.as_ref(), &opts, ts)?
            }
        };
        label = plan.label();
        Ok(())
    })?;
    let got = out.to_vec_f32(&ctx)?;
    let got_lse = match &lse {
        Some(l) => Some(l.to_vec_f32(&ctx)?),
        None => None,
    };
    if let Some(p) = &a.out {
        npy::write(p, out.shape(), out.dtype(), &got)?;
    }
    if let (Some(p), Some(l)) = (&a.lse, &got_lse) {
        npy::write(p, &[s.batch, s.hq, s.lq], DType::F32, l)?;
    }
    let flops = run_flops(a, &s, &opts, sparse.as_ref(), q.dtype());
    let gflops = flops / (t.median_ms * 1e6);
    let cmp = if a.check {
        Some(check(
            &ctx,
            &inp,
            &s,
            bias_host.as_ref(),
            &opts,
            sparse.as_ref(),
            &got,
            got_lse.as_deref(),
        )?)
    } else {
        None
    };
    let desc = describe(&s, q.dtype(), a.causal);
    let shape = serde_json::json!([s.batch, s.lq, s.lk, s.hq, s.hkv, s.d, s.dv]);
    report(&ctx, a, &label, &desc, shape, q.dtype(), &t, gflops, cmp)
}

/// The problem as `run` prints it.
fn describe(s: &AttnShape, dtype: DType, causal: bool) -> String {
    format!(
        "shape B={} Lq={} Lk={} Hq={} Hkv={} D={} Dv={} {dtype}{}",
        s.batch,
        s.lq,
        s.lk,
        s.hq,
        s.hkv,
        s.d,
        s.dv,
        if causal { " causal" } else { "" }
    )
}

/// The dense options of `run`'s flags, with the bias as read (for `--check`).
fn flash_options(
    a: &RunArgs,
    ctx: &GpuContext,
    s: &AttnShape,
) -> CliResult<(FlashOptions, Option<npy::Array>)> {
    let mut opts = FlashOptions::default()
        .causal(a.causal)
        .scale(a.scale)
        .softcap(a.softcap)
        .window(match &a.window {
            Some(w) => parse_window(w)?,
            None => (None, None),
        })
        .sinks(a.sinks)
        .strategy(a.strategy.choice())
        .tile(
            a.tile
                .as_deref()
                .map(|t| {
                    t.parse()
                        .map_err(|e| Failure::Input(format!("--tile: {e}")))
                })
                .transpose()?,
        );
    if let Some(p) = &a.alibi {
        let arr = npy::read_float(p)?;
        if arr.shape != [s.hq] || arr.dtype != DType::F32 {
            return Err(Failure::Input(format!(
                "{}: expected [{}] f32 (one slope per query head), got {:?} {}",
                p.display(),
                s.hq,
                arr.shape,
                arr.dtype
            )));
        }
        opts.alibi_slopes = Some(arr.data);
    }
    let bias_host = match &a.bias {
        Some(p) => {
            let arr = npy::read_float(p)?;
            if arr.shape.len() != 4 || arr.dtype != DType::F32 {
                return Err(Failure::Input(format!(
                    "{}: expected [B|1, Hq|1, Lq, Lk] f32, got {:?} {}",
                    p.display(),
                    arr.shape,
                    arr.dtype
                )));
            }
            opts.bias = Some(Tensor::from_f32(ctx, &arr.data, &arr.shape)?);
            Some(arr)
        }
        None => None,
    };
    if let Some(p) = &a.q_lens {
        opts.q_lens = Some(npy::read_lens(p, s.batch)?);
    }
    if let Some(p) = &a.kv_lens {
        opts.kv_lens = Some(npy::read_lens(p, s.batch)?);
    }
    Ok((opts, bias_host))
}

/// The sparse options of `run`'s flags (none when no sparse flag is given), with the block
/// mask resolved (routed once when `--topk-blocks` asks, `--selected` written).
fn sparse_options(
    a: &RunArgs,
    ctx: &GpuContext,
    [q, k]: [&Tensor; 2],
    s: &AttnShape,
    opts: &FlashOptions,
) -> CliResult<Option<sparse::SparseOptions>> {
    let sparse_args = super::sparse::SparseArgs {
        block_mask: a.block_mask.as_deref(),
        block_size: a.block_size.as_deref(),
        mask_mod: a.mask_mod.as_deref(),
        score_mod: a.score_mod.as_deref(),
        aux: &a.aux,
        normalizer: a.normalizer.as_deref(),
        topk: a.topk_blocks,
        local_blocks: a.local_blocks,
        sink_blocks: a.sink_blocks,
    };
    if a.selected.is_some() && a.topk_blocks.is_none() {
        return Err(Failure::Input(
            "--selected goes with --topk-blocks K".into(),
        ));
    }
    Ok(if sparse_args.any() {
        let mut sp = super::sparse::options(&sparse_args, s, opts.clone())?;
        // routing makes the block mask; with --block-mask or --mask-mod it is refused below
        let route = sp.block_mask.is_none() && sp.mask_mod.is_none();
        if let Some(t) = sp.topk.filter(|_| route) {
            sp.topk = None;
            let routing = sparse::routing::route_blocks(ctx, q, k, opts, &t)?;
            if let Some(p) = &a.selected {
                let (nq, _) = t.layout(s).blocks();
                npy::write_i32(p, &[s.batch, s.hq, nq, routing.slots], &routing.selected)?;
            }
            sp.block_mask = Some(std::sync::Arc::new(routing.mask));
        }
        sp.block_mask = Some(sparse::attention::resolve_block_mask(ctx, s, &sp)?);
        Some(sp)
    } else {
        None
    })
}

/// The flops of one run: the pairs a block mask visits (dense masks inside them not
/// counted), the window lets through (sinks aside), or the causal or full square.
fn run_flops(
    a: &RunArgs,
    s: &AttnShape,
    opts: &FlashOptions,
    sparse: Option<&sparse::SparseOptions>,
    dtype: DType,
) -> f64 {
    match opts.window {
        // the pairs the block mask visits (dense masks inside them not counted)
        _ if sparse.is_some() => {
            let m = sparse.and_then(|sp| sp.block_mask.as_ref());
            m.map_or(0.0, |m| {
                let l = m.layout();
                let per_mask = (m.visited_blocks() * l.q_block * l.kv_block) as u64;
                let copies = (s.batch * s.hq / (l.batch * l.heads)) as u64;
                s.flops_for_pairs(per_mask * copies) / (s.batch * s.hq) as f64
            })
        }
        (None, None) => s.flops(a.causal),
        (l, r) => {
            // count what the window lets through (sinks aside)
            let case = bench::BenchCase {
                name: String::new(),
                batch: s.batch,
                lq: s.lq,
                lk: s.lk,
                hq: s.hq,
                hkv: s.hkv,
                d: s.d,
                causal: a.causal,
                dtype: dtype.to_string(),
                window: Some((l.unwrap_or(s.lk as u32), r.unwrap_or(s.lk as u32))),
            };
            s.flops_for_pairs(case.visible_pairs())
        }
    }
}
