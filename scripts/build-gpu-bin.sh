#!/usr/bin/env bash
# Builds the GPU test and bench binaries here (the GPU machine has no Rust toolchain) into
# gpu-bin/ (git-ignored), stripped and packed, for `scripts/gpu-check.sh`; carry gpu-bin to the GPU
# machine.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf gpu-bin && mkdir -p gpu-bin target
# The sources the binaries are built from (tracked or new, not ignored), hashed before the build
# and checked again after it: a file edited meanwhile would make the stamp lie.
sources() { git ls-files -z -co --exclude-standard crates kernels benches Cargo.toml Cargo.lock | xargs -0 sha256sum; }
sources > target/gpu-bin-sources.sha256
copy() { # copy NAME JSON: the newest binary cargo printed for target NAME
    local path
    path=$(grep -o "\"executable\":\"[^\"]*\"" "$2" | sed 's/"executable":"//; s/"$//' | grep -E "/$1(-[0-9a-f]+)?$" | tail -1)
    [ -n "$path" ] || { echo "no binary for $1" >&2; exit 1; }
    cp "$path" "gpu-bin/$1" && strip "gpu-bin/$1"
}
cargo test --release --no-run -p whale-kernels --test cuda --message-format=json > target/gpu-bin-cuda.json
copy cuda target/gpu-bin-cuda.json
cargo test --release --no-run -p whale-tensor --test cuda_ops --message-format=json > target/gpu-bin-cuda_ops.json
copy cuda_ops target/gpu-bin-cuda_ops.json
for t in cuda_model cuda_opt_in; do
    cargo test --release --no-run -p whale-model --test "$t" --message-format=json > "target/gpu-bin-$t.json"
    copy "$t" "target/gpu-bin-$t.json"
done
cargo test --release --no-run -p whale-rl --test cuda_rl --message-format=json > target/gpu-bin-cuda_rl.json
copy cuda_rl target/gpu-bin-cuda_rl.json
cargo test --release --no-run -p whale-parallel --features cuda --test nccl --message-format=json > target/gpu-bin-nccl.json
copy nccl target/gpu-bin-nccl.json
cargo bench --no-run -p whale-benches --bench gpu --message-format=json > target/gpu-bin-bench.json
copy gpu target/gpu-bin-bench.json
# The CLI, for end-to-end runs on the GPU (pretraining beside the same run on the CPU, R1-Zero).
cargo build --release -p whale --message-format=json > target/gpu-bin-cli.json
copy whale target/gpu-bin-cli.json
mv gpu-bin/whale gpu-bin/whale-cli
# The embedded PTX must be the current kernels' (the GPU machine cannot check: it has no sources
# at the build-time path).
gpu-bin/cuda --exact the_embedded_ptx_was_built_from_the_current_sources | tee target/gpu-bin-stamp.log
grep -q "1 passed" target/gpu-bin-stamp.log || { echo "the PTX stamp test did not run" >&2; exit 1; }
ls -la gpu-bin
# Packed: gzip takes the binaries to under a third of their size, which keeps the checkout plus
# gpu-bin under the device's 64 MiB carry limit. gpu-check.sh unpacks them.
tar czf target/gpu-bin.tar.gz -C gpu-bin .
rm -f gpu-bin/* && mv target/gpu-bin.tar.gz gpu-bin/bins.tar.gz
# What they were built from: gpu-check.sh prints the stamp and refuses binaries older than the
# checkout it runs in (any source file changed since).
{
    echo "commit $(git rev-parse HEAD)$(git diff --quiet HEAD -- crates kernels benches Cargo.lock || echo ' (with uncommitted changes)')"
    echo "built $(date -u +%Y-%m-%dT%H:%M:%SZ)"
} > gpu-bin/BUILD
sources > gpu-bin/SOURCES.sha256
cmp -s target/gpu-bin-sources.sha256 gpu-bin/SOURCES.sha256 || {
    echo "sources changed during the build: run it again" >&2
    rm -rf gpu-bin
    exit 1
}
ls -la gpu-bin
