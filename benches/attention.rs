//! `cargo bench`: the same sweep as `wgpu-attention bench`, with the same warm-up and rounds
//! (`bench::WARMUP`, `bench::ROUNDS`): flash attention, the naive kernel and the matmul baseline
//! interleaved round by round, GPU time from timestamp queries, min/median/max and the medians of
//! the per-round ratios.
//! `cargo bench --bench attention -- --quick` runs the short registry (a bare `-- --quick`
//! reaches the library's test harness too, which refuses it); results also go to `bench-out/`.

fn main() {
    // `cargo test --all-targets` also runs this binary, without `--bench`: nothing to measure
    // then. `--list` is a test runner (nextest) asking for tests: there are none.
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    if !std::env::args().any(|a| a == "--bench") {
        println!("attention bench: run it with `cargo bench`");
        return;
    }
    let quick = std::env::args().any(|a| a == "--quick");
    let ctx = match wgpu_attention::GpuContext::new() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("bench needs an adapter: {e}");
            std::process::exit(1);
        }
    };
    println!("adapter: {}", ctx.describe());
    let rows =
        wgpu_attention::bench::sweep(&ctx, quick, wgpu_attention::bench::ROUNDS, true, |m| {
            eprintln!("measuring {m}")
        });
    match rows {
        Ok(rows) => {
            println!("{}", wgpu_attention::bench::table(&rows));
            let json = serde_json::json!({ "adapter": ctx.describe(), "rows": rows });
            let _ = std::fs::create_dir_all("bench-out");
            if let Err(e) = std::fs::write("bench-out/cargo-bench.json", json.to_string()) {
                eprintln!("could not write bench-out/cargo-bench.json: {e}");
            }
        }
        Err(e) => {
            eprintln!("bench failed: {e}");
            std::process::exit(1);
        }
    }
}
