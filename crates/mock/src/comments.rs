//! Child records: each ticket's comments, for parent→child feeds.
//!
//! `GET /api/v2/tickets/{id}/comments` serves the comments of one ticket and
//! `GET /api/v2/comments?ticket_ids=a,b,…` those of up to 100 tickets, both
//! paginated like Zendesk's cursor pagination:
//! `?page[size]=N&page[after]=CURSOR` →
//! `{"comments":[…],"meta":{"has_more":bool,"after_cursor":"…"},"links":{"next":"<url>"|null}}`.
//!
//! Comments are never stored: a ticket's comments are made on request from
//! its id, its creation time and the times of its updates, so 100,000
//! tickets cost no more than their own records. A ticket has
//! [`CommentsConfig::base_count`] comments from its creation (stamped with
//! the ticket's creation time) plus one more per update of the ticket
//! (stamped with that update's time): an unchanged ticket keeps exactly the
//! same comments, an updated one gains exactly one per update. Comment `n`
//! (1-based, in creation order) has id `{ticket id}-c{n}`.

use serde::{Deserialize, Serialize};

use crate::cursor;
use crate::dataset::{Dataset, Parent, Pos, rfc3339};
use crate::endpoints::{ApiError, Ctx, Query, Reply};
use crate::tenants::stable_hash;

/// The path of the batch endpoint.
pub(crate) const BATCH_PATH: &str = "/api/v2/comments";
/// At most this many ids in one batch request.
pub(crate) const MAX_BATCH_IDS: usize = 100;

const TICKETS_PREFIX: &str = "/api/v2/tickets/";
const COMMENTS_SUFFIX: &str = "/comments";

/// How many comments tickets have and how they are paged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommentsConfig {
    /// `page[size]` when a request names none (at least 1).
    pub page_size: usize,
    /// The most comments a ticket has from its creation (updates add one
    /// each on top).
    pub max_per_ticket: usize,
    /// Every ticket has exactly this many comments from its creation
    /// (instead of the spread; `max_per_ticket` does not apply), plus one
    /// per update. `Some(10)` with `page_size` 5: exactly 2 pages each.
    pub fixed_per_ticket: Option<usize>,
}

impl Default for CommentsConfig {
    fn default() -> Self {
        Self {
            page_size: 5,
            max_per_ticket: 25,
            fixed_per_ticket: None,
        }
    }
}

impl CommentsConfig {
    /// The comments ticket `id` has from its creation. Unless
    /// `fixed_per_ticket` is set, a stable hash of the id picks one of four
    /// sizes, about a quarter of tickets each (P = `page_size`,
    /// M = `max_per_ticket`): 0; 1..=P (one page); P+1..=2P (two pages);
    /// max(2P+1, M-P+1)..=M (many: 21..=25, five pages, at the defaults).
    /// Every size is capped at M. Tenants' tickets with the same id have the
    /// same count.
    pub fn base_count(&self, id: &str) -> usize {
        if let Some(n) = self.fixed_per_ticket {
            return n;
        }
        let p = self.page_size.max(1);
        let m = self.max_per_ticket;
        let h = mix(stable_hash(id));
        let r = usize::try_from(h >> 8).unwrap_or(0);
        let n = match h % 4 {
            0 => 0,
            1 => 1 + r % p,
            2 => p + 1 + r % p,
            _ => {
                let lo = (2 * p + 1).max((m + 1).saturating_sub(p));
                let hi = m.max(lo);
                lo + r % (hi - lo + 1)
            }
        };
        n.min(m)
    }

    /// The comments a ticket with `id` has after `updates` updates.
    pub fn count(&self, id: &str, updates: usize) -> usize {
        self.base_count(id) + updates
    }
}

/// The splitmix64 finalizer: spreads FNV's poorly mixed low bits.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// One comment in the ground truth.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CommentTruth {
    pub ticket_id: String,
    /// `{ticket_id}-c{n}`, n from 1.
    pub id: String,
    pub updated_at: String,
}

/// Every comment of every current ticket: tickets in id order, each
/// ticket's comments in order (what `GET /_truth/comments` answers).
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct CommentsTruth {
    pub comments: Vec<CommentTruth>,
}

/// The truth of `ds`'s comments.
pub(crate) fn truth(ds: &Dataset, cfg: &CommentsConfig) -> CommentsTruth {
    let mut comments = Vec::new();
    for p in ds.parents() {
        let base = cfg.base_count(p.id);
        for n in 1..=base + p.updates.len() {
            comments.push(CommentTruth {
                ticket_id: p.id.to_string(),
                id: comment_id(p.id, n),
                updated_at: rfc3339(time_of(&p, base, n)),
            });
        }
    }
    CommentsTruth { comments }
}

fn comment_id(ticket: &str, n: usize) -> String {
    format!("{ticket}-c{n}")
}

