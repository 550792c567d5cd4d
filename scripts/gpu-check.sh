#!/usr/bin/env bash
# The GPU check: on a machine with a GPU and no Rust toolchain, runs the prebuilt binaries of
# gpu-bin/ (scripts/build-gpu-bin.sh makes them: every GPU test binary and the GPU benchmarks)
# and writes one report, ${OUT:-.}/gpu-report.md, with every log packed beside it in
# logs.tar.gz and each benchmark table as gpu-bench*.md (the device returns at most 8 files).
# Every test compares a CUDA kernel (or NCCL) with its CPU twin; the benchmarks time each kernel
# beside a baseline in the same run. Each step gets at most the time left of the issue's 8
# minutes (a step with under 10 s left is not run, and says so), so one hang cannot starve the
# rest; give the device command a limit of about 580 s.
set -uo pipefail
cd "$(dirname "$0")/.."
out_dir="${OUT:-.}"
out="$out_dir/gpu-report.md"
logs=/tmp/gpu-check-logs
bins=/tmp/gpu-bin
rm -rf "$logs" "$bins" && mkdir -p "$logs" "$bins"
# Whatever happens, the report is complete on disk and the logs come back packed.
tee_pid=
trap 'exec 1>&-; [ -n "$tee_pid" ] && wait "$tee_pid"; tar czf "$out_dir/logs.tar.gz" -C "$logs" . 2>/dev/null' EXIT
# build-gpu-bin.sh packs the binaries (the device's carry limit): unpacked outside the checkout.
if [ -f gpu-bin/bins.tar.gz ]; then
    tar xzf gpu-bin/bins.tar.gz -C "$bins" || echo "unpacking gpu-bin/bins.tar.gz failed"
