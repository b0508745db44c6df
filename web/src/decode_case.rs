//! The page's decode variant: a paged KV cache filled with `lk` tokens per sequence, then
//! `lq` decode steps, a token at a time: each step appends the new key and value in place
//! (the page pool hands out pages as sequences grow) and attends one query over the cache,
//! the split count picked by the plan. The last step is timed and checked against the f64
//! reference over the cache read back from the device. Plain Rust, like `case.rs`.

use wgpu_attention::bench::{pseudo_random, time_passes_async};
use wgpu_attention::decode::reference::{decode_reference, DecodeInputs, HostCache};
use wgpu_attention::flash::reference::compare;
use wgpu_attention::{
    encode_decode_attention, AttnError, DType, DecodeOptions, GpuContext, KvCache, KvFormat,
    PagePool, Result, Tensor,
};

use crate::case::{Config, Pattern, Report, Weights};

/// Runs a `Variant::Decode` case.
pub async fn run(ctx: &GpuContext, cfg: &Config) -> Result<Report> {
    let format = KvFormat::parse(&cfg.kv_format)?;
    if cfg.dtype != "f32" {
        return Err(AttnError::invalid(
            "dtype",
            "f32 (the page's decode variant; the cache takes kv_format)",
            &cfg.dtype,
        ));
    }
    if cfg.repeats == 0 || cfg.lq == 0 || cfg.page_size == 0 {
        return Err(AttnError::invalid(
            "repeats, lq (steps), page_size",
            "at least 1 each",
            format!("{}, {}, {}", cfg.repeats, cfg.lq, cfg.page_size),
        ));
    }
    let (b, hq, hkv, d) = (cfg.batch, cfg.heads, cfg.kv_heads, cfg.d);
    let Steps {
        pool,
        k,
        v,
        shape,
        max_blocks,
        q,
        table,
        opts,
    } = run_steps(ctx, cfg, format)?;
    let qt = Tensor::from_f32(ctx, &q, &[b, 1, hq, d])?;
    let out = Tensor::filled(ctx, &[b, 1, hq, d], DType::F32, f32::NAN)?;
    let lse = Tensor::filled(ctx, &[b, hq, 1], DType::F32, f32::NAN)?;
    let mut kernel = String::new();
    let timing = if ctx.caps.timestamps {
        let t = time_passes_async(ctx, 1, cfg.repeats, |enc, ts| {
            let plan = encode_decode_attention(ctx, enc, &qt, &k, &v, &out, Some(&lse), &opts, ts)?;
            kernel = plan.label();
            Ok(())
        });
        Some(t.await?)
    } else {
        ctx.submit(|enc| {
            let plan =
                encode_decode_attention(ctx, enc, &qt, &k, &v, &out, Some(&lse), &opts, None)?;
            kernel = plan.label();
            Ok(())
        })?;
        None
    };
    ctx.finished().await?;
    let got = out.to_vec_f32_async(ctx).await?;
    let got_lse = lse.to_vec_f32_async(ctx).await?;
    // the reference over the cache as the device holds it (the appended tokens in place)
    let kh = k.to_vec_f32_async(ctx).await?;
    let vh = v.to_vec_f32_async(ctx).await?;
    let (_, lens) = pool.tables();
    let inp = DecodeInputs {
        q: &q,
        q_shape: [b, 1, hq, d],
        k: HostCache { values: &kh, shape },
        v: HostCache { values: &vh, shape },
        block_table: Some((&table, max_blocks)),
        bias: None,
    };
    let ref_opts = DecodeOptions::default()
        .causal(cfg.causal)
        .cache_seqlens(Some(lens.clone()));
    let (r, _) = decode_reference(&inp, &ref_opts, false)?;
    let keys: u64 = lens.iter().map(|&l| l as u64).sum();
    let flops = 4.0 * (hq * d) as f64 * keys as f64;
    let lk = cfg.lk + cfg.lq;
    Ok(Report {
        name: cfg.name.clone(),
        variant: cfg.variant,
        kernel,
        dtype: cfg.dtype.clone(),
        shape: [b, 1, lk, hq, hkv, d],
        gpu_ms: timing.as_ref().map(|t| t.median_ms),
        samples_ms: timing.as_ref().map_or(vec![], |t| t.samples_ms.clone()),
        clock: timing.as_ref().map(|t| t.clock),
        gflops: timing.as_ref().map(|t| flops / (t.median_ms * 1e6)),
        visible_pairs: keys / b as u64,
        check: compare(&got, Some(&got_lse), &r, None),
        pattern: Pattern {
            rows: 1,
            cols: 1,
            cells: vec![255],
        },
        weights: weights(
            &r.lse,
            &q,
            &kh,
            &table,
            lens[0] as usize,
            [hq, hkv, d, cfg.page_size],
            max_blocks,
        ),
    })
}

