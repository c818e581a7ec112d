//! The dataset: records with a creation order (their id) and a change order
//! (`updated_at`, then id), every version kept for the ground truth.
//!
//! Each record version is rendered to JSON once, so serving a page of 1000
//! records is a string concatenation.
//!
//! Records can be deleted ([`Dataset::delete`]): they leave `records` and
//! every endpoint, but their versions stay in the truth's `versions` (the
//! history of what was served) and their ids are listed in `deleted`.
//! Each record's comments (see `comments`) are not stored: they are made on
//! request from its id, its creation time and the times of its updates.

use std::collections::{BTreeMap, HashMap};
use std::ops::Bound;
use std::sync::Arc;

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};

/// 2024-01-01T00:00:00Z: record i of the initial dataset has updated_at = this + i s.
pub const BASE_TIME: i64 = 1_704_067_200;

/// A place in change order: after the record with this (updated_at, id).
pub type Pos = (i64, String);

#[derive(Clone)]
pub struct Rec {
    pub id: String,
    pub updated_at: i64,
    /// The first version's `updated_at`.
    pub created_at: i64,
    pub json: Arc<str>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Hash)]
pub struct TruthRecord {
    pub id: String,
    pub updated_at: String,
}

/// Every current record (creation order) and every version ever (change order).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Truth {
    /// The current records, in creation (id) order; deleted ones are not here.
    pub records: Vec<TruthRecord>,
    /// Every version ever served, in change order, deleted records' included
    /// (deleting a record does not unsay what was served).
    pub versions: Vec<TruthRecord>,
    /// Ids of the deleted records, in the order they were deleted (omitted
    /// from the JSON while empty).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deleted: Vec<String>,
}

/// A record as the parent of comments: what its comments are made from.
#[derive(Debug, Clone, Copy)]
pub struct Parent<'a> {
    pub id: &'a str,
    pub created_at: i64,
    /// `updated_at` of each update after the first version, oldest first.
    pub updates: &'a [i64],
}

pub struct Dataset {
    by_id: BTreeMap<String, Rec>,
    by_change: BTreeMap<Pos, Rec>,
    versions: Vec<(i64, String)>,
    /// Per updated record: the time of each of its updates, oldest first
    /// (records never updated have no entry, so 100,000 records cost nothing).
    updates: HashMap<String, Vec<i64>>,
    /// Ids deleted so far, in order.
    deleted: Vec<String>,
    next_seq: u64,
    last_updated: i64,
    rng: u64,
    /// Records updated in the current cycle.
    updated: std::collections::HashSet<u64>,
    seed: u64,
    record_bytes: usize,
    /// A tenant's dataset tags every record with `"tenant":"{name}"`.
    tenant: Option<String>,
}

pub fn id_of(seq: u64) -> String {
    format!("00000000-0000-0000-0000-{seq:012}")
}

pub fn rfc3339(t: i64) -> String {
    DateTime::<Utc>::from_timestamp(t, 0)
        .unwrap_or_default()
        .to_rfc3339_opts(SecondsFormat::Secs, true)
}

fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Dataset {
    pub fn new(records: usize, seed: u64, record_bytes: usize) -> Self {
        Self::build(records, seed, record_bytes, None)
    }

    /// A tenant's dataset: like [`Dataset::new`], and every record also
    /// carries `"tenant":"{tenant}"` after its `updated_at`.
    pub fn for_tenant(records: usize, seed: u64, record_bytes: usize, tenant: &str) -> Self {
        Self::build(records, seed, record_bytes, Some(tenant.to_string()))
    }

    fn build(records: usize, seed: u64, record_bytes: usize, tenant: Option<String>) -> Self {
        let mut d = Dataset {
            by_id: BTreeMap::new(),
            by_change: BTreeMap::new(),
            versions: Vec::with_capacity(records),
            updates: HashMap::new(),
            deleted: Vec::new(),
            next_seq: 1,
            last_updated: BASE_TIME - 1,
            rng: seed,
            updated: std::collections::HashSet::new(),
            seed,
            record_bytes,
            tenant,
        };
        for i in 0..records {
            d.put(d.next_seq, BASE_TIME + i as i64);
            d.next_seq += 1;
        }
        d.last_updated = BASE_TIME + records as i64 - 1;
        d
    }

    fn render(&self, seq: u64, updated_at: i64) -> String {
        let tenant = match &self.tenant {
            Some(t) => format!(
                r#","tenant":{}"#,
                serde_json::to_string(t).unwrap_or_else(|_| "\"\"".into())
            ),
            None => String::new(),
        };
        let head = format!(
            r#"{{"id":"{}","updated_at":"{}"{tenant},"seq":{seq},"name":"record {seq}","payload":""#,
            id_of(seq),
            rfc3339(updated_at)
        );
        let pad = self.record_bytes.saturating_sub(head.len() + 2);
        let mut s = String::with_capacity(head.len() + pad + 2);
        s.push_str(&head);
        let mut r = self.seed ^ seq.wrapping_mul(0x2545_F491_4F6C_DD1D) ^ (updated_at as u64);
        for _ in 0..pad {
            s.push((b'a' + (splitmix(&mut r) % 26) as u8) as char);
        }
        s.push_str("\"}");
        s
    }

    fn put(&mut self, seq: u64, updated_at: i64) {
        let id = id_of(seq);
        let created_at = self.by_id.get(&id).map_or(updated_at, |r| r.created_at);
        let rec = Rec {
            id: id.clone(),
            updated_at,
            created_at,
            json: self.render(seq, updated_at).into(),
        };
        if let Some(old) = self.by_id.insert(id.clone(), rec.clone()) {
            self.by_change.remove(&(old.updated_at, old.id));
            self.updates.entry(id.clone()).or_default().push(updated_at);
        }
        self.by_change.insert((updated_at, id.clone()), rec);
        self.versions.push((updated_at, id));
    }

    fn next_version_time(&mut self) -> i64 {
        let t = Utc::now().timestamp().max(self.last_updated + 1);
        self.last_updated = t;
        t
    }

    pub fn insert(&mut self, n: usize) {
        for _ in 0..n {
            let t = self.next_version_time();
            let seq = self.next_seq;
            self.next_seq += 1;
            self.put(seq, t);
        }
    }

    /// Update `n` records chosen at random, each at most once until every
    /// record has been updated (so tests can expect to see every version:
    /// an API only ever serves the current one). Deleted records are never
    /// chosen (nor brought back).
    pub fn update(&mut self, n: usize) {
        let count = self.next_seq - 1;
        if count == 0 || self.by_id.is_empty() {
            return;
        }
        for _ in 0..n {
            if self.updated.len() >= self.by_id.len() {
                self.updated.clear();
            }
            let mut seq = 1 + splitmix(&mut self.rng) % count;
            // Without deletions every seq is live and this is the plain probe.
            while !self.by_id.contains_key(&id_of(seq)) || !self.updated.insert(seq) {
                seq = seq % count + 1;
            }
            let t = self.next_version_time();
            self.put(seq, t);
        }
    }

    /// Delete the `n` oldest records (lowest ids; all of them if fewer):
    /// they leave every endpoint, and their comments answer 404. Returns
    /// their ids.
    pub fn delete(&mut self, n: usize) -> Vec<String> {
        let gone: Vec<String> = self.by_id.keys().take(n).cloned().collect();
        for id in &gone {
            if let Some(old) = self.by_id.remove(id) {
                self.by_change.remove(&(old.updated_at, old.id));
            }
            self.updates.remove(id);
            if let Some(seq) = id.rsplit('-').next().and_then(|s| s.parse::<u64>().ok()) {
                self.updated.remove(&seq);
            }
        }
        self.deleted.extend(gone.iter().cloned());
        gone
    }

    /// The tenant this dataset belongs to, if any.
    pub fn tenant(&self) -> Option<&str> {
        self.tenant.as_deref()
    }

    /// The current record `id` as a parent of comments, if it exists.
    pub fn parent(&self, id: &str) -> Option<Parent<'_>> {
        self.by_id.get(id).map(|r| self.parent_of(r))
    }

    /// Every current record as a parent, in id order.
    pub fn parents(&self) -> impl Iterator<Item = Parent<'_>> {
        self.by_id.values().map(|r| self.parent_of(r))
    }

    fn parent_of<'a>(&'a self, r: &'a Rec) -> Parent<'a> {
        Parent {
            id: &r.id,
            created_at: r.created_at,
            updates: self.updates.get(&r.id).map_or(&[], Vec::as_slice),
        }
    }

    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    /// Up to `limit` records after `after` in change order with updated_at in
    /// [`min`, `max`); the bool says whether more such records follow.
    pub fn changes(
        &self,
        after: Option<&Pos>,
        min: Option<i64>,
        max: Option<i64>,
        limit: usize,
    ) -> (Vec<Rec>, bool) {
        let start_bound = match (after, min) {
            (Some(a), Some(m)) if a.0 < m => Bound::Included((m, String::new())),
            (Some(a), _) => Bound::Excluded(a.clone()),
            (None, Some(m)) => Bound::Included((m, String::new())),
            (None, None) => Bound::Unbounded,
        };
        let mut it = self
            .by_change
            .range((start_bound, Bound::Unbounded))
            .map(|(_, r)| r)
            .take_while(|r| max.is_none_or(|m| r.updated_at < m));
        let page: Vec<Rec> = it.by_ref().take(limit).cloned().collect();
        let more = it.next().is_some();
        (page, more)
    }

    /// Up to `limit` records with id > `after` in creation order.
    pub fn created_after(&self, after: Option<&str>, limit: usize) -> (Vec<Rec>, bool) {
        let bound = match after {
            Some(a) => Bound::Excluded(a.to_string()),
            None => Bound::Unbounded,
        };
        let mut it = self.by_id.range((bound, Bound::Unbounded)).map(|(_, r)| r);
        let page: Vec<Rec> = it.by_ref().take(limit).cloned().collect();
        let more = it.next().is_some();
        (page, more)
    }

    /// Records `offset..offset+limit` in creation order, and the total.
    pub fn slice(&self, offset: usize, limit: usize) -> (Vec<Rec>, usize) {
        (
            self.by_id
                .values()
                .skip(offset)
                .take(limit)
                .cloned()
                .collect(),
            self.by_id.len(),
        )
    }

    /// Records with updated_at >= since in change order: page `page` (1-based) and the total.
    pub fn changed_since_page(
        &self,
        since: Option<i64>,
        page: usize,
        limit: usize,
    ) -> (Vec<Rec>, usize) {
        let it = self.by_change.range((
            since.map_or(Bound::Unbounded, |s| Bound::Included((s, String::new()))),
            Bound::Unbounded,
        ));
        let all: Vec<&Rec> = it.map(|(_, r)| r).collect();
        let total = all.len();
        let skip = page.saturating_sub(1).saturating_mul(limit);
        (
            all.into_iter().skip(skip).take(limit).cloned().collect(),
            total,
        )
    }

    pub fn truth(&self) -> Truth {
        let t = |(u, id): &(i64, String)| TruthRecord {
            id: id.clone(),
            updated_at: rfc3339(*u),
        };
        let mut versions: Vec<(i64, String)> = self.versions.clone();
        versions.sort();
        Truth {
            records: self
                .by_id
                .values()
                .map(|r| t(&(r.updated_at, r.id.clone())))
                .collect(),
            versions: versions.iter().map(t).collect(),
            deleted: self.deleted.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_are_deterministic_and_sized() {
        let a = Dataset::new(10, 7, 330);
        let b = Dataset::new(10, 7, 330);
        let (pa, _) = a.created_after(None, 10);
        let (pb, _) = b.created_after(None, 10);
        assert_eq!(
            pa.iter().map(|r| r.json.clone()).collect::<Vec<_>>(),
            pb.iter().map(|r| r.json.clone()).collect::<Vec<_>>()
        );
        for r in &pa {
            assert!((320..=340).contains(&r.json.len()), "{}", r.json.len());
            let v: serde_json::Value = serde_json::from_str(&r.json).unwrap();
            assert_eq!(v["id"], r.id.as_str());
        }
    }

    #[test]
    fn updates_move_records_to_the_end_of_change_order() {
        let mut d = Dataset::new(5, 1, 100);
        d.update(1);
        d.insert(1);
        let (all, more) = d.changes(None, None, None, 100);
        assert!(!more);
        assert_eq!(all.len(), 6);
        assert!(
            all.windows(2)
                .all(|w| (w[0].updated_at, &w[0].id) < (w[1].updated_at, &w[1].id))
        );
        assert_eq!(d.truth().versions.len(), 7);
        assert_eq!(all.last().unwrap().id, id_of(6));
    }

    #[test]
    fn deleted_records_leave_every_view_and_are_never_updated() {
        let mut d = Dataset::new(6, 3, 100);
        let gone = d.delete(2);
        assert_eq!(gone, [id_of(1), id_of(2)]);
        assert!(d.parent(&id_of(1)).is_none());
        assert_eq!(d.len(), 4);
        let (all, _) = d.changes(None, None, None, 100);
        assert_eq!(all.len(), 4);
        // Every live record is updated once before any twice; none comes back.
        d.update(8);
        assert_eq!(d.len(), 4);
        for p in d.parents() {
            assert_eq!(p.updates.len(), 2, "{}", p.id);
            assert!(p.updates.iter().all(|&u| u > p.created_at));
        }
        let t = d.truth();
        assert_eq!(t.records.len(), 4);
        assert_eq!(t.deleted, gone);
        assert_eq!(
            t.versions.len(),
            6 + 8,
            "history keeps deleted records' versions"
        );
        assert_eq!(d.delete(10).len(), 4);
        d.update(3);
        assert!(d.is_empty());
    }
}
