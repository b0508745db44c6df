//! `wgpu-attention`: the command line. `info` shows the adapter and the plans, `run` runs one
//! attention (from .npy files or random inputs) and can check it against the f64 reference,
//! `bench` sweeps the benchmark registry against the baselines.
//!
//! Exit codes: 0 success, 1 a device failure or a `--check` over tolerance, 2 bad input
//! (arguments, files, shapes, or a size the adapter cannot take).

mod cli;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use cli::Failure;

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
    Run(Box<cli::run::RunArgs>),
    /// Sweeps the benchmark registry: flash attention against the naive and matmul baselines.
    Bench(Box<cli::bench::BenchArgs>),
    /// Measures the tile candidates of dense attention on this adapter per shape class and
    /// stores the winners in a per-adapter file (`info` shows it) that plans then read.
    Tune(cli::tune::TuneArgs),
    /// Runs one linear attention call (fla's rules: linear, retention, GLA, DeltaNet, ...);
    /// optionally checks it against the f64 reference.
    Linear(Box<cli::linear::LinearArgs>),
}

fn main() -> ExitCode {
    quiet_headless_vulkan();
    let cli = Cli::parse();
    let res = match cli.cmd {
        Cmd::Info => cli::info::info(),
        Cmd::Run(a) => cli::run::run(&a),
        Cmd::Bench(a) => cli::bench::bench_cmd(&a),
        Cmd::Tune(a) => cli::tune::tune_cmd(&a),
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
