//! WebSocket (and `Upgrade` in general) through the real `usher` binary: an
//! echo session both ways with a clean close; an upgraded socket does not
//! hold the backend's request slot (unless `hold_slot: true`), and counts
//! against `max_upgraded`; a backend that answers 200 instead of 101 gets no
//! tunnel, its answer is delivered, and a request pipelined behind the
//! upgrade never reaches it. Open sockets show in `/status` (`upgraded`) and
//! the `usher_upgraded_connections` gauge; an idle tunnel is closed after
//! `upgrades.idle_timeout` while a busy one lives on; on SIGTERM open tunnels
//! get `shutdown_grace` to finish, and Usher exits 0 on time either way.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use http::StatusCode;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use usher_e2e::edge::{self, spawn_backend, Upgrades};
use usher_e2e::usher::Usher;
use usher_e2e::{blocking, wait_until};

const PLAIN: &str = "  - { name: public, address: \"LISTEN\" }";

async fn ws_connect(
    u: &Usher,
    path: &str,
) -> Result<
    tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>,
    tokio_tungstenite::tungstenite::Error,
> {
    let tcp = tokio::net::TcpStream::connect(u.addr).await.unwrap();
    let url = format!("ws://app.test{path}");
    tokio::time::timeout(
        Duration::from_secs(10),
        tokio_tungstenite::client_async(url, tcp),
    )
    .await
    .expect("websocket handshake timed out")
    .map(|(ws, resp)| {
        assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
        ws
    })
}

type Ws = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

/// The backend's `upgraded` in `/status`, and its `usher_upgraded_connections`.
fn upgraded(u: &Usher, backend: SocketAddr) -> (u64, f64) {
    let status = u.status();
    let b = &status["upstreams"]["app"]["backends"][0];
    assert_eq!(b["address"], backend.to_string(), "{status}");
    let n = b["upgraded"]
        .as_u64()
        .unwrap_or_else(|| panic!("no `upgraded` in /status: {status}"));
    let gauge = u.metric(
        "usher_upgraded_connections",
        &[("upstream", "app"), ("backend", &backend.to_string())],
    );
    (n, gauge)
}

/// Sends `text` and expects it echoed within 5 s.
async fn echo(ws: &mut Ws, text: &str) {
    ws.send(Message::text(text)).await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(5), ws.next())
        .await
        .unwrap_or_else(|_| panic!("no echo of {text:?} in 5s"));
    assert_eq!(got.unwrap().unwrap(), Message::text(text));
}

/// Closes cleanly: the close frame comes back and the stream ends.
async fn close_cleanly(mut ws: Ws) {
    ws.close(None).await.unwrap();
    let rest = tokio::time::timeout(Duration::from_secs(5), async {
        let mut frames = Vec::new();
        while let Some(m) = ws.next().await {
            frames.push(m);
        }
        frames
    })
    .await
    .expect("the close handshake did not finish in 5s");
    assert!(
        matches!(rest.as_slice(), [Ok(Message::Close(_))]),
        "expected only the close frame back, got {rest:?}"
    );
}

