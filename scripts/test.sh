#!/usr/bin/env bash
# The whole test run from a fresh machine: creates .venv (if missing), installs sd-zoo with its test
# extras, runs sd-zoo's tests, then timm's own tests/test_models.py (from the timm sdist matching the
# installed timm) against every sd model.
#   scripts/test.sh                 everything (what CI runs)
#   scripts/test.sh -m "not slow"   extra arguments go to pytest for sd-zoo's own tests
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PYTHON=${PYTHON:-python3}
VENV=${SD_ZOO_VENV:-$ROOT/.venv}

if [[ ! -x $VENV/bin/python ]]; then
  echo "== creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PY=$VENV/bin/python
echo "== installing sd-zoo and its test dependencies"
"$PY" -m pip install -q --upgrade pip
"$PY" -m pip install -q -e "$ROOT[test]"

run_pytest() {
  # pytest's exit code 5 means no test ran: a broken selection, never a pass
  local rc=0
  "$PY" -m pytest "$@" || rc=$?
  if [[ $rc -eq 5 ]]; then
    echo "ERROR: pytest collected no tests for: $*" >&2
  fi
  return $rc
}

echo "== sd-zoo tests"
run_pytest "$ROOT/tests" "$@"

echo "== timm's own model tests on the sd models"
TIMM_VERSION=$("$PY" -c 'import timm; print(timm.__version__)')
TIMM_SRC=$ROOT/.cache/timm-sdist/timm-$TIMM_VERSION
if [[ ! -f $TIMM_SRC/tests/test_models.py ]]; then
  mkdir -p "$ROOT/.cache/timm-sdist"
  "$PY" -m pip download -q --no-deps --no-binary :all: "timm==$TIMM_VERSION" -d "$ROOT/.cache/timm-sdist" \
    || { echo "ERROR: could not download the timm $TIMM_VERSION sdist (its tests are not in the wheel)" >&2; exit 1; }
  tar xzf "$ROOT/.cache/timm-sdist/timm-$TIMM_VERSION.tar.gz" -C "$ROOT/.cache/timm-sdist"
fi
# -p sd_zoo imports the plugin before collection, so timm's parametrisation sees the sd models
(cd "$TIMM_SRC" && run_pytest -p sd_zoo tests/test_models.py \
  -k "sd_resnet or patch16_224_sd or convnext_atto_sd or convnext_tiny_sd" -p no:cacheprovider -q \
  -W ignore::FutureWarning)
