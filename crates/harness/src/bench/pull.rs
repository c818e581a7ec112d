//! `bench pull` serves N pages of M records (about 330 bytes each) from a
//! static file server on loopback, each page naming the next one's URL, then
//! times `tidemark pull` over them as a separate process, and, with `--dlt`,
//! dlt's RESTClient walking the same pages (bench/compare.py; run
//! bench/setup-python.sh first).
//!
//! With `--dialects` it also serves the same records as a GraphQL
//! connection (each record an edge's `node`), both as a `POST /graphql`
//! with the cursor in the body's variables and as a `GET` with the cursor in
//! the query, and times `pull` on each: what a request dialect costs.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Instant;

use serde::Serialize;

use crate::HarnessError;

#[derive(clap::Args, Debug, Clone)]
pub struct PullBench {
    #[arg(long, default_value_t = 200)]
    pub pages: usize,
    #[arg(long, default_value_t = 1000)]
    pub page_size: usize,
    #[arg(long, default_value_t = 330)]
    pub record_bytes: usize,
    /// Runs of each tool; the best run is reported, all runs are in --json.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Also run dlt's RESTClient (python3 with the `dlt` package).
    #[arg(long)]
    pub dlt: bool,
    #[arg(long, default_value = "bench/compare.py")]
    pub dlt_script: PathBuf,
    /// Python for dlt (default: target/bench-venv/bin/python if
    /// bench/setup-python.sh made it, else python3).
    #[arg(long)]
    pub python: Option<PathBuf>,
    /// Print the results as JSON.
    #[arg(long)]
    pub json: bool,
    /// Also time `pull` on the same records as a GraphQL connection, over
    /// POST (cursor in the body) and over GET (cursor in the query).
    #[arg(long)]
    pub dialects: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct RunResult {
    pub tool: String,
    pub records: u64,
    /// First request to last record written, as the tool measures itself.
    pub seconds: f64,
    /// Process start to exit (includes start-up and imports).
    pub wall_seconds: f64,
    pub records_per_sec: f64,
    pub peak_rss_mib: Option<f64>,
}

fn record(i: usize, bytes: usize) -> String {
    let head = format!(
        r#"{{"id":"{:08x}-0000-4000-8000-{:012x}","updated_at":"2024-01-{:02}T{:02}:{:02}:{:02}Z","seq":{i},"name":"record {i}","status":"open","payload":""#,
        i / 65536,
        i,
        1 + (i / 86400) % 28,
        (i / 3600) % 24,
        (i / 60) % 60,
        i % 60
    );
    let pad = bytes.saturating_sub(head.len() + 2).max(1);
    let filler: String = (0..pad)
        .map(|k| (b'a' + ((i + k) % 26) as u8) as char)
        .collect();
    format!("{head}{filler}\"}}")
}

/// Write the pages; page k names page k+1 as its `next`.
pub(super) fn write_pages(dir: &Path, base: &str, b: &PullBench) -> std::io::Result<u64> {
    std::fs::create_dir_all(dir.join("pages"))?;
    let mut total = 0u64;
    for p in 1..=b.pages {
        let mut body = String::with_capacity(b.page_size * (b.record_bytes + 2) + 128);
        body.push_str("{\"data\":[");
        for r in 0..b.page_size {
            if r > 0 {
                body.push(',');
            }
            body.push_str(&record((p - 1) * b.page_size + r, b.record_bytes));
        }
        body.push_str("],\"next\":");
        if p < b.pages {
            body.push_str(&format!("\"{base}/pages/{}.json\"", p + 1));
        } else {
            body.push_str("null");
        }
        body.push('}');
        total += body.len() as u64;
        std::fs::write(dir.join("pages").join(format!("{p}.json")), body)?;
    }
    Ok(total)
}

pub async fn pull_bench(
    b: &PullBench,
    exe: &Path,
    out: &mut dyn Write,
) -> Result<(), HarnessError> {
    let dir = tempfile::tempdir().map_err(|e| HarnessError::bench(e.to_string()))?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| HarnessError::bench(format!("cannot bind: {e}")))?;
    let addr = listener
        .local_addr()
        .map_err(|e| HarnessError::bench(e.to_string()))?;
    let base = format!("http://{addr}");
    let bytes = write_pages(dir.path(), &base, b)
        .map_err(|e| HarnessError::bench(format!("cannot write pages: {e}")))?;
    let graphql = std::sync::Arc::new(graphql_pages(b));
    let app = static_files(dir.path(), graphql)
        .map_err(|e| HarnessError::bench(format!("cannot load pages: {e}")))?;
    let server = tokio::spawn(async move { axum::serve(listener, app).await });

