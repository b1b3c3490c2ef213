//! WebSocket (and `Upgrade` in general) through the real `usher` binary: an
//! echo session both ways with a clean close; an upgraded socket does not
//! hold the backend's request slot (unless `hold_slot: true`), and counts
//! against `max_upgraded`; a backend that answers 200 instead of 101 gets no
//! tunnel, its answer is delivered, and a request pipelined behind the
//! upgrade never reaches it.

mod edge;

use std::io::{Read, Write};
use std::time::Duration;

use edge::{spawn_backend, Upgrades};
use futures_util::{SinkExt, StreamExt};
use http::StatusCode;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
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
