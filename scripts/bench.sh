#!/usr/bin/env bash
# errand's performance figures, each beside a baseline measured in the same
# run (read them as ratios: these machines are shared and noisy), on SQLite
# and on PostgreSQL. Prints the README's table (medians over ROUNDS rounds).
#
# Per backend and round, on a fresh database:
#   1. `errand bench --baseline --json`: store enqueue and drain of JOBS no-op
#      jobs, pickup latency on an idle queue, and the plain-SQL baselines
#      (multi-row INSERT of 1,000; a loop claiming 100 per statement and
#      deleting them).
#   2. `POST /api/jobs/batch` (1,000 jobs a request, one connection, as the
#      baseline has) against
#      `errand serve` with no worker on the queue, with oha; its jobs/s over
#      step 1's multi-row INSERT rate.
#   3. Single `POST /api/jobs` at a steady 1,000 requests/s for DURATION
#      (16 connections, oha --latency-correction) while the workers run the
#      jobs: p50 and p99; beside GET /healthz at the same rate on the same
#      server just before (the machine's noise floor).
#   4. Memory: VmRSS of `errand serve` idle, then its peak while it drains
#      DRAIN_JOBS jobs posted in batches.
#   5. With PEERS=1 (PostgreSQL only): graphile-worker (npm) burn-down of JOBS
#      jobs in its batched mode (local queue, batched completions),
#      scripts/peers/graphile-worker.js, right after errand's own round.
# The dashboard at 1,000,000 jobs has its own script (several minutes):
# scripts/bench-dashboard.sh.
#
# Usage: scripts/bench.sh
# Environment: ROUNDS (3), JOBS (20000), DURATION (20s), DRAIN_JOBS (100000),
# BACKENDS ("sqlite postgres"), PEERS (0; 1 needs node and npm), PGHOST
# (127.0.0.1), PGPORT (5432), PGUSER (postgres; trust or .pgpass auth).
# Needs: cargo, python3, psql for PostgreSQL, and oha (installed with
# `cargo install oha --locked` if missing).
# How long on the 2-core dev machine: about 1.5 minutes per round and
# backend, plus the release build the first time.
set -euo pipefail

cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-3}
JOBS=${JOBS:-20000}
DURATION=${DURATION:-20s}
DRAIN_JOBS=${DRAIN_JOBS:-100000}
BACKENDS=${BACKENDS:-"sqlite postgres"}
PEERS=${PEERS:-0}
PGHOST=${PGHOST:-127.0.0.1}
PGPORT=${PGPORT:-5432}
PGUSER=${PGUSER:-postgres}
export PGHOST PGPORT PGUSER
export PGOPTIONS="--client-min-messages=warning"

if ! command -v oha > /dev/null; then
    echo "bench: installing oha (HTTP load generator) with cargo install" >&2
    cargo install oha --locked >&2
fi
cargo build --release --quiet
BIN=$PWD/target/release/errand
tmp=$(mktemp -d)
results=$tmp/results.jsonl
server=""
cleanup() {
    if [ -n "$server" ]; then kill "$server" 2> /dev/null || true; fi
    if [[ " $BACKENDS " == *" postgres "* ]]; then
        psql -q -d postgres -c "DROP DATABASE IF EXISTS errand_bench" 2> /dev/null || true
        psql -q -d postgres -c "DROP DATABASE IF EXISTS errand_bench_peer" 2> /dev/null || true
    fi
    rm -rf "$tmp"
}
trap cleanup EXIT

# 1,000 jobs for the batch endpoint, and one for the single one.
python3 -c 'import json; print(json.dumps({"jobs": [{"queue": "bench", "kind": "noop", "args": {}}] * 1000}))' > "$tmp/batch.json"
single='{"kind": "noop", "args": {}}'

fresh_db() { # backend -> URL of an empty database
    case $1 in
        sqlite)
            rm -f "$tmp"/bench.db*
            echo "$tmp/bench.db"
            ;;
        postgres)
            psql -q -d postgres -c "DROP DATABASE IF EXISTS errand_bench" > /dev/null
            psql -q -d postgres -c "CREATE DATABASE errand_bench" > /dev/null
            echo "postgres://$PGUSER@$PGHOST:$PGPORT/errand_bench"
            ;;
    esac
}

