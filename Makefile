# Everyday tasks. Every target creates the virtual environment it needs (.venv)
# on first use, so each works on a fresh machine with only python3, gcc and
# cmake installed (and nvcc, optionally, for the CUDA kernels).
#
#   make demo        synthetic data through the runtime, end to end
#   make test        fast tests (the command CI runs)
#   make test-all    fast + integration tests (real data, slower)
#   make lint        ruff, ruff format --check, mypy, clang-format --dry-run
#   make bench       kernel throughput table (JSON in out/bench/)
#   make train-bottle  PaDiM tiled ensemble on ../shared/data/mvtec_bottle, then evaluation
#   make bench-train   tiled vs monolithic train+eval on bottle: metrics, time, peak RSS
#   make bench-predictor  runtime.Predictor vs the eager PyTorch ensemble on bottle: latency, stages, RSS
#   make bench-latency    tilead-bench on the bottle bundle, batch 1 and 4, beside PyTorch (--compare torch)
#   make bench-detectors  PaDiM, PatchCore (map max / reweighted score), STFPM on bottle side by side
#   make bench-int8      FP32 vs INT8 bottle bundle (tilead-export --precision int8), alternating, one process
#   make bench-vs-anomalib  anomalib 2.7's tiled-ensemble core beside the Predictor on bottle, one process (ratio of medians)
#                           (VS_ANOMALIB_BUNDLE=bundles/padim_bottle_shared_int8 for the shared-backbone INT8 bundle)
#   make bench-cpu-speed  per-location vs shared-backbone layout, FP32 vs INT8, at 2048x2048 (4x4 of 512) and on bottle
#   make bench-cpu-speed-bf16  the same with the bf16 bundle on the hybrid backend (OpenVINO bf16 backbone, ORT heads)
#   make bench-serve      tilead-serve under load (concurrency 1, 4, 16) beside direct Predictor calls, bottle bundle
#   make bench-resize-rss Predictor(resize=True) on a 20000x20000 image: peak RSS, area kernel, banded bilinear, whole-image
#   make bench-soak       Predictor soak on the bottle bundle: RSS slope per 1000 predictions, result drift
#   make bench-good-only  thresholds from good images only (holdout, synthetic, SuperADD, oracle) on bottle + demo
#   make bench-hires      task assignment (one_to_one, neighbourhood, cluster, all_to_one) on bottle 4x4 and 2048x2048,
#                         thumbnail branch on bottle: AUROCs, AUPRO, bundle size, models, train time, latency (long)
#   make info        what this installation can do here (tilead-info)
#   make doctor      tilead-doctor: capabilities and, on a GPU, the GPU self-checks
#   make gpu-check OUT=dir  the prepared first-GPU check (< 9 min, offline): extension, engines, doctor, bench; JSON in OUT
#   make mutation    mutmut over tilead/runtime with the fast runtime tests; share of mutants killed (slow)
#   make wheel-check  manylinux wheel -> fresh venv with no compiler -> Predictor on the demo bundle; install size

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The exact torch/torchvision pair that imports together on these machines
# (both lie on this disk); pyproject.toml keeps ranges.
TORCH_PAIR := torch==2.14.1 torchvision==0.29.1
NATIVE := $(shell find cpp_ext -type f) CMakeLists.txt pyproject.toml
STAMP  := $(VENV)/.tilead-installed

.PHONY: gpu-check wheel-check mutation install demo test test-integration test-all lint format bench bench-predictor bench-latency bench-detectors bench-serve bench-int8 bench-cpu-speed bench-cpu-speed-bf16 bench-vs-anomalib bench-resize-rss bench-good-only bench-hires bench-soak bench-train train-bottle info doctor clean

install: $(STAMP)

$(STAMP): $(NATIVE)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH_PAIR)
	$(BIN)/pip install --quiet "scikit-build-core>=0.10" "pybind11>=2.12"
	$(BIN)/pip install --quiet --no-build-isolation -e ".[cpu,train,dev]"
	touch $@

demo: $(STAMP)
	$(BIN)/tilead demo -o out/demo

# -X faulthandler: a crash in native code prints every thread's Python stack, also at the interpreter's exit
# after pytest's own handler is gone (child processes are left as they are).
test: $(STAMP)
	$(BIN)/python -X faulthandler -m pytest -m "not integration" -q

