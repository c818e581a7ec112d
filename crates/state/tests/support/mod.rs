//! Test support: a Redis URL and isolated stores.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use rand::Rng;
use tidemark_state::{EmbeddedStore, RedisStore, StateStore};

/// REDIS_URL (default the local server). Panics with a clear message when nothing answers.
pub fn redis_url() -> String {
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let hostport = url
        .trim_start_matches("redis://")
        .trim_start_matches("rediss://");
    let hostport = hostport
        .rsplit('@')
        .next()
        .unwrap_or(hostport)
        .split('/')
        .next()
        .unwrap_or("127.0.0.1:6379");
    if std::net::TcpStream::connect(hostport).is_err() {
        panic!("no Redis at {url}: start one (./scripts/test does) or set REDIS_URL");
    }
    url
}

pub fn random_prefix() -> String {
    format!("tmtest:{:016x}:", rand::rng().random::<u64>())
}

/// A Redis store under a fresh prefix; call `cleanup` at the end.
pub async fn redis_store() -> Arc<RedisStore> {
    Arc::new(
        RedisStore::connect(&redis_url(), &random_prefix())
            .await
            .unwrap(),
    )
}

pub fn embedded_store(dir: &tempfile::TempDir) -> Arc<EmbeddedStore> {
    Arc::new(EmbeddedStore::open(&dir.path().join("state.json")).unwrap())
}

pub fn as_dyn<S: StateStore + 'static>(s: Arc<S>) -> Arc<dyn StateStore> {
    s
}
