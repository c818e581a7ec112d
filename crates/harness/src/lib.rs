//! What tidemark's end-to-end tests and its benchmark share: one way to run
//! a child process ([`proc`]: children listen on port 0 and announce the
//! address they got), one way to find Redis and RabbitMQ ([`services`]:
//! the given URL, else a container with the `containers` feature), one
//! private `redis-server` for the suites that kill or restart Redis
//! ([`redis_server`]) and a private Redis Sentinel deployment
//! ([`sentinel`]), a private RabbitMQ cluster for the suites that kill
//! broker nodes ([`rabbit_cluster`]), and the benchmark itself ([`bench`],
//! `tidemark bench`).

pub mod bench;
mod error;
pub mod legacy;
pub mod proc;
pub mod rabbit_cluster;
pub mod redis_server;
pub mod sentinel;
pub mod services;

pub use error::HarnessError;
pub use proc::{Proc, Spawn};

/// Poll `check` every `every` until it returns true (then true) or
/// `timeout` passes (then false): how every suite waits for a process or a
/// role to get somewhere.
pub async fn eventually(
    timeout: std::time::Duration,
    every: std::time::Duration,
    mut check: impl AsyncFnMut() -> bool,
) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if check().await {
            return true;
        }
        if tokio::time::Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(every).await;
    }
}
