//! `wgpu-attention run` with a KV cache: split-KV decode (`--k-cache`, `--v-cache`, paged with
//! `--block-table`, `--cache-seqlens`, new tokens appended from `--k`/`--v`), or over a random
//! cache of `--shape` (with `--kv-format` or `--kv-splits`).

use std::path::Path;

use rand::{Rng, SeedableRng};
use wgpu_attention::bench;
use wgpu_attention::decode::reference::{decode_reference, DecodeInputs, HostCache};
use wgpu_attention::flash::reference::compare;
use wgpu_attention::*;

use super::npy;
use super::run::{parse_shape, parse_window, report, upload, RunArgs};
use super::{CliResult, Failure};

/// Whether `run`'s arguments ask for a decode.
pub fn wanted(a: &RunArgs) -> bool {
    a.k_cache.is_some()
        || a.v_cache.is_some()
        || a.block_table.is_some()
        || a.cache_seqlens.is_some()
        || a.kv_format.is_some()
        || a.kv_splits.is_some()
}

/// The host side of a decode: q, the caches' values (before quantization), new tokens, the
/// block table.
struct Host {
    q: npy::Array,
    k: npy::Array,
    v: npy::Array,
    new: Option<(npy::Array, npy::Array)>,
    table: Option<(Vec<i32>, usize)>,
}