/// When comment `n` was made: the ticket's creation for the first `base`,
/// then the time of the update that added it.
fn time_of(p: &Parent, base: usize, n: usize) -> i64 {
    n.checked_sub(base + 1)
        .and_then(|k| p.updates.get(k).copied())
        .unwrap_or(p.created_at)
}

fn js(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into())
}

/// Append comment `n` of `p` to `out` as JSON.
fn render(out: &mut String, p: &Parent, base: usize, n: usize, tenant: Option<&str>) {
    let t = rfc3339(time_of(p, base, n));
    let tenant = tenant
        .map(|t| format!(r#","tenant":{}"#, js(t)))
        .unwrap_or_default();
    let body = match n.checked_sub(base) {
        Some(k) if k > 0 => format!("comment {n} on ticket {}, added by update {k}", p.id),
        _ => format!("comment {n} on ticket {}", p.id),
    };
    out.push_str(&format!(
        r#"{{"id":{},"ticket_id":{},"created_at":"{t}","updated_at":"{t}"{tenant},"body":{}}}"#,
        js(&comment_id(p.id, n)),
        js(p.id),
        js(&body)
    ));
}

/// The ticket id of a per-ticket comments path `/api/v2/tickets/{id}/comments`.
pub(crate) fn ticket_of_path(path: &str) -> Option<&str> {
    path.strip_prefix(TICKETS_PREFIX)?
        .strip_suffix(COMMENTS_SUFFIX)
        .filter(|id| !id.is_empty() && !id.contains('/'))
}

/// Whether `path` (without a tenant prefix) is one of the comments endpoints.
pub(crate) fn is_comments_path(path: &str) -> bool {
    path == BATCH_PATH || ticket_of_path(path).is_some()
}

fn bad(description: impl Into<String>) -> ApiError {
    ApiError::new(400, "invalid_request", description)
}

fn page_size(q: &Query, ctx: &Ctx) -> Result<usize, ApiError> {
    let n = match q.get("page[size]").filter(|v| !v.is_empty()) {
        None => ctx.comments.page_size.max(1),
        Some(v) => v
            .parse::<usize>()
            .map_err(|_| bad(format!("page[size] must be a number, got {v:?}")))?,
    };
    if n == 0 {
        return Err(bad("page[size] must be at least 1"));
    }
    Ok(n.min(ctx.max_page_size))
}

/// `page[after]`, decoded: the (comment number, ticket id) it follows;
/// None for no cursor or a cursor from the start.
fn after(q: &Query, ctx: &Ctx) -> Result<Option<(usize, String)>, ApiError> {
    let Some(c) = q.get("page[after]").filter(|c| !c.is_empty()) else {
        return Ok(None);
    };
    let d = cursor::decode(c).ok_or_else(|| bad("page[after] is not a valid cursor"))?;
    if let Some(ttl) = ctx.cursor_ttl_ms
        && cursor::now_ms() - d.iat_ms > ttl
    {
        return Err(ApiError::new(
            400,
            "cursor_expired",
            "the cursor has expired; start again",
        ));
    }
    match d.after {
        None => Ok(None),
        Some((n, id)) => usize::try_from(n)
            .map(|n| Some((n, id)))
            .map_err(|_| bad("page[after] is not a valid cursor")),
    }
}

fn encode(pos: Option<&(usize, String)>) -> String {
    let pos: Option<Pos> = pos.map(|(n, id)| (i64::try_from(*n).unwrap_or(i64::MAX), id.clone()));
    cursor::encode(pos.as_ref())
}

fn next_url(ctx: &Ctx, path: &str, ticket_ids: Option<&str>, size: usize, c: &str) -> String {
    let mut q = url::form_urlencoded::Serializer::new(String::new());
    if let Some(ids) = ticket_ids {
        q.append_pair("ticket_ids", ids);
    }
    q.append_pair("page[size]", &size.to_string())
        .append_pair("page[after]", c);
    format!("{}{path}?{}", ctx.base, q.finish())
}

fn page_body(comments: &str, more: bool, after_cursor: &str, next: Option<String>) -> String {
    format!(
        r#"{{"comments":[{comments}],"meta":{{"has_more":{more},"after_cursor":{}}},"links":{{"next":{}}}}}"#,
        js(after_cursor),
        next.map_or_else(|| "null".to_string(), |u| js(&u))
    )
}

/// `GET /api/v2/tickets/{id}/comments`: one ticket's comments in order;
/// 404 if the ticket is not (or no longer) in the dataset.
pub(crate) fn ticket_comments(
    ds: &Dataset,
    id: &str,
    q: &Query,
    ctx: &Ctx,
) -> Result<Reply, ApiError> {
    let size = page_size(q, ctx)?;
    let start = match after(q, ctx)? {
        None => 0,
        Some((n, t)) if t == id => n,
        Some(_) => return Err(bad("page[after] is a cursor of another ticket")),
    };
    let p = ds
        .parent(id)
        .ok_or_else(|| ApiError::new(404, "not_found", format!("no ticket {id}")))?;
    let base = ctx.comments.base_count(id);
    let total = base + p.updates.len();
    let start = start.min(total);
    let end = start.saturating_add(size).min(total);
    let mut out = String::new();
    for n in start + 1..=end {
        if n > start + 1 {
            out.push(',');
        }
        render(&mut out, &p, base, n, ds.tenant());
    }
    let more = end < total;
    let c = encode(Some(&(end, id.to_string())));
    let next = more.then(|| {
        next_url(
            ctx,
            &format!("{TICKETS_PREFIX}{id}{COMMENTS_SUFFIX}"),
            None,
            size,
            &c,
        )
    });
    Ok(Reply {
        body: page_body(&out, more, &c, next),
        headers: vec![],
    })
}

/// `GET /api/v2/comments?ticket_ids=a,b,…`: the comments of up to 100
/// tickets, ticket by ticket in the order given (repeats dropped), each
/// ticket's in order; ids not in the dataset are skipped.
pub(crate) fn batch(ds: &Dataset, q: &Query, ctx: &Ctx) -> Result<Reply, ApiError> {
    let asked: Vec<&str> = q
        .get("ticket_ids")
        .map(String::as_str)
        .unwrap_or("")
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    if asked.len() > MAX_BATCH_IDS {
        return Err(bad(format!(
            "at most {MAX_BATCH_IDS} ticket_ids, got {}",
            asked.len()
        )));
    }
    let mut ids: Vec<&str> = Vec::with_capacity(asked.len());
    for id in asked {
        if !ids.contains(&id) {
            ids.push(id);
        }
    }
    if ids.is_empty() {
        return Err(bad(
            "ticket_ids is required: ticket ids separated by commas",
        ));
    }
    let size = page_size(q, ctx)?;
    let given_after = after(q, ctx)?;
    let (mut i, mut from) = match &given_after {
        None => (0, 0),
        Some((n, t)) => match ids.iter().position(|id| id == t) {
            Some(i) => (i, *n),
            None => return Err(bad("page[after] is a cursor of another ticket_ids list")),
        },
    };
    let mut out = String::new();
    let mut served = 0usize;
    let mut last = given_after.clone();
    let mut more = false;
    while i < ids.len() {
        if let Some(p) = ds.parent(ids[i]) {
            let base = ctx.comments.base_count(p.id);
            let total = base + p.updates.len();
            if from < total {
                if served == size {
                    more = true;
                    break;
                }
                let end = from.saturating_add(size - served).min(total);
                for n in from + 1..=end {
                    if served > 0 {
                        out.push(',');
                    }
                    render(&mut out, &p, base, n, ds.tenant());
                    served += 1;
                }
                last = Some((end, p.id.to_string()));
                from = end;
                continue;
            }
        }
        i += 1;
        from = 0;
    }
    let c = encode(last.as_ref());
    let next = more.then(|| next_url(ctx, BATCH_PATH, Some(&ids.join(",")), size, &c));
    Ok(Reply {
        body: page_body(&out, more, &c, next),
        headers: vec![],
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataset::id_of;

    #[test]
    fn forty_tickets_have_every_size() {
        let cfg = CommentsConfig::default();
        let counts: Vec<usize> = (1..=40).map(|i| cfg.base_count(&id_of(i))).collect();
        let pages = |n: usize| n.div_ceil(cfg.page_size);
        for want in [0, 1, 2, 5] {
            let k = counts.iter().filter(|&&n| pages(n) == want).count();
            assert!(k >= 5, "{want} pages: {k} of 40 ({counts:?})");
        }
        assert!(counts.iter().all(|&n| n <= cfg.max_per_ticket));
        assert_eq!(
            counts,
            (1..=40)
                .map(|i| cfg.base_count(&id_of(i)))
                .collect::<Vec<_>>()
        );
    }

    #[test]
    fn fixed_and_small_maxima() {
        let fixed = CommentsConfig {
            fixed_per_ticket: Some(10),
            ..CommentsConfig::default()
        };
        assert!((1..=50).all(|i| fixed.base_count(&id_of(i)) == 10));
        assert_eq!(fixed.count(&id_of(1), 2), 12);
        let small = CommentsConfig {
            max_per_ticket: 3,
            ..CommentsConfig::default()
        };
        assert!((1..=200).all(|i| small.base_count(&id_of(i)) <= 3));
    }

    #[test]
    fn paths() {
        assert_eq!(ticket_of_path("/api/v2/tickets/abc/comments"), Some("abc"));
        assert_eq!(ticket_of_path("/api/v2/tickets//comments"), None);
        assert_eq!(ticket_of_path("/api/v2/tickets/a/b/comments"), None);
        assert!(is_comments_path("/api/v2/comments"));
        assert!(!is_comments_path("/api/v2/comments/x"));
    }
}
