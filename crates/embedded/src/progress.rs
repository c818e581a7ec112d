//! What the feeds of a run have done so far, summed over their partitions,
//! for a live display (`tidemark demo`) and a closing summary.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use tidemark_core::checkpoint::{Checkpoint, JobId, Phase};
use tidemark_state::StateStore;

/// One feed's figures, summed over its partitions.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct FeedView {
    /// The most telling phase of its jobs: failed, running, paused, idle,
    /// else `waiting` (no job yet).
    pub phase: &'static str,
    pub pages: u64,
    pub records: u64,
    pub next_due_ms: u64,
    /// The error of a failed job.
    pub error: Option<String>,
}

/// The view of `feed` among `jobs`.
pub fn view(jobs: &[(JobId, Checkpoint)], feed: &str) -> FeedView {
    let mut v = FeedView {
        phase: "waiting",
        ..FeedView::default()
    };
    let rank = |p: &str| match p {
        "failed" => 4,
        "running" => 3,
        "paused" => 2,
        "idle" => 1,
        _ => 0,
    };
    for (_, cp) in jobs.iter().filter(|(j, _)| j.feed == feed) {
        v.pages += cp.pages;
        v.records += cp.records;
        v.next_due_ms = v.next_due_ms.max(cp.next_due_ms);
        if rank(cp.phase.as_str()) > rank(v.phase) {
            v.phase = cp.phase.as_str();
        }
        if cp.phase == Phase::Failed {
            v.error = cp.last_error.clone();
        }
    }
    v
}

/// `N job(s), P pages, R records committed`; empty when the store cannot be read.
pub async fn summary(store: &dyn StateStore) -> String {
    let Ok(jobs) = store.list().await else {
        return String::new();
    };
    let (pages, records) = jobs
        .iter()
        .fold((0, 0), |(p, r), (_, cp)| (p + cp.pages, r + cp.records));
    format!(
        "{} job(s), {pages} pages, {records} records committed",
        jobs.len()
    )
}

/// Records per second over the last few seconds of samples.
#[derive(Debug, Default)]
pub struct Rate {
    samples: VecDeque<(Instant, u64)>,
}

impl Rate {
    /// Add a sample of the running total and return the rate over the
    /// samples of the last 3 s (at least two kept).
    pub fn sample(&mut self, now: Instant, total: u64) -> f64 {
        let s = &mut self.samples;
        s.push_back((now, total));
        while s.len() > 2 && now.duration_since(s[0].0) > Duration::from_secs(3) {
            s.pop_front();
        }
        match (s.front(), s.back()) {
            (Some(a), Some(b)) if b.0 > a.0 => {
                (b.1.saturating_sub(a.1)) as f64 / b.0.duration_since(a.0).as_secs_f64()
            }
            _ => 0.0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rate_is_taken_over_the_last_seconds() {
        let mut r = Rate::default();
        let t0 = Instant::now();
        assert_eq!(r.sample(t0, 0), 0.0);
        assert_eq!(r.sample(t0 + Duration::from_secs(1), 100), 100.0);
        assert_eq!(r.sample(t0 + Duration::from_secs(2), 300), 150.0);
        // Samples more than 3 s old are dropped: the rate is over 2 s..5 s.
        assert_eq!(r.sample(t0 + Duration::from_secs(5), 600), 100.0);
    }
}
