//! Bad input gets a typed error naming what was expected and what came; nothing panics.

mod common;
use common::*;
use wgpu_attention::*;

fn t(dims: &[usize]) -> Tensor {
    let n = dims.iter().product();
    Tensor::from_f32(ctx(), &random(n, 1.0, 5), dims).unwrap()
}

fn run(q: &Tensor, k: &Tensor, v: &Tensor, opts: &FlashOptions) -> AttnError {
    match flash_attention(ctx(), q, k, v, opts) {
        Ok(_) => panic!("expected an error"),
        Err(e) => e,
    }
}

fn qkv() -> (Tensor, Tensor, Tensor) {
    (t(&[2, 5, 4, 8]), t(&[2, 7, 2, 8]), t(&[2, 7, 2, 8]))
}

#[test]
fn mismatched_shapes() {
    let (q, k, v) = qkv();
    let e = run(&q, &t(&[2, 7, 2, 16]), &v, &Default::default());
    assert!(
        matches!(&e, AttnError::Shape { what, .. } if what == "k"),
        "{e}"
    );
    assert!(e.to_string().contains("[2, 7, 2, 16]"), "{e}");
    let e = run(&q, &k, &t(&[2, 6, 2, 8]), &Default::default());
    assert!(
        matches!(&e, AttnError::Shape { what, .. } if what == "v"),
        "{e}"
    );
    let e = run(&t(&[2, 5, 8]), &k, &v, &Default::default());
    assert!(
        matches!(&e, AttnError::Shape { what, .. } if what == "q"),
        "{e}"
    );
    let e = Tensor::from_f32(ctx(), &[1.0; 5], &[2, 3]).unwrap_err();
    assert!(matches!(e, AttnError::Shape { .. }), "{e}");
}

#[test]
fn heads_not_a_multiple() {
    let e = run(
        &t(&[1, 5, 3, 8]),
        &t(&[1, 7, 2, 8]),
        &t(&[1, 7, 2, 8]),
        &Default::default(),
    );
    assert!(
        matches!(&e, AttnError::Shape { what, .. } if what == "q heads"),
        "{e}"
    );
    assert!(e.to_string().contains("Hkv = 2"), "{e}");
}

#[test]
fn unsupported_head_dim() {
    let e = run(
        &t(&[1, 2, 1, 520]),
        &t(&[1, 2, 1, 520]),
        &t(&[1, 2, 1, 8]),
        &Default::default(),
    );
    assert!(
        matches!(
            e,
            AttnError::HeadDim {
                got: 520,
                max: 512,
                ..
            }
        ),
        "{e}"
    );
    let e = run(
        &t(&[1, 2, 1, 8]),
        &t(&[1, 2, 1, 8]),
        &t(&[1, 2, 1, 513]),
        &Default::default(),
    );
    assert!(matches!(e, AttnError::HeadDim { got: 513, .. }), "{e}");
}

#[test]
fn dtype_mix() {
    if !ctx().caps.f16 {
        // an f16 tensor still uploads; the mix is refused before the feature check
        eprintln!("no SHADER_F16: testing the mix with an f16 buffer anyway");
    }
    let (q, _, v) = qkv();
    let k16 = Tensor::from_f16(ctx(), &vec![half::f16::ONE; 2 * 7 * 2 * 8], &[2, 7, 2, 8]).unwrap();
    let e = run(&q, &k16, &v, &Default::default());
    assert!(matches!(e, AttnError::DType { .. }), "{e}");
    assert!(e.to_string().contains("k f16"), "{e}");
}

