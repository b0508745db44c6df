//! `run --na-kernel ...`: neighborhood attention from the command line.

use wgpu_attention::flash::reference::{compare, RefInputs};
use wgpu_attention::neighborhood::reference::{
    neighborhood_plain_f16, neighborhood_reference, neighborhood_reference_with_extra,
};
use wgpu_attention::neighborhood::NaSpec;
use wgpu_attention::*;

use crate::cli::npy;
use crate::cli::run::{report, upload, Inputs, RunArgs};
use crate::cli::{CliResult, Failure};
use wgpu_attention::softmax::reference::Comparison;

fn list(flag: &str, s: &Option<String>) -> CliResult<Vec<usize>> {
    let Some(s) = s else { return Ok(Vec::new()) };
    s.split(',')
        .map(|x| {
            x.trim().parse::<usize>().map_err(|_| {
                Failure::Input(format!(
                    "--{flag}: expected comma-separated non-negative integers, one per spatial axis, got '{s}'"
                ))
            })
        })
        .collect()
}

fn options(a: &RunArgs) -> CliResult<NeighborhoodOptions> {
    let causal = list("na-causal", &a.na_causal)?
        .into_iter()
        .map(|c| match c {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(Failure::Input(format!(
                "--na-causal: expected 0 or 1 per axis, got {c}"
            ))),
        })
        .collect::<CliResult<Vec<bool>>>()?;
    Ok(NeighborhoodOptions::default()
        .kernel_size(list("na-kernel", &a.na_kernel)?)
        .dilation(list("na-dilation", &a.na_dilation)?)
        .stride(list("na-stride", &a.na_stride)?)
        .causal(causal)
        .scale(a.scale)
        .return_lse(false)
        .strategy(a.strategy.choice()))
}

/// Random inputs come as `[B, L, H, D]` from `--shape`: `--na-grid` gives them their spatial axes.
fn spatial_inputs(a: &RunArgs, mut inp: Inputs) -> CliResult<Inputs> {
    if a.shape.is_none() {
        return Ok(inp);
    }
    let grid = list("na-grid", &a.na_grid)?;
    let l: usize = grid.iter().product();
    if grid.is_empty() || grid.len() > 3 || grid.contains(&0) {
        return Err(Failure::Input(
            "--na-grid: random neighborhood inputs need X[,Y[,Z]] (1 to 3 positive sizes)".into(),
        ));
    }
    for arr in [&mut inp.q, &mut inp.k, &mut inp.v] {
        if arr.shape[1] != l {
            return Err(Failure::Input(format!(
                "--shape: LQ and LK must equal the --na-grid product {l}, got {}",
                arr.shape[1]
            )));
        }
        let mut shape = vec![arr.shape[0]];
        shape.extend(&grid);
        shape.extend(&arr.shape[2..]);
        arr.shape = shape;
    }
    Ok(inp)
}

fn unsupported(a: &RunArgs) -> Option<&'static str> {
    [
        (a.causal, "--causal (use --na-causal per axis)"),
        (a.softcap.is_some(), "--softcap"),
        (a.alibi.is_some(), "--alibi"),
        (a.bias.is_some(), "--bias"),
        (
            a.q_lens.is_some() || a.kv_lens.is_some(),
            "--q-lens/--kv-lens",
        ),
        (a.window.is_some() || a.sinks > 0, "--window/--sinks"),
    ]
    .into_iter()
    .find_map(|(on, what)| on.then_some(what))
}

