//! `wgpu-attention bench`: the benchmark registry against the baselines, and the sweeps
//! (linear, causal, local) whose figures benches/RESULTS.md records.

use std::path::{Path, PathBuf};

use wgpu_attention::bench::{self, BenchRow};
use wgpu_attention::*;

use super::{CliResult, Failure, StrategyArg};

#[derive(clap::Args)]
pub struct BenchArgs {
    /// Only the short sweep (the L2048 D64 target case and two more).
    #[arg(long)]
    pub quick: bool,
    /// Timed rounds after one warm-up; each round runs every kernel of a comparison once, in
    /// turn (interleaved), and ratios are medians over rounds.
    #[arg(long, default_value_t = bench::ROUNDS)]
    pub repeat: usize,
    /// Folder for results.json and results.svg.
    #[arg(long, default_value = "bench-out")]
    pub out_dir: PathBuf,
    /// Skip the (slow) naive baseline.
    #[arg(long)]
    pub no_naive: bool,
    /// Instead of the registry: sliding windows against dense at B=1, H=8, D=64 and this length.
    #[arg(long)]
    pub window_sweep: Option<usize>,
    /// Instead of the registry: neighborhood attention (1D, 2D, 3D over 16384 tokens) against
    /// dense at B=1, H=8, D=64; with --window-sweep 16384 both share one dense run.
    #[arg(long)]
    pub na_sweep: bool,
    /// Instead of the registry: causal against non-causal attention at B=1, H=8, D=64 and these
    /// lengths (comma-separated), for each strategy the adapter runs, interleaved.
    #[arg(long, value_delimiter = ',')]
    pub causal_sweep: Option<Vec<usize>>,
    /// Instead of the registry: linear attention (rules linear, simple-gla and gated-delta, each
    /// through its chunk and its recurrent kernel) at B=1, H=HV=8, K=V=64 over these lengths,
    /// interleaved with dense causal flash attention (B=1, H=8, D=64) up to --dense-max.
    #[arg(long, value_delimiter = ',')]
    pub linear_sweep: Option<Vec<usize>>,
    /// Instead of the registry: block-sparse attention at 5/10/25/50% block density (blocks of
    /// 128) against dense, and causal through a mask_mod against the built-in flag, at B=1,
    /// H=--heads, D=64 and this length, interleaved.
    #[arg(long)]
    pub sparse_sweep: Option<usize>,
    /// Heads of the sparse sweep.
    #[arg(long, default_value_t = 8)]
    pub heads: usize,
    /// Strategy of every kernel of the sparse sweep (dense and sparse alike).
    #[arg(long, value_enum, default_value = "auto")]
    pub strategy: StrategyArg,
    /// Instead of the registry: split-KV decode (one query per sequence, GQA 32/8, D = 128)
    /// over caches of these lengths in each of --decode-formats, interleaved with the memory
    /// floor (a copy kernel's bandwidth), the same decode in one split, and the flash kernel
    /// at Lq = 1 (float caches).
    #[arg(long, value_delimiter = ',')]
    pub decode: Option<Vec<usize>>,
    /// Batch sizes of --decode.
    #[arg(long, value_delimiter = ',', default_value = "1")]
    pub decode_batch: Vec<usize>,
    /// With --decode: also the uneven batch (one sequence of LONG keys and 31 of SHORT, q8_0,
    /// paged), balanced by key count against fixed splits, interleaved.
    #[arg(long, value_delimiter = ',')]
    pub decode_uneven: Option<Vec<usize>>,
    /// Cache formats of --decode (f16 where the adapter has SHADER_F16).
    #[arg(long, value_delimiter = ',', default_value = "f32,f16,q8_0,q4_0")]
    pub decode_formats: Vec<String>,
    /// Instead of the registry: the dense backward against the forward (B = 1, --heads heads,
    /// D = each of --backward-dims, causal and not) at these lengths, interleaved.
    #[arg(long, value_delimiter = ',')]
    pub backward: Option<Vec<usize>>,
    /// Head dims of --backward.
    #[arg(long, value_delimiter = ',', default_value = "64,128")]
    pub backward_dims: Vec<usize>,
    /// The longest sequence the linear sweep also runs dense causal attention at.
    #[arg(long, default_value_t = 16384)]
    pub dense_max: usize,
}

