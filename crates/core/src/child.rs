//! Parent and child feeds: a child feed has one job per record of its
//! parent feed, run when that record is new or changed.
//!
//! When a parent page commits, each of its records gives each child feed a
//! [`Trigger`]: the child job (its partition id is the parent record's key,
//! [`child_partition`]), the record's version ([`parent_version`]) and the
//! values the child's `{name}` templates take ([`read_vars`]). The stores
//! apply the triggers in the parent's commit, atomically with its cursor
//! ([`Trigger::apply`]). A worker running a child job fills its templates
//! with [`fill`].

use std::collections::BTreeMap;

use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::checkpoint::{BatchTriggers, JobId, Trigger};
use crate::config::{FeedConfig, ParentConfig};
use crate::pointer::JsonPointer;
use crate::record::Identity;
use crate::tenant::{job_partition, split_job_partition};

/// What a path segment keeps unencoded: RFC 3986's unreserved characters.
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// The partition id of the child job of the record keyed `key`, read by the
/// parent job whose partition id is `parent_partition`:
/// `[<tenant>/][<parent partition>/]<key>`. The tenant comes along when the
/// parent is tenanted; the parent's partition when it is a partition value
/// (an account: keys may repeat across accounts), not a time window or the
/// single `all` (a record keeps its key across windows).
pub fn child_partition(
    parent: &FeedConfig,
    tenanted: bool,
    parent_partition: &str,
    key: &str,
) -> String {
    let (tenant, partition) = match tenanted.then(|| split_job_partition(parent_partition)) {
        Some(Some((t, p))) => (Some(t), p),
        _ => (None, parent_partition),
    };
    let by_value = parent
        .partitions
        .as_ref()
        .is_some_and(|p| p.values.is_some());
    let mut out = String::with_capacity(key.len() + 16);
    if let Some(t) = tenant {
        out.push_str(t);
        out.push('/');
    }
    if by_value {
        out.push_str(partition);
        out.push('/');
    }
    out.push_str(key);
    out
}

/// The parent key of a child job's partition id: what follows the tenant
/// and the parent partition (the `x-parent-key` of its records).
pub fn parent_key<'a>(parent: &FeedConfig, tenanted: bool, child_partition: &'a str) -> &'a str {
    let mut rest = child_partition;
    if tenanted && let Some((_, p)) = split_job_partition(rest) {
        rest = p;
    }
    let by_value = parent
        .partitions
        .as_ref()
        .is_some_and(|p| p.values.is_some());
    if by_value && let Some((_, k)) = rest.split_once('/') {
        rest = k;
    }
    rest
}

/// A parent record's version as its children remember it: the record's
/// `version` value, or (a feed without versions) a digest of its bytes, so
/// that only a changed record triggers its children either way.
pub fn parent_version(version: Option<&str>, record: &[u8]) -> String {
    match version {
        Some(v) => v.to_string(),
        None => format!("#{}", hex::encode(&Sha256::digest(record)[..12])),
    }
}

/// The values of a child's vars in one parent record: each pointer's
/// string, number or boolean as text. A var the record lacks (or holds
/// null, an array or an object) is left out; [`fill`] says so when the
/// child runs, so the child fails on its own, visibly, and the parent
/// moves on.
pub fn read_vars(record: &Value, vars: &BTreeMap<String, JsonPointer>) -> BTreeMap<String, String> {
    vars.iter()
        .filter_map(|(name, ptr)| {
            let text = match ptr.get(record)? {
                Value::String(s) => s.clone(),
                Value::Number(n) => n.to_string(),
                Value::Bool(b) => b.to_string(),
                _ => return None,
            };
            Some((name.clone(), text))
        })
        .collect()
}

/// What one committed parent page gives its child feeds: a trigger per
/// record and child feed, or for a batched child feed its records as
/// pending parents.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Triggers {
    pub jobs: Vec<Trigger>,
    pub batches: Vec<BatchTriggers>,
}

/// The partition id of batch slot `i` of a batched child feed (of `tenant`).
pub fn batch_slot(tenant: Option<&str>, i: u32) -> String {
    let slot = format!("batch-{i}");
    match tenant {
        Some(t) => job_partition(t, &slot),
        None => slot,
    }
}

/// The tenant (`""` for none) and index of a batch slot's partition id,
/// as [`batch_slot`] makes it (commit.lua reads it the same way).
pub fn split_batch_slot(partition: &str) -> Option<(&str, u32)> {
    let (tenant, slot) = partition.rsplit_once('/').unwrap_or(("", partition));
    Some((tenant, slot.strip_prefix("batch-")?.parse().ok()?))
}

