#!/usr/bin/env bash
# Proxy overhead: one fast backend, and in front of it, one after another in the
# same run: nothing (direct), nginx, HAProxy and Usher. Same closed-loop load for
# each; prints req/s, p50/p99 latency and the proxy's CPU time per request.
#
# Pinning: every proxy runs on core PROXY_CPU (default 0) with `taskset` -- Usher's
# multi-threaded tokio runtime included, so it gets one core like nginx
# (worker_processes 1) and HAProxy (nbthread 1). The load generator runs on
# LOAD_CPU (default 1). The backend is not pinned.
#
# Env: BENCH_SECS (10), CONNS (32), LOADGEN (wrk | usher-load; wrk if installed),
#      BACKEND (auto | waitress), BACKEND_THREADS (4), PATH_Q (/sleep?ms=0),
#      ONLY (space-separated subset of: direct nginx nginx-headers haproxy haproxy-maxconn
#      usher usher-uncapped base base-uncapped), NO_BUILD=1, KEEP_WORK=1,
#      RATE (open loop: usher-load at RATE req/s with up to CONNS connections,
#      instead of a closed loop; CPU per request is then compared at the same
#      request rate, so batching under saturation does not favour a row),
#      RESULTS_OUT=FILE (a metadata line, then the JSON lines of the table;
#      bench/plot.py draws them), BASELINE_BIN=DIR (a directory holding another
#      build's `usher`, e.g. main's, copied aside: the rows `base` and
#      `base-uncapped` run it like `usher` and `usher-uncapped`, so a change and
#      its baseline are compared within one run).
set -euo pipefail
# shellcheck source=bench/lib.sh
source "$(dirname "$0")/lib.sh"

SECS="${BENCH_SECS:-10}"
CONNS="${CONNS:-32}"
THREADS="${BACKEND_THREADS:-4}"
PATH_Q="${PATH_Q:-/sleep?ms=0}"
ROWS="${ONLY:-direct nginx haproxy haproxy-maxconn usher usher-uncapped}"

ensure_tools
build
raise_nofile
LOADGEN="${LOADGEN:-$(command -v wrk >/dev/null && echo wrk || echo usher-load)}"
RATE="${RATE:-}"
[[ -n "$RATE" ]] && LOADGEN=usher-load
# usher-load's loop: closed with CONNS loops, or open at RATE req/s.
if [[ -n "$RATE" ]]; then LOOP=(--rate "$RATE" --connections "$CONNS"); else LOOP=(--closed "$CONNS"); fi

BPORT="$(free_port)"
start_backend "$BPORT" "$THREADS"
BPID="$LAST_PID"
log "backend: $BACKEND_KIND --threads $THREADS on 127.0.0.1:$BPORT (pid $BPID)"
log "load: $LOADGEN${RATE:+ open loop at $RATE req/s}, $CONNS connections, ${SECS}s per row, GET $PATH_Q"
log "pinning: proxy on cpu $PROXY_CPU, load generator on cpu $LOAD_CPU, backend unpinned"

RESULTS="$WORK/overhead.jsonl"
: >"$RESULTS"

unavailable() {  # NAME WHY
  log "$1: not available ($2)"
  python3 -c 'import json,sys; print(json.dumps({"target": sys.argv[1], "unavailable": True, "why": sys.argv[2][:120]}))' \
    "$1" "$2" >>"$RESULTS"
}

