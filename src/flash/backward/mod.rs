//! The backward pass of dense attention (FlashAttention-2's): from q, k, v, the forward's O and
//! LSE, and the upstream gradient dO, the gradients dQ, dK and dV in three passes
//! ([`shader`]): `(LSE, Delta)` per query row, dK and dV per key, dQ per query row; a fourth
//! gives dBias when it is asked for. P is
//! recomputed tile by tile from the LSE, never stored: the extra memory is 8 bytes per query
//! row and head. Deterministic: each gradient element is summed in a fixed order by one
//! invocation (no atomics), so the same inputs give the same bits.
//!
//! Every option of the forward has its gradient: scale, bottom-right causal, window and sinks,
//! GQA/MQA (dK and dV summed over the query heads of a group), per-batch lengths, softcap
//! (through the tanh), ALiBi and an additive bias (dBias summed over its broadcast axes). f16 storage
//! computes in f32. Head dims up to 256. Rows that see no key get zero gradients.

mod generate;
pub mod shader;

use wgpu::util::DeviceExt;

use crate::context::GpuContext;
use crate::error::{u32_of, AttnError, Result};
use crate::resources::{check_no_alias, entries_by_name, BoundRange};
use crate::softmax::call::{check_inputs, check_options, strides_u32, Checked};
use crate::softmax::{AttentionOutput, AttnShape, FlashOptions};
use crate::tensor::{DType, Tensor};
use shader::{BackwardKey, BackwardParams, Pass, WG};

/// Gradients of a dense call, in the layouts of q, k and v.
#[non_exhaustive]
#[derive(Clone, Debug)]
pub struct FlashGrads {
    /// `[B, Lq, Hq, D]`
    pub dq: Tensor,
    /// `[B, Lk, Hkv, D]`
    pub dk: Tensor,
    /// `[B, Lk, Hkv, Dv]`
    pub dv: Tensor,
    /// The bias's gradient, f32 in the bias's own shape `[B|1, Hq|1, Lq, Lk]` (summed over its
    /// broadcast axes), contiguous; `None`: not computed.
    pub dbias: Option<Tensor>,
}

impl FlashGrads {
    /// The caller's gradient tensors (for [`flash_attention_backward_into`]).
    pub fn new(dq: Tensor, dk: Tensor, dv: Tensor) -> Self {
        FlashGrads {
            dq,
            dk,
            dv,
            dbias: None,
        }
    }
    /// Also computes the bias's gradient into `dbias`.
    pub fn with_dbias(mut self, dbias: Option<Tensor>) -> Self {
        self.dbias = dbias;
        self
    }
}

/// Every backward specialization as a [`crate::pipeline::Kernel`] (for the registry).
pub fn all_kernels() -> Vec<Box<dyn crate::pipeline::Kernel>> {
    shader::all_keys()
        .into_iter()
        .map(|k| Box::new(k) as Box<dyn crate::pipeline::Kernel>)
        .collect()
}

/// The kernels a backward call runs, and its grids.
#[non_exhaustive]
#[derive(Clone, Copy, Debug)]
pub struct FlashBackwardPlan {
    pub stats: BackwardKey,
    pub dkdv: BackwardKey,
    pub dq: BackwardKey,
    /// Workgroups of the dK/dV pass (`[key tiles, Hkv, B]`) and of the dQ pass
    /// (`[query tiles, Hq, B]`).
    pub dkdv_grid: [u32; 3],
    pub dq_grid: [u32; 3],
    /// The dBias pass and its grid (`[query tiles, bias heads, bias batches]`), when asked.
    pub dbias: Option<(BackwardKey, [u32; 3])>,
}

