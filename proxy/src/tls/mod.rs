//! TLS: client listeners (certificates by SNI, rotation) and backends.
//!
//! - [`cert`]: reading PEM files and saying what is wrong with them;
//! - [`sni`]: the certificate set of a listener and the rustls resolver
//!   that picks from it by SNI;
//! - [`rotate`]: swapping certificates on reload and on file change;
//! - [`connector`]: TLS (and ALPN h2) to backends.
//!
//! Listeners speak TLS 1.2 and 1.3 with rustls's default cipher suites
//! (ring provider) and offer ALPN `h2` and `http/1.1`. The handshake runs in
//! the connection's own task, under `handshake_timeout` (see `server.rs`).

pub mod cert;
pub mod connector;
pub mod rotate;
pub mod sni;

use std::path::Path;
use std::sync::Arc;

use http::HeaderValue;
use rustls::ServerConfig;

use crate::config::{Config, TlsConfig};

pub use rotate::{TlsListener, TlsSet};

/// The rustls server configuration of one listener.
pub fn server_config(resolver: Arc<sni::SniResolver>) -> Arc<ServerConfig> {
    let mut cfg = ServerConfig::builder_with_provider(cert::provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .expect("ring supports TLS 1.2 and 1.3")
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    // Stateless session tickets (keys rotated by rustls every 6 hours), so
    // returning clients skip the full handshake; the in-memory session
    // cache stays for TLS 1.2 session ids.
    if let Ok(t) = rustls::crypto::ring::Ticketer::new() {
        cfg.ticketer = t;
    }
    Arc::new(cfg)
}

fn file_needle(p: &Path) -> String {
    p.file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn check_name(n: &str) -> bool {
    let host = n.strip_prefix("*.").unwrap_or(n);
    !host.is_empty() && !host.contains('*') && !host.contains(' ')
}

fn check_listener_tls(t: &TlsConfig, key: &str, out: &mut Vec<crate::config::Problem>) {
    let mut p = |k: String, needle: String, message: String| {
        out.push(crate::config::Problem {
            key: k,
            needle,
            message,
        })
    };
    if t.certificates.is_empty() {
        p(
            format!("{key}.certificates"),
            "certificates".into(),
            "at least one certificate is required".into(),
        );
    }
    if t.handshake_timeout.0.is_zero() {
        p(
            format!("{key}.handshake_timeout"),
            "handshake_timeout".into(),
            "must be above zero".into(),
        );
    }
    if let Some(h) = &t.hsts {
        if HeaderValue::from_str(h).is_err() || !h.contains("max-age=") {
            p(
                format!("{key}.hsts"),
                "hsts".into(),
                format!("`{h}` is not a Strict-Transport-Security value (e.g. `max-age=31536000`)"),
            );
        }
    }
    let all = t
        .certificates
        .iter()
        .enumerate()
        .map(|(j, c)| (format!("{key}.certificates[{j}]"), c))
        .chain(t.default.iter().map(|c| (format!("{key}.default"), c)));
    let mut files_ok = true;
    for (k, c) in all {
        for n in c.names.iter().flatten() {
            if !check_name(n) {
                p(
                    format!("{k}.names"),
                    n.clone(),
                    format!("`{n}` is not a host name or `*.` wildcard"),
                );
            }
        }
        if let Err(e) = cert::load(&c.cert, &c.key) {
            files_ok = false;
            let which = if e.file == c.key { "key" } else { "cert" };
            p(format!("{k}.{which}"), file_needle(&e.file), e.to_string());
        }
    }
    if files_ok && !t.certificates.is_empty() {
        if let Err(e) = sni::Certs::load(t) {
            p(key.to_string(), file_needle(&e.file), e.to_string());
        }
    }
}

/// Checks everything TLS in a configuration, reading the files it names.
pub fn check_config(c: &Config) -> Vec<crate::config::Problem> {
    let mut out = Vec::new();
    for (i, l) in c.listeners.iter().enumerate() {
        let key = format!("listeners[{i}]");
        if let Some(t) = &l.tls {
            check_listener_tls(t, &format!("{key}.tls"), &mut out);
            if l.redirect_to_https {
                out.push(crate::config::Problem {
                    key: format!("{key}.redirect_to_https"),
                    needle: "redirect_to_https".into(),
                    message: "a TLS listener cannot redirect to HTTPS (it is HTTPS)".into(),
                });
            }
        }
        if l.http2.max_concurrent_streams == 0 {
            out.push(crate::config::Problem {
                key: format!("{key}.http2.max_concurrent_streams"),
                needle: "max_concurrent_streams".into(),
                message: "must be at least 1".into(),
            });
        }
        if l.http2.max_header_list_size.0 < 1024 || l.http2.max_header_list_size.0 > u32::MAX as u64
        {
            out.push(crate::config::Problem {
                key: format!("{key}.http2.max_header_list_size"),
                needle: "max_header_list_size".into(),
                message: "must be between 1KiB and 4GiB".into(),
            });
        }
    }
    for (name, u) in &c.upstreams {
        let Some(t) = &u.tls else { continue };
        let key = format!("upstreams.{name}.tls");
        if let Err(e) = cert::read_certs(&t.ca) {
            out.push(crate::config::Problem {
                key: format!("{key}.ca"),
                needle: file_needle(&t.ca),
                message: e.to_string(),
            });
        }
        if let Some(cc) = &t.client_cert {
            if let Err(e) = cert::load(&cc.cert, &cc.key) {
                out.push(crate::config::Problem {
                    key: format!("{key}.client_cert"),
                    needle: file_needle(&e.file),
                    message: e.to_string(),
                });
            }
        }
        if let Some(n) = &t.server_name {
            if rustls::pki_types::ServerName::try_from(n.as_str()).is_err() {
                out.push(crate::config::Problem {
                    key: format!("{key}.server_name"),
                    needle: n.clone(),
                    message: format!("`{n}` is not a DNS name or IP address"),
                });
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {

    #[test]
    fn relative_paths_follow_the_config_file_and_problems_name_key_and_line() {
        let dir = std::env::temp_dir().join(format!("usher-tlscfg-{}", fastrand::u64(..)));
        std::fs::create_dir_all(&dir).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["a.test".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        std::fs::write(dir.join("a.crt"), cert.pem()).unwrap();
        std::fs::write(dir.join("a.key"), key.serialize_pem()).unwrap();
        let yaml = r#"
listeners:
  - name: s
    address: 127.0.0.1:0
    redirect_to_https: true
    tls: { certificates: [{ cert: a.crt, key: a.key }], hsts: "nope" }
routes: [{ upstream: app }]
upstreams:
  app: { backends: [{ address: "127.0.0.1:9" }] }
"#;
        let file = dir.join("u.yaml");
        let errs =
            crate::config::parse_checked(yaml, &file.display().to_string(), super::check_config)
                .unwrap_err();
        let text: Vec<String> = errs.iter().map(ToString::to_string).collect();
        assert_eq!(errs.len(), 2, "{text:?}");
        // `file:line:col: key: message`, at the offending value.
        assert!(
            text[0].contains(":6:") && text[0].contains(": listeners[0].tls.hsts: "),
            "{text:?}"
        );
        assert!(
            text[1].contains(":5:") && text[1].contains(": listeners[0].redirect_to_https: "),
            "{text:?}"
        );

        let ok = yaml
            .replace("    redirect_to_https: true\n", "")
            .replace("\"nope\"", "\"max-age=60\"");
        let c = crate::config::parse_checked(&ok, &file.display().to_string(), super::check_config)
            .unwrap();
        let t = c.listeners[0].tls.as_ref().unwrap();
        assert_eq!(t.certificates[0].cert, dir.join("a.crt"));
        assert_eq!(t.handshake_timeout.0, std::time::Duration::from_secs(10));
        assert_eq!(c.listeners[0].http2.max_concurrent_streams, 250);
        assert_eq!(c.upstreams["app"].upgrades.max_upgraded, 1024);
        let _ = std::fs::remove_dir_all(dir);
    }
}
