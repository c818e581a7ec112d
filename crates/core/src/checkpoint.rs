//! Checkpoints: the stored state of a job, and the one checked step that
//! advances it.
//!
//! A job (feed, partition) owns a cursor, a sequence number `seq` (pages
//! committed so far) and an `epoch`, the fencing token of its lease. A
//! worker commits page `seq` under epoch `E` with [`Checkpoint::apply`]; the
//! step refuses anything that does not chain: a different epoch is
//! [`CommitOutcome::Fenced`] (a newer lease owns the job), the same commit
//! seen again is [`CommitOutcome::AlreadyApplied`] (a retry after a lost
//! reply: treat as success), a seq that does not match is
//! [`CommitOutcome::Conflict`]. Only [`CommitOutcome::Ok`] changes anything.
//! The Redis script and the embedded store implement exactly this function;
//! their tests compare against it.

use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// The unit that is leased, scheduled and checkpointed.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct JobId {
    pub feed: String,
    pub partition: String,
}

impl JobId {
    pub fn new(feed: impl Into<String>, partition: impl Into<String>) -> Self {
        Self {
            feed: feed.into(),
            partition: partition.into(),
        }
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.feed, self.partition)
    }
}

/// What a job is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Waiting for its next due time.
    #[default]
    Idle,
    /// A chain is walking under the current epoch.
    Running,
    /// Stopped by an operator; nothing runs until resumed.
    Paused,
    /// Stopped by an error that retries could not fix; see `last_error`.
    Failed,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Idle => "idle",
            Phase::Running => "running",
            Phase::Paused => "paused",
            Phase::Failed => "failed",
        }
    }
    pub fn parse(s: &str) -> Option<Phase> {
        Some(match s {
            "idle" => Phase::Idle,
            "running" => Phase::Running,
            "paused" => Phase::Paused,
            "failed" => Phase::Failed,
            _ => return None,
        })
    }
}

/// Which walk of a `bulk_then_incremental` feed is current.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    #[default]
    Bulk,
    Incremental,
}

/// The stored state of a job.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Checkpoint {
    /// Where the chain continues; `None`: at its start point.
    pub cursor: Option<String>,
    /// The start point (RFC 3339) of a chain without a cursor; `None`: the feed's.
    pub start_from: Option<String>,
    /// Pages committed so far; the next page task carries this seq.
    pub seq: u64,
    /// The fencing token of the current lease. Never reused.
    pub epoch: u64,
    /// Lease expiry, unix ms; 0 when no lease is held.
    pub lease_until_ms: u64,
    /// The greatest record version committed so far.
    pub high_water: Option<String>,
    pub phase: Phase,
    pub stage: Stage,
    /// T0 of a bulk walk (RFC 3339), recorded before it starts.
    pub t0: Option<String>,
    pub pages: u64,
    pub records: u64,
    pub last_error: Option<String>,
    pub last_end_of_stream_ms: Option<u64>,
    /// When the job should run next, unix ms.
    pub next_due_ms: u64,
    /// Chains restarted from the high-water mark after a lost cursor.
    #[serde(default)]
    pub recoveries: u64,
    /// When a commit last moved the cursor, unix ms (the cursor's age).
    #[serde(default)]
    pub last_commit_ms: Option<u64>,
    /// A child job: the version of its parent record it last ran for (or
    /// runs for), as [`trigger_version`] writes it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_version: Option<String>,
    /// A child job: the values its templates take from its parent record.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub vars: BTreeMap<String, String>,
    /// A child job whose parent changed while its chain ran: due again at
    /// the end of that chain.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub rerun: bool,
    /// How often this job was rewound: part of the parent version its
    /// records give their children, so a rewound parent triggers them again.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub generation: u64,
    /// A batch slot of a batched child feed: how many parent records it
    /// claims at a time (0: not a slot).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub batch_size: u64,
    /// A batch slot: the child partitions (parent records) its chain runs
    /// for, claimed from the feed's pending parents; empty while it waits.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub batch: Vec<String>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// An idle job's `next_due_ms` when nothing but its parent makes it due: a
/// child job that has run. 2^53 - 1, exact in Lua's numbers; the stores
/// keep such a job in no due index.
pub const NEVER_DUE_MS: u64 = (1 << 53) - 1;

/// A parent record seen in a committed page: its child job in one child
/// feed, the record's version, and the values the child's templates take.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Trigger {
    pub job: JobId,
    /// The parent record's version (or a digest of its bytes).
    pub version: String,
    pub vars: BTreeMap<String, String>,
}

