//! `wgpu-attention linear ...`: linear attention from the command line.

use std::path::PathBuf;

use rand::{Rng, SeedableRng};
use wgpu_attention::bench;
use wgpu_attention::linear::reference::{compare_linear, LinearRefInputs};
use wgpu_attention::softmax::reference::Comparison;
use wgpu_attention::*;

use crate::cli::npy;
use crate::cli::report::print_time;
use crate::cli::run::upload;
use crate::cli::{CliResult, DTypeArg, Failure};

#[derive(clap::Args)]
pub struct LinearArgs {
    /// q as .npy [B, T, H, K] (f32 or f16); needs --k and --v.
    #[arg(long)]
    q: Option<PathBuf>,
    /// k as .npy [B, T, H, K].
    #[arg(long)]
    k: Option<PathBuf>,
    /// v as .npy [B, T, HV, V], HV a multiple of H.
    #[arg(long)]
    v: Option<PathBuf>,
    /// Random inputs of this shape: B,T,H,HV,K,V (g from log-sigmoid, beta from sigmoid).
    #[arg(long)]
    shape: Option<String>,
    /// Seed of the random inputs.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// dtype of random inputs (files keep their own).
    #[arg(long, value_enum, default_value = "f32")]
    dtype: DTypeArg,
    /// Gates (natural log), .npy f32: [B, T, HV] (simple-gla, gated-delta), [B, T, HV, K]
    /// (gla), [HV] (retention; default ln(1 - 2^(-5-h))).
    #[arg(long)]
    g: Option<PathBuf>,
    /// beta, .npy [B, T, HV] f32 (delta rules).
    #[arg(long)]
    beta: Option<PathBuf>,
    /// Initial state, .npy [N, HV, F, V(+1)] f32.
    #[arg(long)]
    initial_state: Option<PathBuf>,
    /// linear, retention, simple-gla, gla, delta or gated-delta.
    #[arg(long, default_value = "linear")]
    rule: String,
    /// identity, elu1, relu or taylor (rule linear).
    #[arg(long, default_value = "identity")]
    feature_map: String,
    /// Normalize the output by q'.z (rule linear).
    #[arg(long)]
    normalize: bool,
    /// L2-normalize q and k (delta rules).
    #[arg(long)]
    qk_l2norm: bool,
    /// Global attention over each sequence (rule linear).
    #[arg(long)]
    non_causal: bool,
    /// Query scale (default K^-0.5).
    #[arg(long)]
    scale: Option<f32>,
    /// recurrent, chunk, fused-chunk or auto.
    #[arg(long, default_value = "auto")]
    mode: String,
    /// Packed sequences (B = 1): offsets 0,...,T, comma-separated.
    #[arg(long, value_delimiter = ',')]
    cu_seqlens: Option<Vec<u32>>,
    /// Writes O here (.npy, v's dtype).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Writes the final state here (.npy f32).
    #[arg(long)]
    final_state: Option<PathBuf>,
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

fn parse<T>(flag: &str, s: &str, f: impl Fn(&str) -> Option<T>, choices: &str) -> CliResult<T> {
    f(s).ok_or_else(|| Failure::Input(format!("--{flag}: expected one of {choices}, got '{s}'")))
}

/// Host inputs: from files, or random from --shape.
struct Host {
    q: npy::Array,
    k: npy::Array,
    v: npy::Array,
    g: Option<npy::Array>,
    beta: Option<npy::Array>,
    init: Option<npy::Array>,
}

fn random_inputs(a: &LinearArgs, rule: Rule, map: FeatureMap, s: &str) -> CliResult<Host> {
    let dims: Vec<usize> = s
        .split(',')
        .map(|x| x.trim().parse::<usize>())
        .collect::<std::result::Result<_, _>>()
        .map_err(|_| Failure::Input(format!("--shape: expected B,T,H,HV,K,V, got '{s}'")))?;
    let [b, t, h, hv, k, v] = dims[..] else {
        return Err(Failure::Input(format!(
            "--shape: expected six sizes B,T,H,HV,K,V, got '{s}'"
        )));
    };
    let numel = |shape: &[usize]| {
        shape
            .iter()
            .try_fold(1usize, |n, &x| n.checked_mul(x))
            .filter(|&n| n <= 1 << 31)
            .ok_or_else(|| Failure::Input(format!("--shape: {shape:?} is too large")))
    };
    let dtype = match a.dtype {
        DTypeArg::F32 => DType::F32,
        DTypeArg::F16 => DType::F16,
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(a.seed);
    let mut gen = |shape: Vec<usize>, f: &dyn Fn(f32) -> f32, dt: DType| -> CliResult<npy::Array> {
        let n = numel(&shape)?;
        let data = (0..n)
            .map(|_| {
                let x = f(rng.random_range(-1.0f32..1.0));
                match dt {
                    DType::F16 => half::f16::from_f32(x).to_f32(),
                    _ => x,
                }
            })
            .collect();
        Ok(npy::Array {
            shape,
            dtype: dt,
            data,
        })
    };
    let id = |x: f32| x;
    let log_sigmoid = |x: f32| -(1.0 + (-4.0 * x).exp()).ln();
    let sigmoid = |x: f32| 1.0 / (1.0 + (-4.0 * x).exp());
    let positive = LinearOptions::default()
        .feature_map(map)
        .normalize(a.normalize);
    // normalizing identity features by q.z wants positive ones (signed ones cancel)
    let qk = |x: f32| {
        if LinearShape::normalized(&positive) && map == FeatureMap::Identity {
            x.abs()
        } else {
            x
        }
    };
    let q = gen(vec![b, t, h, k], &qk, dtype)?;
    let mut kk = gen(vec![b, t, h, k], &qk, dtype)?;
    if matches!(rule, Rule::Delta | Rule::GatedDelta) && !a.qk_l2norm {
        linear::unit_rows(&mut kk.data, k);
    }
    let vv = gen(vec![b, t, hv, v], &id, dtype)?;
    let g = match rule {
        Rule::SimpleGla | Rule::GatedDelta => Some(gen(vec![b, t, hv], &log_sigmoid, DType::F32)?),
        Rule::Gla => Some(gen(vec![b, t, hv, k], &log_sigmoid, DType::F32)?),
        _ => None,
    };
    let beta = matches!(rule, Rule::Delta | Rule::GatedDelta)
        .then(|| gen(vec![b, t, hv], &sigmoid, DType::F32))
        .transpose()?;
    Ok(Host {
        q,
        k: kk,
        v: vv,
        g,
        beta,
        init: None,
    })
}

pub fn run(a: &LinearArgs) -> CliResult<()> {
    if a.repeat == 0 {
        return Err(Failure::Input(
            "--repeat: expected at least 1, got 0".into(),
        ));
    }
    let rule = parse(
        "rule",
        &a.rule,
        Rule::parse,
        "linear, retention, simple-gla, gla, delta, gated-delta",
    )?;
    let map = parse(
        "feature-map",
        &a.feature_map,
        FeatureMap::parse,
        "identity, elu1, relu, taylor",
    )?;
    let mode = parse(
        "mode",
        &a.mode,
        Mode::parse,
        "recurrent, chunk, fused-chunk, auto",
    )?;
    let host = host_inputs(a, rule, map)?;
    let ctx = GpuContext::new()?;
    let (q, k, v) = (
        upload(&ctx, &host.q)?,
        upload(&ctx, &host.k)?,
        upload(&ctx, &host.v)?,
    );
    let mut opts = LinearOptions::default()
        .rule(rule)
        .feature_map(map)
        .normalize(a.normalize)
        .qk_l2norm(a.qk_l2norm)
        .causal(!a.non_causal)
        .scale(a.scale)
        .mode(mode)
        .cu_seqlens(a.cu_seqlens.clone());
    opts.g = host.g.as_ref().map(|x| upload(&ctx, x)).transpose()?;
    opts.beta = host.beta.as_ref().map(|x| upload(&ctx, x)).transpose()?;
    opts.initial_state = host.init.as_ref().map(|x| upload(&ctx, x)).transpose()?;
    let s = linear::check_inputs(&q, &k, &v)?;
    linear::check_options(&s, &opts)?;
    let out = Tensor::filled(&ctx, &[s.batch, s.t, s.hv, s.v], v.dtype(), f32::NAN)?;
    let fin = Tensor::filled(&ctx, &s.state_shape(&opts), DType::F32, f32::NAN)?;
    let mut label = String::new();
    let t = bench::time_passes(&ctx, 1, a.repeat, |enc, ts| {
        let plan = encode_linear_attention(&ctx, enc, &q, &k, &v, &out, Some(&fin), &opts, ts)?;
        label = plan.label();
        Ok(())
    })?;
    let got = out.to_vec_f32(&ctx)?;
    let got_state = fin.to_vec_f32(&ctx)?;
    if let Some(p) = &a.out {
        npy::write(p, out.shape(), out.dtype(), &got)?;
    }
    if let Some(p) = &a.final_state {
        npy::write(p, fin.shape(), DType::F32, &got_state)?;
    }
    let gflops = s.flops(&opts) / (t.median_ms * 1e6);
    let cmp = a
        .check
        .then(|| -> wgpu_attention::Result<_> {
            let ri = LinearRefInputs {
                shape: s,
                q: &host.q.data,
                k: &host.k.data,
                v: &host.v.data,
                g: host.g.as_ref().map(|x| x.data.as_slice()),
                beta: host.beta.as_ref().map(|x| x.data.as_slice()),
                initial_state: host.init.as_ref().map(|x| x.data.as_slice()),
            };
            compare_linear(&ri, &opts, q.dtype() == DType::F16, &got, &got_state)
        })
        .transpose()?;
    let shape = [s.batch, s.t, s.h, s.hv, s.k, s.v];
    let run = Ran {
        label: &label,
        shape,
        dtype: q.dtype(),
        t: &t,
        gflops,
    };
    report(&ctx, &opts, &run, a.json, cmp.as_ref());
    match cmp {
        Some((o, st)) if !(o.passed && st.passed) => Err(Failure::Run(
            "check against the f64 reference failed".into(),
        )),
        _ => Ok(()),
    }
}

/// `linear`'s inputs on the host: the .npy files given, or random ones of `--shape`, with
/// the gate, beta and initial state files read as f32.
fn host_inputs(a: &LinearArgs, rule: Rule, map: FeatureMap) -> CliResult<Host> {
    let mut host = match (&a.q, &a.k, &a.v, &a.shape) {
        (Some(q), Some(k), Some(v), None) => Host {
            q: npy::read_float(q)?,
            k: npy::read_float(k)?,
            v: npy::read_float(v)?,
            g: None,
            beta: None,
            init: None,
        },
        (None, None, None, Some(s)) => random_inputs(a, rule, map, s)?,
        _ => {
            return Err(Failure::Input(
                "give either --q, --k and --v (.npy files) or --shape B,T,H,HV,K,V".into(),
            ))
        }
    };
    let read_f32 = |p: &PathBuf, what: &str| -> CliResult<npy::Array> {
        let x = npy::read_float(p)?;
        if x.dtype != DType::F32 {
            return Err(Failure::Input(format!(
                "--{what}: expected float32, got {}",
                x.dtype
            )));
        }
        Ok(x)
    };
    if let Some(p) = &a.g {
        host.g = Some(read_f32(p, "g")?);
    }
    if let Some(p) = &a.beta {
        host.beta = Some(read_f32(p, "beta")?);
    }
    if let Some(p) = &a.initial_state {
        host.init = Some(read_f32(p, "initial-state")?);
    }
    Ok(host)
}

/// What one `linear` run measured.
struct Ran<'a> {
    label: &'a str,
    shape: [usize; 6],
    dtype: DType,
    t: &'a bench::Timing,
    gflops: f64,
}

/// Prints a `linear` run (text or `--json`) with its check of O and the final state.
fn report(
    ctx: &GpuContext,
    opts: &LinearOptions,
    run: &Ran,
    json: bool,
    cmp: Option<&(Comparison, Comparison)>,
) {
    let Ran {
        label,
        shape,
        dtype,
        t,
        gflops,
    } = *run;
    let (rule, map) = (opts.rule, opts.feature_map);
    if json {
        let j = serde_json::json!({
            "adapter": ctx.adapter_info.name,
            "backend": format!("{:?}", ctx.adapter_info.backend),
            "kernel": label,
            "rule": rule.name(),
            "feature_map": map.name(),
            "shape": shape,
            "dtype": dtype.to_string(),
            "causal": opts.causal,
            "gpu_ms": t.median_ms,
            "min_ms": t.min_ms,
            "max_ms": t.max_ms,
            "samples_ms": t.samples_ms,
            "clock": t.clock,
            "gflops": gflops,
            "check": cmp.map(|c| &c.0),
            "check_state": cmp.map(|c| &c.1),
        });
        println!("{j}");
    } else {
        println!("adapter: {}", ctx.describe());
        println!(
            "linear attention, rule {} map {} {}: B,T,H,HV,K,V = {shape:?} {}",
            rule.name(),
            map.name(),
            if opts.causal { "causal" } else { "global" },
            dtype
        );
        println!("kernel: {label}");
        print_time(t, gflops);
        if let Some((o, st)) = cmp {
            for (what, c) in [("O", o), ("final state", st)] {
                println!(
                    "check {what} vs f64 reference: max abs err {:.3e} (tolerance {:.3e}), relative to max|ref| {:.3e}: {}",
                    c.max_abs,
                    c.tolerance_abs,
                    c.max_rel,
                    if c.passed { "PASS" } else { "FAIL" }
                );
                if let Some(p) = &c.problem {
                    println!("  {p}");
                }
            }
        }
    }
}
