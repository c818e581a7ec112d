//! TLS for the suites: a throwaway CA with a server certificate for
//! `127.0.0.1` and `localhost` (made with rcgen at test time, written as PEM
//! files), and [`TlsFront`], which terminates TLS and forwards to a plain
//! TCP service: the shared RabbitMQ has no TLS listener and is not
//! reconfigured, so `amqps://` reaches it through one of these.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tempfile::TempDir;
use tidemark_harness::redis_server::TlsFiles;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// A CA and one server certificate it signed, as PEM text and files
/// (`ca.pem`, `server.pem`, `server.key`) in a temp dir removed on drop.
pub struct TestCa {
    dir: TempDir,
    ca_pem: String,
    cert_pem: String,
    key_pem: String,
}

impl TestCa {
    /// A fresh CA named `name` and a server certificate for `127.0.0.1`
    /// and `localhost`.
    pub fn new(name: &str) -> TestCa {
        let ca_key = KeyPair::generate().expect("a CA key");
        let mut ca = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name.push(DnType::CommonName, name);
        ca.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_cert = ca.self_signed(&ca_key).expect("self-signed CA");
        let issuer = Issuer::new(ca, ca_key);

        let key = KeyPair::generate().expect("a server key");
        let mut server = CertificateParams::new(vec!["127.0.0.1".into(), "localhost".into()])
            .expect("server params");
        server
            .distinguished_name
            .push(DnType::CommonName, "tidemark test server");
        server.use_authority_key_identifier_extension = true;
        let cert = server.signed_by(&key, &issuer).expect("server certificate");

        let dir = tempfile::Builder::new()
            .prefix("tidemark-tls-")
            .tempdir()
            .expect("a temp dir for the certificates");
        let ca = TestCa {
            dir,
            ca_pem: ca_cert.pem(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        };
        for (file, text) in [
            (ca.ca_file(), &ca.ca_pem),
            (ca.cert_file(), &ca.cert_pem),
            (ca.key_file(), &ca.key_pem),
        ] {
            std::fs::write(&file, text).expect("write a PEM file");
        }
        ca
    }

    /// The CA certificate (what `TIDEMARK_TLS_CA_FILE` points at).
    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }
    pub fn cert_file(&self) -> PathBuf {
        self.dir.path().join("server.pem")
    }
    pub fn key_file(&self) -> PathBuf {
        self.dir.path().join("server.key")
    }
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// The files a TLS `RedisServer` serves with.
    pub fn files(&self) -> TlsFiles {
        TlsFiles {
            ca: self.ca_file(),
            cert: self.cert_file(),
            key: self.key_file(),
        }
    }

    /// A rustls server presenting the server certificate.
    pub fn server_config(&self) -> Arc<rustls::ServerConfig> {
        let certs = CertificateDer::pem_slice_iter(self.cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .expect("server certificate PEM");
        let key = PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes()).expect("server key PEM");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("TLS versions")
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .expect("server config");
        Arc::new(config)
    }
}

/// A TLS listener on 127.0.0.1 that presents [`TestCa`]'s server
/// certificate and forwards each connection's plaintext to `upstream`.
/// Dropping it stops the listener and ends every connection.
pub struct TlsFront {
    addr: SocketAddr,
    handshakes: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    accept: JoinHandle<()>,
}

impl TlsFront {
    /// Listen on a free port; `upstream` is `host:port`.
    pub async fn start(upstream: &str, ca: &TestCa) -> std::io::Result<TlsFront> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let acceptor = tokio_rustls::TlsAcceptor::from(ca.server_config());
        let handshakes = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let (ok, bad) = (handshakes.clone(), failed.clone());
        let upstream = upstream.to_string();
        let accept = tokio::spawn(async move {
            // Owned here, so aborting this task ends every connection too.
            let mut conns = tokio::task::JoinSet::new();
            while let Ok((tcp, _)) = listener.accept().await {
                let (acceptor, upstream) = (acceptor.clone(), upstream.clone());
                let (ok, bad) = (ok.clone(), bad.clone());
                conns.spawn(async move {
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        bad.fetch_add(1, Ordering::SeqCst);
                        return;
                    };
                    ok.fetch_add(1, Ordering::SeqCst);
                    if let Ok(mut up) = TcpStream::connect(&upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut tls, &mut up).await;
                    }
                });
                while conns.try_join_next().is_some() {}
            }
        });
        Ok(TlsFront {
            addr,
            handshakes,
            failed,
            accept,
        })
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// TLS handshakes completed so far.
    pub fn handshakes(&self) -> u64 {
        self.handshakes.load(Ordering::SeqCst)
    }

    /// TLS handshakes the client broke off (e.g. it did not trust the certificate).
    pub fn failed_handshakes(&self) -> u64 {
        self.failed.load(Ordering::SeqCst)
    }
}

impl Drop for TlsFront {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::time::Duration;

    use redis::Commands;

    use super::*;
    use crate::redis_server::RedisServer;

    #[test]
    fn a_tls_server_speaks_only_tls_and_keeps_its_certificate_across_restarts()
    -> Result<(), Box<dyn std::error::Error>> {
        let ca = TestCa::new("tidemark redis_server test CA");
        let ca_pem = ca.ca_pem().to_string();
        let mut server = RedisServer::start_tls(&ca.files());
        drop(ca); // its files were copied
        assert!(server.url().starts_with("rediss://127.0.0.1:"));
        let addr = SocketAddr::from(([127, 0, 0, 1], server.port()));
        assert!(
            std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_ok_and(
                |mut s| {
                    use std::io::{Read, Write};
                    let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
                    let _ = s.write_all(b"*1\r\n$4\r\nPING\r\n");
                    let mut buf = [0u8; 64];
                    !matches!(s.read(&mut buf), Ok(n) if buf[..n].starts_with(b"+PONG"))
                }
            ),
            "plain text must not be answered"
        );
        let client = tidemark_state::redis_client(&server.url(), Some(&ca_pem))?;
        let () = client.get_connection()?.set("tidemark:test:tls", "yes")?;
        std::thread::sleep(Duration::from_millis(1200));
        server.restart();
        let got: Option<String> = client.get_connection()?.get("tidemark:test:tls")?;
        assert_eq!(got.as_deref(), Some("yes"));
        Ok(())
    }
}
