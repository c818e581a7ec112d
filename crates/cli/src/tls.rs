//! `--tls-ca-file` (`TIDEMARK_TLS_CA_FILE`): one PEM bundle of CA
//! certificates that `rediss://` and `amqps://` servers may chain to,
//! besides the system's roots. Read and checked once per command, before
//! anything connects, so a bad file is a usage error naming it.

use std::path::{Path, PathBuf};

use clap::Args;
use rustls::RootCertStore;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

use crate::exit::Failure;

/// The TLS option of every command that reaches Redis or RabbitMQ.
#[derive(Args, Debug, Clone, Default)]
pub struct TlsArgs {
    /// PEM file of CA certificates to trust for rediss:// and amqps://, besides the system's roots.
    #[arg(long, env = "TIDEMARK_TLS_CA_FILE", value_name = "PATH")]
    pub tls_ca_file: Option<PathBuf>,
}

impl TlsArgs {
    /// The bundle's PEM text, checked; `None` without the option.
    pub fn ca_pem(&self) -> Result<Option<String>, Failure> {
        self.tls_ca_file.as_deref().map(read_ca_file).transpose()
    }
}

/// Read `path` and check that it holds at least one PEM certificate and
/// that every certificate in it can be a trust anchor.
pub fn read_ca_file(path: &Path) -> Result<String, Failure> {
    let bad = |why: String| Failure::usage(format!("--tls-ca-file {}: {why}", path.display()));
    let bytes = std::fs::read(path).map_err(|e| bad(format!("cannot read it: {e}")))?;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<_, _>>()
        .map_err(|e| bad(format!("not a valid PEM file: {e}")))?;
    if certs.is_empty() {
        return Err(bad(
            "no certificate in it (expected PEM blocks starting with -----BEGIN CERTIFICATE-----)"
                .into(),
        ));
    }
    for (i, cert) in certs.into_iter().enumerate() {
        RootCertStore::empty().add(cert).map_err(|e| {
            bad(format!(
                "certificate {} of the file is not a usable CA certificate: {e}",
                i + 1
            ))
        })?;
    }
    // PEM is ASCII; a file that parsed as PEM and is not UTF-8 has binary
    // bytes outside its blocks, which the AMQP client's reader would not take.
    String::from_utf8(bytes).map_err(|_| bad("not a text file".into()))
}

/// A connection error's text, followed by [`hint`]'s advice when it is
/// about the server's certificate.
pub fn explain(error: impl std::fmt::Display) -> String {
    let e = error.to_string();
    let hint = hint(&e);
    e + hint
}

/// A hint for a connection error that is about the server's certificate.
fn hint(error: &str) -> &'static str {
    let e = error.to_ascii_lowercase();
    if e.contains("certificate") || e.contains("unknownissuer") {
        " (the server's certificate must chain to the system's roots or to a CA in \
         --tls-ca-file / TIDEMARK_TLS_CA_FILE, and name the host in the URL)"
    } else {
        ""
    }
}
