#!/usr/bin/env bash
# Builds the GPU test and bench binaries here (the GPU machine has no Rust toolchain) into
# gpu-bin/ (git-ignored), stripped and packed, for `scripts/gpu-check.sh`; carry gpu-bin to the GPU
# machine.
set -euo pipefail
cd "$(dirname "$0")/.."
# Built into gpu-bin.new and swapped in at the end: a failed build keeps the last good set.
rm -rf gpu-bin.new && mkdir -p gpu-bin.new target
# The sources the binaries are built from (tracked or new, not ignored), hashed before the build
# and checked again after it: a file edited meanwhile would make the stamp lie.
sources() { git ls-files -z -co --exclude-standard crates kernels benches Cargo.toml Cargo.lock | xargs -0 sha256sum; }
sources > target/gpu-bin-sources.sha256
copy() { # copy NAME JSON: the newest binary cargo printed for target NAME
    local path
    path=$(grep -o "\"executable\":\"[^\"]*\"" "$2" | sed 's/"executable":"//; s/"$//' | grep -E "/$1(-[0-9a-f]+)?$" | tail -1)
    [ -n "$path" ] || { echo "no binary for $1" >&2; exit 1; }
    cp "$path" "gpu-bin.new/$1" && strip "gpu-bin.new/$1"
}
cargo test --release --no-run -p whale-kernels --test cuda --locked --message-format=json-render-diagnostics > target/gpu-bin-cuda.json
copy cuda target/gpu-bin-cuda.json
cargo test --release --no-run -p whale-tensor --test cuda_ops --locked --message-format=json-render-diagnostics > target/gpu-bin-cuda_ops.json
copy cuda_ops target/gpu-bin-cuda_ops.json
for t in cuda_model cuda_opt_in; do
    cargo test --release --no-run -p whale-model --test "$t" --locked --message-format=json-render-diagnostics > "target/gpu-bin-$t.json"
    copy "$t" "target/gpu-bin-$t.json"
done
cargo test --release --no-run -p whale-rl --test cuda_rl --locked --message-format=json-render-diagnostics > target/gpu-bin-cuda_rl.json
copy cuda_rl target/gpu-bin-cuda_rl.json
cargo test --release --no-run -p whale-parallel --features cuda --test nccl --locked --message-format=json-render-diagnostics > target/gpu-bin-nccl.json
copy nccl target/gpu-bin-nccl.json
cargo bench --no-run -p whale-benches --bench gpu --locked --message-format=json-render-diagnostics > target/gpu-bin-bench.json
copy gpu target/gpu-bin-bench.json
# The CLI, for end-to-end runs on the GPU (pretraining beside the same run on the CPU, R1-Zero).
cargo build --release -p whale --locked --message-format=json-render-diagnostics > target/gpu-bin-cli.json
copy whale target/gpu-bin-cli.json
mv gpu-bin.new/whale gpu-bin.new/whale-cli
# The embedded PTX must be the current kernels' (the GPU machine cannot check: it has no sources
# at the build-time path).
gpu-bin.new/cuda --exact the_embedded_ptx_was_built_from_the_current_sources | tee target/gpu-bin-stamp.log
grep -q "1 passed" target/gpu-bin-stamp.log || { echo "the PTX stamp test did not run" >&2; exit 1; }
ls -la gpu-bin.new
# Packed: gzip takes the binaries to under a third of their size, which keeps the checkout plus
# gpu-bin under the device's 64 MiB carry limit. gpu-check.sh unpacks them.
tar czf target/gpu-bin.tar.gz -C gpu-bin.new .
rm -f gpu-bin.new/* && mv target/gpu-bin.tar.gz gpu-bin.new/bins.tar.gz
# What they were built from: gpu-check.sh prints the stamp and refuses binaries older than the
# checkout it runs in (any source file changed since).
{
    dirty=$(git status --porcelain -- crates kernels benches Cargo.toml Cargo.lock)
    echo "commit $(git rev-parse HEAD)${dirty:+ (with uncommitted or untracked changes)}"
    echo "built $(date -u +%Y-%m-%dT%H:%M:%SZ)"
} > gpu-bin.new/BUILD
sources > gpu-bin.new/SOURCES.sha256
cmp -s target/gpu-bin-sources.sha256 gpu-bin.new/SOURCES.sha256 || {
    echo "sources changed during the build: run it again" >&2
    rm -rf gpu-bin.new
    exit 1
}
rm -rf gpu-bin && mv gpu-bin.new gpu-bin
ls -la gpu-bin
# The device carries the checkout (tracked and untracked files git does not ignore) and gpu-bin
# in 64 MiB.
kib=$(( $(git ls-files -z -co --exclude-standard | du -ck --files0-from=- 2>/dev/null | tail -1 | cut -f1) + $(du -sk gpu-bin | cut -f1) ))
echo "carry: about $((kib / 1024)) MiB of 64"
[ "$kib" -lt $((60 * 1024)) ] || { echo "over 60 MiB: the device would refuse it" >&2; exit 1; }
echo "Before the device run: bash scripts/gpu-check.sh --verify; then run with carry [\"gpu-bin\"] and"
echo "timeout_s of the budget plus 60 (default GPU_CHECK_BUDGET=360: 420): OUT=\$OUT bash scripts/gpu-check.sh"
