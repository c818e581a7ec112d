//! One chain's walk through the pages of a job, as a pure value.
//!
//! A [`Walk`] holds where a chain is (its [`Position`]), the time it started
//! from (a page-number or offset walk repeats it on every page) and how many
//! empty pages it has read in a row. It builds the request for the page it
//! is at, and [`Walk::advance`] reads the answer: the records as byte ranges
//! of the body (delivered as the API sent them, never re-encoded), their
//! identities and the page's high-water mark when asked for, and what comes
//! next. A page that cannot be read leaves the walk where it was.
//!
//! The distributed worker rebuilds a walk from each page task (cursor, start
//! time, empty run), advances it once and hands the result on in the next
//! task; `tidemark pull` keeps one walk for a whole chain; the fuzz targets
//! drive it with arbitrary bodies. All three read pages the same way.
//!
//! The functions at the end say where a job's next chain starts when a walk
//! ends or its cursor is lost: from the cursor, from the high-water mark
//! minus `lag`, or (seed 002) from T0 minus `lag` in the incremental stage.

use std::ops::Range;

use chrono::{DateTime, Utc};

use crate::checkpoint::{Checkpoint, Restart, Stage, compare_versions, max_version};
use crate::config::{FeedConfig, Mode, Partition, SourceConfig};
use crate::pagination::{
    Headers, MAX_EMPTY_PAGES_IN_A_ROW, Next, PageRequest, Paginator, Position, ReadError,
    empty_run_error,
};
use crate::pointer::JsonPointer;
use crate::record::{Identity, IdentityError, IdentityPlan};
use crate::timefmt::parse_timestamp;

/// Where one chain is, and how to read its next page.
#[derive(Clone)]
pub struct Walk {
    paginator: Paginator,
    pos: Position,
    chain_from: Option<DateTime<Utc>>,
    empty_run: u32,
    /// The feed's key and version pointers, when records are identified.
    identify: Option<IdentityPlan>,
}

/// One page read by a walk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// Each record's bytes in the body, in page order.
    pub records: Vec<Range<usize>>,
    /// Each record's key and version (empty unless the walk identifies records).
    pub identities: Vec<Identity>,
    /// The greatest record version of the page.
    pub high_water: Option<String>,
    /// What comes after this page; the walk is already there.
    pub next: Next,
}

/// Why a page could not be taken; the walk stays where it was.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WalkError {
    #[error(transparent)]
    Read(#[from] ReadError),
    #[error("record {index}: {error}")]
    Identity { index: usize, error: IdentityError },
    /// An API may skip a filtered-out page with an empty one and a new
    /// cursor, but not forever: a run of them is a loop whose cursor changes.
    #[error("{}", empty_run_error())]
    EmptyRun,
}

impl Walk {
    /// A walk of `partition` of `feed` on `source`, in `stage`'s pagination,
    /// at the feed's start point. Call on validated configs.
    pub fn new(
        feed: &FeedConfig,
        source: &SourceConfig,
        partition: &Partition,
        stage: Stage,
    ) -> Result<Walk, String> {
        let paginator = feed.paginator_for(source, partition, stage)?;
        let from = match feed.start_position(partition)? {
            Position::Start { from } => from,
            Position::At(_) => None,
        };
        Ok(Self::from_paginator(paginator, from))
    }

    /// A walk with a paginator built by hand, starting at `from`.
    pub fn from_paginator(paginator: Paginator, from: Option<DateTime<Utc>>) -> Walk {
        Walk {
            paginator,
            pos: Position::Start { from },
            chain_from: from,
            empty_run: 0,
            identify: None,
        }
    }

    /// Start the chain at `from` (RFC 3339) instead of the feed's start point.
    pub fn starting_from(mut self, from: Option<&str>) -> Result<Walk, String> {
        if let Some(t) = from {
            let t = parse_timestamp(t).map_err(|e| format!("start {t:?}: {e}"))?;
            self.chain_from = Some(t);
            if let Position::Start { .. } = self.pos {
                self.pos = Position::Start { from: Some(t) };
            }
        }
        Ok(self)
    }

