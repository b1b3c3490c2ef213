#!/usr/bin/env bash
# User-space instructions per request, counted by valgrind's callgrind, for
# nginx, Usher and (with BASELINE_BIN) another Usher build, one after another
# behind the same backend and the same closed-loop load.
#
# Why: CPU time per request on a shared 2-core VM moves by 10-15% from round to
# round, more than most single changes to the request path are worth. An
# instruction count is the same to ~0.2% from run to run, whatever else the
# machine does, so it can rank changes that timing cannot. It is not time:
# it ignores the kernel (about half of a proxy's CPU here, and the same for
# nginx and Usher), cache misses and the price of each instruction. Time is
# still measured by overhead.sh; this says where user time goes and whether a
# change removed work.
#
# How: each proxy runs under `valgrind --tool=callgrind` (pinned to PROXY_CPU),
# takes WARMUP requests, has its counters zeroed (`callgrind_control -z`),
# serves REQUESTS more from `usher-load --closed CONNS`, and is dumped
# (`callgrind_control -d`). The dump holds only that window; its total over
# REQUESTS is the figure. KEEP_WORK=1 keeps the dumps (`callgrind_annotate
# FILE` for where the instructions go).
#
# Each row also gets its locked instructions per request (`lock`-prefixed
# read-modify-writes and `xchg` with memory: atomics), counted from the same
# dump by bench/locked_ops.py. Each costs far more than its one instruction
# (~5.5 ns uncontended on the bench VM), so a row can be close in
# instructions and still far in time.
#
# Env: REQUESTS (4000), WARMUP (500), CONNS (8), BACKEND_THREADS (4),
#      PATH_Q (/sleep?ms=0), ONLY (subset of: nginx nginx-headers usher base; default
#      "nginx usher", plus base when BASELINE_BIN is set), BASELINE_BIN=DIR,
#      NO_BUILD=1, KEEP_WORK=1, LOCKS_TOP=N (print each row's N busiest
#      locked-instruction sites, from bench/locked_ops.py). Needs valgrind
#      (apt-get install valgrind) and objdump (binutils).
set -euo pipefail
# shellcheck source=bench/lib.sh
source "$(dirname "$0")/lib.sh"

N="${REQUESTS:-4000}"
WARMUP="${WARMUP:-500}"
CONNS="${CONNS:-8}"
THREADS="${BACKEND_THREADS:-4}"
PATH_Q="${PATH_Q:-/sleep?ms=0}"
ROWS="${ONLY:-nginx usher${BASELINE_BIN:+ base}}"

command -v valgrind >/dev/null && command -v callgrind_control >/dev/null || {
  log "valgrind is needed: apt-get install valgrind"; exit 2; }
ensure_tools
build

BPORT="$(free_port)"
start_backend "$BPORT" "$THREADS"
log "backend: $BACKEND_KIND --threads $THREADS on 127.0.0.1:$BPORT"
log "load: usher-load --closed $CONNS, $WARMUP requests of warm-up, then $N counted, GET $PATH_Q"

VG=(valgrind --tool=callgrind --dump-instr=yes --collect-jumps=no)

# count ROW PORT PID : the counted window's instructions per request.
count() {
  local row="$1" port="$2" pid="$3" url dump total
  url="http://127.0.0.1:$port$PATH_Q"
  "$BIN/usher-load" --closed "$CONNS" --duration 120s --max-requests "$WARMUP" --url "$url" >/dev/null 2>&1
  callgrind_control -z "$pid" >/dev/null 2>&1
  "$BIN/usher-load" --closed "$CONNS" --duration 600s --max-requests "$N" --url "$url" \
    >"$WORK/load-$row.txt" 2>&1
  callgrind_control -d "$pid" >/dev/null 2>&1
  for _ in $(seq 50); do
    dump="$(ls -t "$WORK/cg.$row".* 2>/dev/null | grep -E '\.[0-9]+\.[0-9]+$' | head -1 || true)"
    [[ -n "$dump" ]] && break
    sleep 0.1
  done
  total="$(awk '/^(summary|totals):/ {print $2; exit}' "$dump")"
  locked="$(python3 "$BENCH_DIR/locked_ops.py" "$dump" "$N" "${LOCKS_TOP:-0}")"
  printf '%-13s %10d instructions, %6s locked ops per request (%s requests)\n' \
    "$row" $((total / N)) "$locked" "$N"
}

for row in $ROWS; do
  port="$(free_port)"
  case "$row" in
    nginx | nginx-headers)
      dir="$WORK/$row"
      write_nginx_row "$row" "$dir" "$port" "$BPORT"
      start_bg "nginx" taskset -c "$PROXY_CPU" "${VG[@]}" --callgrind-out-file="$WORK/cg.$row.%p" \
        nginx -p "$dir" -c "$dir/nginx.conf" -g 'daemon off; master_process off;'
      ;;
    usher | base)
      bin="$BIN"
      [[ "$row" == base ]] && bin="${BASELINE_BIN:?BASELINE_BIN is not set}"
      admin="$(free_port)"
      write_usher "$WORK/$row.yaml" "$port" "$admin" 64 "$BPORT"
      start_bg "$row" taskset -c "$PROXY_CPU" "${VG[@]}" --callgrind-out-file="$WORK/cg.$row.%p" \
        "$bin/usher" -c "$WORK/$row.yaml"
      ;;
    *) log "unknown row $row"; exit 2 ;;
  esac
  pid="$LAST_PID"
  if ! wait_http "http://127.0.0.1:$port/healthz" 60; then
    log "$row did not start under valgrind: $(tail -3 "$WORK/$row.log" | tr '\n' ' ')"
    stop_pid "$pid"
    continue
  fi
  count "$row" "$port" "$pid"
  stop_pid "$pid"
done
