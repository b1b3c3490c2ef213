# shellcheck shell=bash disable=SC2034  # variables here are used by the scripts that source this
# Shared helpers for bench/*.sh. Source it; it expects `set -euo pipefail`.
# Everything here listens on and sends to 127.0.0.1 only, and every process a
# script starts through start_bg is stopped on exit.

BENCH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$BENCH_DIR/.." && pwd)"
BIN="${BIN:-$REPO/target/release}"
PY="python3 $BENCH_DIR/benchlib.py"
CLK_TCK="$(getconf CLK_TCK)"
NCPU="$(nproc)"
# The proxy under test runs on PROXY_CPU, the load generator on LOAD_CPU.
PROXY_CPU="${PROXY_CPU:-0}"
LOAD_CPU="${LOAD_CPU:-$((NCPU > 1 ? 1 : 0))}"

# For the metadata line of RESULTS_OUT files (benchlib.py meta): when the run
# started, the load average then, and the commit that was built (bench/charts.sh
# passes the one it recorded before its build).
BENCH_STARTED="$(date -u +%Y-%m-%dT%H:%M:%SZ)"
LOADAVG_START="$(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || true)"
BENCH_COMMIT="${BENCH_COMMIT:-$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)}"
if [[ -z "${BENCH_DIRTY:-}" ]]; then
  BENCH_DIRTY=false
  [[ -n "$(git -C "$REPO" status --porcelain --untracked-files=no 2>/dev/null)" ]] && BENCH_DIRTY=true
fi

WORK="$(mktemp -d "${TMPDIR:-/tmp}/usher-bench.XXXXXX")"
PIDS=()

log() { printf '== %s\n' "$*" >&2; }

cleanup() {
  local pid
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for _ in $(seq 30); do
    local alive=0
    for pid in "${PIDS[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    ((alive)) || break
    sleep 0.1
  done
  for pid in "${PIDS[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
  if [[ -n "${KEEP_WORK:-}" ]]; then
    log "work dir kept: $WORK"
  else
    rm -rf "$WORK"
  fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# start_bg NAME CMD... : runs CMD in the background, logs to $WORK/NAME.log, and
# sets LAST_PID. The process is stopped on exit.
start_bg() {
  local name="$1"; shift
  "$@" >"$WORK/$name.log" 2>&1 &
  LAST_PID=$!
  PIDS+=("$LAST_PID")
}

# stop_pid PID : TERM, then KILL after 3 s.
stop_pid() {
  local pid="$1"
  kill -TERM "$pid" 2>/dev/null || return 0
  for _ in $(seq 30); do
    kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null || true; return 0; }
    sleep 0.1
  done
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}

free_port() { $PY free-port 1; }
wait_http() { $PY wait-http "$1" "${2:-10}"; }
cpu_ticks() { $PY cpu-ticks "$1"; }

# write_results_out BENCH KEY=VALUE... : if RESULTS_OUT is set, writes it: one
# metadata line ({"meta": {...}}: the setup, dates, commit, load average) and then
# the JSON lines of $RESULTS. The tables skip the metadata line.
write_results_out() {
  [[ -n "${RESULTS_OUT:-}" ]] || return 0
  local bench="$1"; shift
  { $PY meta "bench=$bench" "started=$BENCH_STARTED" "loadavg_start=$LOADAVG_START" \
      "commit=$BENCH_COMMIT" "dirty=$BENCH_DIRTY" "bin=$BIN" \
      "nproc=$NCPU" "proxy_cpu=$PROXY_CPU" "load_cpu=$LOAD_CPU" "$@"
    cat "$RESULTS"; } >"$RESULTS_OUT"
}

