//! The `one-chain` scenario of `tidemark bench e2e`: one feed of one
//! partition (a chain can only go page after page), 200,000 records in
//! 1000-record pages served from memory by a static server in the bench
//! process (so the server is not what is measured), per-page and
//! per-record delivery, one and two workers; the same pages through the
//! task queue alone (`--hot-chain-pages 0`, as before hot chains); and in
//! the same invocation what bounds it: `tidemark pull` on the same pages,
//! the broker's confirmed-publish ceiling for one page at a time, and with
//! `--compare` a Singer SDK tap on the same pages.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

use super::e2e::{self, Deployment, E2eBench, External, RunResult, Spec, ToolResult, opt};
use super::sink::{self, Ceiling, Sink};
use crate::HarnessError;

/// What the scenario measured besides its runs.
#[derive(Debug, Clone, Default, Serialize)]
pub struct OneChain {
    pub records: usize,
    pub page_size: usize,
    /// `tidemark pull` on the same pages from the same mock, best of three.
    pub pull_records_per_sec: Option<f64>,
    /// A minimal confirmed publisher, one page at a time through the same
    /// sink: record-sized messages in batches of a page, and page-sized
    /// messages one by one, each batch awaiting its confirms.
    pub ceiling: Vec<Ceiling>,
    pub runs: Vec<RunResult>,
    /// A Singer SDK tap on the same pages (`--compare`).
    pub singer: Option<ToolResult>,
}

/// The pages, served from memory.
struct Pages {
    url: String,
    first_request_ms: Arc<AtomicU64>,
    server: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
}

impl Pages {
    async fn serve(b: &E2eBench) -> Result<Pages, HarnessError> {
        let dir = tempfile::tempdir().map_err(|e| HarnessError::bench(e.to_string()))?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| HarnessError::bench(format!("cannot bind: {e}")))?;
        let addr = listener
            .local_addr()
            .map_err(|e| HarnessError::bench(e.to_string()))?;
        let url = format!("http://{addr}");
        let shape = super::PullBench {
            pages: (b.one_chain_records / b.one_chain_page_size.max(1)).max(1),
            page_size: b.one_chain_page_size.max(1),
            record_bytes: b.record_bytes,
            runs: 1,
            dlt: false,
            dlt_script: Default::default(),
            python: None,
            json: false,
            dialects: false,
        };
        super::pull::write_pages(dir.path(), &url, &shape)
            .map_err(|e| HarnessError::bench(format!("cannot write pages: {e}")))?;
        let first_request_ms = Arc::new(AtomicU64::new(0));
        let first = first_request_ms.clone();
        let app = super::pull::static_files(dir.path(), Arc::new(Default::default()))
            .map_err(|e| HarnessError::bench(format!("cannot load pages: {e}")))?
            .layer(axum::middleware::map_request(
                move |req: axum::extract::Request| {
                    let first = first.clone();
                    async move {
                        let now = sink::unix_ms() as u64;
                        let _ = first.compare_exchange(0, now, Ordering::SeqCst, Ordering::SeqCst);
                        req
                    }
                },
            ));
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Pages {
            url,
            first_request_ms,
            server,
            _dir: dir,
        })
    }

    fn records(b: &E2eBench) -> usize {
        (b.one_chain_records / b.one_chain_page_size.max(1)).max(1) * b.one_chain_page_size.max(1)
    }
}

impl Drop for Pages {
    fn drop(&mut self) {
        self.server.abort();
    }
}

fn feed_yaml(per: &str) -> String {
    format!(
        "  - name: one\n    source: mock\n    path: /pages/1.json\n    records: /data\n    \
         pagination: {{ next_url: /next }}\n    key: /id\n    version: /updated_at\n    \
         mode: snapshot\n    every: 24h\n    delivery: {{ per: {per} }}\n"
    )
}

fn spec(b: &E2eBench, pages: &Pages, per: &str, workers: usize, queue_only: bool) -> Spec {
    pages.first_request_ms.store(0, Ordering::SeqCst);
    Spec {
        label: format!(
            "one chain, per {per}, {workers} worker{}{}",
            if workers == 1 { "" } else { "s" },
            if queue_only {
                ", every page through the queue"
            } else {
                ""
            }
        ),
        feeds_yaml: feed_yaml(per),
        // The mock idles: the pages come from the static server.
        records: 1,
        page_size: b.one_chain_page_size,
        latency_ms: 0,
        workers,
        concurrency: b.one_chain_concurrency,
        jobs: 1,
        expected_records: Pages::records(b) as u64,
        feeds: 1,
        idle_window: None,
        tenants: None,
        worker_env: if queue_only {
            vec![("TIDEMARK_HOT_CHAIN_PAGES".into(), "0".into())]
        } else {
            Vec::new()
        },
        external: Some(External {
            url: pages.url.clone(),
            first_request_ms: pages.first_request_ms.clone(),
        }),
    }
}

pub(super) async fn run(b: &E2eBench, exe: &Path) -> Result<OneChain, HarnessError> {
    let mut out = OneChain {
        records: Pages::records(b),
        page_size: b.one_chain_page_size,
        ..OneChain::default()
    };
    let pages = Pages::serve(b).await?;
    out.ceiling = ceiling(b).await?;
    out.pull_records_per_sec = Some(pull(b, exe, &pages).await?);
    for per in ["page", "record"] {
        for &w in &b.one_chain_workers {
            out.runs
                .push(e2e::run_system(b, exe, &spec(b, &pages, per, w, false)).await?);
        }
        out.runs
            .push(e2e::run_system(b, exe, &spec(b, &pages, per, 1, true)).await?);
    }
    if b.compare {
        out.singer = Some(singer(b, &pages).await?);
    }
    Ok(out)
}

