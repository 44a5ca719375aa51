#!/usr/bin/env bash
# The wheel and the sdist, end to end, as a user gets them:
#   1. wheel   `pip wheel --no-build-isolation --no-deps .` with the build environment's torch
#              (objects are kept under build/, so an unchanged tree only relinks);
#   2. contents the package, _C and the CPU libraries of each ISA level, torch pinned to the build's
#              minor version, nothing else; vector instruction counts per library (the AVX-512
#              ones hold AVX-512 code whatever CPU built them) and, for a CUDA build, the GPU
#              architectures in _C (sm_80 and sm_90 at least);
#   3. install into a fresh virtual environment outside the repository: torch of the build's
#              version plus requirements-dev.txt, then the wheel with its dependencies checked;
#   4. smoke   from outside the repository: llama_ext comes from that environment, loads the best
#              CPU level this CPU runs, every op once against its float64 reference;
#   5. tests   a subset of the test suite (a copy of tests/ next to csrc/, no ./llama_ext) against
#              the installed package; tests/test_cpu_capability.py checks that every level was
#              built and that each library holds its level's instructions, in the installed files;
#   5b. other CPythons (--python, any number): the same wheel (cp310-abi3) installed into a fresh
#              environment of each, with torch of the build's version, then 4 and 5 there;
#   6. sdist   `setup.py sdist` holds every tracked file the build and the tests need; a wheel built
#              from it (in pip's own temporary folder, so a full compile) passes 2-4 again.
#
# Usage: scripts/check_wheel.sh [--no-sdist-build] [--tests "tests/test_x.py ..."] [--python PATH ...]
# Environment: PYTHON, the build environment (default .venv/bin/python, which `make` creates);
# CHECK_DIR, the work folder (default /tmp/llama_ext-check-wheel; the fresh environment is
# $CHECK_DIR/venv, kept between runs, or CHECK_VENV; another CPython's is $CHECK_DIR/venv-3.X, whose
# torch pip downloads from the index where no local copy serves that Python); the build's own variables (LLAMA_EXT_CPU_ONLY,
# LLAMA_EXT_CPU_CAPABILITIES, TORCH_CUDA_ARCH_LIST, MAX_JOBS) pass through to both builds.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
PY=${PYTHON:-$REPO/.venv/bin/python}
CHECK_DIR=${CHECK_DIR:-/tmp/llama_ext-check-wheel}
VENV=${CHECK_VENV:-$CHECK_DIR/venv}
SDIST_BUILD=1
OTHER_PYTHONS=()
TESTS="tests/test_cpu_capability.py tests/test_rms_norm.py tests/test_rotary.py tests/test_kvcache_attention.py"
while [ $# -gt 0 ]; do
  case $1 in
    --no-sdist-build) SDIST_BUILD=0 ;;
    --tests) TESTS=$2; shift ;;
    --python) OTHER_PYTHONS+=("$2"); shift ;;
    *) echo "usage: $0 [--no-sdist-build] [--tests \"tests/test_x.py ...\"] [--python PATH ...]" >&2; exit 2 ;;
  esac
  shift
