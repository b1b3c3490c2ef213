//! The HTML status page: `GET /` on the admin listener.
//!
//! One self-contained document (inline CSS and script, nothing fetched from
//! elsewhere) so it works through an SSH tunnel or on a host with no internet.
//! [`render`] draws it from the `/status` JSON, so the page reads without
//! JavaScript. The script then fetches the page itself again every 2 s
//! (relative to where it is, so it also works behind a proxy that mounts it
//! under a path) and moves the new facts into the DOM without reloading: the
//! markup has one author, `render`. Stable hooks for tests and scrapers: `<section data-upstream=NAME>` and
//! `<tr data-backend=ADDR data-state=STATE>`.
//!
//! Everything that comes from config or state is escaped.
//!
//! Big pages: the server writes one `String` in one pass (50 upstreams of 200
//! backends: about 2.5 MB). In the browser, laying out 10,000 rows takes
//! seconds, too long to repeat every 2 s, so sections off screen are not laid
//! out (`content-visibility: auto`, sized ahead by their row count), and a
//! refresh replaces what is inside each section but keeps the sections, and
//! with them the sizes the browser remembers.

use std::fmt::Write;

use serde_json::Value;

/// Renders the page from the `/status` document.
pub fn render(status: &Value) -> String {
    render_at(
        status,
        crate::observe::unix_ms(std::time::SystemTime::now()),
    )
}

/// The states a backend can be in, in the order the summary counts them.
const STATES: [&str; 4] = ["up", "draining", "ejected", "down"];

/// [`render`] with the clock given (UNIX ms), for tests.
fn render_at(status: &Value, now_ms: u64) -> String {
    let ups = status.get("upstreams").and_then(Value::as_object);
    let mut names: Vec<&String> = ups.map(|u| u.keys().collect()).unwrap_or_default();
    names.sort();
    let mut tally = [0u64; STATES.len()];
    let mut body = String::new();
    for name in &names {
        upstream(
            &mut body,
            name,
            &ups.unwrap()[name.as_str()],
            now_ms,
            &mut tally,
        );
    }
    let mut out = String::with_capacity(body.len() + 8192);
    out.push_str(HEAD);
    out.push_str("<body data-updates=\"0\"><header><h1>Usher <span class=v>");
    esc(&mut out, str_of(status, "version"));
    out.push_str("</span></h1><div id=top>");
    summary(&mut out, status, now_ms, &tally, names.len());
    let _ = write!(
        out,
        "</div><p id=conn>snapshot at {}</p></header><main id=ups>",
        clock(now_ms)
    );
    out.push_str(&body);
    out.push_str("</main><script>");
    out.push_str(SCRIPT);
    out.push_str("</script></body></html>\n");
    out
}

/// The header's facts: uptime, backend counts, draining, the last reload.
fn summary(out: &mut String, s: &Value, now_ms: u64, tally: &[u64], n_upstreams: usize) {
    let total: u64 = tally.iter().sum();
    let _ = write!(
        out,
        "<span class=kv>uptime <b>{}</b></span><span class=kv>{n_upstreams} upstreams · {total} backends:",
        dur(u64_of(s, "uptime_s"))
    );
    let counts: Vec<String> = STATES
        .iter()
        .zip(tally)
        .filter(|(_, n)| **n > 0)
        .map(|(st, n)| format!(" <b class=\"st {st}\">{n} {st}</b>"))
        .collect();
    out.push_str(&counts.join(","));
    out.push_str("</span>");
    if s.get("draining").and_then(Value::as_bool) == Some(true) {
        out.push_str("<span class=\"kv drain\">draining: shutting down</span>");
    }
    out.push_str("<span class=kv>last reload ");
    match s.get("reload").filter(|r| r.is_object()) {
        None => out.push_str("<b>none since start</b></span>"),
        Some(r) => {
            let ok = r.get("ok").and_then(Value::as_bool) == Some(true);
            let at = u64_of(r, "at_unix_ms");
            let _ = write!(
                out,
                "<b class={}>{}</b> at {} ({})</span>",
                if ok { "ok" } else { "no" },
                if ok { "ok" } else { "rejected" },
                clock(at),
                ago(now_ms, at)
            );
            let detail = str_of(r, "detail");
            if !detail.is_empty() {
                out.push_str("<pre class=rd>");
                esc(out, detail);
                out.push_str("</pre>");
            }
        }
    }
}

