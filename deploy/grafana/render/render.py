#!/usr/bin/env python3
"""Plots key panels of the Grafana dashboards as one PNG in Grafana's dark style.

The panels' titles, PromQL, legend formats, units, fill and overrides are read
from deploy/grafana/*.json; the data comes from a live Prometheus
(/api/v1/query_range). render.sh starts everything and calls this; to re-plot
saved data without a live run:

    render.py --prometheus 127.0.0.1:9090 --start T0 --end T1 --save-data d.json ...
    render.py --load-data d.json --out docs/img/dashboard.png

Grafana variables: `$__rate_interval` becomes --rate-interval (Grafana picks
4 x the scrape interval, 4s for the 1 s scrapes of render.sh; 5s is a little
smoother), every other variable (`$upstream`, `$backend`, `$instance`) the
match-all `.*`, as with "All" selected.

Plotting only (matplotlib); nothing in the tests or CI uses it.
"""

import argparse
import json
import math
import re
import sys
import urllib.parse
import urllib.request
from datetime import datetime
from pathlib import Path

# (dashboard file, panel titles): one cell each. A cell with two titles plots
# the second panel on a right-hand axis (its own unit) over the first.
CELLS = [
    ("usher.json", ["Requests by status code"]),
    ("usher.json", ["Request duration p50 / p90 / p99"]),
    ("usher.json", ["Queue depth", "Queue wait p50 / p99"]),
    ("usher.json", ["In-flight vs capacity"]),
    ("usher.json", ["Backend up"]),
    ("usher-worker.json", ["Busy vs total threads (fleet)"]),
]
COLS, ROWS = 3, 2

# Grafana dark theme (v10) and its classic palette.
CANVAS = "#111217"
PANEL = "#181b1f"
BORDER = "#2a2d33"
TEXT = "#ccccdc"
TEXT_DIM = "#8e8e9e"
GRID = "#26292f"
ANNOTATION = "#5794f2"
CLASSIC = [
    "#7EB26D", "#EAB839", "#6ED0E0", "#EF843C", "#E24D42", "#1F78C1",
    "#BA43A9", "#705DA0", "#508642", "#CCA300", "#447EBC", "#C15C17",
]
NAMED = {"green": "#73BF69", "red": "#F2495C", "yellow": "#FADE2A",
         "blue": "#5794F2", "orange": "#FF9830", "purple": "#B877D9"}


# ------------------------------------------------------------------ dashboards

def find_panel(dashboard, title):
    def walk(panels):
        for p in panels or []:
            yield p
            yield from walk(p.get("panels"))
    for p in walk(dashboard.get("panels")):
        if p.get("title") == title:
            return p
    raise SystemExit(f"render.py: no panel titled {title!r}")


def substitute(expr, rate_interval):
    """Grafana variables -> runnable PromQL (see the module docstring)."""
    def repl(m):
        name = (m.group(1) or m.group(2)).split(":")[0]
        if name in ("__rate_interval", "__interval", "__range", "interval"):
            return rate_interval
        return ".*"
    return re.sub(r"\$\{([^}]*)\}|\$(\w+)", repl, expr)


def legend(fmt, metric):
    if not fmt:
        labels = ", ".join(f'{k}="{v}"' for k, v in sorted(metric.items()))
        return f"{metric.get('__name__', '')}{{{labels}}}"
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: metric.get(m.group(1), ""), fmt).strip()


# ------------------------------------------------------------------ Prometheus

def query_range(prom, expr, start, end, step):
    qs = urllib.parse.urlencode({"query": expr, "start": start, "end": end, "step": step})
    with urllib.request.urlopen(f"http://{prom}/api/v1/query_range?{qs}", timeout=30) as r:
        body = json.load(r)
    if body.get("status") != "success":
        raise SystemExit(f"render.py: query failed: {expr}: {body}")
    return body["data"]["result"]


