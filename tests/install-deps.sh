#!/usr/bin/env bash
# Installs, from their own lock files, what the integration tests run besides Rust: the example
# HTTP targets' dependencies (a virtualenv for the Python one, node_modules for the Node one;
# also what `examples/python-target/.venv/bin/python app.py` and `node
# examples/node-target/server.js` need), the browser test's playwright-core and axe-core
# (playwright-core downloads no browser: the test drives Debian's /usr/bin/chromium), and
# schemathesis, which checks a live gateway against its OpenAPI document. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x examples/python-target/.venv/bin/python ] || python3 -m venv examples/python-target/.venv
examples/python-target/.venv/bin/pip install --quiet --disable-pip-version-check -r examples/python-target/requirements.txt
npm ci --prefix examples/node-target --silent --no-audit --no-fund
npm ci --prefix tests/browser --silent --no-audit --no-fund
[ -x tests/schemathesis/.venv/bin/python ] || python3 -m venv tests/schemathesis/.venv
tests/schemathesis/.venv/bin/pip install --quiet --disable-pip-version-check -r tests/schemathesis/requirements.txt
