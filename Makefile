# The few verbs a newcomer needs. Everything runs from the repository's own virtualenv (.venv).
PY := .venv/bin/python
STACK ?= dev
IMAGE ?= serving
ARGS ?=

KEEP ?=
NAME ?=
TARGET ?= eks
KEYS_FILE ?= keys
PYTEST_PROGRESS := -o console_output_style=progress --durations=15 --durations-min=2

.PHONY: setup demo demo-compress preview test test-fast lint format bench clean push-image upload-model put-api-keys job-status job-wait

setup: .venv/.installed  ## create .venv and install the pinned dependencies (torch is the CPU wheel)

.venv/.installed: requirements.txt
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet --progress-bar off -r requirements.txt
	touch $@

demo: setup  ## the main job: preview the dev stack, then fine-tune SmolLM2 -> export -> serve -> ask, locally (no cloud account); KEEP=1 keeps the model
	$(PY) -m ops.local_e2e $(if $(KEEP),--keep)

demo-compress: setup  ## the demo, then prune the fine-tuned SmolLM2, distil it from the teacher, serve it (int8) and compare
	$(PY) -m ops.local_e2e --compress

preview: setup  ## offline preview of one stack: make preview STACK=prod
	$(PY) -m ops.preview $(STACK)

push-image: setup  ## build and push an image, tagged from git: make push-image STACK=dev IMAGE=serving [ARGS=--dry-run]
	$(PY) -m ops.artifacts push-image --stack $(STACK) --image $(IMAGE) $(ARGS)

upload-model: setup  ## upload a model directory: make upload-model STACK=dev MODEL_DIR=out/model MODEL=debug-llama [ARGS=--dry-run]
	$(PY) -m ops.artifacts upload-model --stack $(STACK) --model-dir $(MODEL_DIR) --name $(MODEL) $(ARGS)

put-api-keys: setup  ## store the serving keys file: make put-api-keys STACK=dev KEYS_FILE=keys [ARGS="--hash --dry-run"]
	$(PY) -m ops.artifacts put-api-keys --stack $(STACK) --keys-file $(KEYS_FILE) $(ARGS)

job-status: setup  ## a training job's state and progress: make job-status STACK=dev TARGET=eks NAME=run1
	$(PY) -m ops.jobs status $(NAME) --stack $(STACK) --target $(TARGET) $(ARGS)

job-wait: setup  ## follow a training job to its model: make job-wait STACK=dev TARGET=sagemaker NAME=run1
	$(PY) -m ops.jobs wait $(NAME) --stack $(STACK) --target $(TARGET) $(ARGS)

# The inner loop's modules: the layering rules, the config and policy checks, the cost and launcher validation, and
# the engine, sampler, loss and checkpoint unit tests; no mock-engine stack runs, servers, torchrun or real model.
FAST_TESTS := tests/test_layout.py tests/policy tests/infra/test_config.py tests/ops/test_cost_and_compare.py \
	tests/ops/test_launch_validation.py tests/serving/test_serving_scheduler.py tests/serving/test_serving_sampler.py \
	tests/training/test_train_units.py tests/training/test_train_loss.py tests/training/test_train_checkpointer.py

test: setup  ## the whole test suite (what CI runs; about 22 minutes on 2 cores): progress in %, then the 15 slowest tests
	$(PY) -m pytest $(PYTEST_PROGRESS)

test-fast: setup  ## the inner loop (under 3 minutes): FAST_TESTS without the real-model tests, stopping at the first failure
	$(PY) -m pytest $(PYTEST_PROGRESS) -x -m "not real_model" $(FAST_TESTS)

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
