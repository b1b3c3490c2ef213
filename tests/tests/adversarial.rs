//! Adversarial end-to-end tests (issue 9, "The edge holds"): request
//! smuggling, malformed heads and chunks, Host confusion, oversized and slow
//! clients, hostile backends and HTTP/2 floods, against the real `usher`.
//!
//! Every test starts its own Usher in front of two recording backends
//! (`tests/src/raw.rs`): `main.test` routes to `main`, `alt.test` to `alt`,
//! and anything else to `main`. The client side is a raw socket, so each
//! test can send exactly the bytes an attacker would. Each asserts what the
//! client got *and* what the backends saw: a request Usher refused, or one
//! smuggled inside another, must never reach a backend. Each ends by checking
//! that Usher did not panic.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use http::{Request, StatusCode};
use usher_e2e::raw::{
    describe, pattern, After, End, NoResponse, RawClient, RawResponse, RecordingBackend, Reply,
    SeenRequest, READ_TIMEOUT,
};
use usher_e2e::usher::{backends, Config, Usher};
use usher_e2e::wait_until;

/// How long a refused connection may take to close after its answer.
const CLOSE_WAIT: Duration = Duration::from_secs(5);

fn config(main: SocketAddr, alt: SocketAddr, upstream_extra: &str, top_extra: &str) -> String {
    let upstream = |addr: SocketAddr| {
        format!(
            "{}\n    retries: {{ attempts: 0 }}\n{upstream_extra}",
            backends(&[addr], ", max_in_flight: 16")
        )
    };
    Config::new()
        .route("main.test", "main")
        .route("alt.test", "alt")
        .route("*", "main")
        .upstream("main", &upstream(main))
        .upstream("alt", &upstream(alt))
        .top("access_log: { format: json }")
        .top(top_extra)
        .yaml()
}

/// One Usher in front of the `main` and `alt` backends.
struct Edge {
    usher: Usher,
    main: RecordingBackend,
    alt: RecordingBackend,
}

impl Edge {
    /// Both backends echo (`"main GET /path"`); default limits.
    fn start() -> Edge {
        Edge::with(RecordingBackend::echo("main"), "", "")
    }

    /// `main` as given, `alt` echoing; `upstream_extra` is added to both
    /// upstreams (indented by 4), `top_extra` at the top level.
    fn with(main: RecordingBackend, upstream_extra: &str, top_extra: &str) -> Edge {
        let alt = RecordingBackend::echo("alt");
        let usher = Usher::start_ready(&config(main.addr, alt.addr, upstream_extra, top_extra));
        Edge { usher, main, alt }
    }

    fn client(&self) -> RawClient {
        RawClient::connect(self.usher.addr)
    }

