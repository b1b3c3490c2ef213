#!/usr/bin/env python3
"""Helpers for bench/replicas.sh (Python 3 standard library only).

    replicas.py sample OUT SECONDS INTERVAL_MS URL...
        polls each worker's /healthz (keep-alive) every INTERVAL_MS for SECONDS and
        writes {URL: {"samples", "errors", "max_queued", "max_busy", "mean_busy"}}
        to OUT as JSON
    replicas.py metric-sum URL NAME [LABEL=VALUE...]
        the sum of the Prometheus samples NAME{...} at URL whose labels match
    replicas.py table FILE
        the medians table from the JSON lines replicas.sh writes

Loopback only.
"""

import http.client
import json
import re
import statistics
import sys
import time
import urllib.parse
import urllib.request


def _loopback(url):
    u = urllib.parse.urlparse(url)
    if u.hostname not in ("127.0.0.1", "localhost", "::1"):
        sys.exit(f"refusing non-loopback URL {url}")
    return u


def sample(out, seconds, interval_ms, urls):
    conns, stats = {}, {}
    for url in urls:
        u = _loopback(url)
        conns[url] = (u.hostname, u.port, u.path or "/healthz")
        stats[url] = {"samples": 0, "errors": 0, "max_queued": 0, "max_busy": 0,
                      "sum_busy": 0, "threads": None}
    live = {}
    step = interval_ms / 1e3
    deadline = time.monotonic() + seconds
    nxt = time.monotonic()
    while time.monotonic() < deadline:
        for url, (host, port, path) in conns.items():
            st = stats[url]
            try:
                c = live.get(url)
                if c is None:
                    c = live[url] = http.client.HTTPConnection(host, port, timeout=1)
                c.request("GET", path)
                r = c.getresponse()
                body = r.read()
                if r.status != 200:
                    raise ValueError(r.status)
                d = json.loads(body)
                st["samples"] += 1
                q, b = int(d.get("queued", 0)), int(d.get("busy", 0))
                st["max_queued"] = max(st["max_queued"], q)
                st["max_busy"] = max(st["max_busy"], b)
                st["sum_busy"] += b
                st["threads"] = d.get("threads", st["threads"])
            except Exception:  # noqa: BLE001 - any failure is one error sample
                st["errors"] += 1
                c = live.pop(url, None)
                if c is not None:
                    c.close()
        nxt += step
        pause = nxt - time.monotonic()
        if pause > 0:
            time.sleep(pause)
        else:
            nxt = time.monotonic()
    for st in stats.values():
        st["mean_busy"] = st["sum_busy"] / st["samples"] if st["samples"] else None
        del st["sum_busy"]
    with open(out, "w") as f:
        json.dump(stats, f)


_LINE = re.compile(r'^([a-zA-Z_:][\w:]*)(\{[^}]*\})?\s+(\S+)')
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def metric_sum(url, name, filters):
    _loopback(url)
    want = dict(f.split("=", 1) for f in filters)
    try:
        with urllib.request.urlopen(url, timeout=3) as r:
            text = r.read().decode()
    except OSError:
        return None
    total = 0.0
    for line in text.splitlines():
        m = _LINE.match(line)
        if not m or m.group(1) != name:
            continue
        labels = dict(_LABEL.findall(m.group(2) or ""))
        if all(labels.get(k) == v for k, v in want.items()):
            total += float(m.group(3))
    return total


def _med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def _f(v, spec):
    return "-" if v is None else format(v, spec)


def table(path):
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    rows = [r for r in rows if "meta" not in r]
    cases = []
    for r in rows:
        if r["case"] not in cases:
            cases.append(r["case"])
    print("| case | replica | share | rate | ok/s | p50 ms | p99 ms | failures | "
          "worker 503s (case) | max queued (case) | rounds |")
    print("|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|")
    for case in cases:
        crs = [r for r in rows if r["case"] == case]
        reps = sorted({r["replica"] for r in crs}, key=lambda x: (x != "all", x))
        rounds = sorted({r["round"] for r in crs})
        per_round = {}
        for rd in rounds:
            rr = [r for r in crs if r["round"] == rd]
            per_round[rd] = rr[0]
        refused = _med([per_round[rd].get("worker_503") for rd in rounds])
        maxq = _med([per_round[rd].get("max_queued") for rd in rounds])
        for rep in reps:
            rs = [r for r in crs if r["replica"] == rep]
            print(f"| {case} | {rep} | {rs[0]['share']:.0%} | {rs[0]['rate']:.1f} | "
                  f"{_f(_med([r['ok_s'] for r in rs]), '.1f')} | "
                  f"{_f(_med([r['p50'] for r in rs]), '.1f')} | "
                  f"{_f(_med([r['p99'] for r in rs]), '.1f')} | "
                  f"{_f(_med([r['failures'] for r in rs]), '.0f')} | "
                  f"{_f(refused, '.0f')} | {_f(maxq, '.0f')} | {len(rs)} |")
    print("medians over rounds; latency from the scheduled send time (usher-load, "
          "coordinated-omission corrected), 2xx only; failures = non-2xx + errors at the "
          "client; worker 503s = refusals the workers sent during the case (their "
          "/metrics); max queued = the largest `queued` seen in the workers' /healthz, "
          "sampled every ~10 ms")


def main(argv):
    if len(argv) < 2:
        sys.exit(__doc__)
    cmd, args = argv[1], argv[2:]
    if cmd == "sample":
        sample(args[0], float(args[1]), float(args[2]), args[3:])
    elif cmd == "metric-sum":
        v = metric_sum(args[0], args[1], args[2:])
        print("" if v is None else f"{v:.0f}")
    elif cmd == "table":
        table(args[0])
    else:
        sys.exit(f"unknown command {cmd!r}\n{__doc__}")


if __name__ == "__main__":
    main(sys.argv)