/// The cache after all steps but the last, and the last step's query, table and options.
struct Steps {
    pool: PagePool,
    k: KvCache,
    v: KvCache,
    shape: [usize; 4],
    max_blocks: usize,
    q: Vec<f32>,
    table: Vec<i32>,
    opts: DecodeOptions,
}

/// Fills the paged cache with `cfg.lk` tokens per sequence and runs all decode steps but the
/// last (each appends a token and attends), untimed.
fn run_steps(ctx: &GpuContext, cfg: &Config, format: KvFormat) -> Result<Steps> {
    let (b, hq, hkv, d, page) = (cfg.batch, cfg.heads, cfg.kv_heads, cfg.d, cfg.page_size);
    let steps = cfg.lq;
    let max_blocks = (cfg.lk + steps).div_ceil(page);
    let mut pool = PagePool::new(b * max_blocks, page, max_blocks)?;
    for _ in 0..b {
        let s = pool.add_sequence();
        pool.append(s, cfg.lk)?;
    }
    let shape = [b * max_blocks, page, hkv, d];
    let n = shape.iter().product::<usize>();
    let seed = cfg.seed.wrapping_mul(7);
    let k = KvCache::upload(ctx, &pseudo_random(n, seed), shape, format)?;
    let v = KvCache::upload(ctx, &pseudo_random(n, seed + 1), shape, format)?;
    let mut last = None;
    for step in 0..steps {
        let (_, before) = pool.tables();
        for s in 0..b {
            pool.append(s, 1)?;
        }
        let (table, _) = pool.tables();
        let r = |x: u64, n: usize| pseudo_random(n, seed + 10 * step as u64 + x);
        let q = r(2, b * hq * d);
        let opts = DecodeOptions::default()
            .causal(cfg.causal)
            .block_table(Some(Tensor::from_i32(ctx, &table, &[b, max_blocks])?))
            .cache_seqlens(Some(before))
            .k_new(Some(Tensor::from_f32(
                ctx,
                &r(3, b * hkv * d),
                &[b, 1, hkv, d],
            )?))
            .v_new(Some(Tensor::from_f32(
                ctx,
                &r(4, b * hkv * d),
                &[b, 1, hkv, d],
            )?))
            .return_lse(true);
        last = Some((q, table, opts));
        if step + 1 < steps {
            let (q, _, opts) = last
                .as_ref()
                .ok_or_else(|| AttnError::Gpu("no step".into()))?;
            let qt = Tensor::from_f32(ctx, q, &[b, 1, hq, d])?;
            let out = Tensor::filled(ctx, &[b, 1, hq, d], DType::F32, 0.0)?;
            ctx.submit(|enc| {
                encode_decode_attention(ctx, enc, &qt, &k, &v, &out, None, opts, None).map(|_| ())
            })?;
        }
    }
    let (q, table, opts) = last.ok_or_else(|| AttnError::Gpu("no step".into()))?;
    Ok(Steps {
        pool,
        k,
        v,
        shape,
        max_blocks,
        q,
        table,
        opts,
    })
}

/// The attention weights of query head 0 of sequence 0 over its keys, from its LSE.
fn weights(
    lse: &[f64],
    q: &[f32],
    k: &[f32],
    table: &[i32],
    len: usize,
    [hq, hkv, d, page]: [usize; 4],
    max_blocks: usize,
) -> Weights {
    let _ = (hq, max_blocks);
    let scale = 1.0 / (d as f64).sqrt();
    let values = (0..len)
        .map(|j| {
            let row = table[j / page] as usize * page + j % page;
            let kr = &k[row * hkv * d..][..d];
            let s: f64 = q[..d]
                .iter()
                .zip(kr)
                .map(|(a, b)| *a as f64 * *b as f64)
                .sum();
            (s * scale - lse[0]).exp() as f32
        })
        .collect();
    Weights {
        query: 0,
        values,
        grid: vec![],
    }
}
