//! Reading certificate and key files, and saying exactly what is wrong with
//! them.
//!
//! A bad certificate found at 3 a.m. during a rotation must be reported with
//! the file and the reason, not as "handshake failure" on every client. So
//! each file is checked on its own: it can be read, it holds PEM of the right
//! kind, the key matches the certificate, and the certificate is inside its
//! validity period. rustls checks none of the last two for a server's own
//! certificate, so the validity dates and the subjectAltName DNS names are
//! read here with a small DER walker (a dozen fields of X.509, not a parser
//! for all of it).

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;

/// A problem with one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertError {
    pub file: PathBuf,
    pub reason: String,
}

impl fmt::Display for CertError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.file.display(), self.reason)
    }
}

impl std::error::Error for CertError {}

fn err(file: &Path, reason: impl Into<String>) -> CertError {
    CertError {
        file: file.to_path_buf(),
        reason: reason.into(),
    }
}

/// A certificate chain with its key, ready to serve.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub key: Arc<CertifiedKey>,
    /// DNS names of the end-entity certificate's subjectAltName, lowercase.
    pub san_names: Vec<String>,
}

pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads the certificates of a PEM file (for chains and CA bundles).
pub fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, CertError> {
    let pem = std::fs::read(path).map_err(|e| err(path, format!("cannot read: {e}")))?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err(path, format!("not valid PEM: {e}")))?;
    if certs.is_empty() {
        return Err(err(
            path,
            "no `BEGIN CERTIFICATE` block (expected a PEM certificate)",
        ));
    }
    Ok(certs)
}

/// Reads one private key from a PEM file.
pub fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, CertError> {
    let pem = std::fs::read(path).map_err(|e| err(path, format!("cannot read: {e}")))?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => err(
            path,
            "no private key block (expected PEM `PRIVATE KEY`, `RSA PRIVATE KEY` or `EC PRIVATE KEY`)",
        ),
        e => err(path, format!("not a valid PEM private key: {e}")),
    })
}

/// Loads and checks a certificate chain and its key.
pub fn load(cert: &Path, key: &Path) -> Result<Loaded, CertError> {
    let chain = read_certs(cert)?;
    let info =
        inspect(&chain[0]).map_err(|e| err(cert, format!("not an X.509 certificate: {e}")))?;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    if info.not_after < now {
        return Err(err(
            cert,
            format!("certificate expired on {}", format_time(info.not_after)),
        ));
    }
    if info.not_before > now {
        return Err(err(
            cert,
            format!(
                "certificate is not valid before {}",
                format_time(info.not_before)
            ),
        ));
    }
    let private = read_key(key)?;
    let certified = CertifiedKey::from_der(chain, private, &provider()).map_err(|e| match e {
        rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch) => err(
            key,
            format!(
                "private key does not match the certificate {}",
                cert.display()
            ),
        ),
        e => err(key, format!("unusable private key: {e}")),
    })?;
    Ok(Loaded {
        key: Arc::new(certified),
        san_names: info.dns_names,
    })
}

/// What Usher needs to know about a certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    pub not_before: i64,
    pub not_after: i64,
    pub dns_names: Vec<String>,
}

/// Reads one DER TLV from the front of `input`.
fn tlv<'a>(input: &mut &'a [u8]) -> Result<(u8, &'a [u8]), &'static str> {
    let &[tag, first, ref rest @ ..] = *input else {
        return Err("truncated");
    };
    let (len, rest) = if first < 0x80 {
        (first as usize, rest)
    } else {
        let n = (first & 0x7f) as usize;
        if n == 0 || n > 4 || rest.len() < n {
            return Err("bad length");
        }
        let len = rest[..n].iter().fold(0usize, |a, &b| (a << 8) | b as usize);
        (len, &rest[n..])
    };
    if rest.len() < len {
        return Err("truncated");
    }
    let (value, after) = rest.split_at(len);
    *input = after;
    Ok((tag, value))
}

fn expect<'a>(input: &mut &'a [u8], tag: u8) -> Result<&'a [u8], &'static str> {
    match tlv(input)? {
        (t, v) if t == tag => Ok(v),
        _ => Err("unexpected field"),
    }
}

const SEQUENCE: u8 = 0x30;
/// subjectAltName, 2.5.29.17.
const OID_SAN: &[u8] = &[0x55, 0x1d, 0x11];

