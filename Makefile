# Thin shortcuts; pyproject.toml holds the metadata, dependencies and tool settings.
PYTHON ?= python3

.PHONY: install system-data test demo benchmark-step lint

# Fashion-MNIST for the offline demo comes from Debian's dataset-fashion-mnist package.
system-data:
	@if [ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then :; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		(apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null \
		|| echo "warning: could not install dataset-fashion-mnist; fashion_mnist will load from the Hub"; \
	else echo "note: run 'sudo apt-get install dataset-fashion-mnist' for the offline demo"; fi

install: system-data
	$(PYTHON) -m pip install -q -e ".[dev]"

test: install
	HF_HUB_OFFLINE=1 $(PYTHON) -m pytest

demo: install
	HF_HUB_OFFLINE=1 $(PYTHON) scripts/train_image_classification.py

benchmark-step: install
	$(PYTHON) scripts/benchmark_step.py

lint:
	$(PYTHON) -m ruff check zsam_hf scripts tests
