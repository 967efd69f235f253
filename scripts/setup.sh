#!/usr/bin/env bash
# Installs what building contact needs (cmake and a C++ compiler for the gRPC
# C-core, OpenSSL's headers for TLS), and with --python the Python peers for
# the interop and hostile tests (grpcio, grpcio-tools and h2 in .venv) and,
# as root, Chromium and its WebDriver for the web view's browser test. As root
# it installs missing Debian packages with apt-get; otherwise it says exactly
# what to install and stops.
set -euo pipefail
cd "$(dirname "$0")/.."

want_python=no
[ "${1:-}" = "--python" ] && want_python=yes

if ! command -v cargo >/dev/null 2>&1; then
    echo "setup: Rust is missing: install it from https://rustup.rs, then run this again." >&2
    exit 1
fi

missing=()
command -v cmake >/dev/null 2>&1 || missing+=(cmake)
command -v g++ >/dev/null 2>&1 || missing+=(g++)
command -v make >/dev/null 2>&1 || missing+=(make)
command -v patch >/dev/null 2>&1 || missing+=(patch)
# TLS: grpcio's `openssl` feature links the system OpenSSL, found by pkg-config.
command -v pkg-config >/dev/null 2>&1 || missing+=(pkg-config)
pkg-config --exists openssl 2>/dev/null || missing+=(libssl-dev)
# The tests make throw-away certificates with the openssl command (scripts/make-certs.sh).
command -v openssl >/dev/null 2>&1 || missing+=(openssl)
if [ "$want_python" = yes ]; then
    if ! command -v python3 >/dev/null 2>&1; then
        missing+=(python3 python3-venv)
    elif ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
        missing+=(python3-venv)
    fi
fi

# Wanted by a test but not by the build: installed with the rest as root,
# else named (the test that needs it says it is skipped).
optional=()
# `contact-ctl top` is tested in a real terminal, a detached tmux session (tests/top.rs).
command -v tmux >/dev/null 2>&1 || optional+=(tmux)
# Replicas sharing a fleet are tested against real NATS JetStream servers
# (tests/replicas.rs); Debian puts nats-server in /usr/sbin.
have_nats_server() { command -v nats-server >/dev/null 2>&1 || [ -x /usr/sbin/nats-server ]; }
have_nats_server || optional+=(nats-server)
# The web view is tested in headless Chromium over WebDriver (tests/webview.rs).
if [ "$want_python" = yes ]; then
    command -v chromium >/dev/null 2>&1 || optional+=(chromium)
    command -v chromedriver >/dev/null 2>&1 || optional+=(chromium-driver)
fi

can_install=no
[ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && can_install=yes
if [ "${#missing[@]}" -gt 0 ] || { [ "${#optional[@]}" -gt 0 ] && [ "$can_install" = yes ]; }; then
    if [ "$can_install" = yes ]; then
        wanted=("${missing[@]}" "${optional[@]}")
        echo "setup: installing ${wanted[*]} with apt-get" >&2
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
        if [ "${#optional[@]}" -gt 0 ] &&
            ! DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${optional[@]}" >/dev/null; then
            echo "setup: could not install ${optional[*]}; the tests needing them will be skipped" >&2
        fi
    else
        echo "setup: missing ${missing[*]}; install with: sudo apt-get install ${missing[*]}" >&2
        exit 1
    fi
elif [ "${#optional[@]}" -gt 0 ]; then
    echo "setup: ${optional[*]} not installed (sudo apt-get install ${optional[*]}); the tests needing them will be skipped" >&2
fi
if ! have_nats_server; then
    echo "setup: nats-server is not installed: tests/replicas.rs is skipped, and fails with CI=true; install it as root: apt-get install nats-server" >&2
fi

# The gRPC C-core with our patches (rapid-reset defence), built in place of
# the registry's copy through Cargo.toml's [patch.crates-io].
scripts/vendor-grpcio-sys.sh

if [ "$want_python" = yes ]; then
    if ! .venv/bin/python -c 'import grpc, grpc_tools, h2' >/dev/null 2>&1; then
        echo "setup: installing the Python test peers (grpcio, grpcio-tools, h2) into .venv" >&2
        python3 -m venv .venv
        .venv/bin/pip install -q --disable-pip-version-check -r tests/interop/requirements.txt
    fi
fi
