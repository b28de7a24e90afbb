#!/usr/bin/env bash
# The CUDA checks in one prepared run, for a session that is lent a GPU machine (the `device` tool):
# the CUDA-only tests (captured step and evaluation against the plain path, on-device data, flows, ...),
# then benchmarks/speed.py on CUDA. Results go to $OUT (default /tmp/pyrovae-cuda-check):
# cuda_tests.log, speed_cuda.md, speed_cuda.log, gpu.txt.
#
#   run(command="bash benchmarks/cuda_check.sh", carry=[".whl"], timeout_s=560)
#
# That machine's Python has torch but not pyro-ppl: carry its wheels (pure Python) in .whl/, made here with
#   python3 -m pip download --no-deps -d .whl pyro-ppl==1.9.2 pyro-api==0.1.2
# Environment: SPEED_ARGS replaces the speed run's options (default: 3 rounds of ~0.5 s blocks, no compile
# column, 5000 evaluation images), so that tests and benchmark fit in one call of under 10 minutes.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/pyrovae-cuda-check}
PY=${PYTHON:-python3}
mkdir -p "$OUT"

if ! "$PY" -c "import pyro" 2>/dev/null; then
    if ! ls .whl/*.whl >/dev/null 2>&1; then
        echo "cuda_check: pyro-ppl is not installed and .whl/ holds no wheels; make them as the header of this file says" >&2
        exit 2
    fi
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/pyrovae-site .whl/*.whl || exit 2
    export PYTHONPATH=/tmp/pyrovae-site${PYTHONPATH:+:$PYTHONPATH}
fi
# the package as pyproject.toml maps it (pyrovae.models <- models/, pyrovae.guides <- guides/), without pip
pkg=/tmp/pyrovae-pkg
rm -rf "$pkg" && mkdir -p "$pkg" && cp -r pyrovae "$pkg/" && cp -r models "$pkg/pyrovae/models" && cp -r guides "$pkg/pyrovae/guides"
export PYTHONPATH=$pkg:$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "cuda_check: torch.cuda.is_available() is False here: nothing to check" >&2
    exit 3
fi
(nvidia-smi -L; "$PY" -c "import torch, pyro; print('torch', torch.__version__, 'pyro', pyro.__version__, torch.cuda.get_device_name(0))") > "$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt"

status=0
timeout 240 "$PY" -P -m pytest -m cuda -q -p no:cacheprovider --rootdir . tests 2>&1 | tee "$OUT/cuda_tests.log" || status=1
# shellcheck disable=SC2086
timeout 270 "$PY" benchmarks/speed.py --device cuda ${SPEED_ARGS:---rounds 3 --block-seconds 0.5 --impls pyrovae plain svi --eval-images 5000} \
    --out "$OUT/speed_cuda.md" --note "benchmarks/cuda_check.sh on the lent GPU machine" 2>&1 | tee "$OUT/speed_cuda.log" || status=1
exit $status
