//! The library parts of the command line that need no process: flag
//! parsing that must hide passwords, the CA-bundle check, and how durations
//! are printed.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;

use clap::Parser;
use tidemark::exit::Failure;
use tidemark::roles::Infra;
use tidemark::tls::{TlsArgs, explain, read_ca_file};
use tidemark_coordinator::ops::human_secs;

#[derive(Parser)]
struct Args {
    #[command(flatten)]
    infra: Infra,
}

/// A role's settings may be logged whole (`?infra`); the passwords in
/// the Redis and RabbitMQ URLs must not be.
#[test]
fn infra_debug_hides_service_passwords() {
    let args = Args::try_parse_from([
        "role",
        "--redis-url",
        "rediss://:redis-canary@redis:6380/0",
        "--amqp-url",
        "amqps://tm:amqp-canary@rabbit:5671/%2f",
    ])
    .unwrap();
    let shown = format!("{:?}", args.infra);
    assert!(!shown.contains("canary"), "{shown}");
    assert!(shown.contains("rediss://:***@redis:6380/0"), "{shown}");
    assert_eq!(
        &*args.infra.amqp.url,
        "amqps://tm:amqp-canary@rabbit:5671/%2f"
    );
    let bus = tidemark_bus::amqp::BusConfig::new(args.infra.amqp.url.to_string());
    assert!(!format!("{bus:?}").contains("canary"));
}

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
    assert!(explain("io error: invalid peer certificate: UnknownIssuer").contains("--tls-ca-file"));
    assert_eq!(
        explain("Connection refused (os error 111)"),
        "Connection refused (os error 111)"
    );
}

#[test]
fn durations_read_like_a_person_writes_them() {
    assert_eq!(human_secs(3.4), "3s");
    assert_eq!(human_secs(250.0), "4m10s");
    assert_eq!(human_secs(7500.0), "2h05m");
    assert_eq!(human_secs(3.0 * 86_400.0 + 4.0 * 3600.0), "3d04h");
}
