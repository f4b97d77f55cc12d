#!/usr/bin/env bash
# Installs and starts everything the test suite needs besides Rust, on a Debian or Ubuntu
# machine, as root. Idempotent: what is there is kept, and a healthy broker is left running.
#
# 1. Debian packages, those missing: rabbitmq-server (the shared broker at 127.0.0.1:5672
#    and the private nodes the fault tests start), python3-venv, nodejs and npm (Debian's
#    Node 18 will do), chromium (the dashboard's browser test drives it headless), prometheus
#    (the monitoring test checks the compose configuration with it), iproute2 (the cluster
#    test's network namespaces), curl.
# 2. The shared broker, started with as many open files as the machine allows: Debian's
#    `rabbitmq-server -detached` as root goes through `su`, which leaves 1,024, and at that
#    the broker runs out mid-suite and from then on accepts connections without answering
#    them. A broker already running is checked (the AMQP handshake, its open-files limit) and
#    started again when either falls short. Skipped when AMQP_URL points elsewhere.
# 3. From their own lock files: the example targets' Flask and waitress (a virtualenv) and
#    Express (node_modules), which the tests run as real targets; the browser test's
#    playwright-core and axe-core (no browser download); schemathesis (a virtualenv); the
#    benchmark's Express + amqplib stack, which `cargo bench` compares POST /tasks with.
set -euo pipefail
cd "$(dirname "$0")/.."
say() { echo "install-deps: $*"; }

missing=()
command -v rabbitmq-server >/dev/null 2>&1 || missing+=(rabbitmq-server)
# Debian's python3 has the venv module but not ensurepip, which python3-venv adds.
python3 -c 'import ensurepip' >/dev/null 2>&1 || missing+=(python3-venv)
command -v node >/dev/null 2>&1 || missing+=(nodejs)
command -v npm >/dev/null 2>&1 || missing+=(npm)
[ -x "${CHROMIUM:-/usr/bin/chromium}" ] || missing+=(chromium)
command -v prometheus >/dev/null 2>&1 || missing+=(prometheus)
command -v ip >/dev/null 2>&1 || missing+=(iproute2)
command -v curl >/dev/null 2>&1 || missing+=(curl)
if [ ${#missing[@]} -gt 0 ]; then
  say "installing Debian's ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# The shared broker, when the tests use the default one.
if [ "${AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}" = "amqp://guest:guest@127.0.0.1:5672/%2f" ]; then
  ctl() { HOME=/var/lib/rabbitmq timeout -s KILL 90 rabbitmqctl "$@"; }
  listening() { (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null; }
  # The handshake, not just TCP: a broker out of file handles accepts and never answers.
  answers() {
    timeout 5 bash -c 'exec 3<>/dev/tcp/127.0.0.1/5672 && printf "AMQP\x00\x00\x09\x01" >&3 && head -c 1 <&3 >/dev/null' 2>/dev/null
  }
  pid() { cat /var/lib/rabbitmq/mnesia/rabbit@*.pid 2>/dev/null | head -n 1 || true; }
  open_files() { awk '/^Max open files/ {print $4}' "/proc/$1/limits" 2>/dev/null || echo 0; }
  start() {
    su rabbitmq -s /bin/sh -c "ulimit -n $(ulimit -Hn) && rabbitmq-server -detached"
    for _ in $(seq 1 120); do listening && break; sleep 0.5; done
    listening || { echo "RabbitMQ did not start within 60 s" >&2; exit 1; }
    # The port opens before the node has finished booting; wait for the node itself.
    ctl await_startup --timeout 60 >/dev/null
  }
  if ! listening; then
    say "starting RabbitMQ"
    start
  fi
  ctl await_startup --timeout 60 >/dev/null
  if ! answers || [ "$(open_files "$(pid)")" -lt 4096 ]; then
    say "RabbitMQ does not answer the AMQP handshake or may open only $(open_files "$(pid)") files; starting it again with $(ulimit -Hn)"
    ctl stop >/dev/null 2>&1 || true
    old=$(pid)
    if [ -n "$old" ] && kill -0 "$old" 2>/dev/null; then kill -9 "$old"; fi
    for _ in $(seq 1 60); do listening || break; sleep 0.5; done
    start
  fi
  answers || { echo "RabbitMQ does not answer the AMQP handshake" >&2; exit 1; }
fi

[ -x examples/python-target/.venv/bin/python ] || python3 -m venv examples/python-target/.venv
examples/python-target/.venv/bin/pip install --quiet --disable-pip-version-check -r examples/python-target/requirements.txt
npm ci --prefix examples/node-target --silent --no-audit --no-fund
npm ci --prefix tests/browser --silent --no-audit --no-fund
npm ci --prefix crates/bench/express --silent --no-audit --no-fund
[ -x tests/schemathesis/.venv/bin/python ] || python3 -m venv tests/schemathesis/.venv
tests/schemathesis/.venv/bin/pip install --quiet --disable-pip-version-check -r tests/schemathesis/requirements.txt
say "ready: cargo test --workspace"