pub fn run(a: &RunArgs, inp: Inputs) -> CliResult<()> {
    if let Some(what) = unsupported(a) {
        return Err(Failure::Input(format!(
            "{what} does not apply to neighborhood attention"
        )));
    }
    let mut opts = options(a)?;
    let inp = spatial_inputs(a, inp)?;
    let ctx = GpuContext::new()?;
    let extra = extra_tokens(a, &ctx, &mut opts)?;
    let (q, k, v) = (
        upload(&ctx, &inp.q)?,
        upload(&ctx, &inp.k)?,
        upload(&ctx, &inp.v)?,
    );
    let r = q.shape().len();
    if !(4..=6).contains(&r) {
        return Err(Failure::Input(format!(
            "neighborhood inputs are [B, X, (Y, (Z,)) H, D], got q of shape {:?}",
            q.shape()
        )));
    }
    let spatial = q.shape()[1..r - 2].to_vec();
    let spec = NaSpec::new(&opts.axes(&spatial)?)?;
    let (b, hq, d) = (q.shape()[0], q.shape()[r - 2], q.shape()[r - 1]);
    let (hkv, dv) = (
        v.shape()[v.shape().len().saturating_sub(2)],
        *v.shape().last().unwrap_or(&0),
    );
    let mut oshape = q.shape().to_vec();
    oshape[r - 1] = dv;
    let out = Tensor::filled(&ctx, &oshape, q.dtype(), f32::NAN)?;
    let lse = Tensor::filled(&ctx, &oshape[..r - 1], DType::F32, f32::NAN)?;
    let mut label = String::new();
    let t = bench::time_passes(&ctx, 1, a.repeat, |enc, ts| {
        let plan =
            encode_neighborhood_attention(&ctx, enc, &q, &k, &v, &out, Some(&lse), &opts, ts)?;
        label = plan.key.label();
        Ok(())
    })?;
    let got = out.to_vec_f32(&ctx)?;
    let got_lse = lse.to_vec_f32(&ctx)?;
    if let Some(p) = &a.out {
        crate::cli::npy::write(p, out.shape(), out.dtype(), &got)?;
    }
    if let Some(p) = &a.lse {
        crate::cli::npy::write(p, lse.shape(), DType::F32, &got_lse)?;
    }
    let shape = AttnShape {
        batch: b,
        lq: spec.len(),
        lk: spec.len(),
        hq,
        hkv,
        d,
        dv,
    };
    let gflops = shape.flops_for_pairs(spec.pairs()) / (t.median_ms * 1e6);
    let cmp = a
        .check
        .then(|| check_run(&inp, shape, &spec, &opts, extra.as_ref(), (&got, &got_lse)))
        .transpose()?;
    let desc = format!(
        "neighborhood {spatial:?} kernel {:?} dilation {:?} stride {:?} causal {:?}: B={b} Hq={hq} Hkv={hkv} D={d} Dv={dv} {}",
        opts.kernel_size,
        opts.dilation,
        opts.stride,
        opts.causal,
        q.dtype()
    );
    let mut shape = vec![b];
    shape.extend(&spatial);
    shape.extend([hq, hkv, d, dv]);
    report(
        &ctx,
        a,
        &label,
        &desc,
        serde_json::json!(shape),
        q.dtype(),
        &t,
        gflops,
        cmp,
    )
}

/// NATTEN's additional tokens of `--na-extra-k/--na-extra-v`, uploaded into `opts`, as read.
fn extra_tokens(
    a: &RunArgs,
    ctx: &GpuContext,
    opts: &mut NeighborhoodOptions,
) -> CliResult<Option<(npy::Array, npy::Array)>> {
    Ok(match (&a.na_extra_k, &a.na_extra_v) {
        (Some(k), Some(v)) => {
            let (k, v) = (
                crate::cli::npy::read_float(k)?,
                crate::cli::npy::read_float(v)?,
            );
            opts.additional_keys = Some(upload(ctx, &k)?);
            opts.additional_values = Some(upload(ctx, &v)?);
            Some((k, v))
        }
        (None, None) => None,
        _ => {
            return Err(Failure::Input(
                "--na-extra-k and --na-extra-v go together".into(),
            ))
        }
    })
}

/// `--check`: the run against the f64 reference (with the additional tokens when given; f16
/// inputs against twice the error of a plain f16 implementation).
fn check_run(
    inp: &Inputs,
    shape: AttnShape,
    spec: &NaSpec,
    opts: &NeighborhoodOptions,
    extra: Option<&(npy::Array, npy::Array)>,
    (got, got_lse): (&[f32], &[f32]),
) -> wgpu_attention::Result<Comparison> {
    let f16 = inp.q.dtype == DType::F16;
    let ri = RefInputs {
        shape,
        q: &inp.q.data,
        k: &inp.k.data,
        v: &inp.v.data,
        bias: None,
    };
    let (r, plain) = match extra {
        Some((xk, xv)) => {
            let r = neighborhood_reference_with_extra(&ri, spec, opts.scale, &xk.data, &xv.data)?;
            // f16: the reference rounded to f16 (the neighborhood and extra passes
            // each round once more before the merge: within twice that)
            let plain = f16.then(|| {
                r.out
                    .iter()
                    .map(|&x| wgpu_attention::flash::reference::round_f16(x))
                    .collect::<Vec<f64>>()
            });
            (r, plain)
        }
        None => {
            let r = neighborhood_reference(&ri, spec, opts.scale)?;
            let plain = f16
                .then(|| neighborhood_plain_f16(&ri, spec, opts.scale))
                .transpose()?;
            (r, plain)
        }
    };
    Ok(compare(got, Some(got_lse), &r, plain.as_deref()))
}
