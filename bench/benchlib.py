#!/usr/bin/env python3
"""Helpers for the bench/ scripts (Python 3 standard library only).

    benchlib.py free-port [N]              N free loopback TCP ports, one a line
    benchlib.py wait-http URL SECONDS      exit 0 once URL answers 200, 1 on timeout
    benchlib.py cpu-ticks PID              "UTIME STIME" (clock ticks) of PID, all its
                                           threads, and all its descendant processes
    benchlib.py capacity THREADS MIX       THREADS / mean service time, for a mix like
                                           "90:/sleep?ms=10,10:/sleep?ms=200"
    benchlib.py wrk-json FILE              parse `wrk --latency` output into JSON
    benchlib.py overhead-table FILE        print the overhead.sh table (JSON lines in)
    benchlib.py threaded-table FILE        print the threaded.sh tables and verdicts
                                           (JSON lines in; medians over rounds)
    benchlib.py gil-table FILE             the same for bench/gil.sh
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
    """(ppid, (utime, stime)) of one process, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read().decode(errors="replace")
    except OSError:
        return None
    # The command name is in parentheses and may contain spaces: split after it.
    rest = data[data.rindex(")") + 2 :].split()
    # rest[0] is field 3 (state); utime and stime are fields 14 and 15.
    return int(rest[1]), (int(rest[11]), int(rest[12]))


def cpu_ticks(root):
    """(user, system) ticks of root and its descendants (each /proc/PID/stat covers
    all threads)."""
    procs = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = _stat(int(name))
            if st:
                procs[int(name)] = st
    children = {}
    for pid, (ppid, _) in procs.items():
        children.setdefault(ppid, []).append(pid)
    user, system, todo = 0, 0, [root]
    while todo:
        pid = todo.pop()
        if pid in procs:
            user += procs[pid][1][0]
            system += procs[pid][1][1]
        todo.extend(children.get(pid, []))
    return user, system


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
            f"{'errors':>7} {'proxy us/req':>13} {'user':>6} {'sys':>6} {'backend us/req':>15}")
    print(head)
    print("-" * len(head))
    for r in rows:
        if r.get("unavailable"):
            print(f"{r['target']:<22} {'not available':>10}  ({r.get('why', '')})")
            continue
        print(f"{r['target']:<22} {_fmt(r.get('rps'), '10.0f')} {_fmt(r.get('p50_ms'), '8.2f')} "
              f"{_fmt(r.get('p99_ms'), '8.2f')} {r.get('non_2xx', 0):>7} {r.get('errors', 0):>7} "
              f"{_fmt(r.get('proxy_us_per_req'), '13.1f')} "
              f"{_fmt(r.get('proxy_user_us_per_req'), '6.1f')} "
              f"{_fmt(r.get('proxy_sys_us_per_req'), '6.1f')} "
              f"{_fmt(r.get('backend_us_per_req'), '15.1f')}")


# ---- threaded.sh and gil.sh: medians over rounds, verdicts

# A run whose generator had more than this many requests waiting for a connection
# at once, or hit its connection limit, or whose scheduler ran late by more than
# GEN_LAG_MS, measured the generator too: flagged "!" and the verdict says so.
GEN_BACKLOG_OK = 50
GEN_LAG_MS = 10.0


def row_of_pairs(pairs):
    """A results row from KEY=VALUE arguments: values that parse as JSON (numbers,
    booleans) are taken as such, the rest as strings."""
    row = {}
    for p in pairs:
        k, _, v = p.partition("=")
        try:
            v = json.loads(v)
        except ValueError:
            pass
        row[k] = v
    return row


def median(xs):
    """The median of the values that are not None; None if there are none."""
    xs = sorted(x for x in xs if x is not None)
    if not xs:
        return None
    n = len(xs)
    return xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2


def _run_stats(rep):
    """The numbers of one usher-load report that the tables use."""
    short, long_ = rep["classes"][0], rep["classes"][-1]
    ov = rep["overall"]
    conns = rep.get("connections") or 0
    opened = rep.get("connections_opened", 0)
    backlog = rep.get("backlog_max", 0)
    lag = rep.get("scheduler_lag_max_ms", 0.0)
    return {
        "ok_s": ov["throughput_ok"],
        "short_p50": short["latency_ms"]["p50"],
        "short_p99": short["latency_ms"]["p99"],
        "long_p50": long_["latency_ms"]["p50"],
        "long_p99": long_["latency_ms"]["p99"],
        "p50": ov["latency_ms"]["p50"],
        "p99": ov["latency_ms"]["p99"],
        "p999": ov["latency_ms"]["p999"],
        # failures: every non-2xx answer plus connect/timeout/io errors and
        # unfinished requests; 503 is one part of it
        "fail": ov["non_2xx"] + ov["errors"]["total"],
        "s503": ov["s503"],
        "backlog": backlog,
        "lag_ms": lag,
        "opened": opened,
        "gen_bad": backlog > GEN_BACKLOG_OK or lag > GEN_LAG_MS or (conns and opened >= conns),
    }


