//! `tidemark pull`: walk one chain of one feed and print its records as JSON
//! Lines on stdout, with progress and a summary on stderr. No state: this is
//! how a user checks that a feed config pages through their API.
//!
//! Fetching and writing overlap: a task fetches and reads page N+1 while a
//! writer thread prints page N, with at most [`PIPELINE_PAGES`] pages in
//! flight, so memory stays at a few pages whatever the size of the stream.

use std::io::{IsTerminal, Write};
use std::ops::Range;
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::Serialize;
use tidemark_core::checkpoint::Stage;
use tidemark_core::config::{FeedConfig, Partition, load_file};
use tidemark_core::jsonbytes::compact_json;
use tidemark_core::pagination::{Next, Position, redact_query};
use tidemark_core::walk::{Walk, WalkError};
use tidemark_source::HttpSource;

use crate::EmbeddedError as Failure;

/// Pages read ahead of the writer.
pub const PIPELINE_PAGES: usize = 2;

#[derive(Debug, Clone, Default)]
pub struct PullOptions {
    pub config: PathBuf,
    pub feed: String,
    /// The tenant (a feed of a source with tenants): from the tenants file or list.
    pub tenant: Option<String>,
    pub partition: Option<String>,
    /// A child feed's parent vars (`--var NAME=VALUE`): the children of one parent record.
    pub vars: std::collections::BTreeMap<String, String>,
    pub max_pages: Option<u64>,
    /// Start at this time instead of the feed's `start.from`.
    pub from: Option<String>,
    /// Start at this cursor (or next URL, page, offset) instead of the start.
    pub cursor: Option<String>,
    /// Show a live progress line on stderr (only when it is a terminal).
    pub progress: bool,
    /// Also write the summary as JSON to this file.
    pub stats_json: Option<PathBuf>,
}

/// How a pull ended.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum EndReason {
    EndOfStream,
    MaxPages,
    OutputClosed,
}

#[derive(Debug, Clone, Serialize)]
pub struct PullSummary {
    pub feed: String,
    pub partition: String,
    pub pages: u64,
    pub records: u64,
    pub bytes: u64,
    pub elapsed_secs: f64,
    pub records_per_sec: f64,
    pub end: EndReason,
    /// Where a next walk would start: the resume cursor at end of stream, or
    /// the next position when stopped by --max-pages.
    pub resume: Option<String>,
    pub peak_rss_bytes: Option<u64>,
}

/// A page's records as byte ranges of its body.
struct Chunk {
    body: Bytes,
    spans: Vec<Range<usize>>,
}

