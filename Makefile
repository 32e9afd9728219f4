# ktl — one command each: `make demo` runs the main job, `make test` passes the tests.
# Both do all set-up first (venv in .venv, CPU torch wheel where it is on disk, editable install,
# Fashion-MNIST from Debian when running as root).

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.ktl-setup
FMNIST := /usr/share/datasets/fashion-mnist
# The CPU build of torch on disk (no CUDA download); falls back to the registry's torch elsewhere.
TORCH_WHEEL ?= $(firstword $(wildcard /opt/wheels/torch-*+cpu-cp3*-manylinux*.whl))
TORCH_SPEC  := $(if $(TORCH_WHEEL),$(TORCH_WHEEL),torch)

.PHONY: setup demo test test-all lint clean data

setup: $(STAMP) data

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev,flower]"
	touch $@

# Fashion-MNIST (IDX .gz files) and the Noto Color Emoji font (`ktl pretrain-generator`'s image set) from
# Debian's packages; needs root. Without them `ktl simulate` / `ktl pretrain-generator` say how to get them.
# Debian's Chromium too, for the console's browser tests (Playwright drives it; no browser download).
EMOJI := /usr/share/fonts/truetype/noto/NotoColorEmoji.ttf
data:
	@if { [ ! -e $(FMNIST)/train-images-idx3-ubyte.gz ] || [ ! -e $(EMOJI) ]; } && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing dataset-fashion-mnist fonts-noto-color-emoji"; \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist fonts-noto-color-emoji >/dev/null) \
			|| echo "note: could not install dataset-fashion-mnist / fonts-noto-color-emoji"; \
	fi
	@if ! command -v chromium >/dev/null && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing chromium (the console's browser tests)"; \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
			|| echo "note: could not install chromium: the console's browser tests will be skipped"; \
	fi

demo: setup
	$(BIN)/ktl demo

# Two pytest-xdist workers at one torch thread each: the suite's tiny models gain nothing from a second
# intra-op thread, and many tests wait on servers and subprocesses, so two workers use both cores.
# TEST_WORKERS=0 runs in one process (set it to the core count on a bigger machine).
TEST_WORKERS ?= 2
TEST_ENV := OMP_NUM_THREADS=1 MKL_NUM_THREADS=1

test: setup
	$(TEST_ENV) $(BIN)/python -m pytest -q -n $(TEST_WORKERS)

# Everything, the slow end-to-end runs included.
test-all: setup
	$(TEST_ENV) $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --runslow

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy ktl generator aligner clients api

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
