#!/usr/bin/env python3
"""Our page's dense kernel against onnxruntime-web's WebGPU MultiHeadAttention, in one headless
Chromium (WebGPU on SwiftShader where there is no GPU), round by round.

For each shape the page (benches/ort_peer.html) uploads one random case to our library, builds an
onnxruntime-web session of a one-node ONNX model (`com.microsoft.MultiHeadAttention`, `num_heads`,
`unidirectional` for causal) on the same inputs, already on its device, and compares both outputs
with onnxruntime's own wasm (CPU) kernel on those inputs: ours must agree to 1e-5, onnxruntime's
WebGPU error is printed (on SwiftShader it is not small: see benches/RESULTS.md). Then each round runs `--n` calls of each library, the order alternating between
rounds, and records:
  - wall time of each call, from the call to the device's queue being done (both libraries);
  - our GPU time (timestamp queries), and with --ort-profile onnxruntime's own kernel GPU time
    from its profiler (off by default: its timestamp writes would slow its wall time; 1.30's
    WebGPU provider delivered no profiling data here, so only wall times compare both).
Prints min / median / max per library and the median of the per-round ratios onnxruntime / ours
(a ratio of 3.0 means ours takes a third of the time). Not part of the test command; results go
to benches/RESULTS.md.

    benches/ort_peer.py [--shapes 1024x8x64,1024x8x64c] [--rounds 5] [--n 3] [--ort-profile]

With --causal-ratio 1024,4096 it times only our kernel instead: causal against non-causal at
B = 1, H = 8, D = 64 and each length, in the same page, the order alternating between rounds,
and prints the median of the per-round ratios of median GPU times (issue 12's browser target);
--causal-tiles 16x8,32x8 adds the causal kernel with those query tiles to the same rounds.

Installs what it needs: onnxruntime-web 1.30 from npm into target/ort-peer, the `onnx` Python
package into target/bench-venv, our page's wasm by web/build.sh where web/pkg is missing.
Needs Debian's chromium and chromium-driver, as web/test.py does.
"""
import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import bench_venv

ROOT = Path(__file__).resolve().parent.parent
PEER = ROOT / "target" / "ort-peer"
ORT_VERSION = "1.30.0"


def ensure_ort():
    pkg = PEER / "node_modules" / "onnxruntime-web" / "package.json"
    if pkg.exists() and json.loads(pkg.read_text())["version"] == ORT_VERSION:
        return
    PEER.mkdir(parents=True, exist_ok=True)
    if not (PEER / "package.json").exists():
        (PEER / "package.json").write_text('{"private": true}\n')
    print(f"installing onnxruntime-web {ORT_VERSION} into {PEER}", flush=True)
    subprocess.run(["npm", "install", "--no-audit", "--no-fund", f"onnxruntime-web@{ORT_VERSION}"],
                   cwd=PEER, check=True, stdout=subprocess.DEVNULL)


def ensure_wasm():
    if not (ROOT / "web" / "pkg" / "wgpu_attention_web_bg.wasm").exists():
        subprocess.run([str(ROOT / "web" / "build.sh")], check=True)


def mha_model(heads, d, causal):
    """A one-node ONNX model: MultiHeadAttention over [B, S, heads*d] query, key and value."""
    import onnx
    from onnx import TensorProto, helper

    hd = heads * d
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["B", length, hd])
          for n, length in (("query", "S"), ("key", "T"), ("value", "T"))]
    out = helper.make_tensor_value_info("output", TensorProto.FLOAT, ["B", "S", hd])
    node = helper.make_node("MultiHeadAttention", ["query", "key", "value"], ["output"],
                            domain="com.microsoft", num_heads=heads, unidirectional=int(causal))
    graph = helper.make_graph([node], "mha", io, [out])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10  # onnxruntime-web 1.30 refuses newer
    path = PEER / f"mha_h{heads}_d{d}_{'causal' if causal else 'full'}.onnx"
    onnx.save(model, str(path))
    return "/" + str(path.relative_to(ROOT))


