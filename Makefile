# Two commands a newcomer needs:  `make demo` (the main job)  and  `make test` (lint + tests).
# Both create .venv in the repository and install everything from scratch (torch pinned to the CPU
# build 2.13.0 here; setup.py itself stays loose).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_PIN ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench native clean

$(STAMP): setup.py pyproject.toml CMakeLists.txt $(wildcard kernels/csrc/*.cpp kernels/csrc/*.h)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip "setuptools>=64" wheel cmake numpy
	$(BIN)/python -m pip install -q "$(TORCH_PIN)"
	$(BIN)/python -m pip install -q --no-build-isolation -e ".[dev,compare,deepspeed]" "$(TORCH_PIN)"
	$(BIN)/python -c "import adaswitch, adaswitch.kernels; print('adaswitch', adaswitch.__version__, 'native op:', adaswitch.native_available())"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/adaswitch demo $(ARGS)

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	$(BIN)/adaswitch bench $(ARGS)

native: $(STAMP)
	$(BIN)/python setup.py -q build_ext --inplace

clean:
	rm -rf build $(VENV) adaswitch/_C*.so
