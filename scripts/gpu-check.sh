#!/usr/bin/env bash
# The GPU check: on a machine with a GPU and no Rust toolchain, runs the prebuilt binaries of
# gpu-bin/ (scripts/build-gpu-bin.sh makes them: every GPU test binary and the GPU benchmarks)
# and writes one report, ${OUT:-.}/gpu-report.md, with every log packed beside it in
# logs.tar.gz (re-packed after each step) and each benchmark table as gpu-bench-*.md (the device
# returns at most 8 files). Every test compares a CUDA kernel (or NCCL) with its CPU twin; the
# benchmarks time each kernel beside a baseline measured in the same process.
#
# Steps, most important first, so a run cut short still holds the key results:
#   new       a warm-up test that pays the driver's one-time PTX compilation (cached for the
#             rest), then the tests of kernels changed since the last GPU run that passed
#             (`isolated` below), each in a process of its own (a sticky CUDA fault stays there)
#   opt_in    cuda_opt_in: the model trained on the opt-in wgmma FP8 GEMM against the CPU
#   tests     the other test binaries: cuda_model, cuda_ops, cuda, cuda_rl, nccl; a binary that
#             runs no test fails
#   kernels   benchmarks: the kernels with cuBLAS (and the simple kernels) beside them
#   steps     benchmarks: FP8 linear, training steps (small preset: default kernels, the simple
#             attention backward, the opt-in wgmma GEMM), GRPO
#   cli       whale pretrain / generate / r1-zero on the GPU, checked against the same runs on
#             the CPU (losses of the first steps, greedy decoding)
#   profile   each kernel's GPU time in the first 5200 launches of a small-preset training run
#             (its setup and about its first step; fp32 and bf16, or the precisions of
#             GPU_CHECK_PROFILE), under Nsight Compute, beside the steps' wall time without it:
#             a report, not a check (its failure fails nothing)
# GPU_CHECK_ONLY=new,kernels runs only those steps (a rerun of what failed or was cut short);
# GPU_CHECK_BUDGET (seconds, default 360) bounds them all: each step gets at most its own cap
# and what is left, and one with under 10 s left is reported as not run, so one hang cannot
# starve the rest. Give the device command a limit of the budget plus 60 s.
#
# `bash scripts/gpu-check.sh --verify` only checks that gpu-bin/ was built from this checkout's
# sources: run it here before carrying gpu-bin/ to a GPU (the check there refuses stale binaries
# too, but a refused run costs a machine start).
set -uo pipefail
cd "$(dirname "$0")/.."

# Binaries built from other sources than this checkout's test other code: refused, so no
# report claims what the checkout does not hold. Prints why and fails, or succeeds silently.
verify_stamp() {
    local logs=$1
    if [ ! -f gpu-bin/SOURCES.sha256 ]; then
        echo "UNSTAMPED: gpu-bin/ has no SOURCES.sha256 (build it with scripts/build-gpu-bin.sh)"
        return 1
    fi
    # A changed or removed source fails the hashes; a source added since the build is not in them.
    # The sources are what git tracks or would (the build's list); without .git (the GPU machine's
    # copy holds just those files), every file.
    if [ -d .git ]; then
        git ls-files -co --exclude-standard -- crates kernels benches Cargo.toml Cargo.lock | sort >"$logs/sources-now.txt"
    else
        find crates kernels benches Cargo.toml Cargo.lock -type f | sort >"$logs/sources-now.txt"
    fi
    sed 's/^[0-9a-f]*  //' gpu-bin/SOURCES.sha256 | sort >"$logs/sources-built.txt"
    if ! sha256sum -c --quiet gpu-bin/SOURCES.sha256 >"$logs/stale.log" 2>&1 ||
        ! comm -23 "$logs/sources-now.txt" "$logs/sources-built.txt" | sed 's/^/new since the build: /' >>"$logs/stale.log" ||
        [ -s "$logs/stale.log" ]; then
        echo "STALE: gpu-bin/ was built from other sources than this checkout (rerun scripts/build-gpu-bin.sh):"
        head -5 "$logs/stale.log"
        return 1
    fi
}

