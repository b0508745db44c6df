#!/usr/bin/env bash
# The test suite: every test on lavapipe, then each family's tests on SwiftShader (Chromium's
# Vulkan driver: subgroup size 4, no f16) so both CPU adapters are covered, beside the wasm
# page's self-test in headless Chromium (WebGPU through Dawn and Tint, on SwiftShader). Prints
# each phase's time at the end.
#
# Tests run under cargo-nextest (.config/nextest.toml: two at a time, each in its own process, a
# test killed after 15 minutes, every failure reported).
#
# Random cases: WGPU_ATTENTION_CASES=N runs N per family (default 12 flash, 16 neighborhood and
# decode, 6 linear, 4 sparse and 4 backward; fresh seeds every run, so the option space is covered across
# runs; the linear cases draw the kernels the fixed tests build: benches/RESULTS.md),
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
# the outer limits catch a hung runner; nextest's own per-test limits catch hung tests
# (README, "Tests": what a cold and a warm run cost).
# Lavapipe compiles each kernel with LLVM at its first dispatch, and with empty caches that is
# most of the suite's time (cold 874 s, the same run warm 180 s): GALLIVM_PERF=nopt skips
# LLVM's optimisation passes, so kernels compile in about 0.6x the time and run slower, and
# the cold suite took 689 s (2026-12-08). The code is the same WGSL through the same driver;
# the benches, the demo and the CLI run lavapipe's optimised code.
# (backward_head_dims runs on SwiftShader instead, below: its kernels compile for over a
# minute cold on lavapipe, and SwiftShader's tests have room beside the browser)
phase "tests on lavapipe" env GALLIVM_PERF=nopt timeout 4500 cargo nextest run --workspace --all-targets \
  -E 'not (binary(=backward) & test(=backward_head_dims))'
# nextest runs no doctests: the crate docs' examples compile here (no GPU needed: no_run)
phase "doc tests" cargo test --doc --quiet
SWIFTSHADER=/usr/lib/chromium/vk_swiftshader_icd.json
if [ ! -e "$SWIFTSHADER" ]; then
  echo "SwiftShader ICD missing at $SWIFTSHADER: install chromium" >&2
  exit 1
fi
sw() { VK_ICD_FILENAMES=$SWIFTSHADER WGPU_ATTENTION_ADAPTER=SwiftShader "$@"; }
# SwiftShader has no disk cache of compiled shaders: every kernel a test builds compiles there
# for seconds, in every run (the whole suite took over 900 s there on 2026-12-02). Lavapipe
# runs the whole suite; here run the tests that cover each family on the paths SwiftShader
# plans differently (subgroups of 4 lanes, no f16, 10 storage buffers per stage), at a
# handful of kernels each. cargo test, not nextest: the tests of one binary share pipelines.
# Linear attention runs its chunk kernels (the browser's variant, without subgroups). Decode
# runs whole: its kernels unroll at most 8 query rows (16 did not compile on SwiftShader in
# 40 s under 8 GB of memory; 2026-12-07).
swiftshader_tests() {
  local rc=0 spec bin
  for spec in \
    "errors" \
    "flash options_combined awkward_lengths" \
    "neighborhood na1d_borders_even_kernels_dilation_stride_causal na_bad_inputs" \
    "linear every_rule_over_awkward_lengths bad_input" \
    "sparse block_masks_compose bad_sparse" \
    "decode" \
    "backward backward_every_option backward_bad_inputs backward_head_dims"; do
    set -- $spec
    bin=$1
    shift
    sw env WGPU_ATTENTION_LINEAR_MODES=chunk timeout 900 cargo test --quiet --test "$bin" -- --test-threads=2 "$@" || rc=1
  done
  return $rc
}
# The SwiftShader tests and the browser (Chromium's WebGPU, on SwiftShader too) each keep about
# one core busy, compiling shaders: they run side by side, the SwiftShader tests' output
# printed when both are done.
mkdir -p target
sw_log=target/swiftshader-tests.log
(
  start=$SECONDS
  rc=0
  swiftshader_tests || rc=$?
  printf '%-44s %4d s (exit status %d)\n' "GPU tests on SwiftShader" $((SECONDS - start)) "$rc"
  exit $rc
) > "$sw_log" 2>&1 &
sw_pid=$!
trap 'kill $sw_pid 2>/dev/null || true' EXIT
side_start=$SECONDS
phase "browser: wasm build" web/build.sh
phase "browser: self-test in headless Chromium" timeout 900 web/test.py --screenshot target/web-screenshot.png
sw_rc=0
wait $sw_pid || sw_rc=$?
trap - EXIT
echo "== GPU tests on SwiftShader (beside the browser)"
cat "$sw_log"
phases+=("$(tail -n 1 "$sw_log")")
phases+=("$(printf '%-44s %4d s' "SwiftShader tests and browser, side by side" $((SECONDS - side_start)))")
echo "== phase times"
printf '%s\n' "${phases[@]}"
if [ "$sw_rc" != 0 ]; then
  echo "the SwiftShader tests failed (exit status $sw_rc): see above" >&2
  exit "$sw_rc"
fi