pub fn bench_cmd(a: &BenchArgs) -> CliResult<()> {
    let ctx = GpuContext::new()?;
    println!("adapter: {}", ctx.describe());
    if let Some(l) = a.sparse_sweep {
        return super::sparse::sweep(&ctx, l, a.heads, a.strategy.choice(), a.repeat, &a.out_dir);
    }
    if let Some(lens) = &a.linear_sweep {
        return linear_sweep(&ctx, a, lens);
    }
    if let Some(lens) = &a.decode {
        return super::bench_decode::decode_sweep(&ctx, a, lens);
    }
    if let Some(lens) = &a.backward {
        return backward_sweep(&ctx, a, lens);
    }
    if let Some(lens) = &a.causal_sweep {
        return causal_sweep(&ctx, a, lens);
    }
    if a.window_sweep.is_some() || a.na_sweep {
        return local_sweep(&ctx, a);
    }
    let steps = bench::registry(a.quick).len();
    let bar = indicatif::ProgressBar::new(steps as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let mut started = false;
    let rows = bench::sweep(&ctx, a.quick, a.repeat, !a.no_naive, |m| {
        if started {
            bar.inc(1);
        }
        started = true;
        bar.set_message(m.to_string());
    })?;
    bar.finish_and_clear();
    let table = bench::table(&rows);
    println!("{table}");
    write_results(&a.out_dir, &ctx, &rows)?;
    Ok(())
}

pub fn write_results(dir: &Path, ctx: &GpuContext, rows: &[BenchRow]) -> CliResult<()> {
    let io = |e: std::io::Error| Failure::Input(format!("{}: {e}", dir.display()));
    std::fs::create_dir_all(dir).map_err(io)?;
    let json = serde_json::json!({ "adapter": ctx.describe(), "rows": rows });
    let text = serde_json::to_string_pretty(&json).map_err(|e| Failure::Run(e.to_string()))?;
    std::fs::write(dir.join("results.json"), text).map_err(io)?;
    let title = format!("wgpu-attention on {}", ctx.adapter_info.name);
    std::fs::write(dir.join("results.svg"), super::svg::bar_chart(&title, rows)).map_err(io)?;
    println!("wrote {}/results.json and results.svg", dir.display());
    Ok(())
}

/// Linear attention over lengths (time should grow linearly), each length interleaved with dense
/// causal attention at the same length where it is at most --dense-max.
pub fn linear_sweep(ctx: &GpuContext, a: &BenchArgs, lens: &[usize]) -> CliResult<()> {
    use wgpu_attention::linear::LinearShape;
    let variants = linear_variants(ctx);
    println!(
        "{:<8} {:<22} {:>10} {:>16} {:>9} {:>12} {:>14}",
        "T", "kernel", "ms", "(min-max)", "GFLOP/s", "dense / this", "recurrent/this"
    );
    let mut rows = Vec::new();
    for &t in lens {
        let shape = LinearShape {
            batch: 1,
            t,
            h: 8,
            hv: 8,
            k: 64,
            v: 64,
        };
        let (mut records, names, dense) = linear_records(ctx, a, shape, &variants)?;
        let times = bench::time_interleaved(ctx, bench::WARMUP, a.repeat, &mut records)?;
        let nv = variants.len();
        for (i, (label, tm)) in times.iter().enumerate() {
            let flops = match (variants.get(i), &dense) {
                (Some(&(rule, _)), _) => shape.flops(&LinearOptions::default().rule(rule)),
                (None, Some(c)) => c.flops(),
                (None, None) => f64::NAN,
            };
            let paired = |j: usize| bench::median_paired(&times[j].1, tm, |d, x| d / x);
            let dense_ratio = if dense.is_some() && i < nv {
                paired(nv)
            } else {
                f64::NAN
            };
            // the same rule's recurrent row
            let rec = variants.get(i).and_then(|&(rule, mode)| {
                (mode != Mode::Recurrent)
                    .then(|| {
                        variants
                            .iter()
                            .position(|&(r, m)| r == rule && m == Mode::Recurrent)
                    })
                    .flatten()
            });
            let rec_ratio = rec.map_or(f64::NAN, paired);
            let show = |r: f64| {
                if r.is_nan() {
                    "-".to_string()
                } else {
                    format!("{r:.1}x")
                }
            };
            println!(
                "{t:<8} {:<22} {:>10.2} {:>16} {:>9.2} {:>12} {:>14}",
                names[i],
                tm.median_ms,
                format!("{:.1}-{:.1}", tm.min_ms, tm.max_ms),
                flops / (tm.median_ms * 1e6),
                show(dense_ratio),
                show(rec_ratio),
            );
            rows.push(serde_json::json!({
                "t": t, "name": names[i], "kernel": label, "timing": tm,
                "gflops": flops / (tm.median_ms * 1e6), "dense_over_this": dense_ratio,
                "recurrent_over_this": rec_ratio,
            }));
        }
    }
    let io = |e: std::io::Error| Failure::Input(format!("{}: {e}", a.out_dir.display()));
    std::fs::create_dir_all(&a.out_dir).map_err(io)?;
    let json = serde_json::json!({ "adapter": ctx.describe(), "rounds": a.repeat, "rows": rows });
    std::fs::write(a.out_dir.join("linear.json"), json.to_string()).map_err(io)?;
    println!("wrote {}/linear.json", a.out_dir.display());
    Ok(())
}

/// The sweep's (rule, mode) rows; a chunk row is also compared with its rule's recurrent row.
fn linear_variants(ctx: &GpuContext) -> Vec<(Rule, Mode)> {
    let mut variants = vec![
        (Rule::Linear, Mode::Chunk),
        (Rule::Linear, Mode::Recurrent),
        (Rule::SimpleGla, Mode::Chunk),
        (Rule::SimpleGla, Mode::Recurrent),
        (Rule::GatedDelta, Mode::Chunk),
        (Rule::GatedDelta, Mode::Recurrent),
    ];
    if wgpu_attention::linear::subgroups_of_8(ctx) {
        variants.push((Rule::Linear, Mode::FusedChunk));
        variants.push((Rule::SimpleGla, Mode::FusedChunk));
    }
    variants
}

/// One length's passes: each variant's, then dense causal attention where `--dense-max`
/// allows; with their names and the dense case.
#[allow(clippy::type_complexity)]
fn linear_records<'a>(
    ctx: &'a GpuContext,
    a: &BenchArgs,
    shape: wgpu_attention::linear::LinearShape,
    variants: &[(Rule, Mode)],
) -> CliResult<(
    Vec<bench::Record<'a>>,
    Vec<String>,
    Option<bench::BenchCase>,
)> {
    let mode_name = |m: Mode| match m {
        Mode::Chunk => "chunk",
        Mode::FusedChunk => "fused chunk",
        _ => "recurrent",
    };
    let t = shape.t;
    let mut records = Vec::new();
    let mut names = Vec::new();
    for &(rule, mode) in variants {
        let opts = LinearOptions::default().rule(rule).mode(mode);
        records.push(bench::linear_pass(ctx, shape, opts)?);
        names.push(format!("{} {}", rule.name(), mode_name(mode)));
    }
    let dense = (t <= a.dense_max).then(|| {
        let mut c = bench::registry(true)[0].clone();
        (c.lq, c.lk, c.name, c.causal) = (t, t, format!("L{t}-D64"), true);
        c
    });
    if let Some(c) = &dense {
        records.push(bench::flash_pass(ctx, c, StrategyChoice::Auto)?);
        names.push("dense causal".into());
    }
    Ok((records, names, dense))
}

