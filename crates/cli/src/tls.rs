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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn file(content: &[u8]) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        std::io::Write::write_all(&mut f, content).unwrap();
        f
    }

    fn refused(content: Option<&[u8]>) -> Failure {
        let f = content.map(file);
        let path = match &f {
            Some(f) => f.path().to_path_buf(),
            None => PathBuf::from("/nonexistent/tidemark-ca.pem"),
        };
        let e = read_ca_file(&path).err().unwrap();
        assert_eq!(e.code, 2, "{e}");
        assert!(e.message.contains(&path.display().to_string()), "{e}");
        e
    }

    #[test]
    fn an_unusable_bundle_is_a_usage_error_naming_the_file() {
        assert!(refused(None).message.contains("cannot read it"));
        assert!(refused(Some(b"")).message.contains("no certificate"));
        assert!(refused(Some(b"hello\n")).message.contains("no certificate"));
        let key_only = b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n";
        assert!(refused(Some(key_only)).message.contains("no certificate"));
        let cut = b"-----BEGIN CERTIFICATE-----\nMIIB\n";
        assert!(refused(Some(cut)).message.contains("not a valid PEM"));
        let junk = b"-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n";
        assert!(refused(Some(junk)).message.contains("certificate 1 "));
    }

    #[test]
    fn no_option_no_bundle() {
        assert_eq!(TlsArgs::default().ca_pem().unwrap(), None);
    }

    #[test]
    fn certificate_errors_get_a_hint_and_others_do_not() {
        assert!(
            hint("io error: invalid peer certificate: UnknownIssuer").contains("--tls-ca-file")
        );
        assert_eq!(hint("Connection refused (os error 111)"), "");
    }
}
