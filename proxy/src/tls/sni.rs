//! Choosing a certificate by SNI, from a set that rotation swaps whole.
//!
//! [`SniResolver`] is what rustls asks during each handshake. It holds the
//! current [`Certs`] behind an `ArcSwap`: a rotation builds a new set off the
//! handshake path and stores it, new handshakes see it at once, and sessions
//! already established keep the certificate they were made with.

use std::collections::HashMap;
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use super::cert::{self, CertError};
use crate::config::{CertConfig, TlsConfig};

/// One listener's certificates, indexed by the names they serve.
#[derive(Debug)]
pub struct Certs {
    exact: HashMap<String, Arc<CertifiedKey>>,
    /// `*.example.com` is stored under `example.com`.
    wildcard: HashMap<String, Arc<CertifiedKey>>,
    default: Arc<CertifiedKey>,
}

/// Names a certificate serves: the configured ones, else its DNS SANs.
fn names(c: &CertConfig, loaded: &cert::Loaded) -> Vec<String> {
    match &c.names {
        Some(n) => n.iter().map(|s| normalize(s)).collect(),
        None => loaded.san_names.clone(),
    }
}

fn normalize(name: &str) -> String {
    name.trim().trim_end_matches('.').to_ascii_lowercase()
}

impl Certs {
    /// Reads and checks every certificate of a listener.
    pub fn load(cfg: &TlsConfig) -> Result<Certs, CertError> {
        let mut exact = HashMap::new();
        let mut wildcard = HashMap::new();
        let mut first = None;
        for c in &cfg.certificates {
            let loaded = cert::load(&c.cert, &c.key)?;
            let names = names(c, &loaded);
            if names.is_empty() && first.is_some() {
                return Err(CertError {
                    file: c.cert.clone(),
                    reason: "the certificate has no DNS name in its subjectAltName and no `names` \
                             are given, so no client could select it"
                        .into(),
                });
            }
            for n in names {
                // The first certificate listed for a name wins.
                match n.strip_prefix("*.") {
                    Some(suffix) => wildcard.entry(suffix.to_string()),
                    None => exact.entry(n),
                }
                .or_insert_with(|| loaded.key.clone());
            }
            first.get_or_insert(loaded.key);
        }
        let default = match &cfg.default {
            Some(c) => {
                let loaded = cert::load(&c.cert, &c.key)?;
                loaded.key
            }
            None => first.ok_or_else(|| CertError {
                file: Default::default(),
                reason: "no certificates".into(),
            })?,
        };
        Ok(Certs {
            exact,
            wildcard,
            default,
        })
    }

    /// The certificate for `sni`: an exact name, then a wildcard one label
    /// deep, then the default.
    pub fn pick(&self, sni: Option<&str>) -> Arc<CertifiedKey> {
        let Some(name) = sni.map(normalize) else {
            return self.default.clone();
        };
        if let Some(k) = self.exact.get(&name) {
            return k.clone();
        }
        if let Some(k) = name
            .split_once('.')
            .and_then(|(_, parent)| self.wildcard.get(parent))
        {
            return k.clone();
        }
        self.default.clone()
    }
}

/// The rustls certificate resolver of one listener.
#[derive(Debug)]
pub struct SniResolver {
    certs: ArcSwap<Certs>,
}

impl SniResolver {
    pub fn new(certs: Certs) -> Self {
        SniResolver {
            certs: ArcSwap::from_pointee(certs),
        }
    }

    /// Swaps in a new set; the next handshake uses it.
    pub fn store(&self, certs: Certs) {
        self.certs.store(Arc::new(certs));
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.certs.load().pick(hello.server_name()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::{Path, PathBuf};

    fn pair(dir: &Path, tag: &str, names: &[&str]) -> CertConfig {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert =
            rcgen::CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap()
                .self_signed(&key)
                .unwrap();
        let c = dir.join(format!("{tag}.crt"));
        let k = dir.join(format!("{tag}.key"));
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        CertConfig {
            cert: c,
            key: k,
            names: None,
        }
    }

    fn der(k: &CertifiedKey) -> Vec<u8> {
        k.cert[0].to_vec()
    }

    #[test]
    fn picks_exact_then_wildcard_then_default() {
        let d: PathBuf = std::env::temp_dir().join(format!("usher-sni-{}", fastrand::u64(..)));
        std::fs::create_dir_all(&d).unwrap();
        let a = pair(&d, "a", &["a.example"]);
        let w = pair(&d, "w", &["*.w.example"]);
        let mut named = pair(&d, "n", &["ignored.example"]);
        named.names = Some(vec!["Named.Example.".into()]);
        let def = pair(&d, "def", &["default.example"]);
        let cfg = TlsConfig {
            certificates: vec![a.clone(), w.clone(), named.clone()],
            default: Some(def.clone()),
            handshake_timeout: crate::config::Dur::secs(1),
            hsts: None,
        };
        let certs = Certs::load(&cfg).unwrap();
        let load = |c: &CertConfig| der(&cert::load(&c.cert, &c.key).unwrap().key);
        assert_eq!(der(&certs.pick(Some("A.example"))), load(&a));
        assert_eq!(der(&certs.pick(Some("x.w.example"))), load(&w));
        assert_eq!(der(&certs.pick(Some("y.x.w.example"))), load(&def));
        assert_eq!(der(&certs.pick(Some("w.example"))), load(&def));
        assert_eq!(der(&certs.pick(Some("named.example"))), load(&named));
        assert_eq!(der(&certs.pick(Some("ignored.example"))), load(&def));
        assert_eq!(der(&certs.pick(None)), load(&def));

        let no_default = TlsConfig {
            default: None,
            ..cfg
        };
        let certs = Certs::load(&no_default).unwrap();
        assert_eq!(der(&certs.pick(Some("unknown"))), load(&a));
        let _ = std::fs::remove_dir_all(d);
    }
}
