//! Every specialization the host can build is valid WGSL for naga and translates to SPIR-V,
//! MSL and HLSL, so Vulkan, Metal and DX12 do not break unseen. No GPU needed.

use naga::back::{hlsl, msl, spv};
use wgpu_attention::pipeline::{all_kernels, validate_wgsl, Kernel};
use wgpu_attention::{DType, Strategy};

fn translate(key: &dyn Kernel) -> Result<(), String> {
    let label = key.label();
    let (module, info) =
        validate_wgsl(&label, &key.source(), key.capabilities()).map_err(|e| e.to_string())?;
    check_uniform_layout(key, &module)?;
    spv::write_vec(&module, &info, &spv::Options::default(), None)
        .map_err(|e| format!("{label}: SPIR-V: {e}"))?;
    msl::write_string(
        &module,
        &info,
        &msl::Options {
            lang_version: (2, 4),
            ..Default::default()
        },
        &msl::PipelineOptions::default(),
    )
    .map_err(|e| format!("{label}: MSL: {e}"))?;
    let mut out = String::new();
    hlsl::Writer::new(
        &mut out,
        &hlsl::Options {
            shader_model: hlsl::ShaderModel::V6_2,
            ..Default::default()
        },
        &hlsl::PipelineOptions::default(),
    )
    .write(&module, &info, None)
    .map_err(|e| format!("{label}: HLSL: {e}"))?;
    Ok(())
}

/// The Rust uniform structs of a kernel against naga's layout of the WGSL structs they mirror:
/// same size, same field names in the same order at the same offsets.
fn check_uniform_layout(key: &dyn Kernel, module: &naga::Module) -> Result<(), String> {
    let uniforms = key.uniforms();
    if uniforms.is_empty() {
        return Err(format!("{}: no uniform layout", key.label()));
    }
    for want in uniforms {
        check_one_uniform(key, module, &want)?;
    }
    Ok(())
}

fn check_one_uniform(
    key: &dyn Kernel,
    module: &naga::Module,
    want: &wgpu_attention::pipeline::UniformLayout,
) -> Result<(), String> {
    let label = key.label();
    let mut layouter = naga::proc::Layouter::default();
    layouter
        .update(module.to_ctx())
        .map_err(|e| format!("{label}: layout: {e}"))?;
    let (handle, ty) = module
        .types
        .iter()
        .find(|(_, t)| t.name.as_deref() == Some(want.wgsl_struct))
        .ok_or_else(|| format!("{label}: no WGSL struct {}", want.wgsl_struct))?;
    let naga::TypeInner::Struct { members, .. } = &ty.inner else {
        return Err(format!("{label}: {} is not a struct", want.wgsl_struct));
    };
    let got: Vec<(String, usize)> = members
        .iter()
        .map(|m| (m.name.clone().unwrap_or_default(), m.offset as usize))
        .collect();
    let want_fields: Vec<(String, usize)> = want
        .fields
        .iter()
        .map(|(n, o)| (n.trim_start_matches('_').to_string(), *o))
        .collect();
    let size = layouter[handle].size as usize;
    if got != want_fields || size != want.size {
        return Err(format!(
            "{label}: Rust uniform ({} bytes) {want_fields:?} != WGSL {} ({size} bytes) {got:?}",
            want.size, want.wgsl_struct
        ));
    }
    Ok(())
}

#[test]
fn every_specialization_validates_and_translates() {
    let keys = all_kernels();
    assert!(keys.len() > 100, "only {} keys", keys.len());
    // WGPU_ATTENTION_LABELS=linear_ checks only the labels starting so (while developing)
    let keys: Vec<_> = match std::env::var("WGPU_ATTENTION_LABELS") {
        Ok(prefix) => {
            let some: Vec<_> = keys
                .into_iter()
                .filter(|k| k.label().starts_with(&prefix))
                .collect();
            eprintln!("only the {} labels starting with {prefix:?}", some.len());
            some
        }
        Err(_) => keys,
    };
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let chunk = keys.len().div_ceil(threads);
    let failures: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = keys
            .chunks(chunk)
            .map(|part| {
                s.spawn(move || {
                    part.iter()
                        .filter_map(|k| translate(k.as_ref()).err())
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("naga thread panicked"))
            .collect()
    });
    assert!(
        failures.is_empty(),
        "{} of {} specializations failed:\n{}",
        failures.len(),
        keys.len(),
        failures.join("\n")
    );
    eprintln!(
        "{} specializations valid in WGSL, SPIR-V, MSL and HLSL",
        keys.len()
    );
}

/// Readable copies of nine generated kernels live in `shaders/<family>/` (the GPU plan and the
/// lavapipe plan of dense attention, the lavapipe neighborhood plans, box and sweep, at D = 64,
/// the recurrent gated-DeltaNet kernel at K = 64, lavapipe's two chunk passes of simple GLA,
/// and gated DeltaNet's solve and state passes at K = 64).
/// They are outputs, never inputs: this test fails when the generator changes and the copies do
/// not; `WGPU_ATTENTION_BLESS=1 cargo test --test naga` rewrites them.
#[test]
fn shader_snapshots_match_the_generator() {
    use wgpu_attention::flash::flash_key;
    use wgpu_attention::neighborhood::plan::{na_key, sweep_key};
    let keys: Vec<(&str, Box<dyn Kernel>)> = vec![
        (
            "flash",
            Box::new(flash_key(
                Strategy::Tiled,
                DType::F32,
                64,
                64,
                (0, 0),
                false,
            )),
        ),
        (
            "flash",
            Box::new(flash_key(
                Strategy::Subgroup,
                DType::F32,
                64,
                64,
                (8, 8),
                false,
            )),
        ),
        (
            "neighborhood",
            Box::new(na_key(Strategy::Subgroup, DType::F32, 64, 64, (8, 8))),
        ),
        (
            "neighborhood",
            Box::new(sweep_key(DType::F32, 64, 64, (8, 8), 13, false)),
        ),
        (
            "linear",
            Box::new(wgpu_attention::linear::shader::LinearKey::new(
                DType::F32,
                64,
                wgpu_attention::Rule::GatedDelta,
                wgpu_attention::FeatureMap::Identity,
                false,
                true,
            )),
        ),
    ];
    let mut keys = keys;
    {
        use wgpu_attention::linear::chunk::{ChunkKey, Stage};
        use wgpu_attention::linear::shader::Decay;
        use wgpu_attention::FeatureMap;
        for stage in [Stage::States, Stage::Output] {
            let map = FeatureMap::Identity;
            let key = ChunkKey::new(stage, DType::F32, map, Decay::Scalar, false, true);
            keys.push(("linear", Box::new(key.with_subgroups())));
        }
        for stage in [Stage::Solve, Stage::States] {
            let key = ChunkKey::delta(stage, DType::F32, true, true, true, 64);
            keys.push(("linear", Box::new(key)));
        }
    }
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("shaders");
    let bless = std::env::var("WGPU_ATTENTION_BLESS").is_ok_and(|v| v == "1");
    for (family, key) in keys {
        let dir = root.join(family);
        let path = dir.join(format!("{}.wgsl", key.label()));
        let src = key.source();
        if bless {
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(&path, &src).unwrap();
            continue;
        }
        let on_disk = std::fs::read_to_string(&path).unwrap_or_else(|e| {
            panic!(
                "{}: {e}; run WGPU_ATTENTION_BLESS=1 cargo test --test naga",
                path.display()
            )
        });
        assert!(
            on_disk == src,
            "{} is stale; run WGPU_ATTENTION_BLESS=1 cargo test --test naga",
            path.display()
        );
    }
}