/// The gradients of [`crate::flash_attention`] for the upstream gradient `dout`
/// (`[B, Lq, Hq, Dv]`, the dtype of q). `out` is what the forward returned with the same
/// options and `return_lse: true` (the backward needs the LSE; an `out` without it is a typed
/// error). With a bias, dBias is computed too (`FlashGrads::dbias`). `opts.strategy` and
/// `opts.tile` choose forward kernels and are ignored here.
pub fn flash_attention_backward(
    ctx: &GpuContext,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    out: &AttentionOutput,
    dout: &Tensor,
    opts: &FlashOptions,
) -> Result<FlashGrads> {
    let s = check_inputs(q, k, v)?;
    let dbias = match &opts.bias {
        Some(b) => Some(Tensor::filled(ctx, b.shape(), DType::F32, 0.0)?),
        None => None,
    };
    let g = FlashGrads {
        dq: Tensor::filled(ctx, &[s.batch, s.lq, s.hq, s.d], q.dtype(), 0.0)?,
        dk: Tensor::filled(ctx, &[s.batch, s.lk, s.hkv, s.d], q.dtype(), 0.0)?,
        dv: Tensor::filled(ctx, &[s.batch, s.lk, s.hkv, s.dv], q.dtype(), 0.0)?,
        dbias,
    };
    flash_attention_backward_into(ctx, q, k, v, out, dout, &g, opts)?;
    Ok(g)
}

/// [`flash_attention_backward`] into the caller's gradient tensors (any strides with a
/// contiguous last axis) and submits the work.
#[allow(clippy::too_many_arguments)]
pub fn flash_attention_backward_into(
    ctx: &GpuContext,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    out: &AttentionOutput,
    dout: &Tensor,
    grads: &FlashGrads,
    opts: &FlashOptions,
) -> Result<FlashBackwardPlan> {
    ctx.submit(|enc| {
        encode_flash_attention_backward(ctx, enc, q, k, v, out, dout, grads, opts, None)
    })
}

/// Records the backward into `encoder` (for embedders that batch their own work).
/// `timestamps` writes the first pass's begin and the last pass's end into a query set (at
/// the index and the next, as [`crate::flash::encode_flash_attention`] does; see `bench`).
#[allow(clippy::too_many_arguments)]
pub fn encode_flash_attention_backward(
    ctx: &GpuContext,
    encoder: &mut wgpu::CommandEncoder,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    out: &AttentionOutput,
    dout: &Tensor,
    grads: &FlashGrads,
    opts: &FlashOptions,
    timestamps: Option<(&wgpu::QuerySet, u32)>,
) -> Result<FlashBackwardPlan> {
    let s = check_inputs(q, k, v)?;
    let lse = check_backward(ctx, &s, [q, k, v], out, dout, grads, opts.bias.as_ref())?;
    let c = check_options(opts, s)?;
    let dbias_dims = grads
        .dbias
        .as_ref()
        .and(opts.bias.as_ref())
        .map(|b| [b.shape()[0], b.shape()[1]]);
    let plan = plan(ctx, &s, q.dtype(), opts.bias.is_some(), dbias_dims)?;
    let stats = Tensor::filled(ctx, &[s.batch, s.hq, s.lq, 2], DType::F32, 0.0)?;
    let mut aux: Vec<u32> = c.lens.clone();
    if aux.is_empty() {
        aux = vec![0; 2 * s.batch];
    }
    let slopes_at = u32_of(aux.len(), "aux length")?;
    aux.extend(opts.alibi_slopes.iter().flatten().map(|x| x.to_bits()));
    let aux = Tensor::from_u32(ctx, &aux, &[aux.len()])?;
    let t = Bound {
        q: BoundRange::new(ctx, q, "q")?,
        k: BoundRange::new(ctx, k, "k")?,
        v: BoundRange::new(ctx, v, "v")?,
        o: BoundRange::new(ctx, &out.out, "out")?,
        dout: BoundRange::new(ctx, dout, "dout")?,
        lse: BoundRange::new(ctx, lse, "lse")?,
        dq: BoundRange::new(ctx, &grads.dq, "dq")?,
        dk: BoundRange::new(ctx, &grads.dk, "dk")?,
        dv: BoundRange::new(ctx, &grads.dv, "dv")?,
        bias: opts
            .bias
            .as_ref()
            .map(|b| BoundRange::new(ctx, b, "bias"))
            .transpose()?,
        dbias: grads
            .dbias
            .as_ref()
            .map(|b| BoundRange::new(ctx, b, "dbias"))
            .transpose()?,
        stats: BoundRange::new(ctx, &stats, "backward stats")?,
        aux: BoundRange::new(ctx, &aux, "backward aux")?,
    };
    let tensors = [q, k, v, &out.out, dout, &grads.dq, &grads.dk, &grads.dv];
    let prm = params(&c, opts, &t, tensors, lse, slopes_at)?;
    let pbuf = ctx
        .device
        .create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some("flash backward params"),
            contents: bytemuck::bytes_of(&prm),
            usage: wgpu::BufferUsages::UNIFORM,
        });
    let named = t.named(pbuf.as_entire_binding());
    let lq_tiles = u32_of(s.lq.div_ceil(WG as usize), "query tiles")?;
    let hq = u32_of(s.hq, "Hq")?;
    let batch = u32_of(s.batch, "batch")?;
    let mut passes = vec![
        (plan.stats, [lq_tiles, hq, batch]),
        (plan.dkdv, plan.dkdv_grid),
        (plan.dq, plan.dq_grid),
    ];
    passes.extend(plan.dbias);
    let last = passes.len() - 1;
    for (n, (key, grid)) in passes.iter().enumerate() {
        // the first pass's begin and the last pass's end
        let ts = timestamps.map(|(set, i)| wgpu::ComputePassTimestampWrites {
            query_set: set,
            beginning_of_pass_write_index: (n == 0).then_some(i),
            end_of_pass_write_index: (n == last).then_some(i + 1),
        });
        let ts = ts.filter(|t| {
            t.beginning_of_pass_write_index.is_some() || t.end_of_pass_write_index.is_some()
        });
        dispatch(ctx, encoder, key, &named, *grid, ts)?;
    }
    Ok(plan)
}