/// One upstream: its queue and a table of its backends.
fn upstream(out: &mut String, name: &str, u: &Value, now_ms: u64, tally: &mut [u64]) {
    let empty = Vec::new();
    let backends = u
        .get("backends")
        .and_then(Value::as_array)
        .unwrap_or(&empty);
    let fleet = backends
        .iter()
        .any(|b| b.get("fleet").is_some_and(Value::is_object));
    let mut mine = [0u64; STATES.len()];
    let mut rows = String::with_capacity(backends.len() * 256);
    for b in backends {
        row(&mut rows, b, now_ms, fleet);
        if let Some(i) = STATES.iter().position(|s| *s == str_of(b, "state")) {
            mine[i] += 1;
        }
    }
    for (t, m) in tally.iter_mut().zip(mine) {
        *t += m;
    }
    let q = u.get("queue").unwrap_or(&Value::Null);
    let (depth, max) = (u64_of(q, "depth"), u64_of(q, "max_depth"));
    out.push_str("<section data-upstream=\"");
    esc(out, name);
    let _ = write!(out, "\" style=\"--rows:{}\"><h2>", backends.len());
    esc(out, name);
    out.push_str(" <small>");
    esc(out, str_of(u, "balance"));
    out.push_str(" · ");
    esc(out, str_of(u, "discipline"));
    let _ = write!(
        out,
        "</small> <span class=\"cnt{}\">{}/{} up</span></h2><div class=q>queue {}{depth}/{max} · recent wait {}</div>",
        if (mine[0] as usize) < backends.len() { " no" } else { "" },
        mine[0],
        backends.len(),
        bar(depth, max),
        wait_ms(f64_of(q, "recent_wait_ms"))
    );
    out.push_str("<table><thead><tr><th>backend<th>state<th>in flight<th>last check<th>ejections");
    if fleet {
        out.push_str("<th>process");
    }
    out.push_str("</thead><tbody>");
    out.push_str(&rows);
    out.push_str("</tbody></table></section>");
}

/// One backend's row.
fn row(out: &mut String, b: &Value, now_ms: u64, fleet: bool) {
    let addr = str_of(b, "address");
    let (n, cap) = (u64_of(b, "in_flight"), u64_of(b, "capacity"));
    out.push_str("<tr data-backend=\"");
    esc(out, addr);
    out.push_str("\" data-state=\"");
    esc(out, str_of(b, "state"));
    out.push_str("\"><td class=a>");
    esc(out, addr);
    let weight = u64_of(b, "weight");
    if weight > 1 {
        let _ = write!(out, " <small>×{weight}</small>");
    }
    out.push_str("<td class=s>");
    esc(out, str_of(b, "state"));
    let _ = write!(out, "<td class=f>{}{n}/{cap}", bar(n, cap));
    // Say why when learning holds it below the threads (or is finding out).
    let learned = str_of(b, "learned");
    if !matches!(learned, "" | "off" | "learning" | "scales") {
        out.push_str(" · ");
        esc(out, learned);
    }
    let upgraded = u64_of(b, "upgraded");
    if upgraded > 0 {
        let _ = write!(out, " · {upgraded} upgraded");
    }
    match b.get("check").filter(|c| c.is_object()) {
        None => out.push_str("<td class=c>—"),
        Some(c) if c.get("ok").and_then(Value::as_bool) == Some(true) => {
            let _ = write!(
                out,
                "<td class=c>ok · {}",
                ago(now_ms, u64_of(c, "at_unix_ms"))
            );
        }
        Some(c) => {
            out.push_str("<td class=\"c no\">");
            esc(
                out,
                c.get("reason").and_then(Value::as_str).unwrap_or("failed"),
            );
            let _ = write!(out, " · {}", ago(now_ms, u64_of(c, "at_unix_ms")));
        }
    }
    let _ = write!(out, "<td class=e>{}", u64_of(b, "ejections"));
    if fleet {
        match b.get("fleet").filter(|f| f.is_object()) {
            None => out.push_str("<td class=p>—"),
            Some(f) => {
                let restarts = u64_of(f, "restarts");
                let _ = write!(
                    out,
                    "<td class=p>pid {} · {restarts} restart{} · up {}",
                    u64_of(f, "pid"),
                    if restarts == 1 { "" } else { "s" },
                    dur(u64_of(f, "uptime_s"))
                );
            }
        }
    }
    out.push_str("</tr>");
}

