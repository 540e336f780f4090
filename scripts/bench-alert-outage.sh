#!/usr/bin/env bash
# Does an SMTP outage slow jobs down? Drains 5,000 no-op jobs through
# `errand serve` (SQLite, 8 worker threads, jobs enqueued over the API into a
# paused queue, then resumed) three times with an alert firing into an SMTP
# server that accepts connections and never answers (the sender thread sits
# in its 60 s timeout), and three times with no alerts, alternating, in the
# same run. Prints jobs/s per run; compare the medians. About a minute.
# Needs curl, python3 and ss.
set -uo pipefail
cd "$(dirname "$0")/.."
cargo build --quiet
BIN=target/debug/errand
cfg=$(mktemp --suffix=.toml)
cat > "$cfg" <<'TOML'
[smtp]
url = "smtp://127.0.0.1:2599"
to = ["ops@example.com"]
timeout = "60s"
[alerts]
evaluate_every = "500ms"
TOML
python3 -c "
import socket
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(('127.0.0.1', 2599)); s.listen(100); conns = []
while True:
    c, _ = s.accept(); conns.append(c)
" &
HOLE=$!
trap 'kill $HOLE 2>/dev/null; rm -f "$cfg" /tmp/tp.db*' EXIT
port=18100
run() {
  port=$((port + 1)); local base=localhost:$port
  rm -f /tmp/tp.db*
  $BIN serve --database-url /tmp/tp.db --bind 127.0.0.1:$port --queues default=8 "$@" >/tmp/tp.log 2>&1 &
  local pid=$!
  until curl -sf $base/healthz >/dev/null; do sleep 0.1; done
  curl -s -XPOST $base/api/jobs -H 'content-type: application/json' -d '{"kind":"fail","args":{"permanent":true}}' >/dev/null
  sleep 3
  curl -s -XPOST $base/api/queues/default/pause >/dev/null
  body=$(python3 -c 'import json;print(json.dumps({"jobs":[{"kind":"noop"}]*1000}))')
  for i in 1 2 3 4 5; do curl -s -XPOST $base/api/jobs/batch -H 'content-type: application/json' -d "$body" >/dev/null; done
  local start=$(date +%s.%N)
  curl -s -XPOST $base/api/queues/default/resume >/dev/null
  until [ "$(curl -s $base/api/stats | python3 -c 'import sys,json;print(json.load(sys.stdin)["jobs"]["completed"])' 2>/dev/null)" = 5000 ]; do sleep 0.05; done
  local end=$(date +%s.%N)
  local firing=$(grep -c "alert firing" /tmp/tp.log)
  local stuck=$(python3 -c "print('$(ss -tn state established '( dport = :2599 )' | tail -n +2 | wc -l)')")
  echo "$(echo "5000 / ($end - $start)" | bc -l | cut -c1-7) jobs/s  alert firing: $firing, connections held by the blackhole: $stuck  ($*)"
  kill $pid; wait $pid 2>/dev/null
}
for round in 1 2 3; do
  run
  run --config "$cfg"
done