#[test]
fn f16_without_shader_f16() {
    // A second context on the same adapter, told that it has no SHADER_F16: the check must fire.
    let mut c = GpuContext::new().unwrap();
    c.caps.f16 = false;
    let x = vec![half::f16::ONE; 2 * 4 * 8];
    let q = Tensor::from_f16(&c, &x, &[1, 2, 4, 8]).unwrap();
    let e = flash_attention(&c, &q, &q, &q, &Default::default())
        .err()
        .unwrap();
    assert!(
        matches!(
            e,
            AttnError::MissingFeature {
                feature: "SHADER_F16",
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn buffers_over_the_adapter_limits() {
    let c = ctx();
    let limit = c
        .limits
        .max_storage_buffer_binding_size
        .min(c.limits.max_buffer_size);
    let n = (limit / 4 + 1) as usize;
    let e = Tensor::filled(c, &[n], DType::F32, 0.0).unwrap_err();
    assert!(matches!(e, AttnError::Limit { .. }), "{e}");
    // a view whose span is bigger than one binding may hold
    if c.limits.max_buffer_size > limit {
        let buf = c.device.create_buffer(&wgpu::BufferDescriptor {
            label: None,
            size: (limit + 64).next_multiple_of(4),
            usage: wgpu::BufferUsages::STORAGE,
            mapped_at_creation: false,
        });
        let rows = (limit / 32 + 1) as usize;
        let q = Tensor::from_buffer(
            buf,
            vec![1, rows, 1, 8],
            vec![8 * rows, 8, 8, 1],
            0,
            DType::F32,
        )
        .unwrap();
        let kv = t(&[1, 4, 1, 8]);
        let e = run(&q, &kv, &kv, &Default::default());
        assert!(matches!(e, AttnError::Limit { .. }), "{e}");
    }
    // a view that reaches past its buffer
    let small = t(&[1, 4, 1, 8]);
    let e = small
        .with_layout(vec![1, 5, 1, 8], vec![40, 8, 8, 1], 0)
        .unwrap_err();
    assert!(matches!(e, AttnError::Shape { .. }), "{e}");
}

#[test]
fn lengths_longer_than_the_sequence() {
    let (q, k, v) = qkv();
    let o = FlashOptions::default().q_lens(Some(vec![5, 6]));
    let e = run(&q, &k, &v, &o);
    assert!(
        matches!(&e, AttnError::Invalid { what, .. } if what == "q_lens"),
        "{e}"
    );
    let o = FlashOptions::default().kv_lens(Some(vec![8, 1]));
    let e = run(&q, &k, &v, &o);
    assert!(
        matches!(&e, AttnError::Invalid { what, .. } if what == "kv_lens"),
        "{e}"
    );
    let o = FlashOptions::default().kv_lens(Some(vec![1]));
    let e = run(&q, &k, &v, &o);
    assert!(
        matches!(&e, AttnError::Shape { what, .. } if what == "kv_lens"),
        "{e}"
    );
}

#[test]
fn bad_options() {
    let (q, k, v) = qkv();
    for o in [
        FlashOptions::default().softcap(Some(0.0)),
        FlashOptions::default().softcap(Some(f32::NAN)),
        FlashOptions::default().scale(Some(f32::INFINITY)),
    ] {
        assert!(matches!(run(&q, &k, &v, &o), AttnError::Invalid { .. }));
    }
    let o = FlashOptions::default().alibi_slopes(Some(vec![0.5; 3]));
    assert!(matches!(run(&q, &k, &v, &o), AttnError::Shape { .. }));
    let o = FlashOptions::default().bias(Some(t(&[2, 4, 5, 6])));
    let e = run(&q, &k, &v, &o);
    assert!(
        matches!(&e, AttnError::Shape { what, .. } if what == "bias"),
        "{e}"
    );
    let lse = Tensor::filled(ctx(), &[2, 4, 4], DType::F32, 0.0).unwrap();
    let out = Tensor::filled(ctx(), &[2, 5, 4, 8], DType::F32, 0.0).unwrap();
    let e =
        flash_attention_into(ctx(), &q, &k, &v, &out, Some(&lse), &Default::default()).unwrap_err();
    assert!(
        matches!(&e, AttnError::Shape { what, .. } if what == "lse"),
        "{e}"
    );
    let e = flash_attention_into(ctx(), &q, &k, &v, &lse, None, &Default::default()).unwrap_err();
    assert!(
        matches!(&e, AttnError::Shape { what, .. } if what == "out"),
        "{e}"
    );
}

#[test]
fn lk_over_the_loop_limit_is_refused_not_truncated() {
    // where the driver stops loops silently the plan must refuse a trip count past the limit
    let c = ctx();
    let Some(limit) = c.caps.loop_limit else {
        eprintln!("adapter has no loop limit: nothing to refuse");
        return;
    };
    let s = AttnShape {
        batch: 1,
        lq: 1,
        lk: limit as usize * 64,
        hq: 1,
        hkv: 1,
        d: 512,
        dv: 512,
    };
    for st in strategies() {
        let o = FlashOptions::default().strategy(StrategyChoice::Force(st));
        let e = flash::plan(c, &s, DType::F32, &o).unwrap_err();
        assert!(matches!(e, AttnError::Limit { .. }), "{e}");
    }
}

/// A buffer of `bytes` with `usage`, for embedder-style tensors.
fn raw_buffer(bytes: u64, usage: wgpu::BufferUsages) -> wgpu::Buffer {
    ctx().device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("embedder buffer"),
        size: bytes,
        usage,
        mapped_at_creation: false,
    })
}

const RW: wgpu::BufferUsages = wgpu::BufferUsages::STORAGE
    .union(wgpu::BufferUsages::COPY_SRC)
    .union(wgpu::BufferUsages::COPY_DST);

fn into(q: &Tensor, k: &Tensor, v: &Tensor, out: &Tensor, lse: Option<&Tensor>) -> AttnError {
    match flash_attention_into(ctx(), q, k, v, out, lse, &Default::default()) {
        Ok(_) => panic!("expected an error"),
        Err(e) => e,
    }
}

#[test]
fn outputs_aliasing_inputs_are_refused() {
    let (q, k, v) = qkv();
    // O written over Q (same shape: [2, 5, 4, 8] with Dv = D)
    let e = into(&q, &k, &v, &q, None);
    assert!(
        matches!(&e, AttnError::Invalid { what, actual, .. } if what == "out" && actual.contains("q")),
        "{e}"
    );
    // O in another part of V's buffer: still one buffer bound read-only and writable
    let big = Tensor::filled(ctx(), &[4096], DType::F32, 0.0).unwrap();
    let v2 = big
        .with_layout(vec![2, 7, 2, 8], vec![112, 16, 8, 1], 0)
        .unwrap();
    let o2 = big
        .with_layout(vec![2, 5, 4, 8], vec![160, 32, 8, 1], 1024)
        .unwrap();
    let e = into(&q, &k, &v2, &o2, None);
    assert!(
        matches!(&e, AttnError::Invalid { actual, .. } if actual.contains("v")),
        "{e}"
    );
    // LSE in O's buffer
    let out = Tensor::filled(ctx(), &[4096], DType::F32, 0.0).unwrap();
    let o = out
        .with_layout(vec![2, 5, 4, 8], vec![160, 32, 8, 1], 0)
        .unwrap();
    let l = out
        .with_layout(vec![2, 4, 5], vec![20, 5, 1], 2048)
        .unwrap();
    let e = into(&q, &k, &v, &o, Some(&l));
    assert!(
        matches!(&e, AttnError::Invalid { what, actual, .. } if what == "lse" && actual.contains("out")),
        "{e}"
    );
}

#[test]
fn overlapping_output_strides_are_refused() {
    let (q, k, v) = qkv();
    let buf = Tensor::filled(ctx(), &[2 * 4 * 8], DType::F32, 0.0).unwrap();
    // stride 0 on the sequence axis: every row of a head writes the same place (a race)
    let o = buf
        .with_layout(vec![2, 5, 4, 8], vec![32, 0, 8, 1], 0)
        .unwrap();
    let e = into(&q, &k, &v, &o, None);
    assert!(
        matches!(&e, AttnError::Invalid { what, .. } if what == "out strides"),
        "{e}"
    );
    // heads overlapping the dim axis
    let buf = Tensor::filled(ctx(), &[1024], DType::F32, 0.0).unwrap();
    let o = buf
        .with_layout(vec![2, 5, 4, 8], vec![160, 32, 4, 1], 0)
        .unwrap();
    let e = into(&q, &k, &v, &o, None);
    assert!(
        matches!(&e, AttnError::Invalid { what, .. } if what == "out strides"),
        "{e}"
    );
}

#[test]
fn missing_buffer_usages_are_typed_errors() {
    let (_, k, v) = qkv();
    let no_storage = raw_buffer(4 * 2 * 5 * 4 * 8, wgpu::BufferUsages::COPY_DST);
    let q = Tensor::from_buffer(
        no_storage,
        vec![2, 5, 4, 8],
        vec![160, 32, 8, 1],
        0,
        DType::F32,
    )
    .unwrap();
    let out = Tensor::filled(ctx(), &[2, 5, 4, 8], DType::F32, 0.0).unwrap();
    let e = into(&q, &k, &v, &out, None);
    assert!(
        matches!(&e, AttnError::Invalid { what, expected, .. } if what == "q buffer usage" && expected.contains("STORAGE")),
        "{e}"
    );
    // an output the caller cannot read back: the kernel runs, the readback is refused
    let (q, k, v) = qkv();
    let buf = raw_buffer(4 * 2 * 5 * 4 * 8, wgpu::BufferUsages::STORAGE);
    let out =
        Tensor::from_buffer(buf, vec![2, 5, 4, 8], vec![160, 32, 8, 1], 0, DType::F32).unwrap();
    flash_attention_into(ctx(), &q, &k, &v, &out, None, &Default::default()).unwrap();
    let e = out.to_vec_f32(ctx()).unwrap_err();
    assert!(
        matches!(&e, AttnError::Invalid { expected, .. } if expected.contains("COPY_SRC")),
        "{e}"
    );
}

#[test]
fn view_arithmetic_that_overflows_is_refused() {
    let buf = raw_buffer(1024, RW);
    for (shape, strides, offset) in [
        (vec![1, 4, 1, 8], vec![32, 8, 8, 1], usize::MAX - 8),
        (vec![2, 4, 1, 8], vec![usize::MAX / 2, 8, 8, 1], 0),
        (vec![usize::MAX, 2, 1, 8], vec![16, 8, 8, 1], 0),
    ] {
        let e = Tensor::from_buffer(buf.clone(), shape.clone(), strides, offset, DType::F32)
            .unwrap_err();
        assert!(
            matches!(e, AttnError::Invalid { .. } | AttnError::Shape { .. }),
            "{shape:?}: {e}"
        );
    }
    // an offset past the end
    let e =
        Tensor::from_buffer(buf, vec![1, 4, 1, 8], vec![32, 8, 8, 1], 256, DType::F32).unwrap_err();
    assert!(matches!(e, AttnError::Shape { .. }), "{e}");
    // huge shapes for new tensors
    let e = Tensor::filled(ctx(), &[usize::MAX, 3], DType::F32, 0.0).unwrap_err();
    assert!(matches!(e, AttnError::Invalid { .. }), "{e}");
}

/// Views into one pooled allocation at offsets that break the adapter's storage-offset
/// alignment (and past one binding's worth of bytes where the adapter allows such buffers):
/// each binds the sub-range it spans and the results equal those of standalone tensors.
#[test]
fn views_into_a_pooled_buffer_bind_their_own_range() {
    let c = ctx();
    let (b, lq, lk, hq, hkv, d) = (1, 9, 13, 2, 1, 8);
    let qh = random(b * lq * hq * d, 2.0, 11);
    let kh = random(b * lk * hkv * d, 2.0, 12);
    let vh = random(b * lk * hkv * d, 1.0, 13);
    let standalone = |x: &[f32], dims: &[usize]| Tensor::from_f32(c, x, dims).unwrap();
    let want = flash_attention(
        c,
        &standalone(&qh, &[b, lq, hq, d]),
        &standalone(&kh, &[b, lk, hkv, d]),
        &standalone(&vh, &[b, lk, hkv, d]),
        &Default::default(),
    )
    .unwrap()
    .out
    .to_vec_f32(c)
    .unwrap();
    // q, k, v at odd element offsets; the pool as large as one binding may be plus a margin
    let binding = c
        .limits
        .max_storage_buffer_binding_size
        .min(c.limits.max_buffer_size);
    let pool_bytes = if c.limits.max_buffer_size >= binding + (1 << 20) {
        binding + (1 << 20)
    } else {
        1 << 20
    };
    let pool = raw_buffer(pool_bytes, RW);
    let pool_elems = (pool_bytes / 4) as usize;
    let offsets = [pool_elems - 4096 + 3, 1001, pool_elems / 2 + 7];
    let mut views = Vec::new();
    for (x, off, l) in [
        (&qh, offsets[0], lq),
        (&kh, offsets[1], lk),
        (&vh, offsets[2], lk),
    ] {
        c.queue
            .write_buffer(&pool, (off * 4) as u64, bytemuck::cast_slice(x));
        let h = x.len() / (b * l * d);
        views.push(
            Tensor::from_buffer(
                pool.clone(),
                vec![b, l, h, d],
                vec![l * h * d, h * d, d, 1],
                off,
                DType::F32,
            )
            .unwrap(),
        );
    }
    let out_pool = raw_buffer(1 << 16, RW);
    let out = Tensor::from_buffer(
        out_pool,
        vec![b, lq, hq, d],
        vec![lq * hq * d, hq * d, d, 1],
        333,
        DType::F32,
    )
    .unwrap();
    out.buffer(); // the same buffer for every view of the pool
    flash_attention_into(
        c,
        &views[0],
        &views[1],
        &views[2],
        &out,
        None,
        &Default::default(),
    )
    .unwrap();
    let got = out.to_vec_f32(c).unwrap();
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert!(
            (g - w).abs() <= 1e-6 * w.abs().max(1.0),
            "element {i}: {g} != {w}"
        );
    }
}

#[test]
fn device_errors_inside_the_library_are_typed_not_panics() {
    // MAP_READ with STORAGE is invalid without MAPPABLE_PRIMARY_BUFFERS: wgpu reports a
    // validation error, which an error scope must turn into AttnError::Gpu
    let e = ctx()
        .scoped(|| {
            Ok(ctx().device.create_buffer(&wgpu::BufferDescriptor {
                label: None,
                size: 16,
                usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::STORAGE,
                mapped_at_creation: false,
            }))
        })
        .unwrap_err();
    assert!(matches!(e, AttnError::Gpu(_)), "{e}");
}

#[test]
fn public_helpers_refuse_instead_of_panicking() {
    use wgpu_attention::neighborhood::NaSpec;
    // four spatial axes
    let e = NaSpec::new(&[NaAxis::UNIT; 4]).unwrap_err();
    assert!(matches!(e, AttnError::Invalid { .. }), "{e}");
    assert!(NaSpec::new(&[]).is_err());
    // the reference on vectors shorter than the shape says
    let shape = AttnShape {
        batch: 1,
        lq: 4,
        lk: 4,
        hq: 2,
        hkv: 1,
        d: 8,
        dv: 8,
    };
    let short = vec![0.0f32; 10];
    let full = vec![0.0f32; 64];
    let inp = RefInputs {
        shape,
        q: &short,
        k: &full[..32],
        v: &full[..32],
        bias: None,
    };
    let e = attention_reference(&inp, &Default::default())
        .err()
        .unwrap();
    assert!(
        matches!(&e, AttnError::Shape { what, .. } if what == "q"),
        "{e}"
    );
    let inp = RefInputs {
        shape,
        q: &full,
        k: &full[..32],
        v: &full[..32],
        bias: None,
    };
    let o = FlashOptions::default().kv_lens(Some(vec![9]));
    assert!(attention_reference(&inp, &o).is_err());
    // a loop limit below the plan's margin refuses every plan, without underflow
    let (d, q) = (ctx().device.clone(), ctx().queue.clone());
    let mut c = GpuContext::from_device(d, q, ctx().adapter_info.clone());
    c.caps.loop_limit = Some(10);
    let x = Tensor::from_f32(&c, &random(32, 1.0, 3), &[1, 4, 1, 8]).unwrap();
    let e = flash_attention(&c, &x, &x, &x, &Default::default())
        .err()
        .unwrap();
    assert!(matches!(e, AttnError::Limit { .. }), "{e}");
}

/// One kind of fault is one error variant in every family: a wrong dtype is `DType`, heads
/// that do not divide are `Shape`, a zero-sized input is `Shape` (refused, never run as an
/// empty call).
#[test]
fn one_variant_per_fault_across_families() {
    let c = ctx();
    let half = |dims: &[usize]| Tensor::filled(c, dims, DType::F16, 0.0).unwrap();
    let zero = |dims: &[usize]| Tensor::filled(c, dims, DType::F32, 0.0).unwrap();
    // dense: out, lse and bias of the wrong dtype
    let (q, k, v) = qkv();
    let e = into(&q, &k, &v, &half(&[2, 5, 4, 8]), None);
    assert!(
        matches!(&e, AttnError::DType { what, .. } if what == "out"),
        "{e}"
    );
    let e = into(&q, &k, &v, &zero(&[2, 5, 4, 8]), Some(&half(&[2, 4, 5])));
    assert!(
        matches!(&e, AttnError::DType { what, .. } if what == "lse"),
        "{e}"
    );
    let o = FlashOptions::default().bias(Some(half(&[2, 4, 5, 7])));
    let e = run(&q, &k, &v, &o);
    assert!(
        matches!(&e, AttnError::DType { what, .. } if what == "bias"),
        "{e}"
    );
    // linear: out of the wrong dtype, v heads that do not divide, T = 0
    let (lq, lv) = (t(&[1, 6, 2, 8]), t(&[1, 6, 2, 8]));
    let e = linear_attention_into(
        c,
        &lq,
        &lq,
        &lv,
        &half(&[1, 6, 2, 8]),
        None,
        &Default::default(),
    )
    .unwrap_err();
    assert!(
        matches!(&e, AttnError::DType { what, .. } if what == "out"),
        "{e}"
    );
    let e = linear_attention(c, &lq, &lq, &t(&[1, 6, 3, 8]), &Default::default()).unwrap_err();
    assert!(matches!(e, AttnError::Shape { .. }), "{e}");
    let empty = zero(&[1, 0, 2, 8]);
    let e = linear_attention(c, &empty, &empty, &empty, &Default::default()).unwrap_err();
    assert!(
        matches!(&e, AttnError::Shape { what, .. } if what == "q"),
        "{e}"
    );
    // dense, neighborhood and sparse: zero lengths
    let e = run(&zero(&[1, 0, 2, 8]), &k, &v, &Default::default());
    assert!(matches!(e, AttnError::Shape { .. }), "{e}");
    let e = sparse_attention(c, &zero(&[2, 0, 4, 8]), &k, &v, &Default::default()).unwrap_err();
    assert!(matches!(e, AttnError::Shape { .. }), "{e}");
    // sparse and dense: heads that do not divide
    let q3 = t(&[2, 5, 3, 8]);
    let e = sparse_attention(c, &q3, &k, &v, &Default::default()).unwrap_err();
    assert!(matches!(e, AttnError::Shape { .. }), "{e}");
}

/// Every public helper validates before it indexes or divides: bad values give a typed error
/// (or a clamped, documented answer), never a panic or a wrap.
#[test]
fn helpers_refuse_bad_values() {
    use wgpu_attention::neighborhood::NaSpec;
    use wgpu_attention::sparse::attention::block_tables;
    // neighborhood axes: size, kernel, dilation, stride, kernel * dilation over the size
    for (n, k, d, s) in [
        (0, 1, 1, 1),
        (5, 0, 1, 1),
        (5, 3, 0, 1),
        (5, 3, 1, 0),
        (5, 3, 1, 4),
        (5, 3, 2, 1),
    ] {
        let e = NaAxis::new(n, k, d, s, false).unwrap_err();
        assert!(
            matches!(e, AttnError::Invalid { .. }),
            "{n} {k} {d} {s}: {e}"
        );
    }
    let a = NaAxis::new(5, 3, 1, 1, true).unwrap();
    assert_eq!((a.n(), a.kernel(), a.causal()), (5, 3, true));
    let big = NaAxis::new(1 << 20, 1, 1, 1, false).unwrap();
    let e = NaSpec::new(&[big, big, big]).unwrap_err();
    assert!(matches!(e, AttnError::Limit { .. }), "{e}");
    // block layouts and masks: bad sizes, wrong list counts, unsorted or out-of-range blocks,
    // a block both full and partial
    assert!(BlockLayout::new(1, 1, (64, 64), (0, 16)).is_err());
    assert!(BlockLayout::new(0, 1, (64, 64), (16, 16)).is_err());
    let l = BlockLayout::new(1, 1, (32, 32), (16, 16)).unwrap();
    let ok = BlockMask::new(l, vec![vec![0], vec![0, 1]], vec![vec![1], vec![]]).unwrap();
    assert_eq!(ok.full()[1], vec![0, 1]);
    for (full, partial) in [
        (vec![vec![0]], vec![vec![1]]),
        (vec![vec![1, 0], vec![]], vec![vec![], vec![]]),
        (vec![vec![2], vec![]], vec![vec![], vec![]]),
        (vec![vec![0], vec![]], vec![vec![0], vec![]]),
    ] {
        let e = BlockMask::new(l, full.clone(), partial.clone()).unwrap_err();
        assert!(
            matches!(e, AttnError::Invalid { .. }),
            "{full:?} {partial:?}: {e}"
        );
    }
    let e = block_tables(&ok, 0).unwrap_err();
    assert!(matches!(e, AttnError::Invalid { .. }), "{e}");
    // top-k slots with a zero block (refused by every call) or huge counts: no panic, no wrap
    let s = AttnShape {
        batch: 1,
        lq: 64,
        lk: 64,
        hq: 1,
        hkv: 1,
        d: 8,
        dv: 8,
    };
    let t = TopK {
        k: usize::MAX,
        block: 0,
        local: usize::MAX,
        sinks: 1,
    };
    assert_eq!(t.slots(&s), 64);
    assert!(t.check(&s).is_err());
    // a global token past u32 indices
    let e = masks::global_tokens(vec![usize::MAX]).unwrap_err();
    assert!(matches!(e, AttnError::Invalid { .. }), "{e}");
    // the reference's score at an index past the shape
    let x = vec![0.0f32; 64 * 8];
    let inp = RefInputs {
        shape: s,
        q: &x,
        k: &x,
        v: &x,
        bias: None,
    };
    let o = FlashOptions::default();
    assert!(wgpu_attention::softmax::reference::raw_score(&inp, &o, (0, 0), (3, 5)).is_ok());
    let e = wgpu_attention::softmax::reference::raw_score(&inp, &o, (0, 0), (64, 0)).unwrap_err();
    assert!(matches!(e, AttnError::Invalid { .. }), "{e}");
}
