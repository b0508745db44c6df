#!/usr/bin/env bash
# Builds the page's wasm into web/pkg (then serve web/ and open index.html; see README).
#
# Where rustup has the wasm32 target this is a plain `cargo build`. Where it has not (rustup cannot
# download targets on some machines), it uses Debian's rustc-web/cargo-web toolchain, which builds
# std for wasm32 from rust-web-src and links with lld-19. wasm-bindgen-cli is installed at exactly
# the wasm-bindgen version in Cargo.lock (the two must match).
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
TARGET=wasm32-unknown-unknown
export CARGO_TARGET_DIR="$PWD/web/target"

if rustup target list --installed 2>/dev/null | grep -qx "$TARGET"; then
  cargo build -p wgpu-attention-web --target "$TARGET" --profile web --locked
else
  need=()
  for pkg in rustc-web cargo-web rust-web-src lld-19; do
    dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
  done
  if [ ${#need[@]} -gt 0 ]; then
    echo "installing: ${need[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  fi
  # call Debian's toolchain explicitly: rustup's cargo and rustc come first on PATH
  RUSTC=/usr/bin/rustc RUSTDOC=/usr/bin/rustdoc RUSTC_BOOTSTRAP=1 \
    CARGO_TARGET_WASM32_UNKNOWN_UNKNOWN_LINKER=wasm-ld-19 \
    /usr/bin/cargo build -Zbuild-std=std,panic_abort -p wgpu-attention-web \
    --target "$TARGET" --profile web --locked
fi

WBG=$(grep -A1 '^name = "wasm-bindgen"$' Cargo.lock | sed -n 's/^version = "\(.*\)"$/\1/p')
if ! wasm-bindgen --version 2>/dev/null | grep -qx "wasm-bindgen $WBG"; then
  echo "installing wasm-bindgen-cli $WBG (the version in Cargo.lock)"
  cargo install wasm-bindgen-cli --version "$WBG"
fi
wasm-bindgen --target web --no-typescript --out-dir web/pkg \
  "$CARGO_TARGET_DIR/$TARGET/web/wgpu_attention_web.wasm"
ls -l web/pkg