/// Causal against non-causal attention per length and strategy: each pair interleaved, the
/// ratio the median of per-round ratios (ideal: about 0.5).
pub fn causal_sweep(ctx: &GpuContext, a: &BenchArgs, lens: &[usize]) -> CliResult<()> {
    let mut strategies = vec![Strategy::Tiled];
    if ctx.caps.subgroups {
        strategies.push(Strategy::Subgroup);
    }
    println!(
        "{:<8} {:<10} {:>12} {:>12} {:>12} {:>12} {:>8}",
        "L", "strategy", "full ms", "(min-max)", "causal ms", "(min-max)", "ratio"
    );
    let mut rows = Vec::new();
    for &l in lens {
        for &st in &strategies {
            let mut full = bench::registry(true)[0].clone();
            (full.lq, full.lk, full.name) = (l, l, format!("L{l}-D64"));
            let mut causal = full.clone();
            causal.causal = true;
            let choice = StrategyChoice::Force(st);
            let mut records = vec![
                bench::flash_pass(ctx, &full, choice)?,
                bench::flash_pass(ctx, &causal, choice)?,
            ];
            let t = bench::time_interleaved(ctx, bench::WARMUP, a.repeat, &mut records)?;
            let (f, c) = (&t[0].1, &t[1].1);
            let ratio = bench::median_paired(c, f, |c, f| c / f);
            println!(
                "{l:<8} {:<10} {:>12.2} {:>12} {:>12.2} {:>12} {ratio:>8.3}",
                format!("{st:?}"),
                f.median_ms,
                format!("{:.1}-{:.1}", f.min_ms, f.max_ms),
                c.median_ms,
                format!("{:.1}-{:.1}", c.min_ms, c.max_ms),
            );
            rows.push(serde_json::json!({
                "l": l, "strategy": format!("{st:?}"), "kernel": t[0].0,
                "full": f, "causal": c, "ratio": ratio,
            }));
        }
    }
    let io = |e: std::io::Error| Failure::Input(format!("{}: {e}", a.out_dir.display()));
    std::fs::create_dir_all(&a.out_dir).map_err(io)?;
    let json = serde_json::json!({ "adapter": ctx.describe(), "rounds": a.repeat, "rows": rows });
    std::fs::write(a.out_dir.join("causal.json"), json.to_string()).map_err(io)?;
    println!("wrote {}/causal.json", a.out_dir.display());
    Ok(())
}

