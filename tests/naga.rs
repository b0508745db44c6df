//! Every specialization the host can build is valid WGSL for naga and translates to SPIR-V,
//! MSL and HLSL, so Vulkan, Metal and DX12 do not break unseen. No GPU needed.

use naga::back::{hlsl, msl, spv};
use wgpu_attention::pipeline::{all_keys, validate_wgsl, PipelineKey};
use wgpu_attention::{DType, Strategy};

fn translate(key: &PipelineKey) -> Result<(), String> {
    let label = key.label();
    let (module, info) =
        validate_wgsl(&label, &key.source(), key.capabilities()).map_err(|e| e.to_string())?;
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

#[test]
fn every_specialization_validates_and_translates() {
    let keys = all_keys();
    assert!(keys.len() > 100, "only {} keys", keys.len());
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let chunk = keys.len().div_ceil(threads);
    let failures: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = keys
            .chunks(chunk)
            .map(|part| {
                s.spawn(move || {
                    part.iter()
                        .filter_map(|k| translate(k).err())
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

/// Readable copies of four generated kernels live in `shaders/flash/` (the GPU plan, the
/// lavapipe plan and the lavapipe neighborhood plans, box and sweep, at D = 64). They are outputs, never inputs: this test fails when the generator
/// changes and the copies do not; `WGPU_ATTENTION_BLESS=1 cargo test --test naga` rewrites them.
#[test]
fn shader_snapshots_match_the_generator() {
    use wgpu_attention::flash::{flash_key, sweep_key};
    let keys = [
        flash_key(Strategy::Tiled, DType::F32, 64, 64, (0, 0), false, false),
        flash_key(Strategy::Subgroup, DType::F32, 64, 64, (8, 8), false, false),
        flash_key(Strategy::Subgroup, DType::F32, 64, 64, (8, 8), false, true),
        sweep_key(DType::F32, 64, 64, (8, 8), 13, false),
    ];
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("shaders/flash");
    let bless = std::env::var("WGPU_ATTENTION_BLESS").is_ok_and(|v| v == "1");
    for k in keys {
        let key = PipelineKey::Flash(k);
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
