//! The call path every softmax family climbs (engine): checks, plan (through the family's
//! `CallLayout`), params, resources, encode. One call of any family reads top-down here:
//! `encode_with` -> `prepare` -> `check_call` -> `plan_call` -> `flash_params` -> bind group
//! -> one compute pass.

use wgpu::util::DeviceExt;

use crate::context::GpuContext;
use crate::error::{AttnError, Result};
use crate::pipeline::BindingKind;
use crate::resources::{
    check_no_alias, copy_to_texture, make_textures, texture_texels, BoundRange,
};
use crate::softmax::options::{AttnShape, FlashOptions, SoftmaxPlan, StrategyChoice};
use crate::softmax::shader::{flags, FlashParams, Strategy};
use crate::tensor::{DType, Tensor};

/// How a family that runs on the flash call path (dense calls, the neighborhood and sparse
/// families, whose options map to [`FlashOptions`]) lays out its call: its extra checks, its
/// LSE layout and its plan, with the buffers of its own ([`FamilyData`]).
pub(crate) trait CallLayout {
    /// Checks of the shape beyond the shared ones.
    fn check(&self, s: &AttnShape) -> Result<()>;
    /// LSE is `[B, L, Hq]` (NATTEN) rather than `[B, Hq, L]`.
    fn lse_heads_last(&self) -> bool;
    /// The plan for `opts` (whose strategy may be a forced fallback), and the family's buffers.
    fn plan(
        &self,
        ctx: &GpuContext,
        s: &AttnShape,
        dtype: DType,
        opts: &FlashOptions,
    ) -> Result<(SoftmaxPlan, FamilyData)>;
}

/// A family's own buffers for one planned call, bound after the shared bindings in the
/// order its geometry declares them: the bytes of its uniform block (empty: none) and of its
/// read-only storage buffers (the sparse block tables and aux buffers: host bytes uploaded per
/// call, or a caller's tensor bound as it is).
#[derive(Default)]
pub(crate) struct FamilyData {
    pub uniform: Vec<u8>,
    pub storage: Vec<crate::resources::StorageData>,
}

/// One call's tensors and options, as every step of the call path takes them.
#[derive(Clone, Copy)]
pub(crate) struct Call<'a> {
    pub q: &'a Tensor,
    pub k: &'a Tensor,
    pub v: &'a Tensor,
    pub out: &'a Tensor,
    pub lse: Option<&'a Tensor>,
    pub opts: &'a FlashOptions,
}

fn dims4(t: &Tensor, what: &str) -> Result<[usize; 4]> {
    t.shape()
        .try_into()
        .map_err(|_| AttnError::shape(what, "rank 4 [batch, seq, heads, dim]", t.shape()))
}

