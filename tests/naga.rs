//! Every specialization the host can build is valid WGSL for naga and translates to SPIR-V,
//! MSL and HLSL, so Vulkan, Metal and DX12 do not break unseen. No GPU needed.

use naga::back::{hlsl, msl, spv};
use wgpu_attention::pipeline::{validate_wgsl, Kernel};
use wgpu_attention::registry::{all_kernels, representatives};
use wgpu_attention::{DType, Strategy};

fn translate(key: &dyn Kernel, source: &str) -> Result<(), String> {
    let label = key.label();
    let (module, info) =
        validate_wgsl(&label, source, key.capabilities()).map_err(|e| e.to_string())?;
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

/// naga's version in Cargo.lock: a new naga checks every kernel again.
fn naga_version() -> String {
    let lock = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.lock"))
        .unwrap_or_default();
    let mut lines = lock.lines();
    while let Some(l) = lines.next() {
        if l == "name = \"naga\"" {
            return lines.next().unwrap_or("").to_string();
        }
    }
    "unknown naga".to_string()
}

/// The text of the checks: this file from `fn translate` to here, and the library's
/// `validate_wgsl`.
fn checks_text() -> [&'static str; 2] {
    let cut = |all: &'static str, from: &str, to: &str| {
        let start = all.find(from).unwrap_or(0);
        let end = all[start..].find(to).map_or(all.len(), |e| start + e);
        &all[start..end]
    };
    [
        cut(
            include_str!("naga.rs"),
            "fn translate(",
            "/// naga's version in Cargo.lock",
        ),
        cut(
            include_str!("../src/pipeline.rs"),
            "pub fn validate_wgsl(",
            "\n}\n",
        ),
    ]
}

/// What decides a kernel's outcome here: naga's version, the checks' text, the kernel's text,
/// its capabilities and its Rust uniform layouts. Two independent 64-bit hashes of it.
fn fingerprint(key: &dyn Kernel, source: &str, naga: &str) -> String {
    use std::hash::{Hash, Hasher};
    let mut out = String::new();
    for salt in [0u64, 0x9e37_79b9_7f4a_7c15] {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        salt.hash(&mut h);
        naga.hash(&mut h);
        checks_text().hash(&mut h);
        source.hash(&mut h);
        format!("{:?} {:?}", key.capabilities(), key.uniforms()).hash(&mut h);
        out += &format!("{:016x}", h.finish());
    }
    out
}

/// The record of kernels this machine's naga already validated and translated:
/// `WGPU_ATTENTION_NAGA_RECORD` (empty: none, every kernel is checked), else
/// `<cache dir>/naga-checked.txt` (the pipeline cache's folder).
fn record_file() -> Option<std::path::PathBuf> {
    match std::env::var("WGPU_ATTENTION_NAGA_RECORD") {
        Ok(p) if p.is_empty() => None,
        Ok(p) => Some(p.into()),
        Err(_) => wgpu_attention::context::cache_dir().map(|d| d.join("naga-checked.txt")),
    }
}

/// Whether to check every specialization (`WGPU_ATTENTION_EXHAUSTIVE=1`) or the registry's
/// representatives.
fn exhaustive() -> bool {
    std::env::var("WGPU_ATTENTION_EXHAUSTIVE").is_ok_and(|v| v == "1")
}

