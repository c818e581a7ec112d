//! Test support: a Redis URL and isolated stores.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::sync::{Arc, OnceLock};

use rand::Rng;
use tidemark_state::{EmbeddedStore, RedisStore};

/// A Redis for the tests: REDIS_URL (default the local server) when it
/// answers; else, when Docker is available, a container started once for
/// this test binary; else a panic that says what to do.
pub fn redis_url() -> String {
    static URL: OnceLock<String> = OnceLock::new();
    URL.get_or_init(|| {
        let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
        if answers(&url) {
            return url;
        }
        let docker = std::process::Command::new("docker").arg("info").output().is_ok_and(|o| o.status.success());
        if !docker {
            panic!("no Redis at {url} and no Docker: start Redis (./scripts/test does) or set REDIS_URL");
        }
        use testcontainers_modules::testcontainers::runners::SyncRunner;
        let container = testcontainers_modules::redis::Redis::default().start().expect("start a Redis container");
        let port = container.get_host_port_ipv4(6379).expect("container port");
        let url = format!("redis://127.0.0.1:{port}");
        // Statics are never dropped: the container outlives this test binary
        // (remove leftovers with `docker ps -q --filter ancestor=redis | xargs docker rm -f`).
        static CONTAINER: OnceLock<Box<dyn std::any::Any + Send + Sync>> = OnceLock::new();
        let _ = CONTAINER.set(Box::new(container));
        url
    })
    .clone()
}

fn answers(url: &str) -> bool {
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
    std::net::TcpStream::connect(hostport).is_ok()
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
