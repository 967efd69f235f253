#!/usr/bin/env bash
# Runs every test: unit tests, integration tests against real servers on
# ephemeral ports (replicas on NATS JetStream clusters among them, one test
# at a time), and the interop tests with a Python grpcio peer; then the
# linter, which must find nothing; then a fault soak of SOAK_SECONDS (default
# 60; 0 skips it), which must lose and duplicate nothing. Extra arguments go
# to `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --python
export CONTACT_PYTHON="$PWD/.venv/bin/python"
cargo test --locked "$@"
if cargo clippy --version >/dev/null 2>&1; then
    cargo clippy --locked --all-targets -- -D warnings
else
    echo "test: clippy is not installed (rustup component add clippy); lint skipped" >&2
fi
if [ "${SOAK_SECONDS:-60}" != 0 ]; then
    scripts/soak.sh "${SOAK_SECONDS:-60}"
fi
