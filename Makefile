# Two commands on a fresh machine: `make demo` and `make test` (both create .venv if missing).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# torch first, pinned: on a CPU-only machine this resolves to the CPU build. A GPU user installs
# their CUDA build of torch into .venv before `make` (see README), and this step keeps it.
TORCH_SPEC ?= torch==2.13.0

export RAY_USAGE_STATS_ENABLED := 0
export MLFLOW_DISABLE_TELEMETRY := true
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_NO_ADVISORY_WARNINGS := 1

.PHONY: install demo demo-generate test test-fast bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)" 2>&1 | grep -v "is ignored" || true
	$(PY) -m pip install -q -e '.[test]' 2>&1 | grep -v "is ignored" || true
	$(PY) -c "import torch, transformers, ray, deepspeed, mlflow, s3fs, wand"
	touch $(STAMP)

# The main job on the embedded default: a random-token corpus (until the structured synthetic
# corpus lands), then precompute -> 2 curriculum stages (Ray Train + DeepSpeed, 2 CPU workers) ->
# student. A local Ray instance is started by the job itself.
demo: install
	test -f runs/corpus/tiny-cosyvoice2/corpus.parquet || \
	  $(PY) jobs/make_random_corpus.py --model cosyvoice2 --size tiny --rows 64 --output runs/corpus/tiny-cosyvoice2
	$(PY) jobs/distill.py --config jobs/configs/tiny.yaml

# Decoding with full attention vs WAND on tiny random models of the three backbones.
demo-generate: install
	$(PY) jobs/demo_generate.py

test: install
	$(PY) -m pytest tests

test-fast: install
	$(PY) -m pytest tests -m "not slow"

bench: install
	$(PY) benchmarks/decode_latency.py
	$(PY) benchmarks/kv_cache_table.py
	$(PY) benchmarks/topk_precompute.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