/// A Singer SDK tap (bench/compare.py) walking the same pages.
async fn singer(b: &E2eBench, pages: &Pages) -> Result<ToolResult, HarnessError> {
    eprintln!("bench: one chain: a Singer SDK tap on the same pages ...");
    e2e::compare_tool(
        b,
        "singer",
        &format!("{}/pages/1.json", pages.url),
        &["--records-path", "data", "--next-path", "next"],
        Pages::records(b) as u64,
    )
    .await
}

/// The broker's ceiling for one chain: one page in flight at a time.
async fn ceiling(b: &E2eBench) -> Result<Vec<Ceiling>, HarnessError> {
    let d = Deployment::new(b)?;
    let sink = Sink::start(&d.amqp_url, d.tls_ca_pem.as_deref(), &d.exchange()).await?;
    eprintln!("bench: one chain: the broker ceiling, one page at a time ...");
    let pages = (b.one_chain_records / b.one_chain_page_size.max(1)).max(1) as u64;
    let small = sink::ceiling(
        &d.amqp_url,
        d.tls_ca_pem.as_deref(),
        &d.exchange(),
        &sink,
        b.record_bytes,
        b.one_chain_records as u64,
        b.one_chain_page_size as u64,
    )
    .await;
    let large = match &small {
        Ok(_) => Some(
            sink::ceiling(
                &d.amqp_url,
                d.tls_ca_pem.as_deref(),
                &d.exchange(),
                &sink,
                b.record_bytes * b.one_chain_page_size + 16,
                pages,
                1,
            )
            .await,
        ),
        Err(_) => None,
    };
    sink.close().await;
    d.cleanup().await;
    let mut out = vec![small?];
    if let Some(l) = large {
        out.push(l?);
    }
    Ok(out)
}

/// `tidemark pull` over the same pages: best of three.
async fn pull(b: &E2eBench, exe: &Path, pages: &Pages) -> Result<f64, HarnessError> {
    let dir = tempfile::tempdir().map_err(|e| HarnessError::bench(e.to_string()))?;
    let config = dir.path().join("pull.yaml");
    std::fs::write(
        &config,
        format!(
            "sources:\n  mock:\n    base_url: {}\n    timeout: 30s\nfeeds:\n{}",
            pages.url,
            feed_yaml("page")
        ),
    )
    .map_err(|e| HarnessError::bench(e.to_string()))?;
    eprintln!("bench: one chain: tidemark pull on the same pages ...");
    let mut best: f64 = 0.0;
    for _ in 0..3 {
        let r = super::pull::run_tidemark(exe, &config, dir.path(), "one", "tidemark pull").await?;
        if r.records != Pages::records(b) as u64 {
            return Err(HarnessError::bench(format!(
                "tidemark pull wrote {} records, expected {}",
                r.records,
                Pages::records(b)
            )));
        }
        best = best.max(r.records_per_sec);
    }
    Ok(best)
}

/// The scenario's own table: the ceilings and `pull` beside the runs
/// (which the runs table shows).
pub(super) fn render(c: Option<&OneChain>) -> String {
    let Some(c) = c else {
        return String::new();
    };
    let mut s = format!(
        "\n| one chain: what bounds it ({} records in pages of {}) | records/s | messages/s | MB/s |\n|---|---:|---:|---:|\n",
        c.records, c.page_size
    );
    s.push_str(&format!(
        "| tidemark pull, same pages (best of 3) | {} | - | - |\n",
        opt(c.pull_records_per_sec, 0)
    ));
    for x in &c.ceiling {
        let per_message = x.message_bytes > 1_000;
        s.push_str(&format!(
            "| broker ceiling, {} B messages, {} | {:.0} | {:.0} | {:.1} |\n",
            x.message_bytes,
            if per_message {
                "one at a time"
            } else {
                "a page's worth at a time"
            },
            if per_message {
                x.messages_per_sec * c.page_size as f64
            } else {
                x.messages_per_sec
            },
            x.messages_per_sec,
            x.mb_per_sec
        ));
    }
    s
}

/// The targets of issue 25, against the figures of the same invocation.
pub(super) fn targets(c: Option<&OneChain>) -> Vec<(String, String, Option<bool>)> {
    let Some(c) = c else {
        return Vec::new();
    };
    let mut rows = Vec::new();
    let run = |per: &str| {
        c.runs
            .iter()
            .find(|r| r.label == format!("one chain, per {per}, 1 worker"))
    };
    if let (Some(page), Some(pull)) = (run("page"), c.pull_records_per_sec) {
        let ratio = page.records_per_sec / pull;
        rows.push((
            format!("one chain, per page ≥ 50% of tidemark pull ({pull:.0} records/s)"),
            format!("{:.0}%", ratio * 100.0),
            Some(ratio >= 0.5),
        ));
    }
    if let (Some(page), Some(t)) = (run("page"), &c.singer) {
        let ratio = page.records_per_sec / t.records_per_sec;
        rows.push((
            format!(
                "one chain, per page ≥ 20x {} {} ({:.0} records/s)",
                t.tool,
                t.version.as_deref().unwrap_or(""),
                t.records_per_sec
            ),
            format!("{ratio:.1}x"),
            Some(ratio >= 20.0),
        ));
    }
    if let (Some(rec), Some(ceiling)) = (run("record"), c.ceiling.first()) {
        let ratio = rec.records_per_sec / ceiling.messages_per_sec;
        rows.push((
            format!(
                "one chain, per record ≥ 0.9x the broker ceiling ({:.0} messages/s)",
                ceiling.messages_per_sec
            ),
            format!("{ratio:.2}x"),
            Some(ratio >= 0.9),
        ));
    }
    rows
}