start_server() { # url queues -> sets $server, waits for /healthz
    "$BIN" --database-url "$1" serve --bind 127.0.0.1:18089 --queues "$2" \
        > "$tmp/serve.log" 2>&1 &
    server=$!
    for _ in $(seq 100); do
        curl -sf http://127.0.0.1:18089/healthz > /dev/null 2>&1 && return 0
        sleep 0.1
    done
    echo "bench: errand serve did not start:" >&2
    cat "$tmp/serve.log" >&2
    exit 1
}

stop_server() {
    kill "$server"
    wait "$server" 2> /dev/null || true
    server=""
}

rss_kb() { awk '/^VmRSS/ {print $2}' "/proc/$server/status"; }

backlog() { # jobs queued or running, from the API
    curl -sf http://127.0.0.1:18089/api/queues | python3 -c '
import json, sys
print(sum(q["counts"].get(s, 0) for q in json.load(sys.stdin)["queues"] for s in ("queued", "running", "retrying")))'
}

for backend in $BACKENDS; do
    for round in $(seq "$ROUNDS"); do
        echo "bench: $backend, round $round of $ROUNDS" >&2
        url=$(fresh_db "$backend")
        "$BIN" --database-url "$url" bench --baseline --json --jobs "$JOBS" > "$tmp/store.json"

        url=$(fresh_db "$backend")
        start_server "$url" "idle=1"
        oha --no-tui --output-format json -n 100 -c 1 -m POST -T application/json \
            -D "$tmp/batch.json" http://127.0.0.1:18089/api/jobs/batch > "$tmp/batch-oha.json"
        stop_server

        url=$(fresh_db "$backend")
        start_server "$url" "default=8"
        sleep 2
        idle_kb=$(rss_kb)
        # The machine's own noise floor, same server, same rate: GET /healthz.
        oha --no-tui --output-format json -z "$DURATION" -q 1000 -c 16 --latency-correction \
            http://127.0.0.1:18089/healthz > "$tmp/healthz-oha.json"
        oha --no-tui --output-format json -z "$DURATION" -q 1000 -c 16 --latency-correction \
            -m POST -T application/json -d "$single" http://127.0.0.1:18089/api/jobs \
            > "$tmp/single-oha.json"
        # Memory while draining: post DRAIN_JOBS jobs to the worked queue,
        # then sample until the backlog is gone.
        python3 -c "import json; print(json.dumps({'jobs': [{'kind': 'noop', 'args': {}}] * 1000}))" > "$tmp/drain.json"
        oha --no-tui -n $((DRAIN_JOBS / 1000)) -c 2 -m POST -T application/json \
            -D "$tmp/drain.json" http://127.0.0.1:18089/api/jobs/batch > /dev/null
        peak_kb=$(rss_kb)
        while [ "$(backlog)" -gt 0 ]; do
            now_kb=$(rss_kb)
            [ "$now_kb" -gt "$peak_kb" ] && peak_kb=$now_kb
            sleep 0.1
        done
        stop_server

        peer='null'
        if [ "$PEERS" = 1 ] && [ "$backend" = postgres ]; then
            if [ ! -d "$tmp/peers/node_modules/graphile-worker" ]; then
                mkdir -p "$tmp/peers"
                (cd "$tmp/peers" && npm install --silent graphile-worker@0.17 pg > /dev/null)
            fi
            cp scripts/peers/graphile-worker.js "$tmp/peers/"
            psql -q -d postgres -c "DROP DATABASE IF EXISTS errand_bench_peer" > /dev/null
            psql -q -d postgres -c "CREATE DATABASE errand_bench_peer" > /dev/null
            peer=$(node "$tmp/peers/graphile-worker.js" \
                "postgres://$PGUSER@$PGHOST:$PGPORT/errand_bench_peer" "$JOBS" 8 500)
        fi
        python3 - "$tmp" "$backend" "$idle_kb" "$peak_kb" "$peer" >> "$results" << 'EOF'
