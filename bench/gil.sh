#!/usr/bin/env bash
# CPU-bound views under a GIL (issue 13): does Usher's `max_in_flight: auto` find the
# useful concurrency of a worker whose threads share one interpreter lock?
#
# One worker process with 4 threads, in front of it one Usher (a fresh one per run):
#   cpu  GET /cpu?ms=5 at 150 req/s (75% of the one CPU the GIL allows):
#        max_in_flight auto (capacity left to Usher), 1 (the hand-set optimum: one
#        view at a time, the rest queued in Usher), 4 (= threads: the views
#        time-slice inside the worker)
#   io   GET /sleep?ms=20 at 150 req/s (75% of 4 threads): auto, and 4 (= threads,
#        the optimum for I/O-bound views; a learned cap of 1 would overload it)
# Backends (BACKENDS, both by default):
#   waitress      real CPython: waitress-serve --threads=4 running
#                 bench/worker_wsgi_app.py (/cpu burns thread CPU time in a Python
#                 loop, /sleep sleeps), wrapped in worker/python's usher_wsgi.UsherLoad
#                 when it is there, so that it reports threads=4 like usher-worker
#   usher-worker  usher-worker --threads 4 --gil (the modelled GIL, worker/src/gil.rs)
# Interleaved rounds (round 1: every backend, workload and config; then round 2 ...),
# medians per cell, and the verdicts: cpu auto p99 <= 1.3 x max_in_flight 1, io auto
# p99 <= 1.3 x max_in_flight = threads. After each run Usher's capacity gauges
# (usher_backend_capacity, usher_backend_learned_capacity if it has it) are read.
#
# Pinning: Usher on PROXY_CPU (0), usher-load on LOAD_CPU (1), the worker unpinned.
# Refuses to start while cargo/rustc/cc/ld runs (FORCE=1: anyway).
#
# Env: BENCH_SECS (6) measured seconds per run, WARMUP_SECS (2), ROUNDS (3),
#      BACKENDS ("waitress usher-worker"), THREADS (4), CPU_MS (5), CPU_RATE (150),
#      IO_MS (20), IO_RATE (150), CPU_CAPS ("auto 1 THREADS"), IO_CAPS ("auto
#      THREADS"), WORKLOADS ("cpu io"), CONNECTIONS (1024), GAP_SECS (0.5), FORCE=1,
#      PLAN_ONLY=1 (print the plan and its duration, run nothing), NO_BUILD=1,
#      KEEP_WORK=1, RESULTS_OUT=FILE (a metadata line, then one JSON line
#      per run; `bench/benchlib.py gil-table FILE` prints the table again).
set -euo pipefail
# shellcheck source=bench/lib.sh
source "$(dirname "$0")/lib.sh"

SECS="${BENCH_SECS:-6}"
WARMUP="${WARMUP_SECS:-2}"
ROUNDS="${ROUNDS:-3}"
BACKENDS="${BACKENDS:-${BACKEND:-waitress usher-worker}}"
THREADS="${THREADS:-4}"
CPU_MS="${CPU_MS:-5}"
CPU_RATE="${CPU_RATE:-150}"
IO_MS="${IO_MS:-20}"
IO_RATE="${IO_RATE:-150}"
CPU_CAPS="${CPU_CAPS:-auto 1 $THREADS}"
IO_CAPS="${IO_CAPS:-auto $THREADS}"
WORKLOADS="${WORKLOADS:-cpu io}"
CONNECTIONS="${CONNECTIONS:-1024}"
GAP_SECS="${GAP_SECS:-0.5}"

quiet_machine_tools
check_backends $BACKENDS
for w in $WORKLOADS; do
  case "$w" in cpu | io) ;; *) log "unknown workload $w (cpu | io)"; exit 2 ;; esac
done

caps_of() { if [[ "$1" == cpu ]]; then echo "$CPU_CAPS"; else echo "$IO_CAPS"; fi; }
NRUNS=0
for _ in $BACKENDS; do for w in $WORKLOADS; do for _ in $(caps_of "$w"); do
  NRUNS=$((NRUNS + ROUNDS)); done; done; done
