#!/usr/bin/env python3
"""sharesim.py: a discrete-event simulation of P Usher replicas sharing W threaded
workers of T threads each (issue 14). Python 3 standard library only.

    bench/sharesim.py                              # 3 x 2, 70/15/15, 80 %, all policies
    bench/sharesim.py -P 10 -W 20 --split hot:0.3 --policies dynamic --ttl 0.1,0.3
    bench/sharesim.py --service 90:10,10:200 --exact off
    bench/sharesim.py --table                      # the issue's table + the TTL sweep

Model (times in seconds; every hop proxy<->worker takes rtt/2 one way):

- Arrivals: each replica i gets its share split[i] of the total rate
  rho * W * T / mean_service; Poisson (default) or uniform (like usher-load).
- Replica i has a central FIFO queue (max depth 1024, timeout 5 s, like
  bench/lib.sh's Usher config; beyond either the request fails with 503).
  It sends to worker w only while mine[i][w] < cap[i][w], choosing among those
  the least mine[i][w], ties at random. A response from w frees a slot and the
  replica serves its queue head.
- Worker w runs T threads. A request arriving with all T busy is either refused
  at once (exact admission, usher-worker --queue 0: a marked 503) or waits in
  the worker's FIFO queue (no exact admission: waitress, --queue N; beyond
  --worker-queue it is refused too).
- cap per policy:
    single   one proxy carries all the traffic (P is ignored), cap T.
    ceil     the current code: ceil(T/P) on every worker. A refusal goes to
             the client as 503 (the current proxy passes it through).
    static   floor(T/P) + 1 if (i + w) mod P < T mod P: sums to T per worker.
    dynamic  T - others while the replica's last report from w is younger than
             --ttl, else the static share. A response from w to i carries
             busy (excluding that request) and queued; i stores
             others = max(0, busy + queued - (mine - 1)), mine counted at
             receipt including the answered request. An active health check
             every --hc-interval gives others = busy + queued - mine (the
             checks of one replica are spread over the interval in 10 groups
             of workers). A refusal sets others = T - (mine - 1) and puts the
             request back at the head of the queue (not a failure).
  static and dynamic requeue a refusal at the head; ceil fails it (see
  --ceil-refusal). When a report expires the replica re-examines its queue.

Latencies are those of successful requests, from arrival at the replica to the
response back at it (so they include both hops). Failures are counted apart.
Only requests that arrive in the measured window (after --warmup) count;
throughput is the successful responses completed inside the window per second.
Deterministic for a given --seed: arrivals and service times come from their
own random streams, identical across policies.
"""

import argparse
import heapq
import math
import random
import sys
import time
from collections import deque

INF = float("inf")
ARR, WARR, WDONE, RESP, HC, EXP, EXPB = range(7)
POLICIES = ("single", "ceil", "static", "dynamic")
SWEEP = [0.005, 0.02, 0.05, 0.1, 0.3, 1.0]
MIX = "90:10,10:200"


# ---------------------------------------------------------------- parameters

def parse_split(text, p):
    """Weights of the P replicas, normalised: "70,15,15", "equal", "hot:0.3"
    (replica 0 gets 30 %, the rest equal), "zipf:1.0"."""
    text = text.strip()
    if text == "equal":
        w = [1.0] * p
    elif text.startswith("hot:"):
        h = float(text[4:])
        if not 0 < h <= 1:
            sys.exit("hot:F needs 0 < F <= 1")
        w = [h] + ([(1 - h) / (p - 1)] * (p - 1) if p > 1 else [])
        if p == 1:
            w = [1.0]
    elif text.startswith("zipf:"):
        s = float(text[5:])
        w = [1.0 / (k + 1) ** s for k in range(p)]
    else:
        w = [float(x) for x in text.split(",") if x.strip()]
        if len(w) != p:
            sys.exit(f"--split {text!r} has {len(w)} weights for {p} replicas")
    tot = sum(w)
    return [x / tot for x in w]


