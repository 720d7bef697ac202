# Thin shortcuts; pyproject.toml holds the metadata, dependency ranges and tool settings.
PYTHON ?= python3
# The exact versions CI tests with; users installing zsam-hf get pyproject.toml's ranges instead.
CONSTRAINTS ?= .ci/constraints.txt
OLDEST_VENV ?= build/venv-oldest

.PHONY: install system-data test test-oldest demo benchmark-step lint lock docs

# Fashion-MNIST for the offline demo comes from Debian's dataset-fashion-mnist package.
system-data:
	@if [ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then :; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		(apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null \
		|| echo "warning: could not install dataset-fashion-mnist; fashion_mnist will load from the Hub"; \
	else echo "note: run 'sudo apt-get install dataset-fashion-mnist' for the offline demo"; fi

install: system-data
	$(PYTHON) -m pip install -q -c $(CONSTRAINTS) -e ".[dev]"

test: install
	HF_HUB_OFFLINE=1 $(PYTHON) -m pytest

# The core alone (no extras) on the oldest supported versions, CPU torch 2.13 among them. The
# fault-injection tests (minutes of SIGKILLed subprocesses) run once, in `make test`; every other
# checkpoint test (staging, manifests, resume, rotation) runs here too.
test-oldest:
	$(PYTHON) -m venv $(OLDEST_VENV)
	$(OLDEST_VENV)/bin/python -m pip install -q -c .ci/constraints-oldest.txt ".[test]"
	HF_HUB_OFFLINE=1 $(OLDEST_VENV)/bin/python -m pytest tests/core -m "not fault_injection"

demo: install
	HF_HUB_OFFLINE=1 $(PYTHON) scripts/train_image_classification.py

benchmark-step: install
	$(PYTHON) scripts/benchmark_step.py

# The documentation site, built with warnings as errors (a broken link, anchor or reference fails).
docs:
	$(PYTHON) -m pip install -q -c $(CONSTRAINTS) -e ".[docs]"
	NO_MKDOCS_2_WARNING=1 $(PYTHON) -m mkdocs build --strict

lint:
	$(PYTHON) -m ruff format --check .
	$(PYTHON) -m ruff check .

# CI's exact versions: the resolved closure of pyproject.toml's dependencies and every extra (dev pulls
# them all in), for Python 3.11 on x86_64 Linux, with the torch pair CI has on disk.
lock:
	$(PYTHON) -m uv pip compile pyproject.toml --extra dev --python-version 3.11 \
		--python-platform x86_64-unknown-linux-gnu -c .ci/lock-pins.txt \
		--custom-compile-command "make lock" -o $(CONSTRAINTS) -q
