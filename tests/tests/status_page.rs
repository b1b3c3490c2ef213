//! The status page (`GET /` on the admin listener) in a real browser.
//!
//! Headless Chromium loads the page and runs its script for 3 s of virtual
//! time, long enough for one redraw from `/status`; the test reads the DOM
//! Chromium ends with through the page's hooks (`<section data-upstream>`,
//! `<tr data-backend data-state>`), so it checks what the script draws, not
//! only the server's first paint.
//!
//! The screenshot goes to the README's `docs/img/status-page.png` when
//! `USHER_SCREENSHOT=1`, otherwise to a temp dir, so CI never rewrites the
//! committed file. Chromium is required: without it the test fails and says
//! how to install it.

use std::collections::HashMap;
use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use usher_e2e::usher::{backends, Config, TempDir, Usher};
use usher_e2e::{blocking, spawn_worker, wait_until, Proc};

const HEALTH: &str = "    health_check: { path: /healthz, interval: 200ms, fall: 1 }";

#[test]
fn status_page_follows_backend_state_in_a_browser() {
    let mut workers: Vec<(Proc, SocketAddr)> =
        (0..4).map(|_| spawn_worker(["--threads", "2"])).collect();
    let addrs: Vec<SocketAddr> = workers.iter().map(|(_, a)| *a).collect();
    let (alpha, beta) = (&addrs[..2], &addrs[2..]);
    let yaml = Config::new()
        .route("beta.test", "beta")
        .route("*", "alpha")
        .upstream("alpha", &format!("{}\n{HEALTH}", backends(alpha, "")))
        .upstream("beta", &format!("{}\n{HEALTH}", backends(beta, "")))
        .top("access_log: { format: off }")
        .yaml();
    let usher = Usher::start_ready(&yaml);
    let expected = [("alpha", alpha), ("beta", beta)];
    let page_url = usher.admin_url("/");
    assert!(
        wait_until(Duration::from_secs(10), || all_checked_ok(&usher.status())),
        "not every backend passed a health check: {}",
        usher.status()
    );

    // The first paint is the server's, complete without JavaScript.
    let resp = blocking::get(&page_url).expect("GET /");
    assert_eq!(resp.status, 200);
    assert_eq!(
        resp.header("content-type"),
        Some("text/html; charset=utf-8")
    );
    let served = Page::parse(&resp.text());
    assert_eq!(served.updates, 0, "the server's page is not a redraw");
    served.assert_states(&expected, &HashMap::new());

    // Requests that sleep on a backend thread, for bars with something in them.
    let held: Vec<TcpStream> = ["alpha.test", "alpha.test", "alpha.test", "beta.test"]
        .iter()
        .map(|host| hold(usher.addr, host))
        .collect();
    assert!(
        wait_until(Duration::from_secs(10), || in_flight(&usher.status()) == 4),
        "the held requests are not all in flight: {}",
        usher.status()
    );

    let chromium = Chromium::new();
    let page = Page::parse(&chromium.dump_dom(&page_url));
    assert!(page.updates >= 1, "the script did not redraw the page");
    page.assert_states(&expected, &HashMap::new());
    // In flight against capacity, as /status has it (the held requests keep
    // it still).
    let status = usher.status();
    for (name, addrs) in expected {
        for a in addrs {
            let b = backend(&status, name, &a.to_string());
            let shown = page.row(name, &a.to_string()).cell("f");
            let want = format!("{}/{}", b["in_flight"], b["capacity"]);
            assert_eq!(shown, want, "{name} {a} in flight");
        }
    }
    assert!(page
        .row("alpha", &alpha[0].to_string())
        .cell("c")
        .starts_with("ok · "));

    // Kill a beta worker that holds none of the requests (so none is retried
    // elsewhere and the bars stay put); the page must follow its health check.
    let idle = beta
        .iter()
        .find(|a| backend(&status, "beta", &a.to_string())["in_flight"] == 0)
        .expect("an idle beta backend")
        .to_string();
    let (victim, _) = workers
        .iter_mut()
        .find(|(_, a)| a.to_string() == idle)
        .unwrap();
    victim.signal(nix::sys::signal::Signal::SIGKILL);
    victim
        .wait_exit(Duration::from_secs(5))
        .expect("worker exits");
    assert!(
        wait_until(Duration::from_secs(10), || {
            backend(&usher.status(), "beta", &idle)["state"] == "down"
        }),
        "/status never showed {idle} down: {}",
        usher.status()
    );
    let reason = backend(&usher.status(), "beta", &idle)["check"]["reason"]
        .as_str()
        .expect("a failed check's reason")
        .to_string();

    let page = Page::parse(&chromium.dump_dom(&page_url));
    assert!(page.updates >= 1, "the script did not redraw the page");
    page.assert_states(&expected, &HashMap::from([(idle.as_str(), "down")]));
    let check = page.row("beta", &idle).cell("c");
    assert!(
        check.starts_with(&reason),
        "check cell {check:?}, reason {reason:?}"
    );
    assert!(
        page.summary.contains("3 up, 1 down"),
        "summary {:?}",
        page.summary
    );
    // The script draws what the server draws (the markup is written twice).
    let served = Page::parse(&blocking::get(&page_url).expect("GET /").text());
    assert_eq!(served.facts(), page.facts(), "server and script disagree");

    let shot = screenshot_path(&chromium);
    chromium.screenshot(&page_url, &shot);
    let png = std::fs::read(&shot).unwrap_or_else(|e| panic!("read {}: {e}", shot.display()));
    assert!(
        png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 1000,
        "{} is no screenshot",
        shot.display()
    );
    drop(held);
}