/// The parent version a child job stores for `version` read by a parent
/// job rewound `generation` times: a rewind changes it, so the records read
/// again trigger their children again.
pub fn trigger_version(generation: u64, version: &str) -> String {
    if generation == 0 {
        version.to_string()
    } else {
        format!("{generation}|{version}")
    }
}

impl Trigger {
    /// The specification of a trigger, applied in the parent's commit by
    /// both stores: the child job `existing` (None: there is none yet) after
    /// this trigger from a parent job rewound `generation` times, or `None`
    /// when nothing changes (the parent version is the one it has). A new
    /// child is idle and due now; a changed parent makes an idle child due
    /// now, and a running or paused one run again when its chain ends or it
    /// is resumed (`rerun`); a failed child keeps its phase (retry runs it).
    pub fn apply(
        &self,
        existing: Option<&Checkpoint>,
        generation: u64,
        now_ms: u64,
    ) -> Option<Checkpoint> {
        let version = trigger_version(generation, &self.version);
        let mut next = match existing {
            None => Checkpoint {
                phase: Phase::Idle,
                stage: Stage::Bulk,
                next_due_ms: now_ms,
                ..Checkpoint::default()
            },
            Some(cp) if cp.parent_version.as_deref() == Some(version.as_str()) => return None,
            Some(cp) => {
                let mut next = cp.clone();
                match cp.phase {
                    Phase::Idle => next.next_due_ms = now_ms,
                    // Runs again when its chain ends, or when resumed.
                    Phase::Running | Phase::Paused => next.rerun = true,
                    Phase::Failed => {}
                }
                next
            }
        };
        next.parent_version = Some(version);
        next.vars = self.vars.clone();
        Some(next)
    }
}

/// One page's commit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Commit {
    pub epoch: u64,
    pub expected_seq: u64,
    pub new_cursor: Option<String>,
    pub new_seq: u64,
    /// The greatest version in the page, if the feed has versions.
    pub high_water: Option<String>,
    /// Records in the page.
    pub count: u64,
    pub end_of_stream: bool,
    /// With `end_of_stream`: when the next poll is due (unix ms).
    pub next_due_ms: u64,
    /// How long the lease lasts from now.
    pub lease_ms: u64,
    /// With `end_of_stream`: start the next chain from a start point instead
    /// of the cursor (snapshots, the bulk→incremental handoff, page walks).
    #[serde(default)]
    pub restart: Option<Restart>,
    /// With `end_of_stream`: kept as the job's `last_error` although the
    /// commit succeeded (a child whose parent is gone).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    /// The child jobs this page's records trigger, applied in the same
    /// atomic step ([`Trigger::apply`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub triggers: Vec<Trigger>,
    /// The parent records this page's records give each batched child
    /// feed, applied in the same step ([`BatchTriggers`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub batches: Vec<BatchTriggers>,
}

/// The parent records of one committed page for one batched child feed (of
/// one tenant). Each whose version differs from the one stored for it
/// (`trigger_version`, as for [`Trigger`]) takes the new version and joins
/// the feed's pending parents, unless it is pending already; then every
/// idle slot without a batch claims up to `size` pending parents, oldest
/// first, and is due at once. A slot's last commit claims its next batch
/// (due at once) or, with none pending, waits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchTriggers {
    pub feed: String,
    pub tenant: Option<String>,
    pub size: u64,
    /// The feed's batch slots (of the tenant): jobs `[<tenant>/]batch-<i>`.
    pub slots: Vec<JobId>,
    /// Each parent record's child partition and version.
    pub parents: Vec<(String, String)>,
}

/// Where the next chain of a job starts when it does not continue the cursor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Restart {
    pub stage: Stage,
    /// The start time (RFC 3339); `None`: the feed's own start point.
    pub start_from: Option<String>,
}

impl Commit {
    /// The cursor the job holds after this commit.
    pub fn stored_cursor(&self) -> Option<&String> {
        if self.end_of_stream && self.restart.is_some() {
            None
        } else {
            self.new_cursor.as_ref()
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum CommitOutcome {
    Ok,
    AlreadyApplied,
    Fenced,
    Conflict,
}

impl CommitOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            CommitOutcome::Ok => "OK",
            CommitOutcome::AlreadyApplied => "ALREADY_APPLIED",
            CommitOutcome::Fenced => "FENCED",
            CommitOutcome::Conflict => "CONFLICT",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "OK" => CommitOutcome::Ok,
            "ALREADY_APPLIED" => CommitOutcome::AlreadyApplied,
            "FENCED" => CommitOutcome::Fenced,
            "CONFLICT" => CommitOutcome::Conflict,
            _ => return None,
        })
    }
    /// True for outcomes the caller treats as success.
    pub fn applied(self) -> bool {
        matches!(self, CommitOutcome::Ok | CommitOutcome::AlreadyApplied)
    }
}

