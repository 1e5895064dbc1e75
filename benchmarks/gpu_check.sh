#!/usr/bin/env bash
# One GPU check (`make gpu-check`): the cuda-marked tests and the GPU benchmarks, on one GPU, in about
# 8 minutes. Needs torch and transformers, and for its DeepSpeed stage deepspeed (a bare GPU box has
# no ray, mlflow or deepspeed: `make gpu-wheels` carries deepspeed and what it needs):
#
#   make gpu-check                                  # here, with .venv and a CUDA build of torch
#   PYTHON=python3 bash benchmarks/gpu_check.sh     # on a GPU box whose python3 has torch
#
# A box with an older transformers: `make gpu-wheels` here first (wheels of this venv's transformers
# and its tokenizers / safetensors into .whl/, for that box's Python 3.12); the script installs them
# into /tmp/wand-site. Writes benchmarks/results/*_cuda.json and the test report gpu_check_tests_cuda.xml;
# OUT=<folder> also copies them there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  rm -rf /tmp/wand-site  # fresh each run: a stale package from an earlier run would shadow the box's own
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/wand-site .whl/*.whl
  export PYTHONPATH=/tmp/wand-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_NO_ADVISORY_WARNINGS=1
"$PY" - <<'PY'
import sys, torch, transformers
if not torch.cuda.is_available():
    sys.exit("gpu-check needs a CUDA GPU: torch.cuda.is_available() is False")
print(f"# {torch.cuda.get_device_name()}: torch {torch.__version__}, transformers {transformers.__version__}")
PY
results=benchmarks/results
mkdir -p "$results"
status=0
# Each stage has its own time limit (7 min 55 s in all); a stage that runs out fails the check and
# the next one still runs. The tests are stopped with SIGINT, so pytest still writes the report of
# the tests it ran (and is killed 10 s later if it has not ended).
# 1. Correctness on the GPU (FlexAttention compiles per length bucket; CUDA graphs of the static step).
timeout --signal=INT --kill-after=10 90 "$PY" -m pytest -m cuda tests/method/test_cuda.py -q -p no:cacheprovider -o addopts="" \
  --junitxml="$results/gpu_check_tests_cuda.xml" || status=$?
# 2. Decode per-step latency (eager path), CosyVoice 2 shape, batch 1, steps 100 .. 1,500 (the H100
#    record: 17-28 ms a step per side, so about 70 s of steps).
timeout 90 "$PY" -m benchmarks.decode_latency --config cosyvoice2 --device cuda --steps "${DECODE_STEPS:-1500}" \
  --points 100,500,1000,1500 --half 25 || status=$?
# 3. Training step, Qwen2.5-0.5B shape, T 2,048 and 8,192 at equal tokens: SDPA full vs WAND Flex
#    (hard and soft), the whole step and the attention op alone.
timeout 105 "$PY" -m benchmarks.train_step --device cuda --repeats 3 || status=$?
# 4. Building the training BlockMask at T 2,048 and 8,192: torch's dense pass vs WAND's tiles (cached).
timeout 20 "$PY" -m benchmarks.block_mask --device cuda || status=$?
# 5. DeepSpeed ZeRO-2, bf16, torch AdamW, one GPU, no Ray: distill steps against plain torch steps
#    (needs the deepspeed wheel and its pure-Python needs from `make gpu-wheels`).
timeout 45 "$PY" -m benchmarks.deepspeed_step --device cuda || status=$?
# 6. Serving at 60 s of speech, the grid: CosyVoice 2 and Llasa-3B shapes, batch 1 .. 512 (real-time
#    streams), both sides' eager steps captured as CUDA graphs per point (one step each, where
#    compiling the baseline takes about a minute per model), Q/K/V, gate/up and norms fused on both sides;
#    results written after every point.
timeout 115 "$PY" -m benchmarks.serving --device cuda --models cosyvoice2,llasa-3b --seconds 60 \
  --batches 1,16,64,256,512 --steps 5 --full-mode graph --fuse || status=$?
if [ -n "${OUT:-}" ]; then cp "$results"/*_cuda.* "$OUT"/ 2>/dev/null || true; fi
exit $status
