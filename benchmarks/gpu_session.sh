#!/usr/bin/env bash
# One GPU session on an H100: build the CUDA kernels, run the GPU tests, run the CUDA benchmarks.
#
#   bash benchmarks/gpu_session.sh            (from the repo root; device run with carry [".whl"])
#
# Everything lands flat under $OUT:
#   steps.log                   build, pytest and benchmark output (this script's own output
#                               goes to $SESSION_LOG, default /tmp/gpu_session.log)
#   policy_loss_cuda.md         bench_policy_loss.py (covrl vs eager reference vs verl-style)
#   policy_loss_cuda_profile.md per-kernel table (torch.profiler) at 512x8192
#   policy_loss_cuda_next.md    the COVRL_PL_CUDA_NEXT candidate kernels vs the default, same run
#   policy_loss_cuda_profile_next.md  per-kernel table with the first NEXT value
#   host_overhead_cuda.md       bench_host_overhead.py (eager call at 8 tokens: the wrapper's cost)
#   logprob_entropy_cuda.md     bench_logprob_entropy.py (covrl vs eager vs Liger)   [PLAN=full]
#   logprob_entropy_profile.md  per-kernel table of the logits kernels               [PLAN=full]
#
# Each step runs under `timeout` and never past the session deadline (BUDGET seconds after
# the start, default 480); a failed step does not stop the next one. The summary at the end
# is compact because the device reply keeps only the last 12,000 characters of output.
#
# Knobs (env): PY (python, default python3), OUT (default /tmp/out), BUDGET (seconds),
# PLAN (full, the default, or policy: skip the logits benchmark), NEXT (the COVRL_PL_CUDA_NEXT
# values timed against the default kernels, default all,finalize,filter,occupancy,reverse),
# SKIP_BUILD=1 (use the installed build; for a local dry run), FORCE=1 (run the benchmarks
# even when covrl has no CUDA kernels).
set -u

PY=${PY:-python3}
OUT=${OUT:-/tmp/out}
BUDGET=${BUDGET:-480}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
SESSION="${SESSION_LOG:-/tmp/gpu_session.log}"  # the reply carries its tail
BUILD_LOG="$OUT/steps.log"
STEPS_LOG="$OUT/steps.log"
SUMMARY=()

note() { printf '%s\n' "$*"; }

# step NAME MAX_SECONDS LOGFILE CMD...: run CMD under timeout (capped by the deadline), output to LOGFILE.
step() {
    local name=$1 tmax=$2 log=$3
    shift 3
    local left=$((BUDGET - SECONDS - 5))
    if ((left < 20)); then
        note "== [${SECONDS}s] $name: SKIPPED (session deadline, ${left}s left)"
        SUMMARY+=("$(printf '%-28s %-8s %5ss' "$name" SKIPPED 0)")
        return 99
    fi
    local t=$((tmax < left ? tmax : left))
    note "== [${SECONDS}s] $name (timeout ${t}s)"
    printf '\n===== %s: %s\n' "$name" "$*" >>"$log"
    local t0=$SECONDS
    timeout -k 10 "$t" "$@" >>"$log" 2>&1
    local rc=$?
    local dt=$((SECONDS - t0)) status=ok
    if ((rc == 124 || rc == 137)); then status=TIMEOUT; elif ((rc != 0)); then status="rc=$rc"; fi
    printf '===== %s: %s after %ss\n' "$name" "$status" "$dt" >>"$log"
    note "   -> $status (${dt}s)"
    SUMMARY+=("$(printf '%-28s %-8s %5ss' "$name" "$status" "$dt")")
    return "$rc"
}

# Table rows of a markdown result file, without the |---| separator.
rows() { [ -f "$1" ] && grep '^|' "$1" | grep -v '^|---' || note "($1 missing)"; }

