//! What `run` prints after a call (text or `--json`), and its `--check` against the f64
//! reference (dense, or sparse through the sparse reference).

use wgpu_attention::bench;
use wgpu_attention::flash::reference::{
    attention_plain_f16, attention_reference, compare, Comparison, RefInputs,
};
use wgpu_attention::*;

use super::npy;
use super::run::{Inputs, RunArgs};
use super::{CliResult, Failure};

/// Prints the result of `run` (text or `--json`); a failed check is exit code 1.
#[allow(clippy::too_many_arguments)]
pub fn report(
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
        print_time(t, gflops);
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
pub fn check(
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

/// The timing line every subcommand prints.
pub fn print_time(t: &bench::Timing, gflops: f64) {
    println!(
        "time: {:.3} ms ({:?}, median of {}; min {:.3}, max {:.3}), {:.2} GFLOP/s",
        t.median_ms,
        t.clock,
        t.samples_ms.len(),
        t.min_ms,
        t.max_ms,
        gflops
    );
}