def fetch(args):
    dashboards = {}
    cells = []
    for file, titles in CELLS:
        if file not in dashboards:
            dashboards[file] = json.loads((Path(args.dashboards) / file).read_text())
        panels = []
        for title in titles:
            p = find_panel(dashboards[file], title)
            series = []
            for t in p.get("targets", []):
                expr = substitute(t["expr"], args.rate_interval)
                for r in query_range(args.prometheus, expr, args.start, args.end, args.step):
                    series.append({
                        "name": legend(t.get("legendFormat", ""), r["metric"]),
                        "points": [[float(ts), float(v)] for ts, v in r["values"]],
                    })
            panels.append({"file": file, "title": title, "type": p.get("type"),
                           "fieldConfig": p.get("fieldConfig", {}),
                           "options": p.get("options", {}), "series": series})
        cells.append(panels)
    return {"start": args.start, "end": args.end, "cells": cells,
            "annotations": [a.split("=", 1) for a in args.annotate]}


# ------------------------------------------------------------------ units

def fmt_number(v):
    if v == 0:
        return "0"
    a = abs(v)
    for div, suffix in ((1e9, " Bil"), (1e6, " Mil"), (1e3, " K")):
        if a >= div:
            return f"{v / div:.3g}{suffix}"
    if a >= 100:
        return f"{v:.0f}"
    return f"{v:.3g}"


def fmt_unit(unit, v):
    if unit == "reqps":
        return f"{fmt_number(v)} req/s"
    if unit == "ops":
        return f"{fmt_number(v)} ops/s"
    if unit == "s":
        if v == 0:
            return "0 s"
        if abs(v) < 1e-3:
            return f"{v * 1e6:.3g} µs"
        if abs(v) < 1:
            return f"{v * 1e3:.3g} ms"
        return f"{v:.3g} s"
    if unit == "percentunit":
        return f"{v * 100:.3g}%"
    if unit == "bytes":
        for div, suffix in ((2**30, " GiB"), (2**20, " MiB"), (2**10, " KiB")):
            if abs(v) >= div:
                return f"{v / div:.3g}{suffix}"
        return f"{v:.0f} B"
    return fmt_number(v)


# ------------------------------------------------------------------ plotting

def override_props(field_config, name):
    """custom.* properties from `byRegexp` / `byName` overrides that match."""
    props = {}
    for o in field_config.get("overrides", []):
        m = o.get("matcher", {})
        hit = (m.get("id") == "byRegexp" and re.fullmatch(m.get("options", ""), name)) or \
              (m.get("id") == "byName" and m.get("options") == name)
        if hit:
            for p in o.get("properties", []):
                props[p["id"]] = p["value"]
    return props


def color_key(name):
    """Series of one backend/instance share a colour (its in-flight and its
    capacity), so the key is the legend minus a trailing word like `capacity`."""
    m = re.match(r"^(\S+:\d+(?: \([^)]*\))?)\s", name)
    return m.group(1) if m else name


def to_xy(points, t0):
    xs, ys = [], []
    for t, v in points:
        xs.append(t - t0)
        ys.append(v if math.isfinite(v) else float("nan"))
    return xs, ys


def break_gaps(xs, ys, step):
    """Inserts NaN where samples are missing, so lines do not span gaps."""
    out_x, out_y = [], []
    for i, (x, y) in enumerate(zip(xs, ys)):
        if i and x - xs[i - 1] > step * 1.5:
            out_x.append((x + xs[i - 1]) / 2)
            out_y.append(float("nan"))
        out_x.append(x)
        out_y.append(y)
    return out_x, out_y


def style_axes(ax, unit, side="left", integral=False):
    from matplotlib.ticker import FuncFormatter, MaxNLocator
    ax.set_facecolor(PANEL)
    for s in ax.spines.values():
        s.set_visible(False)
    ax.tick_params(colors=TEXT_DIM, labelsize=9, length=0, pad=4)
    if integral:  # counts: 0 2 4 6 8, not 0 2.5 5 7.5
        ax.yaxis.set_major_locator(MaxNLocator(nbins=6, steps=[1, 2, 5, 10], integer=True))
    else:
        ax.yaxis.set_major_locator(MaxNLocator(nbins=5, min_n_ticks=3))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _p: fmt_unit(unit, v)))
    if side == "left":
        ax.grid(True, color=GRID, linewidth=0.8)
        ax.set_axisbelow(True)


