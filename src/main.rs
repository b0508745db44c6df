//! `wgpu-attention`: the command line. `info` shows the adapter and the plans, `run` runs one
//! attention (from .npy files or random inputs) and can check it against the f64 reference,
//! `bench` sweeps the benchmark registry against the baselines.
//!
//! Exit codes: 0 success, 1 a device failure or a `--check` over tolerance, 2 bad input
//! (arguments, files, shapes, or a size the adapter cannot take).

mod cli;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use rand::{Rng, SeedableRng};
use wgpu_attention::bench::{self, BenchRow};
use wgpu_attention::flash::reference::{
    attention_plain_f16, attention_reference, compare, Comparison, RefInputs,
};
use wgpu_attention::*;

use cli::npy;
use cli::Failure;

type CliResult<T> = std::result::Result<T, Failure>;

#[derive(Parser)]
#[command(
    name = "wgpu-attention",
    version,
    about = "Portable GPU attention (WGSL on wgpu)"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Adapters, backend, features, limits, and the plan the kernels pick.
    Info,
    /// Runs one attention call; optionally checks it against the f64 reference.
    Run(Box<RunArgs>),
    /// Sweeps the benchmark registry: flash attention against the naive and matmul baselines.
    Bench(BenchArgs),
    /// Measures the tile candidates of dense attention on this adapter per shape class and
    /// stores the winners in a per-adapter file (`info` shows it) that plans then read.
    Tune(TuneArgs),
    /// Runs one linear attention call (fla's rules: linear, retention, GLA, DeltaNet, ...);
    /// optionally checks it against the f64 reference.
    Linear(Box<cli::linear::LinearArgs>),
}

#[derive(clap::Args)]
struct TuneArgs {
    /// Only f32 at D = 64 (both masks and lengths), 3 rounds.
    #[arg(long)]
    quick: bool,
    /// Delete this adapter's tuning file instead (plans fall back to their heuristics).
    #[arg(long)]
    reset: bool,
    /// Strategies to tune (comma-separated): auto (the plan's pick), tiled, subgroup.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "auto")]
    strategy: Vec<StrategyArg>,
}

#[derive(Clone, Copy, ValueEnum)]
enum DTypeArg {
    F32,
    F16,
}

#[derive(Clone, Copy, ValueEnum)]
enum StrategyArg {
    Auto,
    Tiled,
    Subgroup,
    /// neighborhood calls over 2+ axes on CPU adapters
    Sweep,
}

impl StrategyArg {
    fn choice(self) -> StrategyChoice {
        match self {
            StrategyArg::Auto => StrategyChoice::Auto,
            StrategyArg::Tiled => StrategyChoice::Force(Strategy::Tiled),
            StrategyArg::Subgroup => StrategyChoice::Force(Strategy::Subgroup),
            StrategyArg::Sweep => StrategyChoice::Force(Strategy::Sweep),
        }
    }
}

