# Two commands do all the set-up on a fresh machine:
#   make quickstart   venv + Fashion-MNIST shards + SimCLR on 2 CPU processes + eval + export
#   make test         venv + the whole test suite (what .ci/run calls)
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch first, from the versions this machine serves locally; override on other machines (e.g. TORCH_SPEC=torch).
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
FMNIST := /usr/share/datasets/fashion-mnist
# img2dataset pins webdataset<0.3 (the project uses 1.0.x): the tests run it from a virtualenv of its own.
IMG2DATASET_VENV ?= .venv-img2dataset
IMG2DATASET_SPEC ?= img2dataset>=1.45,<2
DATA := data/fashion-mnist

.PHONY: quickstart test install img2dataset data data-captions lint clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e '.[all]'
	touch $@

install: $(VENV)/.installed

$(IMG2DATASET_VENV)/.installed:
	$(PYTHON) -m venv $(IMG2DATASET_VENV)
	$(IMG2DATASET_VENV)/bin/python -m pip install -q '$(IMG2DATASET_SPEC)'
	touch $@

img2dataset: $(IMG2DATASET_VENV)/.installed

$(FMNIST)/train-images-idx3-ubyte.gz:
	@if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; \
	else sudo apt-get update -qq && sudo apt-get install -y -qq dataset-fashion-mnist; fi

$(DATA)/train/manifest.json $(DATA)/test/manifest.json &: $(VENV)/.installed $(FMNIST)/train-images-idx3-ubyte.gz
	$(PY) -m pipeline shards write --format idx --classes fashion-mnist --shard-size 5000 \
	  --input $(FMNIST)/train-images-idx3-ubyte.gz --labels $(FMNIST)/train-labels-idx1-ubyte.gz --output $(DATA)/train
	$(PY) -m pipeline shards write --format idx --classes fashion-mnist --shard-size 5000 \
	  --input $(FMNIST)/t10k-images-idx3-ubyte.gz --labels $(FMNIST)/t10k-labels-idx1-ubyte.gz --output $(DATA)/test

# Captioned train shards for configs/clip.yaml: each image's txt is a prompt with its class name.
$(DATA)-captions/train/manifest.json: $(VENV)/.installed $(FMNIST)/train-images-idx3-ubyte.gz
	$(PY) -m pipeline shards write --format idx --classes fashion-mnist --shard-size 5000 --captions \
	  --input $(FMNIST)/train-images-idx3-ubyte.gz --labels $(FMNIST)/train-labels-idx1-ubyte.gz --output $(DATA)-captions/train

data: $(DATA)/train/manifest.json

data-captions: $(DATA)-captions/train/manifest.json

quickstart: $(VENV)/.installed data
	rm -rf runs/quickstart
	OMP_NUM_THREADS=1 $(PY) -m pipeline launch configs/quickstart.yaml $(ARGS)

test: $(VENV)/.installed $(IMG2DATASET_VENV)/.installed $(FMNIST)/train-images-idx3-ubyte.gz
	$(PY) -m pytest -q -rs $(PYTEST_ARGS)

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check pipeline launchers tests benchmarks

clean:
	rm -rf runs data
