#!/usr/bin/env bash
# The main job: the CLI on the default adapter (lavapipe where there is no GPU): adapter info,
# then one causal attention with GQA checked against the f64 reference.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --release --quiet
./target/release/wgpu-attention info
./target/release/wgpu-attention run --shape 1,1000,1000,8,2,64 --causal --seed 7 --check --repeat 3
