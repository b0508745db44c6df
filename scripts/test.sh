#!/usr/bin/env bash
# The test suite: every test on lavapipe, then the GPU tests again on SwiftShader (Chromium's
# Vulkan driver: subgroup size 4, no f16) so both CPU adapters are covered, then the wasm page's
# self-test in headless Chromium (WebGPU through Dawn and Tint, on SwiftShader).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --swiftshader --browser
cargo build --workspace --all-targets --quiet
echo "== tests on lavapipe"
# a slow phase of this VM took the suite from 590 s to 811 s: the limit catches hangs, not speed
timeout 1500 cargo test --workspace --all-targets -- --test-threads=2
SWIFTSHADER=/usr/lib/chromium/vk_swiftshader_icd.json
if [ -e "$SWIFTSHADER" ]; then
  echo "== GPU tests on SwiftShader"
  VK_ICD_FILENAMES=$SWIFTSHADER WGPU_ATTENTION_ADAPTER=SwiftShader timeout 600 cargo test --test flash --test errors --test neighborhood -- --test-threads=2
else
  echo "SwiftShader ICD missing at $SWIFTSHADER: install chromium" >&2
  exit 1
fi
echo "== browser: wasm build, then the page's self-test in headless Chromium"
web/build.sh
timeout 900 web/test.py --screenshot target/web-screenshot.png