/// The tensors of a call as bindings.
struct Bound<'a> {
    q: BoundRange<'a>,
    k: BoundRange<'a>,
    v: BoundRange<'a>,
    o: BoundRange<'a>,
    dout: BoundRange<'a>,
    lse: BoundRange<'a>,
    dq: BoundRange<'a>,
    dk: BoundRange<'a>,
    dv: BoundRange<'a>,
    bias: Option<BoundRange<'a>>,
    dbias: Option<BoundRange<'a>>,
    stats: BoundRange<'a>,
    aux: BoundRange<'a>,
}

impl<'a> Bound<'a> {
    /// Every binding by the name the kernels declare (each kernel takes the ones it declares).
    fn named(
        &'a self,
        params: wgpu::BindingResource<'a>,
    ) -> Vec<(&'static str, wgpu::BindingResource<'a>)> {
        let mut n = vec![
            ("p", params),
            ("q", self.q.resource()),
            ("k", self.k.resource()),
            ("v", self.v.resource()),
            ("o", self.o.resource()),
            ("dout", self.dout.resource()),
            ("lse", self.lse.resource()),
            ("dq", self.dq.resource()),
            ("dk", self.dk.resource()),
            ("dvv", self.dv.resource()),
            ("stats", self.stats.resource()),
            ("aux", self.aux.resource()),
        ];
        n.extend(self.bias.as_ref().map(|b| ("bias", b.resource())));
        n.extend(self.dbias.as_ref().map(|b| ("dbias", b.resource())));
        n
    }
}

fn dispatch(
    ctx: &GpuContext,
    enc: &mut wgpu::CommandEncoder,
    key: &BackwardKey,
    named: &[(&str, wgpu::BindingResource)],
    [x, y, z]: [u32; 3],
    timestamp_writes: Option<wgpu::ComputePassTimestampWrites>,
) -> Result<()> {
    let pipeline = ctx.pipeline(key)?;
    let entries = entries_by_name(key, named)?;
    let bg = ctx.device.create_bind_group(&wgpu::BindGroupDescriptor {
        label: Some("flash backward"),
        layout: &pipeline.get_bind_group_layout(0),
        entries: &entries,
    });
    let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
        label: Some("flash backward"),
        timestamp_writes,
    });
    pass.set_pipeline(&pipeline);
    pass.set_bind_group(0, &bg, &[]);
    pass.dispatch_workgroups(x, y, z);
    Ok(())
}

