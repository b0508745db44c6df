//! `wgpu-attention bench --decode`: split-KV decode per cache format against the memory floor,
//! one split and the flash kernel, every kernel of a (batch, length) point in one interleaved
//! run (the copy floor too), so ratios compare rounds taken side by side.

use wgpu_attention::bench::decode::{copy_record, records, DecodePoint};
use wgpu_attention::bench::{self, Record};
use wgpu_attention::*;

use super::bench::BenchArgs;
use super::{CliResult, Failure};

pub fn decode_sweep(ctx: &GpuContext, a: &BenchArgs, lens: &[usize]) -> CliResult<()> {
    let formats: Vec<&'static str> = a
        .decode_formats
        .iter()
        .map(|f| KvFormat::parse(f).map(|k| k.name()))
        .collect::<Result<_>>()?;
    println!(
        "{:<4} {:<7} {:<5} {:>10} {:>14} {:>9} {:>10} {:>10} {:>8}",
        "B", "Lk", "kv", "decode ms", "(min-max)", "x floor", "x 1 split", "x flash", "splits"
    );
    let mut rows = Vec::new();
    for &b in &a.decode_batch {
        for &lk in lens {
            let points: Vec<DecodePoint> = formats
                .iter()
                .filter(|f| **f != "f16" || ctx.caps.f16)
                .map(|&format| DecodePoint {
                    batch: b,
                    lk,
                    format,
                })
                .collect();
            rows.extend(point_group(ctx, a, &points)?);
        }
    }
    let uneven = match a.decode_uneven.as_deref() {
        Some(&[long, short]) => Some(uneven(ctx, a, long, short)?),
        Some(other) => {
            return Err(Failure::Input(format!(
                "--decode-uneven: expected LONG,SHORT, got {other:?}"
            )))
        }
        None => None,
    };
    let io = |e: std::io::Error| Failure::Input(format!("{}: {e}", a.out_dir.display()));
    std::fs::create_dir_all(&a.out_dir).map_err(io)?;
    let json = serde_json::json!({
        "uneven": uneven,
        "adapter": ctx.describe(), "rounds": a.repeat, "hq": bench::decode::HQ,
        "hkv": bench::decode::HKV, "d": bench::decode::D, "rows": rows,
    });
    std::fs::write(a.out_dir.join("decode.json"), json.to_string()).map_err(io)?;
    println!("wrote {}/decode.json", a.out_dir.display());
    Ok(())
}

/// One (batch, length): every format's kernels and the copy floor, interleaved.
fn point_group(
    ctx: &GpuContext,
    a: &BenchArgs,
    points: &[DecodePoint],
) -> CliResult<Vec<serde_json::Value>> {
    let mut recs: Vec<Record> = Vec::new();
    let mut spans = Vec::new();
    let mut kept = Vec::new();
    for p in points {
        match records(ctx, p) {
            Ok(r) => {
                spans.push((recs.len(), r.len()));
                recs.extend(r);
                kept.push(*p);
            }
            // a cache past the adapter's binding size: said, not measured
            Err(e @ AttnError::Limit { .. }) => {
                println!("{:<4} {:<7} {:<5} skipped: {e}", p.batch, p.lk, p.format)
            }
            Err(e) => return Err(e.into()),
        }
    }
    let Some(first) = kept.first() else {
        return Ok(Vec::new());
    };
    // the floor's copy: as many bytes as the smallest cache's K, at most 64 MiB
    let copy_bytes = (first.kv_bytes()? / 2).min(64 << 20).div_ceil(16) * 16;
    recs.push(copy_record(ctx, copy_bytes)?);
    let t = bench::time_interleaved(ctx, bench::WARMUP, a.repeat, &mut recs)?;
    let copy = &t[t.len() - 1].1;
    // bytes per ms the copy kernel moves (each byte read once and written once)
    let per_round_bw: Vec<f64> = copy
        .samples_ms
        .iter()
        .map(|ms| 2.0 * copy_bytes as f64 / ms)
        .collect();
    let mut rows = Vec::new();
    for (p, &(at, n)) in kept.iter().zip(&spans) {
        let (label, dec) = (&t[at].0, &t[at].1);
        let bytes = p.kv_bytes()? as f64;
        // per round: decode time over the time the copy kernel needs for the KV bytes
        let floor: Vec<f64> = dec
            .samples_ms
            .iter()
            .zip(&per_round_bw)
            .map(|(ms, bw)| ms / (bytes / bw))
            .collect();
        let x_floor = bench::median(&floor);
        let x_one = bench::median_paired(&t[at + 1].1, dec, |o, d| o / d);
        let x_flash = (n > 2).then(|| bench::median_paired(&t[at + 2].1, dec, |f, d| f / d));
        let splits = label
            .rsplit(" x")
            .next()
            .unwrap_or("")
            .replace(" splits", "");
        println!(
            "{:<4} {:<7} {:<5} {:>10.3} {:>14} {:>9.2} {:>10.2} {:>10} {:>8}",
            p.batch,
            p.lk,
            p.format,
            dec.median_ms,
            format!("{:.2}-{:.2}", dec.min_ms, dec.max_ms),
            x_floor,
            x_one,
            x_flash.map_or("-".into(), |x| format!("{x:.2}")),
            splits
        );
        rows.push(serde_json::json!({
            "point": p, "kernel": label, "decode": dec, "kv_bytes": bytes,
            "x_floor": x_floor, "one_split_over_decode": x_one, "flash_over_decode": x_flash,
            "one_split": t[at + 1].1, "flash": x_flash.map(|_| &t[at + 2].1),
            "copy": copy, "copy_bytes": 2 * copy_bytes,
        }));
    }
    Ok(rows)
}

/// The uneven batch: balanced splits against fixed ones of the same grid width and against one
/// split per sequence.
fn uneven(
    ctx: &GpuContext,
    a: &BenchArgs,
    long: usize,
    short: usize,
) -> CliResult<serde_json::Value> {
    let mut recs = bench::decode::uneven_records(ctx, long, short)?;
    let t = bench::time_interleaved(ctx, bench::WARMUP, a.repeat, &mut recs)?;
    println!("uneven batch: 1 x {long} + 31 x {short} keys, q8_0, paged");
    let base = &t[0].1;
    for (label, tm) in &t {
        println!(
            "  {:>10.3} ms ({:.2}-{:.2})  x{:.2} of balanced  {label}",
            tm.median_ms,
            tm.min_ms,
            tm.max_ms,
            bench::median_paired(tm, base, |x, b| x / b)
        );
    }
    Ok(serde_json::json!({
        "long": long, "short": short,
        "runs": t.iter().map(|(l, tm)| serde_json::json!({"kernel": l, "timing": tm})).collect::<Vec<_>>(),
    }))
}