fn strides_u32(t: &Tensor) -> Result<[u32; 4]> {
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

/// Everything a dispatch needs, checked.
struct Prepared {
    plan: SoftmaxPlan,
    /// Sweep: Q, K and V textures with their texel counts, filled by copies before the pass.
    textures: Option<[(wgpu::Texture, u64); 3]>,
    bind_group: wgpu::BindGroup,
    pipeline: std::sync::Arc<wgpu::ComputePipeline>,
}

/// What the checks of one call produce: sizes, flags and the values of the uniforms that do
/// not depend on the plan.
struct Checked {
    s: AttnShape,
    flags: u32,
    scale: f32,
    win_left: i32,
    win_right: i32,
    /// Bias strides (batch, head, query), broadcast axes at 0; the offset comes from its binding.
    bias_strides: [u32; 3],
    /// Per-batch q lengths then kv lengths, empty when neither is given.
    lens: Vec<u32>,
}

/// Step 1 of a call: every check of the inputs, outputs and options, before anything is built.
fn check_call(ctx: &GpuContext, call: &Call, layout: &dyn CallLayout) -> Result<Checked> {
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
fn check_options(opts: &FlashOptions, s: AttnShape) -> Result<Checked> {
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

/// Step 2: the family's plan, re-made with the Subgroup kernel where the Sweep kernel cannot
/// copy these tensors into textures (or an error when Sweep was forced); with the texel counts
/// of the Q/K/V textures when it can.
#[allow(clippy::type_complexity)]
fn plan_call(
    ctx: &GpuContext,
    c: &Checked,
    call: &Call,
    layout: &dyn CallLayout,
) -> Result<(SoftmaxPlan, FamilyData, Option<[u64; 3]>)> {
    let dtype = call.q.dtype();
    let (plan, family) = layout.plan(ctx, &c.s, dtype, call.opts)?;
    if plan.key.strategy != Strategy::Sweep {
        return Ok((plan, family, None));
    }
    let counts = [call.q, call.k, call.v].map(|t| texture_texels(ctx, t));
    match counts.iter().find_map(|c| c.as_ref().err()).cloned() {
        None => Ok((plan, family, Some(counts.map(|c| c.unwrap_or(0))))),
        Some(_) if call.opts.strategy == StrategyChoice::Auto => {
            let mut o = call.opts.clone();
            o.strategy = StrategyChoice::Force(Strategy::Subgroup);
            let (plan, family) = layout.plan(ctx, &c.s, dtype, &o)?;
            Ok((plan, family, None))
        }
        Some(why) => Err(AttnError::invalid(
            "strategy Sweep",
            why,
            "these Q/K/V tensors",
        )),
    }
}

/// Step 3: the uniforms, from the checks, the plan and where each tensor's view starts in its
/// binding (`offsets`: q, k, v, out, lse, bias in elements).
fn flash_params(c: &Checked, t: [&Tensor; 4], offsets: [u32; 6]) -> Result<FlashParams> {
    let s = &c.s;
    let with_offset = |t: &Tensor, off: u32| -> Result<[u32; 4]> {
        let [_, b, l, h] = strides_u32(t)?;
        Ok([off, b, l, h])
    };
    let [q, k, v, out] = t;
    let [bb, bh, bq] = c.bias_strides;
    Ok(FlashParams {
        batch: s.batch as u32,
        hq: s.hq as u32,
        hkv: s.hkv as u32,
        lq: s.lq as u32,
        lk: s.lk as u32,
        d: s.d as u32,
        dv: s.dv as u32,
        flags: c.flags,
        q: with_offset(q, offsets[0])?,
        k: with_offset(k, offsets[1])?,
        v: with_offset(v, offsets[2])?,
        o: with_offset(out, offsets[3])?,
        bias: [offsets[5], bb, bh, bq],
        scale: c.scale,
        softcap: 1.0,
        win_left: c.win_left,
        win_right: c.win_right,
        kv_start: 0,
        kv_end: s.lk as u32,
        sinks: 0,
        _pad: 0,
        lse: [offsets[4], 0, 0, 0],
    })
}

fn prepare(ctx: &GpuContext, call: &Call, layout: &dyn CallLayout) -> Result<Prepared> {
    let Call {
        q,
        k,
        v,
        out,
        lse,
        opts,
    } = *call;
    // 1. checks
    let c = check_call(ctx, call, layout)?;
    // 2. plan
    let (plan, family, texels) = plan_call(ctx, &c, call, layout)?;
    let limit = ctx.limits.max_storage_buffer_binding_size;
    if let Some(b) = family
        .storage
        .iter()
        .map(crate::resources::StorageData::host_bytes)
        .find(|&n| n > limit)
    {
        return Err(AttnError::Limit {
            what: format!("bytes of a storage buffer of {}", plan.key.label()),
            needed: b,
            limit,
        });
    }
    // 3. params: each tensor binds the sub-range its view spans
    let ranges =
        [(q, "q"), (k, "k"), (v, "v"), (out, "out")].map(|(t, what)| BoundRange::new(ctx, t, what));
    let [rq, rk, rv, ro] = ranges;
    let (rq, rk, rv, ro) = (rq?, rk?, rv?, ro?);
    let rl = lse.map(|l| BoundRange::new(ctx, l, "lse")).transpose()?;
    let rb = opts
        .bias
        .as_ref()
        .map(|b| BoundRange::new(ctx, b, "bias"))
        .transpose()?;
    // the Sweep kernel reads Q/K/V from textures holding their whole buffers
    let qkv_offset = |r: &BoundRange, t: &Tensor| {
        if texels.is_some() {
            t.offset() as u32 // < u32::MAX: with_layout bounds every index
        } else {
            r.elem_offset
        }
    };
    let offsets = [
        qkv_offset(&rq, q),
        qkv_offset(&rk, k),
        qkv_offset(&rv, v),
        ro.elem_offset,
        rl.as_ref().map_or(0, |r| r.elem_offset),
        rb.as_ref().map_or(0, |r| r.elem_offset),
    ];
    let mut params = flash_params(&c, [q, k, v, out], offsets)?;
    if plan.pair_tiles {
        params.flags |= crate::softmax::shader::flags::PAIR_TILES;
    }
    params.softcap = opts.softcap.unwrap_or(1.0);
    params.sinks = opts.sinks;
    if let Some(l) = lse {
        // LSE strides as (batch, head, query): [B, Hq, Lq], or [B, L, Hq] for neighborhoods
        let st = l.strides();
        let conv = |x: usize| u32::try_from(x).unwrap_or(u32::MAX);
        params.lse[1] = conv(st[0]);
        (params.lse[2], params.lse[3]) = match layout.lse_heads_last() {
            false => (conv(st[1]), conv(st[2])),
            true => (conv(st[2]), conv(st[1])),
        };
    }
    // 4. resources
    ctx.scoped(|| {
        let pipeline = ctx.pipeline(&plan.key)?;
        let dev = &ctx.device;
        let init = |label: &str, contents: &[u8], usage| {
            dev.create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some(label),
                contents,
                usage,
            })
        };
        let params_buf = init(
            "flash params",
            bytemuck::bytes_of(&params),
            wgpu::BufferUsages::UNIFORM,
        );
        let alibi_buf = opts.alibi_slopes.as_ref().map(|a| {
            init(
                "alibi slopes",
                bytemuck::cast_slice(a),
                wgpu::BufferUsages::STORAGE,
            )
        });
        let lens_buf = (!c.lens.is_empty()).then(|| {
            init(
                "seq lens",
                bytemuck::cast_slice(&c.lens),
                wgpu::BufferUsages::STORAGE,
            )
        });
        let textures = texels.map(|counts| make_textures(ctx, q.dtype(), counts));
        let views = textures.as_ref().map(|ts| {
            ts.each_ref()
                .map(|(t, _)| t.create_view(&wgpu::TextureViewDescriptor::default()))
        });
        let dummy = BoundRange::whole(&ctx.dummy);
        let dummy_rw = BoundRange::whole(&ctx.dummy_rw);
        let family_buf = (!family.uniform.is_empty()).then(|| {
            init(
                "family params",
                &family.uniform,
                wgpu::BufferUsages::UNIFORM,
            )
        });
        let storage_bufs = family
            .storage
            .iter()
            .map(|a| a.upload(ctx, "family storage"))
            .collect::<Result<Vec<_>>>()?;
        let storage_ranges = storage_bufs
            .iter()
            .map(|b| b.range(ctx, "family storage"))
            .collect::<Result<Vec<_>>>()?;
        // Entries in the key's declared order (optional ones are declared only where the key
        // uses them): shared bindings by name, then the family's uniform and storage buffers.
        let mut family = storage_ranges.iter();
        let mut entries = Vec::new();
        for (i, decl) in (0u32..).zip(plan.key.bindings()) {
            let tex = |n: usize| {
                views.as_ref().map(|v| wgpu::BindGroupEntry {
                    binding: i,
                    resource: wgpu::BindingResource::TextureView(&v[n]),
                })
            };
            let entry = match decl.name {
                "p" => Some(BoundRange::whole(&params_buf).entry(i)),
                "q_buf" => Some(rq.entry(i)),
                "k_buf" => Some(rk.entry(i)),
                "v_buf" => Some(rv.entry(i)),
                "o_buf" => Some(ro.entry(i)),
                "lse_buf" => Some(rl.as_ref().unwrap_or(&dummy_rw).entry(i)),
                "bias_buf" => Some(rb.as_ref().unwrap_or(&dummy).entry(i)),
                "alibi_buf" => Some(
                    alibi_buf
                        .as_ref()
                        .map_or(dummy.entry(i), |b| BoundRange::whole(b).entry(i)),
                ),
                "lens_buf" => Some(
                    lens_buf
                        .as_ref()
                        .map_or(dummy.entry(i), |b| BoundRange::whole(b).entry(i)),
                ),
                "q_tex" => tex(0),
                "k_tex" => tex(1),
                "v_tex" => tex(2),
                _ => match decl.kind {
                    BindingKind::Uniform(_) => family_buf.as_ref().map(|b| BoundRange::whole(b).entry(i)),
                    _ => family.next().map(|r| r.entry(i)),
                },
            };
            entries.push(entry.ok_or_else(|| {
                AttnError::Gpu(format!(
                    "{}: nothing to bind to `{}` (a family's plan gave fewer buffers than its kernel declares)",
                    plan.key.label(),
                    decl.name
                ))
            })?);
        }
        let bind_group = dev.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some("flash bind group"),
            layout: &pipeline.get_bind_group_layout(0),
            entries: &entries,
        });
        Ok(Prepared {
            plan,
            textures,
            bind_group,
            pipeline,
        })
    })
}

