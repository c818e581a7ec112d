//! Test support: a Redis URL and isolated stores.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use rand::Rng;
use tidemark_state::{EmbeddedStore, RedisStore};

/// A Redis for the tests: REDIS_URL (default the local server) when it
/// answers; else, when Docker is available, a container started once for
/// this test binary (tidemark-harness, the one way every suite finds Redis).
pub fn redis_url() -> String {
    tidemark_harness::services::redis_url().unwrap_or_else(|e| panic!("{e}"))
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