    /// Continue the chain at `cursor` (a cursor, next URL, page or offset).
    pub fn at(mut self, cursor: Option<String>) -> Walk {
        self.pos = match cursor {
            // A JSON cursor as the chain stores it, so `[1, "a"]` given by
            // hand compares equal to the `[1,"a"]` the API hands back.
            Some(c) if self.paginator.cursor_in_body() => {
                Position::At(crate::pagination::tidy_json_cursor(&c).unwrap_or(c))
            }
            Some(c) => Position::At(c),
            None => Position::Start {
                from: self.chain_from,
            },
        };
        self
    }

    /// The chain has read `n` empty pages in a row before this one.
    pub fn after_empty_pages(mut self, n: u32) -> Walk {
        self.empty_run = n;
        self
    }

    /// Identify every record (key, version) and find the page's high-water mark.
    pub fn identifying(mut self, key: JsonPointer, version: Option<JsonPointer>) -> Walk {
        self.identify = Some(IdentityPlan::new(key, version));
        self
    }

    /// The paginator the walk reads pages with.
    pub fn paginator(&self) -> &Paginator {
        &self.paginator
    }

    pub fn position(&self) -> &Position {
        &self.pos
    }

    /// The cursor the walk is at; `None` at the chain's start.
    pub fn cursor(&self) -> Option<&str> {
        match &self.pos {
            Position::At(c) => Some(c),
            Position::Start { .. } => None,
        }
    }

    /// Empty pages read in a row, with more claimed.
    pub fn empty_run(&self) -> u32 {
        self.empty_run
    }

    /// The page's position as text, for the ids of messages that have no
    /// record version: the cursor, or `start:` and the start time.
    pub fn page_cursor(&self) -> String {
        match &self.pos {
            Position::At(c) => c.clone(),
            Position::Start { from } => {
                format!("start:{}", from.map(|t| t.to_rfc3339()).unwrap_or_default())
            }
        }
    }

    /// The request for the page the walk is at.
    pub fn request(&self) -> Result<PageRequest, ReadError> {
        self.paginator.request_in_chain(&self.pos, self.chain_from)
    }

    /// Read the answer to [`Walk::request`]'s `req`. On success the walk is
    /// at the next page (or, at the end of the stream, stays where it was);
    /// on an error it has not moved.
    pub fn advance(
        &mut self,
        req: &PageRequest,
        headers: &dyn Headers,
        body: &[u8],
    ) -> Result<Step, WalkError> {
        let page = self.paginator.read(&self.pos, req, headers, body)?;
        let base = body.as_ptr() as usize;
        let records: Vec<Range<usize>> = page
            .records
            .iter()
            .map(|r| {
                // Every record is a slice of `body` (the reader borrows it).
                let start = r.get().as_ptr() as usize - base;
                start..start + r.get().len()
            })
            .collect();
        let mut identities = Vec::new();
        let mut high_water: Option<String> = None;
        if let Some(plan) = &self.identify {
            identities.reserve(page.records.len());
            for (index, rec) in page.records.iter().enumerate() {
                let id = plan
                    .read(rec)
                    .map_err(|error| WalkError::Identity { index, error })?;
                if let Some(v) = &id.version
                    && high_water
                        .as_deref()
                        .is_none_or(|h| compare_versions(h, v).is_lt())
                {
                    high_water = Some(v.clone());
                }
                identities.push(id);
            }
        }
        let empty_run = match (&page.next, records.is_empty()) {
            (Next::More(_), true) => self.empty_run + 1,
            _ => 0,
        };
        if empty_run >= MAX_EMPTY_PAGES_IN_A_ROW {
            return Err(WalkError::EmptyRun);
        }
        self.empty_run = empty_run;
        if let Next::More(c) = &page.next {
            self.pos = Position::At(c.clone());
        }
        Ok(Step {
            records,
            identities,
            high_water,
            next: page.next,
        })
    }
}

/// `t` (a time or a time-valued version) minus the feed's `lag`, as RFC 3339.
pub fn minus_lag(feed: &FeedConfig, t: &str) -> Option<String> {
    let lag = chrono::Duration::from_std(feed.lag()).unwrap_or_default();
    parse_timestamp(t)
        .ok()
        .map(|t| (t - lag).to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true))
}

