//! The call path's checks (engine): the tensors' shapes and dtypes, the outputs, every option;
//! what the params take from them (`Checked`).

use super::call::{Call, CallLayout};
use crate::context::GpuContext;
use crate::error::{AttnError, Result};
use crate::resources::check_no_alias;
use crate::softmax::options::{AttnShape, FlashOptions};
use crate::softmax::shader::flags;
use crate::tensor::{DType, Tensor};

fn dims4(t: &Tensor, what: &str) -> Result<[usize; 4]> {
    t.shape()
        .try_into()
        .map_err(|_| AttnError::shape(what, "rank 4 [batch, seq, heads, dim]", t.shape()))
}

pub(crate) fn strides_u32(t: &Tensor) -> Result<[u32; 4]> {
    let s = t.strides();
    let conv = |x: usize| {
        u32::try_from(x).map_err(|_| AttnError::Limit {
            what: "tensor stride".into(),
            needed: x as u64,
            limit: u32::MAX as u64,
        })
    };
    Ok([conv(t.offset())?, conv(s[0])?, conv(s[1])?, conv(s[2])?])
}

/// Checks shapes and dtypes and returns the problem sizes.
pub fn check_inputs(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<AttnShape> {
    let [b, lq, hq, d] = dims4(q, "q")?;
    let [bk, lk, hkv, dk] = dims4(k, "k")?;
    let [bv, lv, hv, dv] = dims4(v, "v")?;
    if (bk, dk) != (b, d) {
        return Err(AttnError::shape(
            "k",
            format!("[{b}, Lk, Hkv, {d}] (batch and head dim of q)"),
            k.shape(),
        ));
    }
    if (bv, lv, hv) != (b, lk, hkv) {
        return Err(AttnError::shape(
            "v",
            format!("[{b}, {lk}, {hkv}, Dv] (batch, length and heads of k)"),
            v.shape(),
        ));
    }
    if [b, lq, hq, lk, hkv].contains(&0) {
        return Err(AttnError::shape(
            "q/k",
            "non-zero batch, lengths and heads",
            (q.shape(), k.shape()),
        ));
    }
    if hq % hkv != 0 {
        return Err(AttnError::shape(
            "q heads",
            format!("Hq a multiple of Hkv = {hkv} (GQA/MQA)"),
            q.shape(),
        ));
    }
    q.dtype().require_float("q")?;
    if k.dtype() != q.dtype() || v.dtype() != q.dtype() {
        return Err(AttnError::DType {
            what: "q, k, v".into(),
            expected: format!("one dtype ({} as q)", q.dtype()),
            actual: format!("q {}, k {}, v {}", q.dtype(), k.dtype(), v.dtype()),
        });
    }
    Ok(AttnShape {
        batch: b,
        lq,
        lk,
        hq,
        hkv,
        d,
        dv,
    })
}

pub(crate) fn check_lens(
    lens: &Option<Vec<u32>>,
    what: &str,
    batch: usize,
    max: usize,
) -> Result<()> {
    if let Some(l) = lens {
        if l.len() != batch {
            return Err(AttnError::shape(
                what,
                format!("[{batch}] (one per batch)"),
                [l.len()],
            ));
        }
        if let Some(&bad) = l.iter().find(|&&x| x as usize > max) {
            return Err(AttnError::invalid(what, format!("lengths <= {max}"), bad));
        }
    }
    Ok(())
}

/// What the checks of one call produce: sizes, flags and the values of the uniforms that do
/// not depend on the plan.
pub(crate) struct Checked {
    pub(crate) s: AttnShape,
    pub(crate) flags: u32,
    pub(crate) scale: f32,
    pub(crate) win_left: i32,
    pub(crate) win_right: i32,
    /// Bias strides (batch, head, query), broadcast axes at 0; the offset comes from its binding.
    pub(crate) bias_strides: [u32; 3],
    /// Per-batch q lengths then kv lengths, empty when neither is given.
    pub(crate) lens: Vec<u32>,
}

/// Step 1 of a call: every check of the inputs, outputs and options, before anything is built.
pub(super) fn check_call(
    ctx: &GpuContext,
    call: &Call,
    layout: &dyn CallLayout,
) -> Result<Checked> {
    let s = check_inputs(call.q, call.k, call.v)?;
    let out_flags = check_outputs(ctx, call, layout, &s)?;
    let mut checked = check_options(call.opts, s)?;
    checked.flags |= out_flags;
    Ok(checked)
}

/// O and LSE against the problem (LSE heads-last where the layout says so), f16 against the
/// adapter, no output sharing a buffer with an input or another output; the LSE flag.
fn check_outputs(
    ctx: &GpuContext,
    call: &Call,
    layout: &dyn CallLayout,
    s: &AttnShape,
) -> Result<u32> {
    let Call {
        q,
        k,
        v,
        out,
        lse,
        opts,
    } = *call;
    let expect_o = [s.batch, s.lq, s.hq, s.dv];
    if out.shape() != expect_o {
        return Err(AttnError::shape(
            "out",
            format!("{expect_o:?}"),
            out.shape(),
        ));
    }
    out.dtype().require("out", q.dtype())?;
    if q.dtype() == DType::F16 && !ctx.caps.f16 {
        return Err(AttnError::MissingFeature {
            feature: "SHADER_F16",
            adapter: ctx.adapter_info.name.clone(),
            needed_for: "f16 attention".into(),
        });
    }
    let mut fl = 0;
    layout.check(s)?;
    if let Some(l) = lse {
        // [B, Hq, Lq]; neighborhood calls pass NATTEN's heads-last [B, L, Hq]
        let expect = match layout.lse_heads_last() {
            false => [s.batch, s.hq, s.lq],
            true => [s.batch, s.lq, s.hq],
        };
        l.dtype().require("lse", DType::F32)?;
        if l.shape() != expect {
            return Err(AttnError::shape("lse", format!("{expect:?}"), l.shape()));
        }
        fl |= flags::LSE;
    }
    let mut inputs = vec![("q", q), ("k", k), ("v", v)];
    if let Some(b) = &opts.bias {
        inputs.push(("bias", b));
    }
    let mut outputs = vec![("out", out)];
    outputs.extend(lse.map(|l| ("lse", l)));
    check_no_alias(&inputs, &outputs)?;
    Ok(fl)
}

/// Every option against the problem: scale, softcap, slopes, lengths, window, bias; the flags
/// and the values the params take from them.
pub(crate) fn check_options(opts: &FlashOptions, s: AttnShape) -> Result<Checked> {
    let mut fl = 0;
    let scale = opts.scale.unwrap_or(1.0 / (s.d as f32).sqrt());
    if !scale.is_finite() {
        return Err(AttnError::invalid("scale", "a finite number", scale));
    }
    if opts.causal {
        fl |= flags::CAUSAL;
    }
    if let Some(c) = opts.softcap {
        if !(c > 0.0 && c.is_finite()) {
            return Err(AttnError::invalid("softcap", "a finite value > 0", c));
        }
        fl |= flags::SOFTCAP;
    }
    if let Some(a) = &opts.alibi_slopes {
        if a.len() != s.hq {
            return Err(AttnError::shape(
                "alibi_slopes",
                format!("[{}] (one per query head)", s.hq),
                [a.len()],
            ));
        }
        fl |= flags::ALIBI;
    }
    check_lens(&opts.q_lens, "q_lens", s.batch, s.lq)?;
    check_lens(&opts.kv_lens, "kv_lens", s.batch, s.lk)?;
    if opts.q_lens.is_some() {
        fl |= flags::Q_LENS;
    }
    if opts.kv_lens.is_some() {
        fl |= flags::KV_LENS;
    }
    let lens: Vec<u32> = match (&opts.q_lens, &opts.kv_lens) {
        (None, None) => Vec::new(),
        (ql, kl) => {
            // lengths fit u32: check_inputs bounded the sizes by the u32 element index
            let mut v = ql.clone().unwrap_or_else(|| vec![s.lq as u32; s.batch]);
            v.extend(kl.clone().unwrap_or_else(|| vec![s.lk as u32; s.batch]));
            v
        }
    };
    let to_i32 = |x: u32, what: &str| {
        i32::try_from(x).map_err(|_| AttnError::invalid(what, "<= i32::MAX", x))
    };
    let (wl, wr) = opts.window;
    let win_left = wl.map(|x| to_i32(x, "window left")).transpose()?;
    let win_right = wr.map(|x| to_i32(x, "window right")).transpose()?;
    if win_left.is_some() {
        fl |= flags::WINDOW_LEFT;
    }
    if win_right.is_some() {
        fl |= flags::WINDOW_RIGHT;
    }
    let bias_strides = bias_strides(opts, &s)?;
    if bias_strides.is_some() {
        fl |= flags::BIAS;
    }
    Ok(Checked {
        s,
        flags: fl,
        scale,
        win_left: win_left.unwrap_or(0),
        win_right: win_right.unwrap_or(0),
        bias_strides: bias_strides.unwrap_or([0; 3]),
        lens,
    })
}

/// The bias's `[batch, head, query]` element strides, 0 on a broadcast axis; `None` without a
/// bias.
fn bias_strides(opts: &FlashOptions, s: &AttnShape) -> Result<Option<[u32; 3]>> {
    let Some(bias) = &opts.bias else {
        return Ok(None);
    };
    let sh = bias.shape();
    let ok = sh.len() == 4
        && (sh[0] == s.batch || sh[0] == 1)
        && (sh[1] == s.hq || sh[1] == 1)
        && sh[2] == s.lq
        && sh[3] == s.lk;
    bias.dtype().require("bias", DType::F32)?;
    if !ok {
        return Err(AttnError::shape(
            "bias",
            format!("[{}|1, {}|1, {}, {}]", s.batch, s.hq, s.lq, s.lk),
            sh,
        ));
    }
    let st = strides_u32(bias)?;
    let bcast = |n: usize, st: u32| if n == 1 { 0 } else { st };
    Ok(Some([bcast(sh[0], st[1]), bcast(sh[1], st[2]), st[3]]))
}