else
    cp gpu-bin/* "$bins"/ 2>/dev/null
fi
# Seconds for all steps: the issue's 8 minutes less what packing the logs takes.
BUDGET=460
# `limited N CMD...`: CMD for at most N seconds, or what is left of the budget when that is less
# (SIGKILL 10 s after SIGTERM); with under 10 s left, CMD is not run (exit status 125).
limited() {
    local t=$1 left=$((BUDGET - SECONDS))
    shift
    [ "$left" -lt "$t" ] && t=$left
    if [ "$t" -lt 10 ]; then
        echo "not run: out of time (at ${SECONDS} s)"
        return 125
    fi
    timeout -k 10 "$t" "$@"
}
# The report is written as it goes (tee), so a cut-short run still shows what it did.
exec > >(tee "$out")
tee_pid=$!
{
    echo "# GPU check"
    echo
    echo "- date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "- GPU: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo 'nvidia-smi not found')"
    echo "- binaries: $(tr '\n' ' ' < gpu-bin/BUILD 2>/dev/null || echo 'no gpu-bin/BUILD stamp')"
    echo "- libraries: $(ldconfig -p 2>/dev/null | grep -oE 'lib(cuda|cublas|cublasLt|nccl)\.so[.0-9]*' | sort -u | tr '\n' ' ')"
    echo
    status=0
    skipped=0
    # Binaries built from other sources than this checkout's test other code: refused, so no
    # report claims what the checkout does not hold.
    if [ ! -f gpu-bin/SOURCES.sha256 ]; then
        echo "UNSTAMPED: gpu-bin/ has no SOURCES.sha256 (build it with scripts/build-gpu-bin.sh)"
        echo
        echo "overall: FAIL (unstamped binaries; nothing run)"
        exit 1
    fi
    # A changed or removed source fails the hashes; a source added since the build is not in them.
    find crates kernels benches Cargo.toml Cargo.lock -type f | sort >"$logs/sources-now.txt"
    sed 's/^[0-9a-f]*  //' gpu-bin/SOURCES.sha256 | sort >"$logs/sources-built.txt"
    if ! sha256sum -c --quiet gpu-bin/SOURCES.sha256 >"$logs/stale.log" 2>&1 ||
        ! comm -23 "$logs/sources-now.txt" "$logs/sources-built.txt" | sed 's/^/new since the build: /' >>"$logs/stale.log" ||
        [ -s "$logs/stale.log" ]; then
        echo "STALE: gpu-bin/ was built from other sources than this checkout (rerun scripts/build-gpu-bin.sh):"
        head -5 "$logs/stale.log"
        echo
        echo "overall: FAIL (stale binaries; nothing run)"
        exit 1
    fi
    tests=$(ls "$bins" 2>/dev/null | grep -v -e '^gpu$' -e '^whale-cli$' -e '^BUILD$' -e '^SOURCES.sha256$')
    [ -n "$tests" ] || { echo "gpu-bin/ is empty: run scripts/build-gpu-bin.sh where Rust is installed"; status=1; }

    # `bench NAME GROUPS SECONDS`: the GPU benchmarks' GROUPS (WHALE_GPU_BENCH_GROUPS) in a
    # process of their own, their table written to $OUT/gpu-bench-NAME.md as they go.
    bench() {
        local table="$out_dir/gpu-bench-$1.md"
        rm -f "$table" # never an earlier run's figures
        echo "### $1 ($2)"
        echo
        if [ ! -x "$bins/gpu" ]; then
            echo "the bench binary gpu is missing"
            status=1
            return
        fi
        WHALE_GPU_BENCH_GROUPS="$2" WHALE_GPU_BENCH_OUT="$table" limited "$3" "$bins/gpu" --bench >"$logs/bench-$1.log" 2>&1
        local rc=$?
        if [ -f "$table" ]; then cat "$table"; else tail -20 "$logs/bench-$1.log"; fi
        echo
        echo "bench exit status: $rc (at ${SECONDS} s)"
        echo
        [ "$rc" -eq 0 ] || status=1
    }
    echo "## benchmarks"
    echo
    # First the figures of kernels a GPU has run before; the never-run ones come after the tests.
    bench main kernels,linear,train_step,grpo_step 200

    # Tests of kernels no GPU run has passed yet run in a process of their own: a fault there (a
    # sticky CUDA error) must not fail every later test of their binary. (The tiled attention
    # backward runs in both attention tests named here.)
    isolated="cuda:the_wgmma_fp8_gemm_matches_the_cpu cuda:attention::attention_backward_matches_the_cpu"
    isolated+=" cuda:attention::attention_kernels_match_the_cpu_on_small_shapes"
    for bin in $tests; do
        echo "## tests: $bin"
        echo
        echo '```'
        # The source-stamp test, the launcher inventory and the host emulation (*_in_emulation,
        # and the emulated driver's own test) read the sources at their build-time path: CPU CI
        # runs them (and build-gpu-bin.sh the stamp).
        skips=(--skip the_embedded_ptx_was_built_from_the_current_sources --skip in_emulation
            --skip the_emulated_driver_catches --skip every_kernel_has_a_launcher)
        alone=()
        for entry in $isolated; do
            if [ "${entry%%:*}" = "$bin" ]; then skips+=(--skip "${entry#*:}"); alone+=("${entry#*:}"); fi
        done
        limited 90 "$bins/$bin" --test-threads=1 --show-output "${skips[@]}" >"$logs/test-$bin.log" 2>&1
        rc=$?
        for t in ${alone[@]+"${alone[@]}"}; do
            limited 60 "$bins/$bin" --exact "$t" --show-output >>"$logs/test-$bin.log" 2>&1
            r=$?
            [ "$r" -eq 0 ] || rc=$r
        done
        grep -E "^test |test result|panicked|not run: out of time" "$logs/test-$bin.log" | tail -40
        # A GPU-less run says so in each test's output (shown by --show-output).
        n=$(grep -c -e "skipped" -e "stands in" "$logs/test-$bin.log")
        if [ "$n" -gt 0 ]; then
            skipped=1
            echo "$n messages of tests without a GPU, e.g.: $(grep -m 1 -e "skipped" -e "stands in" "$logs/test-$bin.log")"
        fi
        echo "exit status: $rc (at ${SECONDS} s)"
        [ "$rc" -eq 0 ] || status=1
        echo '```'
        echo
    done

    echo "## benchmarks of the opt-in kernels (each in its own process)"
    echo
    bench tiled_backward tiled_backward 45
    bench wgmma wgmma 45
    bench opt_in_step opt_in_step 60

    echo "## whale pretrain (tiny preset, 30 steps: fp32 on both devices, bf16 and fp8 + bf16 moments on the GPU), generate, r1-zero"
    echo
    echo '```'
    if [ -x "$bins/whale-cli" ]; then
        for run in cuda:fp32 cpu:fp32 cuda:bf16 cuda:fp8; do
            dev=${run%%:*} precision=${run##*:} name=${run/:/-}
            # The FP8 run takes DeepSeek-V3's whole recipe: bf16 AdamW moments too.
            moments=fp32; [ "$precision" = fp8 ] && moments=bf16
            rm -rf "/tmp/gpu-check-$name"
            limited 60 "$bins/whale-cli" pretrain --device "$dev" --precision "$precision" --moments "$moments" \
                --out "/tmp/gpu-check-$name" --steps 30 --eval-problems 16 --k 2 >"$logs/pretrain-$name.log" 2>&1
            rc=$?
            echo "$name: exit status $rc (at ${SECONDS} s); $(grep -E 'trained in|^\| base|not run' "$logs/pretrain-$name.log" | tr '\n' ' ')"
            echo "$name: last step $(tail -1 "/tmp/gpu-check-$name/metrics.jsonl" 2>/dev/null)"
            [ "$rc" -eq 0 ] || { status=1; grep -m 1 -A 3 -E "^Error|panicked" "$logs/pretrain-$name.log"; }
        done
        echo
        echo "generate, greedy, from the cuda-fp32 checkpoint:"
        for dev in cuda cpu; do
            limited 30 "$bins/whale-cli" generate --checkpoint /tmp/gpu-check-cuda-fp32/checkpoint --prompt "12+7=" \
                --max-new-tokens 24 --greedy --device "$dev" >"$logs/generate-$dev.out" 2>"$logs/generate-$dev.log"
            rc=$?
            echo "$dev: exit status $rc; $(head -1 "$logs/generate-$dev.out"); $(grep -o '[0-9.]* tokens/s' "$logs/generate-$dev.log")"
            [ "$rc" -eq 0 ] || { status=1; grep -m 1 -A 3 -E "^Error|panicked" "$logs/generate-$dev.log"; }
        done
        echo
        echo "r1-zero (GRPO, 3 steps) from the cuda-fp32 checkpoint on the GPU:"
        rm -rf /tmp/gpu-check-r1-zero
        limited 90 "$bins/whale-cli" r1-zero --base /tmp/gpu-check-cuda-fp32/checkpoint --device cuda \
            --out /tmp/gpu-check-r1-zero --steps 3 --prompts-per-step 4 --group-size 4 --eval-every 0 \
            --eval-problems 16 --k 2 >"$logs/r1-zero.log" 2>&1
        rc=$?
        echo "exit status $rc; $(grep -E 's/step|pass@1 |not run' "$logs/r1-zero.log" | tr '\n' ' ')"
        echo "last step: $(tail -1 /tmp/gpu-check-r1-zero/metrics.jsonl 2>/dev/null | cut -c1-400)"
        [ "$rc" -eq 0 ] || { status=1; grep -m 1 -A 3 -E "^Error|panicked" "$logs/r1-zero.log"; }
    else
        echo "the CLI binary whale-cli is missing"
        status=1
    fi
    echo '```'
    echo
    if [ $status -ne 0 ]; then
        echo "overall: FAIL"
    elif [ $skipped -ne 0 ]; then
        echo "overall: SKIPPED (some tests found no GPU: see above)"
    else
        echo "overall: PASS"
    fi
    # The issue's budget for the whole check on one H200 is 8 minutes.
    echo "elapsed: ${SECONDS} s"
}
