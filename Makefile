# Two commands from a fresh clone: `make demo` and `make test`. Both build .venv first, on
# transformer-lens 4.x (what `pip install codebook-lens` resolves today).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH := torch==2.13.0
TL3 := transformer-lens==3.9.*
TL4 := transformer-lens>=4,<5
DEMO_OUT ?= demo_out

.PHONY: setup demo test lint pytest test-slow test-tl3 compare-saes wheel-check bench docs clean

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e ".[dev]" "$(TL4)"
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

# The README's Results goals: the full-size TokFSM and LM demos and the base model's goal, the
# tests marked slow (`make test` deselects them). .ci/run runs them on the transformer-lens 4.x
# leg; they take most of their time in training (about 1,040 CPU seconds measured here).
test-slow: setup
	$(BIN)/pytest -m slow --durations=0

# Second leg: the whole suite on transformer-lens 3.9 (HookedTransformer and the bridge) with
# SAELens installed next to us (SAELens pins transformer-lens < 4).
.venv-tl3/.installed: pyproject.toml
	$(PY) -m venv .venv-tl3
	.venv-tl3/bin/pip install -q $(TORCH)
	.venv-tl3/bin/pip install -q -e ".[dev]" "$(TL3)" sae-lens
	touch $@

test-tl3: .venv-tl3/.installed
	.venv-tl3/bin/pytest -m "not slow"

# Codes versus SAELens TopK SAEs on the TokFSM demo model (docs/results/codes_vs_saes.md)
# and on the topic-stories LM; runs on the transformer-lens 3.9 leg, where SAELens installs.
# COMPARE_OUT/tokfsm and COMPARE_OUT/lm hold results.json, tables, figures and every dictionary.
COMPARE_OUT ?= compare_out
compare-saes: .venv-tl3/.installed
	.venv-tl3/bin/python -m codebook_lens.compare --out $(COMPARE_OUT)

# What a new user gets: a wheel of this tree in a fresh venv with CPU torch and no other pins,
# the README quickstart and `codebook-lens demo --small` run from outside the source tree.
wheel-check:
	bash scripts/wheel_check.sh

bench: setup
	$(BIN)/pip install -q -e ".[bench]"
	$(BIN)/python benchmarks/bench_quantizer.py
	$(BIN)/python benchmarks/bench_model.py

# The documentation site (mkdocs.yml) in site/: README as Home, docs/*.md, the tutorials and the
# API reference from the docstrings. --strict fails on a broken link, a docstring griffe cannot
# parse and (docs/hooks/public_api.py) a public name without a docstring.
$(BIN)/.docs-installed: $(BIN)/.installed
	$(BIN)/pip install -q -e ".[docs]"
	touch $@

docs: $(BIN)/.docs-installed
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict -d site

clean:
	rm -rf $(VENV) .venv-tl3 $(DEMO_OUT) site .pytest_cache .ruff_cache
