#!/usr/bin/env bash
# Every check of this repository that needs a GPU, in one run on one GPU. On an H100 part 1 took about 2.5
# minutes at 10 timed steps per mode; part 2 needs more than the 270 s it was given there.
#   0. the GPU tests (tests/test_gpu.py, pytest -m gpu): bf16 autocast step against fp32, fused CUDA AdamW against
#      foreach, compiled blocks against eager, and with 2 GPUs torchrun/NCCL against gradient accumulation;
#   1. base pretraining throughput and MFU at bf16, batch 128: eager, blocks compiled (pretrain.py --compile) and the
#      whole model under torch.compile (bench/pretrain_gpu.py, 20 timed steps each);
#   2. the whole chain of run_gpu.sh at a small size (torchrun, bf16, EMA, compiled pretraining, generation,
#      TiM, PANGAEA protocol and few-shot on CUDA), to show that every stage runs on a GPU.
# Logs and the small run's summary go to $OUT (default runs/gpu_checks), the small run itself to $RUN_OUT.
#   bash bench/gpu_checks.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_checks}
PY=${PYTHON:-python3}
RUN_OUT=${RUN_OUT:-$OUT/run_gpu}
export PATH="$(dirname "$(command -v "$PY")"):$PATH"   # torchrun beside the python
mkdir -p "$OUT"
nvidia-smi -L
$PY -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"

echo "== 0. GPU tests (pytest -m gpu)"
timeout "${TEST_TIMEOUT:-600}" $PY -m pytest -m gpu tests/test_gpu.py -q -ra 2>&1 | tee "$OUT/pytest_gpu.log"

echo "== 1. base pretraining: tokens/s and MFU (goal: MFU >= 40%)"
timeout "${MFU_TIMEOUT:-300}" $PY bench/pretrain_gpu.py --batch-size "${MFU_BATCH:-128}" --steps "${MFU_STEPS:-20}" --warmup 5 2>&1 | tee "$OUT/pretrain_gpu.log"

echo "== 2. run_gpu.sh at a small size"
rm -rf "$RUN_OUT"
N=600 TILE=64 SIZE=tiny TOKENIZER_SIZE=smoke TOKENIZER_STEPS=30 TOKEN_BUDGET=2e5 BATCH=32 TOTAL_BATCH=64 \
    WORKERS=2 EPOCHS=2 EVAL_N=16 PYTHON=$PY OUT="$RUN_OUT" \
    timeout "${CHAIN_TIMEOUT:-600}" bash run_gpu.sh > "$OUT/run_gpu.log" 2>&1
echo "run_gpu.sh exit status $?"
tail -n 40 "$OUT/run_gpu.log"
cp "$RUN_OUT/summary.md" "$RUN_OUT/times.tsv" "$OUT/" 2>/dev/null
exit 0
