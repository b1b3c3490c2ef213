#!/usr/bin/env bash
# Threaded backends under open-loop load (issue 13): 4 worker processes x 4 threads,
# a mix of 90% /sleep/short?ms=10 and 10% /sleep/long?ms=200 (two views, two paths,
# as in a real app), at 90%, 96% and 110% of the
# fleet's capacity, in ROUNDS interleaved rounds (round 1: every target at every
# load, then round 2, ...), medians per cell, through:
#   usher       Usher's defaults: least_outstanding, max_in_flight auto (the threads
#               the workers report; learned concurrency; prefetch auto), central
#               queue (5 s, shortest expected first by path, CoDel overload)
#   usher-fifo  the same, `discipline: fifo`
#   usher-cap   max_in_flight 4 set by hand (no learning, no prefetch); not by default
#   nginx       least_conn, keepalive upstream (no queue: the workers' own queues fill)
#   haproxy     balance leastconn, server maxconn 4, timeout queue 5s
# Backends (BACKENDS, one block each, rows side by side in one table):
#   waitress      real Python: waitress-serve --threads=4 running bench/worker_wsgi_app.py
#                 in usher_wsgi.UsherLoad (worker/python: reports threads/busy/queued,
#                 as README tells users to deploy; the same backends for every proxy)
#   usher-worker  usher-worker --threads 4 --queue 1024 (Rust, no GIL)
# Before round 1 each proxy is measured unloaded (the short view alone at 5% of
# capacity): its short p50 is the view's own time through that proxy, and the
# table's "queue p99" is the short p99 minus it. The load is usher-load (fixed rate,
# latency from the scheduled send time, up to CONNECTIONS in flight, opened on
# demand); each run reports the generator's own backlog, so it can be seen not to
# be the queue. At the end: per target the verdict against issue 13's targets.
#
# Pinning: each proxy on core PROXY_CPU (0), usher-load on LOAD_CPU (1); the workers
# are not pinned. Refuses to start while cargo/rustc/cc/ld runs (FORCE=1: anyway),
# and notes compilers seen during the run (sampled every 2 s).
#
# Env: SCENARIO (threaded | gil: runs bench/gil.sh), BENCH_SECS (30) measured
#      seconds per run, WARMUP_SECS (2), ROUNDS (3), LOADS ("0.90 0.96 1.10"), BACKENDS ("waitress"; "waitress usher-worker" for
#      both; BACKEND=X is the same as BACKENDS=X), WORKERS (4), THREADS (4), MIX,
#      TARGETS ("usher usher-fifo nginx haproxy", also usher-cap, usher-sef and
#      direct), USHER_CAP (auto; or a number) for the usher, usher-fifo and
#      usher-sef rows, CONNECTIONS (4096) usher-load's in-flight limit, WORKER_QUEUE (1024)
#      usher-worker --queue, UNLOADED_LOAD (0.05), UNLOADED_SECS (8), GAP_SECS (2)
#      pause after each run, PLAN_ONLY=1 (print the plan and its duration, run
#      nothing), FORCE=1, NO_BUILD=1, KEEP_WORK=1, RESULTS_OUT=FILE (a
#      metadata line, then one JSON line per run and round, and the unloaded runs;
#      `bench/benchlib.py threaded-table FILE` prints the tables again, bench/plot.py
#      draws the medians).
set -euo pipefail
# SCENARIO=gil: the CPU-bound/GIL scenario, bench/gil.sh (its own env, see there).
[[ "${SCENARIO:-threaded}" == gil ]] && exec "$(dirname "$0")/gil.sh"
[[ "${SCENARIO:-threaded}" == threaded ]] || { echo "unknown SCENARIO ${SCENARIO} (threaded | gil)" >&2; exit 2; }
# shellcheck source=bench/lib.sh
source "$(dirname "$0")/lib.sh"

SECS="${BENCH_SECS:-30}"
WARMUP="${WARMUP_SECS:-2}"
ROUNDS="${ROUNDS:-3}"
LOADS="${LOADS:-0.90 0.96 1.10}"
WORKERS="${WORKERS:-4}"
THREADS="${THREADS:-4}"
MIX="${MIX:-90:/sleep/short?ms=10,10:/sleep/long?ms=200}"
TARGETS="${TARGETS:-usher usher-fifo nginx haproxy}"
CONNECTIONS="${CONNECTIONS:-4096}"
WORKER_QUEUE="${WORKER_QUEUE:-1024}"
USHER_CAP="${USHER_CAP:-auto}"
UNLOADED_LOAD="${UNLOADED_LOAD:-0.05}"
UNLOADED_SECS="${UNLOADED_SECS:-8}"
GAP_SECS="${GAP_SECS:-2}"
BACKENDS="${BACKENDS:-${BACKEND:-waitress}}"
[[ "$BACKENDS" == auto ]] && BACKENDS=usher-worker   # the old BACKEND=auto
SHORT_PATH="$(python3 -c 'import sys; print(sys.argv[1].split(",")[0].split(":", 1)[1])' "$MIX")"

