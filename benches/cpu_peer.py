#!/usr/bin/env python3
"""Dense attention on the default adapter against numpy's sgemm on the same CPU, interleaved.

Each round times numpy's float32 matmul (wall clock, best of the round's `--reps`: the BLAS's
peak on this machine) and then one `wgpu-attention run` of the dense case (GPU time from
timestamp queries, after the CLI's warm-up), so a slow phase of the VM falls on both. Prints
min / median / max of each and the median of the per-round ratios of GFLOP/s. On a machine
without a GPU the default adapter is lavapipe: this is the "fraction of the CPU's sgemm" that
issue 12 asks about. Not part of the test command; results go to benches/RESULTS.md.

    benches/cpu_peer.py [--rounds 5] [--shape 1,2048,2048,8,8,64] [--n 2048]

numpy comes from PyPI into target/bench-venv when the system python lacks it.
"""
import argparse
import json
import os
import statistics
import subprocess
import time
from pathlib import Path

import bench_venv

ROOT = Path(__file__).resolve().parent.parent


def stats(xs):
    return min(xs), statistics.median(xs), max(xs)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=3, help="numpy matmuls per round (best counts)")
    ap.add_argument("--shape", default="1,2048,2048,8,8,64", help="B,LQ,LK,HQ,HKV,D")
    ap.add_argument("--n", type=int, default=2048, help="sgemm size n x n x n")
    ap.add_argument("--causal", action="store_true")
    args = ap.parse_args()
    bench_venv.ensure("numpy")
    import numpy as np

    exe = ROOT / "target" / "release" / "wgpu-attention"
    if not exe.exists():
        subprocess.run(["cargo", "build", "--release", "--quiet"], cwd=ROOT, check=True)
    env = dict(os.environ)
    if not env.get("DISPLAY") and not env.get("WAYLAND_DISPLAY"):
        env["NODEVICE_SELECT"] = "1"

    n = args.n
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    a @ b  # warm-up: threads, pages
    blas = "unknown"
    try:
        cfg = np.show_config(mode="dicts")
        blas = cfg["Build Dependencies"]["blas"]["name"]
    except Exception:
        pass

    cmd = [str(exe), "run", "--shape", args.shape, "--repeat", "1", "--json"]
    if args.causal:
        cmd.append("--causal")
    sgemm, ours, ratios, adapter, kernel = [], [], [], "", ""
    for r in range(args.rounds):
        best = float("inf")
        for _ in range(args.reps):
            t0 = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t0)
        g_np = 2.0 * n**3 / best / 1e9
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
        j = json.loads(out.stdout)
        adapter, kernel = j["adapter"], j["kernel"]
        sgemm.append(g_np)
        ours.append(j["gflops"])
        ratios.append(j["gflops"] / g_np)
        print(f"round {r + 1}: numpy sgemm {g_np:.1f} GFLOP/s, attention {j['gflops']:.2f} GFLOP/s "
              f"({j['gpu_ms']:.1f} ms), ratio {ratios[-1]:.3f}", flush=True)
    print(f"adapter: {adapter}; kernel: {kernel}; numpy {np.__version__} ({blas}), "
          f"{os.cpu_count()} CPUs")
    print("numpy sgemm %dx%dx%d GFLOP/s  min %.1f median %.1f max %.1f" % (n, n, n, *stats(sgemm)))
    print("attention %s%s GFLOP/s  min %.2f median %.2f max %.2f"
          % (args.shape, " causal" if args.causal else "", *stats(ours)))
    print("attention / sgemm, median of %d per-round ratios: %.3f (min %.3f, max %.3f)"
          % (len(ratios), statistics.median(ratios), min(ratios), max(ratios)))


if __name__ == "__main__":
    main()
