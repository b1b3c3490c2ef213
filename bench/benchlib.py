#!/usr/bin/env python3
"""Helpers for the bench/ scripts (Python 3 standard library only).

    benchlib.py free-port [N]              N free loopback TCP ports, one a line
    benchlib.py wait-http URL SECONDS      exit 0 once URL answers 200, 1 on timeout
    benchlib.py cpu-ticks PID              utime+stime (clock ticks) of PID, all its
                                           threads, and all its descendant processes
    benchlib.py capacity THREADS MIX       THREADS / mean service time, for a mix like
                                           "90:/sleep?ms=10,10:/sleep?ms=200"
    benchlib.py wrk-json FILE              parse `wrk --latency` output into JSON
    benchlib.py overhead-table FILE        print the overhead.sh table (JSON lines in)
    benchlib.py threaded-table FILE        print the threaded.sh table (JSON lines in)
    benchlib.py meta KEY=VALUE...          the metadata line of a RESULTS_OUT file:
                                           {"meta": {KEY: VALUE, ..., "finished",
                                           "loadavg_end"}}, and "commit" and "dirty"
                                           from git unless given

Every address used here is loopback.
"""

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request


def free_ports(n):
    socks, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def wait_http(url, seconds):
    host = urllib.request.urlparse(url).hostname
    if host not in ("127.0.0.1", "localhost", "::1"):
        sys.exit(f"wait-http: refusing non-loopback URL {url}")
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return True
        except (urllib.error.URLError, OSError, ValueError):
            pass
        time.sleep(0.1)
    return False