/// Reads validity and subjectAltName DNS names from a DER certificate.
pub fn inspect(der: &[u8]) -> Result<CertInfo, &'static str> {
    let mut input = der;
    let mut cert = expect(&mut input, SEQUENCE)?;
    let mut tbs = expect(&mut cert, SEQUENCE)?;
    if tbs.first() == Some(&0xa0) {
        tlv(&mut tbs)?; // version
    }
    expect(&mut tbs, 0x02)?; // serialNumber
    expect(&mut tbs, SEQUENCE)?; // signature algorithm
    expect(&mut tbs, SEQUENCE)?; // issuer
    let mut validity = expect(&mut tbs, SEQUENCE)?;
    let not_before = time(&mut validity)?;
    let not_after = time(&mut validity)?;
    expect(&mut tbs, SEQUENCE)?; // subject
    expect(&mut tbs, SEQUENCE)?; // subjectPublicKeyInfo
    let mut dns_names = Vec::new();
    while !tbs.is_empty() {
        let (tag, value) = tlv(&mut tbs)?;
        if tag != 0xa3 {
            continue; // issuerUniqueID, subjectUniqueID
        }
        let mut exts_outer = value;
        let mut exts = expect(&mut exts_outer, SEQUENCE)?;
        while !exts.is_empty() {
            let mut ext = expect(&mut exts, SEQUENCE)?;
            let oid = expect(&mut ext, 0x06)?;
            if ext.first() == Some(&0x01) {
                tlv(&mut ext)?; // critical
            }
            let mut octets = expect(&mut ext, 0x04)?;
            if oid != OID_SAN {
                continue;
            }
            let mut names = expect(&mut octets, SEQUENCE)?;
            while !names.is_empty() {
                let (tag, value) = tlv(&mut names)?;
                // [2] IMPLICIT IA5String: dNSName
                if tag == 0x82 {
                    if let Ok(s) = std::str::from_utf8(value) {
                        dns_names.push(s.to_ascii_lowercase());
                    }
                }
            }
        }
    }
    Ok(CertInfo {
        not_before,
        not_after,
        dns_names,
    })
}

/// UTCTime (`YYMMDDHHMMSSZ`) or GeneralizedTime (`YYYYMMDDHHMMSSZ`), as
/// seconds since the epoch.
fn time(input: &mut &[u8]) -> Result<i64, &'static str> {
    let (tag, v) = tlv(input)?;
    let s = std::str::from_utf8(v).map_err(|_| "bad time")?;
    let s = s.strip_suffix('Z').ok_or("time not in UTC")?;
    let (year, rest) = match (tag, s.len()) {
        (0x17, 12) => {
            let yy: i64 = s[..2].parse().map_err(|_| "bad time")?;
            (if yy >= 50 { 1900 + yy } else { 2000 + yy }, &s[2..])
        }
        (0x18, 14) => (s[..4].parse().map_err(|_| "bad time")?, &s[4..]),
        _ => return Err("bad time"),
    };
    let num = |i: usize| -> Result<i64, &'static str> {
        rest[i..i + 2].parse::<i64>().map_err(|_| "bad time")
    };
    let (month, day, h, m, sec) = (num(0)?, num(2)?, num(4)?, num(6)?, num(8)?);
    Ok(days_from_civil(year, month, day) * 86400 + h * 3600 + m * 60 + sec)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// `YYYY-MM-DD HH:MM:SS UTC`.
pub fn format_time(t: i64) -> String {
    let days = t.div_euclid(86400);
    let secs = t.rem_euclid(86400);
    // civil_from_days (H. Hinnant)
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert(names: &[&str], not_after: (i32, u8, u8)) -> rcgen::CertifiedKey {
        let mut p =
            rcgen::CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap();
        p.not_before = rcgen::date_time_ymd(2000, 1, 1);
        p.not_after = rcgen::date_time_ymd(not_after.0, not_after.1, not_after.2);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = p.self_signed(&key).unwrap();
        rcgen::CertifiedKey {
            cert,
            key_pair: key,
        }
    }

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    fn tmpdir() -> PathBuf {
        let d = std::env::temp_dir().join(format!("usher-cert-{}", fastrand::u64(..)));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn reads_validity_and_dns_names() {
        let c = cert(&["a.example", "*.b.example", "127.0.0.1"], (2090, 3, 4));
        let info = inspect(c.cert.der()).unwrap();
        assert_eq!(info.dns_names, vec!["a.example", "*.b.example"]);
        assert_eq!(format_time(info.not_before), "2000-01-01 00:00:00 UTC");
        assert_eq!(format_time(info.not_after), "2090-03-04 00:00:00 UTC");
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(format_time(951_782_400), "2000-02-29 00:00:00 UTC");
    }

    #[test]
    fn each_bad_file_is_named_with_its_reason() {
        let d = tmpdir();
        let good = cert(&["a.example"], (2090, 1, 1));
        let other = cert(&["b.example"], (2090, 1, 1));
        let old = cert(&["a.example"], (2001, 1, 1));
        let c = write(&d, "c.pem", &good.cert.pem());
        let k = write(&d, "k.pem", &good.key_pair.serialize_pem());
        let k2 = write(&d, "k2.pem", &other.key_pair.serialize_pem());
        let expired = write(&d, "old.pem", &old.cert.pem());
        let junk = write(&d, "junk.pem", "hello\n");

        let ok = load(&c, &k).unwrap();
        assert_eq!(ok.san_names, vec!["a.example"]);

        let e = load(&d.join("missing.pem"), &k).unwrap_err();
        assert!(e.to_string().contains("missing.pem: cannot read"), "{e}");
        let e = load(&junk, &k).unwrap_err();
        assert!(
            e.to_string().contains("junk.pem: no `BEGIN CERTIFICATE`"),
            "{e}"
        );
        let e = load(&c, &junk).unwrap_err();
        assert!(e.to_string().contains("junk.pem: no private key"), "{e}");
        let e = load(&c, &k2).unwrap_err();
        assert!(
            e.to_string().contains("k2.pem: private key does not match"),
            "{e}"
        );
        let e = load(&expired, &k).unwrap_err();
        assert!(
            e.to_string()
                .contains("old.pem: certificate expired on 2001-01-01"),
            "{e}"
        );
        let _ = std::fs::remove_dir_all(d);
    }
}