    let config = dir.path().join("bench.yaml");
    std::fs::write(
        &config,
        format!(
            "sources:\n  static: {{ base_url: \"{base}\" }}\nfeeds:\n  - name: bench\n    source: static\n    path: /pages/1.json\n    records: /data\n    pagination: {{ next_url: /next }}\n    key: /id\n{GRAPHQL_FEEDS}"
        ),
    )
    .map_err(|e| HarnessError::bench(e.to_string()))?;
    let expected = (b.pages * b.page_size) as u64;

    let mut results: Vec<RunResult> = Vec::new();
    for _ in 0..b.runs {
        results.push(run_tidemark(exe, &config, dir.path(), "bench", "tidemark pull").await?);
        if b.dialects {
            results.push(
                run_tidemark(
                    exe,
                    &config,
                    dir.path(),
                    "graphql_get",
                    "tidemark pull, GraphQL edges over GET",
                )
                .await?,
            );
            results.push(
                run_tidemark(
                    exe,
                    &config,
                    dir.path(),
                    "graphql_post",
                    "tidemark pull, GraphQL over POST",
                )
                .await?,
            );
        }
    }
    if b.dlt {
        for _ in 0..b.runs {
            results.push(run_dlt(b, &format!("{base}/pages/1.json"), false).await?);
            results.push(run_dlt(b, &format!("{base}/pages/1.json"), true).await?);
        }
    }
    server.abort();
    for r in &results {
        if r.records != expected {
            return Err(HarnessError::bench(format!(
                "{} delivered {} records, expected {expected}",
                r.tool, r.records
            )));
        }
    }
    let best = |tool: &str| {
        results
            .iter()
            .filter(|r| r.tool == tool)
            .max_by(|a, b| a.records_per_sec.total_cmp(&b.records_per_sec))
            .cloned()
    };
    let tm = best("tidemark pull");
    let gql_get = best("tidemark pull, GraphQL edges over GET");
    let gql_post = best("tidemark pull, GraphQL over POST");
    let dlt = best("dlt RESTClient");
    let dlt_walk = best("dlt RESTClient (walk only)");
    if b.json {
        let v = serde_json::json!({
            "pages": b.pages, "page_size": b.page_size, "record_bytes": b.record_bytes,
            "dataset_mib": bytes as f64 / 1048576.0, "runs": results,
            "best": { "tidemark": tm, "dlt": dlt, "dlt_walk_only": dlt_walk,
                      "graphql_get": gql_get, "graphql_post": gql_post },
            "post_vs_get": match (&gql_post, &gql_get) { (Some(p), Some(g)) => Some(p.records_per_sec / g.records_per_sec), _ => None },
            "post_vs_plain_get": match (&gql_post, &tm) { (Some(p), Some(g)) => Some(p.records_per_sec / g.records_per_sec), _ => None },
            "ratio_vs_dlt": match (&tm, &dlt) { (Some(t), Some(d)) => Some(t.records_per_sec / d.records_per_sec), _ => None },
        });
        let _ = writeln!(
            out,
            "{}",
            serde_json::to_string_pretty(&v).unwrap_or_default()
        );
        return Ok(());
    }
    let _ = writeln!(
        out,
        "pull benchmark: {} pages x {} records (~{} B each), {:.1} MiB, static files on loopback, best of {}",
        b.pages,
        b.page_size,
        b.record_bytes,
        bytes as f64 / 1048576.0,
        b.runs
    );
    let _ = writeln!(
        out,
        "| tool | records | seconds | records/s | wall seconds | peak RSS MiB | vs dlt |"
    );
    let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---:|");
    for r in [
        tm.clone(),
        gql_get.clone(),
        gql_post.clone(),
        dlt.clone(),
        dlt_walk,
    ]
    .into_iter()
    .flatten()
    {
        let ratio = match &dlt {
            Some(d) => format!("{:.2}x", r.records_per_sec / d.records_per_sec),
            None => "-".into(),
        };
        let rss = r
            .peak_rss_mib
            .map(|m| format!("{m:.1}"))
            .unwrap_or_else(|| "-".into());
        let _ = writeln!(
            out,
            "| {} | {} | {:.3} | {:.0} | {:.3} | {rss} | {ratio} |",
            r.tool, r.records, r.seconds, r.records_per_sec, r.wall_seconds
        );
    }
    if let (Some(p), Some(g), Some(t)) = (&gql_post, &gql_get, &tm) {
        let _ = writeln!(
            out,
            "GraphQL over POST: {:.2}x the same pages over GET, {:.2}x the plain GET pages",
            p.records_per_sec / g.records_per_sec,
            p.records_per_sec / t.records_per_sec
        );
    }
    Ok(())
}

