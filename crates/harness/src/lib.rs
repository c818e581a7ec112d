//! What tidemark's end-to-end tests and its benchmark share: one way to run
//! a child process ([`proc`]: children listen on port 0 and announce the
//! address they got), one way to find Redis and RabbitMQ ([`services`]:
//! the given URL, else a container with the `containers` feature), and the
//! benchmark itself ([`bench`], `tidemark bench`).

pub mod bench;
mod error;
pub mod proc;
pub mod services;

pub use error::HarnessError;
pub use proc::{Proc, Spawn};