#[derive(clap::Args)]
struct RunArgs {
    /// Q as .npy [B, Lq, Hq, D] (f32 or f16); needs --k and --v.
    #[arg(long)]
    q: Option<PathBuf>,
    /// K as .npy [B, Lk, Hkv, D].
    #[arg(long)]
    k: Option<PathBuf>,
    /// V as .npy [B, Lk, Hkv, Dv].
    #[arg(long)]
    v: Option<PathBuf>,
    /// Random inputs of this shape: B,LQ,LK,HQ,HKV,D[,DV].
    #[arg(long)]
    shape: Option<String>,
    /// Seed of the random inputs.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// dtype of random inputs (files keep their own).
    #[arg(long, value_enum, default_value = "f32")]
    dtype: DTypeArg,
    /// Bottom-right aligned causal mask.
    #[arg(long)]
    causal: bool,
    /// Softmax scale (default 1/sqrt(D)).
    #[arg(long)]
    scale: Option<f32>,
    /// Tanh softcap c: s = c * tanh(s / c).
    #[arg(long)]
    softcap: Option<f32>,
    /// ALiBi slopes, .npy [Hq] f32.
    #[arg(long)]
    alibi: Option<PathBuf>,
    /// Additive bias, .npy [B|1, Hq|1, Lq, Lk] f32.
    #[arg(long)]
    bias: Option<PathBuf>,
    /// Query lengths per batch, .npy [B] int32.
    #[arg(long)]
    q_lens: Option<PathBuf>,
    /// Key lengths per batch, .npy [B] int32.
    #[arg(long)]
    kv_lens: Option<PathBuf>,
    /// Sliding window LEFT,RIGHT around the diagonal (-1 leaves a side unbounded).
    #[arg(long, allow_hyphen_values = true)]
    window: Option<String>,
    /// Attention sinks: the first N keys stay visible besides the window.
    #[arg(long, default_value_t = 0)]
    sinks: u32,
    /// Dense calls: this query tile instead of the plan's, as `info` and `tune` print it:
    /// wgWxrR, with a trailing s2 for two K/V stages (e.g. wg64xr8s2).
    #[arg(long)]
    tile: Option<String>,
    /// Neighborhood attention (NATTEN) with these kernel sizes, one per spatial axis; the rank
    /// of the inputs ([B, X, (Y, (Z,)) H, D]) decides 1D, 2D or 3D.
    #[arg(long)]
    na_kernel: Option<String>,
    /// Neighborhood dilation per axis (default 1).
    #[arg(long)]
    na_dilation: Option<String>,
    /// Neighborhood causality per axis, 0 or 1 (default 0).
    #[arg(long)]
    na_causal: Option<String>,
    /// Neighborhood stride per axis (default 1).
    #[arg(long)]
    na_stride: Option<String>,
    /// Spatial grid X[,Y[,Z]] for random neighborhood inputs (--shape's LQ and LK = its product).
    #[arg(long)]
    na_grid: Option<String>,
    /// Sparse: a dense block mask, .npy bool or uint8 [B|1, Hq|1, nQ, nK] (every true block
    /// visited, in full), blocks of --block-size.
    #[arg(long)]
    block_mask: Option<PathBuf>,
    /// Sparse: block sizes BQ,BK (multiples of 16 from 16 to 256; default 128,128).
    #[arg(long)]
    block_size: Option<String>,
    /// Sparse: a WGSL file defining
    /// `fn mask_mod(b: u32, h: u32, q_idx: u32, kv_idx: u32) -> bool` (evaluated on the GPU
    /// to make the block mask when --block-mask is absent, and on its partial blocks).
    #[arg(long)]
    mask_mod: Option<PathBuf>,
    /// Sparse: a WGSL file defining
    /// `fn score_mod(score: f32, b: u32, h: u32, q_idx: u32, kv_idx: u32) -> f32`.
    #[arg(long)]
    score_mod: Option<PathBuf>,
    /// Sparse: a buffer the snippets read as aux0, aux1, .. (repeatable; .npy float32, int32
    /// or uint32 of any shape, flattened).
    #[arg(long)]
    aux: Vec<PathBuf>,
    /// Sparse: softmax, or sigmoid[:BIAS] (sigmoid attention: each weight sigmoid(s + BIAS),
    /// no row sum, no LSE; BIAS defaults to -ln(LK)).
    #[arg(long)]
    normalizer: Option<String>,
    /// Sparse: content-routed blocks: each query block attends to its K best key blocks by
    /// pooled scores (mean q . mean k), in blocks of --block-size N,N.
    #[arg(long)]
    topk_blocks: Option<usize>,
    /// Sparse, with --topk-blocks: the diagonal key block and the L - 1 before it are kept.
    #[arg(long, default_value_t = 0)]
    local_blocks: usize,
    /// Sparse, with --topk-blocks: the first S key blocks are kept.
    #[arg(long, default_value_t = 0)]
    sink_blocks: usize,
    /// Sparse, with --topk-blocks: writes the selected key blocks here (.npy int32
    /// [B, Hq, nQ, slots], ascending, padded with -1).
    #[arg(long)]
    selected: Option<PathBuf>,
    /// Kernel strategy.
    #[arg(long, value_enum, default_value = "auto")]
    strategy: StrategyArg,
    /// Writes O here (.npy, dtype of the inputs).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Writes LSE [B, Hq, Lq] f32 here (.npy); neighborhood: [B, X, (Y, (Z,)) Hq].
    #[arg(long)]
    lse: Option<PathBuf>,
    /// Compares with the f64 reference; exits 1 over tolerance.
    #[arg(long)]
    check: bool,
    /// Prints one JSON object instead of text.
    #[arg(long)]
    json: bool,
    /// Timed runs after one warm-up; the median is reported.
    #[arg(long, default_value_t = 1)]
    repeat: usize,
}

