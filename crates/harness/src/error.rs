//! What can go wrong starting processes, finding services or benchmarking.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    #[error("cannot start {name}: {source}")]
    Spawn {
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{name} did not start:\n{log}")]
    NotReady { name: String, log: String },
    #[error("{name} announced no address: {line}")]
    NoAddress { name: String, line: String },
    #[error("{name} exited ({status}) during the run:\n{log}")]
    Exited {
        name: String,
        status: std::process::ExitStatus,
        log: String,
    },
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "no {what} at {url}{}: start one (./scripts/test does), or set {var}",
        if *.no_docker { " and no Docker" } else { "" }
    )]
    NoService {
        what: &'static str,
        url: String,
        var: &'static str,
        /// Containers were allowed, but Docker is not there.
        no_docker: bool,
    },
    #[error("cannot start a {what} container: {reason}")]
    Container { what: &'static str, reason: String },
    /// A benchmark run that failed: what failed, with the logs that say why.
    #[error("{0}")]
    Bench(String),
}

impl HarnessError {
    pub fn bench(message: impl Into<String>) -> Self {
        Self::Bench(message.into())
    }
}
