#!/usr/bin/env bash
# The GPU run: environment, the test suite on the card, then the step benchmarks.
#
# Usage (from the repository root, on the GPU machine):
#   bash benchmarks/gpu_run.sh                          # everything, ~8 minutes
#   bash benchmarks/gpu_run.sh -k "ddpm and fused"      # extra args go to the benchmark pytest
#   SKIP_TESTS=1 bash benchmarks/gpu_run.sh -k loop     # benchmarks only
#   SKIP_BENCH=1 bash benchmarks/gpu_run.sh             # tests and the stamp only
#   PYTEST_ADDOPTS="-n 4 --dist loadfile" SKIP_BENCH=1 bash benchmarks/gpu_run.sh
#                        # the tests on 4 pytest-xdist workers (~3.5 min on an H200; carry
#                        # the pytest_xdist and execnet wheels in .whl/)
#
# The whole tests/ run writes benchmarks/gpu-stamp.txt (benchmarks/gpu_stamp.py: the hash of
# fastdiff/, kernels/ and tests/, the date, the card, pytest's summary line); commit it.
# Everything is written under $OUT (default ./out): nvidia-smi.txt, env.txt, pip.log,
# tests_all.log, gpu-stamp.txt, bench.log, bench.json, summary.txt, summary.md, run.log.
# Time box: RUN_BUDGET_S (default 460 s) for the whole script. Benchmarks that would start
# after the deadline are skipped (FASTDIFF_BENCH_DEADLINE, see benchmarks/conftest.py), so the
# run still ends normally and writes bench.json; skipped ones are listed in bench.log.
set -uo pipefail

START=$(date +%s)
BUDGET=${RUN_BUDGET_S:-460}
OUT=${OUT:-out}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
unset TRITON_INTERPRET  # kernels run on the card here

log() { echo "[gpu_run +$(($(date +%s) - START))s] $*" | tee -a "$OUT/run.log"; }
left() { echo $((START + BUDGET - $(date +%s))); }

log "start; budget ${BUDGET}s; OUT=$OUT"
{ nvidia-smi -L; nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem \
    --format=csv; } 2>&1 | tee "$OUT/nvidia-smi.txt"

# diffusers (and its pure-python deps) from local wheels; the machine has no network.
if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl >"$OUT/pip.log" 2>&1 || log "wheel install failed (pip.log)"
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
"$PY" -m pip install --no-deps --no-build-isolation -e . >>"$OUT/pip.log" 2>&1 ||
    log "pip install -e . failed (pip.log)"
"$PY" - >"$OUT/env.txt" 2>&1 <<'EOF'
import importlib
import torch
print("cuda device:", torch.cuda.get_device_name() if torch.cuda.is_available() else None)
for name in ("torch", "triton", "diffusers", "pytest", "pytest_benchmark", "fastdiff"):
    try:
        module = importlib.import_module(name)
        print(name, getattr(module, "__version__", "?"), getattr(module, "__file__", ""))
    except Exception as exc:  # report, do not stop the run
        print(name, "NOT IMPORTABLE:", exc)
EOF
cat "$OUT/env.txt"

if [ "${SKIP_TESTS:-0}" = "0" ]; then
    # The whole tests dir on the card (the device fixture is cuda here), then the stamp.
    reserve=$([ "${SKIP_BENCH:-0}" = "0" ] && echo 200 || echo 20)
    t=$(($(left) - reserve))
    if [ $t -gt 30 ]; then
        timeout "$t" "$PY" -m pytest tests -q -p no:cacheprovider >"$OUT/tests_all.log" 2>&1
        rc=$?
        [ $rc -eq 124 ] && log "tests (all): TIMED OUT after ${t}s" || log "tests (all): rc $rc"
        grep -E "^(FAILED|ERROR)" "$OUT/tests_all.log" | head -n 30
        summary=$(grep -E "^=*\s*[0-9]+ (passed|failed)|^[0-9]+ (passed|failed)" "$OUT/tests_all.log" |
            tail -n 1 | sed -E 's/^=+ //; s/ =+$//')
        [ $rc -eq 124 ] && summary="TIMED OUT after ${t}s ${summary}"
        card=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)
        "$PY" benchmarks/gpu_stamp.py write --card "${card:-unknown}" \
            --summary "${summary:-no summary (rc $rc)}" | tee -a "$OUT/run.log"
        cp benchmarks/gpu-stamp.txt "$OUT/gpu-stamp.txt"
        tail -n 2 "$OUT/tests_all.log"
    else
        log "tests (all): skipped, not enough time left"
    fi
fi
[ "${SKIP_BENCH:-0}" = "0" ] || { log "benchmarks skipped (SKIP_BENCH=1)"; log "done"; exit 0; }

# Benchmarks: no new benchmark starts in the last 45 s (summary, one late compile).
export FASTDIFF_BENCH_DEADLINE=$((START + BUDGET - 45))
hard=$(($(left) + 60))
log "benchmarks: deadline in $((FASTDIFF_BENCH_DEADLINE - $(date +%s)))s, hard stop ${hard}s"
timeout "$hard" "$PY" -m pytest benchmarks -q -p no:cacheprovider \
    --benchmark-json="$OUT/bench.json" --benchmark-columns=median,min,max,rounds \
    "$@" >"$OUT/bench.log" 2>&1
rc=$?
log "benchmarks: rc $rc"
grep -E "^(FAILED|ERROR)|SKIPPED .*FASTDIFF_BENCH_DEADLINE" "$OUT/bench.log" | head -n 20
tail -n 2 "$OUT/bench.log"

if [ -s "$OUT/bench.json" ]; then
    "$PY" benchmarks/summarize.py "$OUT/bench.json" | tee "$OUT/summary.txt"
    "$PY" benchmarks/summarize.py "$OUT/bench.json" --markdown >"$OUT/summary.md"
else
    log "no bench.json (see bench.log)"
fi
log "done"
