//! Operator actions on feeds: the status table, pause, resume, rewind and
//! retry. The CLI (`tidemark status|pause|…`), the coordinator's admin API
//! and an embedded run's control requests all call these, against any
//! store's job table ([`Jobs`]), so the three ways of steering a feed cannot
//! disagree.
//!
//! Every change goes through [`Jobs::control`], which takes a new
//! epoch: page tasks already in flight for the job are fenced (their commit
//! answers `FENCED`), so an operator's action wins over work in progress.

use chrono::Utc;
use serde::{Deserialize, Serialize};
use tidemark_core::checkpoint::{Checkpoint, JobId, Phase, Stage};
use tidemark_core::clock::now_ms;
use tidemark_core::timefmt::parse_timestamp;
use tidemark_state::{Control, Jobs, Rewind, StateError};

/// One row of the status table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobStatus {
    pub feed: String,
    pub partition: String,
    pub phase: String,
    pub stage: String,
    /// Where the chain continues (query strings of next URLs redacted).
    pub cursor: Option<String>,
    /// Seconds since a commit last moved the cursor.
    pub cursor_age_secs: Option<f64>,
    pub high_water: Option<String>,
    /// Now minus the high-water mark, when it is a time.
    pub lag_secs: Option<f64>,
    pub pages: u64,
    pub records: u64,
    pub last_error: Option<String>,
    /// Seconds until an idle job's next poll (0 when due).
    pub next_due_in_secs: Option<f64>,
    pub epoch: u64,
    pub recoveries: u64,
}

/// The status of every job, as `tidemark status --json` prints it and the
/// admin API serves it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusReport {
    pub now_ms: u64,
    pub jobs: Vec<JobStatus>,
}

fn secs_between(later_ms: u64, earlier_ms: u64) -> f64 {
    later_ms.saturating_sub(earlier_ms) as f64 / 1000.0
}

/// A cursor for display: a next URL loses its query string (it may carry
/// an API key); an opaque cursor is shown as it is.
fn display_cursor(c: &str) -> String {
    match url::Url::parse(c) {
        Ok(u) if u.has_host() => tidemark_core::pagination::redact_query(&u),
        _ => c.to_string(),
    }
}

impl JobStatus {
    pub fn new(job: &JobId, cp: &Checkpoint, now: u64) -> Self {
        // A number is a version, not a time (parse_timestamp would read it as unix seconds).
        let lag_secs = cp
            .high_water
            .as_deref()
            .filter(|h| h.parse::<f64>().is_err())
            .and_then(|h| parse_timestamp(h).ok())
            .map(|t| secs_between(now, t.timestamp_millis().max(0) as u64));
        JobStatus {
            feed: job.feed.clone(),
            partition: job.partition.clone(),
            phase: cp.phase.as_str().to_string(),
            stage: match cp.stage {
                Stage::Bulk => "bulk".into(),
                Stage::Incremental => "incremental".into(),
            },
            cursor: cp.cursor.as_deref().map(display_cursor),
            cursor_age_secs: cp.last_commit_ms.map(|t| secs_between(now, t)),
            high_water: cp.high_water.clone(),
            lag_secs,
            pages: cp.pages,
            records: cp.records,
            last_error: cp.last_error.clone(),
            next_due_in_secs: (cp.phase == Phase::Idle).then(|| secs_between(cp.next_due_ms, now)),
            epoch: cp.epoch,
            recoveries: cp.recoveries,
        }
    }
}

/// The status of every job (optionally of one feed), sorted by feed and partition.
pub async fn status(store: &dyn Jobs, feed: Option<&str>) -> Result<StatusReport, StateError> {
    let now = now_ms();
    let mut jobs: Vec<JobStatus> = store
        .list()
        .await?
        .iter()
        .filter(|(j, _)| feed.is_none_or(|f| j.feed == f))
        .map(|(j, cp)| JobStatus::new(j, cp, now))
        .collect();
    jobs.sort_by(|a, b| (&a.feed, &a.partition).cmp(&(&b.feed, &b.partition)));
    Ok(StatusReport { now_ms: now, jobs })
}

/// What an operator asks of a feed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "op")]
pub enum Action {
    /// Stop starting chains; fence the one in flight.
    Pause,
    /// Let a paused (or failed) job run again, due at once.
    Resume,
    /// Resume only the jobs that failed.
    Retry,
    /// Move the cursor: to the feed's start, to a cursor, or to a time.
    Rewind { to: RewindTo },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RewindTo {
    Start,
    Cursor(String),
    /// A time as a person writes it (RFC 3339, a date, unix seconds).
    Time(String),
}

impl Action {
    pub fn name(&self) -> &'static str {
        match self {
            Action::Pause => "pause",
            Action::Resume => "resume",
            Action::Retry => "retry",
            Action::Rewind { .. } => "rewind",
        }
    }