/// A batched child record's parent key: the text at `ptr` in the record.
pub fn record_parent_key(record: &[u8], ptr: &JsonPointer) -> Option<String> {
    let v: Value = serde_json::from_slice(record).ok()?;
    match ptr.get(&v)? {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// The triggers of one committed parent page. `records` are the page's
/// record bytes with their identities.
pub fn triggers<'a>(
    parent: &FeedConfig,
    children: &[&FeedConfig],
    tenanted: bool,
    parent_partition: &str,
    records: impl Iterator<Item = (&'a [u8], &'a Identity)>,
) -> Result<Triggers, String> {
    let mut out = Triggers::default();
    if children.is_empty() {
        return Ok(out);
    }
    let tenant = tenanted
        .then(|| split_job_partition(parent_partition).map(|(t, _)| t))
        .flatten();
    for child in children {
        if let Some(b) = child.parent.as_ref().and_then(|l| l.batch.as_ref()) {
            out.batches.push(BatchTriggers {
                feed: child.name.clone(),
                tenant: tenant.map(str::to_string),
                size: u64::from(b.size),
                slots: (0..b.parallel)
                    .map(|i| JobId::new(&child.name, batch_slot(tenant, i)))
                    .collect(),
                parents: Vec::new(),
            });
        }
    }
    let plain: Vec<&FeedConfig> = children
        .iter()
        .copied()
        .filter(|c| c.parent.as_ref().is_some_and(|l| l.batch.is_none()))
        .collect();
    for (bytes, id) in records {
        let partition = child_partition(parent, tenanted, parent_partition, &id.key);
        let version = parent_version(id.version.as_deref(), bytes);
        for b in &mut out.batches {
            b.parents.push((partition.clone(), version.clone()));
        }
        if plain.is_empty() {
            continue;
        }
        let record: Value = serde_json::from_slice(bytes)
            .map_err(|e| format!("record {} is not JSON: {e}", id.key))?;
        for child in &plain {
            let Some(link) = &child.parent else { continue };
            out.jobs.push(Trigger {
                job: JobId::new(&child.name, &partition),
                version: version.clone(),
                vars: read_vars(&record, &link.vars),
            });
        }
    }
    Ok(out)
}

/// A batched child feed as one batch runs it: `{ids}` filled with the
/// parent keys joined by the separator (each key percent-encoded in the
/// path, as text in params).
pub fn fill_batch(feed: &FeedConfig, keys: &[&str]) -> FeedConfig {
    let Some(batch) = feed.parent.as_ref().and_then(|l| l.batch.as_ref()) else {
        return feed.clone();
    };
    let encoded: Vec<String> = keys
        .iter()
        .map(|k| utf8_percent_encode(k, SEGMENT).to_string())
        .collect();
    let in_path = encoded.join(&batch.separator);
    let in_params = keys.join(&batch.separator);
    let mut out = feed.clone();
    out.path = feed.path.replace("{ids}", &in_path);
    for v in out.params.values_mut() {
        *v = v.replace("{ids}", &in_params);
    }
    let mut ids = |s: &str| Ok(s.replace("{ids}", &in_params));
    if let Some(b) = out.body.as_mut() {
        // Infallible: the closure never fails.
        let _ = crate::config::map_strings(b, &mut ids);
    }
    if let Some(inc) = out.incremental.as_mut() {
        for v in inc.params.values_mut() {
            *v = v.replace("{ids}", &in_params);
        }
        if let Some(b) = inc.body.as_mut() {
            let _ = crate::config::map_strings(b, &mut ids);
        }
    }
    out
}

/// The child feed `feed` as one child job runs it: its `{name}` templates
/// filled in from `vars`, percent-encoded in the path and as text in the
/// params. A braced name that is not one of the feed's vars stays literal.
pub fn fill(feed: &FeedConfig, vars: &BTreeMap<String, String>) -> Result<FeedConfig, String> {
    let Some(link) = &feed.parent else {
        return Ok(feed.clone());
    };
    let mut out = feed.clone();
    out.path = substitute(&feed.path, link, vars, true)?;
    for v in out.params.values_mut() {
        *v = substitute(v, link, vars, false)?;
    }
    let mut text = |s: &str| substitute(s, link, vars, false);
    if let Some(b) = out.body.as_mut() {
        crate::config::map_strings(b, &mut text)?;
    }
    if let Some(inc) = out.incremental.as_mut() {
        for v in inc.params.values_mut() {
            *v = substitute(v, link, vars, false)?;
        }
        if let Some(b) = inc.body.as_mut() {
            crate::config::map_strings(b, &mut text)?;
        }
    }
    Ok(out)
}

/// The names of `link`'s vars that `text` uses.
pub fn used<'a>(text: &str, link: &'a ParentConfig) -> Vec<&'a str> {
    link.vars
        .keys()
        .filter(|name| text.contains(&format!("{{{name}}}")))
        .map(String::as_str)
        .collect()
}