/// Waits (bounded) for the stream to end without a message: what a client
/// sees when Usher drops the tunnel. Returns how long that took.
async fn wait_cut(ws: &mut Ws, within: Duration) -> Duration {
    let start = Instant::now();
    match tokio::time::timeout(within, ws.next()).await {
        Err(_) => panic!("the tunnel was not closed within {within:?}"),
        Ok(None | Some(Err(_))) => start.elapsed(),
        Ok(Some(Ok(Message::Close(_)))) => start.elapsed(),
        Ok(Some(Ok(m))) => panic!("unexpected message {m:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_echo_both_ways_without_holding_the_slot() {
    let backend = spawn_backend(Upgrades::Echo);
    // One request slot on the backend, and a short queue wait: a socket that
    // held the slot would make the plain request below fail with 503.
    let u = Usher::start_ready(&edge::config(
        PLAIN,
        backend.addr,
        "    queue: { timeout: 300ms }\n    upgrades: { max_upgraded: 2 }\n",
    ));

    let mut ws = ws_connect(&u, "/chat").await.unwrap();
    ws.send(Message::text("hello")).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("hello"));
    ws.send(Message::binary(vec![0u8, 1, 2, 255]))
        .await
        .unwrap();
    assert_eq!(
        ws.next().await.unwrap().unwrap(),
        Message::binary(vec![0u8, 1, 2, 255])
    );
    let big = "x".repeat(200_000);
    ws.send(Message::text(big.clone())).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::text(big));

    // The backend saw the upgrade with its headers intact and forwarded ones set.
    let seen = backend.seen.lock().unwrap().clone();
    let up = seen.iter().find(|s| s.path == "/chat").unwrap();
    assert_eq!(up.headers["upgrade"], "websocket");
    assert!(up.headers["connection"]
        .to_str()
        .unwrap()
        .eq_ignore_ascii_case("upgrade"));
    assert!(up.headers.contains_key("sec-websocket-key"));
    assert_eq!(up.headers["x-forwarded-proto"], "http");

    // While the socket is open, ordinary requests still get the slot.
    let url = u.url("/plain");
    let r = tokio::task::spawn_blocking(move || blocking::get(&url).unwrap())
        .await
        .unwrap();
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());

    // max_upgraded: 2 → a second socket is fine, a third gets 503.
    let mut second = ws_connect(&u, "/two").await.unwrap();
    let third = ws_connect(&u, "/three").await;
    match third {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE)
        }
        other => panic!("expected 503 for the third socket, got {other:?}"),
    }
    second.close(None).await.unwrap();
    while second.next().await.is_some() {}
    drop(second);

    // Clean close, initiated by the client: the close frame comes back.
    ws.close(Some(CloseFrame {
        code: CloseCode::Normal,
        reason: "bye".into(),
    }))
    .await
    .unwrap();
    match ws.next().await {
        Some(Ok(Message::Close(Some(f)))) => assert_eq!(f.code, CloseCode::Normal),
        other => panic!("expected the close frame echoed, got {other:?}"),
    }
    assert!(ws.next().await.is_none(), "stream ends after close");
    drop(ws);
    assert!(
        wait_until(Duration::from_secs(5), || backend
            .open_sockets
            .load(std::sync::atomic::Ordering::SeqCst)
            == 0),
        "backend sockets did not close"
    );
    // Closed sockets free their place: a new one is admitted.
    let mut again = None;
    for _ in 0..100 {
        match ws_connect(&u, "/again").await {
            Ok(ws) => {
                again = Some(ws);
                break;
            }
            // The tunnels end a moment after the close handshake.
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    let mut again = again.expect("a socket is admitted once the others closed");
    again.send(Message::text("still here")).await.unwrap();
    assert_eq!(
        again.next().await.unwrap().unwrap(),
        Message::text("still here")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hold_slot_keeps_the_backend_thread_for_the_socket_life() {
    let backend = spawn_backend(Upgrades::Echo);
    let u = Usher::start_ready(&edge::config(
        PLAIN,
        backend.addr,
        "    queue: { timeout: 300ms }\n    upgrades: { hold_slot: true }\n",
    ));
    let mut ws = ws_connect(&u, "/held").await.unwrap();
    ws.send(Message::text("ping")).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("ping"));
    let url = u.url("/plain");
    let r = tokio::task::spawn_blocking({
        let url = url.clone();
        move || blocking::get(&url).unwrap()
    })
    .await
    .unwrap();
    assert_eq!(
        r.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "the socket holds the only slot: {}",
        r.text()
    );
    assert_eq!(
        upgraded(&u, backend.addr),
        (1, 1.0),
        "a socket holding a slot is counted as upgraded too"
    );
    ws.close(None).await.unwrap();
    while ws.next().await.is_some() {}
    drop(ws);
    let ok = tokio::task::spawn_blocking(move || {
        wait_until(Duration::from_secs(5), || {
            blocking::get(&url).is_ok_and(|r| r.status == StatusCode::OK)
        })
    })
    .await
    .unwrap();
    assert!(ok, "the slot was not released when the socket closed");
}

#[test]
fn declined_upgrade_is_a_normal_response_and_nothing_pipelined_reaches_the_backend() {
    let backend = spawn_backend(Upgrades::Decline);
    let u = Usher::start_ready(&edge::config(PLAIN, backend.addr, ""));
    let before = backend.paths().len();

    let mut s = std::net::TcpStream::connect(u.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    // The upgrade request and, in the same write, a request "smuggled"
    // behind it as if it were tunnel data.
    s.write_all(
        b"GET /ws HTTP/1.1\r\nHost: app.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
          Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n\
          GET /smuggled HTTP/1.1\r\nHost: app.test\r\n\r\n",
    )
    .unwrap();
    let mut raw = Vec::new();
    // Usher answers and closes: read to EOF.
    s.read_to_end(&mut raw).unwrap();
    let text = String::from_utf8_lossy(&raw);
    assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
    assert!(text.contains("no upgrade here"), "{text}");
    assert_eq!(
        text.matches("HTTP/1.1 ").count(),
        1,
        "one answer only: {text}"
    );
    assert!(
        text.to_ascii_lowercase().contains("connection: close"),
        "{text}"
    );

    // Give a stray forward every chance to arrive, then count.
    let after = blocking::get(&u.url("/marker")).unwrap();
    assert_eq!(after.status, StatusCode::OK);
    let paths = backend.paths()[before..].to_vec();
    assert_eq!(paths, vec!["/ws", "/marker"], "the backend saw: {paths:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_over_tls_reaches_the_backend_as_https() {
    let dir = usher_e2e::usher::TempDir::new("wss");
    let ca = edge::Ca::new();
    let (c, k) = edge::write_leaf(&dir.0, "a", &ca.leaf(&["a.test"]));
    let backend = spawn_backend(Upgrades::Echo);
    let listener = format!(
        "  - name: secure\n    address: \"LISTEN\"\n    tls: {{ certificates: [{{ cert: \"{}\", key: \"{}\" }}] }}\n",
        c.display(),
        k.display()
    );
    let u = Usher::start_ready(&edge::config(&listener, backend.addr, ""));
    // ALPN http/1.1: WebSocket upgrades are HTTP/1.1.
    let tls = edge::tls_connect(
        u.addr,
        Some("a.test"),
        &edge::connector(Some(&ca), &[b"http/1.1"]),
    )
    .await
    .unwrap();
    let (mut ws, resp) = tokio_tungstenite::client_async("wss://a.test/secure-chat", tls)
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
    ws.send(Message::text("over tls")).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("over tls"));
    ws.close(None).await.unwrap();
    let seen = backend.seen.lock().unwrap().clone();
    let up = seen.iter().find(|s| s.path == "/secure-chat").unwrap();
    assert_eq!(up.headers["x-forwarded-proto"], "https");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_sockets_show_in_status_and_the_gauge_until_they_close() {
    let backend = spawn_backend(Upgrades::Echo);
    let u = Usher::start_ready(&edge::config(PLAIN, backend.addr, ""));
    assert_eq!(upgraded(&u, backend.addr), (0, 0.0));

    let mut one = ws_connect(&u, "/one").await.unwrap();
    let mut two = ws_connect(&u, "/two").await.unwrap();
    echo(&mut one, "a").await;
    echo(&mut two, "b").await;
    assert_eq!(upgraded(&u, backend.addr), (2, 2.0));
    assert!(
        u.metrics()
            .contains("# TYPE usher_upgraded_connections gauge"),
        "{}",
        u.metrics()
    );

    close_cleanly(one).await;
    assert!(
        wait_until(Duration::from_secs(5), || upgraded(&u, backend.addr)
            == (1, 1.0)),
        "after one close: {:?}",
        upgraded(&u, backend.addr)
    );
    echo(&mut two, "still open").await;
    close_cleanly(two).await;
    assert!(
        wait_until(Duration::from_secs(5), || upgraded(&u, backend.addr)
            == (0, 0.0)),
        "after both closed: {:?}",
        upgraded(&u, backend.addr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_tunnel_is_closed_while_a_busy_one_lives_on() {
    let backend = spawn_backend(Upgrades::Echo);
    let idle_timeout = Duration::from_millis(300);
    let u = Usher::start_ready(&edge::config(
        PLAIN,
        backend.addr,
        "    upgrades: { idle_timeout: 300ms }\n",
    ));
    let mut idle = ws_connect(&u, "/idle").await.unwrap();
    let mut busy = ws_connect(&u, "/busy").await.unwrap();
    echo(&mut idle, "hello").await;
    let idle_since = Instant::now();
    let cut = tokio::spawn(async move { wait_cut(&mut idle, Duration::from_secs(10)).await });

    // A message every 100 ms for four idle timeouts: never idle long enough.
    let busy_since = Instant::now();
    for i in 0..12 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        echo(&mut busy, &format!("tick {i}")).await;
    }
    assert!(busy_since.elapsed() >= 4 * idle_timeout);

    let cut_after = tokio::time::timeout(Duration::from_secs(10), cut)
        .await
        .expect("the idle socket was not closed")
        .unwrap();
    assert!(
        cut_after >= idle_timeout - Duration::from_millis(50),
        "closed after {cut_after:?}, before the idle timeout"
    );
    assert!(idle_since.elapsed() >= idle_timeout);
    assert!(
        wait_until(Duration::from_secs(5), || upgraded(&u, backend.addr)
            == (1, 1.0)),
        "only the busy socket is open: {:?}",
        upgraded(&u, backend.addr)
    );
    echo(&mut busy, "still here").await;

    // Once it stops talking, it is closed too.
    wait_cut(&mut busy, Duration::from_secs(10)).await;
    assert!(
        wait_until(Duration::from_secs(5), || upgraded(&u, backend.addr)
            == (0, 0.0)),
        "{:?}",
        upgraded(&u, backend.addr)
    );
    assert!(
        wait_until(Duration::from_secs(5), || backend
            .open_sockets
            .load(std::sync::atomic::Ordering::SeqCst)
            == 0),
        "the backend sides were not closed"
    );
}

/// Waits for the Usher process to exit, off the runtime; returns it, its
/// exit status and the time since `since`.
async fn exited(
    mut u: Usher,
    since: Instant,
    within: Duration,
) -> (Usher, std::process::ExitStatus, Duration) {
    tokio::task::spawn_blocking(move || {
        let status = u
            .proc
            .wait_exit(within)
            .unwrap_or_else(|| panic!("usher did not exit within {within:?}"));
        let took = since.elapsed();
        (u, status, took)
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_gives_open_tunnels_the_grace_then_closes_them_and_exits_0() {
    let backend = spawn_backend(Upgrades::Echo);
    let grace = Duration::from_secs(2);
    let u = Usher::start_ready(&format!(
        "{}timeouts: {{ shutdown_grace: 2s }}\n",
        edge::config(PLAIN, backend.addr, "")
    ));
    let mut lingering = ws_connect(&u, "/lingering").await.unwrap();
    let mut finishing = ws_connect(&u, "/finishing").await.unwrap();
    echo(&mut lingering, "before").await;
    echo(&mut finishing, "before").await;

    let term = Instant::now();
    u.proc.term();
    // Draining: both tunnels still carry messages, and one finishes on its own.
    tokio::time::sleep(Duration::from_millis(300)).await;
    echo(&mut finishing, "during the drain").await;
    close_cleanly(finishing).await;
    echo(&mut lingering, "during the drain").await;

    // The other never closes: Usher closes it when the grace is over, and exits 0.
    let (u, status, took) = exited(u, term, grace + Duration::from_secs(10)).await;
    assert!(status.success(), "exit status {status:?}");
    assert!(
        took < grace + Duration::from_millis(1500),
        "exited {took:?} after SIGTERM; the grace is {grace:?}"
    );
    assert!(
        took >= grace - Duration::from_millis(200),
        "exited after {took:?}: the open tunnel did not get the grace"
    );
    wait_cut(&mut lingering, Duration::from_secs(5)).await;
    let log = u.proc.output();
    assert!(
        log.contains("grace period over: upgraded connections closed") && log.contains("closed=1"),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_exits_as_soon_as_the_last_tunnel_closes() {
    let backend = spawn_backend(Upgrades::Echo);
    // A long grace: exiting early shows Usher waited for the tunnel, not the clock.
    let u = Usher::start_ready(&format!(
        "{}timeouts: {{ shutdown_grace: 30s }}\n",
        edge::config(PLAIN, backend.addr, "")
    ));
    let mut ws = ws_connect(&u, "/chat").await.unwrap();
    echo(&mut ws, "before").await;
    u.proc.term();
    assert!(
        u.proc
            .wait_for_output(
                "waiting for upgraded connections to close",
                Duration::from_secs(10)
            )
            .is_some(),
        "{}",
        u.proc.output()
    );
    echo(&mut ws, "during the drain").await;
    let closed = Instant::now();
    close_cleanly(ws).await;
    let (u, status, took) = exited(u, closed, Duration::from_secs(20)).await;
    assert!(status.success(), "exit status {status:?}");
    assert!(
        took < Duration::from_secs(5),
        "exited {took:?} after the tunnel closed"
    );
    assert!(
        !u.proc.output().contains("grace period over"),
        "{}",
        u.proc.output()
    );
}
