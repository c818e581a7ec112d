//! tidemark-source: fetching one page from an API over HTTP.
//!
//! [`HttpSource`] adds auth (secrets resolved from the environment at request
//! time), enforces the same-origin rule on requests and redirects, bounds the
//! body size, and retries what a retry can fix ([`FetchError::is_transient`])
//! with exponential backoff, full jitter and `Retry-After`.

mod auth;
mod client;
mod error;
mod retry;

pub use client::{FetchedPage, HttpSource};
pub use error::FetchError;
pub use retry::{backoff_delay, parse_retry_after};
