#!/usr/bin/env bash
# Tests of the armd <-> Label Studio bridge (integrations/labelstudio), for CI and developers.
#
#   ARMD_TEST_BROKERS=127.0.0.1:9092 ARMD_BIN=target/debug/armd bash integrations/labelstudio/ci.sh [pytest args]
#
# Needs: a running Kafka broker (ARMD_TEST_BROKERS) and an armd binary (ARMD_BIN). Installs what is
# missing: Debian's chromium and chromium-driver, python3-venv (apt-get; as root or with sudo), and a
# virtual environment at ${ARMD_LS_VENV:-$HOME/.cache/armd/labelstudio-venv} with the exact versions
# of requirements-test.txt / constraints.txt (made once, reused while those files are unchanged).
# Runs every test with ARMD_REQUIRE_TOOLS=1, so a missing tool fails instead of skipping.
# Set ARMD_LS_UPDATE_FIGURE=1 to refresh docs/figures/labelstudio-task.png from the browser test.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
VENV=${ARMD_LS_VENV:-$HOME/.cache/armd/labelstudio-venv}
say() { echo "labelstudio/ci.sh: $*" >&2; }
die() { say "$*"; exit 1; }

[[ -n "${ARMD_TEST_BROKERS:-}" ]] || die "ARMD_TEST_BROKERS is not set (bootstrap address of a running Kafka broker)"
[[ -n "${ARMD_BIN:-}" ]] || die "ARMD_BIN is not set (path of the armd binary)"
[[ -x "$ARMD_BIN" ]] || die "ARMD_BIN=$ARMD_BIN is not an executable"
ARMD_BIN=$(cd "$(dirname "$ARMD_BIN")" && pwd)/$(basename "$ARMD_BIN")

# ------------------------------------------------------------------------------------ system packages
apt_install() {
  local sudo=""
  if [[ $(id -u) -ne 0 ]]; then
    command -v sudo >/dev/null || die "need root or sudo to apt-get install $*"
    sudo="sudo -n"
  fi
  command -v apt-get >/dev/null || die "apt-get not found: install $* yourself"
  say "installing $* with apt-get"
  $sudo apt-get update -qq || die "apt-get update failed"
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$@" >/dev/null || die "apt-get install $* failed"
}

missing=()
[[ -x /usr/bin/chromium ]] || missing+=(chromium)
[[ -x /usr/bin/chromedriver ]] || missing+=(chromium-driver)
if [[ ! -x "$VENV/bin/python" ]] && ! python3 -c 'import ensurepip, venv' 2>/dev/null; then
  missing+=(python3-venv)
fi
if ((${#missing[@]})); then apt_install "${missing[@]}"; fi
[[ -x /usr/bin/chromium && -x /usr/bin/chromedriver ]] || die "chromium / chromedriver still missing after apt-get"

# ------------------------------------------------------------------------------------ virtual env
stamp_of() { cat "$HERE/requirements-test.txt" "$HERE/constraints.txt" | sha256sum | cut -c1-16; }
want=$(stamp_of)
if [[ ! -x "$VENV/bin/python" || "$(cat "$VENV/.armd-stamp" 2>/dev/null)" != "$want" ]]; then
  say "creating $VENV (takes 2-3 minutes the first time)"
  rm -rf "$VENV"
  mkdir -p "$(dirname "$VENV")"
  python3 -m venv "$VENV" || die "python3 -m venv failed"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check \
    -r "$HERE/requirements-test.txt" -c "$HERE/constraints.txt" || die "pip install of the test requirements failed"
  echo "$want" >"$VENV/.armd-stamp"
fi

# The bridge itself, built from this checkout (not editable: the venv outlives checkouts). Built from a
# copy so that no build files land in the work tree.
build=$(mktemp -d)
trap 'rm -rf "$build"' EXIT
cp -r "$HERE/pyproject.toml" "$HERE/README.md" "$HERE/armd_labelstudio" "$build/"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps --force-reinstall "$build" \
  || die "pip install of armd-labelstudio failed"
[[ -x "$VENV/bin/armd-labelstudio" ]] || die "the armd-labelstudio command was not installed"

# ------------------------------------------------------------------------------------------ tests
cd "$HERE"
export ARMD_TEST_BROKERS ARMD_BIN ARMD_REQUIRE_TOOLS=1
# Label Studio's migrated empty database, built once per venv (its migrations take ~1 min on 2 cores).
export ARMD_LS_TEMPLATE_CACHE=${ARMD_LS_TEMPLATE_CACHE:-$VENV/labelstudio-template}
start=$(date +%s)
set +e
"$VENV/bin/python" -m pytest -p no:cacheprovider -ra tests "$@"
rc=$?
set -e
say "pytest exit $rc after $(( $(date +%s) - start )) s"
exit $rc