if [ "${1:-}" = "--verify" ]; then
    tmp=$(mktemp -d)
    verify_stamp "$tmp" && echo "gpu-bin/ matches this checkout: $(tr '\n' ' ' < gpu-bin/BUILD)"
    rc=$?
    rm -rf "$tmp"
    exit $rc
fi

out_dir="${OUT:-.}"
out="$out_dir/gpu-report.md"
logs=/tmp/gpu-check-logs
bins=/tmp/gpu-bin
rm -rf "$logs" "$bins" && mkdir -p "$logs" "$bins"
pack_logs() { tar czf "$out_dir/logs.tar.gz" -C "$logs" . 2>/dev/null; }
# Whatever happens, the report is complete on disk and the logs come back packed.
tee_pid=
trap 'exec 1>&-; [ -n "$tee_pid" ] && wait "$tee_pid"; pack_logs' EXIT
BUDGET=${GPU_CHECK_BUDGET:-360}
# The driver compiles the PTX once per process unless its cache keeps the result: one cache,
# large enough for every module, so only the first process pays.
export CUDA_CACHE_PATH=/tmp/gpu-check-jit-cache CUDA_CACHE_MAXSIZE=4294967296
ONLY=",${GPU_CHECK_ONLY:-new,opt_in,tests,kernels,steps,cli,profile},"
wanted() { [[ "$ONLY" == *",$1,"* ]]; }
# `limited N CMD...`: CMD for at most N seconds, or what is left of the budget when that is less
# (SIGKILL 10 s after SIGTERM); with under 10 s left, CMD is not run (exit status 125).
# `budget_bound` says which limit applied: a step killed at its own cap hung (a failure), one
# cut by the budget ran out of time.
budget_bound=0
limited() {
    local t=$1 left=$((BUDGET - SECONDS))
    shift
    budget_bound=0
    if [ "$left" -lt "$t" ]; then
        t=$left
        budget_bound=1
    fi
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
    gpu_name=$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null)
    echo "- GPU: ${gpu_name:-nvidia-smi found none}"
    echo "- binaries: $(tr '\n' ' ' < gpu-bin/BUILD 2>/dev/null || echo 'no gpu-bin/BUILD stamp')"
    echo "- libraries: $(ldconfig -p 2>/dev/null | grep -oE 'lib(cuda|cublas|cublasLt|nccl)\.so[.0-9]*' | sort -u | tr '\n' ' ')"
    echo "- steps: ${ONLY//,/ }; budget ${BUDGET} s"
    echo
    if ! verify_stamp "$logs"; then
        echo
        echo "overall: FAIL (nothing run)"
        exit 1
    fi
    # build-gpu-bin.sh packs the binaries (the device's carry limit): unpacked outside the checkout.
    if ! tar xzf gpu-bin/bins.tar.gz -C "$bins"; then
        echo "unpacking gpu-bin/bins.tar.gz failed"
        echo
        echo "overall: FAIL (nothing run)"
        exit 1
    fi
    status=0     # a failure
    skipped=0    # a test that found no GPU
    incomplete=0 # a step cut short or not run for time
    # A step's exit status: 0; out of time (125: not run; 124/137: killed when the budget, not
    # the step's own cap, was the limit); or a failure (a hang past its cap included).
    judge() {
        case $1 in
        0) ;;
        125) incomplete=1 ;;
        124 | 137) if [ "$budget_bound" -eq 1 ]; then incomplete=1; else echo "(killed at its own time cap: a hang?)"; status=1; fi ;;
        *) status=1 ;;
        esac
    }
    # Every binary build-gpu-bin.sh makes: one missing is a failure, not a shorter report.
    for b in cuda cuda_ops cuda_model cuda_opt_in cuda_rl nccl gpu whale-cli; do
        [ -x "$bins/$b" ] || { echo "MISSING: the binary $b is not in gpu-bin/bins.tar.gz"; status=1; }
    done
    # The source-stamp test, the launcher inventory and the host emulation (*_in_emulation, and
    # the emulated driver's own test) read the sources at their build-time path: CPU CI runs
    # them (and build-gpu-bin.sh the stamp). Skipped by their full names (`--exact`), so no GPU
    # test whose name merely contains one of them is skipped too.
    host_only=(--exact)
    for t in the_embedded_ptx_was_built_from_the_current_sources every_kernel_has_a_launcher \
        the_emulated_driver_catches_overruns_and_stray_pointers the_gpu_tests_pass_on_the_emulated_driver_in_emulation \
        the_model_on_the_emulated_driver_in_emulation the_opt_in_kernels_train_on_the_emulated_driver_in_emulation \
        the_rl_gpu_tests_pass_on_the_emulated_driver_in_emulation the_ops_run_on_the_emulated_driver_in_emulation; do
        host_only+=(--skip "$t")
    done
    # Tests run one at a time, apart: those of kernels changed since the last GPU run that passed
    # (scripts/reports/). None has changed since the third run of 2026-12-04; the last to change,
    # the RMSNorm weight gradient's row groups, stays here.
    isolated=(cuda:backward_kernels_match_the_cpu)
    # Whether a test log shows a test that found no GPU (each says so: --show-output).
    note_skips() {
        local n
        n=$(grep -c -e "skipped" -e "stands in" "$1")
        if [ "$n" -gt 0 ]; then
            skipped=1
            echo "$n messages of tests without a GPU, e.g.: $(grep -m 1 -e "skipped" -e "stands in" "$1")"
        fi
    }
    # `test_step TITLE LOG CAP EXPECT CMD...`: a test run (CMD, for at most CAP seconds, its
    # output in LOG) as a section of the report: its results, skip messages and exit status.
    # With EXPECT (an ERE), a run whose log does not match it ran no test and fails: a binary
    # built without its feature, or a filter matching nothing, passes with "0 passed".
    test_step() {
        local title=$1 log=$2 cap=$3 expect=$4
        shift 4
        echo "## $title"
        echo
        echo '```'
        limited "$cap" "$@" >>"$log" 2>&1
        local rc=$?
        # (and the wgmma GEMM's measured error against its bound: the hardware's accumulator)
        grep -E "^test |test result|panicked|not run: out of time|^fp8 gemm Wgmma" "$log" | tail -40
        note_skips "$log"
        if [ "$rc" -eq 0 ] && [ -n "$expect" ] && ! grep -qE "$expect" "$log"; then
            echo "NO TESTS RAN: $title"
            rc=1
        fi
        echo "exit status: $rc (at ${SECONDS} s)"
        echo '```'
        echo
        judge $rc
        pack_logs
    }
    # `run_tests BIN CAP [ARGS...]`: a test binary, its summary in the report.
    run_tests() {
        local bin=$1 cap=$2
        shift 2
        test_step "tests: $bin" "$logs/test-$bin.log" "$cap" "test result: ok. [1-9][0-9]* passed" \
            "$bins/$bin" --test-threads=1 --show-output "${host_only[@]}" "$@"
    }
    # `bench NAME GROUPS SECONDS`: the GPU benchmarks' GROUPS (WHALE_GPU_BENCH_GROUPS) in a
    # process of their own (baselines among them), their table written to
    # $OUT/gpu-bench-NAME.md as they go.
    bench() {
        local table="$out_dir/gpu-bench-$1.md"
        rm -f "$table" # never an earlier run's figures
        echo "## benchmarks: $1 ($2)"
        echo
        WHALE_GPU_BENCH_GROUPS="$2" WHALE_GPU_BENCH_OUT="$table" limited "$3" "$bins/gpu" --bench >"$logs/bench-$1.log" 2>&1
        local rc=$?
        if [ -f "$table" ]; then
            cat "$table"
            # Killed at its cap while still measuring (its table written as it went): its
            # remaining rows are missing, which is out of time, not a hang.
            # The log's last lines name the benchmark it was in: one stuck there (a hang, not
            # slowness: each takes a few seconds) shows as criterion's "Benchmarking ..." line.
            if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
                echo "(cut at its time cap: the rows above are what it measured; the log ended with:)"
                grep -v '^$' "$logs/bench-$1.log" | tail -2
                budget_bound=1
            fi
        else
            tail -20 "$logs/bench-$1.log"
            # A GPU that is there but whose libraries did not load leaves no table; with no GPU
            # at all the benchmarks skip, and so does the report.
            if [ "$rc" -eq 0 ] && [ -n "$gpu_name" ]; then
                echo "no table from a GPU machine"
                rc=1
            elif [ "$rc" -eq 0 ]; then
                skipped=1
            fi
        fi
        echo
        echo "bench exit status: $rc (at ${SECONDS} s)"
        echo
        judge $rc
        pack_logs
    }

    if wanted new || wanted tests || wanted opt_in; then
        # The first process compiles every module's PTX (the attention module's is 1.6 MB):
        # a test known to pass, with room for that, so no never-run test below is cut at its
        # cap by the compilation.
        test_step "warm-up (the driver compiles the PTX): elementwise_kernels_match_the_cpu" \
            "$logs/test-warmup.log" 120 "" "$bins/cuda" --exact elementwise_kernels_match_the_cpu --show-output
    fi
    if wanted new; then
        for entry in "${isolated[@]}"; do
            bin=${entry%%:*} t=${entry#*:}
            test_step "new kernels: $t" "$logs/test-new-${entry//[:\/]/_}.log" 25 "test result: ok. 1 passed" \
                "$bins/$bin" --exact "$t" --show-output
        done
    fi
    wanted opt_in && run_tests cuda_opt_in 45
    if wanted tests; then
        skips=()
        for entry in "${isolated[@]}"; do skips+=(--skip "${entry#*:}"); done
        # The model's and the backend's tests first: they cover the most.
        for bin in cuda_model cuda_ops; do run_tests "$bin" 45; done
        run_tests cuda 45 "${skips[@]}"
        for bin in cuda_rl nccl; do run_tests "$bin" 45; done
    fi
    wanted kernels && bench kernels kernels 120
    wanted steps && bench steps linear,train_step,other_kernels_step,train_step_cpu,grpo_step 120

    if wanted cli; then
        echo "## whale pretrain (tiny preset, 30 steps: fp32, bf16, fp8 + bf16 moments, the same + --fp8-dispatch --fp8-swiglu-cache on the GPU, fp32 on the CPU), generate, r1-zero"
        echo
        echo '```'
        # `pretrain_run DEVICE PRECISION [FLAG...]`
        pretrain_run() {
            local dev=$1 precision=$2 name="$1-$2" moments=fp32
            shift 2
            [ $# -gt 0 ] && name="$name$(echo "$@" | tr -d ' ' | tr -s '-' '-')"
            # The FP8 run takes DeepSeek-V3's whole recipe: bf16 AdamW moments too.
            [ "$precision" = fp8 ] && moments=bf16
            rm -rf "/tmp/gpu-check-$name"
            limited 60 "$bins/whale-cli" pretrain --device "$dev" --precision "$precision" --moments "$moments" \
                --out "/tmp/gpu-check-$name" --steps 30 --eval-problems 16 --k 2 "$@" >"$logs/pretrain-$name.log" 2>&1
            local rc=$?
            echo "$name: exit status $rc (at ${SECONDS} s); $(grep -E 'trained in|^\| base|not run' "$logs/pretrain-$name.log" | tr '\n' ' ')"
            echo "$name: last step $(tail -1 "/tmp/gpu-check-$name/metrics.jsonl" 2>/dev/null)"
            [ "$rc" -eq 0 ] || grep -m 1 -A 3 -E "^Error|panicked" "$logs/pretrain-$name.log"
            judge $rc
        }
        pretrain_run cuda fp32
        # The same run on the CPU: the first steps' losses agree to f32 rounding (the emulated
        # test's tolerance, crates/cli/tests/cli.rs); later steps are reported, as rounding
        # differences grow with training.
        pretrain_run cpu fp32
        if [ ! -s /tmp/gpu-check-cuda-fp32/metrics.jsonl ] || [ ! -s /tmp/gpu-check-cpu-fp32/metrics.jsonl ]; then
            echo "GPU vs CPU fp32: not compared (a run above logged no step)"
        elif command -v python3 >/dev/null; then
            python3 - /tmp/gpu-check-cuda-fp32/metrics.jsonl /tmp/gpu-check-cpu-fp32/metrics.jsonl 2>&1 <<'PY'
import json, sys
rows = [[json.loads(l) for l in open(p) if l.strip()] for p in sys.argv[1:]]
worst, bad = 0.0, []
for step, (g, c) in enumerate(zip(*rows)):
    for key in ("loss", "main_loss", "mtp_loss", "grad_norm"):
        if g.get(key) is None or c.get(key) is None:
            continue
        rel = abs(g[key] - c[key]) / max(abs(c[key]), 1e-30)
        worst = max(worst, rel)
        if step < 2 and rel > 1e-4:
            bad.append(f"step {step} {key}: GPU {g[key]}, CPU {c[key]}")
print(f"GPU vs CPU fp32: {min(map(len, rows))} steps compared, largest relative difference {worst:.2e}")
for b in bad:
    print("MISMATCH:", b)
sys.exit(1 if bad or min(map(len, rows)) == 0 else 0)
PY
            judge $?
        else
            echo "python3 not found: the GPU and CPU losses were not compared"
        fi
        echo
        if [ ! -f /tmp/gpu-check-cuda-fp32/checkpoint/config.json ]; then
            # Their failures would only repeat the pretraining's.
            echo "generate and r1-zero: not run, the cuda-fp32 pretraining wrote no checkpoint"
        else
            echo "generate, greedy, from the cuda-fp32 checkpoint:"
            for dev in cuda cpu; do
                limited 30 "$bins/whale-cli" generate --checkpoint /tmp/gpu-check-cuda-fp32/checkpoint --prompt "12+7=" \
                    --max-new-tokens 24 --greedy --device "$dev" >"$logs/generate-$dev.out" 2>"$logs/generate-$dev.log"
                rc=$?
                echo "$dev: exit status $rc; $(head -1 "$logs/generate-$dev.out"); $(grep -o '[0-9.]* tokens/s' "$logs/generate-$dev.log")"
                [ "$rc" -eq 0 ] || grep -m 1 -A 3 -E "^Error|panicked" "$logs/generate-$dev.log"
                judge $rc
            done
            if cmp -s "$logs/generate-cuda.out" "$logs/generate-cpu.out"; then
                echo "greedy decoding: the GPU and the CPU write the same text"
            else
                echo "MISMATCH: greedy decoding differs between the GPU and the CPU"
                status=1
            fi
            echo
            echo "r1-zero (GRPO, 3 steps) from the cuda-fp32 checkpoint on the GPU:"
            rm -rf /tmp/gpu-check-r1-zero
            limited 90 "$bins/whale-cli" r1-zero --base /tmp/gpu-check-cuda-fp32/checkpoint --device cuda \
                --out /tmp/gpu-check-r1-zero --steps 3 --prompts-per-step 4 --group-size 4 --eval-every 0 \
                --eval-problems 16 --k 2 >"$logs/r1-zero.log" 2>&1
            rc=$?
            echo "exit status $rc; $(grep -E 's/step|pass@1 |not run' "$logs/r1-zero.log" | tr '\n' ' ')"
            echo "last step: $(tail -1 /tmp/gpu-check-r1-zero/metrics.jsonl 2>/dev/null | cut -c1-400)"
            [ "$rc" -eq 0 ] || grep -m 1 -A 3 -E "^Error|panicked" "$logs/r1-zero.log"
            judge $rc
        fi
        echo
        pretrain_run cuda bf16
        pretrain_run cuda fp8
        pretrain_run cuda fp8 --fp8-dispatch --fp8-swiglu-cache
        echo '```'
        echo
        pack_logs
    fi

    if wanted profile; then
        echo "## profile: kernel time in the first 5200 launches of whale pretrain --preset small (8 x 128 tokens), under Nsight Compute"
        echo
        echo '```'
        ncu=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | tail -1)
        for precision in ${GPU_CHECK_PROFILE:-fp32 bf16}; do
            run=(pretrain --preset small --device cuda --precision "$precision" --micro-batch 8 --seq-len 128
                --steps 3 --eval-problems 1 --k 1 --eval-every 0)
            rm -rf "/tmp/gpu-check-profile-$precision"
            limited 30 "$bins/whale-cli" "${run[@]}" --out "/tmp/gpu-check-profile-$precision" >"$logs/profile-wall-$precision.log" 2>&1
            echo "$precision without the profiler: exit status $? (at ${SECONDS} s); steps' tokens/s: $(grep -o '"tokens_per_s":[0-9.]*' "/tmp/gpu-check-profile-$precision/metrics.jsonl" 2>/dev/null | cut -d: -f2 | cut -d. -f1 | tr '\n' ' ')"
            if [ -z "$ncu" ]; then
                echo "no ncu on this machine: $precision not profiled"
                continue
            fi
            rm -rf "/tmp/gpu-check-profile-$precision"
            # The first 5200 launches: the setup and the first step (5081 of them in fp32 on
            # 2026-12-04; ncu took about 11 ms a launch), the rest of the run unprofiled. A run
            # cut at its cap can leave ncu writing its table after it: it is not read then.
            limited 75 "$ncu" --clock-control none --metrics gpu__time_duration.sum --csv --page raw --launch-count 5200 \
                "$bins/whale-cli" "${run[@]}" --out "/tmp/gpu-check-profile-$precision" >"$logs/profile-$precision.csv" 2>"$logs/profile-$precision.log"
            rc=$?
            echo "$precision under ncu: exit status $rc (at ${SECONDS} s)"
            [ "$rc" -eq 0 ] || continue
            python3 - "$logs/profile-$precision.csv" <<'PY' 2>&1 | tee -a "$logs/profile-$precision.log"
import csv, sys, collections
rows = [r for r in csv.reader(open(sys.argv[1], errors="replace")) if len(r) > 3]
head = next((i for i, r in enumerate(rows) if "Kernel Name" in r and "gpu__time_duration.sum" in r), None)
if head is None:
    sys.exit("no ncu table in the output")
cols = rows[head]
name, dur = cols.index("Kernel Name"), cols.index("gpu__time_duration.sum")
unit = rows[head + 1][dur] if head + 1 < len(rows) and dur < len(rows[head + 1]) else ""
scale = {"ns": 1e-3, "nsecond": 1e-3, "us": 1.0, "usecond": 1.0, "ms": 1e3, "msecond": 1e3}.get(unit, None)
data = rows[head + 1 + (scale is not None):]
scale = scale or 1e-3
total, count = collections.Counter(), collections.Counter()
for r in data:
    try:
        t = float(r[dur].replace(",", "")) * scale  # ncu writes 3,616
    except (ValueError, IndexError):
        continue
    k = r[name].split("(")[0].split("<")[0].strip()
    total[k] += t
    count[k] += 1
all_us = sum(total.values())
print(f"{sum(count.values())} kernel launches, {all_us / 1e3:.1f} ms of kernel time in all (the run's first: its setup and about its first step)")
for k, t in total.most_common(25):
    print(f"{t / 1e3:9.2f} ms {100 * t / all_us:5.1f}% {count[k]:7d} launches  {k}")
PY
        done
        echo '```'
        echo
        pack_logs
    fi

    # A GPU that nvidia-smi sees but the tests did not is a failure, not a skip.
    [ "$skipped" -ne 0 ] && [ -n "$gpu_name" ] && { echo "tests found no GPU on a GPU machine"; status=1; }
    if [ $status -ne 0 ]; then
        echo "overall: FAIL"
    elif [ $incomplete -ne 0 ]; then
        echo "overall: INCOMPLETE (out of time: rerun the steps not run with GPU_CHECK_ONLY)"
    elif [ $skipped -ne 0 ]; then
        echo "overall: SKIPPED (some tests found no GPU: see above)"
    else
        echo "overall: PASS"
    fi
    echo "elapsed: ${SECONDS} s"
    # The device's exit status says it too: 1 a failure, 3 incomplete, 2 skipped, 0 a pass.
    if [ $status -ne 0 ]; then exit 1; elif [ $incomplete -ne 0 ]; then exit 3; elif [ $skipped -ne 0 ]; then exit 2; fi
}
