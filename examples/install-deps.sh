#!/usr/bin/env bash
# Installs the example HTTP targets' dependencies from their own files, where the integration
# tests (and `python-target/.venv/bin/python app.py`, `node node-target/server.js`) find them:
# a virtualenv for the Python one, node_modules for the Node one. Idempotent.
set -euo pipefail
cd "$(dirname "$0")"
[ -x python-target/.venv/bin/python ] || python3 -m venv python-target/.venv
python-target/.venv/bin/pip install --quiet --disable-pip-version-check -r python-target/requirements.txt
npm ci --prefix node-target --silent --no-audit --no-fund
