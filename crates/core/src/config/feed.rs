//! What a validated feed means at run time: its pagination spec, its start
//! point and its partitions.

use chrono::{DateTime, Utc};

use super::{
    FeedConfig, IncrementalConfig, Mode, PaginationSpec, SourceConfig, StartConfig, WindowsConfig,
};
use crate::checkpoint::Stage;
use crate::pagination::{Paginator, Position};
use crate::timefmt::{TimeFormat, parse_timestamp};

/// The partition id of a feed without partitions.
pub const DEFAULT_PARTITION: &str = "all";

/// The most partitions (jobs) one feed may have: hourly windows for eleven
/// years. Each is a job the coordinator walks every pass (about 120 µs
/// each, docs/BENCHMARKS.md); windows from long ago every second would be
/// hundreds of millions, built in memory before anything is checked.
pub const MAX_PARTITIONS: usize = 100_000;

/// How many windows of `every` cover `from..to` (0 when `to` is not later).
fn window_count(from: DateTime<Utc>, to: DateTime<Utc>, every: std::time::Duration) -> u128 {
    let (Ok(span), every) = ((to - from).to_std(), every.as_nanos()) else {
        return 0;
    };
    if every == 0 {
        return u128::MAX;
    }
    span.as_nanos().div_ceil(every)
}

/// The number of windows of `w` from `from` to `to`, or why they are too
/// many: the one check behind `validate` and [`FeedConfig::partitions`].
pub(crate) fn windows_within_limit(
    w: &WindowsConfig,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> Result<usize, String> {
    let count = window_count(from, to, w.every.std());
    if count > MAX_PARTITIONS as u128 {
        return Err(format!(
            "{count} windows from {} to {} every {}, over the limit of {MAX_PARTITIONS} jobs per feed: use a longer `every` or a later `from`",
            w.from,
            w.to.as_deref().unwrap_or("now"),
            humantime::format_duration(w.every.std()),
        ));
    }
    Ok(count as usize)
}

/// Why `n` partition values are too many, if they are.
pub(crate) fn values_within_limit(n: usize) -> Result<(), String> {
    if n > MAX_PARTITIONS {
        return Err(format!(
            "lists {n} values, over the limit of {MAX_PARTITIONS} jobs per feed"
        ));
    }
    Ok(())
}

/// One independent slice of a feed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partition {
    /// Stable id: the partition value, the window start (RFC 3339), or `all`.
    pub id: String,
    /// Parameters sent with every request of this partition.
    pub params: Vec<(String, String)>,
    /// Overrides the feed's `start.from` (time windows).
    pub from: Option<DateTime<Utc>>,
}

impl FeedConfig {
    /// The pagination spec of the main (or bulk) walk. Call on validated configs.
    pub fn pagination_spec(&self) -> Result<PaginationSpec, String> {
        PaginationSpec::resolve(&self.pagination, self.records.as_ref()).map_err(join)
    }

    /// The start block in force: the feed's, or the one its preset implies.
    pub fn effective_start(&self) -> Option<StartConfig> {
        self.start.clone().or_else(|| {
            self.pagination_spec()
                .ok()
                .and(self.pagination.preset())
                .and_then(|p| p.default_start())
        })
    }