    /// A plain GET on a fresh connection, answered in full.
    fn get(&self, host: &str, path: &str) -> RawResponse {
        let mut c = self.client();
        c.send(
            format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .expect("send a plain GET");
        c.expect_response(&format!("GET {host}{path}"))
    }

    /// Both upstreams still answer an ordinary request (`/probe`): Usher
    /// serves other clients, and anything it forwarded for an earlier
    /// connection has reached its backend by now.
    fn probe(&self) {
        for (host, name) in [("main.test", "main"), ("alt.test", "alt")] {
            let r = self.get(host, "/probe");
            assert_eq!(r.status, 200, "probe of {host}: {}", r.head);
            assert_eq!(r.text(), format!("{name} GET /probe"));
        }
    }

    /// What `b` saw besides the probes (ours, and Usher's own `/healthz`
    /// checks), after a [`Edge::probe`].
    fn seen(&self, b: &RecordingBackend) -> Vec<SeenRequest> {
        b.requests()
            .into_iter()
            .filter(|r| r.target != "/probe" && !is_health_check(r))
            .collect()
    }

    /// Neither backend saw any request but the probes, nor a byte of
    /// `/hidden`.
    fn assert_backends_saw_nothing(&self) {
        self.probe();
        for b in [&self.main, &self.alt] {
            let seen = self.seen(b);
            assert!(seen.is_empty(), "backend {} saw {seen:#?}", b.name());
            assert!(!b.saw(b"/hidden"), "backend {} saw /hidden", b.name());
        }
    }

    /// Usher did not panic.
    fn finish(self) {
        let out = self.usher.proc.output();
        assert!(!out.contains("panicked at"), "usher panicked:\n{out}");
    }
}

fn is_health_check(r: &SeenRequest) -> bool {
    r.target == "/healthz"
        && r.header("user-agent")
            .is_some_and(|ua| ua.starts_with("usher-health/"))
}

/// Sends `bytes` on a fresh connection to a default [`Edge`]: expects
/// `status`, then the connection closed, and neither backend seeing any of it.
fn refused(bytes: &[u8], status: u16) {
    let e = Edge::start();
    refused_by(&e, bytes, status);
    e.finish();
}

fn refused_by(e: &Edge, bytes: &[u8], status: u16) {
    let mut c = e.client();
    let _ = c.send(bytes);
    let what = String::from_utf8_lossy(&bytes[..bytes.len().min(120)]).into_owned();
    let r = c.expect_response(&what);
    assert_eq!(r.status, status, "{what:?} got {}{}", r.head, r.text());
    c.expect_closed(&what, CLOSE_WAIT);
    e.assert_backends_saw_nothing();
}

/// `bytes` is answered `200` by `main` with `"main {method} {target}"`, and
/// `main` saw exactly one request, which it returns.
fn accepted(e: &Edge, bytes: &[u8], method: &str, target: &str) -> SeenRequest {
    let mut c = e.client();
    c.send(bytes).expect("send");
    let what = String::from_utf8_lossy(&bytes[..bytes.len().min(120)]).into_owned();
    let r = c.expect_response(&what);
    assert_eq!(r.status, 200, "{what:?} got {}{}", r.head, r.text());
    assert_eq!(r.text(), format!("main {method} {target}"));
    e.probe();
    let seen = e.seen(&e.main);
    assert_eq!(seen.len(), 1, "main saw {seen:#?}");
    assert!(e.seen(&e.alt).is_empty());
    seen.into_iter().next().unwrap()
}

/// The request body reached the backend de-chunked, framed by
/// `Content-Length` alone.
fn assert_reframed(seen: &SeenRequest, body: &[u8]) {
    assert_eq!(seen.body, body, "{seen:#?}");
    assert_eq!(
        seen.header("content-length"),
        Some(body.len().to_string().as_str()),
        "{seen:#?}"
    );
    assert_eq!(seen.header("transfer-encoding"), None, "{seen:#?}");
}

fn chunked_post(te: &str, body: &str) -> Vec<u8> {
    format!("POST /chunked HTTP/1.1\r\nHost: main.test\r\nTransfer-Encoding: {te}\r\n\r\n{body}")
        .into_bytes()
}

// ---------------------------------------------------------------------------
// Rule 1: Content-Length and Transfer-Encoding together.

const SMUGGLED: &str = "GET /hidden HTTP/1.1\r\nHost: main.test\r\n\r\n";

/// A request with both headers (in `order`), whose Content-Length would
/// cover the hidden request too: a Content-Length framer sees one request, a
/// chunked framer sees two.
fn cl_te_smuggle(cl_first: bool) {
    let e = Edge::start();
    let chunks = "5\r\nhello\r\n0\r\n\r\n";
    let cl = format!("Content-Length: {}\r\n", chunks.len() + SMUGGLED.len());
    let te = "Transfer-Encoding: chunked\r\n";
    let framing = if cl_first {
        cl + te
    } else {
        te.to_string() + &cl
    };
    let req = format!("POST /cl-te HTTP/1.1\r\nHost: main.test\r\n{framing}\r\n{chunks}{SMUGGLED}");
    let mut c = e.client();
    c.send(req.as_bytes()).unwrap();
    let r = c.expect_response("CL+TE request");
    assert_eq!(
        (r.status, r.text().as_str()),
        (200, "main POST /cl-te"),
        "{}",
        r.head
    );
    // The pipelined request is never answered: the connection closes.
    c.expect_closed("after the CL+TE request", CLOSE_WAIT);
    e.probe();
    let seen = e.seen(&e.main);
    assert_eq!(seen.len(), 1, "main saw {seen:#?}");
    assert_eq!(seen[0].target, "/cl-te");
    assert_reframed(&seen[0], b"hello");
    assert!(!e.main.saw(b"/hidden"), "the smuggled request reached main");
    assert!(e.seen(&e.alt).is_empty());
    e.finish();
}

#[test]
fn cl_te_request_is_framed_by_chunked_and_closed() {
    cl_te_smuggle(true);
}

#[test]
fn te_cl_request_is_framed_by_chunked_and_closed() {
    cl_te_smuggle(false);
}

// ---------------------------------------------------------------------------
// Rule 2: no Transfer-Encoding but exactly `chunked`.

const HELLO: &str = "5\r\nhello\r\n0\r\n\r\n";

#[test]
fn te_gzip_chunked_is_400() {
    refused(&chunked_post("gzip, chunked", HELLO), 400);
}

#[test]
fn te_chunked_gzip_is_400() {
    refused(&chunked_post("chunked, gzip", HELLO), 400);
}

#[test]
fn te_identity_is_400() {
    refused(&chunked_post("identity", HELLO), 400);
}

#[test]
fn te_xchunked_is_400() {
    refused(&chunked_post("xchunked", HELLO), 400);
}

#[test]
fn te_chunked_with_parameter_is_400() {
    refused(&chunked_post("chunked;x", HELLO), 400);
}

#[test]
fn two_te_chunked_lines_are_400() {
    refused(
        &chunked_post("chunked\r\nTransfer-Encoding: chunked", HELLO),
        400,
    );
}

#[test]
fn te_with_space_before_colon_is_400() {
    refused(
        format!("POST /chunked HTTP/1.1\r\nHost: main.test\r\nTransfer-Encoding : chunked\r\n\r\n{HELLO}")
            .as_bytes(),
        400,
    );
}

#[test]
fn te_on_http10_is_400() {
    refused(
        format!("POST /chunked HTTP/1.0\r\nHost: main.test\r\nTransfer-Encoding: chunked\r\n\r\n{HELLO}")
            .as_bytes(),
        400,
    );
}

#[test]
fn te_chunked_in_any_case_is_accepted() {
    let e = Edge::start();
    let seen = accepted(&e, &chunked_post("Chunked", HELLO), "POST", "/chunked");
    assert_reframed(&seen, b"hello");
    e.finish();
}

// ---------------------------------------------------------------------------
// Rule 3: malformed heads.

#[test]
fn obs_fold_header_is_400() {
    refused(
        b"GET /fold HTTP/1.1\r\nHost: main.test\r\nX-A: b\r\n c\r\n\r\n",
        400,
    );
}

#[test]
fn obs_fold_with_tab_is_400() {
    refused(
        b"GET /fold HTTP/1.1\r\nHost: main.test\r\nX-A: b\r\n\tc\r\n\r\n",
        400,
    );
}

#[test]
fn bare_cr_in_header_is_400() {
    refused(
        b"GET /cr HTTP/1.1\r\nHost: main.test\r\nX-A: b\rc\r\n\r\n",
        400,
    );
}

#[test]
fn bare_cr_in_request_line_is_400() {
    refused(b"GET /cr\r HTTP/1.1\r\nHost: main.test\r\n\r\n", 400);
}

#[test]
fn nul_in_header_value_is_400() {
    refused(
        b"GET /nul HTTP/1.1\r\nHost: main.test\r\nX-A: b\0c\r\n\r\n",
        400,
    );
}

#[test]
fn nul_in_request_target_is_400() {
    refused(b"GET /a\0b HTTP/1.1\r\nHost: main.test\r\n\r\n", 400);
}

#[test]
fn space_in_request_target_is_400() {
    refused(b"GET /a b HTTP/1.1\r\nHost: main.test\r\n\r\n", 400);
}

#[test]
fn control_char_in_request_target_is_400() {
    refused(b"GET /a\x01b HTTP/1.1\r\nHost: main.test\r\n\r\n", 400);
}

#[test]
fn del_in_request_target_is_400() {
    refused(b"GET /a\x7fb HTTP/1.1\r\nHost: main.test\r\n\r\n", 400);
}

#[test]
fn tab_in_request_target_is_400() {
    refused(b"GET /a\tb HTTP/1.1\r\nHost: main.test\r\n\r\n", 400);
}

/// Heads ended by bare LFs (RFC 9112 §2.2 lets a server accept them):
/// hyper does, and the backend gets exactly the two requests the client
/// pipelined, re-framed with CRLF.
#[test]
fn bare_lf_heads_reach_the_backend_as_the_client_framed_them() {
    let e = Edge::start();
    let mut c = e.client();
    c.send(b"GET /lf-a HTTP/1.1\nHost: main.test\n\nGET /lf-b HTTP/1.1\nHost: main.test\n\n")
        .unwrap();
    for path in ["/lf-a", "/lf-b"] {
        let r = c.expect_response(path);
        assert_eq!(
            (r.status, r.text()),
            (200, format!("main GET {path}")),
            "{}",
            r.head
        );
    }
    e.probe();
    let targets: Vec<String> = e.seen(&e.main).into_iter().map(|r| r.target).collect();
    assert_eq!(targets, ["/lf-a", "/lf-b"]);
    assert!(e.seen(&e.alt).is_empty());
    e.finish();
}

/// Empty lines before a request line are skipped (RFC 9112 §2.2), also
/// between keep-alive requests: the connection serves the next one.
#[test]
fn empty_lines_between_keep_alive_requests_are_skipped() {
    let e = Edge::start();
    let mut c = e.client();
    c.send(b"GET /first HTTP/1.1\r\nHost: main.test\r\n\r\n\r\n\r\n")
        .unwrap();
    let r = c.expect_response("/first");
    assert_eq!(
        (r.status, r.text()),
        (200, "main GET /first".to_string()),
        "{}",
        r.head
    );
    c.send(b"\r\nGET /second HTTP/1.1\r\nHost: main.test\r\n\r\n")
        .unwrap();
    let r = c.expect_response("/second");
    assert_eq!(
        (r.status, r.text()),
        (200, "main GET /second".to_string()),
        "{}",
        r.head
    );
    e.probe();
    let targets: Vec<String> = e.seen(&e.main).into_iter().map(|r| r.target).collect();
    assert_eq!(targets, ["/first", "/second"]);
    e.finish();
}

/// A bare LF inside a CRLF head does not end a header line early enough to
/// start a second request: the would-be request line is a bad header line.
#[test]
fn bare_lf_inside_a_head_cannot_start_a_request() {
    refused(
        b"GET /lf HTTP/1.1\r\nHost: main.test\r\nX-A: b\nGET /hidden HTTP/1.1\r\n\r\n",
        400,
    );
}

// ---------------------------------------------------------------------------
// Rule 4: chunk sizes.

#[test]
fn chunk_size_with_plus_sign_is_400() {
    refused(&chunked_post("chunked", "+5\r\nhello\r\n0\r\n\r\n"), 400);
}

#[test]
fn chunk_size_with_0x_prefix_is_400() {
    refused(&chunked_post("chunked", "0x5\r\nhello\r\n0\r\n\r\n"), 400);
}

#[test]
fn negative_chunk_size_is_400() {
    refused(&chunked_post("chunked", "-1\r\nhello\r\n0\r\n\r\n"), 400);
}

#[test]
fn overflowing_chunk_size_is_400() {
    refused(
        &chunked_post("chunked", "ffffffffffffffffffff\r\nhello\r\n0\r\n\r\n"),
        400,
    );
}

#[test]
fn missing_crlf_after_chunk_data_is_400() {
    refused(&chunked_post("chunked", "5\r\nhelloXX0\r\n\r\n"), 400);
}

#[test]
fn chunk_size_line_with_bare_lf_is_400() {
    refused(&chunked_post("chunked", "5\nhello\r\n0\r\n\r\n"), 400);
}

#[test]
fn huge_chunk_extension_is_400() {
    let ext = "a".repeat(20 * 1024);
    refused(
        &chunked_post("chunked", &format!("5;{ext}\r\nhello\r\n0\r\n\r\n")),
        400,
    );
}

/// A chunk announced longer than the data, then the client half-closes:
/// the body never completes, so nothing is forwarded and the answer is 400.
#[test]
fn chunk_longer_than_its_data_then_eof_is_400() {
    let e = Edge::start();
    let mut c = e.client();
    c.send(&chunked_post("chunked", "10\r\nhello")).unwrap();
    c.shutdown_write();
    let r = c.expect_response("short chunk then EOF");
    assert_eq!(r.status, 400, "{}{}", r.head, r.text());
    c.expect_closed("short chunk then EOF", CLOSE_WAIT);
    e.assert_backends_saw_nothing();
    e.finish();
}

#[test]
fn chunk_extension_is_accepted() {
    let e = Edge::start();
    let seen = accepted(
        &e,
        &chunked_post("chunked", "5;a=b\r\nhello\r\n0\r\n\r\n"),
        "POST",
        "/chunked",
    );
    assert_reframed(&seen, b"hello");
    e.finish();
}

// ---------------------------------------------------------------------------
// Rule 5: request trailers.

#[test]
fn request_trailers_are_400_and_close() {
    refused(
        &chunked_post("chunked", "5\r\nhello\r\n0\r\nX-T: 1\r\n\r\n"),
        400,
    );
}

/// hyper reads the trailer section up to a CRLF CRLF, so after the bare LF
/// the hidden request would be swallowed as trailers by Usher, while a
/// backend ending trailers at `\n\r\n` would run it.
#[test]
fn trailer_ending_in_bare_lf_cannot_smuggle_a_request() {
    refused(
        &chunked_post(
            "chunked",
            &format!("5\r\nhello\r\n0\r\nX-T: 1\n\r\n{SMUGGLED}"),
        ),
        400,
    );
}

// ---------------------------------------------------------------------------
// Rule 6: upgrades.

/// The backend answers 200 to a WebSocket upgrade: the client gets the 200,
/// then the connection closes, and what the client sent after its upgrade
/// request (meant for the new protocol) never reaches a backend as HTTP.
#[test]
fn declined_upgrade_closes_the_connection_after_the_answer() {
    let e = Edge::start();
    let mut c = e.client();
    c.send(
        format!(
            "GET /ws HTTP/1.1\r\nHost: main.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n{SMUGGLED}"
        )
        .as_bytes(),
    )
    .unwrap();
    let r = c.expect_response("declined upgrade");
    assert_eq!(
        (r.status, r.text().as_str()),
        (200, "main GET /ws"),
        "{}",
        r.head
    );
    assert_eq!(r.header("upgrade"), None, "{}", r.head);
    c.expect_closed("after the declined upgrade", CLOSE_WAIT);
    e.probe();
    let seen = e.seen(&e.main);
    assert_eq!(seen.len(), 1, "main saw {seen:#?}");
    assert_eq!(seen[0].target, "/ws");
    assert!(
        !e.main.saw(b"/hidden"),
        "bytes after the upgrade reached main"
    );
    assert!(e.seen(&e.alt).is_empty());
    e.finish();
}

/// Every response line of a backend that Usher does not own reaches the
/// client, in order and whole (each `Set-Cookie` its own line), over HTTP/1
/// and h2 alike; hop-by-hop lines, those `Connection` names, and an
/// `X-Request-Id` of the backend's own do not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_response_lines_reach_the_client_but_hop_by_hop_and_usher_s_own() {
    const PLAIN: &str = "HTTP/1.1 200 OK\r\nSet-Cookie: a=1\r\nX-App:  one\r\n\
        Keep-Alive: timeout=1\r\nSet-Cookie:b=2\r\nX-Request-Id: forged\r\n\
        Strict-Transport-Security: max-age=1\r\nX-Empty:\r\nDate: Tue, 01 Dec 2026 10:00:00 GMT\r\n\
        X-Usher-Load: threads=4, busy=1, queued=0\r\nContent-Length: 2\r\n\r\nok";
    const NAMED: &str = "HTTP/1.1 200 OK\r\nX-Secret: 1\r\nX-App: two\r\n\
        Connection: x-secret\r\nContent-Length: 2\r\n\r\nok";
    let main = RecordingBackend::start("main", |r| match r.target.as_str() {
        "/plain" => Reply::raw(PLAIN),
        "/named" => Reply::raw(NAMED),
        t => Reply::ok(format!("main {} {t}", r.method)),
    });
    let e = Edge::with(main, "", "");
    let e = tokio::task::spawn_blocking(move || {
        let mut c = e.client();
        let r = get_on(&mut c, "/plain").unwrap_or_else(|err| panic!("{}", describe(&err)));
        for gone in ["keep-alive", "connection", "transfer-encoding"] {
            assert!(r.header_values(gone).is_empty(), "{gone}: {}", r.head);
        }
        assert_eq!(r.header_values("set-cookie"), ["a=1", "b=2"], "{}", r.head);
        assert_eq!(r.header("x-app"), Some("one"), "{}", r.head);
        assert_eq!(r.header("x-empty"), Some(""), "{}", r.head);
        assert_eq!(r.header("strict-transport-security"), Some("max-age=1"));
        let count = |name: &str| r.header_values(name).len();
        assert_eq!(count("x-request-id"), 1, "{}", r.head);
        assert_ne!(r.header("x-request-id"), Some("forged"), "{}", r.head);
        // The backend's own `Date`, and no second one; its load report
        // is Usher's alone.
        assert_eq!(count("date"), 1, "{}", r.head);
        assert_eq!(r.header("date"), Some("Tue, 01 Dec 2026 10:00:00 GMT"));
        assert_eq!(r.header("x-usher-load"), None, "{}", r.head);
        assert_eq!(r.text(), "ok");
        let r = get_on(&mut c, "/named").unwrap_or_else(|err| panic!("{}", describe(&err)));
        assert_eq!(r.header("x-secret"), None, "{}", r.head);
        assert_eq!(r.header("x-app"), Some("two"), "{}", r.head);
        assert_eq!(c.after(Duration::from_millis(300)), After::Open);
        e
    })
    .await
    .unwrap();
    // h2: hyper writes the head, from the map alone.
    let tcp = tokio::net::TcpStream::connect(e.usher.addr).await.unwrap();
    let (send, conn) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(conn);
    let mut send = send.ready().await.unwrap();
    let req = Request::get("http://main.test/plain").body(()).unwrap();
    let (resp, _) = send.send_request(req, true).unwrap();
    let resp = tokio::time::timeout(READ_TIMEOUT, resp)
        .await
        .expect("h2 response in time")
        .unwrap();
    let h = resp.headers();
    let cookies: Vec<_> = h.get_all("set-cookie").iter().collect();
    assert_eq!(cookies, ["a=1", "b=2"], "{h:?}");
    assert_eq!(
        h.get("x-app").map(|v| v.as_bytes()),
        Some(&b"one"[..]),
        "{h:?}"
    );
    assert!(h.get("keep-alive").is_none(), "{h:?}");
    assert_eq!(h.get_all("x-request-id").iter().count(), 1, "{h:?}");
    assert_eq!(h.get_all("date").iter().count(), 1, "{h:?}");
    assert_eq!(h["date"], "Tue, 01 Dec 2026 10:00:00 GMT");
    assert!(h.get("x-usher-load").is_none(), "{h:?}");
    tokio::task::spawn_blocking(move || e.finish())
        .await
        .unwrap();
}

