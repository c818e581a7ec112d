//! Tenants: many accounts on one port. A data request to `/t/{tenant}/<rest>`
//! is served from that tenant's own dataset through the endpoint `<rest>`,
//! and must carry `Authorization: Bearer tok-{tenant}`. Each tenant's dataset
//! is created on first use, deterministically from the mock's seed and the
//! tenant's name; a tenant can be revoked (401) or throttled (429).

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::dataset::Dataset;

/// The path prefix of tenant requests: `/t/{tenant}/...`.
pub const TENANT_PREFIX: &str = "/t/";

/// Whether `name` is a tenant name: `[a-z0-9_-]{1,63}`.
pub fn is_tenant_name(name: &str) -> bool {
    (1..=63).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

/// The only bearer token `tenant`'s requests are served with: `tok-{tenant}`.
pub fn tenant_token(tenant: &str) -> String {
    format!("tok-{tenant}")
}

/// FNV-1a over the name: stable across runs, platforms and versions.
pub(crate) fn stable_hash(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Where a data path goes.
pub(crate) enum Route<'a> {
    /// Not under `/t/`: the main dataset.
    Main,
    /// `/t/{tenant}<rest>`, `rest` starting with `/`.
    Tenant { name: &'a str, rest: &'a str },
    /// Under `/t/` but the segment after it is not a tenant name.
    BadName(&'a str),
}

pub(crate) fn route(path: &str) -> Route<'_> {
    let Some(after) = path.strip_prefix(TENANT_PREFIX) else {
        return Route::Main;
    };
    let (name, rest) = match after.find('/') {
        Some(i) => (&after[..i], &after[i..]),
        None => (after, "/"),
    };
    if is_tenant_name(name) {
        Route::Tenant { name, rest }
    } else {
        Route::BadName(name)
    }
}

/// One tenant's data and switches.
pub(crate) struct Tenant {
    pub data: Mutex<Dataset>,
    revoked: AtomicBool,
    throttled_until: Mutex<Option<Instant>>,
}

/// Why a tenant request is refused before it reaches the endpoint.
pub(crate) enum Refusal {
    /// 401 `invalid_token`, with a description.
    Unauthorized(String),
    /// 429 `rate_limited`, with the whole seconds left (at least 1).
    Throttled(u64),
}

impl Tenant {
    pub fn new(name: &str, records: usize, seed: u64, record_bytes: usize) -> Self {
        Tenant {
            data: Mutex::new(Dataset::for_tenant(
                records,
                seed ^ stable_hash(name),
                record_bytes,
                name,
            )),
            revoked: AtomicBool::new(false),
            throttled_until: Mutex::new(None),
        }
    }

    pub fn set_revoked(&self, revoked: bool) {
        self.revoked.store(revoked, Ordering::SeqCst);
    }

    /// Throttle for `d` from now; zero lifts the throttle.
    pub fn throttle(&self, d: Duration) {
        let until = (!d.is_zero()).then(|| Instant::now() + d);
        *self
            .throttled_until
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = until;
    }

    /// Check a request's `Authorization` header value, then the throttle.
    pub fn admit(&self, name: &str, authorization: Option<&str>) -> Result<(), Refusal> {
        match authorization.and_then(|v| v.strip_prefix("Bearer ")) {
            None => {
                return Err(Refusal::Unauthorized(format!(
                    "tenant {name} needs Authorization: Bearer tok-{name}"
                )));
            }
            Some(t) if t != tenant_token(name) => {
                return Err(Refusal::Unauthorized(format!(
                    "this token is not tenant {name}'s"
                )));
            }
            Some(_) => {}
        }
        if self.revoked.load(Ordering::SeqCst) {
            return Err(Refusal::Unauthorized(format!(
                "tenant {name}'s token has been revoked"
            )));
        }
        let until = *self
            .throttled_until
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(left) = until.and_then(|u| u.checked_duration_since(Instant::now()))
            && !left.is_zero()
        {
            let secs = u64::try_from(left.as_millis().div_ceil(1000)).unwrap_or(u64::MAX);
            return Err(Refusal::Throttled(secs.max(1)));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_routes() {
        assert!(is_tenant_name("acme"));
        assert!(is_tenant_name("a-b_9"));
        assert!(is_tenant_name(&"x".repeat(63)));
        assert!(!is_tenant_name(&"x".repeat(64)));
        assert!(!is_tenant_name(""));
        assert!(!is_tenant_name("Acme"));
        assert!(!is_tenant_name("a.b"));
        assert!(matches!(route("/items"), Route::Main));
        assert!(matches!(
            route("/t/acme/items"),
            Route::Tenant {
                name: "acme",
                rest: "/items"
            }
        ));
        assert!(matches!(
            route("/t/acme"),
            Route::Tenant {
                name: "acme",
                rest: "/"
            }
        ));
        assert!(matches!(route("/t/A%20/items"), Route::BadName("A%20")));
        assert!(matches!(route("/t//items"), Route::BadName("")));
    }

    #[test]
    fn the_hash_is_stable_and_tells_names_apart() {
        assert_eq!(stable_hash(""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(stable_hash("a"), 0xaf63_dc4c_8601_ec8c);
        assert_ne!(stable_hash("acme"), stable_hash("globex"));
    }

    #[test]
    fn admission() {
        let t = Tenant::new("acme", 2, 1, 100);
        assert!(t.admit("acme", Some("Bearer tok-acme")).is_ok());
        assert!(matches!(
            t.admit("acme", None),
            Err(Refusal::Unauthorized(_))
        ));
        assert!(matches!(
            t.admit("acme", Some("Bearer tok-globex")),
            Err(Refusal::Unauthorized(_))
        ));
        assert!(matches!(
            t.admit("acme", Some("tok-acme")),
            Err(Refusal::Unauthorized(_))
        ));
        t.throttle(Duration::from_millis(1500));
        assert!(matches!(
            t.admit("acme", Some("Bearer tok-acme")),
            Err(Refusal::Throttled(2))
        ));
        t.set_revoked(true);
        assert!(matches!(
            t.admit("acme", Some("Bearer tok-acme")),
            Err(Refusal::Unauthorized(_))
        ));
        t.set_revoked(false);
        t.throttle(Duration::ZERO);
        assert!(t.admit("acme", Some("Bearer tok-acme")).is_ok());
    }
}