/// Where the screenshot goes: the README's image with `USHER_SCREENSHOT=1`.
fn screenshot_path(chromium: &Chromium) -> PathBuf {
    if std::env::var("USHER_SCREENSHOT").as_deref() == Ok("1") {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/img/status-page.png");
        std::fs::create_dir_all(p.parent().unwrap()).expect("create docs/img");
        p
    } else {
        chromium.dir.path().join("status-page.png")
    }
}

fn all_checked_ok(status: &serde_json::Value) -> bool {
    let ups = status["upstreams"].as_object().expect("upstreams");
    ups.values()
        .flat_map(|u| u["backends"].as_array().expect("backends"))
        .all(|b| b["state"] == "up" && b["check"]["ok"] == true)
}

fn in_flight(status: &serde_json::Value) -> u64 {
    let ups = status["upstreams"].as_object().expect("upstreams");
    ups.values()
        .flat_map(|u| u["backends"].as_array().expect("backends"))
        .map(|b| b["in_flight"].as_u64().unwrap_or(0))
        .sum()
}

fn backend<'a>(status: &'a serde_json::Value, upstream: &str, addr: &str) -> &'a serde_json::Value {
    status["upstreams"][upstream]["backends"]
        .as_array()
        .and_then(|bs| bs.iter().find(|b| b["address"] == addr))
        .unwrap_or_else(|| panic!("no backend {addr} in {upstream}: {status}"))
}

/// Sends a `GET /sleep` through Usher for `host` and leaves it waiting: it
/// holds a backend thread for 30 s, or until the socket is dropped.
fn hold(usher: SocketAddr, host: &str) -> TcpStream {
    let mut s = TcpStream::connect(usher).expect("connect to usher");
    write!(s, "GET /sleep?ms=30000 HTTP/1.1\r\nHost: {host}\r\n\r\n").expect("send request");
    s
}

/// Headless Chromium, one run per page load, each with a fresh profile.
struct Chromium {
    dir: TempDir,
}

impl Chromium {
    /// Checks Chromium is installed; fails the test (never skips it) if not.
    fn new() -> Chromium {
        let version = Command::new("chromium").arg("--version").output();
        match version {
            Ok(out) if out.status.success() => {}
            other => panic!(
                "headless Chromium is needed for the status page test, and `chromium --version` \
                 gave {other:?}; install the Debian package: \
                 apt-get install -y --no-install-recommends chromium (./test.sh does)"
            ),
        }
        Chromium {
            dir: TempDir::new("chromium"),
        }
    }

    /// The DOM after the page's script has run (`--dump-dom`).
    fn dump_dom(&self, url: &str) -> String {
        self.run(url, &["--dump-dom"])
    }