def _cells(rows, key):
    """{key(row): [stats of each round]} for the measured runs, in first-seen order."""
    cells = {}
    for r in rows:
        if r.get("unavailable") or r.get("unloaded") or "report" not in r:
            continue
        cells.setdefault(key(r), []).append(_run_stats(r["report"]))
    return cells


def _med(runs, field):
    return median([x[field] for x in runs])


def _cmp(ok):
    return "PASS" if ok else "FAIL"


def threaded_table(path):
    rows = _rows(path)
    backends = []
    for r in rows:
        b = r.get("backend", "-")
        if b not in backends:
            backends.append(b)
    unloaded = {}
    for r in rows:
        if r.get("unloaded") and "report" in r:
            rep = r["report"]
            unloaded[(r.get("backend", "-"), r["target"])] = {
                "rate": r.get("rate"), "n": rep["classes"][0]["ok"],
                "p50": rep["classes"][0]["latency_ms"]["p50"],
                "p99": rep["classes"][0]["latency_ms"]["p99"],
                "fail": rep["overall"]["non_2xx"] + rep["overall"]["errors"]["total"]}
    if unloaded:
        print("unloaded: the short view alone, at a low rate, once per proxy and backend "
              "(its p50 is the 'own time' subtracted below)")
        head = f"{'backend':<12} {'target':<10} {'rate':>6} {'ok':>6} {'p50 ms':>8} {'p99 ms':>8} {'fail':>5}"
        print(head)
        print("-" * len(head))
        for (b, t), u in unloaded.items():
            print(f"{b:<12} {t:<10} {_fmt(u['rate'], '6.0f')} {u['n']:>6} {_fmt(u['p50'], '8.2f')} "
                  f"{_fmt(u['p99'], '8.2f')} {u['fail']:>5}")
        print()

    cells = _cells(rows, lambda r: (r.get("backend", "-"), r["target"], r["load"]))
    rates = {(r.get("backend", "-"), r["target"], r["load"]): r.get("rate") for r in rows
             if "load" in r and not r.get("unloaded")}
    med = {}
    head = (f"{'backend':<12} {'target':<10} {'load':>5} {'rate':>6} {'ok/s':>7} {'short p50':>9} "
            f"{'short p99':>9} {'queue p99':>9} {'long p99':>9} {'fail':>6} {'503':>6} "
            f"{'gen bl':>6} {'lag ms':>6} {'conns':>6} {'n':>2}")
    print(f"medians over rounds (n = rounds); latencies in ms")
    print(head)
    print("-" * len(head))
    shown_unavail = set()
    for r in rows:
        if r.get("unavailable"):
            k = (r.get("backend", "-"), r["target"], r.get("load", 0))
            if k not in shown_unavail and k not in cells:
                shown_unavail.add(k)
                print(f"{k[0]:<12} {k[1]:<10} {k[2]:>5.2f}  not available ({r.get('why', '')})")
    for k, runs in cells.items():
        b, t, load = k
        m = {f: _med(runs, f) for f in ("ok_s", "short_p50", "short_p99", "long_p99", "fail", "s503")}
        own = unloaded.get((b, t), {}).get("p50")
        m["queue_p99"] = (m["short_p99"] - own) if (own is not None and m["short_p99"] is not None) else None
        m["gen_bad"] = any(x["gen_bad"] for x in runs)
        m["backlog"] = max(x["backlog"] for x in runs)
        m["lag_ms"] = max(x["lag_ms"] for x in runs)
        m["opened"] = max(x["opened"] for x in runs)
        med[k] = m
        flag = "!" if m["gen_bad"] else " "
        print(f"{b:<12} {t:<10} {load:>5.2f} {_fmt(rates.get(k), '6.0f')} {_fmt(m['ok_s'], '7.1f')} "
              f"{_fmt(m['short_p50'], '9.1f')} {_fmt(m['short_p99'], '9.1f')} "
              f"{_fmt(m['queue_p99'], '9.1f')} {_fmt(m['long_p99'], '9.1f')} "
              f"{_fmt(m['fail'], '6.0f')} {_fmt(m['s503'], '6.0f')} "
              f"{m['backlog']:>5}{flag} {m['lag_ms']:>6.1f} {m['opened']:>6} {len(runs):>2}")
    print("latencies from the scheduled send time (coordinated-omission corrected), of 2xx answers;"
          " queue p99 = short p99 - the unloaded short p50 through the same proxy;"
          " fail = non-2xx + errors + unfinished (503 included); gen bl / lag ms / conns ="
          " the generator's most requests waiting for a connection, its worst scheduler"
          " lag, connections it opened (max over rounds; '!' = the generator was a"
          f" bottleneck: backlog > {GEN_BACKLOG_OK}, lag > {GEN_LAG_MS:g} ms or its"
          " connection limit reached)")
    print()
    _threaded_verdicts(med)


