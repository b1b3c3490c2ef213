#!/usr/bin/env bash
# Several Usher replicas in front of the same threaded workers (issue 14), live, at
# small scale: 2 workers x 4 threads, 3 Usher replicas, open-loop GET /sleep?ms=50 at
# 80% of the fleet's capacity (2 x 4 / 0.05 s = 160 req/s -> 128 req/s), split across
# the replicas the way a Kubernetes Service splits connections:
#   uneven   3 replicas (proxy_replicas: 3), traffic 70/15/15
#   single   1 Usher (proxy_replicas: 1) carrying the same total: the reference
#   equal    3 replicas, traffic 33/33/33 (throughput against `single`)
# Each replica gets its own usher-load. During the measured window each worker's
# /healthz is sampled every ~10 ms (max `queued`), and the refusals (503s) the
# workers sent are read from their /metrics before and after.
#
# Backends: BACKEND=usher-worker (default): `usher-worker --threads 4 --queue 0`
# (exact admission: a worker with all threads busy refuses at once with
# `X-Usher-Refused: busy`). BACKEND=waitress: waitress --threads=4 serving
# tests/python/usher_wsgi_app.py wrapped in usher_wsgi.UsherLoad (worker/python).
#
# Each Usher: one upstream, the 2 workers as static backends with
# `max_in_flight: auto`, `proxy_replicas: N`, active health checks every
# HC_INTERVAL, env USHER_REPLICA_ID=usher-0/1/2.
#
# Pinning: the Ushers on PROXY_CPU (0), the usher-loads on LOAD_CPU (1), workers and
# the sampler unpinned.
#
# Env: BENCH_SECS (20) measured seconds per case, WARMUP_SECS (2), ROUNDS (3),
#      CASES ("uneven single equal"), SPLIT ("70,15,15", for `uneven`), LOAD (0.8),
#      SLEEP_MS (50), WORKERS (2), THREADS (4), REPLICAS (3), WORKER_QUEUE (0),
#      HC_INTERVAL (1s), CONNECTIONS (512 per usher-load), SAMPLE_MS (10),
#      BACKEND (usher-worker | waitress), NO_BUILD=1, BIN, KEEP_WORK=1,
#      RESULTS_OUT=FILE (a metadata line, then one JSON line per replica, case and
#      round; `bench/replicas.py table FILE` prints the table again).
set -euo pipefail
# shellcheck source=bench/lib.sh
source "$(dirname "$0")/lib.sh"

SECS="${BENCH_SECS:-20}"
WARMUP="${WARMUP_SECS:-2}"
ROUNDS="${ROUNDS:-3}"
CASES="${CASES:-uneven single equal}"
SPLIT="${SPLIT:-70,15,15}"
LOAD="${LOAD:-0.8}"
SLEEP_MS="${SLEEP_MS:-50}"
WORKERS="${WORKERS:-2}"
THREADS="${THREADS:-4}"
REPLICAS="${REPLICAS:-3}"
WORKER_QUEUE="${WORKER_QUEUE:-0}"
HC_INTERVAL="${HC_INTERVAL:-1s}"
CONNECTIONS="${CONNECTIONS:-512}"
SAMPLE_MS="${SAMPLE_MS:-10}"
BACKEND="${BACKEND:-usher-worker}"
RPY="python3 $BENCH_DIR/replicas.py"

# Command prefixes (not a shell function: a function run with `&` would be a
# subshell whose pid is not the process's, and stopping it would orphan the process).
PIN_PROXY=(taskset -c "$PROXY_CPU")
PIN_LOAD=(taskset -c "$LOAD_CPU")
command -v taskset >/dev/null 2>&1 || { log "no taskset: nothing is pinned"; PIN_PROXY=(); PIN_LOAD=(); }

build
raise_nofile
[[ -x "$BIN/usher" && -x "$BIN/usher-load" ]] || { log "missing $BIN/usher or $BIN/usher-load"; exit 1; }

CAPACITY="$(python3 -c "print($WORKERS * $THREADS / ($SLEEP_MS / 1000))")"
TOTAL_RATE="$(python3 -c "print(round($LOAD * $CAPACITY, 3))")"
log "capacity: $WORKERS workers x $THREADS threads / ${SLEEP_MS} ms = $CAPACITY req/s; load $LOAD -> $TOTAL_RATE req/s"