    /// A 1200×900 PNG of the page at `path`.
    fn screenshot(&self, url: &str, path: &Path) {
        let arg = format!("--screenshot={}", path.display());
        self.run(
            url,
            &[arg.as_str(), "--window-size=1200,900", "--hide-scrollbars"],
        );
    }

    /// Runs Chromium on `url`; returns its stdout. Fails after 60 s.
    fn run(&self, url: &str, args: &[&str]) -> String {
        let run = self.dir.path().join(format!("run-{}", fastrand::u32(..)));
        std::fs::create_dir_all(&run).expect("create chromium dir");
        let (out, err) = (run.join("stdout"), run.join("stderr"));
        let mut child = Command::new("chromium")
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                // Time runs ahead to 3 s as soon as the page is idle: the
                // script's 2 s timer fires and its fetch of /status is awaited.
                "--virtual-time-budget=3000",
            ])
            .arg(format!("--user-data-dir={}", run.join("profile").display()))
            .args(args)
            .arg(url)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&out).expect("create stdout file"))
            .stderr(std::fs::File::create(&err).expect("create stderr file"))
            .spawn()
            .expect("start chromium");
        let mut exit = None;
        wait_until(Duration::from_secs(60), || {
            exit = child.try_wait().expect("try_wait on chromium");
            exit.is_some()
        });
        let stderr = || std::fs::read_to_string(&err).unwrap_or_default();
        let Some(exit) = exit else {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "chromium did not finish {url} in 60 s; stderr:\n{}",
                stderr()
            );
        };
        assert!(
            exit.success(),
            "chromium {args:?} {url}: {exit}; stderr:\n{}",
            stderr()
        );
        std::fs::read_to_string(&out).expect("read chromium's stdout")
    }
}

/// What the page shows, read from its hooks.
#[derive(Debug)]
struct Page {
    /// `<body data-updates>`: how many times the script redrew the page.
    updates: u64,
    /// The header's text.
    summary: String,
    /// Each `<section data-upstream>` in order, with its rows.
    upstreams: Vec<Upstream>,
}

#[derive(Debug)]
struct Upstream {
    name: String,
    /// The text above its table: name, policies, counts, queue.
    head: String,
    rows: Vec<Row>,
}

/// One `<tr data-backend>`.
#[derive(Debug)]
struct Row {
    addr: String,
    state: String,
    /// Each cell's text, by its class (`a`, `s`, `f`, `c`, `e`, `p`).
    cells: HashMap<String, String>,
}

impl Row {
    fn cell(&self, class: &str) -> &str {
        self.cells
            .get(class)
            .unwrap_or_else(|| panic!("no cell {class} in {self:?}"))
    }
}

impl Page {
    /// Reads a page as served or as Chromium dumps it (which quotes every
    /// attribute). The script is cut first: its templates hold the same tags.
    fn parse(html: &str) -> Page {
        let markup = match (html.find("<script>"), html.rfind("</script>")) {
            (Some(a), Some(b)) => format!("{}{}", &html[..a], &html[b..]),
            _ => html.to_string(),
        };
        let body = markup.split_once("<body").expect("a <body>").1;
        let updates = attrs(body)
            .get("data-updates")
            .and_then(|v| v.parse().ok())
            .expect("<body data-updates>");
        let summary = text(body.split("<main").next().unwrap_or_default());
        let upstreams = body
            .split("<section ")
            .skip(1)
            .map(|section| {
                let name = attrs(section)["data-upstream"].clone();
                let head = section.split("<table").next().unwrap_or_default();
                let head = text(head.split_once('>').map_or("", |(_, h)| h));
                let rows = section
                    .split("<tr ")
                    .skip(1)
                    .filter_map(|tr| {
                        let a = attrs(tr);
                        let addr = a.get("data-backend")?.clone();
                        let tr = tr.split("</tr>").next().unwrap_or(tr);
                        let cells = tr
                            .split("<td ")
                            .skip(1)
                            .map(|td| {
                                let class = attrs(td).get("class").cloned().unwrap_or_default();
                                let class =
                                    class.split_whitespace().next().unwrap_or("").to_string();
                                (class, text(td.split_once('>').map_or("", |(_, t)| t)))
                            })
                            .collect();
                        Some(Row {
                            addr,
                            state: a.get("data-state").cloned().unwrap_or_default(),
                            cells,
                        })
                    })
                    .collect();
                Upstream { name, head, rows }
            })
            .collect();
        Page {
            updates,
            summary,
            upstreams,
        }
    }