def time_axis(ax, t0, span, width_px):
    """Clock-aligned ticks, at least ~70 px apart as in Grafana, none so close
    to an edge that it collides with a y label or spills out of the panel."""
    from matplotlib.ticker import FixedLocator, FuncFormatter
    every = next(e for e in (5, 10, 15, 20, 30, 60, 120, 300, 600, 1e9)
                 if width_px * e / span >= 70)
    first = math.ceil(t0 / every) * every
    ticks = [t - t0 for t in range(int(first), int(t0 + span) + 1, int(every))]
    ax.set_xlim(0, span)
    ax.xaxis.set_major_locator(FixedLocator([x for x in ticks if span * 0.05 <= x <= span * 0.96]))
    ax.xaxis.set_major_formatter(FuncFormatter(
        lambda x, _p: datetime.fromtimestamp(t0 + x).strftime("%H:%M:%S")))


def annotate(ax, annotations, t0, span, labels=True):
    """Grafana-style annotation lines; labels that would overlap step down."""
    last_x, level = -1e9, 0
    for label, at in sorted(annotations, key=lambda a: float(a[1])):
        x = float(at) - t0
        level = level + 1 if x - last_x < span * 0.3 else 0
        last_x = x
        ax.axvline(x, color=ANNOTATION, linewidth=1, linestyle=(0, (4, 3)), zorder=5)
        if not labels:
            continue
        ax.text(x, 0.99 - 0.065 * level, " " + label, transform=ax.get_xaxis_transform(),
                color=ANNOTATION, fontsize=8, va="top", ha="left", zorder=6,
                bbox={"facecolor": PANEL, "edgecolor": "none", "pad": 0.5, "alpha": 0.85})


def draw_timeseries(ax, panel, t0, step, palette_start=0, colors=None):
    fc = panel["fieldConfig"].get("defaults", {})
    custom = fc.get("custom", {})
    unit = fc.get("unit", "short")
    handles = []
    ymax = 0.0
    integral = unit == "short"
    for i, s in enumerate(panel["series"]):
        props = override_props(panel["fieldConfig"], s["name"])
        key = color_key(s["name"])
        if colors is not None:
            color = colors.setdefault(key, CLASSIC[(len(colors) + palette_start) % len(CLASSIC)])
        else:
            color = CLASSIC[(i + palette_start) % len(CLASSIC)]
        xs, ys = break_gaps(*to_xy(s["points"], t0), step)
        dash = props.get("custom.lineStyle", custom.get("lineStyle", {}))
        width = props.get("custom.lineWidth", custom.get("lineWidth", 1)) * 1.4
        fill = props.get("custom.fillOpacity", custom.get("fillOpacity", 0))
        kw = {"color": color, "linewidth": width, "label": s["name"]}
        if dash.get("fill") == "dash":
            kw["dashes"] = [d / 3 for d in dash.get("dash", [10, 10])]
        (line,) = ax.plot(xs, ys, **kw)
        if fill:
            ax.fill_between(xs, ys, 0, color=color, alpha=fill / 100, linewidth=0)
        handles.append(line)
        finite = [y for y in ys if math.isfinite(y)]
        if finite:
            ymax = max(ymax, max(finite))
            integral = integral and all(y == int(y) for y in finite)
    lo = fc.get("min", None)
    ax.set_ylim(bottom=lo if lo is not None else None,
                top=(ymax * 1.3) if ymax > 0 else 1)  # room for annotation labels
    return handles, unit, integral


