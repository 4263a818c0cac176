#!/usr/bin/env bash
# Installs the pinned packages the seed-client tests (tests/it/seeds.rs) run with:
#   tests/seeds/node_modules  `npm ci` from package.json + package-lock.json (ws)
#   target/seeds-venv         a venv with requirements.txt (websockets, websocket-client)
# Needs Node with npm, Python 3.9+ with venv, and the npm and PyPI registries.
# Then: FLEETCAST_PYTHON=target/seeds-venv/bin/python (the tests also find it there).
set -euo pipefail
cd "$(dirname "$0")/../.."

(cd tests/seeds && npm ci --no-audit --no-fund --loglevel=error)

python=${FLEETCAST_PYTHON_BASE:-$(command -v python3.11 || command -v python3)}
venv=target/seeds-venv
if ! "$venv/bin/python" -c '' 2>/dev/null; then
    rm -rf "$venv"
    "$python" -m venv "$venv"
fi
"$venv/bin/python" -m pip install --disable-pip-version-check --no-input --quiet \
    -r tests/seeds/requirements.txt

node -e 'console.log("seed clients: node", process.version, "ws",
    require("./tests/seeds/node_modules/ws/package.json").version)'
"$venv/bin/python" -c 'import sys, websockets, websocket
print("seed clients: python", sys.version.split()[0], "websockets", websockets.__version__,
      "websocket-client", websocket.__version__)'