fn substitute(
    text: &str,
    link: &ParentConfig,
    vars: &BTreeMap<String, String>,
    encode: bool,
) -> Result<String, String> {
    let mut out = text.to_string();
    for name in used(text, link) {
        let Some(value) = vars.get(name) else {
            return Err(format!(
                "the parent record has no value for {{{name}}} (a string or number at {})",
                link.vars[name]
            ));
        };
        let value = if encode {
            utf8_percent_encode(value, SEGMENT).to_string()
        } else {
            value.clone()
        };
        out = out.replace(&format!("{{{name}}}"), &value);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::load_str;

    fn config(parent_partitions: &str) -> crate::config::Config {
        load_str(
            "test.yaml",
            &format!(
                r#"
sources:
  api: {{ base_url: "http://api.test" }}
feeds:
  - name: tickets
    source: api
    path: /tickets
    pagination: {{ next_url: /next }}
    records: /tickets
    key: /id
    version: /updated_at
    {parent_partitions}
  - name: comments
    source: api
    parent: {{ feed: tickets, vars: {{ ticket_id: /id, org: /org/name }} }}
    path: /tickets/{{ticket_id}}/comments
    params: {{ org: "{{org}}", literal: "{{other}}" }}
    pagination: {{ next_url: /next }}
    records: /comments
    key: /id
    mode: snapshot
"#
            ),
        )
        .unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn a_child_job_is_keyed_by_its_parent_record_and_its_tenant() {
        let c = config("");
        let tickets = c.feed("tickets").unwrap();
        assert_eq!(child_partition(tickets, false, "all", "17"), "17");
        assert_eq!(child_partition(tickets, true, "acme/all", "17"), "acme/17");
        assert_eq!(parent_key(tickets, true, "acme/17"), "17");
        let c = config("partitions: { param: account, values: [a, b] }");
        let tickets = c.feed("tickets").unwrap();
        assert_eq!(child_partition(tickets, false, "a", "17"), "a/17");
        assert_eq!(
            child_partition(tickets, true, "acme/b", "1/7"),
            "acme/b/1/7"
        );
        assert_eq!(parent_key(tickets, true, "acme/b/1/7"), "1/7");
    }

    #[test]
    fn batch_slots_name_their_tenant_and_index() {
        assert_eq!(split_batch_slot(&batch_slot(None, 3)), Some(("", 3)));
        assert_eq!(
            split_batch_slot(&batch_slot(Some("acme"), 0)),
            Some(("acme", 0))
        );
        assert_eq!(split_batch_slot("acme/17"), None);
    }

    #[test]
    fn a_version_or_else_the_bytes_decide_what_changed() {
        assert_eq!(parent_version(Some("2024"), b"{}"), "2024");
        let a = parent_version(None, br#"{"id":1,"x":1}"#);
        assert_ne!(a, parent_version(None, br#"{"id":1,"x":2}"#));
        assert_eq!(a, parent_version(None, br#"{"id":1,"x":1}"#));
    }

    #[test]
    fn templates_are_filled_from_the_parent_record() {
        let c = config("");
        let comments = c.feed("comments").unwrap();
        let record: Value =
            serde_json::from_str(r#"{"id": "a/b c", "org": {"name": "x&y"}}"#).unwrap();
        let vars = read_vars(&record, &comments.parent.as_ref().unwrap().vars);
        let filled = fill(comments, &vars).unwrap();
        assert_eq!(filled.path, "/tickets/a%2Fb%20c/comments");
        assert_eq!(filled.params["org"], "x&y");
        assert_eq!(filled.params["literal"], "{other}");
        let record: Value = serde_json::from_str(r#"{"id": 5}"#).unwrap();
        let vars = read_vars(&record, &comments.parent.as_ref().unwrap().vars);
        assert_eq!(vars.len(), 1);
        let err = fill(comments, &vars).unwrap_err();
        assert!(err.contains("{org}") && err.contains("/org/name"), "{err}");
    }

    #[test]
    fn every_record_triggers_every_child_feed() {
        let c = config("");
        let tickets = c.feed("tickets").unwrap();
        let children: Vec<&FeedConfig> = c.children_of("tickets").collect();
        let recs = [
            br#"{"id":1,"updated_at":"u1","org":{"name":"o"}}"#.as_slice(),
            br#"{"id":2,"updated_at":"u2","org":{"name":"o"}}"#.as_slice(),
        ];
        let ids = [
            Identity {
                key: "1".into(),
                version: Some("u1".into()),
            },
            Identity {
                key: "2".into(),
                version: Some("u2".into()),
            },
        ];
        let t = triggers(
            tickets,
            &children,
            false,
            "all",
            recs.iter().copied().zip(ids.iter()),
        )
        .unwrap();
        assert!(t.batches.is_empty());
        let t = t.jobs;
        assert_eq!(t.len(), 2);
        assert_eq!(t[1].job, JobId::new("comments", "2"));
        assert_eq!(t[1].version, "u2");
        assert_eq!(t[1].vars["ticket_id"], "2");
    }
}