/// A bar of `n` out of `d`, marked `full` when there is no room left.
fn bar(n: u64, d: u64) -> String {
    format!(
        "<span class=\"bar{}\"><i style=\"width:{}%\"></i></span>",
        if d > 0 && n >= d { " full" } else { "" },
        pct(n, d)
    )
}

fn pct(n: u64, d: u64) -> u64 {
    n.saturating_mul(100)
        .checked_div(d)
        .map_or(0, |p| p.min(100))
}

/// `42s`, `5m 3s`, `2h 5m`, `3d 4h`: the two largest units.
fn dur(s: u64) -> String {
    let (d, h, m, s) = (s / 86400, s / 3600 % 24, s / 60 % 60, s % 60);
    if d > 0 {
        format!("{d}d {h}h")
    } else if h > 0 {
        format!("{h}h {m}m")
    } else if m > 0 {
        format!("{m}m {s}s")
    } else {
        format!("{s}s")
    }
}

/// How long before `now_ms` the moment `at_ms` was: `0.2s ago`, `5m 3s ago`.
fn ago(now_ms: u64, at_ms: u64) -> String {
    let d = now_ms.saturating_sub(at_ms);
    if d < 60_000 {
        format!("{:.1}s ago", d as f64 / 1000.0)
    } else {
        format!("{} ago", dur(d / 1000))
    }
}

/// The time of day of a UNIX ms instant, in UTC (the "ago" next to it
/// tells the day).
fn clock(ms: u64) -> String {
    let t = ms / 1000 % 86400;
    format!("{:02}:{:02}:{:02} UTC", t / 3600, t / 60 % 60, t % 60)
}

fn wait_ms(x: f64) -> String {
    if x < 10.0 {
        format!("{x:.1} ms")
    } else if x < 1000.0 {
        format!("{x:.0} ms")
    } else {
        format!("{:.1} s", x / 1000.0)
    }
}

fn u64_of(v: &Value, k: &str) -> u64 {
    v.get(k).and_then(Value::as_u64).unwrap_or(0)
}

fn f64_of(v: &Value, k: &str) -> f64 {
    v.get(k).and_then(Value::as_f64).unwrap_or(0.0)
}

fn str_of<'a>(v: &'a Value, k: &str) -> &'a str {
    v.get(k).and_then(Value::as_str).unwrap_or("")
}

/// Appends `s` escaped for HTML text and quoted attribute values.
fn esc(out: &mut String, s: &str) {
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
}