test-integration: $(STAMP)
	$(BIN)/python -X faulthandler -m pytest -m integration -q

test-all: $(STAMP)
	$(BIN)/python -X faulthandler -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/clang-format --dry-run -Werror $(shell find cpp_ext -name '*.h' -o -name '*.cpp' -o -name '*.cu')

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .
	$(BIN)/clang-format -i $(shell find cpp_ext -name '*.h' -o -name '*.cpp' -o -name '*.cu')

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_kernels.py --json out/bench/kernels.json

bench-predictor: $(STAMP)
	$(BIN)/python benchmarks/bench_predictor.py --json out/bench/predictor.json

# The bottle run and bundle the latency benchmark needs (trained and exported when missing: ~5 min).
runs/padim_bottle/stats.json: | $(STAMP)
	$(BIN)/tilead-train --config configs/padim_bottle.yaml --output runs/padim_bottle --resume

bundles/padim_bottle/manifest.json: runs/padim_bottle/stats.json
	$(BIN)/tilead-export runs/padim_bottle -o bundles/padim_bottle --overwrite

bench-latency: $(STAMP) bundles/padim_bottle/manifest.json
	$(BIN)/tilead-bench bundles/padim_bottle --batch 1,4 --iterations 30 --compare torch --json out/bench/tilead_bench.json

# Trains and exports the missing runs first (23 min for all four entries on this project's 2-core machine).
bench-detectors: $(STAMP)
	$(BIN)/python benchmarks/bench_detectors.py --train --json out/bench/detectors.json

# Served Predictor (Ray Serve, 1 replica on all cores, batches of 8) vs direct Predictor calls on the same images.
bench-serve: $(STAMP) bundles/padim_bottle/manifest.json
	$(BIN)/python benchmarks/bench_serve.py --bundle bundles/padim_bottle --requests 48 --concurrency 1 4 16 --max-batch 8 --json out/bench/serve.json

bench-resize-rss: $(STAMP)
	$(BIN)/python benchmarks/bench_resize_rss.py --size 20000 --json out/bench/resize_rss.json

# Fits PaDiM once per dataset on good images only, re-validates it two ways, evaluates four threshold rules.
bench-good-only: $(STAMP)
	$(BIN)/python benchmarks/bench_good_only.py --json out/bench/good_only.json

# Trains, exports and evaluates every row it lacks under out/bench/hires (hours on a 2-core CPU; resumable).
bench-hires: $(STAMP)
	$(BIN)/python benchmarks/bench_hires.py --json out/bench/hires.json

bench-soak: $(STAMP) bundles/padim_bottle/manifest.json
	$(BIN)/python benchmarks/bench_soak.py bundles/padim_bottle --predictions 1000 --json out/bench/soak.json

bench-train: $(STAMP)
	$(BIN)/python benchmarks/bench_train_bottle.py --json out/bench/train_bottle.json

train-bottle: $(STAMP)
	$(BIN)/tilead-train --config configs/padim_bottle.yaml --output runs/padim_bottle --eval

info: $(STAMP)
	$(BIN)/tilead-info

doctor: $(STAMP)
	$(BIN)/tilead-doctor

# Exit status 0 pass, 1 fail, 3 no usable GPU (docs/gpu.md). Uses the installed venv; no network needed.
OUT ?= out/gpu-check
gpu-check:
	$(if $(wildcard $(BIN)/python),$(BIN)/python,$(PYTHON)) scripts/gpu_check.py $(OUT) $(if $(BUNDLE),--bundle $(BUNDLE))

# Mutation testing ([tool.mutmut] in pyproject.toml: what is mutated, which tests run). mutmut imports the
# package from its mutants/ copy, so the built extension is copied beside the sources for the run and
# removed afterwards. JOBS=n runs n mutants at a time; MUTANTS="name or glob ..." (re)runs only those mutants
# (e.g. MUTANTS='tilead.runtime.bundle.*'). Result: mutants/mutmut-cicd-stats.json and the per-module table of
# benchmarks/mutation_report.py (docs/reliability.md).
JOBS ?= 2
MUTANTS ?=
mutation: $(STAMP)
	@so_dir=$$($(BIN)/python -c 'import os, tilead._kernels as k; print(os.path.dirname(k.__file__))'); \
	 copied=$$(cd $$so_dir && ls _kernels*.so); \
	 for f in $$copied; do cp $$so_dir/$$f tilead/$$f; done; \
	 TILEAD_MUTATION=1 $(BIN)/mutmut run --max-children $(JOBS) $(MUTANTS); status=$$?; \
	 for f in $$copied; do rm -f tilead/$$f; done; \
	 test $$status -eq 0 && $(BIN)/mutmut export-cicd-stats && cat mutants/mutmut-cicd-stats.json && \
	 $(BIN)/python benchmarks/mutation_report.py

