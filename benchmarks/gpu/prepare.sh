#!/usr/bin/env bash
# Prepare the GPU run (issue #16) here, on a CPU machine that reaches PyPI and Debian, in the checkout whose
# device calls will carry it (the device tool sends the checkout the session started in):
#   1. every wheel of benchmarks/gpu/wheels.txt for Python 3.12 manylinux (`pip download --no-deps`; DeepSpeed
#      built with `pip wheel --no-deps`), checked against that list,
#   2. real JPEG shards cut from Debian's wallpaper photos (pipeline.bench.loader.prepare_shards),
#   3. the Fashion-MNIST subset the `-m gpu` engine tests read (2048 train, 512 test),
#   4. cut into parts of at most 60 MiB under .gpu/callK/ (git-ignored), stamped with the commit,
# then prints the device calls to make, one right after another (benchmarks/gpu/README.md).
#
#   PYTHON=.venv/bin/python benchmarks/gpu/prepare.sh [--images 1024] [--photos DIR] [--wheels DIR]
#                                                     [--part-mib 60] [--no-fmnist]
# --wheels DIR takes the wheels from DIR instead of downloading (no network; what tests use). Downloads, photos
# and shards are cached under .gpu/cache: a second run only re-packs and re-stamps. Re-stamp alone after a code
# change: python benchmarks/gpu/pack.py stamp
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
PY=${PYTHON:-python3}
GPU=${GPU_DIR:-.gpu}
IMAGES=1024
PHOTOS=""
WHEELS=""
PART_MIB=60
FMNIST=1
while (($#)); do
  case $1 in
    --images) IMAGES=$2; shift 2 ;;
    --photos) PHOTOS=$2; shift 2 ;;
    --wheels) WHEELS=$2; shift 2 ;;
    --part-mib) PART_MIB=$2; shift 2 ;;
    --no-fmnist) FMNIST=0; shift ;;
    *) echo "prepare.sh: unknown argument $1 (see the header of $0)" >&2; exit 2 ;;
  esac
done
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
CACHE=$GPU/cache
STAGE=$GPU/stage
rm -rf "$STAGE"
mkdir -p "$CACHE/wheels" "$STAGE/big/shards" "$STAGE/core"
t0=$(date +%s)

# 1. Wheels
if [[ -n "$WHEELS" ]]; then
  CACHE_WHEELS=$WHEELS
else
  CACHE_WHEELS=$CACHE/wheels
  PLATFORMS=()
  for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
    PLATFORMS+=(--platform "$p")
  done
  "$PY" benchmarks/gpu/pack.py wheels --cache "$CACHE_WHEELS" --stage "$STAGE" --print wheel >"$CACHE/wheel-reqs.txt"
  echo "prepare: pip download $(wc -l <"$CACHE/wheel-reqs.txt") wheels for CPython 3.12 manylinux into $CACHE_WHEELS"
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
    "${PLATFORMS[@]}" -d "$CACHE_WHEELS" -r "$CACHE/wheel-reqs.txt"
  for req in $("$PY" benchmarks/gpu/pack.py wheels --cache "$CACHE_WHEELS" --stage "$STAGE" --print sdist); do
    name=${req%%==*}; version=${req##*==}
    if ! ls "$CACHE_WHEELS/${name//-/_}-$version-"*.whl >/dev/null 2>&1; then
      echo "prepare: pip wheel --no-deps $req (pure Python, built here)"
      "$PY" -m pip wheel -q --no-deps -w "$CACHE_WHEELS" "$req"
    fi
  done
fi
"$PY" benchmarks/gpu/pack.py wheels --cache "$CACHE_WHEELS" --stage "$STAGE"

# 2. Real JPEG shards: tiles of Debian's wallpaper photos (apt-get download lomiri-wallpapers-16.04 unless --photos)
"$PY" - "$CACHE/shards" "$IMAGES" "$PHOTOS" <<'EOF'
import sys
from pathlib import Path

from pipeline.bench.loader import prepare_shards

work, count, photos = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3] or None
print(f"prepare: {count} JPEG tiles as shards in {prepare_shards(work, count, photos)}")
EOF
cp -al "$CACHE/shards/shards-$IMAGES" "$STAGE/big/shards/" 2>/dev/null || cp -a "$CACHE/shards/shards-$IMAGES" "$STAGE/big/shards/"

# 3. The Fashion-MNIST subset of tests/conftest.py's fmnist_shards fixture (2048 train, 512 test)
SRC=${FASHION_MNIST_DIR:-/usr/share/datasets/fashion-mnist}
if ((FMNIST)) && [[ -f "$SRC/train-images-idx3-ubyte.gz" ]]; then
  for f in train-images-idx3-ubyte train-labels-idx1-ubyte; do
    "$PY" benchmarks/gpu/pack.py idx-head "$SRC/$f.gz" "$STAGE/core/fmnist/$f.gz" 2048
  done
  for f in t10k-images-idx3-ubyte t10k-labels-idx1-ubyte; do
    "$PY" benchmarks/gpu/pack.py idx-head "$SRC/$f.gz" "$STAGE/core/fmnist/$f.gz" 512
  done
elif ((FMNIST)); then
  echo "prepare: no Fashion-MNIST in $SRC (apt-get install dataset-fashion-mnist): the engine GPU tests will skip"
fi

# 4. Parts, manifest, commit stamp, and the calls to make
"$PY" benchmarks/gpu/pack.py pack --stage "$STAGE" --out "$GPU" --repo . --part-mib "$PART_MIB"
"$PY" benchmarks/gpu/pack.py stamp --repo . --gpu-dir "$GPU"
rm -rf "$STAGE"
echo "prepare: done in $(( $(date +%s) - t0 )) s. .gpu/ is git-ignored; never commit it."
