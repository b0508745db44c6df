//! Every specialization the host can build is valid WGSL for naga and translates to SPIR-V,
//! MSL and HLSL, so Vulkan, Metal and DX12 do not break unseen. No GPU needed.

use naga::back::{hlsl, msl, spv};
use wgpu_attention::pipeline::{all_keys, validate_wgsl, PipelineKey};

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