/// Sliding windows and neighborhoods against dense attention over the same tokens: time,
/// speed-up and the share of the ideal speed-up (JSON and an SVG in --out-dir).
pub fn local_sweep(ctx: &GpuContext, a: &BenchArgs) -> CliResult<()> {
    let l = match (a.window_sweep, a.na_sweep) {
        (Some(l), false) => l,
        (None, true) | (Some(16384), true) => 16384,
        (Some(l), true) => {
            return Err(Failure::Input(format!(
            "--na-sweep runs over 16384 tokens; --window-sweep {l} would need a second dense run"
        )))
        }
        (None, false) => {
            return Err(Failure::Input(
                "give --window-sweep L and/or --na-sweep".into(),
            ))
        }
    };
    let mut dense = bench::registry(true)[0].clone();
    dense.lq = l;
    dense.lk = l;
    dense.name = format!("L{l}-D64");
    let windows: &[(u32, u32)] = if a.window_sweep.is_some() {
        &[(32, 32), (128, 128), (256, 256), (1024, 1024)]
    } else {
        &[]
    };
    let grids: Vec<bench::NaGridCase> = if a.na_sweep {
        vec![
            (vec![16384], vec![513]),
            (vec![128, 128], vec![7, 7]),
            (vec![128, 128], vec![13, 13]),
            (vec![128, 128], vec![31, 31]),
            (vec![16, 32, 32], vec![5, 7, 7]),
        ]
    } else {
        Vec::new()
    };
    eprintln!(
        "{} rounds of dense and {} patterns, interleaved (dense alone takes about a minute a round on lavapipe)",
        a.repeat,
        windows.len() + grids.len()
    );
    let (d, points) = bench::local_sweep(ctx, &dense, windows, &grids, bench::WARMUP, a.repeat)?;
    println!(
        "dense: median {:.1} ms (min {:.1}, max {:.1}), {:.2} GFLOP/s ({})",
        d.gpu_ms, d.min_ms, d.max_ms, d.gflops, d.kernel
    );
    println!(
        "{:<22} {:>10} {:>10} {:>10} {:>9} {:>8} {:>11}  kernel",
        "pattern", "median ms", "min ms", "max ms", "speed-up", "ideal", "efficiency"
    );
    let mut bars = Vec::new();
    for p in &points {
        println!(
            "{:<22} {:>10.2} {:>10.2} {:>10.2} {:>9.2} {:>8.2} {:>10.0}%  {}",
            p.pattern,
            p.gpu_ms,
            p.min_ms,
            p.max_ms,
            p.speedup,
            p.ideal,
            100.0 * p.efficiency,
            p.kernel
        );
        bars.push((p.pattern.clone(), p.efficiency));
    }
    let io = |e: std::io::Error| Failure::Input(format!("{}: {e}", a.out_dir.display()));
    std::fs::create_dir_all(&a.out_dir).map_err(io)?;
    let json = serde_json::json!({
        "adapter": ctx.describe(),
        "rounds": a.repeat,
        "dense": d,
        "patterns": points,
    });
    std::fs::write(a.out_dir.join("local.json"), json.to_string()).map_err(io)?;
    let title = format!(
        "Local attention vs dense, {l} tokens, share of ideal speed-up ({})",
        ctx.adapter_info.name
    );
    std::fs::write(
        a.out_dir.join("local.svg"),
        super::svg::efficiency_chart(&title, &bars),
    )
    .map_err(io)?;
    println!("wrote {}/local.json and local.svg", a.out_dir.display());
    Ok(())
}