clean:
	rm -rf build out .pytest_cache .mypy_cache .ruff_cache .hypothesis mutants

# FP32 vs INT8 bundles of the bottle run in one process, calls alternating (issue #21).
bundles/padim_bottle_int8/manifest.json: runs/padim_bottle/stats.json
	$(BIN)/tilead-export runs/padim_bottle -o bundles/padim_bottle_int8 --precision int8 --overwrite --no-progress

bench-int8: $(STAMP) bundles/padim_bottle/manifest.json bundles/padim_bottle_int8/manifest.json
	$(BIN)/python benchmarks/bench_int8.py bundles/padim_bottle bundles/padim_bottle_int8 --batch 1 8 --json out/bench/int8.json

# anomalib's tiled-ensemble inference core and the Predictor, alternating image by image (issue #21).
# Installs the optional extra (anomalib 2.7.0) on first use; fits anomalib's PaDiM on all 209 train/good images.
VS_ANOMALIB_BUNDLE ?= bundles/padim_bottle
bench-vs-anomalib: $(STAMP) $(VS_ANOMALIB_BUNDLE)/manifest.json
	$(BIN)/python -c "import anomalib" 2>/dev/null || $(BIN)/pip install --quiet "anomalib==2.7.0"
	$(BIN)/python benchmarks/bench_vs_anomalib.py $(VS_ANOMALIB_BUNDLE) --images 20 --json out/bench/vs_anomalib.json

# The bottle run for the hybrid backend: heads refit on OpenVINO's bf16 backbone features (needs bf16 units; #21).
# make bench-vs-anomalib VS_ANOMALIB_BUNDLE=bundles/padim_bottle_shared_bf16 runs it (backend auto: hybrid).
bundles/padim_bottle_shared_bf16/manifest.json: runs/padim_bottle/stats.json
	$(BIN)/tilead-export runs/padim_bottle -o bundles/padim_bottle_shared_bf16 --layout shared_backbone --precision bf16 --overwrite --no-progress

# The bottle run as one INT8 backbone graph for every tile plus FP32 heads (issue #21, docs/cpu_speed.md).
bundles/padim_bottle_shared_int8/manifest.json: runs/padim_bottle/stats.json
	$(BIN)/tilead-export runs/padim_bottle -o bundles/padim_bottle_shared_int8 --layout shared_backbone --precision int8 --overwrite --no-progress

# Layouts x precisions side by side in one process, 2048x2048 (4x4 tiles of 512, trained on a few synthetic
# images) and bottle: ms/image at batch 1 and 8, share outside inference, peak RSS, ratios, bottle quality.
# Makes the data, runs and bundles it lacks under out/bench/cpu_speed (the bottle run: runs/padim_bottle).
bench-cpu-speed: $(STAMP) runs/padim_bottle/stats.json
	$(BIN)/python benchmarks/bench_cpu_speed.py --quality --json out/bench/cpu_speed.json
# bf16 beside them (a CPU with bf16 units): per_location fp32, shared int8, shared bf16 on the hybrid backend.
bench-cpu-speed-bf16: $(STAMP) runs/padim_bottle/stats.json
	$(BIN)/python benchmarks/bench_cpu_speed.py --quality --batch 1 8 --variants per_location:fp32 \
	  shared_backbone:int8 shared_backbone:bf16@hybrid --json out/bench/cpu_speed_bf16.json

# A runtime install without a compiler (issue #19 item 6): pip wheel + auditwheel repair (manylinux tag of this
# glibc), installed into a fresh venv whose PATH has no compiler; Predictor and `tilead predict` on the demo bundle
# (256 px, trained once); prints the install size. Output in out/wheel/.
wheel-check: $(STAMP)
	scripts/check_runtime_wheel.sh
