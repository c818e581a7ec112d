//! Embedded mode (`tidemark run`, `tidemark demo`, `tidemark pull`): the coordinator and
//! worker libraries of the distributed deployment, in one process, over the
//! in-process task queue, the embedded state store (a JSON file in the state
//! directory) and a JSON Lines sink.
//!
//! The guarantees are those of the distributed mode within one process: a
//! page's records are written (and fsynced) before its cursor is committed,
//! so a SIGKILL at any moment loses nothing; on restart the chains that were
//! running are re-issued at once from their stored cursors, so only the page
//! in flight can be written twice. A record line cut in half by the kill is
//! removed when its file is opened again (its page was not committed, so it
//! is written again whole).
//!
//! One process owns a state directory at a time (an exclusive lock on
//! `D/lock`). `tidemark pause|resume|rewind|retry --state-dir D` apply their
//! change directly when no run holds the lock; while one does, they leave a
//! request in `D/requests/`, which the run applies within a tick and
//! answers, so its in-memory state and the file never disagree.
//!
//! - [`StateDir`] / [`Owned`]: the directory, its lock and its requests;
//! - [`JsonlSink`]: the records' way out, a [`tidemark_bus::Downstream`];
//! - [`sync`]: the run itself; [`progress`]: what each feed has done;
//! - [`pull`]: one chain of one feed to a writer, no state (`tidemark pull`).

mod dir;
mod engine;
mod error;
pub mod progress;
pub mod pull;
mod sink;

pub use dir::{Owned, StateDir};
pub use engine::{EngineOptions, sync};
pub use error::EmbeddedError;
pub use sink::{JsonlSink, Out};
