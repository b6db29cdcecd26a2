#!/usr/bin/env bash
# One GPU (H100 / H200), at most ~10 minutes, results as files under $OUT (default results/gpu-<time>):
#   1. the CUDA tests (tests/training/test_cuda.py)                                   -> cuda_tests.txt
#   2. cost against image size on the GPU (benchmarks/cost_vs_size.py --device cuda)  -> cost_vs_size.{json,png,txt}
#   3. Megapixel MNIST ingested here (GPU_SUITE_TRAIN / GPU_SUITE_TEST images), then ATS-10 through jobs/train.py
#      (1 worker on the GPU, bf16, direct store reads) for the rest of the budget  -> mnist_run.json, train.log
# plus nvidia-smi.txt, machine.txt and timing.txt (seconds per part).
#
#   bash benchmarks/gpu_suite.sh                     # on the GPU machine, from the repository root
#   GPU_SUITE_DRY=1 OUT=/tmp/x bash benchmarks/gpu_suite.sh   # the same steps on a CPU at toy sizes (the test)
#
# Settings (environment): GPU_SUITE_BUDGET_S (default 540: the whole suite's wall-clock target),
# GPU_SUITE_TRAIN / GPU_SUITE_TEST (default 2500 / 500 images), PYTHON (default .venv/bin/python, else python3).
# Every part runs even when an earlier one failed; the exit status is 1 when any did.
set -uo pipefail

cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
DRY=${GPU_SUITE_DRY:-0}
BUDGET_S=${GPU_SUITE_BUDGET_S:-540}
N_TRAIN=${GPU_SUITE_TRAIN:-2500}
N_TEST=${GPU_SUITE_TEST:-500}
OUT=${OUT:-results/gpu-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
START=$(date +%s)
STATUS=0
export PYTHONPATH=.
export MLFLOW_TRACKING_URI="sqlite:///$OUT/mlflow.db"

elapsed() { echo $(( $(date +%s) - START )); }
part() {  # part NAME COMMAND...: run, time, record the status
    local name=$1; shift
    local t0; t0=$(date +%s)
    echo "== $name (at $(elapsed) s)"
    "$@"
    local rc=$?
    echo "$name $(( $(date +%s) - t0 )) s rc=$rc" >> "$OUT/timing.txt"
    [ "$rc" -eq 0 ] || STATUS=1
}

{ nvidia-smi || echo "nvidia-smi: not available"; } > "$OUT/nvidia-smi.txt" 2>&1
"$PY" -c "import os, platform, torch; print(platform.platform(), os.cpu_count(), 'cpus; torch', torch.__version__, \
'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')" \
    > "$OUT/machine.txt" 2>&1

if [ "$DRY" = 1 ]; then
    DEVICE=cpu; SIZES=--smoke; N_TRAIN=8; N_TEST=4; SIZE=192; DIGITS=3; NOISE=4; MIN_SIZE=24
    TRAIN_SET=(--set data.low_scale=0.125 --set model.patch_hw=32 --set data.batch_size=4 --set runtime.use_gpu=false)
else
    DEVICE=cuda; SIZES=""; SIZE=1500; DIGITS=5; NOISE=50; MIN_SIZE=128
    TRAIN_SET=(--set data.low_scale=0.12 --set model.patch_hw=50 --set data.batch_size=32 --set runtime.use_gpu=true
               --set runtime.precision=bf16)
fi

part cuda_tests bash -c "'$PY' -m pytest -q -p no:cacheprovider tests/training/test_cuda.py > '$OUT/cuda_tests.txt' 2>&1"
# shellcheck disable=SC2086
part cost_vs_size bash -c "'$PY' benchmarks/cost_vs_size.py --device $DEVICE $SIZES --json '$OUT/cost_vs_size.json' \
    --plot '$OUT/cost_vs_size.png' > '$OUT/cost_vs_size.txt' 2>&1"
part ingest bash -c "'$PY' jobs/ingest.py --out '$OUT/mmnist' --generate megapixel-mnist --n-train $N_TRAIN \
    --n-test $N_TEST --size $SIZE --n-digits $DIGITS --n-noise $NOISE --min-size $MIN_SIZE \
    --workers \$(nproc) --no-progress > '$OUT/ingest.log' 2>&1"

LEFT=$(( BUDGET_S - $(elapsed) - 120 ))  # Ray start-up, the last evaluation, model logging, shut-down: ~2 minutes
[ "$DRY" = 1 ] && LEFT=5
if [ "$LEFT" -lt 5 ]; then
    echo "no time left for the training run ($(elapsed) s spent)" | tee "$OUT/train.log"
    STATUS=1
else
    part train bash -c "'$PY' jobs/train.py --data '$OUT/mmnist' --model ats --workers 1 --servers 0 --epochs 200 \
        --run-name gpu-ats10 --experiment gpu-suite --set optim.time_budget_s=$LEFT \
        --set model.feature_net=mnist_paper --set model.feature_dim=32 --set model.entropy_lambda=0.0001 \
        --set model.smoothing=0.00001 --set optim.clip_grad_norm=1 --set runtime.progress=false \
        ${TRAIN_SET[*]} > '$OUT/train.log' 2>&1"
    part results "$PY" - "$OUT" <<'EOF'
import json, sys
from mlflow.tracking import MlflowClient
out = sys.argv[1]
client = MlflowClient()
exp = client.get_experiment_by_name("gpu-suite")
run = client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"])[0]
history = {k: [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, k)]
           for k in ("test_error", "train_loss", "elapsed_train_s", "attention_on_objects")}
summary = {"run_id": run.info.run_id, "status": run.info.status, "metrics": run.data.metrics,
           "params": {k: v for k, v in run.data.params.items() if k.startswith(("model.", "optim.", "data.", "runtime."))},
           "history": history}
json.dump(summary, open(f"{out}/mnist_run.json", "w"), indent=1)
print(f"test_error {run.data.metrics.get('test_error')}, time_per_sample_ms {run.data.metrics.get('time_per_sample_ms')}"
      f", cuda_max_allocated_mb {run.data.metrics.get('cuda_max_allocated_mb')}")
EOF
fi
echo "total $(elapsed) s status=$STATUS" | tee -a "$OUT/timing.txt"
exit $STATUS