#[derive(clap::Args)]
struct BenchArgs {
    /// Only the short sweep (the L2048 D64 target case and two more).
    #[arg(long)]
    quick: bool,
    /// Timed rounds after one warm-up; each round runs every kernel of a comparison once, in
    /// turn (interleaved), and ratios are medians over rounds.
    #[arg(long, default_value_t = bench::ROUNDS)]
    repeat: usize,
    /// Folder for results.json and results.svg.
    #[arg(long, default_value = "bench-out")]
    out_dir: PathBuf,
    /// Skip the (slow) naive baseline.
    #[arg(long)]
    no_naive: bool,
    /// Instead of the registry: sliding windows against dense at B=1, H=8, D=64 and this length.
    #[arg(long)]
    window_sweep: Option<usize>,
    /// Instead of the registry: neighborhood attention (1D, 2D, 3D over 16384 tokens) against
    /// dense at B=1, H=8, D=64; with --window-sweep 16384 both share one dense run.
    #[arg(long)]
    na_sweep: bool,
    /// Instead of the registry: causal against non-causal attention at B=1, H=8, D=64 and these
    /// lengths (comma-separated), for each strategy the adapter runs, interleaved.
    #[arg(long, value_delimiter = ',')]
    causal_sweep: Option<Vec<usize>>,
    /// Instead of the registry: linear attention (rules linear, simple-gla and gated-delta, each
    /// through its chunk and its recurrent kernel) at B=1, H=HV=8, K=V=64 over these lengths,
    /// interleaved with dense causal flash attention (B=1, H=8, D=64) up to --dense-max.
    #[arg(long, value_delimiter = ',')]
    linear_sweep: Option<Vec<usize>>,
    /// Instead of the registry: block-sparse attention at 5/10/25/50% block density (blocks of
    /// 128) against dense, and causal through a mask_mod against the built-in flag, at B=1,
    /// H=--heads, D=64 and this length, interleaved.
    #[arg(long)]
    sparse_sweep: Option<usize>,
    /// Heads of the sparse sweep.
    #[arg(long, default_value_t = 8)]
    heads: usize,
    /// Strategy of every kernel of the sparse sweep (dense and sparse alike).
    #[arg(long, value_enum, default_value = "auto")]
    strategy: StrategyArg,
    /// The longest sequence the linear sweep also runs dense causal attention at.
    #[arg(long, default_value_t = 16384)]
    dense_max: usize,
}

fn main() -> ExitCode {
    quiet_headless_vulkan();
    let cli = Cli::parse();
    let res = match cli.cmd {
        Cmd::Info => info(),
        Cmd::Run(a) => run(&a),
        Cmd::Bench(a) => bench_cmd(&a),
        Cmd::Tune(a) => tune_cmd(&a),
        Cmd::Linear(a) => cli::linear::run(&a),
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Input(m)) => {
            eprintln!("error: {m}");
            ExitCode::from(2)
        }
        Err(Failure::Run(m)) => {
            eprintln!("error: {m}");
            ExitCode::from(1)
        }
    }
}

/// On a machine without a display, Mesa's implicit Vulkan layer `VK_LAYER_MESA_device_select`
/// still asks libwayland for one while adapters are enumerated, and libwayland prints
/// `error: XDG_RUNTIME_DIR is invalid or not set` for each try. The layer only orders GPUs by
/// the display they drive, so with no display (neither `DISPLAY` nor `WAYLAND_DISPLAY`) it is
/// switched off the way its manifest offers (`NODEVICE_SELECT=1`), unless the user set it.
/// Done first thing in `main`, before any thread exists.
fn quiet_headless_vulkan() {
    let unset = |k: &str| std::env::var_os(k).is_none_or(|v| v.is_empty());
    if unset("DISPLAY") && unset("WAYLAND_DISPLAY") && unset("NODEVICE_SELECT") {
        std::env::set_var("NODEVICE_SELECT", "1");
    }
}