# ---- workers
BPORTS=()
start_worker() {  # PORT
  local port="$1"
  if [[ "$BACKEND" == "waitress" ]]; then
    command -v waitress-serve >/dev/null || { log "no waitress-serve"; exit 1; }
    # The app module's WSGI app in the load-reporting middleware (`application` is
    # already wrapped; a bare `app` gets wrapped here). Its /healthz needs a free
    # waitress thread, so with all threads busy a sample waits.
    cat >"$WORK/replicas_wsgi.py" <<EOF
import usher_wsgi, usher_wsgi_app
_app = getattr(usher_wsgi_app, "application", None) or usher_wsgi_app.app
app = _app if isinstance(_app, usher_wsgi.UsherLoad) else usher_wsgi.UsherLoad(_app, threads=$THREADS)
EOF
    start_bg "worker-$port" env PYTHONPATH="$WORK:$REPO/worker/python:$REPO/tests/python" \
      waitress-serve --threads="$THREADS" --listen="127.0.0.1:$port" --backlog=2048 \
      --connection-limit=4096 replicas_wsgi:app
  else
    [[ -x "$BIN/usher-worker" ]] || { log "missing $BIN/usher-worker"; exit 1; }
    start_bg "worker-$port" "$BIN/usher-worker" --listen "127.0.0.1:$port" \
      --threads "$THREADS" --queue "$WORKER_QUEUE" --grace 1s
  fi
  wait_http "http://127.0.0.1:$port/healthz" 15 || {
    cat "$WORK/worker-$port.log" >&2; log "worker on $port did not start"; exit 1; }
}
for _ in $(seq "$WORKERS"); do
  p="$(free_port)"; start_worker "$p"; BPORTS+=("$p")
done
log "workers: $BACKEND x $WORKERS on ports ${BPORTS[*]} (threads $THREADS$([[ $BACKEND == usher-worker ]] && echo ", --queue $WORKER_QUEUE"))"

worker_503s() {  # the sum of the 503s all workers have sent (empty if unknown)
  local b v sum=0
  [[ "$BACKEND" == "waitress" ]] && { echo ""; return; }  # no /metrics; it queues, never refuses
  for b in "${BPORTS[@]}"; do
    v="$($RPY metric-sum "http://127.0.0.1:$b/metrics" usher_worker_requests_total code=503)"
    [[ -n "$v" ]] || { echo ""; return; }
    sum=$((sum + v))
  done
  echo "$sum"
}

# ---- one Usher
write_replica_cfg() {  # FILE PORT ADMIN REPLICAS
  local file="$1" port="$2" admin="$3" n="$4" b
  {
    cat <<EOF
listeners:
  - { name: public, address: "127.0.0.1:$port" }
admin: { address: "127.0.0.1:$admin" }
routes:
  - { host: "*", path_prefix: /, upstream: app }
upstreams:
  app:
    backends:
EOF
    for b in "${BPORTS[@]}"; do echo "      - { address: \"127.0.0.1:$b\", max_in_flight: auto }"; done
    cat <<EOF
    balance: least_outstanding
    proxy_replicas: $n
    health_check: { path: /healthz, interval: $HC_INTERVAL }
    queue: { max_depth: 1024, timeout: 5s }
    timeouts: { connect: 2s, response: 60s }
access_log: { format: off }
EOF
  } >"$file"
}

RESULTS="$WORK/replicas.jsonl"
: >"$RESULTS"

run_case() {  # CASE ROUND
  local case="$1" round="$2" n split
  case "$case" in
    uneven) n="$REPLICAS"; split="$SPLIT" ;;
    equal)  n="$REPLICAS"; split="$(python3 -c "print(','.join(['1'] * $n))")" ;;
    single) n=1; split="1" ;;
    *) log "unknown case $case"; exit 2 ;;
  esac
  local shares
  shares="$(python3 -c "