    /// The partitions of this feed. Time windows end at `windows.to` or `now`.
    pub fn partitions(&self, now: DateTime<Utc>) -> Result<Vec<Partition>, String> {
        let Some(p) = &self.partitions else {
            return Ok(vec![Partition {
                id: DEFAULT_PARTITION.into(),
                params: vec![],
                from: None,
            }]);
        };
        if let (Some(param), Some(values)) = (&p.param, &p.values) {
            values_within_limit(values.len()).map_err(|why| format!("partitions.values {why}"))?;
            return Ok(values
                .iter()
                .map(|v| Partition {
                    id: v.clone(),
                    params: vec![(param.clone(), v.clone())],
                    from: None,
                })
                .collect());
        }
        let Some(w) = &p.windows else {
            return Err("partitions: set values (with param) or windows".into());
        };
        let fmt = self.window_format();
        let (from, to, step) = window_bounds(w, now)?;
        let count = windows_within_limit(w, from, to)
            .map_err(|why| format!("partitions.windows: {why}"))?;
        let mut out = Vec::with_capacity(count);
        let mut t = from;
        while t < to {
            let end = (t + step).min(to);
            out.push(Partition {
                id: t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true),
                params: vec![(w.end_param.clone(), fmt.format(end))],
                from: Some(t),
            });
            t = end;
        }
        Ok(out)
    }

    /// The position a fresh chain of `partition` starts at.
    pub fn start_position(&self, partition: &Partition) -> Result<Position, String> {
        let from = match partition.from {
            Some(f) => Some(f),
            None => match self.effective_start().and_then(|s| s.from) {
                Some(s) => Some(parse_timestamp(&s)?),
                None => None,
            },
        };
        Ok(Position::Start { from })
    }

    /// The pagination spec of the `incremental:` block. Its records pointer
    /// is its own, else the feed's, else the bulk preset's.
    pub fn incremental_spec(
        &self,
        inc: &IncrementalConfig,
    ) -> Result<PaginationSpec, Vec<(String, String)>> {
        let records = inc
            .records
            .as_ref()
            .or(self.records.as_ref())
            .cloned()
            .or_else(|| self.pagination_spec().ok().map(|s| s.records));
        PaginationSpec::resolve(&inc.pagination, records.as_ref())
    }

    /// True when `stage` walks the `incremental:` block (after a bulk walk).
    fn uses_incremental_block(&self, stage: Stage) -> bool {
        stage == Stage::Incremental
            && self.mode == Mode::BulkThenIncremental
            && self.incremental.is_some()
    }

    /// The start block of `stage`'s walk.
    pub fn start_for(&self, stage: Stage) -> Option<StartConfig> {
        match &self.incremental {
            Some(inc) if self.uses_incremental_block(stage) => {
                inc.start.clone().or_else(|| self.effective_start())
            }
            _ => self.effective_start(),
        }
    }

    /// A paginator for `partition` of this feed on `source`, for the walk of
    /// `stage`: the feed's own pagination, or for the incremental syncs of a
    /// `bulk_then_incremental` feed its `incremental:` block.
    pub fn paginator_for(
        &self,
        source: &SourceConfig,
        partition: &Partition,
        stage: Stage,
    ) -> Result<Paginator, String> {
        let (spec, fixed, body) = match &self.incremental {
            Some(inc) if self.uses_incremental_block(stage) => (
                self.incremental_spec(inc).map_err(join)?,
                &inc.params,
                inc.body.as_ref().or(self.body.as_ref()),
            ),
            _ => (self.pagination_spec()?, &self.params, self.body.as_ref()),
        };
        let mut params: Vec<(String, String)> =
            fixed.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        params.extend(partition.params.iter().cloned());
        Ok(Paginator::new(
            source.base_url.url()?,
            &self.path,
            spec,
            params,
            self.start_for(stage).map(|s| (s.param, s.format)),
        )
        .with_max_cursor_len(source.max_cursor_bytes())
        .with_max_records(source.max_records_per_page())
        .with_secret_params(source.secret_query_params())
        .with_request(self.method(), body.cloned(), self.read_only())
        .with_record(self.record.clone())
        .with_errors(self.error_when.clone()))
    }

    /// The method in force (GET unless written).
    pub fn method(&self) -> super::Method {
        self.method.unwrap_or_default()
    }

    /// True when the feed's requests only read: GET and QUERY, and a POST
    /// marked `read_only: true`.
    pub fn read_only(&self) -> bool {
        match self.method() {
            super::Method::Post => self.read_only == Some(true),
            _ => true,
        }
    }

    /// True when the chain's cursor is a JSON value written into the body
    /// (`cursor_param: body:/…`): stored, shown and taken as JSON text.
    pub fn cursor_is_json(&self) -> bool {
        let mut specs = vec![self.pagination_spec().ok()];
        if let Some(inc) = &self.incremental {
            specs.push(self.incremental_spec(inc).ok());
        }
        specs.into_iter().flatten().any(|s| {
            matches!(&s.strategy, crate::pagination::Strategy::Cursor { param, .. }
                if crate::pagination::Place::in_body(param))
        })
    }

    /// This feed as `tenant` sees it: `path` and `params` filled in.
    pub fn for_tenant(&self, tenant: &crate::tenant::Tenant) -> Result<FeedConfig, String> {
        use crate::tenant::{Place, substitute, substitute_at};
        let mut out = self.clone();
        out.path = substitute_at(&self.path, tenant, Place::Path)?;
        for v in out.params.values_mut() {
            *v = substitute(v, tenant)?;
        }
        if let Some(b) = out.body.as_mut() {
            map_strings(b, &mut |s| substitute(s, tenant))?;
        }
        if let Some(inc) = out.incremental.as_mut() {
            for v in inc.params.values_mut() {
                *v = substitute(v, tenant)?;
            }
            if let Some(b) = inc.body.as_mut() {
                map_strings(b, &mut |s| substitute(s, tenant))?;
            }
        }
        Ok(out)
    }

    /// The pause between two polls (`every`, default 5 minutes).
    pub fn every(&self) -> std::time::Duration {
        self.every.unwrap_or(super::DEFAULT_EVERY).std()
    }

    /// How far behind the high-water mark (or T0) a restart begins (`lag`, default 0).
    pub fn lag(&self) -> std::time::Duration {
        self.lag.map(|d| d.std()).unwrap_or_default()
    }

    /// True when the feed's partitions grow with time: windows without a `to`.
    pub fn partitions_grow(&self) -> bool {
        self.partitions
            .as_ref()
            .and_then(|p| p.windows.as_ref())
            .is_some_and(|w| w.to.is_none())
    }

    /// How a window's end is written in its query parameter: the start's format.
    fn window_format(&self) -> TimeFormat {
        self.effective_start()
            .map(|s| s.format)
            .unwrap_or(TimeFormat::Iso8601)
    }

    /// The partition with this id, if the feed has it (time windows as of `now`).
    ///
    /// Found without listing the partitions (a worker asks this once per
    /// page): a value is looked up in a set, a window computed from its start.
    pub fn partition(&self, id: &str, now: DateTime<Utc>) -> Result<Option<Partition>, String> {
        let Some(p) = &self.partitions else {
            return Ok((id == DEFAULT_PARTITION).then(|| Partition {
                id: DEFAULT_PARTITION.into(),
                params: vec![],
                from: None,
            }));
        };
        if let (Some(param), Some(values)) = (&p.param, &p.values) {
            values_within_limit(values.len()).map_err(|why| format!("partitions.values {why}"))?;
            return Ok(p.value_set.contains(values, id).then(|| Partition {
                id: id.to_string(),
                params: vec![(param.clone(), id.to_string())],
                from: None,
            }));
        }
        let Some(w) = &p.windows else {
            return Err("partitions: set values (with param) or windows".into());
        };
        let Ok(t) = parse_timestamp(id) else {
            return Ok(None);
        };
        let (from, to, step) = window_bounds(w, now)?;
        let offset = t - from;
        let aligned = offset >= chrono::Duration::zero()
            && offset.num_milliseconds() % step.num_milliseconds().max(1) == 0;
        let canonical = t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true) == id;
        if !aligned || !canonical || t >= to {
            return Ok(None);
        }
        let fmt = self.window_format();
        let end = (t + step).min(to);
        Ok(Some(Partition {
            id: id.to_string(),
            params: vec![(w.end_param.clone(), fmt.format(end))],
            from: Some(t),
        }))
    }
}

