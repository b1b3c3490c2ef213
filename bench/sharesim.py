#!/usr/bin/env python3
"""sharesim.py: a discrete-event simulation of P Usher replicas sharing W threaded
workers of T threads each (issue 14). Python 3 standard library only.

    bench/sharesim.py                              # 3 x 2, 70/15/15, 80 %, all policies
    bench/sharesim.py -P 10 -W 20 --split hot:0.3 --policies dynamic --ttl 0.1,0.3
    bench/sharesim.py --service 90:10,10:200 --exact off
    bench/sharesim.py --table                      # the policy table at 3 scales
    bench/sharesim.py --table --ttl-sweep          # ... and the TTL sweep (dynamic-v0)
    bench/sharesim.py --sweeps                     # hold x backoff sweeps, overload case
    bench/sharesim.py --policies dynamic --hold 0.02,0.1 --backoff 0.002,0.01

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
    static   floor(T/P) + 1 for the T mod P replica indices from an offset
             per worker (share.rs static_share): --offset rotate (offset
             -w mod P, i.e. (i + w) mod P < T mod P: even) or fnv (share.rs
             stable_hash of "127.0.0.1:<20000+w>" mod P, as Usher does with
             the backend's key: offsets may coincide). Sums to T per worker.
    dynamic-v0  the scheme before contention yield: T - others while the
             replica's last record from w is younger than --ttl, else the
             static share. A response from w to i carries busy (excluding
             that request) and queued; i stores others = busy + queued -
             (mine - 1), mine counted at receipt including the answered
             request. An active health check every --hc-interval gives
             others = busy + queued - mine (the checks of one replica are
             spread over the interval in 10 groups of workers). A refusal
             records others = T - (mine - 1) for --ttl and puts the request
             back at the head of the queue (not a failure).
    dynamic  what backend.rs does now (REPORT_TTL --ttl, CONTENTION_HOLD
             --hold, REFUSAL_BACKOFF --backoff): as dynamic-v0, plus
             - every report (response or health check) carries the worker's
               cumulative refused count; if it grew since i's previous report
               from w (and that one was not 0: note_load's `seen != 0`), or
               queued > 0, i marks w contended for --hold (each sign renews);
               while contended and the record fresh, cap = min(T - others,
               static share); stale: the static share. The end of a hold
               changes the cap but does not wake the queue (the Rust waker
               does not know that deadline; --hold-end-wake to wake it);
             - a refusal records others = T - (mine - 1) for --backoff, not
               --ttl, and the queue is re-examined when it ends;
             --hold 0 turns the yield off (backoff only). --yield claims is
             an experiment, not Usher: a contended replica only leaves one
             thread per sign free (free - 1 - queued, not below min(free,
             static)); --signal within another: the worker counts only the
             refusals of requests within their sender's static share.
  static and dynamic requeue a refusal at the head (a request refused
  --max-refusals times, 64 as upstream/mod.rs MAX_REFUSALS, fails with 503);
  ceil fails it (see --ceil-refusal). When a record expires the replica
  re-examines its queue (the waker knows that deadline).

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
ARR, WARR, WDONE, RESP, HC, EXP, EXPB, CEND = range(8)
POLICIES = ("single", "ceil", "static", "dynamic-v0", "dynamic")
DYNAMIC = ("dynamic", "dynamic-v0")
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

def fnv1a(data):
    """share.rs stable_hash (FNV-1a 64)."""
    h = 0xcbf29ce484222325
    for b in data:
        h = ((h ^ b) * 0x100000001b3) & 0xFFFFFFFFFFFFFFFF
    return h


def simulate(P, W, T, rho, split, service, policy, ttl, exact, hc_interval,
             seed, duration, warmup, rtt=0.0002, qdepth=1024, qtimeout=5.0,
             worker_queue=1024, arrivals="poisson", ceil_refusal="fail",
             hold=0.1, backoff=0.01, offset="rotate", hold_end_wake=False,
             max_refusals=64, yield_mode="static", signal="all"):
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
        if offset == "rotate":
            offs = [(-w) % P for w in range(W)]
        else:  # share.rs: stable_hash of the backend's key "ip:port"
            offs = [fnv1a(f"127.0.0.1:{20000 + w}".encode()) % P for w in range(W)]
        # share.rs static_share: slot = (index - offset) mod P < T mod P
        static = [[base + (1 if (i - offs[w]) % P < extra else 0) for w in range(W)]
                  for i in range(P)]
    dynamic = policy in DYNAMIC
    v1 = policy == "dynamic"       # contention yield + refusal backoff
    rttl = backoff if v1 else ttl  # how long a refusal record stands
    cap = [row[:] for row in static]
    mine = [[0] * W for _ in range(nrep)]
    rver = [[0] * W for _ in range(nrep)]     # version of the live report, 0 = none
    oth = [[0] * W for _ in range(nrep)]      # others at the live report
    cont = [[-1.0] * W for _ in range(nrep)]  # contended until (dynamic)
    cver = [[0] * W for _ in range(nrep)]
    claim = [[0] * W for _ in range(nrep)]    # --yield claims: threads others wanted
    claims_yield = yield_mode == "claims"
    seen = [[0] * W for _ in range(nrep)]     # worker's refused count at the last report
    wref = [0] * W                            # worker's cumulative refusals
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
    marks = 0
    limit_fails = 0
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

    def report_cap(i, w, others, now):
        """backend.rs full_capacity with a fresh record of `others`."""
        free = T - others if others > 0 else T
        if v1 and cont[i][w] >= now:
            st = static[i][w]
            if claims_yield:
                # experimental: leave the claimed threads free, not all the
                # borrowed ones; never below min(free, static)
                c = free - claim[i][w]
                lo = st if st < free else free
                return c if c > lo else lo
            if st < free:
                return st
        return free

    def note_contention(i, w, queued, refc, now):
        """backend.rs note_load: refusals grew (and the last count was not 0,
        as the Rust code has it) or requests queue inside -> contended."""
        nonlocal seq, marks
        s0 = seen[i][w]
        seen[i][w] = refc
        if hold > 0 and (queued > 0 or (refc > s0 and s0 != 0)):
            claim[i][w] = queued + (1 if refc > s0 and s0 != 0 else 0)
            cont[i][w] = now + hold
            cver[i][w] += 1
            marks += 1
            seq += 1
            push(heap, (now + hold, seq, CEND, i, None, w, cver[i][w]))

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
            req = [i, now, measured, False, 0, 0]
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
                # signal "within": the worker only counts refusals of requests
                # within the sender's static share (an experiment: the sender
                # would have to say so, e.g. in a header)
                if signal == "all" or (policy != "single" and mine[req[0]][w] <= static[req[0]][w]):
                    wref[w] += 1
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
            req[4] = wref[w]
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
                        # others = T - (mine - 1), for rttl (v1: REFUSAL_BACKOFF)
                        oth[i][w] = T - (mi - 1)
                        nc = report_cap(i, w, oth[i][w], now)
                        ver += 1
                        rver[i][w] = ver
                        seq += 1
                        push(heap, (now + rttl, seq, EXP, i, None, w, ver))
                    setstate(i, w, mi - 1, nc)
                    req[5] += 1
                    if max_refusals and req[5] >= max_refusals:
                        # upstream/mod.rs MAX_REFUSALS: answered 503
                        if req[2]:
                            fails[i] += 1
                            limit_fails += 1
                    else:
                        queues[i].appendleft(req)
                dispatch(i, now)
            else:
                nc = cap[i][w]
                if dynamic:
                    if v1:
                        note_contention(i, w, y, req[4], now)
                    others = x + y - (mi - 1)
                    oth[i][w] = others
                    nc = report_cap(i, w, others, now)
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
                if v1:
                    note_contention(i, w, len(wq[w]), wref[w], now)
                others = wbusy[w] + len(wq[w]) - mi_[w]
                oth[i][w] = others
                nc = report_cap(i, w, others, now)
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
        elif kind == CEND:
            # The hold ends. Rust computes capacity when it looks and its
            # waker does not know this deadline: the cap changes now, queued
            # requests go at the next event (unless --hold-end-wake).
            i, w, v = a, x, y
            if cver[i][w] == v:
                cont[i][w] = -1.0
            if cver[i][w] == v and rver[i][w]:
                nc = report_cap(i, w, oth[i][w], now)
                if nc != cap[i][w]:
                    setstate(i, w, mine[i][w], nc)
                    if hold_end_wake:
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
        "hold": hold, "backoff": backoff, "offset": offset, "yield": yield_mode,
        "holds_per_req": marks / max(1, nsent),
        "refusal_limit_fail": limit_fails / max(1, nsent),
        "others_p50": ms(pct(others, 50)),
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


def timing(r):
    """TTL / hold / backoff of a dynamic run, in ms."""
    if r["policy"] == "dynamic":
        return f"{r['ttl'] * 1e3:g}/{r['hold'] * 1e3:g}/{r['backoff'] * 1e3:g}"
    if r["policy"] == "dynamic-v0":
        return f"{r['ttl'] * 1e3:g}"
    return "-"


def row(r, show_scale=True):
    adm = "exact" if r["exact"] else "queue"
    cells = [f"{r['P']}x{r['W']}" if show_scale else "", r["policy"],
             adm if r["policy"] != "single" else "-", timing(r),
             _f(r["busy_p50"], ".1f"), _f(r["busy_p99"], ".1f"),
             _f(r["others_p50"], ".1f"), _f(r["others_p99"], ".1f"), _f(r["p99"], ".1f"),
             f"{r['throughput']:.0f} / {r['rate']:.0f}",
             _f(100 * r["busy_fail"], ".2f"), _f(100 * r["others_fail"], ".2f"),
             _f(100 * r["fail"], ".2f"),
             _f(100 * r["inworker_queued"], ".1f"), str(r["max_worker_queue"]),
             _f(r["refusals_per_req"], ".3f"), _f(100 * r["refusal_limit_fail"], ".2f"),
             _f(r["holds_per_req"], ".3f") if r["policy"] == "dynamic" else "-"]
    return "| " + " | ".join(cells) + " |"


HEAD = ("| P×W | policy | admission | TTL/hold/backoff ms | busy p50 | busy p99 | others p50 "
        "| others p99 | all p99 | ok/s / offered | busy fail % | others fail % | all fail % "
        "| queued in worker % | max worker queue | refusals/req | fail at 64 refusals % "
        "| holds/req |\n"
        "|---|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|")


def run(args, P, W, split_text, policy, exact, ttl, requests=None, quiet=False,
        hold=None, backoff=None, load=None):
    service = parse_service(args.service)
    split = parse_split(split_text, P)
    hold = args.hold_list[0] if hold is None else hold
    backoff = args.backoff_list[0] if backoff is None else backoff
    load = args.load if load is None else load
    rate = load * W * args.threads / service[1]
    n = requests or args.requests
    duration = args.duration or max(args.min_duration, n / rate)
    t0 = time.time()
    r = simulate(P, W, args.threads, load, split, service, policy, ttl, exact,
                 args.hc_interval, args.seed, duration, args.warmup, rtt=args.rtt / 1e3,
                 qdepth=args.queue_depth, qtimeout=args.queue_timeout,
                 worker_queue=args.worker_queue, arrivals=args.arrivals,
                 ceil_refusal=args.ceil_refusal, hold=hold, backoff=backoff,
                 offset=args.offset, hold_end_wake=args.hold_end_wake,
                 max_refusals=args.max_refusals, yield_mode=args.yield_mode,
                 signal=args.signal)
    r["wall"] = time.time() - t0
    r["split"] = split_text
    r["service"] = args.service
    if not quiet:
        print(f"  [{P}x{W} {policy} {'exact' if exact else 'queue'} {timing(r)} "
              f"load {load:g} {args.service}: "
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
          f"warm-up {args.warmup:g} s, static offset {args.offset}"
          f"{', hold-end wake' if args.hold_end_wake else ''}{extra}")
    print("latencies in ms (successful requests, arrival at the replica to response back); "
          "'busy' = the replica with the largest share, 'others' = all other replicas pooled; "
          "fail = 503 (replica queue full or timed out, or a refusal passed on); "
          "admission exact = worker refuses when all threads are busy (--queue 0), "
          "queue = it queues inside (FIFO); TTL/hold/backoff = REPORT_TTL / "
          "CONTENTION_HOLD / REFUSAL_BACKOFF of `dynamic` (dynamic-v0: TTL only, a refusal "
          "record lasts the TTL, no contention yield); holds/req = contention marks "
          "(a report showing grown refusals or queued > 0) per request")
    print()


def parse_scales(args):
    scales = [(3, 2, "70,15,15"), (10, 20, "hot:0.3"), (100, 1000, "hot:0.3")]
    if args.scales:
        scales = []
        for item in args.scales.split(";"):
            pw, sp = item.split("=") if "=" in item else (item, "hot:0.3")
            p, w = pw.lower().split("x")
            scales.append((int(p), int(w), sp))
    return scales


def table(args):
    scales = parse_scales(args)
    ttl, hold, bo = args.ttl_list[0], args.hold_list[0], args.backoff_list[0]
    preamble(args, f", dynamic TTL {ttl * 1e3:g} ms, hold {hold * 1e3:g} ms, "
                   f"backoff {bo * 1e3:g} ms")
    print(f"## Policies at {args.load:.0%} load, uneven traffic "
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
    if args.ttl_sweep:
        ttl_sweep(args, scales)


def ttl_sweep(args, scales, policies=("dynamic-v0",)):
    sweep = SWEEP if len(args.ttl_list) == 1 else args.ttl_list
    service = args.service
    print(f"## TTL sweep, {', '.join(policies)}, hc every {args.hc_interval:g} s, service {service} ms")
    print()
    print(HEAD)
    for P, W, sp in scales[:2]:
        print(row(run(args, P, W, sp, "single", True, 0)), flush=True)
        for exact in (True, False):
            for pol in policies:
                for t in sweep:
                    print(row(run(args, P, W, sp, pol, exact, t)), flush=True)
    print()
    if service != MIX:
        args.service = MIX
        print(f"## TTL sweep, {', '.join(policies)}, exact admission, service mix {MIX} ms")
        print()
        print(HEAD)
        for P, W, sp in scales[:2]:
            print(row(run(args, P, W, sp, "single", True, 0)), flush=True)
            for pol in policies:
                for t in sweep:
                    print(row(run(args, P, W, sp, pol, True, t)), flush=True)
        print()
        args.service = service


def sweeps(args):
    """CONTENTION_HOLD x REFUSAL_BACKOFF at 3x2 and 10x20 (exact), the same at
    3x2 with the 10/200 ms mix, and an overload case (3x2, 110 %)."""
    scales = parse_scales(args)[:2]
    ttl = args.ttl_list[0]
    holds = args.hold_list if len(args.hold_list) > 1 else [0.02, 0.1, 0.3]
    bos = args.backoff_list if len(args.backoff_list) > 1 else [0.002, 0.01, 0.03]
    preamble(args, f", dynamic TTL {ttl * 1e3:g} ms")
    service = args.service
    for svc, sc in ((service, scales), (MIX, scales[:1])):
        args.service = svc
        print(f"## CONTENTION_HOLD x REFUSAL_BACKOFF, exact admission, {args.load:.0%} load, "
              f"service {svc} ms, TTL {ttl * 1e3:g} ms (dynamic-v0 and single for reference)")
        print()
        print(HEAD)
        for P, W, sp in sc:
            print(row(run(args, P, W, sp, "single", True, 0)), flush=True)
            print(row(run(args, P, W, sp, "dynamic-v0", True, ttl)), flush=True)
            for h in [0.0] + holds:
                for b in bos:
                    print(row(run(args, P, W, sp, "dynamic", True, ttl, hold=h, backoff=b)),
                          flush=True)
            # The same with a wake when the hold ends (the Rust waker has none).
            wake, args.hold_end_wake = args.hold_end_wake, True
            r = run(args, P, W, sp, "dynamic", True, ttl, hold=holds[len(holds) // 2],
                    backoff=bos[len(bos) // 2])
            args.hold_end_wake = wake
            print(row(r).replace("| dynamic |", "| dynamic +hold-end wake |"), flush=True)
        print()
    args.service = service
    ov = args.overload
    P, W, sp = scales[0]
    print(f"## Overload: {P}x{W}, {ov:.0%} total load, split {sp}, service {service} ms, TTL "
          f"{ttl * 1e3:g} ms: do the quiet replicas keep their static share under a hog?")
    print()
    print(HEAD)
    for exact in (True, False):
        for pol in ("static", "dynamic-v0", "dynamic"):
            print(row(run(args, P, W, sp, pol, exact, ttl, load=ov)), flush=True)
        for h in (0.0, 0.02):
            print(row(run(args, P, W, sp, "dynamic", exact, ttl, load=ov, hold=h)), flush=True)
    print()
    claims_experiment(args)


def claims_experiment(args):
    """--yield claims (not in Usher) against the implemented static yield."""
    scales = parse_scales(args)[:2]
    ttl, bo = args.ttl_list[0], args.backoff_list[0]
    mode = args.yield_mode
    print(f"## Experiment (not implemented in Usher): --yield claims, a contended replica leaves "
          f"one thread per contention sign free instead of dropping to its static share; "
          f"exact admission, TTL {ttl * 1e3:g} ms, backoff {bo * 1e3:g} ms")
    print()
    print(HEAD.replace("| policy |", "| policy, yield |"))
    cases = [(P, W, sp, args.load) for P, W, sp in scales] + [scales[0] + (args.overload,)]
    for P, W, sp, load in cases:
        for y, h in (("static", 0.1), ("claims", 0.02), ("claims", 0.1)):
            args.yield_mode = y
            r = run(args, P, W, sp, "dynamic", True, ttl, hold=h, load=load)
            print(row(r).replace("| dynamic |", f"| dynamic, {y}, load {load:.0%} |"), flush=True)
    args.yield_mode = mode
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
    ap.add_argument("--ttl", default="0.02", help="REPORT_TTL, seconds, comma-separated for a sweep (0.02)")
    ap.add_argument("--hold", default="0.1",
                    help="CONTENTION_HOLD of `dynamic`, seconds, comma-separated for a sweep (0.1)")
    ap.add_argument("--backoff", default="0.01",
                    help="REFUSAL_BACKOFF of `dynamic`, seconds, comma-separated for a sweep (0.01)")
    ap.add_argument("--offset", choices=("rotate", "fnv"), default="rotate",
                    help="static split's remainder offset per worker: rotate (w mod P, even) "
                         "or fnv (share.rs stable_hash of 127.0.0.1:<20000+w>, may coincide)")
    ap.add_argument("--yield", dest="yield_mode", choices=("static", "claims"), default="static",
                    help="dynamic, while contended: cap at the static share (static, as "
                         "backend.rs) or only leave the claimed threads free (claims: "
                         "free - (refusals grown + queued), not below min(free, static); "
                         "an experiment, not implemented in Usher)")
    ap.add_argument("--signal", choices=("all", "within"), default="all",
                    help="dynamic: which refusals grow the worker's count: all (usher-worker) or "
                         "within (only those of requests within the sender's static share; an "
                         "experiment, the sender would have to mark them)")
    ap.add_argument("--hold-end-wake", action="store_true",
                    help="re-examine the queue when a contention hold ends (Rust does not)")
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
    ap.add_argument("--max-refusals", type=int, default=64,
                    help="a request refused this often is answered 503 (upstream/mod.rs "
                         "MAX_REFUSALS; 0 = never) (64)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--table", action="store_true", help="the policy table (3 scales)")
    ap.add_argument("--ttl-sweep", action="store_true", help="--table: and the TTL sweep (dynamic-v0)")
    ap.add_argument("--sweeps", action="store_true",
                    help="hold x backoff sweeps (3x2, 10x20, 3x2 mix) and the overload case")
    ap.add_argument("--claims-only", action="store_true",
                    help="only the --sweeps section on the experimental --yield claims")
    ap.add_argument("--overload", type=float, default=1.1, help="--sweeps: load of the overload case (1.1)")
    ap.add_argument("--scales", default=None,
                    help="--table: 'PxW=split;...' instead of 3x2, 10x20, 100x1000")
    ap.add_argument("--json", action="store_true", help="one JSON object per run instead")
    args = ap.parse_args(argv)
    args.ttl_list = [float(x) for x in args.ttl.split(",")]
    args.hold_list = [float(x) for x in args.hold.split(",")]
    args.backoff_list = [float(x) for x in args.backoff.split(",")]
    if args.table:
        table(args)
        return
    if args.sweeps:
        sweeps(args)
        return
    if args.claims_only:
        claims_experiment(args)
        return
    P, W = args.replicas, args.workers
    split = args.split or ("70,15,15" if P == 3 else "hot:0.3")
    exacts = {"on": (True,), "off": (False,), "both": (True, False)}[args.exact]
    results = []
    for policy in args.policies.split(","):
        if policy not in POLICIES:
            sys.exit(f"unknown policy {policy!r}")
        for exact in exacts if policy != "single" else exacts[:1]:
            for ttl in args.ttl_list if policy in DYNAMIC else args.ttl_list[:1]:
                if policy != "dynamic":
                    results.append(run(args, P, W, split, policy, exact, ttl))
                    continue
                for h in args.hold_list:
                    for b in args.backoff_list:
                        results.append(run(args, P, W, split, policy, exact, ttl,
                                           hold=h, backoff=b))
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
