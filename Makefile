# Two commands a newcomer needs:  `make demo` (the main job)  and  `make test` (lint + tests).
# Both create .venv in the repository and install everything from scratch, at the exact versions of
# requirements/lock.txt (torch: the CPU build 2.13.0; setup.py itself stays loose).
# `make lock` re-resolves the lock from setup.py in a clean venv; `make test-latest` runs the same suite
# in .venv-latest on the newest releases setup.py allows (run it whenever the lock is refreshed).
PY ?= python3
TORCH_PIN ?= torch==2.13.0
EXTRAS := dev,compare,deepspeed,real
LOCK := requirements/lock.txt
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LATEST := .venv-latest

.PHONY: demo test test-latest lock lint bench native clean

# $(call install,VENV,PIP_OPTIONS): a venv with the project (editable) and its extras
define install
	test -x $(1)/bin/python || $(PY) -m venv $(1)
	$(1)/bin/python -m pip install -q $(2) --upgrade pip "setuptools>=64" wheel cmake numpy
	$(1)/bin/python -m pip install -q $(2) "$(TORCH_PIN)"
	$(1)/bin/python -m pip install -q $(2) --no-build-isolation -e ".[$(EXTRAS)]" "$(TORCH_PIN)"
	$(1)/bin/python -c "import adaswitch, adaswitch.kernels; print('adaswitch', adaswitch.__version__, 'native op:', adaswitch.native_available())"
endef

$(STAMP): setup.py pyproject.toml CMakeLists.txt $(LOCK) $(wildcard kernels/csrc/*.cpp kernels/csrc/*.h)
	$(call install,$(VENV),-c $(LOCK))
	$(BIN)/python requirements/check_lock.py --installed
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/adaswitch demo $(ARGS)

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q $(ARGS)

# the newest releases setup.py allows, in a venv of its own (always re-resolved)
test-latest:
	rm -rf $(LATEST)
	$(call install,$(LATEST),)
	$(LATEST)/bin/python -m pip list --format=freeze | grep -iE '^(torch|transformers|accelerate|datasets|tokenizers|triton|kernels|trl|liger.kernel|deepspeed|numpy)=='
	$(LATEST)/bin/ruff check .
	$(LATEST)/bin/python -m pytest -q $(ARGS)

lock:
	PY=$(PY) TORCH_PIN="$(TORCH_PIN)" EXTRAS=$(EXTRAS) bash requirements/make_lock.sh

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	$(BIN)/adaswitch bench $(ARGS)

native: $(STAMP)
	$(BIN)/python setup.py -q build_ext --inplace

clean:
	rm -rf build $(VENV) $(LATEST) adaswitch/_C*.so adaswitch/_C*.so.tmp
