#!/usr/bin/env python3
"""Charts from the JSON lines that bench/threaded.sh and bench/overhead.sh write
with RESULTS_OUT=FILE (bench/charts.sh runs both, then this).

    bench/plot.py [--out-dir DIR] [--svg] [--note TEXT]... FILE...

Each FILE is recognised by its fields (the {"meta": ...} line if there is one,
else the rows): threaded.sh rows carry a usher-load "report", overhead.sh rows
carry "rps" and "proxy_us_per_req". Writes, in DIR (default docs/img):

    bench-threaded.png   short-request p50 and p99 (ms, log) against offered load
                         (fraction of capacity), one line per target; runs with
                         503s or other failures are ringed and labelled
    bench-overhead.png   proxy CPU us per request and requests/s, one bar per row

--svg writes an .svg next to each .png; --note TEXT adds a red line under the
footnotes (bench/charts.sh notes builds that ran during the measurement). Needs matplotlib (pip install
matplotlib); nothing in test.sh uses this.
"""

import argparse
import datetime
import json
import os
import re
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import median  # noqa: E402  (bench/ is not a package)

try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
except ImportError:
    sys.exit("plot.py needs matplotlib: python3 -m pip install matplotlib")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# One colour per proxy family (the same in both charts), a line style per variant.
FAMILY_COLOR = {"usher": "#1f5fbf", "nginx": "#2e8b3e", "haproxy": "#d9661f",
                "direct": "#888888"}
STYLE = {
    "usher": dict(color="#1f5fbf", ls="-", marker="o"),
    "usher-fifo": dict(color="#6fa0e8", ls="--", marker="s"),
    "usher-sef": dict(color="#1f5fbf", ls=":", marker="o"),
    "usher-cap": dict(color="#6fa0e8", ls=":", marker="^"),
    "nginx": dict(color="#2e8b3e", ls="-", marker="^"),
    "haproxy": dict(color="#d9661f", ls="-", marker="D"),
    "direct": dict(color="#888888", ls=":", marker="x"),
}
LABEL = {
    "usher": "Usher, default config",
    "usher-fifo": "Usher, discipline: fifo",
    "usher-sef": "Usher, shortest-first by path+query (older one-path mix)",
    "usher-cap": "Usher, max_in_flight set to the threads",
    "nginx": "nginx least_conn",
    "haproxy": "HAProxy leastconn + maxconn 4 + queue",
    "direct": "direct to one worker (no proxy)",
}


def family(target):
    t = target.lower()
    for name in ("usher", "nginx", "haproxy", "direct"):
        if t.startswith(name):
            return name
    return None


def color_of(target):
    return FAMILY_COLOR.get(family(target), "#555555")


def read(path):
    meta, rows = {}, []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                sys.exit(f"{path}:{n}: not JSON: {e}")
            if "meta" in obj:
                meta = obj["meta"]
            else:
                rows.append(obj)
    return meta, rows


def kind(meta, rows):
    if meta.get("bench") in ("threaded", "overhead"):
        return meta["bench"]
    if any("report" in r for r in rows):
        return "threaded"
    if any("rps" in r or "proxy_us_per_req" in r for r in rows):
        return "overhead"
    if rows and all(r.get("unavailable") for r in rows):
        return "threaded" if any("load" in r for r in rows) else "overhead"
    return None


def git_head():
    try:
        return subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def provenance(meta, path):
    """'2026-11-25, commit abc1234' from the metadata (the measured commit), or
    the file's date and the current HEAD if the file has none."""
    if meta.get("started"):
        date = meta["started"][:10]
    else:
        date = datetime.date.fromtimestamp(os.path.getmtime(path)).isoformat()
    if meta.get("commit"):
        commit = meta["commit"] + (" + uncommitted changes" if meta.get("dirty") else "")
    else:
        commit = git_head() + " (HEAD when plotted; the data has no metadata)"
    text = f"{date}, commit {commit}"
    if meta.get("bin") and not meta["bin"].rstrip("/").endswith("target/release"):
        text += f";\nbinaries from {meta['bin']} (not target/release)"
    if meta.get("loadavg_start"):
        text += f"; load average {meta['loadavg_start'].split()[0]} at start"
        if meta.get("loadavg_end"):
            text += f", {meta['loadavg_end'].split()[0]} at end"
    return text


