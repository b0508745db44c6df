#!/usr/bin/env bash
# The test suite: every test on lavapipe, then the GPU tests again on SwiftShader (Chromium's
# Vulkan driver: subgroup size 4, no f16) so both CPU adapters are covered, then the wasm page's
# self-test in headless Chromium (WebGPU through Dawn and Tint, on SwiftShader). Prints each
# phase's time at the end.
#
# Tests run under cargo-nextest (.config/nextest.toml: two at a time, each in its own process, a
# test killed after 5 minutes, every failure reported).
#
# Random cases: WGPU_ATTENTION_CASES=N runs N per family (default 24 flash, 16 neighborhood),
# WGPU_ATTENTION_SEED=S replays the case a failure printed; WGPU_ATTENTION_CASES=500 is the
# thorough run.
set -euo pipefail
cd "$(dirname "$0")/.."
# no display here: Mesa's device-select Vulkan layer would only probe Wayland and print errors
if [ -z "${DISPLAY:-}${WAYLAND_DISPLAY:-}" ]; then export NODEVICE_SELECT=1; fi
phases=()
phase() { # name, command...
  local name=$1 start=$SECONDS
  shift
  echo "== $name"
  "$@"
  phases+=("$(printf '%-44s %4d s' "$name" $((SECONDS - start)))")
}
phase "setup" scripts/setup.sh --swiftshader --browser --tests
phase "build" cargo build --workspace --all-targets --quiet
# the outer limits catch a hung runner; nextest's own per-test limits catch hung tests. They
# are far above the 10-minute budget: on 2026-12-02 a run with a cold Mesa cache took 994 s on
# lavapipe and over 900 s on SwiftShader (the budget's figures came from a warm machine)
phase "tests on lavapipe" timeout 2400 cargo nextest run --workspace --all-targets
SWIFTSHADER=/usr/lib/chromium/vk_swiftshader_icd.json
if [ ! -e "$SWIFTSHADER" ]; then
  echo "SwiftShader ICD missing at $SWIFTSHADER: install chromium" >&2
  exit 1
fi
sw() { VK_ICD_FILENAMES=$SWIFTSHADER WGPU_ATTENTION_ADAPTER=SwiftShader "$@"; }
# cargo test here, not nextest: SwiftShader has no disk cache of compiled shaders, so the
# pipelines one test binary shares between its tests are worth more than a process per test
# (measured: 147 s against 187 s under nextest). Half the random cases of the lavapipe run:
# each new specialization compiles for seconds there, and lavapipe already ran the full count.
# Linear attention runs only its chunk kernels here (the browser's variant, without subgroups):
# lavapipe ran every case through the recurrent kernel too. Sparse attention runs its plain
# geometry here (block masks on both strategies); each WGSL snippet is a kernel of its own that
# SwiftShader would compile for seconds, so the snippet and random sparse tests run on lavapipe.
phase "GPU tests on SwiftShader" sw env WGPU_ATTENTION_CASES="${WGPU_ATTENTION_CASES:-12}" WGPU_ATTENTION_LINEAR_MODES=chunk timeout 2400 cargo test --test flash --test errors --test neighborhood --test linear --test sparse -- --test-threads=2 --skip _snippets_through_the_kernel --skip snippets_equal_the_built_ins --skip random_sparse_cases
phase "browser: wasm build" web/build.sh
phase "browser: self-test in headless Chromium" timeout 900 web/test.py --screenshot target/web-screenshot.png
echo "== phase times"
printf '%s\n' "${phases[@]}"
