# Two commands from a fresh clone: `make demo` and `make test`. Both build .venv first.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH := torch==2.13.0
TL3 := transformer-lens==3.9.*
TL4 := transformer-lens>=4,<5
DEMO_OUT ?= demo_out

.PHONY: setup demo test lint pytest test-tl4 bench clean

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e ".[dev]" "$(TL3)"
	touch $@

setup: $(BIN)/.installed

demo: setup
	$(BIN)/codebook-lens demo --out $(DEMO_OUT)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

pytest: setup
	$(BIN)/pytest -m "not slow"

test: lint pytest

# Second leg: TransformerBridge tests on transformer-lens 4.x (no HookedTransformer there, so
# only the files whose tests are parametrized over both backends are collected).
.venv-tl4/.installed: pyproject.toml
	$(PY) -m venv .venv-tl4
	.venv-tl4/bin/pip install -q $(TORCH)
	.venv-tl4/bin/pip install -q -e ".[dev]" "$(TL4)"
	touch $@

test-tl4: .venv-tl4/.installed
	.venv-tl4/bin/pytest -m "bridge and not slow" tests/integration/test_model.py \
		tests/integration/test_io.py tests/integration/test_analysis_model.py

bench: setup
	$(BIN)/pip install -q -e ".[bench]"
	$(BIN)/python benchmarks/bench_quantizer.py
	$(BIN)/python benchmarks/bench_model.py

clean:
	rm -rf $(VENV) .venv-tl4 $(DEMO_OUT) .pytest_cache .ruff_cache
