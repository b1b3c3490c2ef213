#!/usr/bin/env bash
# usher-worker vs waitress: requests/s for GET /sleep?ms=0 at 1, 2, 4, 8 threads.
#
# A benchmark, not a test: it builds usher-worker in release mode, then for each
# thread count runs usher-worker and waitress (bench/worker_wsgi_app.py) one after
# the other on a loopback port and drives each with wrk for BENCH_SECS seconds.
# Installs wrk (apt) and waitress (pip) if missing. Prints one table row per
# thread count. The load generator shares the machine with the server, so read
# the figures as a comparison, not as absolute capacity.
#
# Env: BENCH_SECS (5), CONNS (16 wrk connections), THREADS_LIST ("1 2 4 8"),
#      PATH_Q (/sleep?ms=0), NO_BUILD=1 to skip the cargo build.
set -euo pipefail

BENCH_DIR="$(cd "$(dirname "$0")" && pwd)"
REPO="$(cd "$BENCH_DIR/.." && pwd)"
SECS="${BENCH_SECS:-5}"
CONNS="${CONNS:-16}"
THREADS_LIST="${THREADS_LIST:-1 2 4 8}"
PATH_Q="${PATH_Q:-/sleep?ms=0}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/usher-worker-bench.XXXXXX")"
SERVER_PID=""

log() { printf '== %s\n' "$*" >&2; }

cleanup() {
  [[ -n "$SERVER_PID" ]] && stop_server
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

ensure_tools() {
  if ! command -v wrk >/dev/null 2>&1; then
    log "installing wrk"
    local sudo=""; [[ "$(id -u)" -ne 0 ]] && sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends wrk >/dev/null
  fi
  if ! python3 -c "import waitress" 2>/dev/null; then
    log "installing waitress"
    python3 -m pip install -q waitress 2>/dev/null \
      || python3 -m pip install -q --break-system-packages waitress
  fi
}

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# wait_http URL: waits up to 15 s for URL to answer.
wait_http() {
  python3 - "$1" <<'PY'
import sys, time, urllib.request
deadline = time.time() + 15
while time.time() < deadline:
    try:
        urllib.request.urlopen(sys.argv[1], timeout=1).read()
        sys.exit(0)
    except Exception:
        time.sleep(0.05)
sys.exit(f"{sys.argv[1]} did not answer within 15 s")
PY
}

# start_server NAME CMD...: starts CMD in the background, logging to $WORK/NAME.log.
start_server() {
  local name="$1"; shift
  "$@" >"$WORK/$name.log" 2>&1 &
  SERVER_PID=$!
}

stop_server() {
  kill -TERM "$SERVER_PID" 2>/dev/null || true
  for _ in $(seq 50); do
    kill -0 "$SERVER_PID" 2>/dev/null || break
    sleep 0.1
  done
  kill -KILL "$SERVER_PID" 2>/dev/null || true
  wait "$SERVER_PID" 2>/dev/null || true
  SERVER_PID=""
}

# measure URL: runs wrk and prints "REQ_PER_SEC ERRORS".
measure() {
  local out rps errors
  out="$(wrk -t1 -c"$CONNS" -d"${SECS}s" --timeout 5s "$1")"
  rps="$(awk '/^Requests\/sec:/ {printf "%.0f", $2}' <<<"$out")"
  errors="$(awk '/Non-2xx or 3xx responses:/ {n += $NF} /Socket errors:/ {gsub(",", ""); n += $4 + $6 + $8 + $10} END {print n + 0}' <<<"$out")"
  echo "${rps:-0} $errors"
}

bench_usher() {  # THREADS
  local port; port="$(free_port)"
  # A deep queue: the point is throughput, not 503s when all CONNS are in.
  start_server "usher-$1" "$REPO/target/release/usher-worker" --listen "127.0.0.1:$port" \
    --threads "$1" --queue 1024 --grace 1s
  wait_http "http://127.0.0.1:$port/healthz"
  measure "http://127.0.0.1:$port$PATH_Q"
  stop_server
}

bench_waitress() {  # THREADS
  local port; port="$(free_port)"
  start_server "waitress-$1" env PYTHONPATH="$BENCH_DIR" python3 -m waitress \
    --listen="127.0.0.1:$port" --threads="$1" worker_wsgi_app:app
  wait_http "http://127.0.0.1:$port/sleep?ms=0"
  measure "http://127.0.0.1:$port$PATH_Q"
  stop_server
}

ensure_tools
if [[ -z "${NO_BUILD:-}" ]]; then
  log "cargo build --release -p usher-worker"
  (cd "$REPO" && cargo build --release -q -p usher-worker --bin usher-worker)
fi
log "GET $PATH_Q, wrk -t1 -c$CONNS, ${SECS}s per run, $(nproc) CPUs, loopback"

printf '%-8s %18s %18s %8s\n' threads "usher-worker req/s" "waitress req/s" ratio
for t in $THREADS_LIST; do
  # Redirects, not $(...): the servers must start in this shell so cleanup sees them.
  bench_usher "$t" >"$WORK/usher.out"
  bench_waitress "$t" >"$WORK/waitress.out"
  read -r u_rps u_err <"$WORK/usher.out"
  read -r w_rps w_err <"$WORK/waitress.out"
  ratio="$(awk -v u="$u_rps" -v w="$w_rps" 'BEGIN {if (w > 0) printf "%.1fx", u / w; else print "-"}')"
  note=""
  ((u_err + w_err > 0)) && note="  (errors: usher-worker $u_err, waitress $w_err)"
  printf '%-8s %18s %18s %8s%s\n' "$t" "$u_rps" "$w_rps" "$ratio" "$note"
done
