#!/usr/bin/env bash
# Builds the GPU test binaries here (the GPU machine has no Rust toolchain) into gpu-bin/ (git-
# ignored), stripped, for `scripts/gpu-check.sh`; carry gpu-bin to the GPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf gpu-bin && mkdir -p gpu-bin
copy() { # copy NAME: the newest test binary cargo printed for it
    local path
    path=$(grep -o "\"executable\":\"[^\"]*\"" "$2" | sed 's/"executable":"//; s/"$//' | grep "/$1-" | tail -1)
    [ -n "$path" ] || { echo "no binary for $1" >&2; exit 1; }
    cp "$path" "gpu-bin/$1" && strip "gpu-bin/$1"
}
cargo test --release --no-run -p whale-kernels --test cuda --message-format=json > target/gpu-bin-kernels.json
copy cuda target/gpu-bin-kernels.json
cargo test --release --no-run -p whale-parallel --features cuda --test nccl --message-format=json > target/gpu-bin-nccl.json
copy nccl target/gpu-bin-nccl.json
ls -la gpu-bin
