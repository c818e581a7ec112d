//! Exit codes: 0 ok, 1 runtime failure, 2 bad usage or bad config.

use std::fmt;

/// An error that knows which exit code it deserves.
#[derive(Debug)]
pub struct Failure {
    pub code: u8,
    pub message: String,
}

impl Failure {
    /// Bad usage or bad config: exit 2.
    pub fn usage(message: impl Into<String>) -> Self {
        Self {
            code: 2,
            message: message.into(),
        }
    }
    /// Something failed while running: exit 1.
    pub fn runtime(message: impl Into<String>) -> Self {
        Self {
            code: 1,
            message: message.into(),
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Failure {}

impl From<tidemark_embedded::EmbeddedError> for Failure {
    fn from(e: tidemark_embedded::EmbeddedError) -> Self {
        if e.is_usage() {
            Self::usage(e.to_string())
        } else {
            Self::runtime(e.to_string())
        }
    }
}

impl From<tidemark_coordinator::ops::OpError> for Failure {
    fn from(e: tidemark_coordinator::ops::OpError) -> Self {
        if e.is_usage() {
            Self::usage(e.to_string())
        } else {
            Self::runtime(e.to_string())
        }
    }
}

impl From<tidemark_state::StateError> for Failure {
    fn from(e: tidemark_state::StateError) -> Self {
        Self::runtime(e.to_string())
    }
}