/// Records a call of a family on the flash call path (see [`CallLayout`]).
pub(crate) fn encode_with(
    ctx: &GpuContext,
    encoder: &mut wgpu::CommandEncoder,
    call: &Call,
    layout: &dyn CallLayout,
    timestamps: Option<(&wgpu::QuerySet, u32)>,
) -> Result<SoftmaxPlan> {
    let q = call.q;
    let prep = prepare(ctx, call, layout)?;
    let copied = prep.textures.is_some();
    if let Some(textures) = &prep.textures {
        // The timed region covers the copies: an empty pass writes the first timestamp.
        if let Some((set, i)) = timestamps {
            drop(encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some("flash attention: Q/K/V copies"),
                timestamp_writes: Some(wgpu::ComputePassTimestampWrites {
                    query_set: set,
                    beginning_of_pass_write_index: Some(i),
                    end_of_pass_write_index: None,
                }),
            }));
        }
        let texel_bytes = 4 * q.dtype().size() as u64;
        for (t, (tex, texels)) in [q, call.k, call.v].into_iter().zip(textures) {
            copy_to_texture(encoder, t.buffer(), tex, *texels, texel_bytes);
        }
    }
    let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
        label: Some("flash attention"),
        timestamp_writes: timestamps.map(|(set, i)| wgpu::ComputePassTimestampWrites {
            query_set: set,
            beginning_of_pass_write_index: (!copied).then_some(i),
            end_of_pass_write_index: Some(i + 1),
        }),
    });
    pass.set_pipeline(&prep.pipeline);
    pass.set_bind_group(0, &prep.bind_group, &[]);
    let [x, y, z] = prep.plan.grid;
    pass.dispatch_workgroups(x, y, z);
    drop(pass);
    Ok(prep.plan)
}
