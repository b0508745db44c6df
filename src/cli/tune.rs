//! `wgpu-attention tune`: measures the tile candidates of dense attention per shape class on
//! this adapter and keeps the winners in its tuning file.

use wgpu_attention::*;

use super::{CliResult, Failure, StrategyArg};

#[derive(clap::Args)]
pub struct TuneArgs {
    /// Only f32 at D = 64 (both masks and lengths), 3 rounds.
    #[arg(long)]
    pub quick: bool,
    /// Delete this adapter's tuning file instead (plans fall back to their heuristics).
    #[arg(long)]
    pub reset: bool,
    /// Strategies to tune (comma-separated): auto (the plan's pick), tiled, subgroup.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "auto")]
    pub strategy: Vec<StrategyArg>,
}

pub fn tune_cmd(a: &TuneArgs) -> CliResult<()> {
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