/// Kernels the host can build (`registry::all_kernels`) are valid WGSL for naga, their uniform
/// structs match the Rust ones, and they translate to SPIR-V, MSL and HLSL. By default the
/// registry's representatives (every kind of kernel of every family, every value of every
/// specialization axis at least once: a few hundred of the ~6700, well under a minute cold);
/// all of them under `WGPU_ATTENTION_EXHAUSTIVE=1` (200-320 s cold on 2 cores). A kernel whose
/// exact text (with naga's version, this file and its layouts) passed here before on this
/// machine is found in a record instead of parsed again: parsing is 95% of the cost (2-5 MB/s
/// of WGSL, 320 MB in all). The record holds only passes; a changed kernel, a new naga or a
/// changed check is checked in full.
#[test]
fn every_specialization_validates_and_translates() {
    let all = all_kernels();
    assert!(all.len() > 100, "only {} keys", all.len());
    let total = all.len();
    let keys = match exhaustive() {
        true => all,
        false => representatives(all),
    };
    eprintln!(
        "{} of {total} specializations (WGPU_ATTENTION_EXHAUSTIVE=1: all of them)",
        keys.len()
    );
    // WGPU_ATTENTION_LABELS=linear_ checks only the labels starting so (while developing)
    let filtered = std::env::var("WGPU_ATTENTION_LABELS").is_ok();
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
    let naga = naga_version();
    let record = record_file();
    let done: std::collections::HashSet<String> = record
        .as_ref()
        .and_then(|p| std::fs::read_to_string(p).ok())
        .map(|t| t.lines().map(str::to_string).collect())
        .unwrap_or_default();
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let chunk = keys.len().div_ceil(threads);
    // per kernel: its fingerprint, and the failure if any (None when found in the record)
    let results: Vec<(String, Option<Result<(), String>>)> = std::thread::scope(|s| {
        let handles: Vec<_> = keys
            .chunks(chunk)
            .map(|part| {
                let done = &done;
                let naga = &naga;
                s.spawn(move || {
                    part.iter()
                        .map(|k| {
                            let src = k.source();
                            let f = fingerprint(k.as_ref(), &src, naga);
                            let r = (!done.contains(&f)).then(|| translate(k.as_ref(), &src));
                            (f, r)
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("naga thread panicked"))
            .collect()
    });
    let checked = results.iter().filter(|(_, r)| r.is_some()).count();
    let failures: Vec<&String> = results
        .iter()
        .filter_map(|(_, r)| r.as_ref()?.as_ref().err())
        .collect();
    if let Some(p) = &record {
        let passed = results
            .iter()
            .filter(|(_, r)| matches!(r, None | Some(Ok(()))))
            .map(|(f, _)| f.as_str());
        // the kernels of today (and, checking a few labels, every earlier pass)
        let mut all: std::collections::BTreeSet<&str> = match filtered {
            true => done.iter().map(String::as_str).collect(),
            false => Default::default(),
        };
        all.extend(passed);
        let text: String = all.into_iter().map(|f| format!("{f}\n")).collect();
        if let Some(dir) = p.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        if let Err(e) = std::fs::write(p, text) {
            eprintln!("could not write the record {}: {e}", p.display());
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} specializations failed:\n{}",
        failures.len(),
        keys.len(),
        failures
            .iter()
            .map(|s| s.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    );
    eprintln!(
        "{} specializations valid in WGSL, SPIR-V, MSL and HLSL ({naga}): {checked} checked now, {} found in the record {} (WGPU_ATTENTION_NAGA_RECORD= checks all)",
        keys.len(),
        keys.len() - checked,
        record.map_or("(none)".to_string(), |p| p.display().to_string()),
    );
}

/// Readable copies of twelve generated kernels live in `shaders/<family>/` (the GPU plan, its
/// two-stage variant and the lavapipe plan of dense attention, the lavapipe neighborhood plans, box and sweep, at D = 64,
/// the recurrent gated-DeltaNet kernel at K = 64, lavapipe's two chunk passes of simple GLA,
/// gated DeltaNet's solve and state passes at K = 64, the q8_0 decode kernel of a GQA group of
/// 4 at D = 128 and the merge of f32 parts).
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
            Box::new(wgpu_attention::softmax::with_tile(
                flash_key(Strategy::Tiled, DType::F32, 64, 64, (0, 0), false),
                wgpu_attention::softmax::Tile {
                    wg: 64,
                    rows: 4,
                    stages: 2,
                },
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
        let fused = ChunkKey::fused(DType::F32, FeatureMap::Identity, Decay::Scalar, true);
        keys.push(("linear", Box::new(fused)));
        for stage in [Stage::Solve, Stage::States] {
            let key = ChunkKey::delta(stage, DType::F32, true, true, true, 64);
            keys.push(("linear", Box::new(key)));
        }
    }
    keys.push((
        "decode",
        Box::new(wgpu_attention::decode::shader::DecodeKey {
            dtype: DType::F32,
            kv: wgpu_attention::KvFormat::Q8_0,
            d: 128,
            dv: 128,
            rows: 4,
        }),
    ));
    keys.push((
        "softmax",
        Box::new(wgpu_attention::softmax::merge::MergeKey {
            part: DType::F32,
            out: DType::F32,
        }),
    ));
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

/// The default naga run stands for the exhaustive one: its representatives cover every kind
/// and every axis value of every kernel, and are far fewer.
#[test]
fn representatives_cover_every_axis_of_every_kernel() {
    use std::collections::BTreeSet;
    use wgpu_attention::registry::features;
    let all = all_kernels();
    let total = all.len();
    let want: BTreeSet<String> = all.iter().flat_map(|k| features(&k.label())).collect();
    let reps = representatives(all);
    let got: BTreeSet<String> = reps.iter().flat_map(|k| features(&k.label())).collect();
    let missing: Vec<&String> = want.difference(&got).collect();
    assert!(missing.is_empty(), "not represented: {missing:?}");
    assert!(reps.len() * 10 < total, "{} of {total}", reps.len());
    let labels: BTreeSet<String> = reps.iter().map(|k| k.label()).collect();
    assert_eq!(labels.len(), reps.len(), "a kernel picked twice");
    eprintln!("{} representatives of {total} specializations", reps.len());
}
