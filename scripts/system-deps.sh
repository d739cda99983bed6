#!/usr/bin/env bash
# Install, with apt-get, the system packages that building and testing need
# and that this machine lacks: a C toolchain, Python headers, venv, curl, and
# with the argument `test` Chromium, redis-server, nginx and prometheus. Does
# nothing when everything is there.
set -euo pipefail

missing=()
command -v cc >/dev/null 2>&1 || missing+=(build-essential)
python3 -c 'import sysconfig, os, sys; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' \
    || missing+=(python3-dev)
python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || missing+=(python3-venv)
command -v curl >/dev/null 2>&1 || missing+=(curl)
# With `test` (make test): a real headless browser for
# tests/test_browser_client.py, which drives fastws.js through the DevTools
# protocol; Debian's package is `chromium`. Not needed to build or run.
if [ "${1:-}" = test ]; then
    command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 \
        || missing+=(chromium)
    # A real Redis for tests/test_brokers.py, which starts its own
    # redis-server on a free port; the tests fail without it.
    command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
    # A real nginx for tests/test_nginx.py, which runs deploy/nginx.conf
    # (as an unprivileged user, on a free port) in front of three nodes; the
    # tests fail without it. Debian installs it under /usr/sbin, which is not
    # on every user's PATH, hence the second look.
    command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing+=(nginx)
    # A real Prometheus (and its promtool) for tests/test_metrics.py and
    # tests/test_deploy.py, which scrapes a node
    # with it and queries a metric back through its HTTP API; the tests fail
    # without it.
    command -v prometheus >/dev/null 2>&1 || missing+=(prometheus)
fi

if [ ${#missing[@]} -gt 0 ]; then
    echo "installing system packages: ${missing[*]}"
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}"
fi
