# Two entry points (see README): `make demo` and `make test`. Both set up .venv first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Ray servers of local runs and tests bind to loopback only.
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
export RAY_AUTH_MODE := disabled
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: setup demo test bench bench-quick clean

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned: an unpinned torch pulls the newest CUDA build (GBs).
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test]"
	touch $@

setup: $(BIN)/.installed

demo: setup
	$(BIN)/python jobs/distill.py

# Two workers, a file each at a time, longest files first (tests/conftest.py:SLOWEST_FIRST): a serial run
# leaves a core idle while tests wait on Ray.
test: setup
	$(BIN)/python -m pytest -q -ra --durations=40 -n 2 --dist loadfile --no-loadscope-reorder tests

bench-quick: setup
	$(BIN)/python bench/run.py --quick

bench: setup
	$(BIN)/python bench/run.py

clean:
	rm -rf runs .pytest_cache