impl Checkpoint {
    /// Check `c` against this checkpoint, then (only for `Ok`) return the
    /// advanced checkpoint. `now_ms` renews the lease.
    pub fn apply(&self, c: &Commit, now_ms: u64) -> (CommitOutcome, Option<Checkpoint>) {
        if c.epoch != self.epoch {
            return (CommitOutcome::Fenced, None);
        }
        if self.seq == c.new_seq
            && self.cursor.as_ref() == c.stored_cursor()
            && c.new_seq == c.expected_seq + 1
        {
            return (CommitOutcome::AlreadyApplied, None);
        }
        if self.phase != Phase::Running {
            return (CommitOutcome::Fenced, None);
        }
        if self.seq != c.expected_seq || c.new_seq != c.expected_seq + 1 {
            return (CommitOutcome::Conflict, None);
        }
        let mut next = self.clone();
        next.cursor = c.stored_cursor().cloned();
        next.seq = c.new_seq;
        let page_hw = c.high_water.as_deref().map(normalize_version);
        next.high_water =
            max_version(self.high_water.as_deref(), page_hw.as_deref()).map(str::to_string);
        next.pages += 1;
        next.records += c.count;
        next.last_error = None;
        next.last_commit_ms = Some(now_ms);
        if c.end_of_stream {
            next.phase = Phase::Idle;
            next.lease_until_ms = 0;
            next.last_end_of_stream_ms = Some(now_ms);
            next.last_error = c.note.clone();
            // A child whose parent changed during the chain runs again now.
            next.next_due_ms = if self.rerun { now_ms } else { c.next_due_ms };
            next.rerun = false;
            // A batch slot's batch is done (the store claims the next).
            next.batch.clear();
            if let Some(r) = &c.restart {
                next.stage = r.stage;
                next.start_from = r.start_from.clone();
            }
        } else {
            next.lease_until_ms = now_ms + c.lease_ms;
        }
        (CommitOutcome::Ok, Some(next))
    }
}

/// The next epoch after `stored`, at server time `now_ms`.
///
/// Epochs must never repeat, even when Redis restarts from an AOF that lost
/// its last second of writes (appendfsync everysec): the store may then hold
/// an epoch older than one already handed out. So an epoch is not just
/// `stored + 1` but at least `now_ms * 1024`: every epoch handed out at
/// millisecond `t` is below `(t + 1) * 1024` (fewer than 1024 acquisitions
/// of one job in one millisecond), and after a restart the clock has moved
/// past every lost write's millisecond, so the next epoch exceeds all of
/// them. This holds as long as the server clock does not step back by more
/// than the restart took.
pub fn next_epoch(stored: u64, now_ms: u64) -> u64 {
    (stored + 1).max(now_ms.saturating_mul(1024))
}

/// Compare two record versions: as numbers when both are numbers, as times
/// when both are RFC 3339, else as text.
pub fn compare_versions(a: &str, b: &str) -> Ordering {
    if let (Ok(x), Ok(y)) = (a.parse::<f64>(), b.parse::<f64>()) {
        return x.partial_cmp(&y).unwrap_or(Ordering::Equal);
    }
    if let (Ok(x), Ok(y)) = (
        chrono::DateTime::parse_from_rfc3339(a),
        chrono::DateTime::parse_from_rfc3339(b),
    ) {
        return x.cmp(&y);
    }
    a.cmp(b)
}

/// A version in a form whose text order is its order: RFC 3339 times become
/// fixed-width UTC (`2024-01-01T00:00:00.000000000Z`), so stores that compare
/// text (the Redis script) agree with [`compare_versions`]. Numbers and other
/// text are kept as they are.
pub fn normalize_version(v: &str) -> String {
    match chrono::DateTime::parse_from_rfc3339(v) {
        Ok(t) => t
            .with_timezone(&chrono::Utc)
            .to_rfc3339_opts(chrono::SecondsFormat::Nanos, true),
        Err(_) => v.to_string(),
    }
}

