#!/usr/bin/env bash
# HTTP/2 over TLS: h2load against Usher and nginx side by side, with the same
# certificate (ECDSA P-256, made here with openssl) and the same backend (one
# usher-worker). Bounded: REQUESTS requests over CLIENTS connections with
# STREAMS concurrent streams each. Prints req/s and the per-request times.
#
# Pinning as in overhead.sh: each proxy on PROXY_CPU (Usher's whole runtime,
# nginx with worker_processes 1), h2load on LOAD_CPU, the backend unpinned.
# Usher caps the worker at its thread count and queues the rest; nginx
# passes everything through and the worker queues it. Same 4 threads either
# way, so the figures compare the proxies' TLS + h2 cost, not scheduling.
#
# Env: REQUESTS (20000), CLIENTS (10), STREAMS (10), BACKEND_THREADS (4),
#      PATH_Q (/sleep?ms=0), ONLY ("usher usher-uncapped nginx"), NO_BUILD=1,
#      KEEP_WORK=1. `usher-uncapped` sets max_in_flight 1024, so the worker
#      queues as behind nginx: the pure proxy cost.
set -euo pipefail
# shellcheck source=bench/lib.sh
source "$(dirname "$0")/lib.sh"

REQUESTS="${REQUESTS:-20000}"
CLIENTS="${CLIENTS:-10}"
STREAMS="${STREAMS:-10}"
THREADS="${BACKEND_THREADS:-4}"
PATH_Q="${PATH_Q:-/sleep?ms=0}"
ROWS="${ONLY:-usher usher-uncapped nginx}"

ensure_tools
if ! command -v h2load >/dev/null 2>&1; then
  log "installing nghttp2-client (h2load)"
  sudo=""; [[ "$(id -u)" -ne 0 ]] && sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends nghttp2-client >/dev/null
fi
build
raise_nofile

CERT="$WORK/cert.pem"
KEY="$WORK/key.pem"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
  -subj "/CN=bench.test" -addext "subjectAltName=DNS:bench.test,IP:127.0.0.1" \
  -keyout "$KEY" -out "$CERT" 2>/dev/null

BPORT="$(free_port)"
start_backend "$BPORT" "$THREADS"
log "backend: $BACKEND_KIND --threads $THREADS on 127.0.0.1:$BPORT"
log "load: h2load -n $REQUESTS -c $CLIENTS -m $STREAMS https://127.0.0.1:PORT$PATH_Q (TLS, ALPN h2)"

wait_https() {  # PORT
  for _ in $(seq 100); do
    curl -skf --http2 -o /dev/null "https://127.0.0.1:$1/healthz" && return 0
    sleep 0.1
  done
  return 1
}

RESULTS="$WORK/h2load.txt"
: >"$RESULTS"

# run NAME PORT
run() {
  local name="$1" port="$2"
  local out="$WORK/h2load-$name.txt"
  # Warm-up: connections, TLS session caches, the worker's threads.
  taskset -c "$LOAD_CPU" h2load -n 2000 -c "$CLIENTS" -m "$STREAMS" \
    "https://127.0.0.1:$port$PATH_Q" >/dev/null 2>&1 || true
  taskset -c "$LOAD_CPU" h2load -n "$REQUESTS" -c "$CLIENTS" -m "$STREAMS" \
    "https://127.0.0.1:$port$PATH_Q" >"$out" 2>&1 || true
  local rps proto ok mean sd max
  rps="$(awk '/^finished in/ {print $4}' "$out" | tr -d ',')"
  ok="$(awk '/^requests:/ {print $8}' "$out")"
  proto="$(awk '/Application protocol:/ {print $3}' "$out")"
  read -r mean sd max < <(awk '/^time for request:/ {print $6, $7, $5}' "$out")
  printf '%-15s %10s %8s %9s %10s %10s %10s\n' "$name" "${rps:-?}" "${proto:-?}" \
    "${ok:-?}" "${mean:-?}" "${sd:-?}" "${max:-?}" >>"$RESULTS"
}

for row in $ROWS; do
  case "$row" in
    usher|usher-uncapped)
      cap=""; [[ "$row" == usher-uncapped ]] && cap=", max_in_flight: 1024"
      port="$(free_port)"; admin="$(free_port)"; file="$WORK/$row.yaml"
      cat >"$file" <<EOF
listeners:
  - name: public
    address: "127.0.0.1:$port"
    tls: { certificates: [{ cert: "$CERT", key: "$KEY" }] }
admin: { address: "127.0.0.1:$admin" }
routes:
  - { upstream: app }
upstreams:
  app:
    backends: [{ address: "127.0.0.1:$BPORT"$cap }]
    queue: { max_depth: 1024, timeout: 5s }
access_log: { format: "off" }
EOF
      start_bg "usher-$port" taskset -c "$PROXY_CPU" "$BIN/usher" -c "$file"
      pid=$LAST_PID
      if wait_https "$port"; then run "$row" "$port"; else
        log "usher did not start: $(tail -3 "$WORK/usher-$port.log" | tr '\n' ' ')"; fi
      stop_pid "$pid" ;;
    nginx)
      port="$(free_port)"; dir="$WORK/nginx"
      write_nginx "$dir" "$port" roundrobin "$BPORT"
      # Turn the plain listener into TLS + h2 with the same certificate.
      sed -i "s|listen 127.0.0.1:$port backlog=4096;|listen 127.0.0.1:$port ssl http2 backlog=4096;\n    ssl_certificate $CERT;\n    ssl_certificate_key $KEY;\n    ssl_protocols TLSv1.2 TLSv1.3;\n    http2_max_concurrent_streams 250;|" \
        "$dir/nginx.conf"
      start_bg "nginx-$port" taskset -c "$PROXY_CPU" nginx -p "$dir" -c "$dir/nginx.conf" -g 'daemon off;'
      pid=$LAST_PID
      if wait_https "$port"; then run nginx "$port"; else
        log "nginx did not start: $(tail -3 "$dir/logs/error.log" 2>/dev/null | tr '\n' ' ')"; fi
      stop_pid "$pid" ;;
    *) log "unknown row $row" ;;
  esac
done

printf '%-15s %10s %8s %9s %10s %10s %10s\n' proxy "req/s" proto "2xx" "mean" "sd" "max"
cat "$RESULTS"