/// Run a pull, writing records to `out` and messages to `err`.
pub async fn run(
    opts: &PullOptions,
    out: Box<dyn Write + Send>,
    err: &mut (dyn Write + Send),
) -> Result<PullSummary, Failure> {
    let config = load_file(&opts.config).map_err(|e| Failure::Usage(e.to_string()))?;
    let feed = config.feed(&opts.feed).ok_or_else(|| {
        let names: Vec<&str> = config.feeds.iter().map(|f| f.name.as_str()).collect();
        Failure::Usage(format!(
            "no feed named {:?} in {}; feeds: {}",
            opts.feed,
            opts.config.display(),
            names.join(", ")
        ))
    })?;
    let source_cfg = config
        .source_of(feed)
        .ok_or_else(|| Failure::Usage(format!("feed {} names an unknown source", feed.name)))?;
    // A tenanted feed is pulled as one tenant sees it.
    let (feed, source_cfg) = match (source_cfg.is_tenanted(), &opts.tenant) {
        (false, None) => (feed.clone(), source_cfg.clone()),
        (false, Some(_)) => {
            return Err(Failure::Usage(format!(
                "feed {} has no tenants: drop --tenant",
                feed.name
            )));
        }
        (true, None) => {
            return Err(Failure::Usage(format!(
                "feed {} runs once per tenant of source {}: name one with --tenant",
                feed.name, feed.source
            )));
        }
        (true, Some(name)) => {
            let tenants = tidemark_core::config::load_tenants(&config)
                .map_err(|e| Failure::Usage(e.to_string()))?;
            let tenant = tenants
                .get(&feed.source)
                .and_then(|l| l.iter().find(|t| &t.name == name))
                .cloned()
                .unwrap_or_else(|| tidemark_core::tenant::Tenant::new(name.clone()));
            (
                feed.for_tenant(&tenant).map_err(Failure::Usage)?,
                source_cfg.for_tenant(&tenant).map_err(Failure::Usage)?,
            )
        }
    };
    // A child feed is pulled for one parent record, its vars given.
    let (feed, partition) = match &feed.parent {
        Some(link) => {
            let missing: Vec<&str> = link
                .vars
                .keys()
                .filter(|k| !opts.vars.contains_key(*k))
                .map(String::as_str)
                .collect();
            if !missing.is_empty() {
                return Err(Failure::Usage(format!(
                    "feed {} is a child of {}: give its parent's values with --var ({})",
                    feed.name,
                    link.feed,
                    missing
                        .iter()
                        .map(|k| format!("--var {k}=…"))
                        .collect::<Vec<_>>()
                        .join(" ")
                )));
            }
            let filled = match &link.batch {
                // A batched child feed: `--var ids=K1,K2,…` names its parents.
                Some(b) => {
                    let Some(ids) = opts.vars.get("ids") else {
                        return Err(Failure::Usage(format!(
                            "feed {} takes its parents in batches: name them with --var ids=K1{}K2…",
                            feed.name, b.separator
                        )));
                    };
                    let keys: Vec<&str> = ids.split(b.separator.as_str()).collect();
                    tidemark_core::child::fill_batch(&feed, &keys)
                }
                None => tidemark_core::child::fill(&feed, &opts.vars).map_err(Failure::Usage)?,
            };
            let partition = Partition {
                id: opts.partition.clone().unwrap_or_else(|| "pull".into()),
                params: vec![],
                from: None,
            };
            (filled, partition)
        }
        None if !opts.vars.is_empty() => {
            return Err(Failure::Usage(format!(
                "feed {} is not a child feed: drop --var",
                feed.name
            )));
        }
        None => {
            let partition = choose_partition(&feed, opts.partition.as_deref())?;
            (feed, partition)
        }
    };
    let (feed, source_cfg) = (&feed, &source_cfg);
    let source =
        HttpSource::new(&feed.source, source_cfg).map_err(|e| Failure::Usage(e.to_string()))?;
    if opts.cursor.is_some() && opts.from.is_some() {
        return Err(Failure::Usage(
            "--cursor and --from exclude each other".into(),
        ));
    }
    let mut walk = Walk::new(feed, source_cfg, &partition, Stage::Bulk)
        .map_err(Failure::Usage)?
        .starting_from(opts.from.as_deref())
        .map_err(|e| Failure::Usage(format!("--from: {e}")))?
        .at(opts.cursor.clone());

    let (tx, rx) = mpsc::sync_channel::<Chunk>(PIPELINE_PAGES);
    let writer = std::thread::spawn(move || write_records(out, rx));

    let started = Instant::now();
    let show_progress = opts.progress && std::io::stderr().is_terminal();
    let mut last_progress = Instant::now();
    let (mut pages, mut records, mut bytes) = (0u64, 0u64, 0u64);
    let mut end = EndReason::EndOfStream;
    let mut resume: Option<String> = None;
    let retry = source_cfg.retry();
    // Attempts at the current page that `error_when` called transient.
    let mut api_attempt = 1u32;
    let failure = loop {
        if opts.max_pages.is_some_and(|m| pages >= m) {
            end = EndReason::MaxPages;
            resume = walk.cursor().map(str::to_string);
            break None;
        }
        let req = match walk.request() {
            Ok(r) => r,
            Err(e) => {
                break Some(format!(
                    "cannot build the request at {}: {e}",
                    describe(walk.position())
                ));
            }
        };
        let page = match source.fetch(&req).await {
            Ok(p) => p,
            Err(e) => {
                break Some(format!(
                    "page {} ({}): {e}",
                    pages + 1,
                    redact_query(&req.url)
                ));
            }
        };
        let step = match walk.advance(&req, &page, &page.body) {
            Ok(step) => step,
            Err(e @ WalkError::EmptyRun) => break Some(format!("page {}: {e}", pages + 1)),
            Err(WalkError::Read(e)) if e.is_transient() && api_attempt < retry.max_attempts => {
                let wait = e.retry_after().map_or_else(
                    || {
                        tidemark_source::backoff_delay(
                            api_attempt,
                            retry.base_delay.std(),
                            retry.max_delay.std(),
                        )
                    },
                    |d| d.min(retry.max_retry_after.std()),
                );
                tracing::warn!(page = pages + 1, attempt = api_attempt, delay_ms = wait.as_millis() as u64, error = %page.scrub(&e.to_string()), "the API answered a transient error; retrying");
                tokio::time::sleep(wait).await;
                api_attempt += 1;
                continue;
            }
            Err(e) => {
                break Some(page.scrub(&format!(
                    "page {} ({}): {e}",
                    pages + 1,
                    redact_query(&req.url)
                )));
            }
        };
        api_attempt = 1;
        pages += 1;
        records += step.records.len() as u64;
        bytes += page.body.len() as u64;
        let chunk = Chunk {
            body: page.body,
            spans: step.records,
        };
        if tx.send(chunk).is_err() {
            end = EndReason::OutputClosed;
            break None;
        }
        if show_progress && last_progress.elapsed() >= Duration::from_millis(250) {
            last_progress = Instant::now();
            let rate = records as f64 / started.elapsed().as_secs_f64().max(1e-9);
            let _ = write!(
                err,
                "\r{}: {pages} pages, {records} records ({rate:.0} records/s)   ",
                feed.name
            );
        }
        if let Next::End { resume: r } = step.next {
            resume = r;
            break None;
        }
    };
    drop(tx);
    let write_result = writer
        .join()
        .map_err(|_| Failure::Pull("the output thread panicked".into()))?;
    if show_progress {
        let _ = write!(err, "\r\x1b[2K");
    }
    if let Err(e) = write_result {
        return Err(Failure::Pull(format!("cannot write records: {e}")));
    }
    let elapsed = started.elapsed().as_secs_f64();
    if let Some(message) = failure {
        let _ = writeln!(
            err,
            "tidemark pull: feed {} partition {}: {pages} page(s), {records} record(s) printed before the error; the failed page was not printed (retry from: {})",
            feed.name,
            partition.id,
            describe(walk.position())
        );
        return Err(Failure::Pull(format!("feed {}: {message}", feed.name)));
    }
    let summary = PullSummary {
        feed: feed.name.clone(),
        partition: partition.id.clone(),
        pages,
        records,
        bytes,
        elapsed_secs: elapsed,
        records_per_sec: records as f64 / elapsed.max(1e-9),
        end,
        resume,
        peak_rss_bytes: peak_rss_bytes(),
    };
    let _ = writeln!(err, "{}", summary_line(&summary));
    if let Some(path) = &opts.stats_json {
        let json = serde_json::to_vec_pretty(&summary).map_err(|e| Failure::Pull(e.to_string()))?;
        std::fs::write(path, json)
            .map_err(|e| Failure::Pull(format!("cannot write {}: {e}", path.display())))?;
    }
    Ok(summary)
}

