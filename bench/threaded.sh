#!/usr/bin/env bash
# Threaded backends under open-loop load: 4 usher-worker processes x 4 threads, a
# mix of 90% /sleep?ms=10 and 10% /sleep?ms=200, at ~90%, ~98% and ~110% of the
# fleet's capacity, through:
#   usher    least_outstanding, max_in_flight 4 per backend, central queue (5s)
#   nginx    least_conn, keepalive upstream (no queue: the workers' own queues fill)
#   haproxy  balance leastconn, server maxconn 4, timeout queue 5s
# The load is usher-load (fixed rate, latency from the scheduled send time).
#
# Pinning: each proxy on core PROXY_CPU (0), usher-load on LOAD_CPU (1); the workers
# are not pinned (they mostly sleep).
#
# Env: BENCH_SECS (20) measured seconds per run, WARMUP_SECS (2), LOADS
#      ("0.90 0.98 1.10"), WORKERS (4), THREADS (4), MIX, TARGETS ("usher
#      usher-sef nginx haproxy", also direct), CONNECTIONS (4096) usher-load's
#      in-flight limit, WORKER_QUEUE (1024) usher-worker --queue, BACKEND (auto |
#      waitress), NO_BUILD=1,
#      KEEP_WORK=1, RESULTS_OUT=FILE (a metadata line, then the JSON lines of the
#      table; bench/plot.py draws them).
set -euo pipefail
# shellcheck source=bench/lib.sh
source "$(dirname "$0")/lib.sh"

SECS="${BENCH_SECS:-20}"
WARMUP="${WARMUP_SECS:-2}"
LOADS="${LOADS:-0.90 0.98 1.10}"
WORKERS="${WORKERS:-4}"
THREADS="${THREADS:-4}"
MIX="${MIX:-90:/sleep?ms=10,10:/sleep?ms=200}"
TARGETS="${TARGETS:-usher usher-sef nginx haproxy}"
CONNECTIONS="${CONNECTIONS:-4096}"

ensure_tools
build
raise_nofile

read -r CAPACITY MEAN_MS < <($PY capacity "$((WORKERS * THREADS))" "$MIX")
log "capacity: $WORKERS workers x $THREADS threads / mean service ${MEAN_MS} ms = $CAPACITY req/s"

BPORTS=()
for _ in $(seq "$WORKERS"); do
  p="$(free_port)"
  start_backend "$p" "$THREADS"
  BPORTS+=("$p")
done
log "backends: $BACKEND_KIND x $WORKERS on ports ${BPORTS[*]}"
log "pinning: proxy on cpu $PROXY_CPU, usher-load on cpu $LOAD_CPU, workers unpinned"

RESULTS="$WORK/threaded.jsonl"
: >"$RESULTS"

record_unavailable() {  # TARGET WHY
  local l
  for l in $LOADS; do
    python3 -c 'import json,sys; print(json.dumps({"target": sys.argv[1], "load": float(sys.argv[2]), "unavailable": True, "why": sys.argv[3][:120]}))' \
      "$1" "$l" "$2" >>"$RESULTS"
  done
}

run_loads() {  # TARGET PORT
  local target="$1" port="$2" l rate out
  for l in $LOADS; do
    rate="$(python3 -c "print(round($l * $CAPACITY, 1))")"
    out="$WORK/$target-$l.json"
    log "$target: load $l -> $rate req/s for ${SECS}s (+${WARMUP}s warm-up)"
    taskset -c "$LOAD_CPU" "$BIN/usher-load" --rate "$rate" --duration "${SECS}s" \
      --warmup "${WARMUP}s" --connections "$CONNECTIONS" --timeout 30s \
      --target "127.0.0.1:$port" --mix "$MIX" --json >"$out"
    python3 - "$target" "$l" "$rate" "$out" >>"$RESULTS" <<'EOF'
import json, sys
target, load, rate, path = sys.argv[1:]
print(json.dumps({"target": target, "load": float(load), "rate": float(rate),
                  "report": json.load(open(path))}))
EOF
    # Let the workers' queues drain before the next run.
    sleep 2
  done
}

for target in $TARGETS; do
  port="$(free_port)"
  case "$target" in
    usher)
      admin="$(free_port)"; cfg="$WORK/usher.yaml"
      write_usher "$cfg" "$port" "$admin" "$THREADS" "${BPORTS[@]}"
      if start_usher "$cfg" "$port" "$admin"; then
        pid=$LAST_PID; run_loads usher "$port"; stop_pid "$pid"
      else
        echo "usher: not available" >&2; record_unavailable usher "$UNAVAILABLE_WHY"
      fi ;;
    usher-sef)
      # Usher's default queue is shortest-expected-first by *path*; both request
      # classes here hit /sleep, so the plain `usher` row behaves as FIFO. This
      # row tells them apart by path and query.
      admin="$(free_port)"; cfg="$WORK/usher-sef.yaml"
      USHER_QUEUE_EXTRA=", discipline: shortest_first, classify: path_and_query" \
        write_usher "$cfg" "$port" "$admin" "$THREADS" "${BPORTS[@]}"
      if start_usher "$cfg" "$port" "$admin"; then
        pid=$LAST_PID; run_loads usher-sef "$port"; stop_pid "$pid"
      else
        echo "usher-sef: not available" >&2; record_unavailable usher-sef "$UNAVAILABLE_WHY"
      fi ;;
    nginx)
      dir="$WORK/nginx"
      write_nginx "$dir" "$port" least_conn "${BPORTS[@]}"
      if start_nginx "$dir" "$port"; then
        pid=$LAST_PID; run_loads nginx "$port"; stop_pid "$pid"
      else
        record_unavailable nginx "$UNAVAILABLE_WHY"
      fi ;;
    haproxy)
      cfg="$WORK/haproxy.cfg"
      write_haproxy "$cfg" "$port" leastconn "$THREADS" "${BPORTS[@]}"
      if start_haproxy "$cfg" "$port"; then
        pid=$LAST_PID; run_loads haproxy "$port"; stop_pid "$pid"
      else
        record_unavailable haproxy "$UNAVAILABLE_WHY"
      fi ;;
    direct)
      # Not a balancer: every request to the first worker. Only for sanity checks.
      run_loads direct "${BPORTS[0]}" ;;
    *) log "unknown target $target"; exit 2 ;;
  esac
done

echo
echo "threaded: $WORKERS x $BACKEND_KIND --threads $THREADS, mix $MIX"
echo "capacity $CAPACITY req/s (mean service $MEAN_MS ms); ${SECS}s measured per run after ${WARMUP}s warm-up"
echo "proxies pinned to cpu $PROXY_CPU (taskset), usher-load to cpu $LOAD_CPU"
$PY threaded-table "$RESULTS"
write_results_out threaded "workers=$WORKERS" "threads=$THREADS" "mix=$MIX" \
  "secs=$SECS" "warmup_secs=$WARMUP" "loads=$LOADS" "targets=$TARGETS" \
  "capacity=$CAPACITY" "mean_service_ms=$MEAN_MS" "backend=$BACKEND_KIND" \
  "connections=$CONNECTIONS" "worker_queue=${WORKER_QUEUE:-1024}"
