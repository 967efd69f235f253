#!/usr/bin/env bash
# Fault soak: a journaled server and 8 --exec clients on loopback, in a queue
# and then a broadcast phase, with clients and the server killed (SIGKILL) and
# restarted, clients paused (SIGSTOP/SIGCONT), and every connection through a
# proxy that delays, slices, stalls and cuts traffic; then every task is
# accounted for. Prints one summary line; exits 1 on any lost or duplicated
# task, on growth of the server's memory or descriptors, or when a program
# failed. The design is in the header of scripts/soak.py.
# Usage: scripts/soak.sh [SECONDS] [--seed N] [--keep] ...   (SECONDS of
# faults, default 60; SOAK_SEED=N or --seed N replays a fault schedule;
# scripts/soak.sh --help lists the rest). Uses the debug build, the one the
# tests build: a release build compiles the gRPC C-core once more (about 14
# minutes on two cores), and what the soak checks does not depend on speed
# (the number of tasks is sized for the debug build).
set -euo pipefail
cd "$(dirname "$0")/.."
command -v python3 >/dev/null 2>&1 || { echo "soak: python3 is needed (apt-get install python3)" >&2; exit 1; }
scripts/setup.sh
cargo build --locked --bins
# The harness kills everything it started on the way out (and its children
# die with it: PR_SET_PDEATHSIG), so it replaces this shell.
exec python3 scripts/soak.py --bin "${CARGO_TARGET_DIR:-target}/debug" "$@"