# Installs nginx-light, haproxy and wrk if missing (apt-get update once).
ensure_tools() {
  local missing=() cmd pkg
  for pair in nginx:nginx-light haproxy:haproxy wrk:wrk taskset:util-linux; do
    cmd="${pair%%:*}"; pkg="${pair#*:}"
    command -v "$cmd" >/dev/null 2>&1 || [[ -x "/usr/sbin/$cmd" ]] || missing+=("$pkg")
  done
  if ((${#missing[@]})); then
    log "installing ${missing[*]}"
    local sudo=""; [[ "$(id -u)" -ne 0 ]] && sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
      "${missing[@]}" >/dev/null
    # Debian starts the packaged services; the benchmarks run their own instances.
    for svc in nginx haproxy; do
      (command -v service >/dev/null && $sudo service "$svc" stop >/dev/null 2>&1) || true
    done
  fi
  export PATH="$PATH:/usr/sbin:/sbin"
}

# Builds the release binaries. The whole workspace first; if that fails (e.g. the
# proxy does not compile right now), each binary on its own, so that the other
# rows still run.
build() {
  [[ -n "${NO_BUILD:-}" ]] && return 0
  log "cargo build --release --workspace --bins"
  if ! (cd "$REPO" && cargo build --release --workspace --bins) >"$WORK/build.log" 2>&1; then
    log "workspace build failed (see below); building binaries one by one"
    tail -5 "$WORK/build.log" >&2 || true
    (cd "$REPO" && cargo build --release -p usher-e2e --bin usher-load) >>"$WORK/build.log" 2>&1 \
      || { tail -20 "$WORK/build.log" >&2; log "usher-load does not build"; exit 1; }
    (cd "$REPO" && cargo build --release -p usher-worker --bins) >>"$WORK/build.log" 2>&1 \
      || log "usher-worker does not build"
    (cd "$REPO" && cargo build --release -p usher --bins) >>"$WORK/build.log" 2>&1 \
      || log "usher does not build"
  fi
}

# Raises the open-file limit as far as allowed: open-loop runs hold many sockets.
raise_nofile() { ulimit -n "$(ulimit -Hn)" 2>/dev/null || ulimit -n 65536 2>/dev/null || true; }

# start_backend PORT THREADS : an usher-worker, or waitress with the test app if the
# worker binary is missing. Sets LAST_PID. BACKEND=waitress forces waitress.
# BACKEND_CPU=N pins it (taskset), e.g. with the load generator, so that the proxy
# has its core to itself (unpinned by default).
start_backend() {
  local port="$1" threads="$2" pin=()
  [[ -n "${BACKEND_CPU:-}" ]] && pin=(taskset -c "$BACKEND_CPU")
  if [[ "${BACKEND:-auto}" != "waitress" && -x "$BIN/usher-worker" ]]; then
    BACKEND_KIND="usher-worker"
    start_bg "backend-$port" "${pin[@]}" "$BIN/usher-worker" --listen "127.0.0.1:$port" \
      --threads "$threads" --queue "${WORKER_QUEUE:-1024}" --grace 1s
  else
    BACKEND_KIND="waitress"
    start_bg "backend-$port" "${pin[@]}" env PYTHONPATH="$REPO/tests/python" waitress-serve \
      --threads="$threads" --listen="127.0.0.1:$port" --backlog=2048 \
      --connection-limit=4096 wsgi_app:app
  fi
  wait_http "http://127.0.0.1:$port/healthz" 15 || {
    cat "$WORK/backend-$port.log" >&2; log "backend on $port did not start"; exit 1; }
}

# NGINX_AS_USHER (for NGINX_LOCATION_EXTRA; the rows nginx-headers of overhead.sh
# and instructions.sh): nginx doing the header work Usher does by default, so
# that the two are compared at equal function. Usher passes the client's Host,
# sets X-Forwarded-For/-Proto/-Host, a request id (to the backend and in the
# response), X-Request-Start (ms since the epoch), and takes the worker's
# X-Usher-Load report off the response. (Its X-Usher-Queue-Ms has no nginx
# counterpart.) Set NGINX_AS_USHER to other directives to measure them instead.
[[ -n "${NGINX_AS_USHER:-}" ]] || NGINX_AS_USHER='      proxy_set_header Host $http_host;
      proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
      proxy_set_header X-Forwarded-Proto $scheme;
      proxy_set_header X-Forwarded-Host $http_host;
      proxy_set_header X-Request-Id $request_id;
      proxy_set_header X-Request-Start $msec;
      proxy_hide_header X-Usher-Load;
      add_header X-Request-Id $request_id always;'

# write_nginx_row ROW DIR PORT BACKEND_PORT... : the rows `nginx` (nginx's defaults)
# and `nginx-headers` (NGINX_AS_USHER) of overhead.sh and instructions.sh.
write_nginx_row() {
  local row="$1" extra=""; shift
  [[ "$row" == nginx-headers ]] && extra="$NGINX_AS_USHER"
  NGINX_LOCATION_EXTRA="$extra" write_nginx "$1" "$2" roundrobin "${@:3}"
}

# write_nginx DIR PORT BALANCE(roundrobin|least_conn) BACKEND_PORT...
# NGINX_LOCATION_EXTRA: more directives for the proxied location (as lines).
write_nginx() {
  local dir="$1" port="$2" balance="$3"; shift 3
  mkdir -p "$dir/logs"
  {
    [[ "$(id -u)" -eq 0 ]] && echo "user root;"
    cat <<EOF
worker_processes 1;
worker_rlimit_nofile 65536;
error_log $dir/logs/error.log warn;
pid $dir/nginx.pid;
events { worker_connections 16384; }
http {
  access_log off;
  keepalive_requests 1000000;
  keepalive_timeout 75s;
  client_body_temp_path $dir/client_body;
  proxy_temp_path $dir/proxy_temp;
  fastcgi_temp_path $dir/fastcgi_temp;
  uwsgi_temp_path $dir/uwsgi_temp;
  scgi_temp_path $dir/scgi_temp;
  upstream app {
EOF
    [[ "$balance" == "least_conn" ]] && echo "    least_conn;"
    local b
    for b in "$@"; do echo "    server 127.0.0.1:$b max_fails=0;"; done
    cat <<EOF
    keepalive 64;
    keepalive_requests 1000000;
  }
  server {
    listen 127.0.0.1:$port backlog=4096;
    location / {
      proxy_pass http://app;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_connect_timeout 2s;
      proxy_read_timeout 60s;
      proxy_next_upstream off;
${NGINX_LOCATION_EXTRA:-}
    }
  }
}
EOF
  } >"$dir/nginx.conf"
}

# write_haproxy FILE PORT BALANCE(roundrobin|leastconn) MAXCONN(0=none) BACKEND_PORT...
write_haproxy() {
  local file="$1" port="$2" balance="$3" maxconn="$4"; shift 4
  {
    cat <<EOF
global
  nbthread 1
  maxconn 8000
defaults
  mode http
  maxconn 8000
  timeout connect 2s
  timeout client 60s
  timeout server 60s
  timeout queue 5s
  http-reuse always
frontend fe
  bind 127.0.0.1:$port
  default_backend be
backend be
  balance $balance
EOF
    local b i=0
    for b in "$@"; do
      i=$((i + 1))
      if ((maxconn > 0)); then
        echo "  server w$i 127.0.0.1:$b maxconn $maxconn"
      else
        echo "  server w$i 127.0.0.1:$b"
      fi
    done
  } >"$file"
}

# write_usher FILE PORT ADMIN_PORT MAX_IN_FLIGHT BACKEND_PORT...
write_usher() {
  local file="$1" port="$2" admin="$3" cap="$4"; shift 4
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
    local b
    for b in "$@"; do echo "      - { address: \"127.0.0.1:$b\", max_in_flight: $cap }"; done
    cat <<EOF
    balance: least_outstanding
    queue: { max_depth: 1024, timeout: 5s${USHER_QUEUE_EXTRA:-} }
    timeouts: { connect: 2s, response: 60s }
access_log: { format: off }
EOF
  } >"$file"
}

# start_proxy KIND NAME PORT ... : starts nginx/haproxy/usher pinned to PROXY_CPU and
# waits until it answers. Sets LAST_PID and returns 1 (with UNAVAILABLE_WHY) if it
# cannot be started.
start_nginx() {
  local dir="$1" port="$2"
  start_bg "nginx-$port" taskset -c "$PROXY_CPU" nginx -p "$dir" -c "$dir/nginx.conf" -g 'daemon off;'
  wait_http "http://127.0.0.1:$port/healthz" 10 || {
    UNAVAILABLE_WHY="nginx did not start: $(tail -3 "$WORK/nginx-$port.log" "$dir/logs/error.log" 2>/dev/null | tr '\n' ' ')"
    return 1; }
}

start_haproxy() {
  local file="$1" port="$2"
  start_bg "haproxy-$port" taskset -c "$PROXY_CPU" haproxy -f "$file" -db
  wait_http "http://127.0.0.1:$port/healthz" 10 || {
    UNAVAILABLE_WHY="haproxy did not start: $(tail -3 "$WORK/haproxy-$port.log" | tr '\n' ' ')"
    return 1; }
}

start_usher() {
  local file="$1" port="$2" admin="$3"
  if [[ ! -x "$BIN/usher" ]]; then
    UNAVAILABLE_WHY="no binary $BIN/usher"
    return 1
  fi
  start_bg "usher-$port" taskset -c "$PROXY_CPU" "$BIN/usher" -c "$file"
  if ! wait_http "http://127.0.0.1:$admin/readyz" 10 \
      || ! wait_http "http://127.0.0.1:$port/healthz" 5; then
    UNAVAILABLE_WHY="usher did not become ready: $(tail -3 "$WORK/usher-$port.log" | tr '\n' ' ')"
    stop_pid "$LAST_PID"
    return 1
  fi
}

# Refusing to measure while a compiler runs (threaded.sh, gil.sh): `busy` lists
# them, `quiet_or_refuse WHEN` exits 3 unless FORCE=1. Call quiet_machine_tools
# first (it defines them).
quiet_machine_tools() {
  BUSY_RE='cargo|rustc|cc1|cc1plus|ld|clippy-driver|rust-analyzer'
  busy() { pgrep -l -x "$BUSY_RE" 2>/dev/null || true; }
  quiet_or_refuse() {  # WHEN
    local b; b="$(busy)"
    [[ -z "$b" ]] && return 0
    if [[ -n "${FORCE:-}" ]]; then
      log "WARNING: compilers are running $1 (FORCE=1: measuring anyway; the numbers are distorted):"
      echo "$b" >&2; return 0
    fi
    log "refusing to measure: compilers are running $1 (the machine must be quiet):"
    echo "$b" >&2
    log "wait for them to finish, or FORCE=1 to measure anyway"
    exit 3
  }
}

# Exits unless every backend kind named is known and installed.
check_backends() {  # KIND...
  local b
  for b in "$@"; do
    case "$b" in
      waitress) command -v waitress-serve >/dev/null 2>&1 || {
        log "no waitress-serve: python3 -m pip install waitress (or BACKENDS=usher-worker)"; exit 1; } ;;
      usher-worker) ;;
      *) log "unknown backend $b (waitress | usher-worker)"; exit 2 ;;
    esac
  done
}
