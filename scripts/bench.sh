#!/usr/bin/env bash
# The end-to-end benchmark (see BENCHMARKS.md, which it rewrites): round-trip
# throughput with 1/8/64 clients beside the bare grpcio ceiling and the seed's
# Python pair, open-loop latency, fan-out to 10,000 agents (when contact-load
# is built), a client that stops reading, growth with the work, and the NATS
# JetStream store (--store, on nats-server nodes it starts) beside the
# embedded journal. Prints the table (targets with pass/fail marks) and
# writes BENCHMARKS.md and its plots (benchmarks/*.png). One command on a
# fresh machine: it installs what is missing, builds the release binaries
# (the first build compiles the gRPC C-core, ~15-20 minutes) and runs the
# bench target benches/end_to_end.
#
# Usage: scripts/bench.sh [--quick] [--reps N] [--only PARTS] [--keep]
#   --quick       a smoke run of a couple of minutes (small sizes, one run each)
#   --reps N      runs of each round-trip configuration (median quoted; default 3)
#   --only PARTS  comma-separated: roundtrip, latency, fanout, stall, growth,
#                 store (BENCHMARKS.md keeps the other parts' sections)
#   --keep        keep every run's logs, state and results (the path is printed)
# Exits 1 if a run loses a task or a result (the log to read is named).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --python

# The plots' text is drawn from a TrueType font file (no font library needed).
font=""
for f in /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf /usr/share/fonts/dejavu/DejaVuSans.ttf \
    /usr/share/fonts/TTF/DejaVuSans.ttf; do
    [ -f "$f" ] && font="$f"
done
if [ -z "$font" ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "bench: installing fonts-dejavu-core (the plots' font) with apt-get" >&2
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fonts-dejavu-core >/dev/null
    else
        echo "bench: no DejaVu Sans font for the plots; install fonts-dejavu-core" >&2
        exit 1
    fi
fi

# The bench target is built with the release profile too (not cargo bench's
# own profile), so it shares the release build of the gRPC C-core.
target="${CARGO_TARGET_DIR:-target}"
driver="$(cargo build --release --locked --bins --bench end_to_end --message-format=json-render-diagnostics \
    | sed -n 's/.*"executable":"\([^"]*\/end_to_end-[^"]*\)".*/\1/p' | tail -n 1)"
if [ -z "$driver" ]; then
    echo "bench: cargo built no end_to_end benchmark executable" >&2
    exit 1
fi
exec "$driver" run --bin-dir "$target/release" --python "$PWD/.venv/bin/python" \
    --command "scripts/bench.sh${*:+ $*}" "$@"
