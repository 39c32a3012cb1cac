# hybridad: `make help` lists the targets.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
CAT     ?= can
DATA    ?= data/mvtec_ad2
ARGS    ?=
RUNS    ?= runs
# make submission: the tree's folder, its categories (default all 8), a dataset root to take the file counts
# from (default: the official counts) and OVERWRITE=1 to replace an existing tree
SUBMISSION ?= submission
CATEGORIES ?=
DATA_ROOT  ?=
OVERWRITE  ?=
SUBMISSION_SCOPE = $(if $(strip $(CATEGORIES)),--categories $(CATEGORIES)) $(if $(strip $(DATA_ROOT)),--data-root $(DATA_ROOT))
export NO_ALBUMENTATIONS_UPDATE := 1
export HF_HUB_OFFLINE := 1
export WANDB_MODE ?= offline
export PYTHONUNBUFFERED := 1

.PHONY: help install test test-all demo demo-photos train train-all gpu-check bench submission clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

install: $(STAMP) ## create .venv with pip (a second run changes nothing)

$(STAMP): pyproject.toml requirements.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

test: $(STAMP) ## fast test suite (excludes tests marked slow)
	$(BIN)/python -m pytest -q

test-all: $(STAMP) ## every test, the slow ones included
	$(BIN)/python -m pytest -q -m "not gpu"

demo: $(STAMP) ## synthetic dataset -> train tiny models -> evaluate -> submission -> report
	$(BIN)/python -m hybridad demo --out demo_out $(ARGS)

# demo-photos: real photographs (scikit-image's brick, grass, gravel, moon, immunohistochemistry and Hubble
# deep field) with defect families no generator of ours makes; each texture runs in the fabric slot (its routing
# and post-processing, closing scaled to 128 px) with the demo's tiny INP-Former preset, through the normal CLI:
# train, evaluate (each compared label-free rule), report.
PHOTOS     ?= demo_photos
PHOTO_ARGS := data.category=fabric name=demo inp_former.preset=tiny "inp_former.weights=''" data.num_workers=0 \
  logging.wandb=false trainer.check_val_every_n_epoch=100000 trainer.enable_progress_bar=false \
  data.augment.exposure=0.8 data.augment.probability=0.7 data.tiling.input_size=112 data.batch_size=8 \
  trainer.max_epochs=-1 trainer.max_steps=160 inp_former.warmup_steps=20 postprocess.closing_kernel=4

demo-photos: $(STAMP) ## threshold rules on real photographs and unseen defects: train, evaluate, report per texture
	$(BIN)/python -m data_modules.photos --root $(PHOTOS)/data
	for t in $$($(BIN)/python -c 'from data_modules.photos import TEXTURES; print(*TEXTURES)'); do \
	  rm -rf $(PHOTOS)/runs/$$t; \
	  $(BIN)/python -m hybridad train data.root=$(PHOTOS)/data/$$t out_dir=$(PHOTOS)/runs/$$t $(PHOTO_ARGS) $(ARGS) \
	    || exit 1; \
	  for m in $$($(BIN)/python -c 'from hybridad.threshold_rules import compared_rules as c; print(*[r.name for r in c() if not r.tuned_on_test])'); do \
	    $(BIN)/python -m hybridad evaluate $(PHOTOS)/runs/$$t/fabric/demo threshold.method=$$m || exit 1; done; \
	  $(BIN)/python -m hybridad report $(PHOTOS)/runs/$$t/fabric/demo --out $(PHOTOS)/report/$$t || exit 1; \
	done

train: $(STAMP) ## train one category: make train CAT=can DATA=<root> ARGS="key=value ..." (ARGS=resume=latest continues)
	$(BIN)/python -m hybridad train data.category=$(CAT) data.root=$(DATA) $(ARGS)

train-all: $(STAMP) ## every category, routed branch; GPUS=0,1,2,3 runs one per GPU at once; skips completed ones
	$(BIN)/python -m hybridad train-all $(if $(GPUS),--gpus $(GPUS)) data.root=$(DATA) $(ARGS)

gpu-check: $(STAMP) ## GPU timings and memory into gpu_check.json (one line and exit 0 without CUDA)
	$(BIN)/python -m bench.gpu_check --out gpu_check.json

bench: $(STAMP) ## benchmarks (timings and memory, printed as a table)
	$(BIN)/python -m bench

submission: $(STAMP) ## write, check, pack: make submission RUN_DIRS="runs/*/latest" [CATEGORIES="can vial"] [DATA_ROOT=<root>] [OVERWRITE=1]
	$(if $(strip $(RUN_DIRS)),,$(error give the run or evaluation directories: make submission RUN_DIRS="runs/*/latest"))
	$(BIN)/python -m hybridad submission write $(RUN_DIRS) --out $(SUBMISSION) $(if $(OVERWRITE),--overwrite)
	$(BIN)/python -m hybridad submission check $(SUBMISSION) $(SUBMISSION_SCOPE)
	$(BIN)/python -m hybridad submission pack $(SUBMISSION) --out $(SUBMISSION).tar.gz $(SUBMISSION_SCOPE)

clean: ## remove caches and demo output (keeps .venv and runs/)
	rm -rf demo_out demo_photos .pytest_cache
	find . -name __pycache__ -prune -exec rm -rf {} +
