//! TLS on client listeners, against the real `usher` binary: certificates
//! chosen by SNI (exact, wildcard, default), ALPN h2 and http/1.1, curl and
//! openssl as clients, rotation of the certificate files without a restart
//! (and a broken rotation that keeps the old certificate), HSTS,
//! `X-Forwarded-Proto: https`, the HTTP→HTTPS redirect, and `usher check`
//! naming a bad certificate file.

use std::process::Command;
use std::time::Duration;

use http::StatusCode;
use usher_e2e::edge::{
    self, alpn, connector, get_over, peer_cert, spawn_backend, tls_connect, write_leaf, Ca,
    Upgrades,
};
use usher_e2e::usher::{backends, concrete, Config, TempDir, Usher};
use usher_e2e::{bin_path, wait_until_async};

fn tls_listener(
    name: &str,
    certs: &[(std::path::PathBuf, std::path::PathBuf)],
    extra: &str,
) -> String {
    let list: Vec<String> = certs
        .iter()
        .map(|(c, k)| format!("{{ cert: \"{}\", key: \"{}\" }}", c.display(), k.display()))
        .collect();
    format!(
        "  - name: {name}\n    address: \"LISTEN\"\n    tls:\n      certificates: [{}]\n{extra}",
        list.join(", ")
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sni_picks_the_certificate_and_alpn_the_protocol() {
    let dir = TempDir::new("tls-sni");
    let ca = Ca::new();
    let a = ca.leaf(&["a.test"]);
    let b = ca.leaf(&["b.test"]);
    let w = ca.leaf(&["*.w.test"]);
    let d = ca.leaf(&["default.test"]);
    let pa = write_leaf(&dir.0, "a", &a);
    let pb = write_leaf(&dir.0, "b", &b);
    let pw = write_leaf(&dir.0, "w", &w);
    let pd = write_leaf(&dir.0, "d", &d);
    let backend = spawn_backend(Upgrades::Echo);
    let extra = format!(
        "      default: {{ cert: \"{}\", key: \"{}\" }}\n      hsts: \"max-age=63072000\"\n",
        pd.0.display(),
        pd.1.display()
    );
    let u = Usher::start_ready(&edge::config(
        &tls_listener("secure", &[pa, pb, pw], &extra),
        backend.addr,
        "",
    ));

    let any = connector(None, &[b"h2", b"http/1.1"]);
    for (sni, want) in [
        (Some("a.test"), &a),
        (Some("b.test"), &b),
        (Some("B.Test"), &b),
        (Some("x.w.test"), &w),
        (Some("unknown.test"), &d),
        (None, &d),
    ] {
        let s = tls_connect(u.addr, sni, &any).await.unwrap();
        assert!(
            peer_cert(&s) == want.der,
            "SNI {sni:?} got the wrong certificate"
        );
    }

    // ALPN: h2 when offered, http/1.1 otherwise; verified against the CA.
    let h2 = connector(Some(&ca), &[b"h2", b"http/1.1"]);
    let s = tls_connect(u.addr, Some("a.test"), &h2).await.unwrap();
    assert_eq!(alpn(&s).as_deref(), Some("h2"));
    let r = get_over(s, true, "a.test", "/hello").await.unwrap();
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.version, http::Version::HTTP_2);
    assert_eq!(r.body, "ok /hello proto=https\n");
    assert_eq!(r.headers["strict-transport-security"], "max-age=63072000");

    let h1 = connector(Some(&ca), &[b"http/1.1"]);
    let s = tls_connect(u.addr, Some("b.test"), &h1).await.unwrap();
    assert_eq!(alpn(&s).as_deref(), Some("http/1.1"));
    let r = get_over(s, false, "b.test", "/one").await.unwrap();
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.version, http::Version::HTTP_11);
    assert_eq!(r.body, "ok /one proto=https\n");

    // TLS 1.2 is still accepted.
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots.add_parsable_certificates(
        rustls::pki_types::pem::PemObject::pem_slice_iter(ca.pem.as_bytes()).map(Result::unwrap),
    );
    let cfg12 = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS12])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let mut cfg12 = cfg12;
    cfg12.resumption = rustls::client::Resumption::disabled();
    let s = tls_connect(
        u.addr,
        Some("a.test"),
        &tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg12)),
    )
    .await
    .unwrap();
    assert_eq!(
        s.get_ref().1.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_2)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_http2_and_openssl_s_client_succeed() {
    let dir = TempDir::new("tls-curl");
    let ca = Ca::new();
    let a = ca.leaf(&["a.test"]);
    let pa = write_leaf(&dir.0, "a", &a);
    let ca_file = dir.0.join("ca.pem");
    std::fs::write(&ca_file, &ca.pem).unwrap();
    let backend = spawn_backend(Upgrades::Echo);
    let u = Usher::start_ready(&edge::config(
        &tls_listener("secure", &[pa], "      hsts: \"max-age=60\"\n"),
        backend.addr,
        "",
    ));
    let port = u.addr.port();

    let out = tokio::task::spawn_blocking(move || {
        Command::new("curl")
            .args(["-sS", "--http2", "--max-time", "20", "-i", "--cacert"])
            .arg(&ca_file)
            .arg("--resolve")
            .arg(format!("a.test:{port}:127.0.0.1"))
            .args(["-w", "\nversion=%{http_version}\n"])
            .arg(format!("https://a.test:{port}/via-curl"))
            .output()
            .expect("run curl")
    })
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "curl failed: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.starts_with("HTTP/2 200"), "{text}");
    assert!(
        text.contains("strict-transport-security: max-age=60"),
        "{text}"
    );
    assert!(text.contains("ok /via-curl proto=https"), "{text}");
    assert!(text.contains("version=2"), "{text}");

    let ca_file = dir.0.join("ca.pem");
    let addr = u.addr;
    let out = tokio::task::spawn_blocking(move || {
        Command::new("openssl")
            .args(["s_client", "-connect"])
            .arg(addr.to_string())
            .args(["-servername", "a.test", "-alpn", "h2,http/1.1", "-CAfile"])
            .arg(&ca_file)
            .args(["-verify_hostname", "a.test"])
            .stdin(std::process::Stdio::null())
            .output()
            .expect("run openssl")
    })
    .await
    .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("Verify return code: 0 (ok)"), "{text}");
    assert!(text.contains("ALPN protocol: h2"), "{text}");
    assert!(text.contains("TLSv1.3"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotated_files_serve_new_handshakes_and_a_broken_rotation_keeps_the_old() {
    let dir = TempDir::new("tls-rotate");
    let ca = Ca::new();
    let first = ca.leaf(&["a.test"]);
    let (cert, key) = write_leaf(&dir.0, "a", &first);
    let backend = spawn_backend(Upgrades::Echo);
    let u = Usher::start_ready(&edge::config(
        &tls_listener("secure", &[(cert.clone(), key.clone())], ""),
        backend.addr,
        "",
    ));
    let any = connector(None, &[b"http/1.1"]);
    let s = tls_connect(u.addr, Some("a.test"), &any).await.unwrap();
    assert!(peer_cert(&s) == first.der);
    // A connection made before the rotation, kept open across it.
    let io = hyper_util::rt::TokioIo::new(s);
    let (mut old_conn, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
    tokio::spawn(conn);

    // Replace the files: new handshakes see the new certificate.
    let second = ca.leaf(&["a.test"]);
    write_leaf(&dir.0, "a", &second);
    let rotated = wait_until_async(Duration::from_secs(15), || async {
        let s = tls_connect(u.addr, Some("a.test"), &any).await.unwrap();
        peer_cert(&s) == second.der
    })
    .await;
    assert!(
        rotated,
        "the new certificate was not served:\n{}",
        u.proc.output()
    );
    assert_eq!(
        u.metric("usher_config_reloads_total", &[("result", "success")]),
        1.0
    );
    // The old connection still works on its session.
    let req = http::Request::get("/after")
        .header("host", "a.test")
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    let resp = old_conn.send_request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);

    // A broken replacement (a key that does not match) is refused, reported
    // by file and reason, counted, and the certificate in use stays.
    let other = ca.leaf(&["a.test"]);
    usher_e2e::replace_file(&key, &other.key_pem);
    let reported = wait_until_async(Duration::from_secs(15), || async {
        u.metric("usher_config_reloads_total", &[("result", "failure")]) >= 1.0
    })
    .await;
    assert!(reported, "no failure counted:\n{}", u.proc.output());
    let log = u.proc.output();
    assert!(
        log.contains(&format!(
            "{}: private key does not match the certificate",
            key.display()
        )),
        "{log}"
    );
    let s = tls_connect(u.addr, Some("a.test"), &any).await.unwrap();
    assert!(
        peer_cert(&s) == second.der,
        "the old certificate must stay in use"
    );
    let r = get_over(s, false, "a.test", "/still").await.unwrap();
    assert_eq!(r.status, StatusCode::OK);

    // A config reload pointing at new files rotates too (re-read on reload).
    let third = ca.leaf(&["a.test"]);
    let (c3, k3) = write_leaf(&dir.0, "third", &third);
    let yaml = std::fs::read_to_string(&u.config_path).unwrap();
    let yaml = yaml
        .replace(&cert.display().to_string(), &c3.display().to_string())
        .replace(&key.display().to_string(), &k3.display().to_string());
    usher_e2e::replace_file(&u.config_path, &yaml);
    u.proc.signal(nix::sys::signal::Signal::SIGHUP);
    let reloaded = wait_until_async(Duration::from_secs(15), || async {
        let s = tls_connect(u.addr, Some("a.test"), &any).await.unwrap();
        peer_cert(&s) == third.der
    })
    .await;
    assert!(reloaded, "reload did not rotate:\n{}", u.proc.output());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_listener_redirects_to_https() {
    let dir = TempDir::new("tls-redirect");
    let ca = Ca::new();
    let pa = write_leaf(&dir.0, "a", &ca.leaf(&["a.test"]));
    let backend = spawn_backend(Upgrades::Echo);
    let listeners_yaml = format!(
        "  - {{ name: plain, address: \"LISTEN\", redirect_to_https: true, https_port: 8443 }}\n{}",
        tls_listener("secure", &[pa], "")
    );
    let u = Usher::start_ready(&edge::config(&listeners_yaml, backend.addr, ""));
    let addrs = u.listeners();
    let plain = addrs["plain"];
    let tcp = tokio::net::TcpStream::connect(plain).await.unwrap();
    let r = get_over(tcp, false, "a.test:8080", "/path?q=1")
        .await
        .unwrap();
    assert_eq!(r.status, StatusCode::PERMANENT_REDIRECT);
    assert_eq!(r.headers["location"], "https://a.test:8443/path?q=1");
    assert!(backend.paths().iter().all(|p| p != "/path"));
    // The TLS listener itself proxies.
    let s = tls_connect(
        addrs["secure"],
        Some("a.test"),
        &connector(Some(&ca), &[b"h2"]),
    )
    .await
    .unwrap();
    let r = get_over(s, true, "a.test", "/path").await.unwrap();
    assert_eq!(r.status, StatusCode::OK);
}

#[test]
fn usher_check_names_the_bad_certificate_file_and_why() {
    let dir = TempDir::new("tls-check");
    let ca = Ca::new();
    let good = ca.leaf(&["a.test"]);
    let (cert, key) = write_leaf(&dir.0, "good", &good);
    let (_, other_key) = write_leaf(&dir.0, "other", &ca.leaf(&["b.test"]));
    let check = |listener: String| {
        let cfg = dir.0.join(format!("c{}.yaml", fastrand::u32(..)));
        std::fs::write(
            &cfg,
            concrete(&edge::config(&listener, "127.0.0.1:9".parse().unwrap(), "")),
        )
        .unwrap();
        let out = Command::new(bin_path("usher"))
            .arg("check")
            .arg("-c")
            .arg(&cfg)
            .output()
            .unwrap();
        (
            out.status.code(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    };

    let (code, text) = check(tls_listener("s", &[(cert.clone(), key.clone())], ""));
    assert_eq!(code, Some(0), "{text}");

    let missing = dir.0.join("nope.crt");
    let (code, text) = check(tls_listener("s", &[(missing.clone(), key.clone())], ""));
    assert_eq!(code, Some(1), "{text}");
    assert!(
        text.contains(&format!("{}: cannot read", missing.display())),
        "{text}"
    );
    assert!(
        text.contains("listeners[0].tls.certificates[0].cert"),
        "{text}"
    );

    let (code, text) = check(tls_listener("s", &[(cert.clone(), other_key.clone())], ""));
    assert_eq!(code, Some(1), "{text}");
    assert!(
        text.contains(&format!(
            "{}: private key does not match the certificate",
            other_key.display()
        )),
        "{text}"
    );

    let junk = dir.0.join("junk.crt");
    std::fs::write(&junk, "not a certificate\n").unwrap();
    let (code, text) = check(tls_listener("s", &[(junk.clone(), key.clone())], ""));
    assert_eq!(code, Some(1), "{text}");
    assert!(
        text.contains("junk.crt: no `BEGIN CERTIFICATE` block"),
        "{text}"
    );

    // Expired: a self-signed certificate that ended in 2020.
    let mut p = rcgen::CertificateParams::new(vec!["a.test".to_string()]).unwrap();
    p.not_before = rcgen::date_time_ymd(2019, 1, 1);
    p.not_after = rcgen::date_time_ymd(2020, 1, 1);
    let k = rcgen::KeyPair::generate().unwrap();
    let old = p.self_signed(&k).unwrap();
    let oc = dir.0.join("old.crt");
    let ok = dir.0.join("old.key");
    std::fs::write(&oc, old.pem()).unwrap();
    std::fs::write(&ok, k.serialize_pem()).unwrap();
    let (code, text) = check(tls_listener("s", &[(oc.clone(), ok)], ""));
    assert_eq!(code, Some(1), "{text}");
    assert!(
        text.contains(&format!(
            "{}: certificate expired on 2020-01-01",
            oc.display()
        )),
        "{text}"
    );
}

/// An inner Usher serving TLS as `inner.test` (a leaf of a fresh CA, whose
/// file is returned) in front of a real `usher-worker`; `upstream_extra`
/// goes before its backends (e.g. `protocol: http2`).
fn inner_tls_usher(
    name: &str,
    upstream_extra: &str,
) -> (TempDir, std::path::PathBuf, usher_e2e::Proc, Usher) {
    let dir = TempDir::new(name);
    let ca = Ca::new();
    let (cert, key) = write_leaf(&dir.0, "inner", &ca.leaf(&["inner.test"]));
    let ca_file = dir.0.join("ca.pem");
    std::fs::write(&ca_file, &ca.pem).unwrap();
    let (worker, worker_addr) = usher_e2e::spawn_worker(["--threads", "2"]);
    let inner = Usher::start_ready(
        &Config::new()
            .listeners(&tls_listener("inner", &[(cert, key)], ""))
            .route("*", "app")
            .upstream(
                "app",
                &format!("{upstream_extra}{}", backends(&[worker_addr], "")),
            )
            .top("access_log: { format: json }")
            .yaml(),
    );
    (dir, ca_file, worker, inner)
}

/// Upstream TLS and h2: an outer Usher talks h2 over TLS to an inner Usher
/// (verifying its certificate against a CA file and a `server_name`), which
/// talks h2c to a real `usher-worker`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_tls_with_ca_and_h2_and_h2c_backends() {
    let (_dir, ca_file, _worker, inner) = inner_tls_usher("tls-upstream", "    protocol: http2\n");
    let outer_yaml = |server_name: &str| {
        let upstream = format!(
            "    protocol: http2\n    tls: {{ ca: \"{}\", server_name: {server_name} }}\n{}\n    \
             retries: {{ attempts: 0 }}",
            ca_file.display(),
            backends(&[inner.addr], "")
        );
        Config::new()
            .listeners(r#"  - { name: outer, address: "LISTEN" }"#)
            .route("*", "app")
            .upstream("app", &upstream)
            .yaml()
    };
    let outer = Usher::start_ready(&outer_yaml("inner.test"));
    let client = usher_e2e::Client::new();
    let r = client
        .request(
            http::Method::POST,
            &outer.url("/echo"),
            "through two proxies",
        )
        .await
        .unwrap();
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.text(), "through two proxies");
    // The inner Usher saw h2 from the outer one, over TLS.
    let seen = inner
        .proc
        .wait_for_output("\"path\":\"/echo\"", Duration::from_secs(5))
        .expect("inner access log line");
    assert!(seen.contains("HTTP/2.0"), "{seen}");
    // The worker answered over h2c: its requests counter moved and the
    // response came back whole (checked above).

    // A certificate that does not match `server_name` is refused: 502.
    let wrong = Usher::start(&outer_yaml("other.test"));
    let r = client.get(&wrong.url("/healthz")).await.unwrap();
    assert_eq!(r.status, StatusCode::BAD_GATEWAY, "{}", r.text());
    // The client reads a generic reason; why the handshake failed is in
    // Usher's log for the operator.
    assert!(
        r.text().contains("upstream app unavailable"),
        "{}",
        r.text()
    );
    assert!(
        wrong
            .proc
            .wait_for_output("certificate", Duration::from_secs(5))
            .is_some(),
        "the certificate error is in the log:\n{}",
        wrong.proc.output()
    );
}

/// Upstream TLS on HTTP/1.1 (Usher's own client side): a 4 MiB upload to an
/// inner Usher over TLS comes back whole, which needs every TLS record
/// flushed, and later requests reuse the pooled TLS connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_tls_on_http1_relays_a_large_upload_and_reuses_the_connection() {
    let (_dir, ca_file, _worker, inner) = inner_tls_usher("tls-upstream-h1", "");
    let upstream = format!(
        "    tls: {{ ca: \"{}\", server_name: inner.test }}\n{}\n    retries: {{ attempts: 0 }}\n    \
         pool: {{ idle_timeout: 60s }}",
        ca_file.display(),
        backends(&[inner.addr], "")
    );
    let outer = Usher::start_ready(
        &Config::new()
            .listeners(r#"  - { name: outer, address: "LISTEN" }"#)
            .route("*", "app")
            .upstream("app", &upstream)
            .yaml(),
    );
    // The outer Usher's startup capacity probe (hyper-util's client) may
    // keep a connection of its own: count from here.
    let before = inner.metric("usher_client_connections", &[("listener", "inner")]);
    let client = usher_e2e::Client::new().with_timeout(Duration::from_secs(20));
    let upload: Vec<u8> = (0..4u32 << 20).map(|i| (i % 251) as u8).collect();
    let r = client
        .request(http::Method::POST, &outer.url("/echo"), upload.clone())
        .await
        .unwrap();
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert!(
        r.body == upload,
        "the echo is not the upload ({} bytes back)",
        r.body.len()
    );
    for i in 0..5 {
        let r = client
            .request(
                http::Method::POST,
                &outer.url("/echo"),
                format!("small {i}"),
            )
            .await
            .unwrap();
        assert_eq!((r.status, r.text()), (StatusCode::OK, format!("small {i}")));
    }
    // The inner Usher saw HTTP/1.1 over TLS, on connections the outer one
    // kept open: one per outer worker thread at most, for 6 requests.
    let log = inner.proc.output();
    assert!(log.contains("HTTP/1.1"), "{log}");
    let after = inner.metric("usher_client_connections", &[("listener", "inner")]);
    assert!(
        after >= 1.0 && after - before <= 2.0,
        "{} more TLS connections for 6 requests ({before} before): the pool did not reuse them",
        after - before
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_finishes_the_handshake_is_dropped() {
    let dir = TempDir::new("tls-hs");
    let ca = Ca::new();
    let pa = write_leaf(&dir.0, "a", &ca.leaf(&["a.test"]));
    let backend = spawn_backend(Upgrades::Echo);
    let u = Usher::start_ready(&edge::config(
        &tls_listener("secure", &[pa], "      handshake_timeout: 300ms\n"),
        backend.addr,
        "",
    ));
    use tokio::io::AsyncReadExt;
    let mut tcp = tokio::net::TcpStream::connect(u.addr).await.unwrap();
    let started = std::time::Instant::now();
    let mut buf = [0u8; 64];
    // Send nothing: Usher closes the connection after the handshake timeout.
    let n = tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut buf))
        .await
        .expect("the connection was not closed")
        .unwrap_or(0);
    assert_eq!(n, 0);
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(250) && waited < Duration::from_secs(5),
        "{waited:?}"
    );
    // Others are served meanwhile and after.
    let s = tls_connect(u.addr, Some("a.test"), &connector(Some(&ca), &[b"h2"]))
        .await
        .unwrap();
    assert_eq!(
        get_over(s, true, "a.test", "/").await.unwrap().status,
        StatusCode::OK
    );
}