fn choose_partition(feed: &FeedConfig, wanted: Option<&str>) -> Result<Partition, Failure> {
    let all = feed
        .partitions(chrono::Utc::now())
        .map_err(Failure::Usage)?;
    let ids = || {
        all.iter()
            .map(|p| p.id.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    match wanted {
        Some(w) => all.iter().find(|p| p.id == w).cloned().ok_or_else(|| {
            Failure::Usage(format!(
                "feed {} has no partition {w:?}; partitions: {}",
                feed.name,
                ids()
            ))
        }),
        None if all.len() == 1 => Ok(all[0].clone()),
        None => Err(Failure::Usage(format!(
            "feed {} has {} partitions ({}); choose one with --partition",
            feed.name,
            all.len(),
            ids()
        ))),
    }
}

fn describe(pos: &Position) -> String {
    match pos {
        Position::Start { from: Some(t) } => format!("the start ({t})"),
        Position::Start { from: None } => "the start".to_string(),
        Position::At(c) if c.starts_with("http://") || c.starts_with("https://") => {
            match url::Url::parse(c) {
                Ok(u) => format!("--cursor '{}'", redact_query(&u)),
                Err(_) => "a next URL".to_string(),
            }
        }
        Position::At(c) => format!("--cursor '{c}'"),
    }
}

fn summary_line(s: &PullSummary) -> String {
    let end = match s.end {
        EndReason::EndOfStream => "end of stream".to_string(),
        EndReason::MaxPages => "stopped at --max-pages".to_string(),
        EndReason::OutputClosed => "output closed".to_string(),
    };
    let mut line = format!(
        "tidemark pull: feed {} partition {}: {} pages, {} records, {:.1} MiB in {:.3}s ({:.0} records/s), {end}",
        s.feed,
        s.partition,
        s.pages,
        s.records,
        s.bytes as f64 / (1024.0 * 1024.0),
        s.elapsed_secs,
        s.records_per_sec,
    );
    if let Some(r) = &s.resume {
        let shown = match url::Url::parse(r) {
            Ok(u) if r.starts_with("http") => redact_query(&u),
            _ => r.clone(),
        };
        line.push_str(&format!("; next cursor: {shown}"));
    }
    if let Some(rss) = s.peak_rss_bytes {
        line.push_str(&format!(
            "; peak RSS {:.1} MiB",
            rss as f64 / (1024.0 * 1024.0)
        ));
    }
    line
}

/// Print every record on its own line. A closed pipe (`| head`) ends quietly.
fn write_records(out: Box<dyn Write + Send>, rx: mpsc::Receiver<Chunk>) -> std::io::Result<()> {
    let mut w = std::io::BufWriter::with_capacity(1 << 20, out);
    let mut compact = Vec::new();
    for chunk in rx {
        for span in chunk.spans {
            let rec = &chunk.body[span];
            let res = if memchr::memchr2(b'\n', b'\r', rec).is_some() {
                compact.clear();
                compact_json(rec, &mut compact);
                w.write_all(&compact).and_then(|_| w.write_all(b"\n"))
            } else {
                w.write_all(rec).and_then(|_| w.write_all(b"\n"))
            };
            match res {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    }
    match w.flush() {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => other,
    }
}

/// Peak resident set size of this process (Linux; None elsewhere).
pub fn peak_rss_bytes() -> Option<u64> {
    tidemark_telemetry::peak_rss_bytes("/proc/self/status")
}
