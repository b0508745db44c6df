//! The call path every softmax family climbs (engine): checks, plan (through the family's
//! `CallLayout`), params, resources, encode. One call of any family reads top-down here:
//! `encode_with` -> `prepare` -> `check_call` -> `plan_call` -> `flash_params` -> bind group
//! -> one compute pass.

use wgpu::util::DeviceExt;

use super::check::check_call;
pub use super::check::check_inputs;
pub(crate) use super::check::{check_lens, check_options, strides_u32, Checked};
use crate::context::GpuContext;
use crate::error::{AttnError, Result};
use crate::pipeline::BindingKind;
use crate::resources::{copy_to_texture, make_textures, texture_texels, BoundRange};
use crate::softmax::options::{AttnShape, FlashOptions, SoftmaxPlan, StrategyChoice};
use crate::softmax::shader::{FlashParams, Strategy};
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

/// Everything a dispatch needs, checked.
struct Prepared {
    plan: SoftmaxPlan,
    /// Sweep: Q, K and V textures with their texel counts, filled by copies before the pass.
    textures: Option<[(wgpu::Texture, u64); 3]>,
    bind_group: wgpu::BindGroup,
    pipeline: std::sync::Arc<wgpu::ComputePipeline>,
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
    // 1. checks
    let c = check_call(ctx, call, layout)?;
    // 2. plan
    let (plan, family, texels) = plan_call(ctx, &c, call, layout)?;
    check_family_storage(ctx, &plan, &family)?;
    // 3. params: each tensor binds the sub-range its view spans
    let ranges = CallRanges::new(ctx, call)?;
    let params = call_params(&c, call, layout, &plan, &ranges, texels.is_some())?;
    // 4. resources
    ctx.scoped(|| bind_call(ctx, call, &c, plan, family, texels, &ranges, &params))
}

/// A family's storage buffers fit one binding each.
fn check_family_storage(ctx: &GpuContext, plan: &SoftmaxPlan, family: &FamilyData) -> Result<()> {
    let limit = ctx.limits.max_storage_buffer_binding_size;
    match family
        .storage
        .iter()
        .map(crate::resources::StorageData::host_bytes)
        .find(|&n| n > limit)
    {
        Some(b) => Err(AttnError::Limit {
            what: format!("bytes of a storage buffer of {}", plan.key.label()),
            needed: b,
            limit,
        }),
        None => Ok(()),
    }
}

/// The sub-range of its buffer that each tensor of a call binds.
struct CallRanges<'a> {
    q: BoundRange<'a>,
    k: BoundRange<'a>,
    v: BoundRange<'a>,
    out: BoundRange<'a>,
    lse: Option<BoundRange<'a>>,
    bias: Option<BoundRange<'a>>,
}

impl<'a> CallRanges<'a> {
    fn new(ctx: &GpuContext, call: &Call<'a>) -> Result<Self> {
        let range = BoundRange::new;
        Ok(Self {
            q: range(ctx, call.q, "q")?,
            k: range(ctx, call.k, "k")?,
            v: range(ctx, call.v, "v")?,
            out: range(ctx, call.out, "out")?,
            lse: call.lse.map(|l| range(ctx, l, "lse")).transpose()?,
            bias: (call.opts.bias.as_ref())
                .map(|b| range(ctx, b, "bias"))
                .transpose()?,
        })
    }
}

/// Step 3: the uniforms of one planned call. The Sweep kernel (`textures`) reads Q/K/V from
/// textures holding their whole buffers, so its offsets are the views' own.
fn call_params(
    c: &Checked,
    call: &Call,
    layout: &dyn CallLayout,
    plan: &SoftmaxPlan,
    r: &CallRanges<'_>,
    textures: bool,
) -> Result<FlashParams> {
    let Call {
        q,
        k,
        v,
        out,
        lse,
        opts,
    } = *call;
    let qkv_offset = |r: &BoundRange, t: &Tensor| {
        if textures {
            t.offset() as u32 // < u32::MAX: with_layout bounds every index
        } else {
            r.elem_offset
        }
    };
    let offsets = [
        qkv_offset(&r.q, q),
        qkv_offset(&r.k, k),
        qkv_offset(&r.v, v),
        r.out.elem_offset,
        r.lse.as_ref().map_or(0, |r| r.elem_offset),
        r.bias.as_ref().map_or(0, |r| r.elem_offset),
    ];
    let mut params = flash_params(c, [q, k, v, out], offsets)?;
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
    Ok(params)
}

