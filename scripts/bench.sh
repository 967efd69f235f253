#!/usr/bin/env bash
# Throughput, side by side in one run: N tasks pushed and N results
# acknowledged, one client, for the seed's Python server and client (the
# article's program, tests/interop/seed_*.py) and for contact (with and
# without --state-dir, queue and broadcast), each REPS times; prints medians.
# Usage: scripts/bench.sh [N] [REPS]   (defaults 20000 and 3). Uses the
# release build (built here; the first build compiles the gRPC C-core).
set -euo pipefail
cd "$(dirname "$0")/.."
n="${1:-20000}"
reps="${2:-3}"
scripts/setup.sh --python
cargo build --release --locked --bins
bin="${CARGO_TARGET_DIR:-target}/release"
py="$PWD/.venv/bin/python"
work="$(mktemp -d)"
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
"$py" -m grpc_tools.protoc -I tests/interop --python_out="$work" --grpc_python_out="$work" tests/interop/contact.proto
seq -f "job-%g" 1 "$n" > "$work/tasks.txt"
export RUST_LOG=warn

free_port() { "$py" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 100); do "$py" -c "import socket; socket.create_connection(('127.0.0.1',$1),0.1)" 2>/dev/null && return; sleep 0.05; done; echo "bench: nothing listens on $1" >&2; exit 1; }
now() { date +%s.%N; }

# One measurement: start a server ($1: seed|contact, rest: contact flags), time one client ($CLIENT) to N acknowledged results.
measure() {
    local server="$1"; shift
    local port; port="$(free_port)"
    rm -rf "$work/state"
    if [ "$server" = seed ]; then
        "$py" tests/interop/seed_server.py "$work" "$n" 1000000 "$port" > /dev/null &
    else
        "$bin/contact-server" --listen "127.0.0.1:$port" --tasks-from "$work/tasks.txt" --stats-every 3600 "$@" 2>/dev/null &
    fi
    local srv=$!
    wait_port "$port"
    local t0; t0="$(now)"
    if [ "$CLIENT" = seed ]; then
        "$py" tests/interop/seed_client.py "$work" "127.0.0.1:$port" "$n" 1 > "$work/client.out"
        grep -q "^ACKED $n$" "$work/client.out" || { echo "bench: the seed client did not finish" >&2; exit 1; }
    else
        "$bin/contact-client" --server "127.0.0.1:$port" --id bench --max-tasks "$n" --status-every 60 2>/dev/null
    fi
    local t1; t1="$(now)"
    kill -INT "$srv" 2>/dev/null || true; wait "$srv" 2>/dev/null || true
    awk -v n="$n" -v a="$t0" -v b="$t1" 'BEGIN { print n / (b - a) }'
}

median() { sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }

row() {
    local label="$1"; shift
    local rates=()
    for _ in $(seq "$reps"); do rates+=("$(measure "$@")"); done
    printf '%-58s %10.0f results/s   (runs: %s)\n' "$label" "$(printf '%s\n' "${rates[@]}" | median)" "$(printf '%.0f ' "${rates[@]}")"
}

echo "bench: $n tasks, one client, $reps runs each, median"
CLIENT=seed row "seed Python server  + seed Python client" seed
CLIENT=seed row "contact server      + seed Python client (broadcast, no state)" contact --no-state
CLIENT=contact row "contact server      + contact client (broadcast, no state)" contact --no-state --max-in-flight 256
CLIENT=contact row "contact server      + contact client (broadcast, --state-dir)" contact --state-dir "$work/state" --max-in-flight 256
CLIENT=contact row "contact server      + contact client (queue, --state-dir)" contact --dispatch queue --state-dir "$work/state" --max-in-flight 256
CLIENT=contact row "contact server      + contact client (queue, --state-dir, K=16)" contact --dispatch queue --state-dir "$work/state"