/// Where a chain restarts without a cursor (an expired one, or none to
/// continue from): the high-water mark `high` minus lag, else the start
/// point the job had.
pub fn restart_point(feed: &FeedConfig, high: Option<&str>, cp: &Checkpoint) -> Option<String> {
    high.and_then(|h| minus_lag(feed, h))
        .or_else(|| cp.start_from.clone())
}

/// At the end of a walk: where the job's next chain starts, if not from
/// the cursor it keeps, and whether it is due at once (seed 002's handoff
/// from the bulk walk to the incremental syncs) rather than after `every`.
/// `page_high` is the last page's high-water mark; `no_cursor` says the API
/// gave nothing to continue from.
pub fn restart_at_end(
    feed: &FeedConfig,
    cp: &Checkpoint,
    page_high: Option<&str>,
    no_cursor: bool,
) -> (Option<Restart>, bool) {
    match (feed.mode, cp.stage) {
        (Mode::Snapshot, stage) => (
            Some(Restart {
                stage,
                start_from: None,
            }),
            false,
        ),
        // Seed 002: incremental syncs start at T0 (recorded before the bulk
        // walk) minus lag, at once.
        (Mode::BulkThenIncremental, Stage::Bulk) => (
            Some(Restart {
                stage: Stage::Incremental,
                start_from: cp.t0.as_deref().and_then(|t0| minus_lag(feed, t0)),
            }),
            true,
        ),
        // No cursor to continue from (page numbers, an API that gives
        // none): the next poll starts at the high-water mark minus lag.
        (_, stage) if no_cursor && feed.start_for(stage).is_some() => (
            Some(Restart {
                stage,
                start_from: restart_point(
                    feed,
                    max_version(cp.high_water.as_deref(), page_high),
                    cp,
                ),
            }),
            false,
        ),
        _ => (None, false),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is the failure report

    use super::*;
    use crate::checkpoint::Stage;
    use crate::config::load_str;

    fn config(feed_extra: &str) -> crate::Config {
        let text = format!(
            r#"sources:
  api:
    base_url: https://api.test
feeds:
  - name: items
    source: api
    path: /items
    records: /data
    pagination: {{ preset: start_after }}
    key: /id
    version: /updated_at
{feed_extra}"#
        );
        load_str("t.yaml", &text).expect("valid config")
    }

    fn walk_of(cfg: &crate::Config) -> Walk {
        let feed = &cfg.feeds[0];
        let source = cfg.source_of(feed).unwrap();
        let part = feed.partitions(Utc::now()).unwrap().remove(0);
        Walk::new(feed, source, &part, Stage::Bulk)
            .unwrap()
            .identifying(feed.key.clone(), feed.version.clone())
    }

    fn page(ids: &[(u32, &str)], more: bool, next: &str) -> String {
        let data: Vec<String> = ids
            .iter()
            .map(|(id, at)| format!(r#"{{"id":{id},"updated_at":"{at}"}}"#))
            .collect();
        format!(
            r#"{{"data":[{}],"meta":{{"hasMore":{more},"nextStartAfter":"{next}"}}}}"#,
            data.join(",")
        )
    }

    #[test]
    fn advances_with_byte_ranges_identities_and_the_high_water_mark() {
        let cfg = config("");
        let mut w = walk_of(&cfg);
        assert_eq!(w.cursor(), None);
        assert_eq!(w.page_cursor(), "start:");
        let req = w.request().unwrap();
        let body = page(
            &[(1, "2024-01-02T00:00:00Z"), (2, "2024-01-01T00:00:00Z")],
            true,
            "2",
        );
        let step = w.advance(&req, &Vec::new(), body.as_bytes()).unwrap();
        assert_eq!(
            &body[step.records[0].clone()],
            r#"{"id":1,"updated_at":"2024-01-02T00:00:00Z"}"#
        );
        assert_eq!(step.identities[1].key, "2");
        assert_eq!(step.high_water.as_deref(), Some("2024-01-02T00:00:00Z"));
        assert_eq!(step.next, Next::More("2".into()));
        assert_eq!(w.cursor(), Some("2"));
        assert!(w.request().unwrap().url.as_str().contains("startAfter=2"));
    }

    #[test]
    fn an_unreadable_page_leaves_the_walk_where_it_was() {
        let cfg = config("");
        let mut w = walk_of(&cfg).at(Some("7".into()));
        let req = w.request().unwrap();
        let err = w.advance(&req, &Vec::new(), b"{not json").unwrap_err();
        assert!(
            matches!(err, WalkError::Read(ReadError::NotJson(_))),
            "{err}"
        );
        // A record without its key: the same, and nothing of the page is taken.
        let body = r#"{"data":[{"updated_at":"x"}],"meta":{"hasMore":true,"nextStartAfter":"8"}}"#;
        let err = w.advance(&req, &Vec::new(), body.as_bytes()).unwrap_err();
        assert!(matches!(err, WalkError::Identity { index: 0, .. }), "{err}");
        assert_eq!(w.cursor(), Some("7"));
    }

    #[test]
    fn a_long_run_of_empty_pages_with_new_cursors_is_a_loop() {
        let cfg = config("");
        let mut w = walk_of(&cfg)
            .at(Some("c0".into()))
            .after_empty_pages(MAX_EMPTY_PAGES_IN_A_ROW - 2);
        let req = w.request().unwrap();
        w.advance(&req, &Vec::new(), page(&[], true, "c1").as_bytes())
            .unwrap();
        assert_eq!(w.empty_run(), MAX_EMPTY_PAGES_IN_A_ROW - 1);
        let req = w.request().unwrap();
        let err = w
            .advance(&req, &Vec::new(), page(&[], true, "c2").as_bytes())
            .unwrap_err();
        assert_eq!(err, WalkError::EmptyRun);
        assert_eq!(w.cursor(), Some("c1"), "the loop's page is not taken");
        // A page with records resets the run.
        let mut w = walk_of(&cfg).after_empty_pages(50);
        let req = w.request().unwrap();
        w.advance(&req, &Vec::new(), page(&[(1, "1")], true, "1").as_bytes())
            .unwrap();
        assert_eq!(w.empty_run(), 0);
    }

    #[test]
    fn a_start_time_goes_into_the_first_request_and_the_page_identity() {
        let cfg = config("    start: { param: since, format: unix }\n");
        let w = walk_of(&cfg)
            .starting_from(Some("2024-01-01T00:00:00Z"))
            .unwrap();
        assert!(
            w.request()
                .unwrap()
                .url
                .as_str()
                .contains("since=1704067200")
        );
        assert_eq!(w.page_cursor(), "start:2024-01-01T00:00:00+00:00");
        assert!(walk_of(&cfg).starting_from(Some("yesterday")).is_err());
    }

    #[test]
    fn where_the_next_chain_starts() {
        let snapshot = config("    mode: snapshot\n");
        let cp = Checkpoint::default();
        let (restart, now) = restart_at_end(&snapshot.feeds[0], &cp, None, false);
        assert_eq!(restart.map(|r| r.start_from), Some(None));
        assert!(!now);

        // Seed 002: the bulk walk hands over to the incremental stage at T0 - lag, at once.
        let bulk = config(
            "    mode: bulk_then_incremental\n    lag: 1m\n    incremental:\n      params: {}\n      start: { param: updatedSince, format: iso8601 }\n      pagination: { page_param: page }\n",
        );
        let cp = Checkpoint {
            t0: Some("2024-05-01T10:00:00Z".into()),
            ..Checkpoint::default()
        };
        let (restart, now) = restart_at_end(&bulk.feeds[0], &cp, None, false);
        let restart = restart.unwrap();
        assert_eq!(restart.stage, Stage::Incremental);
        assert_eq!(restart.start_from.as_deref(), Some("2024-05-01T09:59:00Z"));
        assert!(now);

        // No cursor to continue from: the high-water mark minus lag.
        let inc = config("    start: { param: since, format: iso8601 }\n    lag: 30s\n");
        let cp = Checkpoint {
            high_water: Some("2024-05-01T10:00:00Z".into()),
            ..Checkpoint::default()
        };
        let (restart, _) = restart_at_end(&inc.feeds[0], &cp, Some("2024-05-02T00:00:00Z"), true);
        assert_eq!(
            restart.unwrap().start_from.as_deref(),
            Some("2024-05-01T23:59:30Z")
        );
        // With a cursor to keep, the next poll continues from it.
        assert_eq!(restart_at_end(&inc.feeds[0], &cp, None, false).0, None);
    }
}
