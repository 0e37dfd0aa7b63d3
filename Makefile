# `make test` and `make demo` work on a fresh machine: the first use builds a
# project-local virtual environment in .venv with one resolver run.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# The dagster command `make ui` runs (the tests put a stand-in here).
DAGSTER_BIN ?= $(VENV)/bin/dagster

.PHONY: install test demo ui lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest agrifm_pipeline_tests

# The main job: the demo region (data/regions) for 2019 through every asset, into
# .agrifm/ (SQLite Dagster home + local Zarr). CHECKPOINT=untrained:0 works offline.
demo: $(STAMP)
	$(PY) -m agrifm_pipeline.cli demo $(if $(CHECKPOINT),--checkpoint $(CHECKPOINT))

# The Dagster UI over the same home, with the demo's settings when the demo wrote them
# (<home>/demo.env: grid, regions, checkpoint; a variable already set wins). Offline:
# make ui CHECKPOINT=untrained:0 (explicitly untrained weights). PORT=3001 serves on
# another port (default 3000; dagster dev's -p).
ui: $(STAMP)
	phome=$${AGRIFM_PIPELINE_HOME:-$(CURDIR)/.agrifm}; \
	home=$${DAGSTER_HOME:-$$phome/dagster}; \
	if [ -f "$$phome/demo.env" ]; then \
	  while IFS='=' read -r key value; do \
	    case "$$key" in ''|\#*) continue ;; esac; \
	    [ -n "$$(printenv "$$key")" ] || export "$$key=$$value"; \
	  done < "$$phome/demo.env"; \
	fi; \
	$(if $(CHECKPOINT),export RS_EMBED_AGRIFM_CKPT='$(CHECKPOINT)';) \
	DAGSTER_HOME="$$home" $(PY) -m agrifm_pipeline.cli home && \
	DAGSTER_HOME="$$home" $(DAGSTER_BIN) dev -w workspace.yaml $(if $(PORT),-p $(PORT))

lint: $(STAMP)
	$(VENV)/bin/ruff check agrifm_pipeline agrifm_pipeline_tests bench
	$(VENV)/bin/ruff format --check agrifm_pipeline agrifm_pipeline_tests bench
	$(VENV)/bin/mypy

bench: $(STAMP)
	$(PY) bench/bench_encoder.py

clean:
	rm -rf $(VENV) build *.egg-info