def load_driver():
    """web/test.py's WebDriver client and Chromium flags (one place for both)."""
    spec = importlib.util.spec_from_file_location("web_test", ROOT / "web" / "test.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def parse_shape(s):
    causal = s.endswith("c")
    l, h, d = (int(x) for x in s.rstrip("c").split("x"))
    return l, h, d, causal


def stats(xs):
    return f"{min(xs):8.2f} {statistics.median(xs):8.2f} {max(xs):8.2f}"


def causal_ratio(call, args):
    """Our causal against our non-causal kernel per length (and the causal kernel with each of
    --causal-tiles), interleaved round by round."""
    results = []
    tiles = [t for t in (args.causal_tiles or "").split(",") if t]
    for l in (int(x) for x in args.causal_ratio.split(",")):
        kernels = {}
        cases = [("full", False, None), ("causal", True, None)]
        cases += [(f"causal {t}", True, [int(x) for x in t.split("x")]) for t in tiles]
        for name, causal, tile in cases:
            cfg = dict(name=name, L=l, H=8, D=64, causal=causal, tile=tile)
            r = call(f"peer.prepareOurs({json.dumps(cfg)})")
            kernels[name] = r["kernel"]
            adapter = r["adapter"]
        print(f"\nB=1 L={l} H=8 D=64 f32 on {adapter.get('name') or '?'} ({adapter.get('backend')}, "
              f"{adapter.get('device_type')}); " + "; ".join(f"{n}: {k}" for n, k in kernels.items()), flush=True)
        for name in kernels:  # warm-up
            call(f"peer.oursGpu('{name}', 1)")
        samples = {name: [] for name in kernels}
        ratios = {name: [] for name in kernels if name != "full"}
        for r in range(args.rounds):
            order = list(kernels) if r % 2 == 0 else list(reversed(kernels))
            med = {}
            for name in order:
                got = call(f"peer.oursGpu('{name}', {args.n})")
                samples[name] += got
                med[name] = statistics.median(got)
            for name in ratios:
                ratios[name].append(med[name] / med["full"])
            print(f"  round {r + 1}: " + ", ".join(f"{n} {med[n]:.1f} ms" for n in kernels) + ": "
                  + ", ".join(f"{ratios[n][-1]:.3f}" for n in ratios), flush=True)
        print("                           min   median      max  (ms, GPU time)")
        for name in kernels:
            print(f"  {name:<20} {stats(samples[name])}")
        for name, rs in ratios.items():
            print(f"  {name} / non-causal, median of per-round ratios: {statistics.median(rs):.3f} "
                  f"(rounds {min(rs):.3f}-{max(rs):.3f})", flush=True)
        results.append(dict(L=l, kernels=kernels, adapter=adapter, samples=samples, ratios=ratios))
    return results


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="1024x8x64,1024x8x64c",
                    help="LxHxD, a trailing c for causal; B = 1, Lq = Lk, f32")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--n", type=int, default=3, help="calls of each library per round")
    ap.add_argument("--ort-profile", action="store_true",
                    help="also onnxruntime's kernel GPU time, from its profiler")
    ap.add_argument("--json", help="write every sample here")
    ap.add_argument("--causal-ratio", help="lengths (comma-separated): only our causal against "
                    "our non-causal kernel, B=1 H=8 D=64")
    ap.add_argument("--causal-tiles", help="with --causal-ratio: also the causal kernel with these "
                    "tiles, WGxROWS comma-separated (e.g. 16x8,32x8)")
    args = ap.parse_args()
    if not args.causal_ratio:
        bench_venv.ensure("onnx")
    ensure_ort()
    ensure_wasm()
    web = load_driver()
    for need in (web.CHROMIUM, shutil.which("chromedriver")):
        if not need or not os.path.exists(need):
            sys.exit("needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)")

    results = []
    with web.Browser(ROOT) as browser:
        driver = browser.open()
        page = browser.url("benches/ort_peer.html")
        driver.s("POST", "/url", {"url": page + ("?profile" if args.ort_profile else "")})
        driver.wait_for("return window.peerReady === true", 120, "the peer page")

        def call(expr):
            r = driver.s("POST", "/execute/async", {"script": (
                "const done = arguments[arguments.length - 1];"
                f"({expr}).then(r => done(JSON.stringify(r)), e => done(JSON.stringify({{error: String(e && e.stack || e)}})))"),
                "args": []})
            r = json.loads(r)
            if isinstance(r, dict) and "error" in r:
                print("browser console:\n" + driver.console())
                sys.exit(f"{expr}: {r['error']}")
            return r

        driver.s("POST", "/timeouts", {"script": 1_800_000})
        if args.causal_ratio:
            results = causal_ratio(call, args)
            if args.json:
                Path(args.json).write_text(json.dumps(results, indent=1))
            return
        for shape in args.shapes.split(","):
            l, h, d, causal = parse_shape(shape)
            model = mha_model(h, d, causal)
            setup = call(f"peer.setup({json.dumps(dict(L=l, H=h, D=d, causal=causal, model=model))})")
            a = setup["adapter"]
            print(f"\nB=1 L={l} H={h} D={d} f32 {'causal' if causal else 'non-causal'} on "
                  f"{a.get('name') or '?'} ({a.get('backend')}, {a.get('device_type')}); ours: {setup['kernel']}\n"
                  f"  max |error| against onnxruntime's own wasm (CPU) kernel on the same inputs: "
                  f"ours {setup['ours_err']:.1e}, onnxruntime WebGPU {setup['ort_webgpu_err']:.1e}", flush=True)
            ours = {"wall_ms": [], "gpu_ms": []}
            theirs = {"wall_ms": [], "gpu_ms": []}
            ratios_wall, ratios_gpu, ratios_mixed = [], [], []
            call(f"peer.ours({args.n})")  # warm-up of both (pipelines, first-run allocations)
            call(f"peer.ort({args.n})")
            for r in range(args.rounds):
                order = [("ours", ours), ("ort", theirs)]
                if r % 2:
                    order.reverse()
                got = {}
                for name, acc in order:
                    got[name] = call(f"peer.{name}({args.n})")
                    for k in ("wall_ms", "gpu_ms"):
                        acc[k] += got[name][k]
                med = {n: {k: statistics.median(v) if v else None for k, v in g.items() if k != "kernels"}
                       for n, g in got.items()}
                ratios_wall.append(med["ort"]["wall_ms"] / med["ours"]["wall_ms"])
                ratios_mixed.append(med["ort"]["wall_ms"] / med["ours"]["gpu_ms"])
                if med["ort"]["gpu_ms"]:
                    ratios_gpu.append(med["ort"]["gpu_ms"] / med["ours"]["gpu_ms"])
                print(f"  round {r + 1}: ours wall {med['ours']['wall_ms']:.2f} ms (GPU "
                      f"{med['ours']['gpu_ms']:.2f}), onnxruntime wall {med['ort']['wall_ms']:.2f} ms"
                      + (f" (GPU {med['ort']['gpu_ms']:.2f})" if med["ort"]["gpu_ms"] else "")
                      + f": {ratios_wall[-1]:.2f}x", flush=True)
            print("                           min   median      max  (ms)")
            print(f"  ours wall            {stats(ours['wall_ms'])}")
            print(f"  ours GPU             {stats(ours['gpu_ms'])}")
            print(f"  onnxruntime wall     {stats(theirs['wall_ms'])}")
            if theirs["gpu_ms"]:
                print(f"  onnxruntime GPU      {stats(theirs['gpu_ms'])}   kernels: {got['ort'].get('kernels')}")
            print(f"  onnxruntime / ours, median of per-round ratios: wall/wall {statistics.median(ratios_wall):.2f}x "
                  f"(rounds {min(ratios_wall):.2f}-{max(ratios_wall):.2f}); their wall / our GPU "
                  f"{statistics.median(ratios_mixed):.2f}x"
                  + (f"; GPU/GPU {statistics.median(ratios_gpu):.2f}x" if ratios_gpu else ""))
            results.append(dict(shape=dict(L=l, H=h, D=d, causal=causal), kernel=setup["kernel"], ours_err=setup["ours_err"],
                                ort_webgpu_err=setup["ort_webgpu_err"],
                                adapter=a, ours=ours, onnxruntime=theirs, ratio_wall=ratios_wall,
                                ratio_gpu=ratios_gpu))
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