def _threaded_verdicts(med):
    """Issue 13's targets, per backend, Usher row and load, from the medians."""
    peers = ("nginx", "haproxy")
    lines = []
    for (b, t, load), m in med.items():
        if not t.startswith("usher"):
            continue
        ps = {p: med[(b, p, load)] for p in peers if (b, p, load) in med}
        tag = f"VERDICT {b} {t} @{load:.2f}:"
        if not ps:
            lines.append(f"{tag} n/a (no nginx/haproxy row)")
            continue
        gen = any(x["gen_bad"] for x in (m, *ps.values()))
        note = "  [generator was a bottleneck in some run: not valid]" if gen else ""
        if load <= 1.0:
            qs = {p: v["queue_p99"] for p, v in ps.items() if v["queue_p99"] is not None}
            p50s = {p: v["short_p50"] for p, v in ps.items() if v["short_p50"] is not None}
            if m["queue_p99"] is None or not qs or m["short_p50"] is None or not p50s:
                lines.append(f"{tag} n/a (missing unloaded or latency numbers)")
                continue
            bq = min(qs, key=qs.get)
            bp = min(p50s, key=p50s.get)
            q_ok = m["queue_p99"] <= 0.7 * qs[bq]
            p_ok = m["short_p50"] <= p50s[bp]
            f_ok = (m["fail"] or 0) == 0
            ok = q_ok and p_ok and f_ok
            lines.append(
                f"{tag} {_cmp(ok)}  queue p99 {m['queue_p99']:.1f} ms vs 0.7 x {qs[bq]:.1f} ({bq})"
                f" = {0.7 * qs[bq]:.1f} [{_cmp(q_ok)}, ratio {_ratio(m['queue_p99'], qs[bq])}];"
                f" short p50 {m['short_p50']:.1f} vs {p50s[bp]:.1f} ({bp}) [{_cmp(p_ok)}];"
                f" failures {m['fail']:.0f} [{_cmp(f_ok)}]{note}")
        else:
            gps = {p: v["ok_s"] for p, v in ps.items() if v["ok_s"] is not None}
            p99s = {p: v["short_p99"] for p, v in ps.items() if v["short_p99"] is not None}
            if m["ok_s"] is None or m["short_p99"] is None or not gps or not p99s:
                lines.append(f"{tag} n/a (missing numbers)")
                continue
            bg = max(gps, key=gps.get)
            bp = min(p99s, key=p99s.get)
            g_ok = m["ok_s"] >= gps[bg]
            p_ok = m["short_p99"] <= 0.25 * p99s[bp]
            ok = g_ok and p_ok
            lines.append(
                f"{tag} {_cmp(ok)}  goodput {m['ok_s']:.1f} vs {gps[bg]:.1f} ok/s ({bg})"
                f" [{_cmp(g_ok)}, {100 * (m['ok_s'] / gps[bg] - 1):+.1f}%];"
                f" admitted short p99 {m['short_p99']:.1f} vs 0.25 x {p99s[bp]:.1f} ({bp})"
                f" = {0.25 * p99s[bp]:.1f} [{_cmp(p_ok)}, ratio {_ratio(m['short_p99'], p99s[bp])}];"
                f" 503 {m['s503']:.0f}{note}")
    if lines:
        print("targets (issue 13): at <= 100% load Usher's queue p99 <= 0.7 x the best peer's,"
              " short p50 <= the best peer's, no failures; past 100% goodput >= the best"
              " peer's and admitted short p99 <= 0.25 x the best peer's")
        print("\n".join(lines))


def _ratio(a, b):
    if b is None or b <= 0:
        return "-"
    return f"{a / b:.2f}"


def _span(xs):
    if not xs:
        return "-"
    return f"{min(xs):g}" if min(xs) == max(xs) else f"{min(xs):g}-{max(xs):g}"