w=[float(x) for x in '$split'.split(',')]
assert len(w)==$n, 'SPLIT needs $n weights'
print(' '.join(str(x/sum(w)) for x in w))")"
  local ports=() admins=() upids=() k=0 share
  for share in $shares; do
    local port admin cfg
    port="$(free_port)"; admin="$(free_port)"; cfg="$WORK/usher-$case-$k.yaml"
    write_replica_cfg "$cfg" "$port" "$admin" "$n"
    export USHER_REPLICA_ID="usher-$k"
    start_bg "usher-$case-$round-$k" "${PIN_PROXY[@]}" "$BIN/usher" -c "$cfg"
    upids+=("$LAST_PID"); ports+=("$port"); admins+=("$admin")
    k=$((k + 1))
  done
  unset USHER_REPLICA_ID
  for k in "${!ports[@]}"; do
    wait_http "http://127.0.0.1:${admins[$k]}/readyz" 10 && wait_http "http://127.0.0.1:${ports[$k]}/sleep?ms=0" 10 || {
      tail -5 "$WORK/usher-$case-$round-$k.log" >&2; log "usher-$k did not become ready"; exit 1; }
  done
  # Before the window: the workers' 503 counters are read after the warm-up, by the sampler.
  local urls=() b
  for b in "${BPORTS[@]}"; do urls+=("http://127.0.0.1:$b/healthz"); done
  (
    sleep "$WARMUP"
    worker_503s >"$WORK/w503-before"
    $RPY sample "$WORK/sample-$case-$round.json" "$SECS" "$SAMPLE_MS" "${urls[@]}"
    worker_503s >"$WORK/w503-after"
  ) &
  local sampler=$!
  PIDS+=("$sampler")
  local lpids=() outs=() rates=() sharel=()
  k=0
  for share in $shares; do
    local rate out
    rate="$(python3 -c "print(round($TOTAL_RATE * $share, 3))")"
    out="$WORK/load-$case-$round-$k.json"
    "${PIN_LOAD[@]}" "$BIN/usher-load" --rate "$rate" --duration "${SECS}s" --warmup "${WARMUP}s" \
      --connections "$CONNECTIONS" --timeout 30s --seed "$((round * 10 + k + 1))" \
      --url "http://127.0.0.1:${ports[$k]}/sleep?ms=$SLEEP_MS" --json >"$out" 2>"$out.err" &
    lpids+=("$!"); PIDS+=("$!"); outs+=("$out"); rates+=("$rate"); sharel+=("$share")
    k=$((k + 1))
  done
  log "$case round $round: $n x usher, rates ${rates[*]} req/s, ${SECS}s (+${WARMUP}s warm-up)"
  local pid fail=0
  for pid in "${lpids[@]}"; do wait "$pid" || fail=1; done
  wait "$sampler" || true
  ((fail)) && { cat "$WORK"/load-"$case"-"$round"-*.json.err >&2; log "usher-load failed"; exit 1; }
  # Refusals Usher saw from the backends (all codes 503), per replica.
  local u503=()
  for k in "${!admins[@]}"; do
    u503+=("$($RPY metric-sum "http://127.0.0.1:${admins[$k]}/metrics" usher_backend_requests_total code=503)")
  done
  for pid in "${upids[@]}"; do stop_pid "$pid"; done
  python3 - "$case" "$round" "$WORK/sample-$case-$round.json" "$(cat "$WORK/w503-before")" \
      "$(cat "$WORK/w503-after")" "${#outs[@]}" "${outs[@]}" "${rates[@]}" "${sharel[@]}" "${u503[@]}" \
      >>"$RESULTS" <<'EOF'
import json, sys
case, rnd, sample, before, after, n = sys.argv[1:7]
n = int(n)
rest = sys.argv[7:]
outs, rates, shares, u503 = rest[:n], rest[n:2 * n], rest[2 * n:3 * n], rest[3 * n:4 * n]
s = json.load(open(sample))
maxq = max(v["max_queued"] for v in s.values())
w503 = int(after) - int(before) if before and after else None
for k in range(n):
    rep = json.load(open(outs[k]))
    ov = rep["overall"]
    print(json.dumps({
        "case": case, "round": int(rnd), "replica": f"usher-{k}", "share": float(shares[k]),
        "rate": float(rates[k]), "ok_s": ov["throughput_ok"], "p50": ov["latency_ms"]["p50"],
        "p99": ov["latency_ms"]["p99"], "sent": ov["sent"], "ok": ov["ok"],
        "failures": ov["non_2xx"] + ov["errors"]["total"], "s503": ov["s503"],
        "usher_backend_503": float(u503[k]) if u503[k] else None,
        "worker_503": w503, "max_queued": maxq, "workers": s,
        "backlog_max": rep.get("backlog_max"),
    }))
EOF
  sleep 1
}

for round in $(seq "$ROUNDS"); do
  for case in $CASES; do run_case "$case" "$round"; done
done

echo
echo "replicas: $WORKERS x $BACKEND --threads $THREADS$([[ $BACKEND == usher-worker ]] && echo " --queue $WORKER_QUEUE"), GET /sleep?ms=$SLEEP_MS"
echo "capacity $CAPACITY req/s, load $LOAD -> $TOTAL_RATE req/s in total; uneven split $SPLIT; ${SECS}s measured after ${WARMUP}s warm-up, $ROUNDS round(s)"
echo "Ushers pinned to cpu $PROXY_CPU, usher-loads to cpu $LOAD_CPU; binaries from $BIN"
echo
$RPY table "$RESULTS"
write_results_out replicas "workers=$WORKERS" "threads=$THREADS" "replicas=$REPLICAS" \
  "backend=$BACKEND" "worker_queue=$WORKER_QUEUE" "sleep_ms=$SLEEP_MS" "load=$LOAD" \
  "capacity=$CAPACITY" "total_rate=$TOTAL_RATE" "split=$SPLIT" "cases=$CASES" \
  "rounds=$ROUNDS" "secs=$SECS" "warmup_secs=$WARMUP" "hc_interval=$HC_INTERVAL" \
  "connections=$CONNECTIONS"
