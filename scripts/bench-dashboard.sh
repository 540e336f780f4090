#!/usr/bin/env bash
# Dashboard benchmark at scale: how fast the overview (GET /), the job lists
# (GET /jobs, filtered by state+queue and by queue+kind), the dead letters
# (GET /dead) and the queues page (GET /queues) answer, full page and htmx
# fragment, with JOBS jobs stored (default 1,000,000), beside GET /healthz
# as the same-run baseline (read the figures as ratios on a noisy machine).
# It also times the store calls behind those pages without HTTP.
#
# It runs examples/dashboard_bench.rs (release build) against
#   1. a fresh SQLite file in a temporary directory, then
#   2. a fresh PostgreSQL database on $PGHOST:$PGPORT (created here, dropped
#      on exit), measured twice: right after the fill (ANALYZE only), then
#      again on the same data after VACUUM ANALYZE (--keep --vacuum), which
#      sets the visibility map as autovacuum would in production (index-only
#      scans; the PostgreSQL on the dev machine runs with autovacuum off).
# Each run fills the database with raw SQL (a realistic mix: ~90% completed
# over 24 h, 5% dead in a few error groups, 2% retrying, 2% queued, a few
# hundred running; 10 queues, 8 kinds; attempt rows), then does 3 warm-ups
# and 30 timed requests per page and prints p50/p95/max.
#
# How long, on the 2-core dev machine with 1,000,000 jobs: filling takes
# about 6 s on SQLite and 20 s on PostgreSQL, the requests about 2.5 minutes
# per run (~1,300 timed requests, the slow pages at 0.1-0.6 s each): about
# 8 minutes for the three runs, plus the release build the first time
# (several minutes). JOBS=100000 takes under a minute.
#
# Usage: scripts/bench-dashboard.sh [extra dashboard_bench flags, e.g. --json]
# Environment: JOBS (1000000), BACKENDS ("sqlite postgres"), PGHOST
# (127.0.0.1), PGPORT (5432), PGUSER (postgres; trust or .pgpass auth).
set -euo pipefail

cd "$(dirname "$0")/.."
JOBS=${JOBS:-1000000}
BACKENDS=${BACKENDS:-"sqlite postgres"}
PGHOST=${PGHOST:-127.0.0.1}
PGPORT=${PGPORT:-5432}
PGUSER=${PGUSER:-postgres}
export PGHOST PGPORT PGUSER

tmp=$(mktemp -d)
pg_db=""
cleanup() {
    rm -rf "$tmp"
    if [ -n "$pg_db" ]; then
        psql -q -d postgres -c "DROP DATABASE IF EXISTS $pg_db WITH (FORCE)" >/dev/null || true
    fi
}
trap cleanup EXIT

bench() {
    cargo run --quiet --release --example dashboard_bench -- --jobs "$JOBS" "$@"
}

echo "== $(date -u +%FT%TZ) $(nproc) CPUs; uptime:$(uptime)" >&2
cargo build --quiet --release --example dashboard_bench

for backend in $BACKENDS; do
    case "$backend" in
    sqlite)
        echo "== SQLite ($tmp/bench.db)" >&2
        bench --database-url "$tmp/bench.db" "$@"
        rm -f "$tmp"/bench.db*
        ;;
    postgres)
        pg_db="errand_bench_$$_$(date +%s)"
        echo "== PostgreSQL ($PGHOST:$PGPORT/$pg_db)" >&2
        psql -q -v ON_ERROR_STOP=1 -d postgres -c "CREATE DATABASE $pg_db"
        url="postgres://$PGUSER@$PGHOST:$PGPORT/$pg_db"
        bench --database-url "$url" "$@"
        echo "== PostgreSQL again, same data, after VACUUM ANALYZE" >&2
        bench --database-url "$url" --keep --vacuum "$@"
        psql -q -d postgres -c "DROP DATABASE IF EXISTS $pg_db WITH (FORCE)"
        pg_db=""
        ;;
    *)
        echo "unknown backend '$backend' (sqlite, postgres)" >&2
        exit 2
        ;;
    esac
done
echo "== done; uptime:$(uptime)" >&2
