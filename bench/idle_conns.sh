#!/usr/bin/env bash
# Idle keep-alive memory: N client connections, each idle after one request,
# held open against nginx, HAProxy and Usher, one after another in the same run,
# in front of one usher-worker. Prints each proxy's resident memory (VmRSS of its
# process tree, from /proc/PID/status) before and with the N connections, and
# KiB per idle connection = RSS delta / N.
#
# Before: after start and a few warm-up requests (each on its own connection,
# closed). With: after all N connections have had their one response and then
# IDLE_SETTLE seconds (default 1) of idleness. Loopback only. RSS is not CPU
# time: a noisy machine does not change it much, one run is enough.
#
# Env: IDLE_CONNS (space-separated counts, default "3000"; e.g. "3000 10000"),
#      ONLY (subset of: nginx haproxy usher), PATH_Q (/sleep?ms=0),
#      IDLE_SETTLE (1), BACKEND_THREADS (4), NO_BUILD=1, KEEP_WORK=1,
#      RESULTS_OUT=FILE.
set -euo pipefail
# shellcheck source=bench/lib.sh
source "$(dirname "$0")/lib.sh"

COUNTS="${IDLE_CONNS:-3000}"
ROWS="${ONLY:-nginx haproxy usher}"
PATH_Q="${PATH_Q:-/sleep?ms=0}"
SETTLE="${IDLE_SETTLE:-1}"
THREADS="${BACKEND_THREADS:-4}"

ensure_tools
build
raise_nofile
log "open files: $(ulimit -n)"

BPORT="$(free_port)"
start_backend "$BPORT" "$THREADS"
log "backend: $BACKEND_KIND --threads $THREADS on 127.0.0.1:$BPORT"

RESULTS="$WORK/idle_conns.jsonl"
: >"$RESULTS"

# hold NAME PORT PID N : opens N connections, one request each, measures, then
# stops the proxy (so the proxy side closes first) and closes them.
hold() {
  python3 - "$@" "$PATH_Q" "$SETTLE" >>"$RESULTS" <<'EOF'
import json, os, signal, socket, sys, time

name, port, pid, n, path, settle = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], float(sys.argv[6])
req = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()

def tree(root):
    kids = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                ppid = int(open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            kids.setdefault(ppid, []).append(int(d))
    out, todo = [], [root]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, []))
    return out

def rss_kib(root):
    total = 0
    for p in tree(root):
        try:
            for line in open(f"/proc/{p}/status"):
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total

def one(s):
    s.sendall(req)
    buf = b""
    while b"\r\n\r\n" not in buf:
        c = s.recv(65536)
        if not c:
            raise ConnectionError("closed before the response head")
        buf += c
    head, body = buf.split(b"\r\n\r\n", 1)
    status = int(head.split(b" ", 2)[1])
    length = 0
    for line in head.split(b"\r\n")[1:]:
        k, _, v = line.partition(b":")
        if k.strip().lower() == b"content-length":
            length = int(v)
    while len(body) < length:
        c = s.recv(65536)
        if not c:
            raise ConnectionError("closed mid-body")
        body += c
    return status

for _ in range(20):
    with socket.create_connection(("127.0.0.1", port)) as s:
        one(s)
time.sleep(settle)
before = rss_kib(pid)
conns, bad = [], 0
t0 = time.time()
for _ in range(n):
    s = socket.create_connection(("127.0.0.1", port))
    if one(s) != 200:
        bad += 1
    conns.append(s)
opened = time.time() - t0
time.sleep(settle)
# Still open and answering? (one more request on the first connection)
alive = one(conns[0]) == 200
time.sleep(0.2)
with_conns = rss_kib(pid)
print(json.dumps({"target": name, "conns": n, "rss_before_kib": before,
                  "rss_with_kib": with_conns, "kib_per_conn": (with_conns - before) / n,
                  "non_200": bad, "alive": alive, "open_secs": round(opened, 2),
                  "processes": len(tree(pid))}))
sys.stdout.flush()
os.kill(pid, signal.SIGTERM)
for _ in range(100):
    if not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] == "Z":
        break
    time.sleep(0.05)
for s in conns:
    s.close()
EOF
  log "$1: $(tail -1 "$RESULTS")"
}

for n in $COUNTS; do
  for row in $ROWS; do
    case "$row" in
      nginx)
        port="$(free_port)"; dir="$WORK/nginx-$n"
        write_nginx "$dir" "$port" roundrobin "$BPORT"
        if start_nginx "$dir" "$port"; then pid=$LAST_PID; hold nginx "$port" "$pid" "$n"; stop_pid "$pid"
        else log "nginx: not available ($UNAVAILABLE_WHY)"; fi ;;
      haproxy)
        port="$(free_port)"; cfg="$WORK/haproxy-$n.cfg"
        write_haproxy "$cfg" "$port" roundrobin 0 "$BPORT"
        # lib.sh's maxconn 8000 would leave the rest in the backlog. HAProxy
        # wants about 2 file descriptors per maxconn: past half the hard
        # limit (ulimit -Hn) it refuses to start, and says so.
        sed -i "s/maxconn 8000/maxconn $((n + 100))/" "$cfg"
        if start_haproxy "$cfg" "$port"; then pid=$LAST_PID; hold haproxy "$port" "$pid" "$n"; stop_pid "$pid"
        else log "haproxy: not available ($UNAVAILABLE_WHY)"; fi ;;
      usher)
        port="$(free_port)"; admin="$(free_port)"; cfg="$WORK/usher-$n.yaml"
        write_usher "$cfg" "$port" "$admin" "$THREADS" "$BPORT"
        # The default max_connections (10000) would leave the rest in the backlog.
        sed -i "s/address: \"127.0.0.1:$port\" }/address: \"127.0.0.1:$port\", max_connections: $((n + 1000)) }/" "$cfg"
        if start_usher "$cfg" "$port" "$admin"; then pid=$LAST_PID; hold usher "$port" "$pid" "$n"; stop_pid "$pid"
        else log "usher: not available ($UNAVAILABLE_WHY)"; fi ;;
      *) log "unknown row $row"; exit 2 ;;
    esac
  done
done

echo
echo "idle keep-alive connections (one request each, then idle ${SETTLE}s), GET $PATH_Q on one $BACKEND_KIND"
python3 - "$RESULTS" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
print(f"{'target':<10} {'conns':>6} {'RSS before':>11} {'RSS with':>10} {'KiB/conn':>9} {'procs':>5}  notes")
for r in rows:
    notes = []
    if r["non_200"]: notes.append(f"{r['non_200']} non-200")
    if not r["alive"]: notes.append("first connection dead")
    print(f"{r['target']:<10} {r['conns']:>6} {r['rss_before_kib']:>8} KiB {r['rss_with_kib']:>6} KiB "
          f"{r['kib_per_conn']:>9.1f} {r['processes']:>5}  {', '.join(notes)}")
EOF
echo "RSS = sum of VmRSS over the proxy's process tree (nginx: master + worker)"
write_results_out idle_conns "counts=$COUNTS" "path=$PATH_Q" "backend=$BACKEND_KIND" "rows=$ROWS"
