# Gated VLM moderation on NVIDIA Triton. `make demo` and `make test` work from a fresh clone.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.setup-stamp
CHECKPOINTS := build/checkpoints
MODELS_STAMP := model_repository/language_decoder/1/artifact.json
PYTEST_ARGS ?=

.PHONY: setup models serve demo test test-unit lint perf bench lock render manifest release clean soak bench-int8 lora bench-ocr chaos bench-front-door

setup: $(STAMP)

# Idempotent: reruns only when the lock or the project metadata changes.
# redis-server is for tests only: they start their own on a free port (--save '' --appendonly no) and stop it, so
# the daemon the package would start on :6379 (where policy-rc.d lets it) is stopped and disabled right away.
# The lock pins setuptools and wheel too: the editable install builds without isolation.
$(STAMP): requirements.lock pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --no-deps -r requirements.lock
	$(PY) -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	@dpkg -s libb64-0d fonts-wqy-microhei redis-server >/dev/null 2>&1 || \
		{ apt-get update -qq && apt-get install -y -qq libb64-0d fonts-wqy-microhei redis-server && \
		  { systemctl disable --now redis-server >/dev/null 2>&1 || service redis-server stop >/dev/null 2>&1 || true; }; }
	@touch $@

$(CHECKPOINTS)/tiny-qwen3-vl/config.json: $(STAMP) export/build_tiny.py
	$(PY) -m export.build_tiny --out $(CHECKPOINTS)

$(MODELS_STAMP): $(CHECKPOINTS)/tiny-qwen3-vl/config.json export/export_models.py export/vision_export.py
	$(PY) -m export.export_models --qwen $(CHECKPOINTS)/tiny-qwen3-vl --clip $(CHECKPOINTS)/tiny-clip

# INT8 variants (export/quantize.py): model.int8.onnx beside each encoder, language_decoder_int8/1.
INT8_STAMP := model_repository/language_decoder_int8/1/artifact.json
$(INT8_STAMP): $(MODELS_STAMP) export/quantize.py moderation/vlm/int8.py
	$(PY) -m export.quantize

# PaddleOCR PP-OCRv4 from the rapidocr-onnxruntime wheel: ocr_detect / ocr_classify / ocr_recognize, parity-checked.
OCR_STAMP := model_repository/ocr_recognize/1/artifact.json
$(OCR_STAMP): $(STAMP) export/export_ocr.py moderation/ocr/reader.py
	$(PY) -m export.export_ocr

models: $(MODELS_STAMP) $(INT8_STAMP) $(OCR_STAMP)

serve: models
	$(PY) -m moderation.launch

demo: models
	$(PY) -m clients.demo

# ruff (rules and line length in pyproject.toml) and mypy on moderation/ ([tool.mypy]): CI fails on a lint or type
# error before any test runs. mypy keeps its cache in .mypy_cache (a cold run ~30 s, then about a second).
lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m mypy

test: lint models
	$(PY) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

test-unit: models
	$(PY) -m pytest -q -p no:cacheprovider -m "not integration" $(PYTEST_ARGS)

render:
	$(PY) -m moderation.repository.render --target local --out model_repository

# make release MODEL=language_decoder [CHECKPOINT=/path/to/ckpt]: the next version dir + its artifact record
release: models
	$(PY) -m export.release --model $(MODEL) $(if $(CHECKPOINT),--checkpoint $(CHECKPOINT))

manifest:
	$(PY) -m moderation.repository.manifest --write

lock:
	$(PY) -m pip freeze --all --exclude-editable | grep -v '^pip==' > requirements.lock

clean:
	rm -rf build

# perf_analyzer against a server (started here unless PERF_ARGS="--url HOST:HTTP_PORT --key KEY"); checks
# perf/budgets.yaml, writes perf/results/. Exit 1 when a budget is broken.
perf: models
	$(PY) -m perf run_perf $(PERF_ARGS)

# Every benchmark and study is a scenario of `python -m perf` (`python -m perf --list` names them):
# `make bench S=<scenario> ARGS="<its options>"` runs one; `make bench` alone runs the side-by-side ratios
# (Triton vs in-process, prefill vs generate-200, gated vs all-to-VLM, batching, cache). The other perf targets
# here are aliases of one scenario each.
bench: models
	$(PY) -m perf $(if $(S),$(S) $(ARGS),bench $(BENCH_ARGS))

# Bounded soak (not part of `make test`): 2000 mixed good/bad requests against its own server; stub RSS sampled
# with psutil; writes perf/results/soak/last.json and fails when a stub grows past the bound or an answer is
# not the expected one (docs/reliability.md).
soak: models
	$(PY) -m perf soak $(SOAK_ARGS)

# INT8 vs fp32 agreement and speed (encoders and decoder side by side, in-process): perf/results/int8.json
bench-int8: models
	$(PY) -m perf int8_bench $(BENCH_INT8_ARGS)

# Fit the slang LoRA adapter (export/data/slang_lora.jsonl) on the decoder, CPU; LORA_ARGS="--release model_repository"
# also releases it as the next language_decoder version (swap it live with clients.admin).
lora: models
	$(PY) -m export.train_lora $(LORA_ARGS)

# OCR accuracy and cost, term matching, OCR on/off on a real server side by side: perf/results/ocr.json
bench-ocr: models
	$(PY) -m perf ocr_bench $(BENCH_OCR_ARGS)

# A fault schedule under load (perf/chaos.py): 0 requests lost, every row readable, none forged; commits the report.
chaos: models
	$(PY) -m perf chaos --seconds 120

# The public port under hostile load (perf/front_door.py): oversized messages and a greedy client.
bench-front-door: models
	$(PY) -m perf front_door

# The audit report at scale: the DuckDB report (clients/report.py) on 1 M generated rows, time and peak memory per
# run, the limited arm must agree (perf/report_bench.py): perf/results/report_bench.json
.PHONY: bench-report
bench-report: $(STAMP)
	$(PY) -m perf report_bench $(BENCH_REPORT_ARGS)