/// Step 4: the pipeline, the call's small buffers and textures, and the bind group.
#[allow(clippy::too_many_arguments)]
fn bind_call(
    ctx: &GpuContext,
    call: &Call,
    c: &Checked,
    plan: SoftmaxPlan,
    family: FamilyData,
    texels: Option<[u64; 3]>,
    r: &CallRanges<'_>,
    params: &FlashParams,
) -> Result<Prepared> {
    let pipeline = ctx.pipeline(&plan.key)?;
    let bufs = CallBuffers::new(ctx, call, c, &family, params)?;
    let textures = texels.map(|counts| make_textures(ctx, call.q.dtype(), counts));
    let views = textures.as_ref().map(|ts| {
        ts.each_ref()
            .map(|(t, _)| t.create_view(&wgpu::TextureViewDescriptor::default()))
    });
    let storage_ranges = (bufs.family_storage.iter())
        .map(|b| b.range(ctx, "family storage"))
        .collect::<Result<Vec<_>>>()?;
    let entries = call_entries(ctx, &plan, r, &bufs, views.as_ref(), &storage_ranges)?;
    let bind_group = ctx.device.create_bind_group(&wgpu::BindGroupDescriptor {
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
}

/// The small buffers of one call: uniforms, ALiBi slopes, sequence lengths, and the family's
/// own uniform block and storage buffers.
struct CallBuffers {
    params: wgpu::Buffer,
    alibi: Option<wgpu::Buffer>,
    lens: Option<wgpu::Buffer>,
    family_uniform: Option<wgpu::Buffer>,
    family_storage: Vec<crate::resources::HeldStorage>,
}

impl CallBuffers {
    fn new(
        ctx: &GpuContext,
        call: &Call,
        c: &Checked,
        family: &FamilyData,
        params: &FlashParams,
    ) -> Result<Self> {
        let init = |label: &str, contents: &[u8], usage| {
            (ctx.device).create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some(label),
                contents,
                usage,
            })
        };
        let (uniform, storage) = (wgpu::BufferUsages::UNIFORM, wgpu::BufferUsages::STORAGE);
        Ok(Self {
            params: init("flash params", bytemuck::bytes_of(params), uniform),
            alibi: (call.opts.alibi_slopes.as_ref())
                .map(|a| init("alibi slopes", bytemuck::cast_slice(a), storage)),
            lens: (!c.lens.is_empty())
                .then(|| init("seq lens", bytemuck::cast_slice(&c.lens), storage)),
            family_uniform: (!family.uniform.is_empty())
                .then(|| init("family params", &family.uniform, uniform)),
            family_storage: (family.storage.iter())
                .map(|a| a.upload(ctx, "family storage"))
                .collect::<Result<Vec<_>>>()?,
        })
    }
}

/// The bind group's entries in the key's declared order (optional ones are declared only
/// where the key uses them): shared bindings by name, then the family's uniform and storage
/// buffers; absent optional buffers bind the dummies.
fn call_entries<'a>(
    ctx: &'a GpuContext,
    plan: &SoftmaxPlan,
    r: &CallRanges<'a>,
    bufs: &'a CallBuffers,
    views: Option<&'a [wgpu::TextureView; 3]>,
    storage_ranges: &'a [BoundRange<'a>],
) -> Result<Vec<wgpu::BindGroupEntry<'a>>> {
    let dummy = BoundRange::whole(&ctx.dummy);
    let dummy_rw = BoundRange::whole(&ctx.dummy_rw);
    let whole_or_dummy = |b: &'a Option<wgpu::Buffer>, i: u32| {
        b.as_ref()
            .map_or(dummy.entry(i), |b| BoundRange::whole(b).entry(i))
    };
    let mut family = storage_ranges.iter();
    let mut entries = Vec::new();
    for (i, decl) in (0u32..).zip(plan.key.bindings()) {
        let tex = |n: usize| {
            views.map(|v| wgpu::BindGroupEntry {
                binding: i,
                resource: wgpu::BindingResource::TextureView(&v[n]),
            })
        };
        let entry = match decl.name {
            "p" => Some(BoundRange::whole(&bufs.params).entry(i)),
            "q_buf" => Some(r.q.entry(i)),
            "k_buf" => Some(r.k.entry(i)),
            "v_buf" => Some(r.v.entry(i)),
            "o_buf" => Some(r.out.entry(i)),
            "lse_buf" => Some(r.lse.as_ref().unwrap_or(&dummy_rw).entry(i)),
            "bias_buf" => Some(r.bias.as_ref().unwrap_or(&dummy).entry(i)),
            "alibi_buf" => Some(whole_or_dummy(&bufs.alibi, i)),
            "lens_buf" => Some(whole_or_dummy(&bufs.lens, i)),
            "q_tex" => tex(0),
            "k_tex" => tex(1),
            "v_tex" => tex(2),
            _ => match decl.kind {
                BindingKind::Uniform(_) => {
                    (bufs.family_uniform.as_ref()).map(|b| BoundRange::whole(b).entry(i))
                }
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
    Ok(entries)
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