def mix_text(mix):
    """'90:/sleep?ms=10,10:/sleep?ms=200' -> '90% /sleep?ms=10 + 10% /sleep?ms=200'."""
    if not mix:
        return None
    items = [x.strip().split(":", 1) for x in mix.split(",") if ":" in x]
    total = sum(float(w) for w, _ in items) or 1.0
    return " + ".join(f"{float(w) * 100 / total:g}% {p}" for w, p in items)


def short_class(report):
    """The class with the smallest ms=N in its name (the short requests)."""
    classes = report.get("classes") or []
    if not classes:
        return None

    def ms(c):
        m = re.search(r"ms=(\d+(?:\.\d+)?)", c.get("name") or "")
        return float(m.group(1)) if m else float("inf")

    return min(classes, key=ms) if any(ms(c) != float("inf") for c in classes) else classes[0]


NOTES = []  # --note: warnings printed in red under the footnote of every chart


def frame(fig, title, foot, legend=None, plot_h=3.2, left=0.75, wspace=0.08):
    """Stacks, top to bottom: title, legend, the panels (plot_h inches high, with
    their titles), x labels, footnote; sizes the figure to fit. Fixed inches, so
    the text is the same size whatever the number of rows."""
    width = fig.get_size_inches()[0]
    title_h = 0.12 + 0.24 * (title.count("\n") + 1)
    legend_h = 0.0
    if legend:
        handles, texts, ncol = legend
        legend_h = 0.1 + 0.2 * -(-len(texts) // ncol)
    panel_title_h = 0.32 if any(ax.get_title() for ax in fig.axes) else 0.12
    xlabel_h = 0.55
    foot_lines = "\n".join(foot).count("\n") + 1
    foot_h = 0.1 + 0.15 * (foot_lines + len(NOTES))
    height = title_h + legend_h + panel_title_h + plot_h + xlabel_h + foot_h
    fig.set_size_inches(width, height)
    fig.suptitle(title, fontsize=11.5, y=1 - 0.08 / height, va="top")
    if legend:
        fig.legend(handles, texts, loc="upper center", ncol=ncol, fontsize=8.5,
                   frameon=False, bbox_to_anchor=(0.5, 1 - title_h / height))
    fig.subplots_adjust(top=1 - (title_h + legend_h + panel_title_h) / height,
                        bottom=(xlabel_h + foot_h) / height, left=left / width,
                        right=1 - 0.25 / width, wspace=wspace)
    if NOTES:
        fig.text(0.01, 0.06 / height, "\n".join(NOTES), fontsize=7.5, color="#c00000",
                 va="bottom", ha="left", linespacing=1.35)
    fig.text(0.01, (0.06 + 0.15 * len(NOTES)) / height, "\n".join(foot), fontsize=7.5,
             color="#555555", va="bottom", ha="left", linespacing=1.35)


def save(fig, out_dir, name, svg):
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, name + ".png")
    fig.savefig(path, dpi=130)
    written = [path]
    if svg:
        fig.savefig(os.path.join(out_dir, name + ".svg"))
        written.append(os.path.join(out_dir, name + ".svg"))
    plt.close(fig)
    for p in written:
        print(f"wrote {p}")