# Per run: warm-up + measured + ~1.3 s to start Usher, drain and read its metrics + the gap.
EST="$(python3 -c "print(round($NRUNS * ($WARMUP + $SECS + 1.3 + $GAP_SECS) + 5))")"
log "plan: backends [$BACKENDS] x workloads [$WORKLOADS] x max_in_flight (cpu: $CPU_CAPS; io: $IO_CAPS) x $ROUNDS rounds = $NRUNS runs of ${WARMUP}+${SECS} s"
log "expected duration: ~$((EST / 60)) min $((EST % 60)) s (BENCH_SECS trades precision for time)"
log "pinning: usher on cpu $PROXY_CPU, usher-load on cpu $LOAD_CPU, the worker unpinned"
[[ -n "${PLAN_ONLY:-}" ]] && exit 0

quiet_or_refuse "before the build"
build
quiet_or_refuse "after the build"
raise_nofile
for bin in usher usher-load; do
  [[ -x "$BIN/$bin" ]] || { log "missing $BIN/$bin"; exit 1; }
done
if [[ " $BACKENDS " == *" usher-worker "* && ! -x "$BIN/usher-worker" ]]; then
  log "missing $BIN/usher-worker"; exit 1
fi


RESULTS="$WORK/gil.jsonl"
: >"$RESULTS"
( while sleep 2; do b="$(pgrep -l -x "$BUSY_RE" 2>/dev/null | awk '{print $2}' | sort -u | xargs)"
    [[ -n "$b" ]] && printf '%s %s\n' "$(date +%T)" "$b"; done ) >"$WORK/busy.log" 2>/dev/null &
PIDS+=("$!")
T0=$SECONDS

# ---- the workers: one process per backend, all started up front (idle between runs)
declare -A WPORT
WAITRESS_APP="worker_wsgi_app:app"
WAITRESS_REPORTS=no
if python3 -c "import sys; sys.path.insert(0, '$REPO/worker/python'); import usher_wsgi" 2>/dev/null; then
  cat >"$WORK/gil_wsgi.py" <<EOF
import usher_wsgi, worker_wsgi_app
app = usher_wsgi.UsherLoad(worker_wsgi_app.app, threads=$THREADS)
EOF
  WAITRESS_APP="gil_wsgi:app"; WAITRESS_REPORTS=yes
