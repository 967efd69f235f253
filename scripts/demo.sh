#!/usr/bin/env bash
# The demo: a server with the seed's generator and two clients (one echoing,
# one running a command with --exec) exchange tasks, results and status for
# DEMO_SECS seconds (default 20), then everything stops gracefully and the
# recorded results are summarised. DEMO_ADDR changes the address (default
# 127.0.0.1:50051).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
addr="${DEMO_ADDR:-127.0.0.1:50051}"
secs="${DEMO_SECS:-20}"

cargo build --locked --bins
bin="${CARGO_TARGET_DIR:-target}/debug"
work="$(mktemp -d)"
results="$work/results.jsonl"
# Per-task lines (tasks produced and received, results) are at debug: shown here.
export RUST_LOG="${RUST_LOG:-info,grpcio=warn,contact=debug}"

prefix() { sed -u "s/^/[$1] /"; }
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; }
trap cleanup EXIT

"$bin/contact-server" --listen "$addr" --generate 10 --every 4 --results-to "$results" --state-dir "$work/state" \
    2> >(prefix server) &
server=$!; pids+=("$server")
sleep 1
kill -0 "$server" 2>/dev/null || { echo "demo: the server did not start (is $addr in use? set DEMO_ADDR)" >&2; exit 1; }

"$bin/contact-client" --server "$addr" --id echo-agent --status-every 5 2> >(prefix echo-agent) &
pids+=("$!")
"$bin/contact-client" --server "$addr" --id exec-agent --status-every 5 \
    --exec "sh -c 'echo \"\$0 handled by \$(uname -n), pid \$\$\"'" 2> >(prefix exec-agent) &
pids+=("$!")

sleep "$secs"
echo "demo: stopping clients, then the server (SIGINT)" >&2
kill -INT "${pids[@]:1}"; wait "${pids[@]:1}" || true
kill -INT "$server"; wait "$server" || true
trap - EXIT

echo
echo "demo: $(wc -l < "$results") results recorded in $results; two of them:"
grep -m1 '"client":"echo-agent"' "$results" || true
grep -m1 '"client":"exec-agent"' "$results" || true
