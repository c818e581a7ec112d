//! Opening Redis: the one place a Redis client is made, so that `rediss://`
//! trusts the same roots everywhere.
//!
//! `redis://` connects in the clear. `rediss://` connects over rustls and
//! trusts the system's root certificates (rustls-native-certs: the OS store,
//! or `SSL_CERT_FILE` / `SSL_CERT_DIR`) plus, when given, a PEM bundle of
//! CA certificates (`--tls-ca-file`): the same roots lapin's platform
//! verifier gives `amqps://`. The redis crate replaces its roots with a
//! bundle instead of adding to them, so the bundle handed to it is the
//! system's roots and the configured ones together.

use base64::Engine;
use redis::{Client, TlsCertificates};

use crate::StateError;

/// A Redis client for `url`. For `rediss://`, the roots are the system's
/// plus `ca_pem` (PEM CA certificates); for other schemes `ca_pem` is unused.
pub fn redis_client(url: &str, ca_pem: Option<&str>) -> Result<Client, StateError> {
    if !is_tls(url) {
        return Ok(Client::open(url)?);
    }
    install_crypto_provider();
    let certificates = TlsCertificates {
        client_tls: None,
        root_cert: Some(root_bundle(ca_pem).into_bytes()),
    };
    Ok(Client::build_with_tls(url, certificates)?)
}

/// Whether `url` asks for TLS (`rediss://`, or its `valkeys://` alias).
pub fn is_tls(url: &str) -> bool {
    redis::parse_redis_url(url).is_some_and(|u| matches!(u.scheme(), "rediss" | "valkeys"))
}

/// Whether `e` is the TLS layer's refusal (an untrusted or wrong
/// certificate, no protocol in common), which retrying does not mend.
pub(crate) fn is_tls_failure(e: &redis::RedisError) -> bool {
    std::error::Error::source(e)
        .and_then(|s| s.downcast_ref::<std::io::Error>())
        .and_then(|io| io.get_ref())
        .is_some_and(|inner| inner.is::<rustls::Error>())
}

/// rustls needs one process-wide crypto provider, and with more than one
/// compiled in (ring for reqwest, redis and lapin; aws-lc-rs when a test
/// dependency brings it) it will not pick one: install ring unless the
/// process already chose.
fn install_crypto_provider() {
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        // An error means another thread installed one first: that one is used.
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
}

/// The system's roots as PEM, followed by `extra`. A system store that
/// cannot be read, in part or at all, leaves those roots out, as the
/// platform verifier does for AMQP: a configured bundle still works.
fn root_bundle(extra: Option<&str>) -> String {
    let system = rustls_native_certs::load_native_certs();
    for error in &system.errors {
        tracing::debug!(%error, "a system root certificate could not be loaded");
    }
    let mut pem = String::new();
    for cert in &system.certs {
        // The bundle is refused whole if one root does not parse: skip any
        // the system has that rustls cannot use, as the platform verifier does.
        if rustls::RootCertStore::empty().add(cert.clone()).is_ok() {
            pem.push_str(&to_pem(cert.as_ref()));
        }
    }
    if let Some(extra) = extra {
        pem.push_str(extra);
        if !extra.ends_with('\n') {
            pem.push('\n');
        }
    }
    pem
}

fn to_pem(der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut pem = String::with_capacity(b64.len() + b64.len() / 64 + 60);
    pem.push_str("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        // Base64 is ASCII, so every chunk is valid UTF-8.
        pem.push_str(std::str::from_utf8(line).unwrap_or_default());
        pem.push('\n');
    }
    pem.push_str("-----END CERTIFICATE-----\n");
    pem
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_rediss_and_valkeys_are_tls() {
        assert!(is_tls("rediss://127.0.0.1:6380"));
        assert!(is_tls("rediss://:pw@host/0"));
        assert!(is_tls("valkeys://host"));
        assert!(!is_tls("redis://127.0.0.1:6379"));
        assert!(!is_tls("unix:///tmp/redis.sock"));
        assert!(!is_tls("not a url"));
    }

    #[test]
    fn plain_urls_ignore_the_bundle_and_tls_urls_take_it() {
        let bogus = "-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n";
        assert!(redis_client("redis://127.0.0.1:6379", Some(bogus)).is_ok());
        assert!(redis_client("rediss://127.0.0.1:6380", None).is_ok());
        // Not DER inside: refused when the client is made, before any connection.
        let e = redis_client("rediss://127.0.0.1:6380", Some(bogus))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("trust anchors"), "{e}");
    }

    #[test]
    fn pem_lines_are_64_wide_and_round_trip() {
        let der: Vec<u8> = (0..=255u8).cycle().take(1000).collect();
        let pem = to_pem(&der);
        assert!(pem.lines().all(|l| l.len() <= 64 || l.starts_with("-----")));
        let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        let back = base64::engine::general_purpose::STANDARD
            .decode(body)
            .unwrap_or_default();
        assert_eq!(back, der);
    }
}
