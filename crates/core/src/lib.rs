//! tidemark-core: everything about reading cursor APIs that needs no I/O.
//!
//! Config types and their validation ([`config`]), the pagination engine that
//! builds the request for the next page and reads a response ([`pagination`]),
//! JSON pointers, durations, secrets that stay `${VAR}` references until the
//! moment a request is sent, and record identity ([`record`]).

pub mod checkpoint;
pub mod child;
pub mod clock;
pub mod config;
pub mod duration;
pub mod jsonbytes;
pub mod options;
pub mod pagination;
pub mod pointer;
pub mod record;
pub mod secret;
pub mod tenant;
pub mod timefmt;
pub mod walk;

pub use config::{Config, FeedConfig, SourceConfig};
pub use duration::Duration;
pub use pointer::JsonPointer;
pub use secret::{Secret, ServiceUrl};