fn info() -> CliResult<()> {
    let instance = wgpu_attention::context::instance();
    let adapters = pollster::block_on(
        instance.enumerate_adapters(wgpu_attention::context::instance_backends()),
    );
    println!("adapters:");
    for a in &adapters {
        let i = a.get_info();
        println!(
            "  {} ({:?}, {:?}, {})",
            i.name, i.backend, i.device_type, i.driver
        );
    }
    let ctx = GpuContext::new()?;
    let c = &ctx.caps;
    println!("using: {}", ctx.describe());
    println!(
        "features: SHADER_F16 {}, SUBGROUP {} (sizes {}..={}), TIMESTAMP_QUERY {}",
        yes(c.f16),
        yes(c.subgroups),
        c.subgroup_min,
        c.subgroup_max,
        yes(c.timestamps)
    );
    let l = &ctx.limits;
    println!(
        "limits: workgroup memory {} B, invocations/workgroup {}, storage binding {} MiB, \
         buffer {} MiB, workgroups/dim {}",
        l.max_compute_workgroup_storage_size,
        l.max_compute_invocations_per_workgroup,
        l.max_storage_buffer_binding_size >> 20,
        l.max_buffer_size >> 20,
        l.max_compute_workgroups_per_dimension
    );
    println!("pipeline cache: {}", ctx.cache_description());
    match (&ctx.tuning_file, ctx.tuning(), &ctx.tuning_problem) {
        (None, _, _) => println!("tuning: none (no cache folder)"),
        (Some(f), _, Some(problem)) => println!("tuning: {} not used: {problem}", f.display()),
        (Some(f), None, None) => println!(
            "tuning: none yet (`wgpu-attention tune` writes {})",
            f.display()
        ),
        (Some(f), Some(t), None) => {
            println!(
                "tuning: {} ({} classes; delete it or `tune --reset`)",
                f.display(),
                t.classes.len()
            );
            for (class, e) in &t.classes {
                println!(
                    "  {class}: {} ({:.2}x the untuned {})",
                    e.tile,
                    e.default_ms / e.best_ms,
                    e.default_tile
                );
            }
        }
    }
    if let Some(n) = c.loop_limit {
        println!("driver quirk: loops stop after {n} iterations per invocation (plans stay under)");
    }
    println!("plans (B=1, H=8, L=2048):");
    for (d, dtype) in [
        (64, DType::F32),
        (128, DType::F32),
        (64, DType::F16),
        (512, DType::F32),
    ] {
        let s = AttnShape {
            batch: 1,
            lq: 2048,
            lk: 2048,
            hq: 8,
            hkv: 8,
            d,
            dv: d,
        };
        match flash::plan(&ctx, &s, dtype, &FlashOptions::default()) {
            Ok(p) => println!("  D={d} {dtype}: {} grid {:?}", p.key.label(), p.grid),
            Err(e) => println!("  D={d} {dtype}: not available ({e})"),
        }
    }
    println!("linear attention plans (B=1, H=HV=8, K=V=64, f32, mode auto):");
    for (t, rule) in [
        (1, Rule::SimpleGla),
        (4096, Rule::SimpleGla),
        (4096, Rule::Gla),
        (4096, Rule::GatedDelta),
    ] {
        let s = linear::LinearShape {
            batch: 1,
            t,
            h: 8,
            hv: 8,
            k: 64,
            v: 64,
        };
        // the plan checks the options' shapes only: gates and beta as placeholders
        let per_head = vec![1, t, 8];
        let g_shape = if rule == Rule::Gla {
            vec![1, t, 8, 64]
        } else {
            per_head.clone()
        };
        let plan = Tensor::filled(&ctx, &g_shape, DType::F32, -0.1).and_then(|g| {
            let beta = rule
                .delta()
                .then(|| Tensor::filled(&ctx, &per_head, DType::F32, 0.5))
                .transpose()?;
            let opts = LinearOptions::default().rule(rule).g(Some(g)).beta(beta);
            linear::plan(&ctx, &s, DType::F32, &opts)
        });
        match plan {
            Ok(p) => println!("  T={t} {}: {}", rule.name(), p.label()),
            Err(e) => println!("  T={t} {}: not available ({e})", rule.name()),
        }
    }
    Ok(())
}