/// Picks the specializations and grids; refuses (`Limit`) head dims past 256 and, on drivers
/// that stop long loops (lavapipe), lengths whose loops would run past the limit. `dbias`: the
/// bias's `[batches, heads]` (1 on a broadcast axis) when its gradient is asked for.
pub fn plan(
    ctx: &GpuContext,
    s: &AttnShape,
    dtype: DType,
    bias: bool,
    dbias: Option<[usize; 2]>,
) -> Result<FlashBackwardPlan> {
    let bucket = |n: usize, what: &str| {
        shader::dim_bucket(n).ok_or_else(|| AttnError::Limit {
            what: format!("{what} of the backward kernels"),
            needed: n as u64,
            limit: shader::MAX_DIM as u64,
        })
    };
    let (d, dv) = (bucket(s.d, "head dim D")?, bucket(s.dv, "head dim Dv")?);
    let key = |pass| BackwardKey {
        pass,
        dtype,
        d,
        dv,
        bias: bias && pass != Pass::Stats,
    };
    let plan = FlashBackwardPlan {
        stats: key(Pass::Stats),
        dkdv: key(Pass::DkDv),
        dq: key(Pass::Dq),
        dkdv_grid: [
            u32_of(s.lk.div_ceil(WG as usize), "key tiles")?,
            u32_of(s.hkv, "Hkv")?,
            u32_of(s.batch, "batch")?,
        ],
        dq_grid: [
            u32_of(s.lq.div_ceil(WG as usize), "query tiles")?,
            u32_of(s.hq, "Hq")?,
            u32_of(s.batch, "batch")?,
        ],
        dbias: match dbias {
            Some([bb, bh]) => Some((
                key(Pass::DBias),
                [
                    u32_of(s.lq.div_ceil(WG as usize), "query tiles")?,
                    u32_of(bh, "bias heads")?,
                    u32_of(bb, "bias batches")?,
                ],
            )),
            None => None,
        },
    };
    // loop trips of one invocation: dK/dV walks every query tile of every head of its group,
    // dQ every key tile
    let group = (s.hq / s.hkv) as u64;
    let tiles = |n: usize, k: &BackwardKey| (n as u64).div_ceil(k.tile_rows() as u64);
    let dkdv = group * (tiles(s.lq, &plan.dkdv) * plan.dkdv.trips_per_tile() + 1);
    let dq = tiles(s.lk, &plan.dq) * plan.dq.trips_per_tile();
    // dBias: its row zeroed, then dQ's walk for every batch and head it sums over
    let dbias = dbias.map_or(0, |[bb, bh]| {
        s.lk as u64 + ((s.batch / bb) * (s.hq / bh)) as u64 * dq
    });
    crate::softmax::check_trips(ctx, dkdv.max(dq).max(dbias), s.lk)?;
    Ok(plan)
}

/// The backward's own checks: dout like O, O and LSE as the forward returns them, gradients
/// shaped like q, k, v, nothing written sharing a buffer with anything else. Returns the LSE.
fn check_backward<'a>(
    ctx: &GpuContext,
    s: &AttnShape,
    [q, k, v]: [&Tensor; 3],
    out: &'a AttentionOutput,
    dout: &Tensor,
    g: &FlashGrads,
    opts_bias: Option<&Tensor>,
) -> Result<&'a Tensor> {
    let dt = q.dtype();
    if dt == DType::F16 && !ctx.caps.f16 {
        return Err(AttnError::MissingFeature {
            feature: "SHADER_F16",
            adapter: ctx.adapter_info.name.clone(),
            needed_for: "the f16 attention backward".into(),
        });
    }
    let lse = out.lse.as_ref().ok_or_else(|| {
        AttnError::invalid(
            "out.lse",
            "the forward's LSE (run the forward with return_lse: true)",
            "none",
        )
    })?;
    let want = |what: &str, t: &Tensor, shape: [usize; 4]| -> Result<()> {
        if t.shape() != shape {
            return Err(AttnError::shape(what, format!("{shape:?}"), t.shape()));
        }
        t.dtype().require(what, dt)?;
        contiguous_last_axis(what, t)
    };
    let o_shape = [s.batch, s.lq, s.hq, s.dv];
    want("out.out", &out.out, o_shape)?;
    want("dout", dout, o_shape)?;
    want("dq", &g.dq, [s.batch, s.lq, s.hq, s.d])?;
    want("dk", &g.dk, [s.batch, s.lk, s.hkv, s.d])?;
    want("dv", &g.dv, [s.batch, s.lk, s.hkv, s.dv])?;
    for (what, t) in [("q", q), ("k", k), ("v", v)] {
        contiguous_last_axis(what, t)?;
    }
    if let Some(db) = &g.dbias {
        let bias = opts_bias.ok_or_else(|| {
            AttnError::invalid(
                "dbias",
                "a bias in the options to take the gradient of",
                "no bias",
            )
        })?;
        db.dtype().require("dbias", DType::F32)?;
        if db.shape() != bias.shape() || !db.is_contiguous() {
            return Err(AttnError::shape(
                "dbias",
                format!("contiguous, the bias's shape {:?}", bias.shape()),
                format!("shape {:?} strides {:?}", db.shape(), db.strides()),
            ));
        }
    }
    lse.dtype().require("out.lse", DType::F32)?;
    let lse_shape = [s.batch, s.hq, s.lq];
    if lse.shape() != lse_shape {
        return Err(AttnError::shape(
            "out.lse",
            format!("{lse_shape:?}"),
            lse.shape(),
        ));
    }
    let inputs = [
        ("q", q),
        ("k", k),
        ("v", v),
        ("out.out", &out.out),
        ("out.lse", lse),
        ("dout", dout),
    ];
    let mut outputs = vec![("dq", &g.dq), ("dk", &g.dk), ("dv", &g.dv)];
    outputs.extend(g.dbias.as_ref().map(|d| ("dbias", d)));
    let mut inputs = inputs.to_vec();
    inputs.extend(opts_bias.map(|b| ("bias", b)));
    check_no_alias(&inputs, &outputs)?;
    Ok(lse)
}