    fn row(&self, upstream: &str, addr: &str) -> &Row {
        self.upstreams
            .iter()
            .find(|u| u.name == upstream)
            .and_then(|u| u.rows.iter().find(|r| r.addr == addr))
            .unwrap_or_else(|| panic!("no row {addr} in {upstream}: {self:#?}"))
    }

    /// What the page says, less what changes by the second (how long ago
    /// a check ran, a process's uptime), one line per upstream and backend.
    fn facts(&self) -> Vec<String> {
        let mut out = Vec::new();
        for u in &self.upstreams {
            out.push(format!("{} | {}", u.name, u.head));
            for r in &u.rows {
                let mut cells: Vec<(&String, &str)> = r
                    .cells
                    .iter()
                    .map(|(class, t)| (class, t.split(" · up ").next().unwrap_or(t)))
                    .map(|(class, t)| match class.as_str() {
                        "c" => (class, t.rsplit_once(" · ").map_or(t, |(what, _)| what)),
                        _ => (class, t),
                    })
                    .collect();
                cells.sort();
                out.push(format!("  {} {} {cells:?}", r.addr, r.state));
            }
        }
        out
    }

    /// The page lists exactly `expected` (upstreams in order, their backends),
    /// every backend `up` unless `except` says otherwise.
    fn assert_states(&self, expected: &[(&str, &[SocketAddr])], except: &HashMap<&str, &str>) {
        let names: Vec<&str> = self.upstreams.iter().map(|u| u.name.as_str()).collect();
        let want: Vec<&str> = expected.iter().map(|(n, _)| *n).collect();
        assert_eq!(names, want, "upstream sections");
        for (Upstream { name, rows, .. }, (_, addrs)) in self.upstreams.iter().zip(expected) {
            let shown: Vec<(&str, &str)> = rows
                .iter()
                .map(|r| (r.addr.as_str(), r.state.as_str()))
                .collect();
            let addrs: Vec<String> = addrs.iter().map(|a| a.to_string()).collect();
            let want: Vec<(&str, &str)> = addrs
                .iter()
                .map(|a| (a.as_str(), except.get(a.as_str()).copied().unwrap_or("up")))
                .collect();
            assert_eq!(shown, want, "backends of {name}");
            for r in rows {
                assert_eq!(r.cell("s"), r.state, "state cell of {}", r.addr);
            }
        }
    }
}

/// The attributes of a tag, from `s` that starts after the tag's name.
fn attrs(s: &str) -> HashMap<String, String> {
    let mut out = HashMap::new();
    let mut rest = s.split('>').next().unwrap_or("");
    loop {
        rest = rest.trim_start();
        let end = rest
            .find(|c: char| c == '=' || c.is_whitespace())
            .unwrap_or(rest.len());
        if end == 0 {
            break;
        }
        let name = rest[..end].to_string();
        rest = &rest[end..];
        let value = if let Some(v) = rest.strip_prefix('=') {
            let (value, after) = match v.strip_prefix('"') {
                Some(q) => q.split_once('"').unwrap_or((q, "")),
                None => v.split_once(char::is_whitespace).unwrap_or((v, "")),
            };
            rest = after;
            unescape(value)
        } else {
            String::new()
        };
        out.insert(name, value);
    }
    out
}

/// The text of some markup: tags dropped, entities decoded, spaces squeezed.
fn text(html: &str) -> String {
    let mut out = String::new();
    let mut in_tag = false;
    for c in html.chars() {
        match c {
            '<' => in_tag = true,
            '>' => in_tag = false,
            c if !in_tag => out.push(c),
            _ => {}
        }
    }
    unescape(&out)
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

fn unescape(s: &str) -> String {
    s.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&#39;", "'")
        .replace("&nbsp;", " ")
        .replace("&amp;", "&")
}
