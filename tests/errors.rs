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
        matches!(&e, AttnError::Invalid { what, .. } if what == "heads"),
        "{e}"
    );
    assert!(e.to_string().contains("Hq = 3"), "{e}");
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
    // a caller's buffer bigger than one binding may hold
    if c.limits.max_buffer_size > limit {
        let buf = c.device.create_buffer(&wgpu::BufferDescriptor {
            label: None,
            size: (limit + 16).next_multiple_of(4),
            usage: wgpu::BufferUsages::STORAGE,
            mapped_at_creation: false,
        });
        let q =
            Tensor::from_buffer(buf, vec![1, 4, 1, 8], vec![32, 8, 8, 1], 0, DType::F32).unwrap();
        let e = run(
            &q,
            &t(&[1, 4, 1, 8]),
            &t(&[1, 4, 1, 8]),
            &Default::default(),
        );
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
    let o = FlashOptions {
        q_lens: Some(vec![5, 6]),
        ..Default::default()
    };
    let e = run(&q, &k, &v, &o);
    assert!(
        matches!(&e, AttnError::Invalid { what, .. } if what == "q_lens"),
        "{e}"
    );
    let o = FlashOptions {
        kv_lens: Some(vec![8, 1]),
        ..Default::default()
    };
    let e = run(&q, &k, &v, &o);
    assert!(
        matches!(&e, AttnError::Invalid { what, .. } if what == "kv_lens"),
        "{e}"
    );
    let o = FlashOptions {
        kv_lens: Some(vec![1]),
        ..Default::default()
    };
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
        FlashOptions {
            softcap: Some(0.0),
            ..Default::default()
        },
        FlashOptions {
            softcap: Some(f32::NAN),
            ..Default::default()
        },
        FlashOptions {
            scale: Some(f32::INFINITY),
            ..Default::default()
        },
    ] {
        assert!(matches!(run(&q, &k, &v, &o), AttnError::Invalid { .. }));
    }
    let o = FlashOptions {
        alibi_slopes: Some(vec![0.5; 3]),
        ..Default::default()
    };
    assert!(matches!(run(&q, &k, &v, &o), AttnError::Shape { .. }));
    let o = FlashOptions {
        bias: Some(t(&[2, 4, 5, 6])),
        ..Default::default()
    };
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
        let o = FlashOptions {
            strategy: StrategyChoice::Force(st),
            ..Default::default()
        };
        let e = flash::plan(c, &s, DType::F32, &o).unwrap_err();
        assert!(matches!(e, AttnError::Limit { .. }), "{e}");
    }
}