done
case $CHECK_DIR in "$REPO"|"$REPO"/*) echo "CHECK_DIR must be outside the repository" >&2; exit 2 ;; esac
mkdir -p "$CHECK_DIR"

step() { printf '\n== %s (%s)\n' "$1" "$(date -u +%H:%M:%S)"; }
timed() {  # runs a command and prints its wall time
  local start=$SECONDS
  "$@"
  echo "   ($((SECONDS - start)) s)"
}

# A CUDA build must hold CUDA kernels (the same test as the Makefile and setup.py: a CUDA torch and nvcc).
CUDA_FLAG=
if [ "${LLAMA_EXT_CPU_ONLY:-0}" != 1 ] && "$PY" -c 'import torch, sys; sys.exit(torch.version.cuda is None)' &&
   [ -x "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" ]; then
  CUDA_FLAG=--cuda
fi
TORCH_VERSION=$("$PY" -c 'import torch; print(torch.__version__.split("+")[0])')
echo "build environment: $PY (torch $TORCH_VERSION); CUDA kernels expected: ${CUDA_FLAG:+yes}${CUDA_FLAG:-no}"

new_venv() {  # $1: the environment, $2: its base interpreter; torch of the build's version and the test tools
  [ -x "$1/bin/python" ] || "$2" -m venv "$1"
  timed "$1/bin/pip" install -q "torch==$TORCH_VERSION" -r requirements-dev.txt
}

install_wheel() {  # $1: the wheel, $2: the environment (default $VENV); torch already satisfies the pin
  local venv=${2:-$VENV}
  "$venv/bin/pip" uninstall -q -y llama_ext 2>/dev/null || true
  "$venv/bin/pip" install -q "$1"
}

smoke() {  # $1: the environment (default $VENV); from a folder with no llama_ext in it
  (cd "$CHECK_DIR" && "${1:-$VENV}/bin/python" "$REPO/scripts/check_wheel.py" smoke)
}

installed_tests() {  # $1: the environment; a copy of the tests beside csrc/ (conftest reads csrc/ and tools/)
  rm -rf "$CHECK_DIR/src" && mkdir -p "$CHECK_DIR/src"
  cp -r tests csrc benchmarks tools "$CHECK_DIR/src/"
  # shellcheck disable=SC2086
  (cd "$CHECK_DIR/src" && timed "$1/bin/python" -m pytest $TESTS -q -x -p no:cacheprovider)
}

step "1. wheel"
rm -rf "$CHECK_DIR/dist"
timed "$PY" -m pip wheel -q --no-build-isolation --no-deps -w "$CHECK_DIR/dist" .
WHEEL=$(ls "$CHECK_DIR"/dist/llama_ext-*.whl)

step "2. contents"
# shellcheck disable=SC2086
"$PY" scripts/check_wheel.py contents "$WHEEL" $CUDA_FLAG

step "3. install into $VENV"
new_venv "$VENV" "$("$PY" -c 'import sys; print(sys._base_executable)')"
install_wheel "$WHEEL"

step "4. smoke"
smoke

step "5. tests: $TESTS"
installed_tests "$VENV"

for OTHER in "${OTHER_PYTHONS[@]}"; do
  OTHER_VERSION=$("$OTHER" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
  OTHER_VENV=$CHECK_DIR/venv-$OTHER_VERSION
  step "5b. the same wheel under CPython $OTHER_VERSION ($OTHER), in $OTHER_VENV"
  new_venv "$OTHER_VENV" "$OTHER"
  install_wheel "$WHEEL" "$OTHER_VENV"
  smoke "$OTHER_VENV"
  installed_tests "$OTHER_VENV"
done

step "6. sdist"
rm -rf "$CHECK_DIR/sdist"
"$PY" setup.py -q sdist -d "$CHECK_DIR/sdist" >/dev/null
SDIST=$(ls "$CHECK_DIR"/sdist/llama_ext-*.tar.gz)
"$PY" scripts/check_wheel.py sdist "$SDIST"
if [ "$SDIST_BUILD" = 1 ]; then
  step "6b. wheel from the sdist (a full compile)"
  timed "$PY" -m pip wheel -q --no-build-isolation --no-deps -w "$CHECK_DIR/sdist/dist" "$SDIST"
  SDIST_WHEEL=$(ls "$CHECK_DIR"/sdist/dist/llama_ext-*.whl)
  # shellcheck disable=SC2086
  "$PY" scripts/check_wheel.py contents "$SDIST_WHEEL" $CUDA_FLAG
  install_wheel "$SDIST_WHEEL"
  smoke
  echo "   (the environment now holds the wheel built from the sdist)"
fi
step "all checks passed"
