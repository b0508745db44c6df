//! The page crate's native tests: the self-test cases and the page's pure helpers, run on the default adapter.

use wgpu_attention::NeighborhoodOptions;

/// The page's self-test natively, on the default adapter (lavapipe in CI).
#[test]
fn sparse_panel_natively() {
    let ctx = GpuContext::new().expect("no GPU adapter: install mesa-vulkan-drivers");
    let cfg = |source: &str| crate::sparse_case::MaskConfig {
        source: source.into(),
        lq: 100,
        lk: 100,
        q_block: 32,
        kv_block: 16,
        aux0: vec![],
    };
    let ok = "fn mask_mod(b: u32, h: u32, q_idx: u32, kv_idx: u32) -> bool {\n    return kv_idx <= q_idx;\n}";
    let r = pollster::block_on(crate::sparse_case::block_mask(&ctx, &cfg(ok))).unwrap();
    assert_eq!((r.nq, r.nk), (4, 7));
    // query block 1 (rows 32..64): key blocks 0 and 1 full, 2 and 3 partial
    assert_eq!(
        (r.full[1].clone(), r.partial[1].clone()),
        (vec![0, 1], vec![2, 3])
    );
    let bad =
        "fn mask_mod(b: u32, h: u32, q_idx: u32, kv_idx: u32) -> bool {\n    return kv_idx <= ;\n}";
    let err = pollster::block_on(crate::sparse_case::block_mask(&ctx, &cfg(bad))).unwrap_err();
    assert!(err.to_string().contains("line 2"), "{err}");
}

#[test]
fn selftest_passes_natively() {
    let ctx = GpuContext::new().expect("no GPU adapter: install mesa-vulkan-drivers");
    let r = pollster::block_on(super::selftest(&ctx));
    let text = serde_json::to_string_pretty(&r).unwrap();
    assert!(r.passed, "{text}");
    // the configured cases, the sparse block-mask case and the backward case
    assert_eq!(r.cases.len(), super::selftest_cases().len() + 2);
}

use super::*;

/// The drawn weights are a softmax over exactly the visible keys, and the pattern pools the
/// same mask: checked against the neighborhood's own window arithmetic.
#[test]
fn weights_and_pattern_follow_the_mask() {
    let ctx = GpuContext::new().expect("no GPU adapter: install mesa-vulkan-drivers");
    let cfg = Config {
        variant: Variant::Neighborhood,
        grid: vec![9, 7],
        kernel: vec![3, 5],
        dilation: vec![2, 1],
        query: 40,
        repeats: 1,
        ..Default::default()
    };
    let r = pollster::block_on(case::run_case(&ctx, &cfg)).unwrap();
    assert!(r.check.passed, "{:?}", r.check);
    let axes = NeighborhoodOptions::default()
        .kernel_size(cfg.kernel.clone())
        .dilation(cfg.dilation.clone())
        .axes(&cfg.grid)
        .unwrap();
    let spec = wgpu_attention::neighborhood::NaSpec::new(&axes).unwrap();
    let w = &r.weights.values;
    assert_eq!(w.len(), 63);
    let sum: f64 = w.iter().map(|&x| x as f64).sum();
    assert!((sum - 1.0).abs() < 1e-5, "weights sum to {sum}");
    for (j, &x) in w.iter().enumerate() {
        assert_eq!(x > 0.0, spec.sees(40, j), "key {j}: weight {x}");
    }
    assert_eq!(r.visible_pairs, 63 * 15);
    assert_eq!((r.pattern.rows, r.pattern.cols), (63, 63));
    for i in 0..63 {
        for j in 0..63 {
            let want = if spec.sees(i, j) { 255 } else { 0 };
            assert_eq!(r.pattern.cells[i * 63 + j], want, "cell ({i}, {j})");
        }
    }
}

/// A bad config is a typed error, not a panic.
#[test]
fn bad_config_is_an_error() {
    let ctx = GpuContext::new().expect("no GPU adapter: install mesa-vulkan-drivers");
    let cfg = Config {
        dtype: "bf16".into(),
        ..Default::default()
    };
    let e = pollster::block_on(case::run_case(&ctx, &cfg)).unwrap_err();
    assert!(e.to_string().contains("bf16"), "{e}");
    let cfg = Config {
        variant: Variant::Neighborhood,
        grid: vec![5],
        kernel: vec![7],
        ..Default::default()
    };
    assert!(pollster::block_on(case::run_case(&ctx, &cfg)).is_err());
    let cfg = Config {
        query: 256,
        ..Default::default()
    };
    let e = pollster::block_on(case::run_case(&ctx, &cfg)).unwrap_err();
    assert!(e.to_string().contains("query"), "{e}");
}