import json, sys
tmp, backend, idle_kb, peak_kb, peer = sys.argv[1:]
store = json.load(open(f"{tmp}/store.json"))
batch = json.load(open(f"{tmp}/batch-oha.json"))
single = json.load(open(f"{tmp}/single-oha.json"))
healthz = json.load(open(f"{tmp}/healthz-oha.json"))
codes = single.get("statusCodeDistribution", {})
print(json.dumps({
    "backend": backend,
    "store": store,
    "batch_jobs_per_s": batch["summary"]["requestsPerSec"] * 1000,
    "batch_ok": batch["summary"]["successRate"],
    "single_p50_ms": single["latencyPercentiles"]["p50"] * 1000,
    "single_p99_ms": single["latencyPercentiles"]["p99"] * 1000,
    "single_rps": single["summary"]["requestsPerSec"],
    "healthz_p50_ms": healthz["latencyPercentiles"]["p50"] * 1000,
    "healthz_p99_ms": healthz["latencyPercentiles"]["p99"] * 1000,
    "single_ok": codes.get("202", 0) / max(1, sum(codes.values())),
    "idle_rss_mb": int(idle_kb) / 1024,
    "peak_rss_mb": int(peak_kb) / 1024,
    "peer": json.loads(peer),
}))
EOF
    done
done

python3 - "$results" << 'EOF'
import json, statistics, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
def med(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None
print("| measure | backend | errand | baseline (same run) | ratio | target |")
print("|---|---|---|---|---|---|")
for backend in dict.fromkeys(r["backend"] for r in rows):
    rs = [r for r in rows if r["backend"] == backend]
    n = len(rs)
    s = lambda k: [r["store"][k] for r in rs]
    drain, base = med(s("drain_jobs_per_s")), med(s("baseline_drain_jobs_per_s"))
    ratio = med(s("ratio"))
    target = "≥ 0.7" if backend == "postgres" else "≥ 0.5"
    print(f"| drain, no-op jobs, 8 threads | {backend} | {drain:,.0f} jobs/s | {base:,.0f} jobs/s (claim 100 + delete loop) | {ratio:.2f}× | {target} |")
    peers = [r for r in rs if r["peer"]]
    if peers:
        pr = med([r["store"]["drain_jobs_per_s"] / r["peer"]["drain_jobs_per_s"] for r in peers])
        pd = med([r["peer"]["drain_jobs_per_s"] for r in peers])
        print(f"| drain vs graphile-worker {peers[0]['peer']['version']} (local queue 500, batched completions) | {backend} | {drain:,.0f} jobs/s | {pd:,.0f} jobs/s | {pr:.2f}× | ≥ 2 |")
    enq, base_enq = med(s("enqueue_jobs_per_s")), med(s("baseline_enqueue_jobs_per_s"))
    print(f"| enqueue, store, 1,000 per transaction | {backend} | {enq:,.0f} jobs/s | {base_enq:,.0f} jobs/s (multi-row INSERT) | {med(s('enqueue_ratio')):.2f}× | |")
    batch = med([r["batch_jobs_per_s"] for r in rs])
    bratio = med([r["batch_jobs_per_s"] / r["store"]["baseline_enqueue_jobs_per_s"] for r in rs])
    print(f"| enqueue, POST /api/jobs/batch of 1,000 | {backend} | {batch:,.0f} jobs/s | {base_enq:,.0f} jobs/s (multi-row INSERT) | {bratio:.2f}× | ≥ 0.5 |")
    p50, p99 = med([r["single_p50_ms"] for r in rs]), med([r["single_p99_ms"] for r in rs])
    ok = min(r["single_ok"] for r in rs)
    h50, h99 = med([r["healthz_p50_ms"] for r in rs]), med([r["healthz_p99_ms"] for r in rs])
    print(f"| single POST /api/jobs at 1,000 req/s, the workers running them | {backend} | p50 {p50:.2f} ms, p99 {p99:.2f} ms ({ok:.1%} answered 202) | GET /healthz at 1,000 req/s: p50 {h50:.2f} ms, p99 {h99:.2f} ms | | p99 ≤ 10 ms |")
    pk50, pk99 = med(s("pickup_p50_ms")), med(s("pickup_p99_ms"))
    ptarget = "p50 ≤ 5 ms" if backend == "postgres" else "p50 ≤ 2 ms"
    print(f"| pickup, enqueue → handler start, idle queue | {backend} | p50 {pk50:.2f} ms, p99 {pk99:.2f} ms | | | {ptarget} |")
    idle, peak = med([r["idle_rss_mb"] for r in rs]), max(r["peak_rss_mb"] for r in rs)
    print(f"| RSS of errand serve, idle / peak while draining | {backend} | {idle:.1f} MB / {peak:.1f} MB | | | ≤ 30 / ≤ 100 MB |")
backends = len({r["backend"] for r in rows})
print(f"\n{len(rows) // max(1, backends)} rounds per backend; medians (peak RSS: the highest).")
EOF
