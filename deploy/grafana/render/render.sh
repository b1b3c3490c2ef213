#!/usr/bin/env bash
# Renders docs/img/dashboard.png: key panels of deploy/grafana/usher.json and
# usher-worker.json, with data from a live run (Grafana is not needed).
#
#   deploy/grafana/render/render.sh [OUT.png]
#
# Starts, all on 127.0.0.1: a release Usher in front of a fleet of
# 2 x usher-worker --threads 4 plus one static backend (flaky_backend.py),
# a Prometheus (Debian package `prometheus`) scraping Usher and the workers
# every second, then drives 60 s of load with usher-load:
#
#   0-15 s   120 req/s   everything healthy
#   15 s     the static backend breaks (503 on everything, health checks fail)
#   15-30 s  180 req/s   served by the fleet alone
#   30-45 s  400 req/s   above the fleet's capacity: the queue fills, 503s
#   45 s     the static backend is repaired
#   45-60 s  120 req/s   recovery
#
# (mix: 90% /sleep?ms=10, 10% /sleep?ms=200), then runs render.py, which
# queries the panels' own PromQL over the run (/api/v1/query_range) and plots
# them in Grafana's dark style. Everything started is stopped on exit.
# SAVE_DATA=file.json also keeps the queried series (render.py --load-data
# re-plots them). Needs: cargo, prometheus + promtool, python3 with matplotlib
# (python3 -m pip install matplotlib).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../../.." && pwd)"
out="${1:-$root/docs/img/dashboard.png}"
[[ "$out" = /* ]] || out="$PWD/$out"

for tool in cargo prometheus promtool python3 curl; do
  command -v "$tool" >/dev/null || { echo "render.sh: $tool is not on PATH" >&2; exit 1; }
done
python3 -c 'import matplotlib' 2>/dev/null || {
  echo "render.sh: matplotlib missing: python3 -m pip install matplotlib" >&2; exit 1; }

echo "== building release binaries"
(cd "$root" && cargo build --release --workspace --bins --quiet)
bin="$root/target/release"

work="$(mktemp -d "${TMPDIR:-/tmp}/usher-render.XXXXXX")"
pids=()
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  # Usher first (SIGTERM drains and stops its fleet), then the rest.
  for pid in ${usher_pid:-} "${pids[@]}"; do
    kill -TERM "$pid" 2>/dev/null || true
  done
  for pid in ${usher_pid:-} "${pids[@]}"; do
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  if [[ $rc -ne 0 ]]; then
    echo "render.sh: failed (exit $rc); logs:" >&2
    tail -n 20 "$work"/*.log >&2 2>/dev/null || true
  fi
  rm -rf "$work"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# wait_for SECONDS DESCRIPTION COMMAND...: polls COMMAND until it succeeds.
wait_for() {
  local secs=$1 what=$2; shift 2
  local deadline=$((SECONDS + secs))
  until "$@" >/dev/null 2>&1; do
    if ((SECONDS >= deadline)); then echo "render.sh: timed out waiting for $what" >&2; return 1; fi
    sleep 0.2
  done
}

echo "== starting the static backend"
python3 "$here/flaky_backend.py" --max-seconds 240 >"$work/flaky.port" 2>"$work/flaky.log" &
flaky_pid=$!
pids+=("$flaky_pid")
wait_for 10 "flaky_backend.py" test -s "$work/flaky.port"
static="127.0.0.1:$(head -n1 "$work/flaky.port")"

public="127.0.0.1:$(free_port)"
admin="127.0.0.1:$(free_port)"
cat >"$work/usher.yaml" <<YAML
listeners:
  - { name: public, address: "$public" }
admin: { address: "$admin" }
routes:
  - { host: "*", path_prefix: /, upstream: app }
upstreams:
  app:
    fleet:
      command: ["$bin/usher-worker", --threads, "4", --listen, "127.0.0.1:{port}"]
      processes: 2
      base_port: 0
    backends:
      - { address: "$static" }
    queue: { max_depth: 64, timeout: 1s }
    health_check: { path: /healthz, interval: 1s, timeout: 500ms, rise: 2, fall: 2 }
    retries: { attempts: 2 }
    timeouts: { connect: 500ms, response: 10s }
timeouts: { shutdown_grace: 2s }
access_log: { format: "off" }
YAML
"$bin/usher" check -c "$work/usher.yaml" >/dev/null

echo "== starting usher (public $public, admin $admin)"
"$bin/usher" -c "$work/usher.yaml" >"$work/usher.log" 2>&1 &
usher_pid=$!
wait_for 30 "usher /readyz" curl -sf "http://$admin/readyz"

# backends: "address state" per backend of upstream app, from /status.
backends() {
  curl -sf "http://$admin/status" | python3 -c '
import json, sys
for b in json.load(sys.stdin)["upstreams"]["app"]["backends"]:
    print(b["address"], b["state"])'
}
all_up() {
  [[ $(backends | grep -c ' up$') -eq 3 ]]
}
wait_for 30 "3 healthy backends" all_up
mapfile -t workers < <(backends | awk '{print $1}' | grep -vx "$static")
echo "   static backend $static, workers: ${workers[*]}"

prom="127.0.0.1:$(free_port)"
{
  echo "global: { scrape_interval: 1s, scrape_timeout: 1s, evaluation_interval: 1s }"
  echo "rule_files: [\"$root/deploy/prometheus/rules.yaml\"]"
  echo "scrape_configs:"
  echo "  - job_name: usher"
  echo "    static_configs: [{ targets: [\"$admin\"] }]"
  echo "  - job_name: usher-worker"
  echo "    static_configs: [{ targets: [$(printf '"%s",' "${workers[@]}" | sed 's/,$//')] }]"
} >"$work/prometheus.yml"
promtool check config "$work/prometheus.yml" >/dev/null

echo "== starting prometheus on $prom"
prometheus --config.file="$work/prometheus.yml" --web.listen-address="$prom" \
  --storage.tsdb.path="$work/tsdb" --storage.tsdb.retention.time=1h \
  --log.level=warn >"$work/prometheus.log" 2>&1 &
pids+=($!)
wait_for 30 "prometheus /-/ready" curl -sf "http://$prom/-/ready"
targets_up() {
  curl -sf "http://$prom/api/v1/targets?state=active" | python3 -c '
import json, sys
t = json.load(sys.stdin)["data"]["activeTargets"]
sys.exit(0 if len(t) == 3 and all(x["health"] == "up" for x in t) else 1)'
}
wait_for 30 "prometheus targets up" targets_up
sleep 5
start=$(($(date +%s) - 3))

mix="90:/sleep?ms=10,10:/sleep?ms=200"
phase() { # phase RATE SECONDS
  timeout $(($2 + 20)) "$bin/usher-load" --target "$public" --mix "$mix" --rate "$1" \
    --duration "${2}s" --timeout 5s --arrivals poisson --json >"$work/load.json" 2>"$work/load.log"
  python3 - "$work/load.json" "$1" "$2" <<'PY'
import json, sys
o = json.load(open(sys.argv[1]))["overall"]
p99 = o["latency_ms"]["p99"] or 0
print(f"   {sys.argv[2]:>3} req/s for {sys.argv[3]} s: sent {o['sent']}, status {o['status']}, p99 {p99:.0f} ms")
PY
}
echo "== driving load"
phase 120 15
echo "   breaking the static backend"
t_break=$(date +%s.%N)
kill -USR1 "$flaky_pid"
phase 180 15
t_over=$(date +%s.%N)
phase 400 15
echo "   repairing the static backend"
t_repair=$(date +%s.%N)
kill -USR1 "$flaky_pid"
phase 120 15
sleep 5
end=$(date +%s)

echo "== rendering $out"
python3 "$here/render.py" --prometheus "$prom" --start "$start" --end "$end" \
  --dashboards "$root/deploy/grafana" --out "$out" \
  --alias "$static=$static (static)" --alias "@ $admin=@ usher" \
  --annotate "static backend breaks=$t_break" --annotate "400 req/s=$t_over" \
  --annotate "static backend repaired=$t_repair" \
  --subtitle "2 × usher-worker (4 threads) + 1 static backend  ·  Prometheus, 1 s scrapes  ·  \$__rate_interval = 5s" \
  ${SAVE_DATA:+--save-data "$SAVE_DATA"}
ls -l "$out"
