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
//!
//! `redis+sentinel://` and `rediss+sentinel://` name the sentinels of a
//! master instead of a server ([`crate::sentinel`]); `rediss+sentinel`
//! trusts the same roots, for the sentinels and for the data nodes.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use redis::{Client, TlsCertificates};

use crate::StateError;
use crate::conn::Conn;
use crate::sentinel::{SentinelUrl, Sentinels, is_sentinel_url};

/// A Redis client for `url`. For `rediss://`, the roots are the system's
/// plus `ca_pem` (PEM CA certificates); for other schemes `ca_pem` is unused.
///
/// For a Sentinel URL, a client of the node the sentinels name as master
/// now (checked with `ROLE`): fine for a look at the data, but it does
/// not follow a failover; a [`crate::RedisStore`] does.
pub fn redis_client(url: &str, ca_pem: Option<&str>) -> Result<Client, StateError> {
    if is_sentinel_url(url) {
        return sentinel_master_client(url, ca_pem);
    }
    if !is_tls(url) {
        return Ok(Client::open(url)?);
    }
    Ok(Client::build_with_tls(url, certificates(ca_pem))?)
}

/// Whether `url` asks for TLS (`rediss://`, its `valkeys://` alias, or
/// `rediss+sentinel://`).
pub fn is_tls(url: &str) -> bool {
    if is_sentinel_url(url) {
        return url
            .get(..16)
            .is_some_and(|s| s.eq_ignore_ascii_case("rediss+sentinel:"));
    }
    redis::parse_redis_url(url).is_some_and(|u| matches!(u.scheme(), "rediss" | "valkeys"))
}

/// `url` as it may be shown: the passwords (the user info's, and
/// `sentinel_password`) replaced by `***`.
pub fn redacted_url(url: &str) -> String {
    crate::sentinel::redacted(url)
}

/// The roots for a TLS connection: the system's and `ca_pem`.
fn certificates(ca_pem: Option<&str>) -> TlsCertificates {
    install_crypto_provider();
    TlsCertificates {
        client_tls: None,
        root_cert: Some(root_bundle(ca_pem).into_bytes()),
    }
}

fn parse_sentinel_url(url: &str) -> Result<SentinelUrl, StateError> {
    SentinelUrl::parse(url).map_err(StateError::Url)
}

fn sentinels(url: &str, ca_pem: Option<&str>) -> Result<Arc<Sentinels>, StateError> {
    let parsed = parse_sentinel_url(url)?;
    let certs = parsed.tls.then(|| certificates(ca_pem));
    Ok(Arc::new(Sentinels::new(parsed, certs)?))
}

/// [`redis_client`] of a Sentinel URL: the master found now, from a
/// thread of its own (this may be called inside or outside a runtime).
fn sentinel_master_client(url: &str, ca_pem: Option<&str>) -> Result<Client, StateError> {
    let s = sentinels(url, ca_pem)?;
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| StateError::Redis(e.into()))?;
                let master = rt.block_on(s.master())?;
                Ok(Client::clone(&master.client))
            })
            .join()
            .unwrap_or_else(|_| {
                Err(StateError::Url(
                    "finding the master through the sentinels panicked".into(),
                ))
            })
    })
}

/// Open the store's connection to `url`: a reconnecting connection to one
/// server, or the sentinels' master (found now, and again after a failure).
pub(crate) async fn open(url: &str, ca_pem: Option<&str>) -> Result<Conn, StateError> {
    if is_sentinel_url(url) {
        let s = sentinels(url, ca_pem)?;
        // Find the master now, so that a wrong name, password or
        // certificate is reported at start; retried like a single server
        // (below: about 5 s), except a TLS refusal, which stays one.
        let mut delays = [1000u64, 2000, 2000].into_iter();
        loop {
            match s.master().await {
                Ok(_) => break,
                Err(e) if is_tls_failure(&e) => return Err(e.into()),
                Err(e) => match delays.next() {
                    Some(ms) => {
                        tracing::debug!(error = %e, "no Redis master yet; asking the sentinels again");
                        tokio::time::sleep(Duration::from_millis(ms)).await;
                    }
                    None => return Err(e.into()),
                },
            }
        }
        return Ok(Conn::sentinels(s));
    }
    let client = redis_client(url, ca_pem)?;
    if is_tls(url) {
        // An untrusted certificate stays untrusted: say so now, not
        // after the connection manager's retries (minutes).
        let probe = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Duration::from_secs(5))
            .set_response_timeout(Duration::from_secs(5));
        if let Err(e) = client
            .get_multiplexed_async_connection_with_config(&probe)
            .await
            && is_tls_failure(&e)
        {
            return Err(e.into());
        }
    }
    // redis 0.32 hands `factor` to its backoff as the growth per
    // attempt (from a 1 s start): its default of 100 made a Redis that
    // does not answer take over two minutes to report. Double instead,
    // at most 2 s apart: 3 retries, about 5 s.
    let config = redis::aio::ConnectionManagerConfig::new()
        .set_connection_timeout(Duration::from_secs(5))
        .set_response_timeout(Duration::from_secs(5))
        .set_number_of_retries(3)
        .set_factor(2)
        .set_max_delay(2000);
    let manager = redis::aio::ConnectionManager::new_with_config(client.clone(), config).await?;
    Ok(Conn::Direct {
        manager,
        client: Arc::new(client),
    })
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
        assert!(is_tls("rediss+sentinel://s1:26379,s2:26379/mymaster"));
        assert!(is_tls("REDISS+SENTINEL://s1/m"));
        assert!(!is_tls("redis+sentinel://s1:26379/mymaster"));
    }

    #[test]
    fn a_bad_sentinel_url_is_a_url_error_and_a_bad_bundle_is_refused_before_any_connection() {
        let e = redis_client("redis+sentinel://:hunter2@h1:x/m", None)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.starts_with("Redis URL: ") && e.contains("port"), "{e}");
        assert!(!e.contains("hunter2"), "{e}");
        let bogus = "-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n";
        let e = redis_client("rediss+sentinel://127.0.0.1:1/m", Some(bogus))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("trust anchors"), "{e}");
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