def plot_threaded(meta, rows, path, out_dir, svg):
    # threaded.sh writes one row per run and round (and the unloaded runs, skipped
    # here); a point is the median over the rounds. With several backends, one
    # line per target and backend.
    backends = list(dict.fromkeys(r.get("backend", "") for r in rows))
    runs, unavailable = {}, {}
    for r in rows:
        if r.get("unloaded"):
            continue
        t = r.get("target", "?")
        if len(backends) > 1:
            t = f"{t} ({r.get('backend', '?')})"
        if r.get("unavailable"):
            unavailable[t] = r.get("why", "")
            continue
        rep = r["report"]
        sc = short_class(rep)
        ov = rep.get("overall", {})
        s503 = ov.get("s503", 0)
        other = ov.get("non_2xx", 0) - s503 + ov.get("errors", {}).get("total", 0)
        runs.setdefault(t, {}).setdefault(r["load"], []).append(dict(
            p50=sc["latency_ms"].get("p50") if sc else None,
            p99=sc["latency_ms"].get("p99") if sc else None,
            s503=s503, other=other, sent=ov.get("sent") or 0))
    series = {t: {x: {k: median([v[k] for v in vs]) for k in ("p50", "p99", "s503", "other", "sent")}
                  for x, vs in pts.items()}
              for t, pts in runs.items()}
    if not series:
        sys.exit(f"{path}: no threaded.sh results to plot")

    fig, axes = plt.subplots(1, 2, figsize=(10, 5), sharey=True)
    loads = sorted({x for pts in series.values() for x in pts})
    labels = {}
    for t, pts in series.items():
        notes = []
        for x in sorted(pts):
            p = pts[x]
            for n, what in ((p["s503"], "503"), (p["other"], "failed")):
                if n:
                    share = 100.0 * n / p["sent"] if p["sent"] else 0.0
                    amount = f"{share:.1f}%" if share >= 0.1 else f"{n}"
                    notes.append(f"{amount} {what} at {x:.0%}")
        labels[t] = LABEL.get(t, t) + (f" — {', '.join(notes)}" if notes else "")
    failed_any = False
    for ax, key in ((axes[0], "p50"), (axes[1], "p99")):
        for t, pts in series.items():
            st = STYLE.get(t, dict(color=color_of(t), ls="-", marker="o"))
            xs = [x for x in sorted(pts) if pts[x][key] is not None]
            ax.plot(xs, [pts[x][key] for x in xs], label=labels[t], color=st["color"],
                    ls=st["ls"], marker=st["marker"], ms=5, lw=1.8)
            bad = [x for x in xs if pts[x]["s503"] + pts[x]["other"]]
            if bad:
                failed_any = True
                ax.plot(bad, [pts[x][key] for x in bad], ls="none", marker="o", ms=12,
                        mfc="none", mec="#c00000", mew=1.3)
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1, 2, 5)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.axvline(1.0, color="#999999", lw=1, ls=":")
        ax.text(1.0, 0.02, " capacity", transform=ax.get_xaxis_transform(), fontsize=8,
                color="#777777", va="bottom")
        ax.set_xticks(loads)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.0%}"))
        pad = max(0.02, (loads[-1] - loads[0]) * 0.08) if len(loads) > 1 else 0.05
        ax.set_xlim(min(loads[0], 1.0) - pad, max(loads[-1], 1.0) + pad)
        ax.set_xlabel("offered load (fraction of the workers' capacity)")
        ax.set_title(f"short requests, {key}", fontsize=11)
        ax.grid(True, which="major", alpha=0.3)
        ax.grid(True, which="minor", axis="y", alpha=0.1)
    axes[0].set_ylabel("latency, ms (log scale)")
    axes[1].tick_params(labelleft=True)

    handles, texts = axes[0].get_legend_handles_labels()
    for t, why in unavailable.items():
        if t not in series:
            handles.append(plt.Line2D([], [], color=color_of(t), ls="none", marker="x"))
            texts.append(f"{LABEL.get(t, t)}: not available")
    if failed_any:
        handles.append(plt.Line2D([], [], ls="none", marker="o", ms=10, mfc="none",
                                  mec="#c00000", mew=1.3))
        texts.append("run with 503s or failures (share of requests sent, in the legend)")

    setup = []
    if meta.get("workers") and meta.get("threads"):
        setup.append(f"{meta['workers']} {meta.get('backend', 'worker')} × {meta['threads']} threads")
    if mix_text(meta.get("mix")):
        setup.append(mix_text(meta.get("mix")))
    if meta.get("secs") is not None:
        setup.append(f"{meta['secs']} s per run")
    if meta.get("rounds"):
        setup.append(f"median of {meta['rounds']} rounds")
    title = ("bench/threaded.sh: short-request latency vs offered load"
             + (("\n" + ", ".join(setup)) if setup else ""))

    foot = []
    run = []
    if meta.get("secs") is not None:
        run.append(f"{meta['secs']} s measured per run after {meta.get('warmup_secs', '?')} s warm-up")
    if meta.get("capacity"):
        run.append(f"capacity {float(meta['capacity']):.0f} req/s")
    run.append("usher-load open loop at a fixed rate")
    foot.append("; ".join(run))
    foot.append("latency of the 2xx answers, from each request's scheduled send time "
                "(coordinated omission corrected)")
    foot.append(provenance(meta, path) + "; regenerate: bench/charts.sh")
    frame(fig, title, foot, legend=(handles, texts, 2), plot_h=3.3, wspace=0.12)
    save(fig, out_dir, "bench-threaded", svg)


