//! What can go wrong in embedded mode, and whose fault it is.

use std::path::PathBuf;

use tidemark_coordinator::ops::OpError;
use tidemark_state::StateError;

/// An error of embedded mode. [`EmbeddedError::is_usage`] tells a wrong
/// request (a missing state directory, one held by another run, an unknown
/// feed) from a failure of the system.
#[derive(Debug, thiserror::Error)]
pub enum EmbeddedError {
    #[error("no tidemark state in {} (expected {})", dir.display(), file.display())]
    NoState { dir: PathBuf, file: PathBuf },
    #[error(
        "another tidemark run holds {} (see its lock file); stop it first, or use another --state-dir",
        .0.display()
    )]
    Held(PathBuf),
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    State(#[from] StateError),
    #[error("{0}")]
    Op(#[from] OpError),
    /// The run holding the directory refused a request as wrong.
    #[error("{0}")]
    Refused(String),
    /// The run holding the directory failed to apply a request.
    #[error("{0}")]
    Failed(String),
    #[error("unreadable answer from the run: {0}")]
    BadReply(serde_json::Error),
    #[error("cannot encode a control request: {0}")]
    Encode(serde_json::Error),
    #[error(
        "the tidemark run holding {} (pid {pid}) did not answer within 10s",
        dir.display()
    )]
    NoAnswer { dir: PathBuf, pid: String },
    #[error("{0}")]
    Worker(#[from] tidemark_worker::WorkerError),
    #[error("{} job(s) failed:\n  {}", .0.len(), .0.join("\n  "))]
    JobsFailed(Vec<String>),
    /// A wrong request: an unknown feed or partition, flags that exclude each other.
    #[error("{0}")]
    Usage(String),
    /// A pull that failed while it ran.
    #[error("{0}")]
    Pull(String),
}

impl EmbeddedError {
    /// True when the request was wrong (exit 2), not the system.
    pub fn is_usage(&self) -> bool {
        match self {
            Self::NoState { .. } | Self::Held(_) | Self::Refused(_) | Self::Usage(_) => true,
            Self::Op(e) => e.is_usage(),
            _ => false,
        }
    }

    pub(crate) fn io(
        what: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| Self::Io { what, path, source }
    }
}