const HEAD: &str = r#"<!doctype html>
<html lang=en><head><meta charset=utf-8>
<meta name=viewport content="width=device-width, initial-scale=1">
<title>Usher status</title>
<style>
:root{--bg:#f6f7f9;--card:#fff;--fg:#1d2330;--mute:#6b7385;--line:#e3e6eb;--ok:#1a7f37;--warn:#b7791f;--bad:#c62828;--drain:#5b6bd6;--track:#e8ebf0;--fill:#3b82f6}
@media (prefers-color-scheme:dark){:root{--bg:#12151b;--card:#1b2029;--fg:#e6e9ef;--mute:#9aa3b5;--line:#2b323f;--ok:#4cc36b;--warn:#e0a43a;--bad:#f06262;--drain:#8f9bff;--track:#2b323f;--fill:#5b9bff}}
*{box-sizing:border-box}
body{margin:0;background:var(--bg);color:var(--fg);font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif}
header,main{max-width:1100px;margin:0 auto;padding:12px 16px}
header{padding-top:16px}
h1{margin:0 0 6px;font-size:20px}
h1 .v{font-size:13px;font-weight:normal;color:var(--mute)}
#top{display:flex;flex-wrap:wrap;gap:4px 18px;align-items:baseline}
.kv{color:var(--mute)}.kv b{color:var(--fg)}
.ok{color:var(--ok)!important}.no{color:var(--bad)!important}
.drain{color:var(--drain);font-weight:600}
pre.rd{flex-basis:100%;margin:2px 0 0;padding:6px 8px;background:var(--card);border:1px solid var(--line);border-radius:6px;font-size:12px;white-space:pre-wrap;max-height:7em;overflow:auto}
#conn{margin:6px 0 0;font-size:12px;color:var(--mute)}
section{content-visibility:auto;contain-intrinsic-size:auto calc(90px + var(--rows,10) * 26px);background:var(--card);border:1px solid var(--line);border-radius:8px;padding:10px 14px;margin:0 0 14px}
h2{margin:0;font-size:16px;display:flex;flex-wrap:wrap;gap:0 10px;align-items:baseline}
h2 small{font-size:12px;font-weight:normal;color:var(--mute)}
h2 .cnt{margin-left:auto;font-size:13px;font-weight:normal;color:var(--mute)}
.q{margin:4px 0 6px;color:var(--mute);font-size:13px}
table{width:100%;border-collapse:collapse;font-size:13px;table-layout:fixed}
th:nth-child(1){width:23%}th:nth-child(2){width:10%}th:nth-child(3){width:19%}th:nth-child(5){width:9%}th:nth-child(6){width:22%}
th{text-align:left;font-weight:600;color:var(--mute);font-size:12px;border-bottom:1px solid var(--line);padding:4px 8px 4px 0}
td{padding:3px 8px 3px 0;border-bottom:1px solid var(--line);vertical-align:middle;white-space:nowrap;overflow:hidden;text-overflow:ellipsis}
tbody tr:last-child td{border-bottom:0}
td.a{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:12px;white-space:normal;overflow-wrap:anywhere}
td.a small{color:var(--mute)}
td.c,td.p{white-space:normal;color:var(--mute)}
td.e{color:var(--mute)}
td.s{font-weight:600}
td.s::before{content:"● "}
tr[data-state=up] td.s,.st.up{color:var(--ok)}
tr[data-state=down] td.s,.st.down{color:var(--bad)}
tr[data-state=ejected] td.s,.st.ejected{color:var(--warn)}
tr[data-state=draining] td.s,.st.draining{color:var(--drain)}
tr[data-state=down] td.a,tr[data-state=ejected] td.a{color:var(--bad)}
.bar{display:inline-block;width:90px;height:8px;margin-right:8px;background:var(--track);border-radius:4px;overflow:hidden;vertical-align:middle}
.q .bar{margin-left:6px}
.bar i{display:block;height:100%;background:var(--fill)}
.bar.full i{background:var(--warn)}
@media (max-width:640px){
header,main{padding:10px}
section{padding:8px 10px;contain-intrinsic-size:auto calc(80px + var(--rows,10) * 74px)}
thead{display:none}
table,tbody{display:block}
tr{display:grid;grid-template-columns:1fr auto;grid-auto-flow:dense;gap:2px 10px;padding:6px 0;border-bottom:1px solid var(--line)}
tbody tr:last-child{border-bottom:0}
td{padding:0;border:0}
td.s,td.e{text-align:right}
td.c,td.p{grid-column:1/-1}
td.e::before{content:"ejections "}
.bar{width:70px}
}
</style></head>
"#;

/// The refresh: fetch this page again and move its facts into the DOM, so
/// there is one renderer (`render`, above) and the script only swaps. A
/// section whose upstream is still there keeps its element (and so the
/// browser's layout of the sections it is not showing).
const SCRIPT: &str = r#"
(() => {
"use strict";
const PERIOD = 2000;
let last = 0;
function swap(doc) {
  document.getElementById("top").innerHTML = doc.getElementById("top").innerHTML;
  const main = document.getElementById("ups"), shown = main.children;
  const fresh = Array.from(doc.getElementById("ups").children);
  if (shown.length === fresh.length && fresh.every((f, i) => shown[i].dataset.upstream === f.dataset.upstream)) {
    fresh.forEach((f, i) => {
      shown[i].style.cssText = f.style.cssText;
      shown[i].innerHTML = f.innerHTML;
    });
  } else {
    // Upstreams came or went (a reload): take them all.
    main.replaceChildren(...fresh);
  }
  document.body.dataset.updates = String(Number(document.body.dataset.updates || 0) + 1);
}
function tick() {
  if (document.hidden) { setTimeout(tick, PERIOD); return; }
  const conn = document.getElementById("conn");
  fetch(location.pathname, {cache: "no-store"})
    .then(resp => {
      if (!resp.ok) throw new Error(`HTTP ${resp.status}`);
      return resp.text();
    })
    .then(html => {
      const doc = new DOMParser().parseFromString(html, "text/html");
      swap(doc);
      last = Date.now();
      conn.className = "";
      conn.textContent = `live · updated ${doc.getElementById("conn").textContent.replace("snapshot at ", "")} · every ${PERIOD / 1000} s`;
    })
    .catch(e => {
      conn.className = "no";
      const ago = last ? ` · showing data from ${Math.round((Date.now() - last) / 1000)} s ago` : "";
      conn.textContent = `cannot reach the status page (${e.message})${ago}`;
    })
    .finally(() => setTimeout(tick, PERIOD));
}
setTimeout(tick, PERIOD);
})();
"#;

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const NOW: u64 = 1_700_000_000_000;

    fn backend(addr: &str, state: &str) -> Value {
        json!({
            "address": addr, "state": state, "in_flight": 1, "capacity": 4, "weight": 1,
            "upgraded": 0, "ejections": 0,
            "check": {"at_unix_ms": NOW - 200, "ok": true, "reason": null},
        })
    }

    /// The page without its script (which holds the same markup as templates).
    fn markup(page: &str) -> &str {
        page.split("<script>").next().unwrap()
    }

    fn status(upstreams: Value) -> Value {
        json!({
            "version": "1.2.3", "uptime_s": 3725, "draining": false, "reload": null,
            "upstreams": upstreams,
        })
    }

    #[test]
    fn renders_every_fact_with_its_hooks() {
        let mut down = backend("10.0.0.2:80", "down");
        down["check"] = json!({"at_unix_ms": NOW - 1500, "ok": false, "reason": "refused"});
        down["ejections"] = json!(3);
        let mut fleet = backend("10.0.0.3:80", "up");
        fleet["fleet"] = json!({"pid": 4242, "restarts": 1, "uptime_s": 90});
        let mut s = status(json!({
            "app": {
                "queue": {"depth": 5, "max_depth": 10, "recent_wait_ms": 12.4},
                "balance": "least_outstanding", "discipline": "fifo",
                "backends": [backend("10.0.0.1:80", "up"), down, fleet],
            },
        }));
        s["reload"] =
            json!({"at_unix_ms": NOW - 300_000, "ok": true, "detail": "1 upstream changed"});
        let page = render_at(&s, NOW);
        // Nothing is loaded from elsewhere.
        for external in ["src=", "href=", "http://", "https://", "@import"] {
            assert!(!page.contains(external), "page refers to {external}");
        }
        let page = markup(&page);
        for needle in [
            "<meta name=viewport",
            "<span class=v>1.2.3</span>",
            "uptime <b>1h 2m</b>",
            "1 upstreams · 3 backends: <b class=\"st up\">2 up</b>, <b class=\"st down\">1 down</b>",
            "<b class=ok>ok</b> at 22:08:20 UTC (5m 0s ago)",
            "<pre class=rd>1 upstream changed</pre>",
            "<section data-upstream=\"app\" style=\"--rows:3\">",
            "<span class=\"cnt no\">2/3 up</span>",
            "queue <span class=\"bar\"><i style=\"width:50%\"></i></span>5/10 · recent wait 12 ms",
            "<tr data-backend=\"10.0.0.1:80\" data-state=\"up\">",
            "<tr data-backend=\"10.0.0.2:80\" data-state=\"down\">",
            "<i style=\"width:25%\"></i></span>1/4",
            "<td class=c>ok · 0.2s ago",
            "<td class=\"c no\">refused · 1.5s ago<td class=e>3",
            "<th>process",
            "<td class=p>pid 4242 · 1 restart · up 1m 30s",
            "<td class=p>—",
            "snapshot at 22:13:20 UTC",
        ] {
            assert!(page.contains(needle), "missing {needle:?} in\n{page}");
        }
    }

    #[test]
    fn without_fleet_or_checks_the_columns_degrade() {
        let mut b = backend("10.0.0.1:80", "draining");
        b["check"] = Value::Null;
        b["capacity"] = json!(0);
        let mut s = status(json!({"app": {"backends": [b]}}));
        s["draining"] = json!(true);
        let page = render_at(&s, NOW);
        let page = markup(&page);
        assert!(!page.contains("<th>process"), "{page}");
        assert!(page.contains("<td class=c>—"), "{page}");
        assert!(page.contains("width:0%\"></i></span>1/0"), "{page}");
        assert!(
            page.contains("last reload <b>none since start</b>"),
            "{page}"
        );
        assert!(
            page.contains("<b class=\"st draining\">1 draining</b>"),
            "{page}"
        );
        // A document missing everything still renders.
        assert!(render_at(&json!({}), NOW).contains("0 upstreams · 0 backends:"));
    }

    #[test]
    fn escapes_config_and_state() {
        let mut b = backend("<script>alert(1)</script>", "down");
        b["check"] = json!({"at_unix_ms": NOW, "ok": false, "reason": "a\"b'c&d"});
        let mut s = status(json!({"<img onerror=x>": {"backends": [b], "balance": "<b>"}}));
        s["reload"] = json!({"at_unix_ms": NOW, "ok": false, "detail": "line 1: </pre><x>"});
        s["version"] = json!("<v>");
        let page = render_at(&s, NOW);
        let markup = markup(&page);
        for raw in [
            "<script>alert",
            "<img",
            "<b></small>",
            "</pre><x>",
            "<v>",
            "a\"b",
        ] {
            assert!(!markup.contains(raw), "{raw:?} not escaped");
        }
        assert!(markup.contains("<small>&lt;b&gt; · </small>"));
        assert!(markup.contains("data-upstream=\"&lt;img onerror=x&gt;\""));
        assert!(markup.contains("data-backend=\"&lt;script&gt;alert(1)&lt;/script&gt;\""));
        assert!(markup.contains("a&quot;b&#39;c&amp;d"));
        assert!(markup.contains("<b class=no>rejected</b>"));
    }

    #[test]
    fn formats_durations() {
        assert_eq!(dur(42), "42s");
        assert_eq!(dur(303), "5m 3s");
        assert_eq!(dur(7500), "2h 5m");
        assert_eq!(dur(3 * 86400 + 4 * 3600 + 9), "3d 4h");
        assert_eq!(ago(NOW, NOW + 5), "0.0s ago");
        assert_eq!(ago(NOW, NOW - 61_000), "1m 1s ago");
        assert_eq!(wait_ms(0.25), "0.2 ms");
        assert_eq!(wait_ms(1500.0), "1.5 s");
        assert_eq!(clock(0), "00:00:00 UTC");
        assert_eq!(pct(7, 4), 100);
    }

    #[test]
    fn fifty_upstreams_of_two_hundred_backends() {
        let ups: serde_json::Map<String, Value> = (0..50)
            .map(|u| {
                let backends: Vec<Value> = (0..200)
                    .map(|b| {
                        let mut v = backend(&format!("10.{u}.{}.{}:8000", b / 250, b % 250), "up");
                        v["fleet"] = json!({"pid": 10_000 + b, "restarts": 0, "uptime_s": 86_400});
                        v
                    })
                    .collect();
                (
                    format!("upstream-{u:02}"),
                    json!({
                        "queue": {"depth": 3, "max_depth": 1000, "recent_wait_ms": 1.5},
                        "balance": "least_outstanding", "discipline": "fifo",
                        "backends": backends,
                    }),
                )
            })
            .collect();
        let s = status(Value::Object(ups));
        let started = std::time::Instant::now();
        let page = render_at(&s, NOW);
        let took = started.elapsed();
        let size = page.len();
        assert!(size < 5 << 20, "page is {size} bytes");
        let page = markup(&page);
        assert!(
            took < std::time::Duration::from_millis(500),
            "took {took:?}"
        );
        assert_eq!(page.matches("<section data-upstream=").count(), 50);
        // One pass over the page, then a lookup per backend.
        let hooks = |tag: &str| -> std::collections::HashSet<&str> {
            page.split(tag)
                .skip(1)
                .filter_map(|s| s.split('"').next())
                .collect()
        };
        let sections = hooks("<section data-upstream=\"");
        let rows = hooks("<tr data-backend=\"");
        assert_eq!(page.matches("data-state=\"up\"").count(), 10_000);
        for u in 0..50 {
            assert!(sections.contains(format!("upstream-{u:02}").as_str()));
            for b in 0..200 {
                let addr = format!("10.{u}.{}.{}:8000", b / 250, b % 250);
                assert!(rows.contains(addr.as_str()), "{addr} missing");
            }
        }
        println!("50 x 200 backends: {size} bytes in {took:?}");
    }
}