def plot_overhead(meta, rows, path, out_dir, svg):
    avail = [r for r in rows if not r.get("unavailable")]
    missing = [r for r in rows if r.get("unavailable")]
    if not avail:
        sys.exit(f"{path}: no overhead.sh results to plot")
    names = [r["target"] for r in avail]
    ys = list(range(len(avail)))[::-1]
    colors = [color_of(n) for n in names]

    fig, (ax_cpu, ax_rps) = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    cpu = [r.get("proxy_us_per_req") for r in avail]
    ax_cpu.barh(ys, [v or 0 for v in cpu], color=colors, height=0.65)
    top = max([v for v in cpu if v] or [1])
    for y, v in zip(ys, cpu):
        ax_cpu.text((v or 0) + top * 0.01, y, f"{v:.1f}" if v else "no proxy",
                    va="center", fontsize=8.5, color="#333333" if v else "#888888")
    ax_cpu.set_xlim(0, top * 1.18)
    ax_cpu.set_xlabel("proxy CPU per request, µs (lower is better)")

    rps = [r.get("rps") for r in avail]
    ax_rps.barh(ys, [v or 0 for v in rps], color=colors, height=0.65)
    top = max([v for v in rps if v] or [1])
    for y, r in zip(ys, avail):
        v = r.get("rps")
        bad = (r.get("non_2xx") or 0) + (r.get("errors") or 0)
        label = f"{v:,.0f}" if v else "-"
        if bad:
            label += f"  ({bad} non-2xx/errors)"
        ax_rps.text((v or 0) + top * 0.01, y, label, va="center", fontsize=8.5,
                    color="#c00000" if bad else "#333333")
    ax_rps.set_xlim(0, top * 1.22)
    ax_rps.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v / 1000:g}k" if v else "0"))
    ax_rps.set_xlabel("requests/s on one proxy core (higher is better)")

    ax_cpu.set_yticks(ys)
    ax_cpu.set_yticklabels(["direct (no proxy)" if n == "direct" else n for n in names])
    for ax in (ax_cpu, ax_rps):
        ax.grid(True, axis="x", alpha=0.3)
        ax.set_axisbelow(True)
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)

    setup = []
    if meta.get("loadgen"):
        setup.append(f"{meta['loadgen']}, {meta.get('conns', '?')} connections closed loop, "
                     f"{meta.get('secs', '?')} s per row")
    if meta.get("backend"):
        setup.append(f"GET {meta.get('path', '?')} on one {meta['backend']} "
                     f"× {meta.get('backend_threads', '?')} threads")
    title = ("bench/overhead.sh: proxy cost per request"
             + (("\n" + "; ".join(setup)) if setup else ""))
    foot = [f"proxy pinned to cpu {meta.get('proxy_cpu', 0)} (Usher's tokio runtime too), load "
            f"generator to cpu {meta.get('load_cpu', 1)}; CPU = utime+stime of the proxy's "
            "process tree / requests"]
    if missing:
        foot.append("not available: " + ", ".join(r["target"] for r in missing))
    foot.append(provenance(meta, path) + "; regenerate: bench/charts.sh")
    longest = max(len(n) for n in names + ["direct (no proxy)"])
    frame(fig, title, foot, plot_h=0.42 * len(avail) + 0.2, left=0.3 + 0.085 * longest)
    save(fig, out_dir, "bench-overhead", svg)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="+", metavar="FILE")
    ap.add_argument("--out-dir", default=os.path.join(REPO, "docs", "img"))
    ap.add_argument("--svg", action="store_true", help="also write .svg")
    ap.add_argument("--note", action="append", default=[],
                    help="a warning to print in red under the footnote (repeatable)")
    args = ap.parse_args()
    NOTES.extend(args.note)
    for path in args.files:
        meta, rows = read(path)
        if meta.get("bench") not in (None, "threaded", "overhead"):
            # e.g. bench/gil.sh: a table (benchlib.py gil-table), no chart
            print(f"{path}: {meta['bench']} results have no chart; skipped", file=sys.stderr)
            continue
        k = kind(meta, rows)
        if k == "threaded":
            plot_threaded(meta, rows, path, args.out_dir, args.svg)
        elif k == "overhead":
            plot_overhead(meta, rows, path, args.out_dir, args.svg)
        else:
            sys.exit(f"{path}: neither threaded.sh nor overhead.sh results")


if __name__ == "__main__":
    main()