    /// The store's control for this action; a time is checked and normalised here.
    fn control(&self) -> Result<Control, OpError> {
        Ok(match self {
            Action::Pause => Control::Pause,
            Action::Resume | Action::Retry => Control::Resume,
            Action::Rewind { to } => Control::Rewind(match to {
                RewindTo::Start => Rewind::Start,
                RewindTo::Cursor(c) if c.is_empty() => {
                    return Err(OpError::Invalid("the cursor is empty".into()));
                }
                RewindTo::Cursor(c) => Rewind::Cursor(c.clone()),
                RewindTo::Time(t) => {
                    let t = parse_timestamp(t)
                        .map_err(|e| OpError::Invalid(format!("--to {t:?}: {e}")))?;
                    if t > Utc::now() {
                        return Err(OpError::Invalid(
                            "--to is in the future: nothing would be synced".into(),
                        ));
                    }
                    Rewind::Time(t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true))
                }
            }),
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum OpError {
    #[error("no feed named {feed:?} has jobs (is the coordinator running with it in its config?)")]
    UnknownFeed { feed: String },
    #[error("feed {feed:?} has no partition {partition:?}")]
    UnknownPartition { feed: String, partition: String },
    #[error("{0}")]
    Invalid(String),
    #[error("state store: {0}")]
    State(#[from] StateError),
}

impl OpError {
    /// True when the request was wrong (exit 2, HTTP 4xx), not the system.
    pub fn is_usage(&self) -> bool {
        !matches!(self, OpError::State(_))
    }
}

/// What an action did, job by job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActionReport {
    pub action: String,
    /// Jobs changed, with their new epoch.
    pub applied: Vec<Applied>,
    /// Jobs left alone, with why (e.g. retry of a job that did not fail).
    pub skipped: Vec<Skipped>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Applied {
    pub partition: String,
    pub epoch: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Skipped {
    pub partition: String,
    pub reason: String,
}

/// Apply `action` to every job of `feed` (or to one partition of it).
pub async fn apply(
    store: &dyn Jobs,
    feed: &str,
    partition: Option<&str>,
    action: &Action,
) -> Result<ActionReport, OpError> {
    let control = action.control()?;
    let jobs: Vec<(JobId, Checkpoint)> = store
        .list()
        .await?
        .into_iter()
        .filter(|(j, _)| j.feed == feed)
        .collect();
    if jobs.is_empty() {
        return Err(OpError::UnknownFeed { feed: feed.into() });
    }
    let targets: Vec<&(JobId, Checkpoint)> = jobs
        .iter()
        .filter(|(j, _)| partition.is_none_or(|p| j.partition == p))
        .collect();
    if let (Some(p), true) = (partition, targets.is_empty()) {
        return Err(OpError::UnknownPartition {
            feed: feed.into(),
            partition: p.into(),
        });
    }
    let mut report = ActionReport {
        action: action.name().into(),
        applied: Vec::new(),
        skipped: Vec::new(),
    };
    for (job, cp) in targets {
        let skip = match action {
            Action::Retry if cp.phase != Phase::Failed => Some("not failed"),
            Action::Resume if !matches!(cp.phase, Phase::Paused | Phase::Failed) => {
                Some("not paused")
            }
            Action::Pause if cp.phase == Phase::Paused => Some("already paused"),
            _ => None,
        };
        if let Some(reason) = skip {
            report.skipped.push(Skipped {
                partition: job.partition.clone(),
                reason: reason.into(),
            });
            continue;
        }
        let epoch = store.control(job, &control).await?;
        tracing::info!(job = %job, action = action.name(), epoch, "operator action applied");
        report.applied.push(Applied {
            partition: job.partition.clone(),
            epoch,
        });
    }
    Ok(report)
}

/// `3s`, `4m10s`, `2h5m`, `3d4h`.
pub fn human_secs(s: f64) -> String {
    let s = s.max(0.0).round() as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        3600..86_400 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{:02}h", s / 86_400, s % 86_400 / 3600),
    }
}

fn cell(v: Option<String>) -> String {
    v.unwrap_or_else(|| "-".into())
}

/// The status table: one line per job, columns aligned.
pub fn table(jobs: &[JobStatus]) -> String {
    let header = [
        "FEED",
        "PARTITION",
        "PHASE",
        "CURSOR AGE",
        "HIGH-WATER",
        "LAG",
        "PAGES",
        "RECORDS",
        "LAST ERROR",
    ];
    let rows: Vec<[String; 9]> = jobs
        .iter()
        .map(|j| {
            let phase = match (j.phase.as_str(), j.next_due_in_secs) {
                ("idle", Some(d)) if d > 0.0 => format!("idle (next in {})", human_secs(d)),
                (p, _) => p.to_string(),
            };
            let mut err = j.last_error.clone().unwrap_or_default().replace('\n', " ");
            if err.chars().count() > 80 {
                err = err.chars().take(79).collect::<String>() + "…";
            }
            [
                j.feed.clone(),
                j.partition.clone(),
                phase,
                cell(j.cursor_age_secs.map(human_secs)),
                cell(j.high_water.clone()),
                cell(j.lag_secs.map(human_secs)),
                j.pages.to_string(),
                j.records.to_string(),
                err,
            ]
        })
        .collect();
    let mut width = header.map(|h| h.chars().count());
    for r in &rows {
        for (w, c) in width.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, (c, w)) in cells.iter().zip(width).enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:<w$}  "));
            }
        }
        s.trim_end().to_string() + "\n"
    };
    let mut out = line(header.to_vec());
    for r in &rows {
        out.push_str(&line(r.iter().map(String::as_str).collect()));
    }
    if rows.is_empty() {
        out.push_str("(no jobs yet: has a coordinator or run registered the feeds?)\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use tidemark_state::{EmbeddedStore, Leases};

    async fn store_with(jobs: &[(&str, &str, Phase)]) -> EmbeddedStore {
        let s = EmbeddedStore::in_memory();
        for (f, p, phase) in jobs {
            let cp = Checkpoint {
                phase: *phase,
                ..Checkpoint::default()
            };
            s.ensure(&JobId::new(*f, *p), &cp).await.expect("ensure");
        }
        s
    }

    #[tokio::test]
    async fn retry_touches_only_failed_jobs_and_unknown_names_are_errors() {
        let s = store_with(&[
            ("a", "1", Phase::Failed),
            ("a", "2", Phase::Idle),
            ("b", "1", Phase::Running),
        ])
        .await;
        let r = apply(&s, "a", None, &Action::Retry).await.expect("retry");
        assert_eq!(r.applied.len(), 1);
        assert_eq!(r.applied[0].partition, "1");
        assert_eq!(r.skipped[0].reason, "not failed");
        let cp = s
            .get(&JobId::new("a", "1"))
            .await
            .expect("get")
            .expect("job");
        assert_eq!(cp.phase, Phase::Idle);
        assert!(matches!(
            apply(&s, "nope", None, &Action::Pause).await,
            Err(OpError::UnknownFeed { .. })
        ));
        assert!(matches!(
            apply(&s, "a", Some("9"), &Action::Pause).await,
            Err(OpError::UnknownPartition { .. })
        ));
        let bad = Action::Rewind {
            to: RewindTo::Time("yesterday-ish".into()),
        };
        assert!(matches!(
            apply(&s, "a", None, &bad).await,
            Err(OpError::Invalid(_))
        ));
    }

    #[tokio::test]
    async fn rewind_to_a_time_normalises_it_and_status_reports_it() {
        let s = store_with(&[("a", "1", Phase::Idle)]).await;
        let to = Action::Rewind {
            to: RewindTo::Time("2024-03-01".into()),
        };
        apply(&s, "a", None, &to).await.expect("rewind");
        let cp = s
            .get(&JobId::new("a", "1"))
            .await
            .expect("get")
            .expect("job");
        assert_eq!(cp.start_from.as_deref(), Some("2024-03-01T00:00:00Z"));
        let st = status(&s, None).await.expect("status");
        assert_eq!(st.jobs.len(), 1);
        assert_eq!(st.jobs[0].phase, "idle");
    }

    #[test]
    fn a_next_url_cursor_is_shown_without_its_query() {
        let shown = display_cursor("https://api.test/x?api_key=SECRET&after=5");
        assert!(shown.starts_with("https://api.test/x?"), "{shown}");
        assert!(
            !shown.contains("SECRET") && !shown.contains("after"),
            "{shown}"
        );
        assert_eq!(display_cursor("eyJhIjoxfQ=="), "eyJhIjoxfQ==");
    }
}