def draw_state_timeline(ax, panel, t0, span, step):
    from matplotlib.patches import Patch
    fc = panel["fieldConfig"].get("defaults", {})
    mapping = {}
    for m in fc.get("mappings", []):
        for value, o in m.get("options", {}).items():
            mapping[float(value)] = (o.get("text", value), NAMED.get(o.get("color"), o.get("color")))
    series = sorted(panel["series"], key=lambda s: s["name"])
    ax.set_facecolor(PANEL)
    for s in ax.spines.values():
        s.set_visible(False)
    ax.tick_params(colors=TEXT, labelsize=9, length=0, pad=6)
    height = panel["options"].get("rowHeight", 0.9)
    seen = {}
    for row, s in enumerate(series):
        y = len(series) - 1 - row
        segs = []  # merge equal consecutive values (mergeValues)
        for t, v in s["points"]:
            x = t - t0
            if segs and segs[-1][2] == v and x - segs[-1][1] <= step * 1.5:
                segs[-1][1] = x + step
            else:
                segs.append([x, x + step, v])
        for x0, x1, v in segs:
            text, color = mapping.get(v, (fmt_number(v), CLASSIC[0]))
            seen[text] = color
            ax.broken_barh([(x0, x1 - x0)], (y - height / 2, height),
                           facecolors=color, edgecolor=PANEL, linewidth=1.5, alpha=0.85)
            if x1 - x0 > span * 0.08:
                ax.text((x0 + x1) / 2, y, text, ha="center", va="center",
                        color="#111217", fontsize=9, fontweight="bold", zorder=7)
    ax.set_yticks(range(len(series)))
    ax.set_yticklabels([s["name"] for s in reversed(series)])
    ax.set_ylim(-0.5, len(series) - 0.5)
    return [Patch(color=c, label=t) for t, c in seen.items()]