# measure NAME PORT PROXY_PID(or empty)
measure() {
  local name="$1" port="$2" ppid="${3:-}" url out p0 p1 b0 b1 res
  url="http://127.0.0.1:$port$PATH_Q"
  out="$WORK/load-$name.txt"
  # Warm up connections and caches.
  if [[ "$LOADGEN" == "wrk" ]]; then
    taskset -c "$LOAD_CPU" wrk -t 1 -c "$CONNS" -d 1s "$url" >/dev/null 2>&1 || true
  else
    taskset -c "$LOAD_CPU" "$BIN/usher-load" "${LOOP[@]}" --duration 1s --url "$url" >/dev/null 2>&1 || true
  fi
  [[ -n "$ppid" ]] && p0="$(cpu_ticks "$ppid")"
  b0="$(cpu_ticks "$BPID")"
  if [[ "$LOADGEN" == "wrk" ]]; then
    taskset -c "$LOAD_CPU" wrk -t 1 -c "$CONNS" -d "${SECS}s" --latency "$url" >"$out" 2>&1
    res="$($PY wrk-json "$out")"
  else
    taskset -c "$LOAD_CPU" "$BIN/usher-load" "${LOOP[@]}" --duration "${SECS}s" \
      --max-requests 50000000 --url "$url" --json >"$out"
    res="$(python3 -c '
import json,sys; r=json.load(open(sys.argv[1])); o=r["overall"]
print(json.dumps({"rps": o["throughput_ok"], "requests": o["sent"], "p50_ms": o["latency_ms"]["p50"],
  "p99_ms": o["latency_ms"]["p99"], "non_2xx": o["non_2xx"], "errors": o["errors"]["total"]}))' "$out")"
  fi
  b1="$(cpu_ticks "$BPID")"
  [[ -n "$ppid" ]] && p1="$(cpu_ticks "$ppid")"
  python3 - "$name" "$res" "${p0:-}" "${p1:-}" "$b0" "$b1" "$CLK_TCK" >>"$RESULTS" <<'EOF'
import json, sys
name, res, p0, p1, b0, b1, tck = sys.argv[1:]
r = json.loads(res)
n = r.get("requests") or 0
# Each tick reading is "UTIME STIME"; the per-request figures are in microseconds.
def per(a, b, part=None):
    if not n or a == "":
        return None
    d = [int(y) - int(x) for x, y in zip(a.split(), b.split())]
    return (sum(d) if part is None else d[part]) * 1e6 / int(tck) / n
r.update(target=name, proxy_us_per_req=per(p0, p1), proxy_user_us_per_req=per(p0, p1, 0),
         proxy_sys_us_per_req=per(p0, p1, 1), backend_us_per_req=per(b0, b1))
print(json.dumps(r))
EOF
  log "$name: $(tail -1 "$RESULTS")"
}

for row in $ROWS; do
  case "$row" in
    direct)
      measure direct "$BPORT" ;;
    nginx | nginx-headers)
      port="$(free_port)"; dir="$WORK/$row"
      write_nginx_row "$row" "$dir" "$port" "$BPORT"
      if start_nginx "$dir" "$port"; then pid=$LAST_PID; measure "$row" "$port" "$pid"; stop_pid "$pid"
      else unavailable "$row" "$UNAVAILABLE_WHY"; fi ;;
    haproxy | haproxy-maxconn)
      port="$(free_port)"; cfg="$WORK/$row.cfg"
      mc=0; [[ "$row" == haproxy-maxconn ]] && mc="$THREADS"
      write_haproxy "$cfg" "$port" roundrobin "$mc" "$BPORT"
      name="$row"; ((mc)) && name="haproxy maxconn=$mc"
      if start_haproxy "$cfg" "$port"; then pid=$LAST_PID; measure "$name" "$port" "$pid"; stop_pid "$pid"
      else unavailable "$name" "$UNAVAILABLE_WHY"; fi ;;
    usher | usher-uncapped | base | base-uncapped)
      port="$(free_port)"; admin="$(free_port)"; cfg="$WORK/$row.yaml"
      cap="$THREADS"; [[ "$row" == *-uncapped ]] && cap="$((CONNS * 2))"
      write_usher "$cfg" "$port" "$admin" "$cap" "$BPORT"
      bin="$BIN"; name="usher cap=$cap"
      if [[ "$row" == base* ]]; then bin="${BASELINE_BIN:?BASELINE_BIN is not set}"; name="base cap=$cap"; fi
      if BIN="$bin" start_usher "$cfg" "$port" "$admin"; then pid=$LAST_PID; measure "$name" "$port" "$pid"; stop_pid "$pid"
      else echo "usher: not available" >&2; unavailable "$name" "$UNAVAILABLE_WHY"; fi ;;
    *) log "unknown row $row"; exit 2 ;;
  esac
done

echo
echo "overhead: $LOADGEN ${RATE:+--rate $RATE }-c$CONNS ${SECS}s, GET $PATH_Q on one $BACKEND_KIND --threads $THREADS;"
echo "proxies pinned to cpu $PROXY_CPU (taskset; Usher's tokio runtime too), load generator to cpu $LOAD_CPU"
$PY overhead-table "$RESULTS"
echo "us/req = (utime+stime of the process tree, all threads) / requests, and its user and sys parts; CLK_TCK=$CLK_TCK"
write_results_out overhead "loadgen=$LOADGEN" "rate=${RATE:-closed}" "conns=$CONNS" "secs=$SECS" \
  "path=$PATH_Q" "backend=$BACKEND_KIND" "backend_threads=$THREADS" "rows=$ROWS"
