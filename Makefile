# The few verbs a newcomer needs. Everything runs from the repository's own virtualenv (.venv).
PY := .venv/bin/python
STACK ?= dev
IMAGE ?= serving
ARGS ?=

.PHONY: setup demo demo-compress preview test lint format bench clean push-image upload-model

setup: .venv/.installed  ## create .venv and install the pinned dependencies (torch is the CPU wheel)

.venv/.installed: requirements.txt
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet --progress-bar off -r requirements.txt
	touch $@

demo: setup  ## the main job: preview the dev stack, then fine-tune SmolLM2 -> export -> serve -> ask, locally (no cloud account)
	$(PY) -m ops.local_e2e

demo-compress: setup  ## the demo, then prune the fine-tuned SmolLM2, distil it from the teacher, serve it (int8) and compare
	$(PY) -m ops.local_e2e --compress

preview: setup  ## offline preview of one stack: make preview STACK=prod
	$(PY) -m ops.preview $(STACK)

push-image: setup  ## build and push an image, tagged from git: make push-image STACK=dev IMAGE=serving [ARGS=--dry-run]
	$(PY) -m ops.artifacts push-image --stack $(STACK) --image $(IMAGE) $(ARGS)

upload-model: setup  ## upload a model directory: make upload-model STACK=dev MODEL_DIR=out/model MODEL=debug-llama
	$(PY) -m ops.artifacts upload-model --stack $(STACK) --model-dir $(MODEL_DIR) --name $(MODEL) $(ARGS)

test: setup  ## the whole test suite (what CI runs)
	$(PY) -m pytest -q

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	.venv/bin/zizmor --offline --min-severity high .github/workflows

format: setup
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

bench: setup  ## benchmarks print ratios against baselines measured in the same run
	$(PY) bench/train_throughput.py
	$(PY) bench/serve_throughput.py

clean:
	rm -rf .pytest_cache .ruff_cache runs out