/// The kernels read rows of D (or Dv) consecutive elements.
fn contiguous_last_axis(what: &str, t: &Tensor) -> Result<()> {
    if t.strides()[3] != 1 {
        return Err(AttnError::shape(
            what,
            "a contiguous last axis",
            format!("strides {:?}", t.strides()),
        ));
    }
    Ok(())
}

/// The uniform block: the checked options and every tensor's offset and strides.
fn params(
    c: &Checked,
    opts: &FlashOptions,
    t: &Bound,
    tensors: [&Tensor; 8],
    lse: &Tensor,
    slopes_at: u32,
) -> Result<BackwardParams> {
    let s = c.s;
    let offsets = [&t.q, &t.k, &t.v, &t.o, &t.dout, &t.dq, &t.dk, &t.dv].map(|b| b.elem_offset);
    let mut st = [[0u32; 4]; 8];
    for ((slot, tensor), off) in st.iter_mut().zip(tensors).zip(offsets) {
        let x = strides_u32(tensor)?;
        *slot = [off, x[1], x[2], x[3]];
    }
    // strides_u32 gives [offset, s0, s1, s2]: the strides of [B, L, H]
    let lse_st = lse.strides();
    let c32 = |x: usize| u32_of(x, "lse stride");
    let [b_sb, b_sh, b_sq] = c.bias_strides;
    Ok(BackwardParams {
        batch: u32_of(s.batch, "batch")?,
        hq: u32_of(s.hq, "Hq")?,
        hkv: u32_of(s.hkv, "Hkv")?,
        lq: u32_of(s.lq, "Lq")?,
        lk: u32_of(s.lk, "Lk")?,
        d: u32_of(s.d, "D")?,
        dv: u32_of(s.dv, "Dv")?,
        flags: c.flags,
        q: st[0],
        k: st[1],
        v: st[2],
        o: st[3],
        dout: st[4],
        dq: st[5],
        dk: st[6],
        dvv: st[7],
        bias: [
            t.bias.as_ref().map_or(0, |b| b.elem_offset),
            b_sb,
            b_sh,
            b_sq,
        ],
        lse: [
            t.lse.elem_offset,
            c32(lse_st[0])?,
            c32(lse_st[1])?,
            c32(lse_st[2])?,
        ],
        dbias: match (&t.dbias, &opts.bias) {
            (Some(d), Some(b)) => [
                d.elem_offset,
                u32_of(b.shape()[0], "bias batches")?,
                u32_of(b.shape()[1], "bias heads")?,
                0,
            ],
            _ => [0; 4],
        },
        scale: c.scale,
        softcap: opts.softcap.unwrap_or(0.0),
        win_left: c.win_left,
        win_right: c.win_right,
        // past any length: unbounded (the kernel compares in u32)
        sinks: opts.sinks,
        slopes_at,
        _pad0: 0,
        _pad1: 0,
    })
}