def parse_service(text):
    """"50" (constant ms), "exp:50" (exponential, mean 50 ms) or a mix of
    constant classes "90:10,10:200" (weight:ms). Returns (draw(rng), mean_s, label)."""
    text = text.strip()
    if text.startswith("exp:"):
        mean = float(text[4:]) / 1e3
        return (lambda rng: rng.expovariate(1.0 / mean)), mean, text
    if ":" not in text:
        c = float(text) / 1e3
        return (lambda rng: c), c, f"{text} ms"
    classes = []
    for item in text.split(","):
        wt, ms = item.split(":")
        classes.append((float(wt), float(ms) / 1e3))
    tot = sum(w for w, _ in classes)
    cum, acc = [], 0.0
    for w, s in classes:
        acc += w / tot
        cum.append((acc, s))
    mean = sum(w * s for w, s in classes) / tot

    def draw(rng):
        u = rng.random()
        for c, s in cum:
            if u < c:
                return s
        return cum[-1][1]

    return draw, mean, f"mix {text} ms"


def pct(sorted_vals, p):
    if not sorted_vals:
        return None
    rank = math.ceil(p / 100.0 * len(sorted_vals))
    return sorted_vals[min(max(rank, 1), len(sorted_vals)) - 1]


# ---------------------------------------------------------------- simulation