fn random_host(a: &RunArgs, shape: &str) -> CliResult<Host> {
    let [b, lq, lk, hq, hkv, d, dv] = parse_shape(shape)?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(a.seed);
    let mut gen = |shape: Vec<usize>| {
        let n = shape.iter().product();
        let data = (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect();
        npy::Array {
            shape,
            dtype: DType::F32,
            data,
        }
    };
    let mut q = gen(vec![b, lq, hq, d]);
    if matches!(a.dtype, super::DTypeArg::F16) {
        q.dtype = DType::F16;
        q.data
            .iter_mut()
            .for_each(|x| *x = half::f16::from_f32(*x).to_f32());
    }
    Ok(Host {
        q,
        k: gen(vec![b, lk, hkv, d]),
        v: gen(vec![b, lk, hkv, dv]),
        new: None,
        table: None,
    })
}

fn file_host(a: &RunArgs) -> CliResult<Host> {
    let (Some(q), Some(kc), Some(vc)) = (&a.q, &a.k_cache, &a.v_cache) else {
        return Err(Failure::Input(
            "a decode needs --q [B, Sq, Hq, D] with --k-cache and --v-cache \
             [pages|B, page_size|Lk, Hkv, D] (.npy), or --shape for random inputs"
                .into(),
        ));
    };
    let q = npy::read_float(q)?;
    let b = q.shape.first().copied().unwrap_or(0);
    let new = match (&a.k, &a.v) {
        (Some(k), Some(v)) => Some((npy::read_float(k)?, npy::read_float(v)?)),
        (None, None) => None,
        _ => {
            return Err(Failure::Input(
                "new tokens need both --k and --v [B, S_new, Hkv, D]".into(),
            ))
        }
    };
    let table = match &a.block_table {
        Some(p) => Some(read_table(p, b)?),
        None => None,
    };
    Ok(Host {
        q,
        k: npy::read_float(kc)?,
        v: npy::read_float(vc)?,
        new,
        table,
    })
}

/// A block table `[B, max_blocks]` of int32 page indices.
fn read_table(p: &Path, b: usize) -> CliResult<(Vec<i32>, usize)> {
    use wgpu_attention::sparse::snippet::Aux;
    let Aux::I32(t) = npy::read_aux(p)? else {
        return Err(Failure::Input(format!(
            "{}: expected an int32 block table [B, max_blocks]",
            p.display()
        )));
    };
    if b == 0 || t.is_empty() || !t.len().is_multiple_of(b) {
        return Err(Failure::Input(format!(
            "{}: expected [{b}, max_blocks] int32, got {} values",
            p.display(),
            t.len()
        )));
    }
    let mb = t.len() / b;
    Ok((t, mb))
}

fn dims4(a: &npy::Array, what: &str) -> CliResult<[usize; 4]> {
    a.shape
        .as_slice()
        .try_into()
        .map_err(|_| Failure::Input(format!("{what}: expected rank 4, got {:?}", a.shape)))
}

fn options(a: &RunArgs, ctx: &GpuContext, host: &Host, hq: usize) -> CliResult<DecodeOptions> {
    let b = host.q.shape.first().copied().unwrap_or(0);
    let mut opts = DecodeOptions::default()
        .causal(a.causal)
        .scale(a.scale)
        .softcap(a.softcap)
        .sinks(a.sinks)
        .window(match &a.window {
            Some(w) => parse_window(w)?,
            None => (None, None),
        })
        .return_lse(true);
    opts.num_splits = match a.kv_splits.as_deref() {
        None | Some("auto") => None,
        Some(n) => Some(n.parse::<u32>().ok().filter(|&n| n >= 1).ok_or_else(|| {
            Failure::Input(format!("--kv-splits: expected N >= 1 or auto, got '{n}'"))
        })?),
    };
    if let Some(p) = &a.cache_seqlens {
        opts.cache_seqlens = Some(npy::read_lens(p, b)?);
    }
    if let Some((t, mb)) = &host.table {
        opts.block_table = Some(Tensor::from_i32(ctx, t, &[b, *mb])?);
    }
    if let Some((kn, vn)) = &host.new {
        opts.k_new = Some(upload(ctx, kn)?);
        opts.v_new = Some(upload(ctx, vn)?);
    }
    if let Some(p) = &a.alibi {
        let arr = npy::read_float(p)?;
        if arr.shape != [hq] {
            return Err(Failure::Input(format!(
                "{}: expected [{hq}] f32 (one slope per query head), got {:?}",
                p.display(),
                arr.shape
            )));
        }
        opts.alibi_slopes = Some(arr.data);
    }
    Ok(opts)
}

pub fn run(a: &RunArgs) -> CliResult<()> {
    if a.na_kernel.is_some() || a.bias.is_some() || a.q_lens.is_some() || a.kv_lens.is_some() {
        return Err(Failure::Input(
            "a decode takes --cache-seqlens for its lengths; --na-kernel, --bias, --q-lens and \
             --kv-lens do not apply to it"
                .into(),
        ));
    }
    let host = match (&a.shape, &a.k_cache) {
        (Some(s), None) if a.q.is_none() => random_host(a, s)?,
        _ => file_host(a)?,
    };
    let ctx = GpuContext::new()?;
    let format = match a.kv_format.as_deref() {
        Some(f) => KvFormat::parse(f)?,
        None if host.k.dtype == DType::F16 => KvFormat::F16,
        None => KvFormat::F32,
    };
    let (ks, vs) = (dims4(&host.k, "k cache")?, dims4(&host.v, "v cache")?);
    let k = KvCache::upload(&ctx, &host.k.data, ks, format)?;
    let v = KvCache::upload(&ctx, &host.v.data, vs, format)?;
    let q = upload(&ctx, &host.q)?;
    let [b, lq, hq, d] = dims4(&host.q, "q")?;
    let opts = options(a, &ctx, &host, hq)?;
    let dv = vs[3];
    let out = Tensor::filled(&ctx, &[b, lq, hq, dv], q.dtype(), f32::NAN)?;
    let lse = Tensor::filled(&ctx, &[b, hq, lq], DType::F32, f32::NAN)?;
    let mut label = String::new();
    let t = bench::time_passes(&ctx, 1, a.repeat, |enc, ts| {
        let plan = encode_decode_attention(&ctx, enc, &q, &k, &v, &out, Some(&lse), &opts, ts)?;
        label = plan.label();
        Ok(())
    })?;
    let got = out.to_vec_f32(&ctx)?;
    let got_lse = lse.to_vec_f32(&ctx)?;
    if let Some(p) = &a.out {
        npy::write(p, out.shape(), out.dtype(), &got)?;
    }
    if let Some(p) = &a.lse {
        npy::write(p, &[b, hq, lq], DType::F32, &got_lse)?;
    }
    // the keys every query saw, for the FLOP count: the cached ones and the appended
    let s_new = host.new.as_ref().map_or(0, |(kn, _)| kn.shape[1]);
    let cap = host.table.as_ref().map_or(ks[1], |(_, mb)| mb * ks[1]);
    let keys: u64 = match &opts.cache_seqlens {
        Some(l) => l.iter().map(|&x| x as u64 + s_new as u64).sum(),
        None => (b * cap) as u64,
    };
    let gflops = 2.0 * (hq * lq * (d + dv)) as f64 * keys as f64 / (t.median_ms * 1e6);
    let cmp = if a.check {
        // the cache as the device holds it (dequantized, new tokens in place)
        let (kh, vh) = (k.to_vec_f32(&ctx)?, v.to_vec_f32(&ctx)?);
        let mut ref_opts = opts.clone();
        if let Some(l) = &mut ref_opts.cache_seqlens {
            l.iter_mut().for_each(|x| *x += s_new as u32);
        }
        let inp = DecodeInputs {
            q: &host.q.data,
            q_shape: [b, lq, hq, d],
            k: HostCache {
                values: &kh,
                shape: ks,
            },
            v: HostCache {
                values: &vh,
                shape: vs,
            },
            block_table: host.table.as_ref().map(|(t, mb)| (t.as_slice(), *mb)),
            bias: None,
        };
        let (r, plain) = decode_reference(&inp, &ref_opts, q.dtype() == DType::F16)?;
        Some(compare(&got, Some(&got_lse), &r, plain.as_deref()))
    } else {
        None
    };
    let desc = format!(
        "decode B={b} Lq={lq} Hq={hq} Hkv={} D={d} Dv={dv} cache {ks:?} {format}{}{}",
        ks[2],
        if host.table.is_some() { " paged" } else { "" },
        if a.causal { " causal" } else { "" }
    );
    let shape = serde_json::json!([b, lq, cap, hq, ks[2], d, dv]);
    report(&ctx, a, &label, &desc, shape, q.dtype(), &t, gflops, cmp)
}