/// A feed's time windows: the first start, the end (`now` unless set) and the length.
fn window_bounds(
    w: &WindowsConfig,
    now: DateTime<Utc>,
) -> Result<(DateTime<Utc>, DateTime<Utc>, chrono::Duration), String> {
    let from = parse_timestamp(&w.from)?;
    let to = match &w.to {
        Some(t) => parse_timestamp(t)?,
        None => now,
    };
    let step = chrono::Duration::from_std(w.every.std()).map_err(|e| e.to_string())?;
    if step <= chrono::Duration::zero() {
        return Err("partitions.windows.every must be above 0".into());
    }
    Ok((from, to, step))
}

/// Replace every string of `v` (a body template) with `f` of it.
pub(crate) fn map_strings(
    v: &mut serde_json::Value,
    f: &mut dyn FnMut(&str) -> Result<String, String>,
) -> Result<(), String> {
    match v {
        serde_json::Value::String(s) => *s = f(s)?,
        serde_json::Value::Array(items) => {
            for item in items {
                map_strings(item, f)?;
            }
        }
        serde_json::Value::Object(m) => {
            for item in m.values_mut() {
                map_strings(item, f)?;
            }
        }
        _ => {}
    }
    Ok(())
}

fn join(problems: Vec<(String, String)>) -> String {
    problems
        .into_iter()
        .map(|(p, r)| format!("{p}: {r}"))
        .collect::<Vec<_>>()
        .join("; ")
}
