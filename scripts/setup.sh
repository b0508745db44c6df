#!/usr/bin/env bash
# Installs what the demo and the tests need on Debian/Ubuntu: a Vulkan loader and Mesa's lavapipe
# (a CPU Vulkan driver, so no GPU is needed), Chromium for its SwiftShader Vulkan driver (a second
# CPU adapter the tests also run on; --browser adds chromedriver for the page's test),
# rustfmt/clippy, and cargo-nextest (the test runner; --tests). Skips what is already there.
set -euo pipefail
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
need=()
for pkg in mesa-vulkan-drivers libvulkan1 ${WGPU_ATTENTION_EXTRA_PKGS:-}; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
for arg in "$@"; do
  case "$arg" in
    --swiftshader) [ -e /usr/lib/chromium/vk_swiftshader_icd.json ] || need+=(chromium) ;;
    # the browser test (web/test.py): headless Chromium driven through chromedriver from python3
    --browser)
      for pkg in chromium chromium-driver python3; do
        dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
      done ;;
    --tests) ;;
    *) echo "setup.sh: unknown option $arg (expected --swiftshader, --browser, --tests)" >&2; exit 2 ;;
  esac
done
if [ ${#need[@]} -gt 0 ]; then
  echo "installing: ${need[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
if command -v rustup >/dev/null 2>&1; then
  rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy rustfmt
fi
for arg in "$@"; do
  if [ "$arg" = --tests ] && ! cargo nextest --version >/dev/null 2>&1; then
    echo "installing cargo-nextest (from crates.io; a few minutes)"
    cargo install --locked cargo-nextest
  fi
done
