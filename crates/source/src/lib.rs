//! tidemark-source: fetching one page from an API over HTTP.
//!
//! [`HttpSource`] adds auth (secrets resolved from the environment or files
//! at request time; OAuth2 client credentials with a cached token), enforces
//! the same-origin rule on requests and redirects (a redirect to an allowed
//! origin is followed without credentials), bounds the body and header
//! sizes, scrubs sent secrets from echoed error bodies, and retries what a retry can fix ([`FetchError::is_transient`])
//! with exponential backoff, full jitter and `Retry-After`.

mod auth;
mod client;
mod error;
mod oauth;
mod retry;

pub use client::{FetchedPage, HttpSource, Pool, rate_pause};
pub use error::FetchError;
pub use retry::{backoff_delay, parse_retry_after};