def gil_table(path):
    rows = _rows(path)
    cells = _cells(rows, lambda r: (r.get("backend", "-"), r["workload"], r["config"]))
    info = {}
    for r in rows:
        if "report" in r:
            k = (r.get("backend", "-"), r["workload"], r["config"])
            i = info.setdefault(k, {"rate": r.get("rate"), "path": r.get("path"),
                                    "caps": [], "learned": []})
            if r.get("capacity_seen") is not None:
                i["caps"].append(r["capacity_seen"])
            if r.get("learned_seen") is not None:
                i["learned"].append(r["learned_seen"])
    head = (f"{'backend':<14} {'workload':<8} {'usher config':<16} {'rate':>5} {'ok/s':>7} "
            f"{'p50':>7} {'p99':>7} {'p99.9':>7} {'fail':>5} {'cap':>7} {'learned':>7} {'gen bl':>6} {'n':>2}")
    print("medians over rounds (n = rounds); latencies in ms; cap / learned ="
          " usher_backend_capacity / usher_backend_learned_capacity at the end of each run"
          " (min-max over rounds; '-' = not reported)")
    print(head)
    print("-" * len(head))
    for r in rows:
        if r.get("unavailable"):
            print(f"{r.get('backend', '-'):<14} {r.get('workload', '?'):<8} {r.get('config', '?'):<16}"
                  f"  not available ({r.get('why', '')})")
    med = {}
    for k, runs in cells.items():
        b, w, c = k
        m = {f: _med(runs, f) for f in ("ok_s", "p50", "p99", "p999", "fail")}
        m["gen_bad"] = any(x["gen_bad"] for x in runs)
        m["backlog"] = max(x["backlog"] for x in runs)
        med[k] = m
        cap, learned = (_span(info[k]["caps"]), _span(info[k]["learned"]))
        flag = "!" if m["gen_bad"] else " "
        print(f"{b:<14} {w:<8} {c:<16} {_fmt(info[k]['rate'], '5.0f')} {_fmt(m['ok_s'], '7.1f')} "
              f"{_fmt(m['p50'], '7.2f')} {_fmt(m['p99'], '7.2f')} {_fmt(m['p999'], '7.2f')} "
              f"{_fmt(m['fail'], '5.0f')} {cap:>7} {learned:>7} {m['backlog']:>5}{flag} {len(runs):>2}")
    print("latencies from the scheduled send time, of 2xx answers; fail = non-2xx + errors;"
          f" '!' = the generator was a bottleneck in some run")
    print()
    print("targets: GIL-bound (cpu) auto p99 <= 1.3 x max_in_flight 1;"
          " I/O-bound (io) auto p99 <= 1.3 x max_in_flight = threads")
    for b in dict.fromkeys(k[0] for k in med):
        for w, ref in (("cpu", "max_in_flight 1"), ("io", None)):
            if not any(k[0] == b and k[1] == w for k in med):
                continue
            auto = med.get((b, w, "auto"))
            if ref is None:
                refs = [k[2] for k in med if k[0] == b and k[1] == w and k[2] != "auto"]
                ref = refs[-1] if refs else None
            r = med.get((b, w, ref)) if ref else None
            tag = f"VERDICT {b} {w}: auto vs {ref}:"
            if not auto or not r or auto["p99"] is None or r["p99"] is None:
                print(f"{tag} n/a (missing rows)")
                continue
            ok = auto["p99"] <= 1.3 * r["p99"] and (auto["fail"] or 0) == 0
            gen = "  [generator was a bottleneck in some run: not valid]" \
                if auto["gen_bad"] or r["gen_bad"] else ""
            print(f"{tag} {_cmp(ok)}  p99 {auto['p99']:.2f} vs 1.3 x {r['p99']:.2f} = "
                  f"{1.3 * r['p99']:.2f} ms (ratio {_ratio(auto['p99'], r['p99'])}); "
                  f"failures {auto['fail']:.0f}{gen}")


def main(argv):
    if len(argv) < 2:
        sys.exit(__doc__)
    cmd, args = argv[1], argv[2:]
    if cmd == "free-port":
        print("\n".join(str(p) for p in free_ports(int(args[0]) if args else 1)))
    elif cmd == "wait-http":
        sys.exit(0 if wait_http(args[0], float(args[1])) else 1)
    elif cmd == "cpu-ticks":
        print(*cpu_ticks(int(args[0])))
    elif cmd == "capacity":
        cap, mean_s = capacity(int(args[0]), args[1])
        print(f"{cap:.1f} {mean_s * 1000:.1f}")
    elif cmd == "wrk-json":
        print(json.dumps(wrk_json(args[0])))
    elif cmd == "overhead-table":
        overhead_table(args[0])
    elif cmd == "threaded-table":
        threaded_table(args[0])
    elif cmd == "gil-table":
        gil_table(args[0])
    elif cmd == "meta":
        print(json.dumps(meta(args)))
    else:
        sys.exit(f"unknown command {cmd!r}\n{__doc__}")


if __name__ == "__main__":
    main(sys.argv)
