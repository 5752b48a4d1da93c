# Two entry points (see README): `make demo` and `make test`. Both build .venv from pinned files.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# torch goes first and pinned: an unpinned torch pulls a multi-GB CUDA build on these machines.
TORCH  := torch==2.13.0
# open_clip ships the real CLIP BPE vocabulary. --no-deps: its deps would replace the CPU torch.
OPEN_CLIP := open-clip-torch==3.3.0

.PHONY: install demo test test-quick test-browser browser-deps lint clean

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -r requirements.txt -r requirements-dev.txt
	$(BIN)/python -m pip install --quiet --no-deps $(OPEN_CLIP)
	$(BIN)/python -m pip install --quiet --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/compinv-rt doctor
	$(BIN)/compinv-rt generate "a red star and a blue circle on grass" -n 8 --out outputs/demo

test: $(STAMP)
	$(BIN)/python -m pytest -n 2 --dist loadgroup -q --durations=15

# The fast subset for the edit-test loop (<= 60 s on 2 cores): everything not marked slow.
test-quick: $(STAMP)
	$(BIN)/python -m pytest -n 2 --dist loadgroup -q -m "not slow"

# The playground in headless Chromium (tests/test_browser.py, marker `browser`): Debian's chromium
# driven by Playwright's Python client (in requirements-dev.txt; no browser download). Without
# chromium the tests skip with a reason. SCREENSHOT=docs/playground.png refreshes the README's picture.
test-browser: $(STAMP)
	COMPINV_PLAYGROUND_SCREENSHOT=$(SCREENSHOT) OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -m browser -rs tests/test_browser.py

# The one command that installs the browser (as root; Debian/Ubuntu): the system's Chromium.
browser-deps:
	command -v chromium >/dev/null || (apt-get update && apt-get install -y chromium)

# ruff (lint + import order; never `ruff format`) and mypy, configured in pyproject.toml.
lint: $(STAMP)
	$(BIN)/ruff check compinv_rt
	$(BIN)/lint-imports
	$(BIN)/mypy

clean:
	rm -rf $(VENV) outputs .pytest_cache