/// A backend switching protocols on a request that did not ask to: 502, and
/// the client is not told to upgrade.
#[test]
fn unsolicited_101_from_backend_is_502() {
    let main = RecordingBackend::start("main", |r| match r.target.as_str() {
        "/plain" => Reply::raw(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
        ),
        t => Reply::ok(format!("main {} {t}", r.method)),
    });
    let e = Edge::with(main, "", "");
    let mut c = e.client();
    c.send(b"GET /plain HTTP/1.1\r\nHost: main.test\r\n\r\n")
        .unwrap();
    let r = c.expect_response("unsolicited 101");
    assert_eq!(r.status, 502, "{}", r.head);
    assert_eq!(r.header("upgrade"), None, "{}", r.head);
    e.probe();
    e.finish();
}

// ---------------------------------------------------------------------------
// Rule 7: Host.

/// `GET /host` with these Host lines gets 400 and reaches no backend.
fn host_refused(host_lines: &str) {
    let e = Edge::start();
    host_refused_by(
        &e,
        format!("GET /host HTTP/1.1\r\n{host_lines}\r\n").as_bytes(),
    );
    e.finish();
}

fn host_refused_by(e: &Edge, req: &[u8]) {
    let mut c = e.client();
    let _ = c.send(req);
    let what = String::from_utf8_lossy(req).into_owned();
    let r = c.expect_response(&what);
    assert_eq!(r.status, 400, "{what:?} got {}{}", r.head, r.text());
    e.assert_backends_saw_nothing();
}