/// The greater of two optional versions.
pub fn max_version<'a>(a: Option<&'a str>, b: Option<&'a str>) -> Option<&'a str> {
    match (a, b) {
        (Some(x), Some(y)) => Some(if compare_versions(x, y) == Ordering::Less {
            y
        } else {
            x
        }),
        (x, y) => x.or(y),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn running(epoch: u64, seq: u64) -> Checkpoint {
        Checkpoint {
            epoch,
            seq,
            phase: Phase::Running,
            ..Default::default()
        }
    }

    fn commit(epoch: u64, seq: u64, cursor: &str) -> Commit {
        Commit {
            epoch,
            expected_seq: seq,
            new_cursor: Some(cursor.into()),
            new_seq: seq + 1,
            high_water: None,
            count: 10,
            end_of_stream: false,
            next_due_ms: 0,
            lease_ms: 1000,
            restart: None,
            note: None,
            triggers: Vec::new(),
            batches: Vec::new(),
        }
    }

    #[test]
    fn ok_then_already_applied_then_conflict() {
        let cp = running(7, 3);
        let (o, next) = cp.apply(&commit(7, 3, "c4"), 100);
        assert_eq!(o, CommitOutcome::Ok);
        let next = next.unwrap();
        assert_eq!(
            (
                next.seq,
                next.cursor.as_deref(),
                next.records,
                next.lease_until_ms
            ),
            (4, Some("c4"), 10, 1100)
        );
        assert_eq!(
            next.apply(&commit(7, 3, "c4"), 200).0,
            CommitOutcome::AlreadyApplied
        );
        assert_eq!(
            next.apply(&commit(7, 3, "other"), 200).0,
            CommitOutcome::Conflict
        );
        assert_eq!(
            next.apply(&commit(7, 5, "c6"), 200).0,
            CommitOutcome::Conflict
        );
        assert_eq!(
            next.apply(&commit(6, 4, "c5"), 200).0,
            CommitOutcome::Fenced
        );
        assert_eq!(
            next.apply(&commit(8, 4, "c5"), 200).0,
            CommitOutcome::Fenced
        );
    }

    #[test]
    fn end_of_stream_idles_the_job_and_keeps_the_cursor() {
        let mut c = commit(1, 0, "resume");
        c.end_of_stream = true;
        c.next_due_ms = 5000;
        let (_, next) = running(1, 0).apply(&c, 100);
        let next = next.unwrap();
        assert_eq!(
            (
                next.phase,
                next.cursor.as_deref(),
                next.next_due_ms,
                next.lease_until_ms
            ),
            (Phase::Idle, Some("resume"), 5000, 0)
        );
        // A retry of the final commit after a lost reply is still recognised.
        assert_eq!(next.apply(&c, 200).0, CommitOutcome::AlreadyApplied);
        // A paused job refuses commits of its old epoch.
        let paused = Checkpoint {
            phase: Phase::Paused,
            epoch: 2,
            ..next
        };
        assert_eq!(
            paused.apply(&commit(1, 1, "x"), 300).0,
            CommitOutcome::Fenced
        );
    }

    #[test]
    fn versions_compare_by_kind() {
        assert_eq!(compare_versions("9", "10"), Ordering::Less);
        assert_eq!(
            compare_versions("2024-01-01T00:00:00Z", "2023-12-31T23:00:00-02:00"),
            Ordering::Less
        );
        assert_eq!(max_version(Some("b"), Some("a")), Some("b"));
        assert_eq!(max_version(None, Some("a")), Some("a"));
    }

    proptest! {
        #[test]
        fn epochs_strictly_increase_and_beat_lost_ones(t in 1u64..4_000_000_000_000, k in 0u64..1000, lost in 0u64..1000, later in 1u64..100_000) {
            // An epoch handed out at millisecond t, after k others in that millisecond.
            let stored = t * 1024 + k;
            let e = next_epoch(stored, t);
            prop_assert!(e > stored && e < (t + 1) * 1024);
            // Redis restarts having lost writes: it holds an older epoch. Later, the next one beats e.
            let restored = stored.saturating_sub(lost);
            prop_assert!(next_epoch(restored, t + later) > e);
        }

        #[test]
        fn only_a_chaining_commit_of_the_current_epoch_applies(epoch in 1u64..5, seq in 0u64..5, c_epoch in 1u64..5, c_seq in 0u64..5) {
            let (o, next) = running(epoch, seq).apply(&commit(c_epoch, c_seq, "x"), 0);
            prop_assert_eq!(o == CommitOutcome::Ok, epoch == c_epoch && seq == c_seq);
            prop_assert_eq!(next.is_some(), o == CommitOutcome::Ok);
        }
    }
}