fi
for backend in $BACKENDS; do
  p="$(free_port)"
  if [[ "$backend" == waitress ]]; then
    start_bg "waitress-$p" env PYTHONPATH="$WORK:$BENCH_DIR:$REPO/worker/python" waitress-serve \
      --threads="$THREADS" --listen="127.0.0.1:$p" --backlog=2048 --connection-limit=4096 \
      --asyncore-use-poll "$WAITRESS_APP"
  else
    start_bg "usher-worker-$p" "$BIN/usher-worker" --listen "127.0.0.1:$p" \
      --threads "$THREADS" --queue 1024 --gil --grace 1s
  fi
  wait_http "http://127.0.0.1:$p/healthz" 15 || {
    tail -5 "$WORK"/*-"$p".log >&2 || true; log "$backend on $p did not start"; exit 1; }
  WPORT[$backend]="$p"
  log "backend $backend on port $p ($THREADS threads$([[ $backend == waitress ]] && echo ", reports its load: $WAITRESS_REPORTS"))"
done

# record ADMIN_PORT|- KEY=VALUE... REPORT_FILE|- : one JSON line into $RESULTS, with
# Usher's capacity gauges (usher_backend_capacity, and usher_backend_learned_capacity
# if the binary has it) read from its admin /metrics, and the run's headline on
# stderr. One Python start per run: on a busy machine each costs ~0.3 s.
record() {
  PYTHONPATH="$BENCH_DIR" python3 - "$RESULTS" "$@" <<'EOF'
import json, sys, urllib.request
from benchlib import row_of_pairs
out, admin, *pairs, path = sys.argv[1:]
row = row_of_pairs(pairs)
want = {"usher_backend_capacity": "capacity_seen", "usher_backend_learned_capacity": "learned_seen"}
if admin != "-":
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=2).read().decode()
    except OSError:
        text = ""
    for line in text.splitlines():
        name = line.split("{")[0].split(" ")[0]
        if name in want:
            row[want[name]] = float(line.rsplit(" ", 1)[1])
if path != "-":
    r = row["report"] = json.load(open(path))
    o = r["overall"]
    l = o["latency_ms"]
    print("==    ok/s %.1f p50 %s p99 %s ms, fail %d; generator backlog max %d, lag max %.1f ms; cap %s, learned %s"
          % (o["throughput_ok"], l["p50"], l["p99"], o["non_2xx"] + o["errors"]["total"],
             r["backlog_max"], r["scheduler_lag_max_ms"], row.get("capacity_seen", "-"),
             row.get("learned_seen", "-")), file=sys.stderr)
with open(out, "a") as f:
    f.write(json.dumps(row) + "\n")
EOF
}

RUN_NO=0
EXITING=()
for round in $(seq "$ROUNDS"); do
  for backend in $BACKENDS; do
    for w in $WORKLOADS; do
      if [[ "$w" == cpu ]]; then path="/cpu?ms=$CPU_MS"; rate="$CPU_RATE"
      else path="/sleep?ms=$IO_MS"; rate="$IO_RATE"; fi
      for cap in $(caps_of "$w"); do
        RUN_NO=$((RUN_NO + 1))
        config="max_in_flight $cap"; [[ "$cap" == auto ]] && config=auto
        read -r port admin < <($PY free-port 2 | xargs); cfg="$WORK/usher-$backend-$w-$cap.yaml"
        write_usher "$cfg" "$port" "$admin" "$cap" "${WPORT[$backend]}"
        if ! start_usher "$cfg" "$port" "$admin"; then
          log "usher not available: $UNAVAILABLE_WHY"
          record - backend="$backend" workload="$w" config="$config" round="$round" \
            unavailable=true why="${UNAVAILABLE_WHY:0:120}" -
          continue
        fi
        upid="$LAST_PID"
        out="$WORK/$backend-$w-$cap-$round.json"
        log "[$RUN_NO/$NRUNS, $((SECONDS - T0)) s] round $round: $backend $w ($path at $rate req/s), usher $config"
        taskset -c "$LOAD_CPU" "$BIN/usher-load" --rate "$rate" --duration "${SECS}s" \
          --warmup "${WARMUP}s" --connections "$CONNECTIONS" --timeout 30s \
          --target "127.0.0.1:$port" --mix "1:$path" --json >"$out"
        record "$admin" backend="$backend" workload="$w" config="$config" path="$path" \
          rate="$rate" round="$round" threads="$THREADS" "$out"
        # Usher takes ~2 s to exit after SIGTERM; it is idle meanwhile, so don't wait
        # for it here (reaped after the round).
        kill -TERM "$upid" 2>/dev/null || true
        EXITING+=("$upid")
        sleep "$GAP_SECS"
      done
    done
  done
  for pid in "${EXITING[@]}"; do stop_pid "$pid"; done
  EXITING=()
done
ELAPSED=$((SECONDS - T0))
BUSY_SAMPLES=0
[[ -s "$WORK/busy.log" ]] && BUSY_SAMPLES="$(wc -l <"$WORK/busy.log")"

echo
echo "gil: 1 worker x $THREADS threads per backend [$BACKENDS]$([[ " $BACKENDS " == *" waitress "* ]] && echo " (waitress reports its load: $WAITRESS_REPORTS)"), one Usher per run"
echo "cpu: /cpu?ms=$CPU_MS at $CPU_RATE req/s; io: /sleep?ms=$IO_MS at $IO_RATE req/s; $ROUNDS rounds of ${SECS}s measured after ${WARMUP}s warm-up"
echo "usher pinned to cpu $PROXY_CPU, usher-load to cpu $LOAD_CPU; took $((ELAPSED / 60)) min $((ELAPSED % 60)) s"
if ((BUSY_SAMPLES)); then
  echo "WARNING: compilers ran during $((BUSY_SAMPLES * 2)) s of the measurement: the numbers are distorted (e.g. $(head -1 "$WORK/busy.log"))"
fi
echo
$PY gil-table "$RESULTS"
write_results_out gil "threads=$THREADS" "backends=$BACKENDS" "workloads=$WORKLOADS" \
  "cpu_ms=$CPU_MS" "cpu_rate=$CPU_RATE" "io_ms=$IO_MS" "io_rate=$IO_RATE" \
  "cpu_caps=$CPU_CAPS" "io_caps=$IO_CAPS" "secs=$SECS" "warmup_secs=$WARMUP" \
  "rounds=$ROUNDS" "connections=$CONNECTIONS" "waitress_reports_load=$WAITRESS_REPORTS" \
  "elapsed_s=$ELAPSED" "compiler_seen_s=$((BUSY_SAMPLES * 2))"
