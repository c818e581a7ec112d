//! Shared helpers for the CLI tests: start the mock API in-process, write a
//! config for it, run the real `tidemark` binary, read what it printed.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::PathBuf;

use serde_json::Value;
use tidemark_mock::{Faults, MockConfig, MockServer};

pub const BIN: &str = env!("CARGO_BIN_EXE_tidemark");

/// The feeds of examples/mock.yaml: one per pagination style.
pub const STYLES: [&str; 9] = [
    "tickets",
    "inspections",
    "events",
    "items",
    "sync",
    "jsonapi",
    "github",
    "paged",
    "offset",
];

pub async fn mock(records: usize, faults: Faults) -> MockServer {
    let cfg = MockConfig {
        records,
        faults,
        ..MockConfig::default()
    };
    MockServer::start(cfg, SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .expect("mock starts")
}

/// examples/mock.yaml pointed at `base_url`, with every page size set to `page_size`.
pub fn example_config(base_url: &str, page_size: usize) -> String {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/mock.yaml");
    std::fs::read_to_string(path)
        .expect("examples/mock.yaml")
        .replace("http://127.0.0.1:8080", base_url)
        .replace("page_size: 100", &format!("page_size: {page_size}"))
}

pub struct TempConfig {
    pub dir: tempfile::TempDir,
    pub path: PathBuf,
}

pub fn write_config(text: &str) -> TempConfig {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("feeds.yaml");
    std::fs::write(&path, text).unwrap();
    TempConfig { dir, path }
}

pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn records(&self) -> Vec<Value> {
        self.stdout
            .lines()
            .map(|l| {
                serde_json::from_str(l)
                    .unwrap_or_else(|e| panic!("stdout line is not JSON ({e}): {l}"))
            })
            .collect()
    }
    pub fn ids(&self) -> Vec<String> {
        self.records()
            .iter()
            .map(|r| r["id"].as_str().expect("id").to_string())
            .collect()
    }
}

pub async fn tidemark(args: &[&str], env: &[(&str, &str)]) -> Run {
    let mut cmd = tokio::process::Command::new(BIN);
    cmd.args(args).env("TIDEMARK_LOG", "warn");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().await.expect("tidemark runs");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8(out.stdout).expect("utf-8 stdout"),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

pub async fn pull(config: &TempConfig, feed: &str, extra: &[&str]) -> Run {
    let mut args = vec![
        "pull",
        "--no-progress",
        "--config",
        config.path.to_str().unwrap(),
        "--feed",
        feed,
    ];
    args.extend_from_slice(extra);
    tidemark(&args, &[]).await
}

pub async fn get_json(url: &str) -> Value {
    serde_json::from_slice(&reqwest::get(url).await.unwrap().bytes().await.unwrap()).unwrap()
}

/// Keys of the current dataset in creation order.
pub async fn truth_ids(base_url: &str) -> Vec<String> {
    let t = get_json(&format!("{base_url}/_truth")).await;
    t["records"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap().to_string())
        .collect()
}

pub async fn data_requests(base_url: &str) -> u64 {
    get_json(&format!("{base_url}/_stats")).await["requests"]
        .as_u64()
        .unwrap()
}

/// (id, updated_at) pairs printed more than once.
pub fn repeated_versions(records: &[Value]) -> Vec<(String, String)> {
    let mut seen = HashSet::new();
    let mut dup = Vec::new();
    for r in records {
        let k = (
            r["id"].as_str().unwrap_or_default().to_string(),
            r["updated_at"].as_str().unwrap_or_default().to_string(),
        );
        if !seen.insert(k.clone()) {
            dup.push(k);
        }
    }
    dup
}