# ---- a quiet machine
quiet_machine_tools
check_backends $BACKENDS

read -r CAPACITY MEAN_MS < <($PY capacity "$((WORKERS * THREADS))" "$MIX")
UNLOADED_RATE="$(python3 -c "print(round($UNLOADED_LOAD * $CAPACITY, 1))")"
NB=0; for _ in $BACKENDS; do NB=$((NB + 1)); done
NT=0; for _ in $TARGETS; do NT=$((NT + 1)); done
NL=0; for _ in $LOADS; do NL=$((NL + 1)); done
NRUNS=$((NB * ROUNDS * NT * NL))
# Per run: warm-up + measured + the drain of the backlog (~3 s past capacity with
# nginx/HAProxy, ~0.5 s otherwise) + the gap; per proxy start ~1 s; per backend the
# unloaded runs and ~3 s to start and stop the workers.
EST="$(python3 -c "
runs = $NRUNS; over = $NB * $ROUNDS * $NT * sum(1 for l in '$LOADS'.split() if float(l) > 1)
print(round(runs * ($WARMUP + $SECS + $GAP_SECS + 0.6) + over * 2.5
      + $NB * $ROUNDS * $NT * 1.0 + $NB * ($NT * (1 + $UNLOADED_SECS + $GAP_SECS + 0.6) + 3)))")"
log "capacity: $WORKERS workers x $THREADS threads / mean service ${MEAN_MS} ms = $CAPACITY req/s"
log "plan: backends [$BACKENDS] x $ROUNDS rounds x targets [$TARGETS] x loads [$LOADS] = $NRUNS runs of ${WARMUP}+${SECS} s"
log "expected duration: ~$((EST / 60)) min $((EST % 60)) s (BENCH_SECS trades precision for time)"
log "pinning: proxy on cpu $PROXY_CPU, usher-load on cpu $LOAD_CPU, workers unpinned"
[[ -n "${PLAN_ONLY:-}" ]] && exit 0
if [[ " $BACKENDS " == *" waitress "* ]]; then
  python3 -c 'import sys; sys.path.insert(0, sys.argv[1]); import usher_wsgi' "$REPO/worker/python" || {
    log "usher_wsgi does not import from $REPO/worker/python"; exit 1; }
  cat >"$WORK/threaded_wsgi.py" <<EOF
import usher_wsgi, worker_wsgi_app
app = usher_wsgi.UsherLoad(worker_wsgi_app.app, threads=$THREADS)
EOF
fi

quiet_or_refuse "before the build"
ensure_tools
build
quiet_or_refuse "after the build"
raise_nofile
[[ -x "$BIN/usher-load" ]] || { log "missing $BIN/usher-load"; exit 1; }
if [[ " $BACKENDS " == *" usher-worker "* && ! -x "$BIN/usher-worker" ]]; then
  log "missing $BIN/usher-worker"; exit 1
fi
NOFILE="$(ulimit -n)"
if [[ "$NOFILE" != unlimited ]] && ((NOFILE < CONNECTIONS + 256)); then
  log "open-file limit $NOFILE is below CONNECTIONS=$CONNECTIONS + 256: lower CONNECTIONS or raise the hard limit"
  exit 1
fi
log "open-file limit $NOFILE (usher-load may hold up to $CONNECTIONS connections)"


RESULTS="$WORK/threaded.jsonl"
: >"$RESULTS"

# Compilers during the measurement, every 2 s (stopped with the rest on exit).
( while sleep 2; do b="$(pgrep -l -x "$BUSY_RE" 2>/dev/null | awk '{print $2}' | sort -u | xargs)"
    [[ -n "$b" ]] && printf '%s %s\n' "$(date +%T)" "$b"; done ) >"$WORK/busy.log" 2>/dev/null &
PIDS+=("$!")

T0=$SECONDS
RUN_NO=0

