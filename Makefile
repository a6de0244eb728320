# Two commands a user needs: `make run` (the dashboard) and `make test` (the whole suite).
# Both set everything up from nothing and skip what is already installed.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
FMNIST := /usr/share/datasets/fashion-mnist
PORT ?= 8501

.PHONY: setup data browser run test lint teacher examples lesson results clean

setup: $(STAMP) data

$(STAMP): requirements.txt pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV) || { echo "Cannot create a virtual environment: install Python 3.11 with venv (apt-get install python3-venv)."; exit 1; }
	$(PY) -m pip install -q --upgrade pip "setuptools>=68"
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	@touch $(STAMP)

# Fashion-MNIST comes from Debian's dataset-fashion-mnist package (or a folder you name).
data:
	@if [ -n "$$ROBUSTKD_FASHION_MNIST" ] || [ -e $(FMNIST)/t10k-images-idx3-ubyte.gz ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q dataset-fashion-mnist; \
	else \
	  echo "Fashion-MNIST is missing: run 'sudo apt-get install dataset-fashion-mnist', or set ROBUSTKD_FASHION_MNIST to a folder holding its four IDX files."; exit 1; \
	fi

# Debian's Chromium for the end-to-end browser tests (Playwright drives it; no browser download).
browser:
	@if [ -x /usr/bin/chromium ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; \
	else \
	  echo "Chromium is missing for the browser tests: run 'sudo apt-get install chromium'."; exit 1; \
	fi

run: setup
	$(PY) -m streamlit run app/main.py --server.port $(PORT)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

test: setup browser lint
	$(PY) -m pytest -q

# Rebuild the shipped default teacher (see README: seed, wall time, ACC/ASR).
teacher: setup
	$(VENV)/bin/robustkd train-teacher --preset fashion-badnets --out assets/default_teacher.safetensors

# Rebuild the shipped example teachers (assets/examples/): attacks built to survive distillation
# or to evade the variance defence, 6 epochs each (README: "Attacks that survive distillation").
examples: setup
	$(VENV)/bin/robustkd train-teacher --preset fashion-optimized --epochs 6 --out assets/examples/optimized-blend.safetensors
	$(VENV)/bin/robustkd train-teacher --preset fashion-adaptive --epochs 6 --out assets/examples/adaptive.safetensors
	$(VENV)/bin/robustkd train-teacher --preset fashion-adaptive-learned --epochs 6 --out assets/examples/adaptive-learned.safetensors
	$(VENV)/bin/robustkd train-teacher --preset fashion-adaptive-class --epochs 6 --out assets/examples/adaptive-class.safetensors
	$(VENV)/bin/robustkd train-teacher --preset fashion-adba --epochs 6 --out assets/examples/adba.safetensors

# Rebuild the Teach page's shipped students (assets/lesson/): the shipped teacher distilled
# three ways for 40 epochs on 50,000 images, then re-evaluated on the CPU (README: "The classroom lesson").
lesson: setup
	rm -rf runs/lesson
	$(VENV)/bin/robustkd compare --preset fashion-badnets-lesson --methods scratch,feature-kd,robustkd --quiet --out runs/lesson
	$(PY) -m robustkd.experiments.lesson runs/lesson --out assets/lesson

# The comparison tables of docs/results.md (about 40 minutes on 2 CPU cores).
results: setup
	$(PY) -m bench.results --out runs/results

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis test-artifacts