main() {
    note "gpu_session.sh: repo $(pwd), OUT=$OUT, BUDGET=${BUDGET}s, PY=$PY"

    # --- carried wheels (liger-kernel) ---------------------------------------------------------
    if compgen -G ".whl/*.whl" >/dev/null; then
        if $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/site .whl/*.whl >>"$STEPS_LOG" 2>&1; then
            export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
            note "wheels: installed $(ls .whl | tr '\n' ' ')into /tmp/site"
        else
            note "wheels: install FAILED (see steps.log)"
        fi
    else
        note "wheels: none in .whl/ (Liger will be skipped)"
    fi

    # --- environment ---------------------------------------------------------------------------
    {
        nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv 2>&1 || true
        $PY -c "
import torch
try:
    import triton; tv = triton.__version__
except ImportError:
    tv = None
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', tv, 'gpu',
      torch.cuda.get_device_name() if torch.cuda.is_available() else None)" 2>&1
        (nvcc --version 2>&1 || /usr/local/cuda/bin/nvcc --version 2>&1) | tail -n 2
    } | tee -a "$STEPS_LOG"

    # --- build ---------------------------------------------------------------------------------
    export TORCH_CUDA_ARCH_LIST=9.0 CMAKE_BUILD_PARALLEL_LEVEL=16 COVRL_CUDA=ON
    CUDACXX=${CUDACXX:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}
    export CUDACXX
    case ":$PATH:" in *":$(dirname "$CUDACXX"):"*) ;; *) export PATH="$PATH:$(dirname "$CUDACXX")" ;; esac
    local build_status=skipped
    if [ "${SKIP_BUILD:-0}" != 1 ]; then
        if step build 240 "$BUILD_LOG" $PY -m pip install --no-index --no-build-isolation --no-deps -v -e .; then
            build_status=ok
        else
            build_status=FAILED
        fi
    fi
    local info
    info=$(timeout 60 $PY -c "import covrl; print(covrl.kernel_info())" 2>&1 | tail -n 3)
    note "kernel_info: $info"
    local has_cuda=0
    case "$info" in *"'cuda'"*"'cuda_available': True"*) has_cuda=1 ;; esac
    if ((has_cuda == 0)); then
        note "!! covrl has no usable CUDA kernels (build: $build_status)"
        SUMMARY+=("$(printf '%-28s %-8s' kernel_info NO_CUDA)")
    fi

    # --- value order: GPU tests, candidate kernels, host overhead, policy-loss table, logits -------
    step "tests gpu" 200 "$STEPS_LOG" \
        $PY -m pytest -q -ra -m gpu tests/ops -p no:cacheprovider --timeout 120
    note "   $(grep -E '(passed|failed|error|skipped|deselected|no tests ran)' "$STEPS_LOG" | tail -n 1)"

    if ((has_cuda == 1)) || [ "${FORCE:-0}" = 1 ]; then
        # the candidate kernels first: their table decides what the next default is
        step "bench policy_loss next" 120 "$STEPS_LOG" \
            $PY benchmarks/bench_policy_loss.py --device cuda --next-only --profile \
            --next "${NEXT:-all,finalize,filter,occupancy,reverse}" --next-out "$OUT/policy_loss_cuda_next.md" \
            --next-profile-out "$OUT/policy_loss_cuda_profile_next.md"
        step "bench host overhead" 60 "$STEPS_LOG" \
            $PY benchmarks/bench_host_overhead.py --device cuda --out "$OUT/host_overhead_cuda.md"
        step "bench policy_loss +profile" 150 "$STEPS_LOG" \
            $PY benchmarks/bench_policy_loss.py --device cuda \
            --out "$OUT/policy_loss_cuda.md" --profile --profile-out "$OUT/policy_loss_cuda_profile.md"
        if [ "${PLAN:-full}" = full ]; then
            step "bench logprob_entropy +profile" 120 "$STEPS_LOG" \
                $PY benchmarks/bench_logprob_entropy.py --device cuda --reps 5 \
                --out "$OUT/logprob_entropy_cuda.md" --profile-out "$OUT/logprob_entropy_profile.md"
        fi
    else
        note "benchmarks skipped: no CUDA kernels (FORCE=1 runs them anyway)"
    fi

    # --- summary -------------------------------------------------------------------------------
    note ""
    note "================================ SUMMARY (${SECONDS}s) ================================"
    grep -m1 -A1 '^name, memory.total' "$STEPS_LOG" 2>/dev/null
    grep -m1 '^torch ' "$STEPS_LOG" 2>/dev/null
    grep -m1 'release' "$STEPS_LOG" 2>/dev/null
    note "kernel_info: $info"
    printf '%s\n' "${SUMMARY[@]}"
    if [ "$build_status" = FAILED ]; then
        note "--- build output (tail) ---"
        tail -n 40 "$BUILD_LOG"
    fi
    note "--- pytest (failures / result lines) ---"
    grep -E '^(FAILED|ERROR)|^E  |Timeout|[0-9]+ (passed|failed|skipped|deselected)|no tests ran' "$STEPS_LOG" \
        | grep -v '^=====' | tail -n 25
    note "--- policy_loss ---"
    rows "$OUT/policy_loss_cuda.md"
    note "--- policy_loss candidate kernels (COVRL_PL_CUDA_NEXT) vs default, same run ---"
    rows "$OUT/policy_loss_cuda_next.md"
    if [ -f "$OUT/policy_loss_cuda_profile.md" ]; then
        note "--- policy_loss profile (top kernels per mode) ---"
        awk '/^## /{print; n=0} /^Device time/{print} /^\| `/{if (n < 7) print; n++}' \
            "$OUT/policy_loss_cuda_profile.md" | cut -c1-200
    fi
    if [ -f "$OUT/policy_loss_cuda_profile_next.md" ]; then
        note "--- policy_loss profile with the candidate kernels (top kernels per mode) ---"
        awk '/^## /{print; n=0} /^Device time/{print} /^\| `/{if (n < 7) print; n++}' \
            "$OUT/policy_loss_cuda_profile_next.md" | cut -c1-200
    fi
    note "--- host overhead of an eager call (8 tokens) ---"
    rows "$OUT/host_overhead_cuda.md"
    note "--- logprob_entropy ---"
    rows "$OUT/logprob_entropy_cuda.md"
    note "--- logprob_entropy profile ---"
    rows "$OUT/logprob_entropy_profile.md" | cut -c1-160
    note "--- benchmark errors (if any) ---"
    grep -E 'Traceback|Error|error:|failed' "$STEPS_LOG" | grep -v -E '^(FAILED|ERROR) |^E  ' | sort | uniq -c \
        | sort -rn | head -n 12 | cut -c1-240
    note "files: $(ls "$OUT" | tr '\n' ' ')"
    note "done in ${SECONDS}s"
}

main "$@" 2>&1 | tee "$SESSION"
exit "${PIPESTATUS[0]}"