/// `bench --backward`: per (L, D, causal) the forward and the backward in one interleaved run;
/// prints each median with min-max and the median of the per-round ratios, writes
/// backward.json.
fn backward_sweep(ctx: &GpuContext, a: &BenchArgs, lens: &[usize]) -> CliResult<()> {
    use wgpu_attention::bench::backward::{records, BackwardPoint};
    println!(
        "{:<6} {:<4} {:<7} {:>11} {:>15} {:>12} {:>15} {:>9}",
        "L", "D", "causal", "forward ms", "(min-max)", "backward ms", "(min-max)", "bwd/fwd"
    );
    let mut rows = Vec::new();
    for &l in lens {
        for &d in &a.backward_dims {
            for causal in [false, true] {
                let p = BackwardPoint {
                    l,
                    heads: a.heads,
                    d,
                    causal,
                };
                let mut recs = records(ctx, &p)?;
                let t = bench::time_interleaved(ctx, bench::WARMUP, a.repeat, &mut recs)?;
                let (f, b) = (&t[0].1, &t[1].1);
                let ratio = bench::median_paired(b, f, |b, f| b / f);
                println!(
                    "{:<6} {:<4} {:<7} {:>11.2} {:>15} {:>12.2} {:>15} {:>9.2}",
                    l,
                    d,
                    causal,
                    f.median_ms,
                    format!("{:.1}-{:.1}", f.min_ms, f.max_ms),
                    b.median_ms,
                    format!("{:.1}-{:.1}", b.min_ms, b.max_ms),
                    ratio
                );
                rows.push(serde_json::json!({
                    "point": p, "forward": f, "forward_kernel": t[0].0, "backward": b,
                    "backward_kernel": t[1].0, "backward_over_forward": ratio,
                }));
            }
        }
    }
    let io = |e: std::io::Error| Failure::Input(format!("{}: {e}", a.out_dir.display()));
    std::fs::create_dir_all(&a.out_dir).map_err(io)?;
    let json = serde_json::json!({"adapter": ctx.describe(), "rounds": a.repeat, "rows": rows});
    std::fs::write(a.out_dir.join("backward.json"), json.to_string()).map_err(io)?;
    println!("wrote {}/backward.json", a.out_dir.display());
    Ok(())
}
