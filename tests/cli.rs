//! The CLI from outside: exit codes, JSON, .npy in and out, --check with every file option.

use std::path::{Path, PathBuf};
use std::process::Command;

use npyz::WriterBuilder;

fn cli() -> Command {
    Command::new(env!("CARGO_BIN_EXE_wgpu-attention"))
}

fn tmp(name: &str) -> PathBuf {
    // under target/tmp (Cargo's folder for integration tests' files), not the system's /tmp:
    // each nextest process has its own folder, and they would pile up there
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

fn write_npy<T: npyz::AutoSerialize + Copy>(path: &Path, shape: &[u64], data: &[T]) {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let mut w = npyz::WriteOptions::new()
        .default_dtype()
        .shape(shape)
        .writer(&mut f)
        .begin_nd()
        .unwrap();
    w.extend(data.iter().copied()).unwrap();
    w.finish().unwrap();
}

fn json_of(out: &std::process::Output) -> serde_json::Value {
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

#[test]
fn run_random_check_json() {
    let out = cli()
        .args([
            "run",
            "--shape",
            "2,33,47,4,2,40",
            "--causal",
            "--check",
            "--json",
            "--repeat",
            "2",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let j = json_of(&out);
    assert!(j["gpu_ms"].as_f64().unwrap() > 0.0);
    assert!(j["gflops"].as_f64().unwrap() > 0.0);
    assert!(j["adapter"].as_str().is_some());
    assert_eq!(j["check"]["passed"], true, "{j}");
}

/// `--tile` takes a tile as `info` and `tune` print it, two K/V stages included.
#[test]
fn run_with_a_tile() {
    let out = cli()
        .args([
            "run",
            "--shape",
            "2,33,47,4,2,40",
            "--strategy",
            "tiled",
            "--tile",
            "wg16xr1s2",
            "--check",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let j = json_of(&out);
    assert_eq!(j["check"]["passed"], true, "{j}");
    assert!(j["kernel"].as_str().unwrap().ends_with("_wg16_s2"), "{j}");
}

#[test]
fn run_from_files_with_every_file_option() {
    let (b, lq, lk, hq, hkv, d) = (2u64, 9u64, 12u64, 4u64, 2u64, 8u64);
    let gen = |n: u64, s: f32| (0..n).map(|i| (i as f32 * s).sin()).collect::<Vec<f32>>();
    let (q, k, v) = (tmp("q.npy"), tmp("k.npy"), tmp("v.npy"));
    write_npy(&q, &[b, lq, hq, d], &gen(b * lq * hq * d, 0.31));
    write_npy(&k, &[b, lk, hkv, d], &gen(b * lk * hkv * d, 0.17));
    write_npy(&v, &[b, lk, hkv, d], &gen(b * lk * hkv * d, 0.53));
    let (alibi, bias, ql, kl) = (
        tmp("alibi.npy"),
        tmp("bias.npy"),
        tmp("ql.npy"),
        tmp("kl.npy"),
    );
    write_npy(&alibi, &[hq], &[0.5f32, 0.25, 0.125, 0.0625]);
    write_npy(&bias, &[1, hq, lq, lk], &gen(hq * lq * lk, 0.7));
    write_npy(&ql, &[b], &[9i32, 5]);
    write_npy(&kl, &[b], &[12i32, 7]);
    let (o, lse) = (tmp("o.npy"), tmp("lse.npy"));
    let p = |x: &PathBuf| x.to_str().unwrap().to_string();
    let out = cli()
        .args(["run", "--q", &p(&q), "--k", &p(&k), "--v", &p(&v)])
        .args(["--alibi", &p(&alibi), "--bias", &p(&bias)])
        .args(["--q-lens", &p(&ql), "--kv-lens", &p(&kl)])
        .args([
            "--causal",
            "--softcap",
            "5",
            "--window",
            "4,-1",
            "--sinks",
            "1",
        ])
        .args(["--out", &p(&o), "--lse", &p(&lse), "--check", "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(json_of(&out)["check"]["passed"], true);
    let o = npyz::NpyFile::new(std::fs::File::open(&o).unwrap()).unwrap();
    assert_eq!(o.shape(), &[b, lq, hq, d]);
    let lse = npyz::NpyFile::new(std::fs::File::open(&lse).unwrap()).unwrap();
    assert_eq!(lse.shape(), &[b, hq, lq]);
}

#[test]
fn bad_input_exits_2_with_a_message() {
    for args in [
        vec!["run", "--shape", "1,10,x"],
        vec!["run", "--shape", "1,10,10,3,2,64"],
        vec!["run", "--shape", "1,10,10,2,2,600"],
        vec!["run", "--q", "/nonexistent.npy", "--k", "/a", "--v", "/b"],
        vec!["run", "--shape", "1,4,4,1,1,8", "--window", "3"],
        vec!["run", "--shape", "1,4,4,1,1,8", "--tile", "wg64"],
        vec!["run", "--shape", "1,4,4,1,1,8", "--tile", "wg48xr3"],
        vec!["run"],
    ] {
        let out = cli().args(&args).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("error"), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
    // a file that is not .npy
    let junk = tmp("junk.npy");
    std::fs::write(&junk, b"not an array").unwrap();
    let j = junk.to_str().unwrap();
    let out = cli()
        .args(["run", "--q", j, "--k", j, "--v", j])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn info_names_the_adapter_and_plans() {
    let out = cli().arg("info").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("using:") && text.contains("flash_"), "{text}");
}

#[test]
fn run_neighborhood_from_files_and_random() {
    // 2D from .npy files [B, X, Y, H, D]: the rank decides 2D; outputs written heads-last
    let (b, x, y, h, d) = (1u64, 9u64, 11u64, 2u64, 16u64);
    let n = (b * x * y * h * d) as usize;
    let data: Vec<f32> = (0..n)
        .map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0)
        .collect();
    let (q, o, l) = (tmp("na_q.npy"), tmp("na_o.npy"), tmp("na_lse.npy"));
    write_npy(&q, &[b, x, y, h, d], &data);
    let out = cli()
        .args(["run", "--q"])
        .arg(&q)
        .arg("--k")
        .arg(&q)
        .arg("--v")
        .arg(&q)
        .args([
            "--na-kernel",
            "3,4",
            "--na-dilation",
            "2,1",
            "--na-causal",
            "0,1",
        ])
        .args(["--na-stride", "1,2", "--check", "--json", "--out"])
        .arg(&o)
        .arg("--lse")
        .arg(&l)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let j = json_of(&out);
    assert_eq!(j["check"]["passed"], true, "{j}");
    // a neighborhood kernel: "_na", then "_p{pins}" when the Sweep kernel took it
    assert!(j["kernel"].as_str().unwrap().contains("_na"), "{j}");
    let lse = npyz::NpyFile::new(std::fs::File::open(&l).unwrap()).unwrap();
    assert_eq!(lse.shape(), &[b, x, y, h]);
    let lse: Vec<f32> = lse.into_vec().unwrap();
    assert!(lse.iter().all(|v| v.is_finite()));
    // random 1D input over a grid, and a kernel too large for its axis (exit code 2)
    let ok = cli()
        .args([
            "run",
            "--shape",
            "1,40,40,2,1,8",
            "--na-grid",
            "40",
            "--na-kernel",
            "5",
        ])
        .args(["--check"])
        .output()
        .unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let bad = cli()
        .args([
            "run",
            "--shape",
            "1,40,40,2,1,8",
            "--na-grid",
            "5,8",
            "--na-kernel",
            "7,3",
        ])
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("kernel_size"));
}

#[test]
fn bench_causal_sweep_writes_interleaved_ratios() {
    let dir = tmp("causal");
    let out = cli()
        .args([
            "bench",
            "--causal-sweep",
            "64,96",
            "--repeat",
            "3",
            "--out-dir",
        ])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(dir.join("causal.json")).unwrap();
    let j: serde_json::Value = serde_json::from_str(&text).unwrap();
    let rows = j["rows"].as_array().unwrap();
    assert!(rows.len() >= 2, "{text}");
    for r in rows {
        let ratio = r["ratio"].as_f64().unwrap();
        assert!(ratio > 0.0 && ratio.is_finite(), "{r}");
        for side in ["full", "causal"] {
            let t = &r[side];
            assert_eq!(t["samples_ms"].as_array().unwrap().len(), 3, "{r}");
            assert!(t["min_ms"].as_f64() <= t["median_ms"].as_f64(), "{r}");
            assert!(t["median_ms"].as_f64() <= t["max_ms"].as_f64(), "{r}");
        }
    }
}

/// `info` names the tuning file; a tuning there is listed and used, `tune --reset` removes it.
#[test]
fn tuning_file_is_shown_and_removable() {
    let dir = tmp("cache");
    std::fs::create_dir_all(&dir).unwrap();
    let info = || {
        let out = cli()
            .arg("info")
            .env("WGPU_ATTENTION_CACHE_DIR", &dir)
            .output()
            .unwrap();
        assert!(out.status.success());
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let text = info();
    let line = text
        .lines()
        .find(|l| l.starts_with("tuning:"))
        .expect(&text);
    assert!(line.contains("none yet"), "{line}");
    let file = line
        .rsplit(' ')
        .next()
        .unwrap()
        .trim_end_matches(')')
        .to_string();
    let tuning = serde_json::json!({
        "adapter": "test", "version": env!("CARGO_PKG_VERSION"),
        "classes": { "tiled-f32-d64-causal-short": {
            "tile": {"wg": 32, "rows": 2}, "kernel": "k", "default_tile": {"wg": 64, "rows": 4},
            "default_ms": 2.0, "best_ms": 1.0, "shape": [1, 1024, 1024, 8, 8, 64] } }
    });
    std::fs::write(&file, tuning.to_string()).unwrap();
    let text = info();
    assert!(
        text.contains("tiled-f32-d64-causal-short: wg32xr2 (2.00x the untuned wg64xr4)"),
        "{text}"
    );
    let out = cli()
        .args(["tune", "--reset"])
        .env("WGPU_ATTENTION_CACHE_DIR", &dir)
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(!std::path::Path::new(&file).exists());
    assert!(info().contains("none yet"));
}

/// `linear`: random inputs for every rule with --check, and from files with every file option
/// (g, beta, initial state in; O and the final state out).
#[test]
fn linear_random_and_from_files() {
    for rule in [
        "linear",
        "retention",
        "simple-gla",
        "gla",
        "delta",
        "gated-delta",
    ] {
        let out = cli()
            .args(["linear", "--shape", "1,70,1,2,12,20", "--rule", rule])
            .args(["--check", "--json", "--repeat", "2"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{rule}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let j = json_of(&out);
        assert_eq!(j["check"]["passed"], true, "{j}");
        assert_eq!(j["check_state"]["passed"], true, "{j}");
        assert!(j["gpu_ms"].as_f64().unwrap() > 0.0 && j["gflops"].as_f64().unwrap() > 0.0);
    }
    let (b, t, h, hv, k, v) = (1u64, 9u64, 1u64, 2u64, 8u64, 4u64);
    let gen = |n: u64, s: f32| (0..n).map(|i| (i as f32 * s).sin()).collect::<Vec<f32>>();
    let p = |x: &PathBuf| x.to_str().unwrap().to_string();
    let (q, kk, vv, g, beta, s0) = (
        tmp("lq.npy"),
        tmp("lk.npy"),
        tmp("lv.npy"),
        tmp("lg.npy"),
        tmp("lbeta.npy"),
        tmp("ls0.npy"),
    );
    write_npy(&q, &[b, t, h, k], &gen(b * t * h * k, 0.31));
    write_npy(&kk, &[b, t, h, k], &gen(b * t * h * k, 0.17));
    write_npy(&vv, &[b, t, hv, v], &gen(b * t * hv * v, 0.53));
    write_npy(&g, &[b, t, hv], &vec![-0.1f32; (b * t * hv) as usize]);
    write_npy(&beta, &[b, t, hv], &vec![0.5f32; (b * t * hv) as usize]);
    // two packed sequences: two initial states
    write_npy(&s0, &[2, hv, k, v], &gen(2 * hv * k * v, 0.05));
    let (o, fin) = (tmp("lo.npy"), tmp("lfin.npy"));
    let out = cli()
        .args(["linear", "--q", &p(&q), "--k", &p(&kk), "--v", &p(&vv)])
        .args([
            "--g",
            &p(&g),
            "--beta",
            &p(&beta),
            "--initial-state",
            &p(&s0),
        ])
        .args([
            "--rule",
            "gated-delta",
            "--qk-l2norm",
            "--cu-seqlens",
            "0,4,9",
        ])
        .args(["--out", &p(&o), "--final-state", &p(&fin), "--check"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("check final state") && text.contains("PASS"),
        "{text}"
    );
    let o = npyz::NpyFile::new(std::fs::File::open(&o).unwrap()).unwrap();
    assert_eq!(o.shape(), &[b, t, hv, v]);
    let fin = npyz::NpyFile::new(std::fs::File::open(&fin).unwrap()).unwrap();
    assert_eq!(fin.shape(), &[2, hv, k, v]);
    // bad input: exit 2 and a message
    for args in [
        vec!["linear", "--shape", "1,8,2,3,8,8"],
        vec!["linear", "--shape", "1,8,1,1,8,8", "--rule", "nope"],
        vec![
            "linear",
            "--shape",
            "1,8,1,1,8,8",
            "--rule",
            "gla",
            "--g",
            "/nonexistent.npy",
        ],
        vec![
            "linear",
            "--shape",
            "1,8,1,1,32,8",
            "--feature-map",
            "taylor",
        ],
        vec!["linear", "--shape", "1,8,1,1,8,8", "--mode", "sideways"],
        vec!["linear", "--shape", "1,8,1,1,8,8", "--cu-seqlens", "0,9"],
        vec!["linear", "--shape", "1,8,1,1,8"],
    ] {
        let out = cli().args(&args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(
            err.contains("error") && !err.contains("panicked"),
            "{args:?}: {err}"
        );
    }
}

/// FlexAttention in WGSL from the command line: a mask_mod with an aux buffer, a dense block
/// mask with a score_mod, each checked against the f64 reference; bad masks and snippets exit 2.
#[test]
fn run_sparse_with_snippets_and_block_masks() {
    use wgpu_attention::sparse::snippet::{EXAMPLES, SCORE_EXAMPLES};
    let doc = tmp("doc.wgsl");
    std::fs::write(&doc, EXAMPLES[1].1).unwrap();
    let ids: Vec<u32> = (0..150u32).map(|i| i / 40).collect();
    let ids_path = tmp("doc_ids.npy");
    write_npy(&ids_path, &[150], &ids);
    let softcap = tmp("softcap.wgsl");
    std::fs::write(&softcap, SCORE_EXAMPLES[0].1).unwrap();
    let blocks = tmp("blocks.npy");
    let on: Vec<u8> = (0..3 * 5).map(|i| u8::from(i % 3 != 1)).collect();
    write_npy(&blocks, &[1, 1, 3, 5], &on);
    let s = |p: &PathBuf| p.to_str().unwrap().to_string();
    let selected_path = tmp("selected.npy");
    let _ = std::fs::remove_file(&selected_path);
    let selected = s(&selected_path);
    for args in [
        vec![
            "--shape",
            "1,150,150,2,1,16",
            "--mask-mod",
            &s(&doc),
            "--aux",
            &s(&ids_path),
            "--block-size",
            "64,32",
        ],
        vec![
            "--shape",
            "1,150,150,2,2,16",
            "--block-mask",
            &s(&blocks),
            "--block-size",
            "64,32",
            "--score-mod",
            &s(&softcap),
            "--causal",
        ],
        vec![
            "--shape",
            "1,150,150,2,1,16",
            "--normalizer",
            "sigmoid:-3",
            "--causal",
        ],
        vec![
            "--shape",
            "1,150,150,2,1,16",
            "--topk-blocks",
            "2",
            "--block-size",
            "32,32",
            "--local-blocks",
            "1",
            "--sink-blocks",
            "1",
            "--causal",
            "--selected",
            &selected,
        ],
    ] {
        let out = cli()
            .arg("run")
            .args(&args)
            .args(["--check", "--json"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let j = json_of(&out);
        assert_eq!(j["check"]["passed"], true, "{j}");
        assert!(j["kernel"].as_str().unwrap().contains("sparse"), "{j}");
    }
    // the routing's choice: [B, Hq, nQ, k + local + sinks] int32
    let npy = std::fs::read(&selected_path).unwrap();
    let header = String::from_utf8_lossy(&npy[..npy.len().min(128)]);
    assert!(
        header.contains("<i4") && header.contains("(1, 2, 5, 4, )"),
        "{header}"
    );
    // a block mask of the wrong shape, a snippet naga refuses, a block size off the grid
    let broken = tmp("broken.wgsl");
    std::fs::write(
        &broken,
        "fn mask_mod(b: u32, h: u32, q_idx: u32, kv_idx: u32) -> bool {\n    return q_idx <= ;\n}",
    )
    .unwrap();
    for (args, says) in [
        (
            vec!["--block-mask", &s(&blocks), "--block-size", "32,32"],
            "[1|1, 2|1, 5, 5]",
        ),
        (vec!["--mask-mod", &s(&broken)], "line 2"),
        (vec!["--block-size", "24,16"], "multiple of 16"),
        (vec!["--normalizer", "sigmoid:x"], "sigmoid:BIAS"),
        (
            vec!["--topk-blocks", "2", "--block-size", "32,64"],
            "one block size",
        ),
        (vec!["--local-blocks", "2"], "--topk-blocks"),
        (
            vec![
                "--topk-blocks",
                "2",
                "--mask-mod",
                &s(&doc),
                "--aux",
                &s(&ids_path),
                "--block-size",
                "64,64",
            ],
            "top-k routing alone",
        ),
        (
            vec!["--normalizer", "sigmoid", "--lse", "/tmp/x.npy"],
            "no LSE",
        ),
    ] {
        let out = cli()
            .args(["run", "--shape", "1,150,150,2,2,16"])
            .args(&args)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(says), "{args:?}: {err}");
    }
}

/// Decode from the CLI: a random cache in each format, then a paged cache from files with new
/// tokens appended, each checked against the reference; bad decode flags exit 2.
#[test]
fn run_decode_random_and_paged_from_files() {
    for (format, splits) in [("q8_0", "auto"), ("q4_0", "3"), ("f32", "1")] {
        let out = cli()
            .args(["run", "--shape", "2,2,300,4,2,64", "--causal"])
            .args([
                "--kv-format",
                format,
                "--kv-splits",
                splits,
                "--check",
                "--json",
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{format}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let j = json_of(&out);
        assert_eq!(j["check"]["passed"], true, "{j}");
        assert!(j["kernel"].as_str().unwrap().starts_with("decode_"), "{j}");
    }
    let (b, pages, page, hkv, hq, d) = (2u64, 6u64, 16u64, 1u64, 2u64, 32u64);
    let gen = |n: u64, s: f32| (0..n).map(|i| (i as f32 * s).sin()).collect::<Vec<f32>>();
    let p = |x: &PathBuf| x.to_str().unwrap().to_string();
    let files = ["dq", "dkc", "dvc", "dbt", "dlens", "dkn", "dvn", "dout"]
        .map(|n| tmp(&format!("{n}.npy")));
    let [q, kc, vc, bt, lens, kn, vn, o] = &files;
    write_npy(q, &[b, 1, hq, d], &gen(b * hq * d, 0.37));
    write_npy(
        kc,
        &[pages, page, hkv, d],
        &gen(pages * page * hkv * d, 0.11),
    );
    write_npy(
        vc,
        &[pages, page, hkv, d],
        &gen(pages * page * hkv * d, 0.23),
    );
    write_npy(bt, &[b, 3], &[5i32, 0, 2, 1, 4, 3]);
    write_npy(lens, &[b], &[15i32, 40]);
    write_npy(kn, &[b, 2, hkv, d], &gen(b * 2 * hkv * d, 0.51));
    write_npy(vn, &[b, 2, hkv, d], &gen(b * 2 * hkv * d, 0.61));
    let out = cli()
        .args([
            "run",
            "--q",
            &p(q),
            "--k-cache",
            &p(kc),
            "--v-cache",
            &p(vc),
        ])
        .args(["--block-table", &p(bt), "--cache-seqlens", &p(lens)])
        .args([
            "--k",
            &p(kn),
            "--v",
            &p(vn),
            "--kv-format",
            "q8_0",
            "--out",
            &p(o),
        ])
        .args(["--check", "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let j = json_of(&out);
    assert_eq!(j["check"]["passed"], true, "{j}");
    assert!(std::fs::metadata(o).unwrap().len() > 0);
    for bad in [
        vec!["--kv-splits", "0"],
        vec!["--kv-format", "q5_1"],
        vec!["--kv-format", "q8_0", "--bias", "x.npy"],
    ] {
        let out = cli()
            .args(["run", "--shape", "1,1,64,2,1,64"])
            .args(&bad)
            .output()
            .unwrap();
        assert_eq!(
            out.status.code(),
            Some(2),
            "{bad:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!out.stderr.is_empty());
    }
}