def simulate(P, W, T, rho, split, service, policy, ttl, exact, hc_interval,
             seed, duration, warmup, rtt=0.0002, qdepth=1024, qtimeout=5.0,
             worker_queue=1024, arrivals="poisson", ceil_refusal="fail"):
    draw_service, mean_s, _ = service
    if policy == "single":
        split, P = [1.0], 1
    nrep = P
    total_rate = rho * W * T / mean_s
    rates = [total_rate * s for s in split]
    half = rtt / 2.0
    t_meas = warmup
    t_end = warmup + duration

    arr_rng = random.Random(seed * 1000003 + 1)
    svc_rng = random.Random(seed * 1000003 + 2)
    pick_rng = random.Random(seed * 1000003 + 3)
    prand = pick_rng.random

    # Caps. static[i][w] is the static share; cap[i][w] the current one.
    if policy == "single":
        static = [[T] * W]
    elif policy == "ceil":
        c = -(-T // P)
        static = [[c] * W for _ in range(P)]
    else:
        base, extra = T // P, T % P
        static = [[base + (1 if (i + w) % P < extra else 0) for w in range(W)]
                  for i in range(P)]
    dynamic = policy == "dynamic"
    cap = [row[:] for row in static]
    mine = [[0] * W for _ in range(nrep)]
    rver = [[0] * W for _ in range(nrep)]     # version of the live report, 0 = none
    # Eligible workers (mine < cap) bucketed by mine: buckets[i][m] is a list,
    # pos[i][w] the index in it or -1.
    buckets = [[[] for _ in range(T + 1)] for _ in range(nrep)]
    pos = [[-1] * W for _ in range(nrep)]
    for i in range(nrep):
        b0, pi, ci = buckets[i][0], pos[i], cap[i]
        for w in range(W):
            if ci[w] > 0:
                pi[w] = len(b0)
                b0.append(w)

    queues = [deque() for _ in range(nrep)]
    wbusy = [0] * W
    wq = [deque() for _ in range(W)]

    heap = []
    push = heapq.heappush
    pop = heapq.heappop
    seq = 0
    ver = 0

    # stats (measured requests only)
    lat = [[] for _ in range(nrep)]
    fails = [0] * nrep
    sent = [0] * nrep
    ok_window = 0
    refusals = 0
    inworker_q = 0
    max_wq = 0
    max_rq = [0] * nrep
    events = 0

    def setstate(i, w, nm, nc):
        pi = pos[i]
        j = pi[w]
        bl = buckets[i]
        if j >= 0:
            b = bl[mine[i][w]]
            last = b.pop()
            if last != w:
                b[j] = last
                pi[last] = j
            pi[w] = -1
        mine[i][w] = nm
        cap[i][w] = nc
        if nm < nc:
            b = bl[nm]
            pi[w] = len(b)
            b.append(w)

    def dispatch(i, now):
        nonlocal seq
        q = queues[i]
        if not q:
            return
        bl = buckets[i]
        while q:
            w = -1
            for m in range(T):
                b = bl[m]
                if b:
                    w = b[int(prand() * len(b))] if len(b) > 1 else b[0]
                    break
            if w < 0:
                return
            req = q.popleft()
            if now - req[1] > qtimeout:
                if req[2]:
                    fails[i] += 1
                continue
            setstate(i, w, mine[i][w] + 1, cap[i][w])
            seq += 1
            push(heap, (now + half, seq, WARR, w, req, 0, 0))

    # First arrivals; health-check groups with random phases.
    for i in range(nrep):
        if rates[i] > 0:
            gap = arr_rng.expovariate(rates[i]) if arrivals == "poisson" else arr_rng.random() / rates[i]
            seq += 1
            push(heap, (gap, seq, ARR, i, None, 0, 0))
    groups = []
    if dynamic and hc_interval > 0:
        ng = min(W, 10)
        groups = [list(range(g, W, ng)) for g in range(ng)]
        for i in range(nrep):
            ph = arr_rng.random() * hc_interval
            for g in range(ng):
                seq += 1
                push(heap, (ph + g * hc_interval / ng, seq, HC, i, None, g, 0))

    while heap:
        now, _, kind, a, req, x, y = pop(heap)
        events += 1
        if kind == ARR:
            i = a
            measured = now >= t_meas
            req = [i, now, measured, False]
            if measured:
                sent[i] += 1
            gap = arr_rng.expovariate(rates[i]) if arrivals == "poisson" else 1.0 / rates[i]
            if now + gap < t_end:
                seq += 1
                push(heap, (now + gap, seq, ARR, i, None, 0, 0))
            q = queues[i]
            if len(q) >= qdepth:
                if measured:
                    fails[i] += 1
                continue
            q.append(req)
            if len(q) > max_rq[i]:
                max_rq[i] = len(q)
            dispatch(i, now)
        elif kind == WARR:
            w = a
            if wbusy[w] < T:
                wbusy[w] += 1
                seq += 1
                push(heap, (now + draw_service(svc_rng), seq, WDONE, w, req, 0, 0))
            elif exact or len(wq[w]) >= worker_queue:
                seq += 1
                push(heap, (now + half, seq, RESP, w, req, -1, 0))
            else:
                wq[w].append(req)
                if req[2]:
                    req[3] = True
                if len(wq[w]) > max_wq:
                    max_wq = len(wq[w])
        elif kind == WDONE:
            w = a
            qw = wq[w]
            busy_excl = wbusy[w] - 1
            queued = len(qw)
            if qw:
                nxt = qw.popleft()
                seq += 1
                push(heap, (now + draw_service(svc_rng), seq, WDONE, w, nxt, 0, 0))
            else:
                wbusy[w] = busy_excl
            seq += 1
            push(heap, (now + half, seq, RESP, w, req, busy_excl, queued))
        elif kind == RESP:
            w = a
            i = req[0]
            mi = mine[i][w]
            if x < 0:  # refused
                if req[2]:
                    refusals += 1
                if policy == "ceil" and ceil_refusal == "fail":
                    if req[2]:
                        fails[i] += 1
                    setstate(i, w, mi - 1, cap[i][w])
                else:
                    nc = cap[i][w]
                    if dynamic:
                        nc = mi - 1          # others = T - (mine - 1)
                        ver += 1
                        rver[i][w] = ver
                        seq += 1
                        push(heap, (now + ttl, seq, EXP, i, None, w, ver))
                    setstate(i, w, mi - 1, nc)
                    queues[i].appendleft(req)
                dispatch(i, now)
            else:
                nc = cap[i][w]
                if dynamic:
                    others = x + y - (mi - 1)
                    nc = T - others if others > 0 else T
                    ver += 1
                    rver[i][w] = ver
                    seq += 1
                    push(heap, (now + ttl, seq, EXP, i, None, w, ver))
                setstate(i, w, mi - 1, nc)
                if req[2]:
                    lat[i].append(now - req[1])
                    if req[3]:
                        inworker_q += 1
                if t_meas <= now < t_end:
                    ok_window += 1
                dispatch(i, now)
        elif kind == EXP:
            i, w = a, x
            if rver[i][w] == y:
                rver[i][w] = 0
                setstate(i, w, mine[i][w], static[i][w])
                dispatch(i, now)
        elif kind == HC:
            if now >= t_end:
                continue
            i, g = a, x
            ver += 1
            rv, mi_, ci = rver[i], mine[i], cap[i]
            for w in groups[g]:
                others = wbusy[w] + len(wq[w]) - mi_[w]
                nc = T - others if others > 0 else T
                rv[w] = ver
                if nc != ci[w]:
                    setstate(i, w, mi_[w], nc)
            seq += 1
            push(heap, (now + ttl, seq, EXPB, i, None, g, ver))
            seq += 1
            push(heap, (now + hc_interval, seq, HC, i, None, g, 0))
            dispatch(i, now)
        elif kind == EXPB:
            i, g, v = a, x, y
            rv, st, ci, mi_ = rver[i], static[i], cap[i], mine[i]
            for w in groups[g]:
                if rv[w] == v:
                    rv[w] = 0
                    if ci[w] != st[w]:
                        setstate(i, w, mi_[w], st[w])
            dispatch(i, now)
    # Requests still queued at the end (only possible if nothing ever frees).
    for i in range(nrep):
        fails[i] += sum(1 for r in queues[i] if r[2])

    for l in lat:
        l.sort()
    busy = max(range(nrep), key=lambda k: split[k])
    others = sorted(v for k in range(nrep) if k != busy for v in lat[k])
    allv = sorted(v for l in lat for v in l)
    nsent = sum(sent)
    nok = len(allv)
    ms = lambda v: None if v is None else v * 1e3
    return {
        "policy": policy, "P": nrep, "W": W, "T": T, "rho": rho, "ttl": ttl,
        "exact": exact, "hc_interval": hc_interval, "seed": seed,
        "rate": total_rate, "duration": duration, "requests": nsent,
        "events": events,
        "busy_share": split[busy],
        "busy_p50": ms(pct(lat[busy], 50)), "busy_p99": ms(pct(lat[busy], 99)),
        "busy_fail": fails[busy] / max(1, sent[busy]),
        "others_p99": ms(pct(others, 99)),
        "others_fail": (sum(fails) - fails[busy]) / max(1, nsent - sent[busy]),
        "p50": ms(pct(allv, 50)), "p99": ms(pct(allv, 99)),
        "throughput": ok_window / duration,
        "ok": nok, "fail": sum(fails) / max(1, nsent),
        "inworker_queued": inworker_q / max(1, nsent),
        "refusals_per_req": refusals / max(1, nsent),
        "max_worker_queue": max_wq,
        "max_replica_queue": max(max_rq),
    }


# ---------------------------------------------------------------- output

def _f(v, spec="8.1f", width=None):
    if v is None:
        return "-"
    return format(v, spec).strip()


def row(r, show_scale=True):
    adm = "exact" if r["exact"] else "queue"
    ttl = f"{r['ttl'] * 1e3:g} ms" if r["policy"] == "dynamic" else "-"
    cells = [f"{r['P']}x{r['W']}" if show_scale else "", r["policy"],
             adm if r["policy"] != "single" else "-", ttl,
             _f(r["busy_p50"], ".1f"), _f(r["busy_p99"], ".1f"),
             _f(r["others_p99"], ".1f"), _f(r["p99"], ".1f"),
             f"{r['throughput']:.0f} / {r['rate']:.0f}",
             _f(100 * r["busy_fail"], ".2f"), _f(100 * r["fail"], ".2f"),
             _f(100 * r["inworker_queued"], ".1f"), str(r["max_worker_queue"]),
             _f(r["refusals_per_req"], ".3f")]
    return "| " + " | ".join(cells) + " |"


HEAD = ("| P×W | policy | admission | TTL | busy p50 | busy p99 | others p99 | all p99 "
        "| ok/s / offered | busy fail % | all fail % | queued in worker % | max worker queue "
        "| refusals/req |\n|---|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|")


def run(args, P, W, split_text, policy, exact, ttl, requests=None, quiet=False):
    service = parse_service(args.service)
    split = parse_split(split_text, P)
    rate = args.load * W * args.threads / service[1]
    n = requests or args.requests
    duration = args.duration or max(args.min_duration, n / rate)
    t0 = time.time()
    r = simulate(P, W, args.threads, args.load, split, service, policy, ttl, exact,
                 args.hc_interval, args.seed, duration, args.warmup, rtt=args.rtt / 1e3,
                 qdepth=args.queue_depth, qtimeout=args.queue_timeout,
                 worker_queue=args.worker_queue, arrivals=args.arrivals,
                 ceil_refusal=args.ceil_refusal)
    r["wall"] = time.time() - t0
    r["split"] = split_text
    if not quiet:
        print(f"  [{P}x{W} {policy} {'exact' if exact else 'queue'}"
              f"{' ttl=%gms' % (ttl * 1e3) if policy == 'dynamic' else ''}: "
              f"{r['requests']} requests in {duration:.1f} s simulated, {r['events']} events, "
              f"{r['wall']:.1f} s wall]", file=sys.stderr, flush=True)
    return r


def preamble(args, extra=""):
    service = parse_service(args.service)
    print(f"sharesim: T={args.threads} threads/worker, load {args.load:.0%} of W*T/mean service, "
          f"service {service[2]} (mean {service[1] * 1e3:.1f} ms), {args.arrivals} arrivals, "
          f"rtt {args.rtt} ms, hc every {args.hc_interval:g} s, replica queue "
          f"{args.queue_depth} / {args.queue_timeout:g} s, worker queue {args.worker_queue} "
          f"(when not exact), ceil refusal -> {args.ceil_refusal}, seed {args.seed}, "
          f"warm-up {args.warmup:g} s{extra}")
    print("latencies in ms (successful requests, arrival at the replica to response back); "
          "'busy' = the replica with the largest share, 'others' = all other replicas pooled; "
          "fail = 503 (replica queue full or timed out, or a refusal passed on); "
          "admission exact = worker refuses when all threads are busy (--queue 0), "
          "queue = it queues inside (FIFO)")
    print()


def table(args):
    scales = [(3, 2, "70,15,15"), (10, 20, "hot:0.3"), (100, 1000, "hot:0.3")]
    if args.scales:
        scales = []
        for item in args.scales.split(";"):
            pw, sp = item.split("=") if "=" in item else (item, "hot:0.3")
            p, w = pw.lower().split("x")
            scales.append((int(p), int(w), sp))
    ttl = args.ttl_list[0]
    preamble(args, f", dynamic TTL {ttl * 1e3:g} ms")
    print(f"## Policies at {args.load:.0%} load, dynamic TTL {ttl * 1e3:g} ms, uneven traffic "
          f"(3x2: 70/15/15; larger: hot:0.3 = one replica 30 %, the rest equal)")
    print()
    print(HEAD)
    for P, W, sp in scales:
        big = P * W > 5000
        reqs = args.big_requests if big else None
        for policy in POLICIES:
            for exact in ((True,) if policy == "single" else (True, False)):
                r = run(args, P, W, sp, policy, exact, ttl, requests=reqs)
                print(row(r), flush=True)
    print()
    sweep = SWEEP if len(args.ttl_list) == 1 else args.ttl_list
    print(f"## TTL sweep, dynamic, hc every {args.hc_interval:g} s, service {args.service} ms")
    print()
    print(HEAD)
    for P, W, sp in scales[:2]:
        print(row(run(args, P, W, sp, "single", True, 0)), flush=True)
        for exact in (True, False):
            for t in sweep:
                r = run(args, P, W, sp, "dynamic", exact, t)
                print(row(r), flush=True)
    print()
    if args.service != MIX:
        args.service = MIX
        print(f"## TTL sweep, dynamic, exact admission, service mix {MIX} ms (as bench/threaded.sh)")
        print()
        print(HEAD)
        for P, W, sp in scales[:2]:
            print(row(run(args, P, W, sp, "single", True, 0)), flush=True)
            for t in sweep:
                print(row(run(args, P, W, sp, "dynamic", True, t)), flush=True)
        print()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("-P", "--replicas", type=int, default=3)
    ap.add_argument("-W", "--workers", type=int, default=2)
    ap.add_argument("-T", "--threads", type=int, default=4)
    ap.add_argument("--load", type=float, default=0.8, help="fraction of W*T/mean service (0.8)")
    ap.add_argument("--split", default=None,
                    help="traffic split: 70,15,15 | equal | hot:0.3 | zipf:1 "
                         "(default 70,15,15 for P=3, hot:0.3 otherwise)")
    ap.add_argument("--service", default="50", help="ms: 50 | exp:50 | 90:10,10:200 (50)")
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument("--ttl", default="0.02", help="seconds, comma-separated for a sweep (0.02)")
    ap.add_argument("--exact", default="on", choices=("on", "off", "both"),
                    help="exact admission (usher-worker --queue 0): on | off | both")
    ap.add_argument("--hc-interval", type=float, default=1.0, help="seconds; 0 = no checks")
    ap.add_argument("--rtt", type=float, default=0.2, help="loopback round trip, ms (0.2)")
    ap.add_argument("--arrivals", choices=("poisson", "uniform"), default="poisson")
    ap.add_argument("--requests", type=int, default=200_000,
                    help="measured requests to simulate (sets the duration) (200000)")
    ap.add_argument("--big-requests", type=int, default=250_000,
                    help="--table: requests for scales with P*W > 5000 (250000)")
    ap.add_argument("--duration", type=float, default=None, help="measured seconds (overrides --requests)")
    ap.add_argument("--min-duration", type=float, default=3.0)
    ap.add_argument("--warmup", type=float, default=3.0, help="seconds not measured (3)")
    ap.add_argument("--queue-depth", type=int, default=1024)
    ap.add_argument("--queue-timeout", type=float, default=5.0)
    ap.add_argument("--worker-queue", type=int, default=1024,
                    help="worker queue limit without exact admission (1024)")
    ap.add_argument("--ceil-refusal", choices=("fail", "requeue"), default="fail",
                    help="ceil: a refusal is passed on as 503 (today's proxy) or requeued")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--table", action="store_true", help="the issue's table and the TTL sweep")
    ap.add_argument("--scales", default=None,
                    help="--table: 'PxW=split;...' instead of 3x2, 10x20, 100x1000")
    ap.add_argument("--json", action="store_true", help="one JSON object per run instead")
    args = ap.parse_args(argv)
    args.ttl_list = [float(x) for x in args.ttl.split(",")]
    if args.table:
        table(args)
        return
    P, W = args.replicas, args.workers
    split = args.split or ("70,15,15" if P == 3 else "hot:0.3")
    exacts = {"on": (True,), "off": (False,), "both": (True, False)}[args.exact]
    results = []
    for policy in args.policies.split(","):
        if policy not in POLICIES:
            sys.exit(f"unknown policy {policy!r}")
        for exact in exacts if policy != "single" else exacts[:1]:
            for ttl in args.ttl_list if policy == "dynamic" else args.ttl_list[:1]:
                results.append(run(args, P, W, split, policy, exact, ttl))
    if args.json:
        import json
        for r in results:
            print(json.dumps(r))
        return
    preamble(args)
    print(f"split {split}")
    print()
    print(HEAD)
    for r in results:
        print(row(r))


if __name__ == "__main__":
    main()