/// `host` routes to `upstream` (whose backend answers), which sees the request.
fn host_routes(host: &str, upstream: &str) {
    let e = Edge::start();
    let mut c = e.client();
    c.send(format!("GET /host HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes())
        .unwrap();
    let r = c.expect_response(host);
    assert_eq!(r.status, 200, "Host {host:?}: {}{}", r.head, r.text());
    assert_eq!(r.text(), format!("{upstream} GET /host"));
    e.probe();
    let (to, other) = if upstream == "main" {
        (&e.main, &e.alt)
    } else {
        (&e.alt, &e.main)
    };
    let seen = e.seen(to);
    assert_eq!(seen.len(), 1, "{seen:#?}");
    assert_eq!(seen[0].header_count("host"), 1, "{seen:#?}");
    assert!(e.seen(other).is_empty());
    e.finish();
}

#[test]
fn duplicate_host_is_400() {
    host_refused("Host: main.test\r\nHost: alt.test\r\n");
}

#[test]
fn duplicate_equal_host_is_400() {
    host_refused("Host: main.test\r\nHost: main.test\r\n");
}

#[test]
fn missing_host_on_http11_is_400() {
    host_refused("");
}

#[test]
fn host_with_path_and_space_is_400() {
    host_refused("Host: main.test/../x y\r\n");
}

#[test]
fn host_with_space_is_400() {
    host_refused("Host: a b\r\n");
}

#[test]
fn host_with_two_ports_is_400() {
    host_refused("Host: main.test:80:80\r\n");
}

#[test]
fn host_with_userinfo_is_400() {
    host_refused("Host: user@main.test\r\n");
}

#[test]
fn host_with_non_numeric_port_is_400() {
    host_refused("Host: main.test:abc\r\n");
}

#[test]
fn empty_host_is_400() {
    host_refused("Host: \r\n");
}

#[test]
fn host_with_unclosed_ipv6_bracket_is_400() {
    host_refused("Host: [::1\r\n");
}

#[test]
fn host_with_non_ascii_bytes_is_400() {
    let e = Edge::start();
    host_refused_by(&e, b"GET /host HTTP/1.1\r\nHost: ma\xffin.test\r\n\r\n");
    e.finish();
}

#[test]
fn uppercase_host_routes() {
    host_routes("ALT.test", "alt");
}

#[test]
fn host_with_port_routes() {
    host_routes("alt.test:8080", "alt");
}

#[test]
fn ipv6_host_with_port_routes_to_the_catch_all() {
    host_routes("[::1]:80", "main");
}

#[test]
fn ipv4_host_routes_to_the_catch_all() {
    host_routes("127.0.0.1", "main");
}

#[test]
fn http10_without_host_uses_the_catch_all_route() {
    let e = Edge::start();
    let mut c = e.client();
    c.send(b"GET /old HTTP/1.0\r\n\r\n").unwrap();
    let r = c.expect_response("HTTP/1.0 without Host");
    assert_eq!(
        (r.status, r.text().as_str()),
        (200, "main GET /old"),
        "{}",
        r.head
    );
    e.probe();
    assert_eq!(e.seen(&e.main).len(), 1);
    assert!(e.seen(&e.alt).is_empty());
    e.finish();
}

/// RFC 9112 §3.2.2: the authority of an absolute-form target wins over
/// `Host`; the backend gets origin-form and the matching `Host`.
#[test]
fn absolute_form_target_overrides_the_host_header() {
    let e = Edge::start();
    let mut c = e.client();
    c.send(b"GET http://alt.test/abs HTTP/1.1\r\nHost: main.test\r\n\r\n")
        .unwrap();
    let r = c.expect_response("absolute-form");
    assert_eq!(
        (r.status, r.text().as_str()),
        (200, "alt GET /abs"),
        "{}",
        r.head
    );
    e.probe();
    let seen = e.seen(&e.alt);
    assert_eq!(seen.len(), 1, "{seen:#?}");
    assert_eq!(seen[0].header("host"), Some("alt.test"), "{seen:#?}");
    assert_eq!(seen[0].header_count("host"), 1, "{seen:#?}");
    assert!(e.seen(&e.main).is_empty());
    e.finish();
}

async fn h2_get(u: &Usher, authority: &str, host: &str) -> Result<StatusCode, h2::Error> {
    let tcp = tokio::net::TcpStream::connect(u.addr).await.unwrap();
    let (send, conn) = h2::client::handshake(tcp).await?;
    tokio::spawn(conn);
    let mut send = send.ready().await?;
    let req = Request::get(format!("http://{authority}/h2"))
        .header("host", host)
        .body(())
        .unwrap();
    let (resp, _) = send.send_request(req, true)?;
    let resp = tokio::time::timeout(READ_TIMEOUT, resp)
        .await
        .expect("h2 response in time")?;
    Ok(resp.status())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_authority_conflicting_with_host_is_400() {
    let e = Edge::start();
    let status = h2_get(&e.usher, "alt.test", "main.test").await.unwrap();
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let e = tokio::task::spawn_blocking(move || {
        e.assert_backends_saw_nothing();
        e
    })
    .await
    .unwrap();
    e.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_authority_equal_to_host_is_200() {
    let e = Edge::start();
    let status = h2_get(&e.usher, "alt.test", "alt.test").await.unwrap();
    assert_eq!(status, StatusCode::OK);
    let e = tokio::task::spawn_blocking(move || {
        e.probe();
        let seen = e.seen(&e.alt);
        assert_eq!(seen.len(), 1, "{seen:#?}");
        assert_eq!(seen[0].header("host"), Some("alt.test"));
        assert!(e.seen(&e.main).is_empty());
        e
    })
    .await
    .unwrap();
    e.finish();
}

// ---------------------------------------------------------------------------
// Rule 8: oversized head and URI.

/// Writes `bytes` from a background thread (Usher stops reading part way)
/// and expects a non-empty answer with `status`, then the close.
fn oversized(bytes: Vec<u8>, status: u16, what: &str) {
    let e = Edge::start();
    let mut c = e.client();
    let writer = c.send_in_background(vec![bytes], Duration::ZERO);
    match c.response(READ_TIMEOUT) {
        Ok(r) => assert_eq!(r.status, status, "{what}: {}{}", r.head, r.text()),
        Err(err) => panic!("{what}: no response ({})", describe(&err)),
    }
    c.expect_closed(what, CLOSE_WAIT);
    drop(c);
    let _ = writer.join();
    e.assert_backends_saw_nothing();
    e.finish();
}

#[test]
fn oversized_header_is_431() {
    let req = format!(
        "GET /big HTTP/1.1\r\nHost: main.test\r\nX-Big: {}\r\n\r\n",
        "a".repeat(300 * 1024)
    );
    oversized(req.into_bytes(), 431, "300 KiB header");
}

#[test]
fn oversized_uri_is_431() {
    let req = format!(
        "GET /{} HTTP/1.1\r\nHost: main.test\r\n\r\n",
        "a".repeat(300 * 1024)
    );
    oversized(req.into_bytes(), 431, "300 KiB URI");
}

/// A URI longer than hyper's 64 KiB URI limit but inside its head buffer.
#[test]
fn long_uri_is_414() {
    let req = format!(
        "GET /{} HTTP/1.1\r\nHost: main.test\r\n\r\n",
        "a".repeat(100 * 1024)
    );
    oversized(req.into_bytes(), 414, "100 KiB URI");
}

// ---------------------------------------------------------------------------
// Rule 9: body limits.

const SMALL_BODY_LIMIT: &str = "limits: { max_request_body: 1KiB }";

#[test]
fn declared_body_over_the_limit_is_413_without_waiting_for_it() {
    let e = Edge::with(RecordingBackend::echo("main"), "", SMALL_BODY_LIMIT);
    let mut c = e.client();
    // The head only: the body never comes, so an answer proves Usher did
    // not wait for it.
    c.send(b"POST /big HTTP/1.1\r\nHost: main.test\r\nContent-Length: 2048\r\n\r\n")
        .unwrap();
    let r = c
        .response(Duration::from_secs(3))
        .unwrap_or_else(|err| panic!("no 413 before the body: {}", describe(&err)));
    assert_eq!(r.status, 413, "{}{}", r.head, r.text());
    c.expect_closed("after 413", CLOSE_WAIT);
    e.assert_backends_saw_nothing();
    e.finish();
}

#[test]
fn chunked_body_growing_over_the_limit_is_413() {
    let e = Edge::with(RecordingBackend::echo("main"), "", SMALL_BODY_LIMIT);
    let mut c = e.client();
    let chunk = format!("200\r\n{}\r\n", "a".repeat(512));
    // Three 512-byte chunks and no last chunk: over the limit either way.
    let _ = c.send(&chunked_post("chunked", &chunk.repeat(3)));
    let r = c
        .response(Duration::from_secs(3))
        .unwrap_or_else(|err| panic!("no 413: {}", describe(&err)));
    assert_eq!(r.status, 413, "{}{}", r.head, r.text());
    c.expect_closed("after 413", CLOSE_WAIT);
    e.assert_backends_saw_nothing();
    e.finish();
}

// ---------------------------------------------------------------------------
// Rule 10: slow clients.

#[test]
fn slow_header_is_closed_after_client_header_timeout() {
    let e = Edge::with(
        RecordingBackend::echo("main"),
        "",
        "timeouts: { client_header: 1s }",
    );
    let mut slow = e.client();
    slow.send(b"GET /slow HTTP/1.1\r\nHost: ma").unwrap();
    let started = Instant::now();
    // Meanwhile, other clients are served.
    let r = e.get("main.test", "/meanwhile");
    assert_eq!(r.status, 200);
    let after = slow.after(Duration::from_secs(5));
    let took = started.elapsed();
    // hyper closes without an answer, like nginx's client_header_timeout.
    assert!(after.is_closed(), "{after:?} after {took:?}");
    assert!(
        took >= Duration::from_millis(800) && took <= Duration::from_secs(3),
        "closed after {took:?}"
    );
    e.probe();
    let targets: Vec<String> = e.seen(&e.main).into_iter().map(|r| r.target).collect();
    assert_eq!(targets, ["/meanwhile"]);
    e.finish();
}

/// A keep-alive GET on `c`, answered in full.
fn keep_alive_get(c: &mut RawClient, path: &str) {
    c.send(format!("GET {path} HTTP/1.1\r\nHost: main.test\r\n\r\n").as_bytes())
        .unwrap();
    let r = c.expect_response(&format!("GET main.test{path}"));
    assert_eq!(r.status, 200, "{}", r.head);
}

#[test]
fn an_idle_keep_alive_connection_closes_after_client_keepalive_and_a_busy_one_stays() {
    let keepalive = Duration::from_secs(1);
    let e = Edge::with(
        RecordingBackend::echo("main"),
        "",
        "timeouts: { client_keepalive: 1s }",
    );
    // A request every 300 ms for 3 keep-alive periods: each one moves the
    // idle deadline, so the connection is never idle for a whole period.
    let mut busy = e.client();
    let started = Instant::now();
    let mut n = 0;
    while started.elapsed() < 3 * keepalive {
        keep_alive_get(&mut busy, &format!("/busy/{n}"));
        n += 1;
        std::thread::sleep(Duration::from_millis(300));
    }
    // Idle once done, after one request or after many (whose idle timer
    // was set for earlier waits): closed once the period has passed, not
    // before.
    let closes_when_idle = |what: &str, c: &mut RawClient| {
        keep_alive_get(c, "/last");
        let idle_since = Instant::now();
        let after = c.after(Duration::from_secs(5));
        let took = idle_since.elapsed();
        assert!(after.is_closed(), "{what}: {after:?} after {took:?}");
        assert!(
            took >= keepalive - Duration::from_millis(100) && took <= 3 * keepalive,
            "{what} closed {took:?} after its last request, client_keepalive is {keepalive:?}"
        );
    };
    closes_when_idle("a busy connection", &mut busy);
    closes_when_idle("a fresh one", &mut e.client());
    e.probe();
    e.finish();
}

#[test]
fn sigterm_closes_idle_keep_alive_connections_at_once() {
    let mut e = Edge::with(
        RecordingBackend::echo("main"),
        "",
        "timeouts: { client_keepalive: 60s, shutdown_grace: 20s }",
    );
    let mut idle: Vec<RawClient> = (0..3).map(|_| e.client()).collect();
    for (i, c) in idle.iter_mut().enumerate() {
        keep_alive_get(c, &format!("/before/{i}"));
    }
    let started = Instant::now();
    e.usher.proc.term();
    // Neither the keep-alive period nor the grace: an idle connection has
    // nothing left to finish.
    for c in &mut idle {
        c.expect_closed(
            "an idle keep-alive connection after SIGTERM",
            Duration::from_secs(5),
        );
    }
    let exit = e.usher.proc.wait_exit(Duration::from_secs(10));
    let took = started.elapsed();
    assert!(
        exit.is_some_and(|s| s.success()),
        "usher did not exit 0 after SIGTERM ({exit:?} after {took:?}):\n{}",
        e.usher.proc.output()
    );
    assert!(
        took < Duration::from_secs(10),
        "took {took:?} of a 20 s grace"
    );
    e.finish();
}

#[test]
fn slow_body_is_408_after_client_request_deadline() {
    let e = Edge::with(
        RecordingBackend::echo("main"),
        "",
        "timeouts: { client_body: 5s, client_request: 2s }",
    );
    let mut c = e.client();
    c.send(b"POST /trickle HTTP/1.1\r\nHost: main.test\r\nContent-Length: 100\r\n\r\n")
        .unwrap();
    let started = Instant::now();
    // One byte every 200 ms: never a 5 s gap, but 20 s in all.
    let writer = c.send_in_background(vec![b"x".to_vec(); 100], Duration::from_millis(200));
    let r = c
        .response(Duration::from_secs(8))
        .unwrap_or_else(|err| panic!("no 408: {}", describe(&err)));
    let took = started.elapsed();
    assert_eq!(r.status, 408, "{}{}", r.head, r.text());
    assert!(
        took >= Duration::from_millis(1800) && took <= Duration::from_secs(4),
        "408 after {took:?}"
    );
    c.expect_closed("after 408", CLOSE_WAIT);
    drop(c);
    let written = writer.join().unwrap();
    assert!(written < 100, "the whole body was accepted");
    e.assert_backends_saw_nothing();
    e.finish();
}

// ---------------------------------------------------------------------------
// Hostile backends. Usher never retries here (`attempts: 0`), so each
// client request is exactly one backend request.

/// A `main` backend answering `path` with `reply` and everything else with
/// the echo.
fn main_answering(path: &'static str, reply: Reply) -> RecordingBackend {
    RecordingBackend::start("main", move |r| {
        if r.target == path {
            reply.clone()
        } else {
            Reply::ok(format!("main {} {}", r.method, r.target))
        }
    })
}

/// `GET path` on `c` (keep-alive), and its response.
fn get_on(c: &mut RawClient, path: &str) -> Result<RawResponse, NoResponse> {
    c.send(format!("GET {path} HTTP/1.1\r\nHost: main.test\r\n\r\n").as_bytes())
        .expect("send GET");
    c.response(READ_TIMEOUT)
}

/// `path` gets `status` and the next request on the same client
/// connection is answered correctly, with no stray bytes before it.
fn hostile_then_next(e: &Edge, path: &str, status: u16) -> RawResponse {
    let mut c = e.client();
    let r = get_on(&mut c, path).unwrap_or_else(|err| panic!("{path}: {}", describe(&err)));
    assert_eq!(r.status, status, "{path}: {}{}", r.head, r.text());
    let next = get_on(&mut c, "/next")
        .unwrap_or_else(|err| panic!("the request after {path}: {}", describe(&err)));
    assert_eq!(
        (next.status, next.text().as_str()),
        (200, "main GET /next"),
        "{}",
        next.head
    );
    for resp in [&r, &next] {
        assert_eq!(resp.header("x-injected"), None, "{}", resp.head);
        assert!(!resp.text().contains("PWNED"), "{}", resp.text());
    }
    assert_eq!(c.after(Duration::from_millis(300)), After::Open);
    r
}

/// The classic response-splitting payload: Content-Length and chunked
/// together, the chunked body hiding a second response.
#[test]
fn backend_cl_te_response_is_502_and_never_spliced() {
    let payload = "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n\
                   3a\r\nhelloHTTP/1.1 200 OK\r\nContent-Length: 6\r\nX-Injected: 1\r\n\r\nPWNED!\r\n0\r\n\r\n";
    let e = Edge::with(main_answering("/split", Reply::raw(payload)), "", "");
    hostile_then_next(&e, "/split", 502);
    e.finish();
}

#[test]
fn backend_short_body_is_502() {
    let e = Edge::with(
        main_answering(
            "/short",
            Reply::raw_then_close("HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nhello"),
        ),
        "",
        "",
    );
    hostile_then_next(&e, "/short", 502);
    e.finish();
}

#[test]
fn backend_overlong_body_is_cut_to_its_content_length() {
    let e = Edge::with(
        main_answering(
            "/long",
            Reply::raw("HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabcdefghijk"),
        ),
        "",
        "",
    );
    let r = hostile_then_next(&e, "/long", 200);
    assert_eq!(r.text(), "abc");
    assert_eq!(r.header("content-length"), Some("3"), "{}", r.head);
    e.finish();
}

/// Bytes after a response's body, shaped as a whole response, must not
/// become the answer to the next request sent on that backend connection.
#[test]
fn backend_bytes_after_a_body_never_answer_the_next_request() {
    let e = Edge::with(
        main_answering(
            "/extra",
            Reply::raw(
                "HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n\
                 abcHTTP/1.1 200 OK\r\nContent-Length: 6\r\nX-Injected: 1\r\n\r\nPWNED!",
            ),
        ),
        "",
        "",
    );
    let r = hostile_then_next(&e, "/extra", 200);
    assert_eq!(r.text(), "abc");
    // Also on a fresh client connection (the backend connection may be pooled).
    for i in 0..3 {
        let r = e.get("main.test", &format!("/fresh{i}"));
        assert_eq!(
            (r.status, r.text()),
            (200, format!("main GET /fresh{i}")),
            "{}",
            r.head
        );
        assert_eq!(r.header("x-injected"), None);
    }
    e.finish();
}

#[test]
fn backend_garbage_status_code_is_502() {
    let e = Edge::with(
        main_answering("/bad", Reply::raw("HTTP/1.1 abc\r\n")),
        "",
        "",
    );
    hostile_then_next(&e, "/bad", 502);
    e.finish();
}

#[test]
fn backend_garbage_status_line_is_502() {
    let e = Edge::with(main_answering("/bad", Reply::raw("FOO\r\n\r\n")), "", "");
    hostile_then_next(&e, "/bad", 502);
    e.finish();
}

#[test]
fn backend_huge_response_head_is_502() {
    let mut head = String::from("HTTP/1.1 200 OK\r\n");
    for i in 0..12 {
        head.push_str(&format!("X-Pad-{i}: {}\r\n", "p".repeat(100 * 1024)));
    }
    head.push_str("Content-Length: 2\r\n\r\nok");
    let e = Edge::with(main_answering("/huge", Reply::raw(head)), "", "");
    hostile_then_next(&e, "/huge", 502);
    e.finish();
}

fn informational_first(status_line: &str) {
    let reply = Reply::raw(format!(
        "{status_line}\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfinal"
    ));
    let e = Edge::with(main_answering("/info", reply), "", "");
    let mut c = e.client();
    c.send(b"GET /info HTTP/1.1\r\nHost: main.test\r\n\r\n")
        .unwrap();
    let r = c
        .final_response(READ_TIMEOUT)
        .unwrap_or_else(|err| panic!("{status_line}: {}", describe(&err)));
    assert_eq!((r.status, r.text().as_str()), (200, "final"), "{}", r.head);
    let next = get_on(&mut c, "/next").unwrap();
    assert_eq!(next.text(), "main GET /next");
    e.finish();
}

#[test]
fn backend_100_continue_before_the_answer_is_skipped() {
    informational_first("HTTP/1.1 100 Continue");
}

#[test]
fn backend_103_early_hints_before_the_answer_are_skipped() {
    informational_first("HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload");
}

#[test]
fn backend_close_mid_buffered_body_is_502() {
    let e = Edge::with(
        main_answering(
            "/cut",
            Reply::raw_then_close(
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
            ),
        ),
        "",
        "",
    );
    hostile_then_next(&e, "/cut", 502);
    e.finish();
}

const STREAMING: &str = "limits: { max_response_buffer: 64KiB }";

/// A body too large to buffer, cut halfway by the backend: the client is
/// told its length, gets a true prefix of it, then the connection ends. It
/// never sees a complete-looking message.
fn streamed_cut(chunked: bool) {
    let len = 1 << 20;
    let cut = 512 << 10;
    let reply = Reply::Stream {
        len,
        chunked,
        cut_at: Some(cut),
    };
    let e = Edge::with(main_answering("/stream", reply), "", STREAMING);
    let mut c = e.client();
    c.send(b"GET /stream HTTP/1.1\r\nHost: main.test\r\n\r\n")
        .unwrap();
    match c.response(Duration::from_secs(20)) {
        Err(NoResponse::Cut { response, end }) => {
            assert_eq!(response.status, 200, "{}", response.head);
            assert!(matches!(end, End::Eof | End::Reset), "{end:?}");
            if !chunked {
                assert_eq!(
                    response.header("content-length"),
                    Some(len.to_string().as_str()),
                    "{}",
                    response.head
                );
            }
            let got = response.body.len();
            assert!(got < len as usize, "got {got} bytes");
            let mut want = vec![0u8; got];
            pattern(0, &mut want);
            assert!(
                response.body == want,
                "the bytes received are not what the backend sent"
            );
        }
        Ok(r) => panic!(
            "a cut body arrived as a complete message: {} with {} bytes",
            r.head, r.digest.len
        ),
        Err(other) => panic!("{}", describe(&other)),
    }
    e.finish();
}

#[test]
fn streamed_response_cut_midway_aborts_the_client_connection() {
    streamed_cut(false);
}

#[test]
fn streamed_chunked_response_cut_midway_never_ends_cleanly() {
    streamed_cut(true);
}

#[test]
fn backend_hang_is_504_after_the_response_timeout() {
    let e = Edge::with(
        main_answering("/hang", Reply::Hang),
        "    timeouts: { connect: 1s, response: 1s }",
        "",
    );
    let mut c = e.client();
    let started = Instant::now();
    let r = get_on(&mut c, "/hang").unwrap_or_else(|err| panic!("{}", describe(&err)));
    let took = started.elapsed();
    assert_eq!(r.status, 504, "{}{}", r.head, r.text());
    assert!(
        took >= Duration::from_millis(900) && took <= Duration::from_secs(4),
        "504 after {took:?}"
    );
    e.finish();
}

// ---------------------------------------------------------------------------
// Rule 14: streaming downloads.

fn streamed_download(chunked: bool) {
    let len: u64 = 64 << 20;
    let reply = Reply::Stream {
        len,
        chunked,
        cut_at: None,
    };
    let e = Edge::with(main_answering("/download", reply), "", STREAMING);
    let mut c = e.client();
    c.send(b"GET /download HTTP/1.1\r\nHost: main.test\r\n\r\n")
        .unwrap();
    let r = c
        .response_digest(Duration::from_secs(60))
        .unwrap_or_else(|err| panic!("download: {}", describe(&err)));
    assert_eq!(r.status, 200, "{}", r.head);
    if !chunked {
        assert_eq!(r.header("content-length"), Some("67108864"), "{}", r.head);
    }
    assert_eq!(r.digest.len, len);
    // The backend records its digest once its last write returns, which
    // may be just after the client has read the last byte.
    wait_until(Duration::from_secs(5), || !e.main.sent().is_empty());
    assert_eq!(
        vec![r.digest],
        e.main.sent(),
        "the bytes differ from the backend's"
    );
    e.finish();
}

#[test]
fn streamed_64mib_content_length_body_arrives_intact() {
    streamed_download(false);
}

#[test]
fn streamed_64mib_chunked_body_arrives_intact() {
    streamed_download(true);
}

// ---------------------------------------------------------------------------
// Rule 15: HTTP/2 floods on h2c, with hand-written frames.

mod frames {
    pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    pub const HEADERS: u8 = 0x1;
    pub const RST_STREAM: u8 = 0x3;
    pub const SETTINGS: u8 = 0x4;
    pub const GOAWAY: u8 = 0x7;
    pub const CONTINUATION: u8 = 0x9;
    pub const END_STREAM: u8 = 0x1;
    pub const END_HEADERS: u8 = 0x4;
    pub const CANCEL: u32 = 0x8;
    pub const ENHANCE_YOUR_CALM: u32 = 0xb;

    pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len() as u32;
        let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    /// `GET http://{authority}{path}` as an HPACK block: static-table
    /// `:method GET` and `:scheme http`, then `:path` and `:authority` as
    /// literals without indexing (name from the static table, raw value).
    pub fn get_block(authority: &str, path: &str) -> Vec<u8> {
        let mut b = vec![0x82, 0x86];
        for (index, value) in [(0x04u8, path), (0x01, authority)] {
            assert!(value.len() < 127);
            b.push(index);
            b.push(value.len() as u8);
            b.extend_from_slice(value.as_bytes());
        }
        b
    }

    /// The GOAWAY error code in `buf` (frames from the server), if any.
    pub fn goaway(buf: &[u8]) -> Option<u32> {
        let mut at = 0;
        while buf.len() >= at + 9 {
            let len = (usize::from(buf[at]) << 16)
                | (usize::from(buf[at + 1]) << 8)
                | usize::from(buf[at + 2]);
            let kind = buf[at + 3];
            let payload = buf.get(at + 9..at + 9 + len)?;
            if kind == GOAWAY && len >= 8 {
                return Some(u32::from_be_bytes(payload[4..8].try_into().unwrap()));
            }
            at += 9 + len;
        }
        None
    }
}

/// Reads from `c` until the connection closes or `timeout` passes; returns
/// what was read and whether it closed.
fn drain(c: &mut RawClient, timeout: Duration) -> (Vec<u8>, bool) {
    let deadline = Instant::now() + timeout;
    let mut got = Vec::new();
    while Instant::now() < deadline {
        match c.after(deadline.saturating_duration_since(Instant::now())) {
            After::Bytes(b) => got.extend_from_slice(&b),
            After::Eof | After::Reset => return (got, true),
            After::Open => break,
        }
    }
    (got, false)
}

/// CVE-2023-44487: thousands of streams opened and at once reset.
#[test]
fn h2_rapid_reset_gets_goaway_and_others_are_served() {
    use frames::*;
    let e = Edge::start();
    let mut c = e.client();
    let mut hello = PREFACE.to_vec();
    hello.extend(frame(SETTINGS, 0, 0, &[]));
    c.send(&hello).unwrap();
    let streams = 5000u32;
    let mut burst = Vec::new();
    for i in 0..streams {
        let id = 2 * i + 1;
        let block = get_block("main.test", &format!("/reset/{i}"));
        burst.extend(frame(HEADERS, END_STREAM | END_HEADERS, id, &block));
        burst.extend(frame(RST_STREAM, 0, id, &CANCEL.to_be_bytes()));
    }
    let total = burst.len() as u64;
    let writer = c.send_in_background(vec![burst], Duration::ZERO);
    let (got, closed) = drain(&mut c, Duration::from_secs(10));
    assert!(closed, "the connection is still open after the burst");
    let written = writer.join().unwrap();
    let goaway = frames::goaway(&got);
    // Sent before the close, so still readable even if the close was a reset.
    assert_eq!(
        goaway,
        Some(ENHANCE_YOUR_CALM),
        "wrote {written} of {total} bytes"
    );
    e.probe();
    let forwarded = e
        .seen(&e.main)
        .iter()
        .filter(|r| r.target.starts_with("/reset/"))
        .count();
    assert!(
        forwarded < streams as usize / 10,
        "{forwarded} of {streams} reset streams were forwarded (wrote {written} of {total} bytes, GOAWAY {goaway:?})"
    );
    e.finish();
}

/// HEADERS without END_HEADERS, then CONTINUATION frames without it,
/// 16 MiB in all: Usher must stop reading long before the end.
#[test]
fn h2_continuation_flood_is_cut_off_and_others_are_served() {
    use frames::*;
    let e = Edge::start();
    let mut c = e.client();
    let mut flood = PREFACE.to_vec();
    flood.extend(frame(SETTINGS, 0, 0, &[]));
    flood.extend(frame(
        HEADERS,
        END_STREAM,
        1,
        &get_block("main.test", "/flood"),
    ));
    let filler = vec![b'a'; 16 * 1024];
    let frames_count = 1024;
    let mut parts = vec![flood];
    for _ in 0..frames_count {
        parts.push(frame(CONTINUATION, 0, 1, &filler));
    }
    let total: u64 = parts.iter().map(|p| p.len() as u64).sum();
    let writer = c.send_in_background(parts, Duration::ZERO);
    let (got, closed) = drain(&mut c, Duration::from_secs(15));
    assert!(closed, "the connection is still open during the flood");
    drop(c);
    let written = writer.join().unwrap();
    assert!(
        written < total,
        "all {total} bytes of CONTINUATION were accepted"
    );
    let goaway = frames::goaway(&got);
    assert_eq!(
        goaway,
        Some(ENHANCE_YOUR_CALM),
        "wrote {written} of {total} bytes"
    );
    e.assert_backends_saw_nothing();
    e.finish();
}

// ---------------------------------------------------------------------------
// Beyond the spec: more framing confusion from clients.

#[test]
fn conflicting_content_lengths_are_400() {
    refused(
        b"POST /cl HTTP/1.1\r\nHost: main.test\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello",
        400,
    );
}

#[test]
fn content_length_list_with_different_values_is_400() {
    refused(
        b"POST /cl HTTP/1.1\r\nHost: main.test\r\nContent-Length: 5, 6\r\n\r\nhello",
        400,
    );
}

#[test]
fn content_length_with_plus_sign_is_400() {
    refused(
        b"POST /cl HTTP/1.1\r\nHost: main.test\r\nContent-Length: +5\r\n\r\nhello",
        400,
    );
}

#[test]
fn te_with_vertical_tab_is_400() {
    refused(&chunked_post("\x0bchunked", HELLO), 400);
}

#[test]
fn host_with_space_before_colon_is_400() {
    refused(b"GET /host HTTP/1.1\r\nHost : main.test\r\n\r\n", 400);
}

#[test]
fn too_many_headers_is_431() {
    let mut req = String::from("GET /many HTTP/1.1\r\nHost: main.test\r\n");
    for i in 0..200 {
        req.push_str(&format!("X-N-{i}: 1\r\n"));
    }
    req.push_str("\r\n");
    refused(req.as_bytes(), 431);
}

/// Every request line of a client that Usher does not own reaches the
/// backend, in order and whole (each `Cookie` its own line, an empty value
/// kept); hop-by-hop lines, those `Connection` names, and the client's own
/// `X-Forwarded-*`, `X-Request-Id` and `X-Request-Start` do not.
#[test]
fn client_request_lines_reach_the_backend_but_hop_by_hop_and_usher_s_own() {
    let e = Edge::start();
    let seen = accepted(
        &e,
        b"GET /lines HTTP/1.1\r\nHost: main.test\r\nCookie: a=1\r\nX-App:  one\r\n\
          Keep-Alive: timeout=1\r\nCookie:b=2\r\nX-Forwarded-For: 6.6.6.6\r\n\
          X-Request-Start: t=1\r\nX-Empty:\r\nX-Forwarded-Host: evil.test\r\n\
          Accept: */*\r\n\r\n",
        "GET",
        "/lines",
    );
    assert_eq!(seen.header_values("cookie"), ["a=1", "b=2"], "{seen:#?}");
    assert_eq!(seen.header("x-app"), Some("one"), "{seen:#?}");
    assert_eq!(seen.header("x-empty"), Some(""), "{seen:#?}");
    assert_eq!(seen.header("accept"), Some("*/*"), "{seen:#?}");
    assert_eq!(seen.header("keep-alive"), None, "{seen:#?}");
    for name in [
        "x-forwarded-for",
        "x-forwarded-host",
        "x-request-start",
        "host",
    ] {
        assert_eq!(seen.header_count(name), 1, "{name}: {seen:#?}");
    }
    assert!(seen
        .header("x-forwarded-for")
        .is_some_and(|v| v.ends_with("127.0.0.1")));
    assert_eq!(
        seen.header("x-forwarded-host"),
        Some("main.test"),
        "{seen:#?}"
    );
    assert_ne!(seen.header("x-request-start"), Some("t=1"), "{seen:#?}");

    e.finish();

    // A `Connection` header may name any line: the one it names is dropped.
    let e = Edge::start();
    let seen = accepted(
        &e,
        b"GET /named HTTP/1.1\r\nHost: main.test\r\nX-Secret: 1\r\nX-App: two\r\n\
          Connection: x-secret\r\n\r\n",
        "GET",
        "/named",
    );
    assert_eq!(seen.header("x-secret"), None, "{seen:#?}");
    assert_eq!(seen.header("x-app"), Some("two"), "{seen:#?}");
    e.finish();
}

/// `Connection` may name hop-by-hop headers for the proxy to drop; naming
/// the framing or the Host must not change what the backend gets.
#[test]
fn connection_naming_content_length_keeps_the_framing() {
    let e = Edge::start();
    let seen = accepted(
        &e,
        b"POST /conn HTTP/1.1\r\nHost: main.test\r\nConnection: Content-Length\r\n\
          Content-Length: 5\r\n\r\nhello",
        "POST",
        "/conn",
    );
    assert_reframed(&seen, b"hello");
    e.finish();
}

#[test]
fn connection_naming_host_keeps_the_host() {
    let e = Edge::start();
    let seen = accepted(
        &e,
        b"GET /conn HTTP/1.1\r\nHost: main.test\r\nConnection: Host\r\n\r\n",
        "GET",
        "/conn",
    );
    assert_eq!(seen.header("host"), Some("main.test"), "{seen:#?}");
    e.finish();
}

/// A body over the limit is refused before the client is invited to send it.
#[test]
fn expect_continue_over_the_limit_is_413_without_100() {
    let e = Edge::with(RecordingBackend::echo("main"), "", SMALL_BODY_LIMIT);
    let mut c = e.client();
    c.send(
        b"POST /big HTTP/1.1\r\nHost: main.test\r\nContent-Length: 2048\r\n\
          Expect: 100-continue\r\n\r\n",
    )
    .unwrap();
    let r = c
        .response(Duration::from_secs(3))
        .unwrap_or_else(|err| panic!("no answer: {}", describe(&err)));
    assert_eq!(r.status, 413, "{}", r.head);
    c.expect_closed("after 413", CLOSE_WAIT);
    e.assert_backends_saw_nothing();
    e.finish();
}

/// RFC 9110 §4.2.4: userinfo in an http URI is to be treated as an error.
#[test]
fn absolute_form_with_userinfo_is_400() {
    refused(
        b"GET http://alt.test@main.test/abs HTTP/1.1\r\nHost: main.test\r\n\r\n",
        400,
    );
}

#[test]
fn http2_version_in_an_http1_request_line_is_refused() {
    refused(b"GET / HTTP/2.0\r\nHost: main.test\r\n\r\n", 400);
}

// ---------------------------------------------------------------------------
// Beyond the spec: more hostile backends.

/// The response-splitting payload with a chunk size that matches its data:
/// a chunked framer gets a clean 64-byte body holding a second response.
#[test]
fn backend_cl_te_response_with_valid_chunks_is_502() {
    let payload = "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n\
                   40\r\nhelloHTTP/1.1 200 OK\r\nContent-Length: 6\r\nX-Injected: 1\r\n\r\nPWNED!\r\n0\r\n\r\n";
    let e = Edge::with(main_answering("/split", Reply::raw(payload)), "", "");
    hostile_then_next(&e, "/split", 502);
    e.finish();
}

const INJECTED: &str = "HTTP/1.1 200 OK\r\nContent-Length: 6\r\nX-Injected: 1\r\n\r\nPWNED!";

/// A response to HEAD carries no body: bytes after its head, shaped as a
/// response, must not answer a later request.
#[test]
fn backend_body_after_a_head_response_never_answers_the_next_request() {
    let reply = Reply::raw(format!(
        "HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\n{INJECTED}"
    ));
    let e = Edge::with(main_answering("/head", reply), "", "");
    let mut c = e.client();
    c.send(b"HEAD /head HTTP/1.1\r\nHost: main.test\r\n\r\n")
        .unwrap();
    let r = c
        .head_response(READ_TIMEOUT)
        .unwrap_or_else(|err| panic!("HEAD: {}", describe(&err)));
    assert_eq!(r.status, 200, "{}", r.head);
    for i in 0..3 {
        let next = get_on(&mut c, &format!("/next{i}"))
            .unwrap_or_else(|err| panic!("after HEAD: {}", describe(&err)));
        assert_eq!(
            (next.status, next.text()),
            (200, format!("main GET /next{i}")),
            "{}",
            next.head
        );
        assert_eq!(next.header("x-injected"), None);
    }
    assert_eq!(c.after(Duration::from_millis(300)), After::Open);
    e.finish();
}

/// Likewise a 204, which has no body whatever its Content-Length says.
#[test]
fn backend_body_after_a_204_never_answers_the_next_request() {
    let reply = Reply::raw(format!(
        "HTTP/1.1 204 No Content\r\nContent-Length: {}\r\n\r\n{INJECTED}",
        INJECTED.len()
    ));
    let e = Edge::with(main_answering("/nocontent", reply), "", "");
    hostile_then_next(&e, "/nocontent", 204);
    for i in 0..3 {
        let r = e.get("main.test", &format!("/fresh{i}"));
        assert_eq!(r.text(), format!("main GET /fresh{i}"), "{}", r.head);
    }
    e.finish();
}

/// A body delimited by the backend's close is framed by Usher for the
/// client, which keeps its connection.
#[test]
fn backend_close_delimited_response_is_reframed() {
    let e = Edge::with(
        main_answering(
            "/old",
            Reply::raw_then_close("HTTP/1.0 200 OK\r\n\r\nhello"),
        ),
        "",
        "",
    );
    let r = hostile_then_next(&e, "/old", 200);
    assert_eq!(r.text(), "hello");
    assert_eq!(r.header("content-length"), Some("5"), "{}", r.head);
    e.finish();
}

#[test]
fn backend_non_chunked_transfer_encoding_is_502() {
    let e = Edge::with(
        main_answering(
            "/gzip",
            Reply::raw_then_close("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nhello"),
        ),
        "",
        "",
    );
    hostile_then_next(&e, "/gzip", 502);
    e.finish();
}

#[test]
fn backend_conflicting_content_lengths_are_502() {
    let e = Edge::with(
        main_answering(
            "/cl",
            Reply::raw("HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nokk"),
        ),
        "",
        "",
    );
    hostile_then_next(&e, "/cl", 502);
    e.finish();
}

#[test]
fn backend_bare_cr_in_a_response_header_is_502() {
    let e = Edge::with(
        main_answering(
            "/cr",
            Reply::raw("HTTP/1.1 200 OK\r\nX-A: b\rX-Injected: 1\r\nContent-Length: 2\r\n\r\nok"),
        ),
        "",
        "",
    );
    hostile_then_next(&e, "/cr", 502);
    e.finish();
}

#[test]
fn backend_obs_fold_in_a_response_header_is_502() {
    let e = Edge::with(
        main_answering(
            "/fold",
            Reply::raw(
                "HTTP/1.1 200 OK\r\nX-A: b\r\n X-Injected: 1\r\nContent-Length: 2\r\n\r\nok",
            ),
        ),
        "",
        "",
    );
    hostile_then_next(&e, "/fold", 502);
    e.finish();
}

#[test]
fn backend_nul_in_a_response_header_is_502() {
    let e = Edge::with(
        main_answering(
            "/nul",
            Reply::raw("HTTP/1.1 200 OK\r\nX-A: b\0c\r\nContent-Length: 2\r\n\r\nok"),
        ),
        "",
        "",
    );
    hostile_then_next(&e, "/nul", 502);
    e.finish();
}

// ---------------------------------------------------------------------------
// Beyond the spec: h2 requests no h2 library would send. Usher relays them
// as HTTP/1.1, where a CRLF in a field or a stray framing header would be a
// smuggling vector.

#[derive(Debug, PartialEq, Eq)]
enum H2Outcome {
    Status(u16),
    /// RST_STREAM on the request's stream, with its error code.
    Reset(u32),
    GoAway(u32),
    /// Closed with neither.
    Closed,
    /// A HEADERS frame whose `:status` this decoder cannot read.
    Undecoded(Vec<u8>),
}

/// The `:status` of an HPACK block sent by h2 as the first field of a
/// fresh connection: static-table indexed, or a literal with the static
/// `:status` name and a raw or Huffman-coded value.
fn hpack_status(block: &[u8]) -> Option<u16> {
    const INDEXED: [u16; 7] = [200, 204, 206, 304, 400, 404, 500];
    let first = *block.first()?;
    if (0x88..=0x8e).contains(&first) {
        return Some(INDEXED[usize::from(first - 0x88)]);
    }
    if !matches!(first, 0x48 | 0x08 | 0x18) {
        return None;
    }
    let len = usize::from(block.get(1)? & 0x7f);
    let value = block.get(2..2 + len)?;
    let text = if block[1] & 0x80 == 0 {
        String::from_utf8(value.to_vec()).ok()?
    } else {
        huffman_digits(value)
    };
    text.parse().ok()
}

/// Decodes HPACK Huffman codes for the digits only ('0'–'2' are 5 bits,
/// '3'–'9' 6 bits), stopping at the padding.
fn huffman_digits(bytes: &[u8]) -> String {
    let mut bits = bytes
        .iter()
        .flat_map(|b| (0..8).rev().map(move |i| (b >> i) & 1));
    let mut out = String::new();
    'codes: loop {
        let mut v = 0u8;
        for _ in 0..5 {
            match bits.next() {
                Some(b) => v = v << 1 | b,
                None => break 'codes,
            }
        }
        if v <= 2 {
            out.push(char::from(b'0' + v));
            continue;
        }
        let Some(b) = bits.next() else { break };
        let w = v << 1 | b;
        if !(25..=31).contains(&w) {
            break;
        }
        out.push(char::from(b'0' + 3 + (w - 25)));
    }
    out
}

/// The server's answer on stream 1 in `buf`, if complete.
fn h2_outcome(buf: &[u8]) -> Option<H2Outcome> {
    let mut at = 0;
    while buf.len() >= at + 9 {
        let len = (usize::from(buf[at]) << 16)
            | (usize::from(buf[at + 1]) << 8)
            | usize::from(buf[at + 2]);
        let (kind, stream) = (
            buf[at + 3],
            u32::from_be_bytes(buf[at + 5..at + 9].try_into().unwrap()) & 0x7fff_ffff,
        );
        let payload = buf.get(at + 9..at + 9 + len)?;
        let code = |p: &[u8]| u32::from_be_bytes(p[..4].try_into().unwrap());
        match (kind, stream) {
            (frames::HEADERS, 1) => {
                return Some(
                    hpack_status(payload)
                        .map_or_else(|| H2Outcome::Undecoded(payload.to_vec()), H2Outcome::Status),
                )
            }
            (frames::RST_STREAM, 1) if len >= 4 => return Some(H2Outcome::Reset(code(payload))),
            (frames::GOAWAY, 0) if len >= 8 => return Some(H2Outcome::GoAway(code(&payload[4..]))),
            _ => {}
        }
        at += 9 + len;
    }
    None
}

/// Sends one request on stream 1 (`block`, then `data` if any) over a
/// fresh h2c connection, and reads Usher's answer to it.
fn h2_raw_request(e: &Edge, block: &[u8], data: Option<&[u8]>) -> H2Outcome {
    use frames::*;
    let mut c = e.client();
    let mut out = PREFACE.to_vec();
    out.extend(frame(SETTINGS, 0, 0, &[]));
    let flags = if data.is_some() {
        END_HEADERS
    } else {
        END_HEADERS | END_STREAM
    };
    out.extend(frame(HEADERS, flags, 1, block));
    if let Some(d) = data {
        out.extend(frame(0x0, END_STREAM, 1, d));
    }
    c.send(&out).unwrap();
    let deadline = Instant::now() + READ_TIMEOUT;
    let mut got = Vec::new();
    loop {
        if let Some(o) = h2_outcome(&got) {
            return o;
        }
        match c.after(deadline.saturating_duration_since(Instant::now())) {
            After::Bytes(b) => got.extend_from_slice(&b),
            After::Eof | After::Reset => return H2Outcome::Closed,
            After::Open => panic!("no answer on stream 1 within {READ_TIMEOUT:?}"),
        }
    }
}

/// A literal header field without indexing, new name.
fn literal(name: &str, value: &[u8]) -> Vec<u8> {
    assert!(name.len() < 127 && value.len() < 127);
    let mut b = vec![0x00, name.len() as u8];
    b.extend_from_slice(name.as_bytes());
    b.push(value.len() as u8);
    b.extend_from_slice(value);
    b
}

const PROTOCOL_ERROR: u32 = 0x1;

/// The well-formed raw request is answered, so the refusals below are
/// about their one bad field.
#[test]
fn h2_raw_request_is_answered() {
    let e = Edge::start();
    let outcome = h2_raw_request(&e, &frames::get_block("main.test", "/raw"), None);
    assert_eq!(outcome, H2Outcome::Status(200));
    e.probe();
    assert_eq!(e.seen(&e.main).len(), 1);
    e.finish();
}

/// The request is refused with `expected` (a stream reset, or a GOAWAY
/// where h2 deems the header block itself malformed), and no backend sees
/// a byte of it.
fn h2_refused(block: Vec<u8>, data: Option<&[u8]>, expected: H2Outcome) {
    let e = Edge::start();
    let outcome = h2_raw_request(&e, &block, data);
    assert_eq!(outcome, expected);
    e.assert_backends_saw_nothing();
    assert!(!e.main.saw(b"X-Injected") && !e.main.saw(b"x-injected"));
    e.finish();
}

#[test]
fn h2_header_value_with_crlf_is_refused() {
    let mut block = frames::get_block("main.test", "/crlf");
    block.extend(literal("x-a", b"b\r\nX-Injected: 1"));
    h2_refused(block, None, H2Outcome::GoAway(PROTOCOL_ERROR));
}

#[test]
fn h2_path_with_crlf_is_refused() {
    h2_refused(
        frames::get_block(
            "main.test",
            "/a HTTP/1.1\r\nHost: alt.test\r\n\r\nGET /hidden",
        ),
        None,
        H2Outcome::Reset(PROTOCOL_ERROR),
    );
}

#[test]
fn h2_transfer_encoding_header_is_refused() {
    let mut block = frames::get_block("main.test", "/te");
    block.extend(literal("transfer-encoding", b"chunked"));
    h2_refused(block, None, H2Outcome::Reset(PROTOCOL_ERROR));
}

#[test]
fn h2_uppercase_header_name_is_refused() {
    let mut block = frames::get_block("main.test", "/upper");
    block.extend(literal("X-Upper", b"1"));
    h2_refused(block, None, H2Outcome::GoAway(PROTOCOL_ERROR));
}

#[test]
fn h2_content_length_longer_than_the_data_is_refused() {
    // `:method POST` is static entry 3.
    let mut block = frames::get_block("main.test", "/cl");
    block[0] = 0x83;
    block.extend(literal("content-length", b"10"));
    h2_refused(block, Some(b"hello"), H2Outcome::Reset(PROTOCOL_ERROR));
}

// ---------------------------------------------------------------------------
// Beyond the spec: upgrade requests go their own way (`upgrade.rs`), so
// their framing is checked on its own.

fn upgrade_request(path: &str, extra: &str) -> Vec<u8> {
    format!(
        "GET {path} HTTP/1.1\r\nHost: main.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
    )
    .into_bytes()
}

#[test]
fn upgrade_request_with_a_chunked_body_is_400() {
    let mut req = upgrade_request("/ws", "Transfer-Encoding: chunked\r\n");
    let smuggled = SMUGGLED.as_bytes();
    req.extend(format!("{:x}\r\n", smuggled.len()).as_bytes());
    req.extend(smuggled);
    req.extend(b"\r\n0\r\n\r\n");
    refused(&req, 400);
}

#[test]
fn upgrade_request_with_a_content_length_body_is_400() {
    let mut req = upgrade_request("/ws", &format!("Content-Length: {}\r\n", SMUGGLED.len()));
    req.extend(SMUGGLED.as_bytes());
    refused(&req, 400);
}

/// The backend declines the upgrade with the response-splitting payload:
/// the client must get Usher's framing, never the backend's. (A relayed
/// `Content-Length: 5` beside the 64-byte de-chunked body makes hyper
/// panic in a debug build, and in a release build write `hello` as the
/// whole answer and the hidden response after it, as the next one.)
#[test]
fn declined_upgrade_with_a_cl_te_response_is_502_and_never_spliced() {
    let payload = "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n\
                   40\r\nhelloHTTP/1.1 200 OK\r\nContent-Length: 6\r\nX-Injected: 1\r\n\r\nPWNED!\r\n0\r\n\r\n";
    let e = Edge::with(main_answering("/ws-split", Reply::raw(payload)), "", "");
    let mut c = e.client();
    c.send(&upgrade_request("/ws-split", "")).unwrap();
    let r = c.expect_response("declined upgrade with CL+TE");
    let rest = c.after(CLOSE_WAIT);
    assert_eq!(r.header("x-injected"), None, "{}", r.head);
    let after = match &rest {
        After::Bytes(b) => String::from_utf8_lossy(b).into_owned(),
        _ => String::new(),
    };
    assert!(
        !r.text().contains("PWNED") && !after.contains("PWNED"),
        "the backend's second response reached the client: {}{} then {after:?}",
        r.head,
        r.text()
    );
    assert_eq!(r.status, 502, "{}{}", r.head, r.text());
    assert!(rest.is_closed(), "{rest:?}");
    e.finish();
}

/// A declined upgrade whose body disagrees with the backend's
/// Content-Length: the client gets one self-consistent message.
#[test]
fn declined_upgrade_with_a_short_content_length_is_framed_by_usher() {
    let e = Edge::with(
        main_answering(
            "/ws-long",
            Reply::raw(format!(
                "HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc{INJECTED}"
            )),
        ),
        "",
        "",
    );
    let mut c = e.client();
    c.send(&upgrade_request("/ws-long", "")).unwrap();
    let r = c.expect_response("declined upgrade with extra bytes");
    assert_eq!((r.status, r.text().as_str()), (200, "abc"), "{}", r.head);
    assert_eq!(r.header("content-length"), Some("3"), "{}", r.head);
    c.expect_closed("after the declined upgrade", CLOSE_WAIT);
    e.finish();
}

/// A 304's Content-Length describes the representation and stays, but the
/// message has no body: the next response starts right after its head.
#[test]
fn backend_304_with_a_content_length_is_relayed_without_a_body() {
    let reply =
        Reply::raw("HTTP/1.1 304 Not Modified\r\nContent-Length: 1234\r\nETag: \"x\"\r\n\r\n");
    let e = Edge::with(main_answering("/cached", reply), "", "");
    let r = hostile_then_next(&e, "/cached", 304);
    assert!(r.body.is_empty());
    e.finish();
}

#[test]
fn duplicate_equal_content_lengths_reach_the_backend_as_one() {
    let e = Edge::start();
    let seen = accepted(
        &e,
        b"POST /cl HTTP/1.1\r\nHost: main.test\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
        "POST",
        "/cl",
    );
    assert_reframed(&seen, b"hello");
    assert_eq!(seen.header_count("content-length"), 1, "{seen:#?}");
    e.finish();
}

/// `:authority` is held to the same rules as `Host`.
#[test]
fn h2_authority_with_userinfo_is_400() {
    let e = Edge::start();
    let outcome = h2_raw_request(&e, &frames::get_block("user@alt.test", "/h2"), None);
    assert_eq!(outcome, H2Outcome::Status(400));
    e.assert_backends_saw_nothing();
    e.finish();
}

#[test]
fn h2_without_authority_or_host_is_400() {
    let e = Edge::start();
    // `:method GET`, `:scheme http`, `:path /` (static entry 4), nothing else.
    let outcome = h2_raw_request(&e, &[0x82, 0x86, 0x84], None);
    assert_eq!(outcome, H2Outcome::Status(400));
    e.assert_backends_saw_nothing();
    e.finish();
}

#[test]
fn h2_two_host_headers_are_400() {
    let e = Edge::start();
    let mut block = frames::get_block("alt.test", "/h2");
    block.extend(literal("host", b"alt.test"));
    block.extend(literal("host", b"main.test"));
    let outcome = h2_raw_request(&e, &block, None);
    assert_eq!(outcome, H2Outcome::Status(400));
    e.assert_backends_saw_nothing();
    e.finish();
}

/// The backend trusts what Usher tells it about a request (who sent it, over
/// what, for which host, under which id), so a client's own versions of
/// those headers never reach it beside Usher's: one of each, Usher's values,
/// the client's `X-Forwarded-For` kept as the start of the list. An
/// absolute-form target routes, and is the `Host` the backend gets.
#[test]
fn the_backend_gets_usher_s_forwarding_headers_never_the_client_s() {
    let e = Edge::start();
    let spoofed = "X-Forwarded-For: 6.6.6.6\r\nX-Forwarded-For: 7.7.7.7\r\n\
                   X-Forwarded-Proto: https\r\nX-Forwarded-Host: evil.test\r\n\
                   X-Request-Id: trace-1\r\nConnection: close, X-Secret\r\nX-Secret: hop\r\n";
    for (target, host, backend, routed) in [
        ("/who", "main.test", &e.main, "main.test"),
        ("http://alt.test/who", "main.test", &e.alt, "alt.test"),
    ] {
        let mut c = e.client();
        c.send(format!("GET {target} HTTP/1.1\r\nHost: {host}\r\n{spoofed}\r\n").as_bytes())
            .unwrap();
        let r = c.expect_response(&format!("GET {target} with spoofed forwarding headers"));
        assert_eq!(r.status, 200, "{}", r.head);
        assert_eq!(r.header("x-request-id"), Some("trace-1"));
        let seen = backend.requests();
        let req = seen
            .iter()
            .find(|r| r.target == "/who")
            .unwrap_or_else(|| panic!("{} got no /who: {seen:?}", backend.name()));
        for (name, want) in [
            ("host", routed),
            ("x-forwarded-for", "6.6.6.6, 7.7.7.7, 127.0.0.1"),
            ("x-forwarded-proto", "http"),
            ("x-forwarded-host", routed),
            ("x-request-id", "trace-1"),
        ] {
            assert_eq!(req.header(name), Some(want), "{name} for {target}: {req:?}");
            assert_eq!(
                req.header_count(name),
                1,
                "one {name} for {target}: {req:?}"
            );
        }
        assert_eq!(
            req.header_count("x-secret"),
            0,
            "a Connection-named header passed"
        );
    }
    e.finish();
}

/// A worker's load report (`X-Usher-Load`) is for Usher alone: it reaches no
/// client, on the answers to an upgrade request either, declined or not.
#[test]
fn the_load_report_never_reaches_a_client_on_an_upgrade() {
    let declined = "HTTP/1.1 200 OK\r\nX-Usher-Load: threads=4, busy=1, queued=0\r\n\
                    Content-Length: 2\r\n\r\nno";
    let e = Edge::with(main_answering("/ws-no", Reply::raw(declined)), "", "");
    let mut c = e.client();
    c.send(&upgrade_request("/ws-no", "")).unwrap();
    let r = c.expect_response("declined upgrade with a load report");
    assert_eq!((r.status, r.text().as_str()), (200, "no"), "{}", r.head);
    assert_eq!(r.header("x-usher-load"), None, "{}", r.head);
    e.finish();

    let switched = "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
                    Connection: Upgrade\r\nX-Usher-Load: threads=4, busy=1, queued=0\r\n\r\n";
    let e = Edge::with(main_answering("/ws-yes", Reply::raw(switched)), "", "");
    let mut c = e.client();
    c.send(&upgrade_request("/ws-yes", "")).unwrap();
    let r = c.head_response(Duration::from_secs(5)).expect("a 101");
    assert_eq!(r.status, 101, "{}", r.head);
    assert_eq!(r.header("x-usher-load"), None, "{}", r.head);
    e.finish();
}