# ---- backends
BPORTS=()
BACKEND_PIDS=()
start_workers() {  # KIND
  local kind="$1" p i
  BPORTS=(); BACKEND_PIDS=()
  for i in $(seq "$WORKERS"); do
    p="$(free_port)"
    if [[ "$kind" == waitress ]]; then
      # --asyncore-use-poll: nginx opens one connection per request in flight, which
      # past capacity can pass select()'s 1024 descriptors.
      # Wrapped in usher_wsgi.UsherLoad (worker/python), as README tells Usher's
      # users to deploy: it reports threads/busy/queued on every response. Every
      # proxy gets the same backends.
      start_bg "waitress-$i-$p" env PYTHONPATH="$WORK:$BENCH_DIR:$REPO/worker/python" waitress-serve \
        --threads="$THREADS" --listen="127.0.0.1:$p" --backlog=2048 \
        --connection-limit=4096 --asyncore-use-poll --channel-timeout=120 threaded_wsgi:app
    else
      start_bg "usher-worker-$i-$p" "$BIN/usher-worker" --listen "127.0.0.1:$p" \
        --threads "$THREADS" --queue "$WORKER_QUEUE" --grace 1s
    fi
    BPORTS+=("$p"); BACKEND_PIDS+=("$LAST_PID")
  done
  for p in "${BPORTS[@]}"; do
    wait_http "http://127.0.0.1:$p/healthz" 15 || {
      tail -5 "$WORK"/*-"$p".log >&2 || true; log "$kind on $p did not start"; exit 1; }
  done
  log "backends: $kind x $WORKERS on ports ${BPORTS[*]} ($THREADS threads each)"
}
stop_workers() {
  local pid
  for pid in "${BACKEND_PIDS[@]}"; do stop_pid "$pid"; done
  BACKEND_PIDS=()
}

# start_usher_row BACKEND ROW CAP QUEUE_EXTRA: an Usher on PORT with max_in_flight CAP
# and QUEUE_EXTRA appended to its queue settings.
start_usher_row() {
  local admin cfg
  admin="$(free_port)"; cfg="$WORK/$1-$2.yaml"
  USHER_QUEUE_EXTRA="$4" write_usher "$cfg" "$PORT" "$admin" "$3" "${BPORTS[@]}"
  start_usher "$cfg" "$PORT" "$admin"
}

# ---- proxies: start_target BACKEND TARGET sets PORT and PROXY_PID (empty for
# direct), or returns 1 with UNAVAILABLE_WHY.
start_target() {
  local backend="$1" target="$2" cfg dir
  PORT="$(free_port)"; PROXY_PID=""
  case "$target" in
    usher) start_usher_row "$backend" usher "$USHER_CAP" "" || return 1 ;;
    # What the default queue's shortest-expected-first is worth: plain FIFO.
    usher-fifo) start_usher_row "$backend" usher-fifo "$USHER_CAP" ", discipline: fifo" || return 1 ;;
    # The thread cap set by hand (max_in_flight = THREADS): no learning, and
    # prefetch `auto` sends no extras (the cap is not known to be the threads).
    usher-cap) start_usher_row "$backend" usher-cap "$THREADS" "" || return 1 ;;
    # The older mix (both views on /sleep, told apart by the query only).
    usher-sef)
      start_usher_row "$backend" usher-sef "$USHER_CAP" \
        ", discipline: shortest_first, classify: path_and_query" || return 1 ;;
    nginx)
      dir="$WORK/$backend-nginx"
      write_nginx "$dir" "$PORT" least_conn "${BPORTS[@]}"
      start_nginx "$dir" "$PORT" || { stop_pid "$LAST_PID"; return 1; } ;;
    haproxy)
      cfg="$WORK/$backend-haproxy.cfg"
      write_haproxy "$cfg" "$PORT" leastconn "$THREADS" "${BPORTS[@]}"
      start_haproxy "$cfg" "$PORT" || { stop_pid "$LAST_PID"; return 1; } ;;
    direct)
      # Not a balancer: every request to the first worker. Only for sanity checks.
      PORT="${BPORTS[0]}"; return 0 ;;
    *) log "unknown target $target"; exit 2 ;;
  esac
  PROXY_PID="$LAST_PID"
}

# load_run OUT RATE MIX SECS WARMUP PORT : one usher-load run, JSON report in OUT.
load_run() {
  local out="$1" rate="$2" mix="$3" secs="$4" warm="$5" port="$6"
  taskset -c "$LOAD_CPU" "$BIN/usher-load" --rate "$rate" --duration "${secs}s" \
    --warmup "${warm}s" --connections "$CONNECTIONS" --timeout 30s \
    --target "127.0.0.1:$port" --mix "$mix" --json >"$out"
}

# record KEY=VALUE... REPORT_FILE|- : one JSON line into $RESULTS (numbers as
# numbers) and, with a report, the run's headline and the generator's own numbers on
# stderr. One Python start per run: on a busy machine each costs ~0.3 s.
record() {
  PYTHONPATH="$BENCH_DIR" python3 - "$RESULTS" "$@" <<'EOF'
import json, sys
from benchlib import row_of_pairs
out, *pairs, path = sys.argv[1:]
row = row_of_pairs(pairs)
if path != "-":
    r = row["report"] = json.load(open(path))
    o = r["overall"]
    print("==    ok/s %.1f, short p99 %s ms, fail %d; generator: backlog max %d, lag max %.1f ms,"
          " %d connections opened" % (o["throughput_ok"], r["classes"][0]["latency_ms"]["p99"],
                                      o["non_2xx"] + o["errors"]["total"], r["backlog_max"],
                                      r["scheduler_lag_max_ms"], r["connections_opened"]),
          file=sys.stderr)
with open(out, "a") as f:
    f.write(json.dumps(row) + "\n")
EOF
}

unavailable_rows() {  # BACKEND TARGET ROUND WHY
  local l
  for l in $LOADS; do
    record backend="$1" target="$2" load="$l" round="$3" unavailable=true why="${4:0:120}" -
  done
}

# ---- the measurement
declare -A RATE
for l in $LOADS; do RATE[$l]="$(python3 -c "print(round($l * $CAPACITY, 1))")"; done
for backend in $BACKENDS; do
  start_workers "$backend"
  targets=($TARGETS)
  for round in $(seq "$ROUNDS"); do
    # Rotate the order each round, so no target always runs first or last.
    order=("${targets[@]:$(( (round - 1) % NT ))}" "${targets[@]:0:$(( (round - 1) % NT ))}")
    for target in "${order[@]}"; do
      if ! start_target "$backend" "$target"; then
        log "$backend/$target: not available: $UNAVAILABLE_WHY"
        unavailable_rows "$backend" "$target" "$round" "$UNAVAILABLE_WHY"
        continue
      fi
      if ((round == 1)); then
        out="$WORK/$backend-$target-unloaded.json"
        log "$backend/$target: unloaded, $SHORT_PATH alone at $UNLOADED_RATE req/s for ${UNLOADED_SECS}s"
        load_run "$out" "$UNLOADED_RATE" "1:$SHORT_PATH" "$UNLOADED_SECS" 1 "$PORT"
        record backend="$backend" target="$target" unloaded=true rate="$UNLOADED_RATE" "$out"
        sleep "$GAP_SECS"
      fi
      for l in $LOADS; do
        RUN_NO=$((RUN_NO + 1))
        rate="${RATE[$l]}"
        out="$WORK/$backend-$target-$l-$round.json"
        log "[$RUN_NO/$NRUNS, $((SECONDS - T0)) s] $backend/$target round $round: load $l -> $rate req/s for ${SECS}s (+${WARMUP}s warm-up)"
        load_run "$out" "$rate" "$MIX" "$SECS" "$WARMUP" "$PORT"
        record backend="$backend" target="$target" load="$l" rate="$rate" round="$round" "$out"
        # usher-load returns once every request is answered; let the rest settle.
        sleep "$GAP_SECS"
      done
      [[ -n "$PROXY_PID" ]] && stop_pid "$PROXY_PID"
    done
  done
  stop_workers
done
ELAPSED=$((SECONDS - T0))
BUSY_SAMPLES=0
[[ -s "$WORK/busy.log" ]] && BUSY_SAMPLES="$(wc -l <"$WORK/busy.log")"

echo
echo "threaded: backends [$BACKENDS], $WORKERS x --threads $THREADS each, mix $MIX; usher max_in_flight $USHER_CAP"
echo "capacity $CAPACITY req/s (mean service $MEAN_MS ms); $ROUNDS rounds of ${SECS}s measured per run after ${WARMUP}s warm-up; up to $CONNECTIONS connections"
echo "proxies pinned to cpu $PROXY_CPU (taskset), usher-load to cpu $LOAD_CPU; took $((ELAPSED / 60)) min $((ELAPSED % 60)) s"
if ((BUSY_SAMPLES)); then
  echo "WARNING: compilers ran during $((BUSY_SAMPLES * 2)) s of the measurement: the numbers are distorted (e.g. $(head -1 "$WORK/busy.log"))"
fi
echo
$PY threaded-table "$RESULTS"
write_results_out threaded "workers=$WORKERS" "threads=$THREADS" "mix=$MIX" \
  "secs=$SECS" "warmup_secs=$WARMUP" "rounds=$ROUNDS" "loads=$LOADS" "targets=$TARGETS" \
  "capacity=$CAPACITY" "mean_service_ms=$MEAN_MS" "backend=${BACKENDS// /,}" \
  "backends=$BACKENDS" "usher_cap=$USHER_CAP" "connections=$CONNECTIONS" \
  "worker_queue=$WORKER_QUEUE" "unloaded_rate=$UNLOADED_RATE" "unloaded_secs=$UNLOADED_SECS" \
  "elapsed_s=$ELAPSED" "compiler_seen_s=$((BUSY_SAMPLES * 2))"
