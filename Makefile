# pagemill make targets are the docs: README lists the same commands.
# `make test` and `make run` install into ./.venv first (CPU path, torch==2.13.0 pinned).

VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
ARGS   ?=
PYTEST_ARGS ?=

.PHONY: install check test test-slow test-fast run smoke bench submit nightly clean

$(STAMP): pyproject.toml constraints-cpu.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints-cpu.txt torch==2.13.0
	$(PY) -m pip install -q -c constraints-cpu.txt -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

## the lint and type gate (CI runs it before the tests): format, lint rules and pyright as in
## pyproject.toml / pyrightconfig.json
check: $(STAMP)
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pyright --pythonpath $(PY)

## the test command (CI runs exactly this through .ci/run): the default suite, every test but the
## heavier `slow` end-to-end scenarios (and `gpu`); within 15 minutes on the 2-core CI machine
test: $(STAMP)
	CUDA_VISIBLE_DEVICES= $(PY) -m pytest -q -m "not slow and not gpu" $(PYTEST_ARGS)

## the `slow` end-to-end scenarios (job subprocesses on embedded Ray: corpus, SIGKILL + resume on
## file:// and moto S3, incremental and forced reruns, quarantine, lease, stat-cache GETs, ray job
## submit, multi-node); CI runs them right after `make test`
test-slow: $(STAMP)
	CUDA_VISIBLE_DEVICES= $(PY) -m pytest -q -m "slow and not gpu" $(PYTEST_ARGS)

test-fast: $(STAMP)
	CUDA_VISIBLE_DEVICES= $(PY) -m pytest -q -m "not slow and not parity" $(PYTEST_ARGS)

## the main job on the embedded default (local Ray, the bundled sample PDFs, real model)
run: $(STAMP)
	$(PY) -m pipeline.run $(ARGS)

## three corpus PDFs end to end on local Ray with the tiny random-weight model
smoke: $(STAMP)
	$(PY) -m pipeline.run model=tiny_random input.uri=tests/data output.uri=out/smoke $(ARGS)

bench:  ## GPU engine benchmark (needs CUDA): make bench ARGS="--pages 2000"
	$(PY) -m jobs.benchmark $(ARGS)

## submit to a running cluster: RAY_ADDRESS=http://head:8265 make submit ARGS="input.uri=s3://… output.uri=s3://…"
submit:
	bash jobs/submit.sh $(ARGS)

nightly:
	bash jobs/nightly.sh $(ARGS)

clean:
	rm -rf out .pytest_cache