def _stat(pid):
    """(ppid, utime+stime) of one process, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read().decode(errors="replace")
    except OSError:
        return None
    # The command name is in parentheses and may contain spaces: split after it.
    rest = data[data.rindex(")") + 2 :].split()
    # rest[0] is field 3 (state); utime and stime are fields 14 and 15.
    return int(rest[1]), int(rest[11]) + int(rest[12])


def cpu_ticks(root):
    """Ticks of root and its descendants (each /proc/PID/stat covers all threads)."""
    procs = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = _stat(int(name))
            if st:
                procs[int(name)] = st
    children = {}
    for pid, (ppid, _) in procs.items():
        children.setdefault(ppid, []).append(pid)
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        if pid in procs:
            total += procs[pid][1]
        todo.extend(children.get(pid, []))
    return total


def capacity(threads, mix):
    items = [x.strip() for x in mix.split(",") if x.strip()]
    total_w, total_ms = 0.0, 0.0
    for item in items:
        w, path = item.split(":", 1)
        m = re.search(r"ms=(\d+(?:\.\d+)?)", path)
        if not m:
            sys.exit(f"capacity: no ms=N in {item!r}")
        total_w += float(w)
        total_ms += float(w) * float(m.group(1))
    mean_s = total_ms / total_w / 1000.0
    return threads / mean_s, mean_s


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}


def _ms(text):
    m = re.match(r"([\d.]+)(us|ms|s|m|h)$", text.strip())
    return float(m.group(1)) * _UNITS[m.group(2)] if m else None


def wrk_json(path):
    with open(path) as f:
        out = f.read()
    res = {"rps": None, "requests": None, "p50_ms": None, "p99_ms": None,
           "non_2xx": 0, "errors": 0}
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if m:
        res["rps"] = float(m.group(1))
    m = re.search(r"(\d+) requests in", out)
    if m:
        res["requests"] = int(m.group(1))
    for pct, key in (("50", "p50_ms"), ("99", "p99_ms")):
        m = re.search(rf"^\s+{pct}(?:\.000)?%\s+(\S+)", out, re.M)
        if m:
            res[key] = _ms(m.group(1))
    m = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    if m:
        res["non_2xx"] = int(m.group(1))
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if m:
        res["errors"] = sum(int(x) for x in m.groups())
    return res


def _fmt(v, spec):
    if v is None:
        m = re.match(r"\d+", spec)
        return "-".rjust(int(m.group(0)) if m else 0)
    return format(v, spec)


def _rows(path):
    """The result rows of a JSON-lines file, without the {"meta": ...} line."""
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [r for r in rows if "meta" not in r]


def _git(*args):
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        return subprocess.run(["git", "-C", repo, *args], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def _value(text):
    if text in ("true", "false"):
        return text == "true"
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    return text


def meta(pairs):
    m = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        m[key] = _value(value)
    m["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    try:
        with open("/proc/loadavg") as f:
            m["loadavg_end"] = " ".join(f.read().split()[:3])
    except OSError:
        pass
    if not m.get("commit"):
        m["commit"] = _git("rev-parse", "--short", "HEAD")
        status = _git("status", "--porcelain", "--untracked-files=no")
        m["dirty"] = None if status is None else bool(status)
    return {"meta": m}


def overhead_table(path):
    rows = _rows(path)
    head = (f"{'target':<22} {'req/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'non2xx':>7} "
            f"{'errors':>7} {'proxy us/req':>13} {'backend us/req':>15}")
    print(head)
    print("-" * len(head))
    for r in rows:
        if r.get("unavailable"):
            print(f"{r['target']:<22} {'not available':>10}  ({r.get('why', '')})")
            continue
        print(f"{r['target']:<22} {_fmt(r.get('rps'), '10.0f')} {_fmt(r.get('p50_ms'), '8.2f')} "
              f"{_fmt(r.get('p99_ms'), '8.2f')} {r.get('non_2xx', 0):>7} {r.get('errors', 0):>7} "
              f"{_fmt(r.get('proxy_us_per_req'), '13.1f')} "
              f"{_fmt(r.get('backend_us_per_req'), '15.1f')}")


def threaded_table(path):
    rows = _rows(path)
    head = (f"{'target':<10} {'load':>5} {'rate':>6} {'ok/s':>7} {'short p50':>9} "
            f"{'short p99':>9} {'long p50':>9} {'long p99':>9} {'503':>6} {'other':>6}")
    print(head)
    print("-" * len(head))
    for r in rows:
        if r.get("unavailable"):
            print(f"{r['target']:<10} {r.get('load', 0):>5.2f}  not available ({r.get('why', '')})")
            continue
        rep = r["report"]
        short, long_ = rep["classes"][0], rep["classes"][-1]
        ov = rep["overall"]
        other = ov["non_2xx"] - ov["s503"] + ov["errors"]["total"]
        print(f"{r['target']:<10} {r['load']:>5.2f} {r['rate']:>6.0f} "
              f"{ov['throughput_ok']:>7.1f} "
              f"{_fmt(short['latency_ms']['p50'], '9.1f')} "
              f"{_fmt(short['latency_ms']['p99'], '9.1f')} "
              f"{_fmt(long_['latency_ms']['p50'], '9.1f')} "
              f"{_fmt(long_['latency_ms']['p99'], '9.1f')} "
              f"{ov['s503']:>6} {other:>6}")
    print("latencies in ms, from the scheduled send time (coordinated-omission corrected);"
          " 'other' = non-2xx other than 503 + connect/timeout/io errors + unfinished")


def main(argv):
    if len(argv) < 2:
        sys.exit(__doc__)
    cmd, args = argv[1], argv[2:]
    if cmd == "free-port":
        print("\n".join(str(p) for p in free_ports(int(args[0]) if args else 1)))
    elif cmd == "wait-http":
        sys.exit(0 if wait_http(args[0], float(args[1])) else 1)
    elif cmd == "cpu-ticks":
        print(cpu_ticks(int(args[0])))
    elif cmd == "capacity":
        cap, mean_s = capacity(int(args[0]), args[1])
        print(f"{cap:.1f} {mean_s * 1000:.1f}")
    elif cmd == "wrk-json":
        print(json.dumps(wrk_json(args[0])))
    elif cmd == "overhead-table":
        overhead_table(args[0])
    elif cmd == "threaded-table":
        threaded_table(args[0])
    elif cmd == "meta":
        print(json.dumps(meta(args)))
    else:
        sys.exit(f"unknown command {cmd!r}\n{__doc__}")


if __name__ == "__main__":
    main(sys.argv)
