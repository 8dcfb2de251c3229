#!/usr/bin/env bash
# sample_many on two GPUs vs one: the samples must be identical (seeded by index).
#
# Usage (repository root, on a machine with >= 2 GPUs):
#   OUT=out bash benchmarks/multi_gpu.sh
#
# 1. torchrun --nproc_per_node=2: the built-in GMM model, DDPM (in-kernel noise), batch 96,
#    into $OUT/run2; then the same run again (resume: every shard verified, nothing to do);
# 2. one process (python -m fastdiff sample-many), batch 250, shard size 500, into $OUT/run1
#    (and the same with --cuda-graph into $OUT/run1g);
# 3. load_samples of each and a bitwise comparison: prints OK or MISMATCH (exit 1).
# Logs: $OUT/multi_gpu.log.
set -uo pipefail

OUT=${OUT:-out}
PY=${PYTHON:-python3}
N=${N:-5000}
export NCCL_NVLS_ENABLE=0  # no NVLink multicast on the lent machines
unset TRITON_INTERPRET
mkdir -p "$OUT"
rm -rf "$OUT/run2" "$OUT/run1" "$OUT/run1g"
LOG="$OUT/multi_gpu.log"
: >"$LOG"

COMMON=(--model gmm --sampler ddpm --steps 100 --num-samples "$N" --shape 2 --seed 7 --no-progress)
fail=0

run() {
    echo "+ $*" | tee -a "$LOG"
    "$@" >>"$LOG" 2>&1
    rc=$?
    echo "  rc=$rc" | tee -a "$LOG"
    [ $rc -eq 0 ] || fail=1
}

nvidia-smi -L | tee -a "$LOG"
run timeout 300 torchrun --standalone --nproc_per_node=2 -m fastdiff.sample_many "${COMMON[@]}" \
    --batch-size 96 --out "$OUT/run2"
run timeout 300 torchrun --standalone --nproc_per_node=2 -m fastdiff.sample_many "${COMMON[@]}" \
    --batch-size 96 --out "$OUT/run2"
run timeout 300 "$PY" -m fastdiff sample-many "${COMMON[@]}" --batch-size 250 --shard-size 500 \
    --out "$OUT/run1"
run timeout 300 "$PY" -m fastdiff sample-many "${COMMON[@]}" --batch-size 250 --shard-size 500 \
    --cuda-graph --out "$OUT/run1g"
grep -E "samples \(" "$LOG"

"$PY" - "$OUT" <<'EOF' 2>&1 | tee -a "$LOG"
import sys

import numpy as np

from fastdiff.sample_many import load_samples

out = sys.argv[1]
ok = True
a = load_samples(f"{out}/run2")
for other in ("run1", "run1g"):
    b = load_samples(f"{out}/{other}")
    same = a.shape == b.shape and np.array_equal(a, b)
    diff = float(np.abs(a - b).max()) if a.shape == b.shape else float("nan")
    print(f"run2 (2 GPUs, batch 96) vs {other}: {a.shape} {'OK' if same else 'MISMATCH'}"
          f" (max abs diff {diff:.3g}, finite {bool(np.isfinite(a).all())})")
    ok &= same
sys.exit(0 if ok else 1)
EOF
[ "${PIPESTATUS[0]}" -eq 0 ] || fail=1
echo "multi_gpu: $([ $fail -eq 0 ] && echo OK || echo FAILED)" | tee -a "$LOG"
exit $fail
