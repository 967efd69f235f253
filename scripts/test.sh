#!/usr/bin/env bash
# Runs every test: unit tests, integration tests against real servers on
# ephemeral ports, and the interop tests with a Python grpcio peer.
# Extra arguments go to `cargo test` (e.g. a test name).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --python
export CONTACT_PYTHON="$PWD/.venv/bin/python"
cargo test --locked "$@"