def render(data, out, title, subtitle=""):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyBboxPatch

    W, H, DPI = 1800, 1000, 100
    fig = plt.figure(figsize=(W / DPI, H / DPI), dpi=DPI, facecolor=CANVAS)
    plt.rcParams["font.family"] = "DejaVu Sans"
    header, gap = 44, 8
    cw = (W - gap * (COLS + 1)) / COLS
    ch = (H - header - gap * (ROWS + 1)) / ROWS
    t0, t1 = data["start"], data["end"]
    span = t1 - t0
    step = data.get("step", 1)

    t = fig.text(gap / W, 1 - 22 / H, title, color=TEXT, fontsize=14, va="center", fontweight="bold")
    if subtitle:
        width = t.get_window_extent(fig.canvas.get_renderer()).width
        fig.text((gap + width + 14) / W, 1 - 22 / H, subtitle, color=TEXT_DIM, fontsize=10,
                 va="center")
    fig.text(1 - gap / W, 1 - 22 / H,
             f"{datetime.fromtimestamp(t0):%Y-%m-%d %H:%M:%S} to {datetime.fromtimestamp(t1):%H:%M:%S}"
             f"  ·  step {step:g}s",
             color=TEXT_DIM, fontsize=10, va="center", ha="right")

    def fx(px):
        return px / W

    def fy(px):  # px from the top
        return 1 - px / H

    for idx, panels in enumerate(data["cells"]):
        col, row = idx % COLS, idx // COLS
        x = gap + col * (cw + gap)
        y = header + gap + row * (ch + gap)
        fig.patches.append(FancyBboxPatch(
            (fx(x), fy(y + ch)), fx(cw), ch / H, boxstyle="round,pad=0,rounding_size=0.003",
            transform=fig.transFigure, facecolor=PANEL, edgecolor=BORDER, linewidth=1, zorder=-10))
        main = panels[0]
        cell_title = "  ·  ".join(p["title"] for p in panels)
        fig.text(fx(x + 10), fy(y + 16), cell_title, color=TEXT, fontsize=12, va="center")
        fig.text(fx(x + cw - 10), fy(y + 16), main["file"], color=TEXT_DIM, fontsize=8.5,
                 va="center", ha="right")

        if main["type"] == "state-timeline":
            names = [s["name"] for s in main["series"]]
            left = 14 + 6.6 * max((len(n) for n in names), default=4)
            ax = fig.add_axes([fx(x + left), fy(y + ch - 30), fx(cw - left - 16), (ch - 30 - 44) / H])
            handles = draw_state_timeline(ax, main, t0, span, step)
            time_axis(ax, t0, span, cw - left - 16)
            legend_rows = 1
        else:
            right = 70 if len(panels) > 1 else 16
            # legend rows: estimate how many entries fit per row
            names = [s["name"] for p in panels for s in p["series"]]
            entry = 34 + 6.4 * max((len(n) for n in names), default=4)
            ncol = max(1, min(len(names), int((cw - 20) // entry)))
            legend_rows = math.ceil(len(names) / ncol) if names else 0
            bottom = 30 + 19 * legend_rows
            ax = fig.add_axes([fx(x + 70), fy(y + ch - bottom), fx(cw - 70 - right),
                               (ch - bottom - 46) / H])
            colors = {} if main["title"] == "In-flight vs capacity" else None
            handles, unit, integral = draw_timeseries(ax, main, t0, step, colors=colors)
            style_axes(ax, unit, integral=integral)
            time_axis(ax, t0, span, cw - 70 - right)
            if len(panels) > 1:
                ax2 = ax.twinx()
                h2, unit2, integral2 = draw_timeseries(ax2, panels[1], t0, step,
                                                       palette_start=len(handles))
                style_axes(ax2, unit2, side="right", integral=integral2)
                time_axis(ax2, t0, span, cw - 70 - right)
                ax.set_ylabel(panels[0]["title"].lower(), color=TEXT_DIM, fontsize=9)
                ax2.set_ylabel(panels[1]["title"].split(" p")[0].lower(), color=TEXT_DIM, fontsize=9)
                handles += h2
            if not names:
                ax.text(0.5, 0.5, "No data", transform=ax.transAxes, ha="center",
                        va="center", color=TEXT_DIM, fontsize=14)
        annotate(ax, data.get("annotations", []), t0, span,
                 labels=main["type"] != "state-timeline")
        if handles:
            ncol = len(handles) if main["type"] == "state-timeline" else ncol
            fig.legend(handles=handles, loc="lower left",
                       bbox_to_anchor=(fx(x + 8), fy(y + ch - 4)), ncol=ncol, frameon=False,
                       fontsize=9, labelcolor=TEXT, handlelength=1.4, handletextpad=0.5,
                       columnspacing=1.4, borderaxespad=0, borderpad=0.2)

    fig.savefig(out, dpi=DPI, facecolor=CANVAS)
    plt.close(fig)
    try:  # palette PNG: a fraction of the size, same look
        from PIL import Image
        Image.open(out).convert("RGB").quantize(colors=128, method=Image.Quantize.MEDIANCUT) \
            .save(out, optimize=True)
    except ImportError:
        pass


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prometheus", help="HOST:PORT of the Prometheus to query")
    ap.add_argument("--start", type=float, help="range start (unix seconds)")
    ap.add_argument("--end", type=float, help="range end (unix seconds)")
    ap.add_argument("--step", type=float, default=1)
    ap.add_argument("--rate-interval", default="5s")
    ap.add_argument("--dashboards", default=str(Path(__file__).resolve().parent.parent))
    ap.add_argument("--alias", action="append", default=[], metavar="FROM=TO",
                    help="replace FROM with TO in legends (e.g. an address with a name)")
    ap.add_argument("--annotate", action="append", default=[], metavar="LABEL=UNIXTIME",
                    help="a vertical annotation line, as Grafana draws annotations")
    ap.add_argument("--title", default="Usher")
    ap.add_argument("--subtitle", default="", help="dimmed text after the title")
    ap.add_argument("--save-data", help="also write the fetched series to this JSON file")
    ap.add_argument("--load-data", help="plot this saved JSON instead of querying")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    if args.load_data:
        data = json.loads(Path(args.load_data).read_text())
    else:
        if not (args.prometheus and args.start and args.end):
            ap.error("--prometheus, --start and --end are required without --load-data")
        data = fetch(args)
        data["step"] = args.step
    for a in args.alias:
        src, dst = a.split("=", 1)
        for cell in data["cells"]:
            for p in cell:
                for s in p["series"]:
                    s["name"] = s["name"].replace(src, dst)
    if args.save_data:
        Path(args.save_data).write_text(json.dumps(data))
    empty = [p["title"] for cell in data["cells"] for p in cell if not p["series"]]
    if empty:
        print(f"render.py: warning: no data for {empty}", file=sys.stderr)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    render(data, args.out, args.title, args.subtitle)
    return 1 if empty else 0


if __name__ == "__main__":
    sys.exit(main())