fn tune_cmd(a: &TuneArgs) -> CliResult<()> {
    let ctx = GpuContext::new()?;
    let file = ctx.tuning_file.clone().ok_or_else(|| {
        Failure::Input(
            "no cache folder to keep a tuning in (set WGPU_ATTENTION_CACHE_DIR or HOME)".into(),
        )
    })?;
    let io = |e: std::io::Error| Failure::Run(format!("{}: {e}", file.display()));
    if a.reset {
        match std::fs::remove_file(&file) {
            Ok(()) => println!("removed {}", file.display()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                println!("no tuning file for this adapter ({})", file.display())
            }
            Err(e) => return Err(io(e)),
        }
        return Ok(());
    }
    if !ctx.caps.timestamps {
        return Err(Failure::Input(format!(
            "{} has no TIMESTAMP_QUERY: tune measures GPU time with it",
            ctx.describe()
        )));
    }
    let mut plan = wgpu_attention::tune::TunePlan::for_adapter(&ctx, a.quick);
    plan.strategies = Vec::new();
    for s in &a.strategy {
        let choice = s.choice();
        if !plan.strategies.contains(&choice) {
            plan.strategies.push(choice);
        }
    }
    println!(
        "tuning on {}: {:?} x D {:?} x full/causal x L {:?}, B=1 H={}, {} rounds",
        ctx.describe(),
        plan.dtypes,
        plan.dims,
        plan.lengths,
        plan.heads,
        plan.rounds
    );
    let t = wgpu_attention::tune::tune(&ctx, &plan, |line| println!("{line}"))?;
    if let Some(dir) = file.parent() {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    let text = serde_json::to_string_pretty(&t).map_err(|e| Failure::Run(e.to_string()))?;
    std::fs::write(&file, text).map_err(io)?;
    println!(
        "wrote {} (plans on this adapter read it; tune --reset removes it)",
        file.display()
    );
    Ok(())
}

fn yes(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

/// Host copies of the inputs (f32 values; exact for f16) and their dtype.
struct Inputs {
    q: npy::Array,
    k: npy::Array,
    v: npy::Array,
}

fn parse_shape(s: &str) -> CliResult<[usize; 7]> {
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

fn parse_window(s: &str) -> CliResult<(Option<u32>, Option<u32>)> {
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

fn load_inputs(a: &RunArgs) -> CliResult<Inputs> {
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

fn upload(ctx: &GpuContext, a: &npy::Array) -> CliResult<Tensor> {
    // .npy inputs are read as f32 or f16 (npy::read)
    Ok(match a.dtype {
        DType::F16 => {
            let h: Vec<half::f16> = a.data.iter().map(|&x| half::f16::from_f32(x)).collect();
            Tensor::from_f16(ctx, &h, &a.shape)?
        }
        _ => Tensor::from_f32(ctx, &a.data, &a.shape)?,
    })
}

fn run(a: &RunArgs) -> CliResult<()> {
    if a.repeat == 0 {
        return Err(Failure::Input(
            "--repeat: expected at least 1, got 0".into(),
        ));
    }
    let inp = load_inputs(a)?;
    if a.na_kernel.is_some() {
        return cli::na::run(a, inp);
    }
    let ctx = GpuContext::new()?;
    let (q, k, v) = (
        upload(&ctx, &inp.q)?,
        upload(&ctx, &inp.k)?,
        upload(&ctx, &inp.v)?,
    );
    let s = flash::check_inputs(&q, &k, &v)?;
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
            opts.bias = Some(Tensor::from_f32(&ctx, &arr.data, &arr.shape)?);
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
    let sparse_args = cli::sparse::SparseArgs {
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
    // a sparse call: its block mask made once, before the timed runs
    let sparse = if sparse_args.any() {
        let mut sp = cli::sparse::options(&sparse_args, &s, opts.clone())?;
        // routing makes the block mask; with --block-mask or --mask-mod it is refused below
        let route = sp.block_mask.is_none() && sp.mask_mod.is_none();
        if let Some(t) = sp.topk.filter(|_| route) {
            sp.topk = None;
            let routing = sparse::routing::route_blocks(&ctx, &q, &k, &opts, &t)?;
            if let Some(p) = &a.selected {
                let (nq, _) = t.layout(&s).blocks();
                npy::write_i32(p, &[s.batch, s.hq, nq, routing.slots], &routing.selected)?;
            }
            sp.block_mask = Some(std::sync::Arc::new(routing.mask));
        }
        sp.block_mask = Some(sparse::attention::resolve_block_mask(&ctx, &s, &sp)?);
        Some(sp)
    } else {
        None
    };
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
    let flops = match opts.window {
        // the pairs the block mask visits (dense masks inside them not counted)
        _ if sparse.is_some() => {
            let m = sparse.as_ref().and_then(|sp| sp.block_mask.as_ref());
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
                dtype: q.dtype().to_string(),
                window: Some((l.unwrap_or(s.lk as u32), r.unwrap_or(s.lk as u32))),
            };
            s.flops_for_pairs(case.visible_pairs())
        }
    };
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
    let desc = format!(
        "shape B={} Lq={} Lk={} Hq={} Hkv={} D={} Dv={} {}{}",
        s.batch,
        s.lq,
        s.lk,
        s.hq,
        s.hkv,
        s.d,
        s.dv,
        q.dtype(),
        if a.causal { " causal" } else { "" }
    );
    let shape = serde_json::json!([s.batch, s.lq, s.lk, s.hq, s.hkv, s.d, s.dv]);
    report(&ctx, a, &label, &desc, shape, q.dtype(), &t, gflops, cmp)
}

/// Prints the result of `run` (text or `--json`); a failed check is exit code 1.
#[allow(clippy::too_many_arguments)]
fn report(
    ctx: &GpuContext,
    a: &RunArgs,
    label: &str,
    desc: &str,
    shape: serde_json::Value,
    dtype: DType,
    t: &bench::Timing,
    gflops: f64,
    cmp: Option<Comparison>,
) -> CliResult<()> {
    if a.json {
        let j = serde_json::json!({
            "adapter": ctx.adapter_info.name,
            "backend": format!("{:?}", ctx.adapter_info.backend),
            "kernel": label,
            "shape": shape,
            "dtype": dtype.to_string(),
            "causal": a.causal,
            "gpu_ms": t.median_ms,
            "min_ms": t.min_ms,
            "max_ms": t.max_ms,
            "samples_ms": t.samples_ms,
            "clock": t.clock,
            "gflops": gflops,
            "check": cmp,
        });
        println!("{j}");
    } else {
        println!("adapter: {}", ctx.describe());
        println!("{desc}");
        println!("kernel: {label}");
        println!(
            "time: {:.3} ms ({:?}, median of {}; min {:.3}, max {:.3}), {:.2} GFLOP/s",
            t.median_ms,
            t.clock,
            t.samples_ms.len(),
            t.min_ms,
            t.max_ms,
            gflops
        );
        if let Some(c) = &cmp {
            println!(
                "check vs f64 reference: max abs err {:.3e} (tolerance {:.3e}), relative to max|ref| {:.3e}, \
                 LSE rel err {:.3e}: {}",
                c.max_abs,
                c.tolerance_abs,
                c.max_rel,
                c.lse_max_rel,
                if c.passed { "PASS" } else { "FAIL" }
            );
            if let Some(p) = &c.problem {
                println!("  {p}");
            }
        }
    }
    match cmp {
        Some(c) if !c.passed => Err(Failure::Run(
            "check against the f64 reference failed".into(),
        )),
        _ => Ok(()),
    }
}

#[allow(clippy::too_many_arguments)]
fn check(
    ctx: &GpuContext,
    inp: &Inputs,
    s: &AttnShape,
    bias: Option<&npy::Array>,
    opts: &FlashOptions,
    sparse: Option<&sparse::attention::SparseOptions>,
    got: &[f32],
    got_lse: Option<&[f32]>,
) -> wgpu_attention::Result<Comparison> {
    let ri = RefInputs {
        shape: *s,
        q: &inp.q.data,
        k: &inp.k.data,
        v: &inp.v.data,
        bias: bias.map(|b| (b.data.as_slice(), [b.shape[0], b.shape[1]])),
    };
    let f16 = inp.q.dtype == DType::F16;
    let (r, plain) = match sparse.and_then(|sp| sp.block_mask.as_ref().map(|m| (sp, m))) {
        Some((sp, m)) => {
            use wgpu_attention::flash::reference::round_f16;
            let r = sparse::attention::sparse_reference(ctx, &ri, sp, m, |p| p)?;
            let plain = f16
                .then(|| sparse::attention::sparse_reference(ctx, &ri, sp, m, round_f16))
                .transpose()?
                .map(|o| o.out.into_iter().map(round_f16).collect::<Vec<_>>());
            (r, plain)
        }
        None => {
            let r = attention_reference(&ri, opts)?;
            let plain = f16.then(|| attention_plain_f16(&ri, opts)).transpose()?;
            (r, plain)
        }
    };
    Ok(compare(got, got_lse, &r, plain.as_deref()))
}

fn bench_cmd(a: &BenchArgs) -> CliResult<()> {
    let ctx = GpuContext::new()?;
    println!("adapter: {}", ctx.describe());
    if let Some(l) = a.sparse_sweep {
        return cli::sparse::sweep(&ctx, l, a.heads, a.strategy.choice(), a.repeat, &a.out_dir);
    }
    if let Some(lens) = &a.linear_sweep {
        return linear_sweep(&ctx, a, lens);
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

fn write_results(dir: &Path, ctx: &GpuContext, rows: &[BenchRow]) -> CliResult<()> {
    let io = |e: std::io::Error| Failure::Input(format!("{}: {e}", dir.display()));
    std::fs::create_dir_all(dir).map_err(io)?;
    let json = serde_json::json!({ "adapter": ctx.describe(), "rows": rows });
    let text = serde_json::to_string_pretty(&json).map_err(|e| Failure::Run(e.to_string()))?;
    std::fs::write(dir.join("results.json"), text).map_err(io)?;
    let title = format!("wgpu-attention on {}", ctx.adapter_info.name);
    std::fs::write(dir.join("results.svg"), cli::svg::bar_chart(&title, rows)).map_err(io)?;
    println!("wrote {}/results.json and results.svg", dir.display());
    Ok(())
}

/// Linear attention over lengths (time should grow linearly), each length interleaved with dense
/// causal attention at the same length where it is at most --dense-max.
fn linear_sweep(ctx: &GpuContext, a: &BenchArgs, lens: &[usize]) -> CliResult<()> {
    use wgpu_attention::linear::LinearShape;
    // (rule, mode); a chunk row is also compared with its rule's recurrent row
    let fused = wgpu_attention::linear::subgroups_of_8(ctx);
    let mut variants = vec![
        (Rule::Linear, Mode::Chunk),
        (Rule::Linear, Mode::Recurrent),
        (Rule::SimpleGla, Mode::Chunk),
        (Rule::SimpleGla, Mode::Recurrent),
        (Rule::GatedDelta, Mode::Chunk),
        (Rule::GatedDelta, Mode::Recurrent),
    ];
    if fused {
        variants.push((Rule::Linear, Mode::FusedChunk));
        variants.push((Rule::SimpleGla, Mode::FusedChunk));
    }
    let mode_name = |m: Mode| match m {
        Mode::Chunk => "chunk",
        Mode::FusedChunk => "fused chunk",
        _ => "recurrent",
    };
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
        let mut records = Vec::new();
        let mut names = Vec::new();
        for &(rule, mode) in &variants {
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

/// Causal against non-causal attention per length and strategy: each pair interleaved, the
/// ratio the median of per-round ratios (ideal: about 0.5).
fn causal_sweep(ctx: &GpuContext, a: &BenchArgs, lens: &[usize]) -> CliResult<()> {
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
fn local_sweep(ctx: &GpuContext, a: &BenchArgs) -> CliResult<()> {
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
        cli::svg::efficiency_chart(&title, &bars),
    )
    .map_err(io)?;
    println!("wrote {}/local.json and local.svg", a.out_dir.display());
    Ok(())
}