/// The feeds of `--dialects`: the same records as a GraphQL connection.
const GRAPHQL_FEEDS: &str = r#"  - name: graphql_post
    source: static
    path: /graphql
    method: POST
    read_only: true
    body: { query: "query($first: Int!, $after: String) { records(first: $first, after: $after) { edges { cursor node } pageInfo { endCursor hasNextPage } } }", variables: { first: 1000 } }
    records: /data/records/edges
    record: /node
    key: /id
    pagination: { cursor_param: "body:/variables/after", next_cursor: /data/records/pageInfo/endCursor, has_more: /data/records/pageInfo/hasNextPage }
    error_when:
      - { pointer: /errors, not_empty: true, message: /errors/0/message }
  - name: graphql_get
    source: static
    path: /graphql
    records: /data/records/edges
    record: /node
    key: /id
    pagination: { cursor_param: after, next_cursor: /data/records/pageInfo/endCursor, has_more: /data/records/pageInfo/hasNextPage }
    error_when:
      - { pointer: /errors, not_empty: true, message: /errors/0/message }
"#;

/// The pages as a GraphQL connection, by cursor (`""` for the first).
fn graphql_pages(b: &PullBench) -> std::collections::HashMap<String, bytes::Bytes> {
    let mut out = std::collections::HashMap::new();
    for p in 1..=b.pages {
        let mut body = String::with_capacity(b.page_size * (b.record_bytes + 40) + 128);
        body.push_str(r#"{"data":{"records":{"edges":["#);
        for r in 0..b.page_size {
            if r > 0 {
                body.push(',');
            }
            let i = (p - 1) * b.page_size + r;
            body.push_str(&format!(r#"{{"cursor":"r{i}","node":"#));
            body.push_str(&record(i, b.record_bytes));
            body.push('}');
        }
        let more = p < b.pages;
        body.push_str(&format!(
            r#"],"pageInfo":{{"endCursor":"p{}","hasNextPage":{more}}}}}}}}}"#,
            p + 1
        ));
        let key = if p == 1 {
            String::new()
        } else {
            format!("p{p}")
        };
        out.insert(key, bytes::Bytes::from(body));
    }
    out
}

/// A static file server that loads every file under `dir` once and serves it
/// from memory, so the benchmark measures the clients, not disk reads; and
/// `/graphql`, the GraphQL pages by the cursor in the query (`after`) or in
/// the POST body (`variables.after`).
pub(super) fn static_files(
    dir: &Path,
    graphql: std::sync::Arc<std::collections::HashMap<String, bytes::Bytes>>,
) -> std::io::Result<axum::Router> {
    let mut files = std::collections::HashMap::new();
    for entry in std::fs::read_dir(dir.join("pages"))? {
        let path = entry?.path();
        if let Some(name) = path.file_name().and_then(|n| n.to_str()) {
            files.insert(
                format!("/pages/{name}"),
                bytes::Bytes::from(std::fs::read(&path)?),
            );
        }
    }
    let files = std::sync::Arc::new(files);
    Ok(
        axum::Router::new().fallback(move |uri: axum::http::Uri, body: bytes::Bytes| {
            let files = files.clone();
            let graphql = graphql.clone();
            async move {
                use axum::response::IntoResponse;
                if uri.path() == "/graphql" {
                    let after = if body.is_empty() {
                        // The bench's cursors (`p2`, `p3`, …) need no decoding.
                        uri.query()
                            .unwrap_or("")
                            .split('&')
                            .find_map(|kv| kv.strip_prefix("after=").map(str::to_string))
                    } else {
                        serde_json::from_slice::<serde_json::Value>(&body)
                            .ok()
                            .and_then(|v| v["variables"]["after"].as_str().map(str::to_string))
                    };
                    return match graphql.get(after.as_deref().unwrap_or("")) {
                        Some(b) => (
                            [(axum::http::header::CONTENT_TYPE, "application/json")],
                            b.clone(),
                        )
                            .into_response(),
                        None => axum::http::StatusCode::NOT_FOUND.into_response(),
                    };
                }
                match files.get(uri.path()) {
                    Some(b) => (
                        [(axum::http::header::CONTENT_TYPE, "application/json")],
                        b.clone(),
                    )
                        .into_response(),
                    None => axum::http::StatusCode::NOT_FOUND.into_response(),
                }
            }
        }),
    )
}

pub(super) async fn run_tidemark(
    exe: &Path,
    config: &Path,
    dir: &Path,
    feed: &str,
    tool: &str,
) -> Result<RunResult, HarnessError> {
    let stats = dir.join("stats.json");
    let started = Instant::now();
    let status = tokio::process::Command::new(exe)
        .args(["pull", "--no-progress", "--feed", feed, "--config"])
        .arg(config)
        .arg("--stats-json")
        .arg(&stats)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await
        .map_err(|e| HarnessError::bench(format!("cannot run tidemark pull: {e}")))?;
    let wall_seconds = started.elapsed().as_secs_f64();
    if !status.success() {
        return Err(HarnessError::bench(format!(
            "tidemark pull failed: {status}"
        )));
    }
    let s: serde_json::Value = serde_json::from_slice(
        &std::fs::read(&stats).map_err(|e| HarnessError::bench(e.to_string()))?,
    )
    .map_err(|e| HarnessError::bench(e.to_string()))?;
    let records = s["records"].as_u64().unwrap_or(0);
    let seconds = s["elapsed_secs"].as_f64().unwrap_or(wall_seconds);
    Ok(RunResult {
        tool: tool.into(),
        records,
        seconds,
        wall_seconds,
        records_per_sec: records as f64 / seconds,
        peak_rss_mib: s["peak_rss_bytes"].as_u64().map(|b| b as f64 / 1048576.0),
    })
}

async fn run_dlt(b: &PullBench, url: &str, walk_only: bool) -> Result<RunResult, HarnessError> {
    let started = Instant::now();
    let python = super::python(b.python.as_deref());
    let output = tokio::process::Command::new(&python)
        .arg(&b.dlt_script)
        .args(["--tool", if walk_only { "dlt-walk" } else { "dlt" }])
        .args(["--url", url, "--next-path", "next"])
        .stderr(Stdio::inherit())
        .output()
        .await
        .map_err(|e| HarnessError::bench(format!("cannot run {}: {e}", python.display())))?;
    let wall_seconds = started.elapsed().as_secs_f64();
    if !output.status.success() {
        return Err(HarnessError::bench(format!(
            "{} failed ({}); run bench/setup-python.sh first",
            b.dlt_script.display(),
            output.status
        )));
    }
    let s: serde_json::Value = serde_json::from_slice(&output.stdout)
        .map_err(|e| HarnessError::bench(format!("dlt script printed no JSON summary: {e}")))?;
    let records = s["records"].as_u64().unwrap_or(0);
    let seconds = s["seconds"].as_f64().unwrap_or(wall_seconds);
    Ok(RunResult {
        wall_seconds,
        tool: if walk_only {
            "dlt RESTClient (walk only)".into()
        } else {
            "dlt RESTClient".into()
        },
        records,
        seconds,
        records_per_sec: records as f64 / seconds,
        peak_rss_mib: s["peak_rss_kib"].as_f64().map(|k| k / 1024.0),
    })
}
