//! `AMQP_URL`: one broker URL, or a comma-separated list of a cluster's nodes.
//!
//! Grammar (entries are split at commas; blanks around an entry and empty
//! entries are ignored):
//!
//! ```text
//! list  = entry *( "," entry )
//! entry = full / short        ; the first entry must be full
//! full  = ( "amqp" / "amqps" ) "://" [ user [ ":" password ] "@" ] host [ ":" port ] [ "/" vhost ] [ "?" query ]
//! short = host [ ":" port ]   ; host may be an IPv6 literal in brackets
//! ```
//!
//! A full entry stands alone (its own scheme, credentials, vhost and
//! query). A short entry takes the scheme, user name, password, vhost and
//! query of the *first* entry and replaces its host and port; a short entry
//! without a port gets the scheme's default (5672, `amqps` 5671), as a full
//! URL without a port does. A comma inside a user name or password must be
//! percent-encoded (`%2C`): a list is split at every comma.
//!
//! Nothing here puts a password in a message: errors name entries by
//! position, and [`AmqpUrl`]'s `Debug` and [`Endpoint`]'s show `***`.

use std::fmt;
use std::time::Duration;

use rand::seq::SliceRandom;

use crate::BusError;

/// The value of `AMQP_URL` / `--amqp-url`: one URL or a list (module doc).
/// It reads as the raw `&str` where it is used; its `Debug` hides the
/// password of every entry. It has no `Display`, so it cannot be put in a
/// message by accident. Parsing it never fails (a flag parser would print
/// the value in its error): [`AmqpUrl::endpoints`] checks it.
#[derive(Clone, PartialEq, Eq)]
pub struct AmqpUrl(String);

impl AmqpUrl {
    pub fn new(url: impl Into<String>) -> Self {
        Self(url.into())
    }

    /// The endpoints of the list, in its order, or why it is not a list.
    pub fn endpoints(&self) -> Result<Vec<Endpoint>, BusError> {
        parse(&self.0)
    }

    /// The list with every entry's password replaced by `***` (an entry
    /// that does not parse shows as `<not a URL>` or `<not host:port>`).
    pub fn redacted(&self) -> String {
        entries(&self.0)
            .map(|e| {
                if e.contains("://") {
                    match url::Url::parse(e) {
                        Ok(u) => redact(u),
                        Err(_) => "<not a URL>".to_string(),
                    }
                } else if split_host_port(e).is_ok() {
                    e.to_string()
                } else {
                    "<not host:port>".to_string()
                }
            })
            .collect::<Vec<_>>()
            .join(",")
    }
}

impl std::ops::Deref for AmqpUrl {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl From<String> for AmqpUrl {
    fn from(s: String) -> Self {
        Self(s)
    }
}

impl From<&str> for AmqpUrl {
    fn from(s: &str) -> Self {
        Self(s.to_string())
    }
}

impl From<&String> for AmqpUrl {
    fn from(s: &String) -> Self {
        Self(s.clone())
    }
}

impl std::str::FromStr for AmqpUrl {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Self(s.to_string()))
    }
}

impl fmt::Debug for AmqpUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.redacted())
    }
}

/// One broker node of the list, as a complete URL.
#[derive(Clone, PartialEq, Eq)]
pub struct Endpoint {
    url: String,
    shown: String,
    timeout: Option<Duration>,
}

impl Endpoint {
    /// The complete URL, password included: only for connecting.
    pub fn url(&self) -> &str {
        &self.url
    }
    /// The URL with `***` for the password: for logs and messages.
    pub fn redacted(&self) -> &str {
        &self.shown
    }
    /// The URL's `connection_timeout` (milliseconds, as RabbitMQ's URI
    /// query parameters spell it), if it has one.
    pub fn connection_timeout(&self) -> Option<Duration> {
        self.timeout
    }
}

impl fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.shown)
    }
}

/// `endpoints` in a fresh random order, except that `last` (the node a
/// connection was just lost on), if it is one of several, goes last.
pub fn shuffled(endpoints: &[Endpoint], last: Option<&Endpoint>) -> Vec<Endpoint> {
    let mut order = endpoints.to_vec();
    order.shuffle(&mut rand::rng());
    if let Some(last) = last
        && order.len() > 1
        && let Some(i) = order.iter().position(|e| e == last)
    {
        let e = order.remove(i);
        order.push(e);
    }
    order
}

fn entries(list: &str) -> impl Iterator<Item = &str> {
    list.split(',').map(str::trim).filter(|e| !e.is_empty())
}

fn redact(mut u: url::Url) -> String {
    if u.password().is_some() {
        // Only fails for URLs that cannot have a password.
        let _ = u.set_password(Some("***"));
    }
    u.to_string()
}

const COMMA_HINT: &str = "a comma inside a user name or password must be written %2C";

fn parse(list: &str) -> Result<Vec<Endpoint>, BusError> {
    let bad = |i: usize, what: &str| {
        BusError::Url(format!(
            "entry {} of the AMQP URL list {what} ({COMMA_HINT})",
            i + 1
        ))
    };
    let mut first: Option<url::Url> = None;
    let mut out = Vec::new();
    for (i, entry) in entries(list).enumerate() {
        let u = if entry.contains("://") {
            let u = url::Url::parse(entry).map_err(|_| bad(i, "is not a URL"))?;
            if !matches!(u.scheme(), "amqp" | "amqps") {
                return Err(bad(i, "is not an amqp:// or amqps:// URL"));
            }
            if u.host_str().is_none_or(str::is_empty) {
                return Err(bad(i, "has no host"));
            }
            u
        } else {
            let Some(base) = &first else {
                return Err(bad(
                    i,
                    "must be a whole amqp:// or amqps:// URL (only later entries may be host:port)",
                ));
            };
            let (host, port) = split_host_port(entry)
                .map_err(|why| bad(i, &format!("is not host[:port]: {why}")))?;
            let mut u = base.clone();
            u.set_host(Some(host))
                .map_err(|_| bad(i, "is not host[:port]: not a host name"))?;
            u.set_port(port)
                .map_err(|_| bad(i, "is not host[:port]: not a port"))?;
            u
        };
        let timeout = u
            .query_pairs()
            .find(|(k, _)| k == "connection_timeout")
            .map(|(_, v)| {
                v.parse::<u64>().map(Duration::from_millis).map_err(|_| {
                    bad(
                        i,
                        "has a connection_timeout that is not a number of milliseconds",
                    )
                })
            })
            .transpose()?;
        if first.is_none() {
            first = Some(u.clone());
        }
        out.push(Endpoint {
            url: u.to_string(),
            shown: redact(u),
            timeout,
        });
    }
    if out.is_empty() {
        return Err(BusError::Url("the AMQP URL is empty".into()));
    }
    Ok(out)
}

/// `host[:port]` of a short entry; `[v6]` or `[v6]:port` for IPv6.
fn split_host_port(entry: &str) -> Result<(&str, Option<u16>), &'static str> {
    if entry
        .chars()
        .any(|c| c.is_whitespace() || matches!(c, '@' | '/' | '?' | '#' | '\\'))
    {
        return Err("only a host and a port may follow the first entry");
    }
    let (host, port) = if entry.starts_with('[') {
        let end = entry.find(']').ok_or("an IPv6 address without its ]")?;
        let (host, rest) = entry.split_at(end + 1);
        match rest {
            "" => (host, None),
            _ => match rest.strip_prefix(':') {
                Some(p) => (host, Some(p)),
                None => return Err("something other than :port after the IPv6 address"),
            },
        }
    } else {
        match entry.split_once(':') {
            None => (entry, None),
            Some((_, p)) if p.contains(':') => {
                return Err("an IPv6 address must be written in brackets");
            }
            Some((h, p)) => (h, Some(p)),
        }
    };
    if host.is_empty() || host == "[]" {
        return Err("no host");
    }
    let port = match port {
        None => None,
        Some(p) => match p.parse::<u16>() {
            Ok(n) if n > 0 => Some(n),
            _ => return Err("the port is not a number from 1 to 65535"),
        },
    };
    Ok((host, port))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn urls(list: &str) -> Vec<String> {
        AmqpUrl::new(list)
            .endpoints()
            .unwrap()
            .iter()
            .map(|e| e.url().to_string())
            .collect()
    }

    fn refused(list: &str) -> String {
        match AmqpUrl::new(list).endpoints() {
            Err(BusError::Url(why)) => why,
            other => panic!("{list}: {other:?}"),
        }
    }

    #[test]
    fn one_url_is_a_list_of_one() {
        assert_eq!(
            urls("amqp://guest:guest@127.0.0.1:5672/%2f"),
            ["amqp://guest:guest@127.0.0.1:5672/%2f"]
        );
        assert_eq!(urls("amqps://rabbit/"), ["amqps://rabbit/"]);
    }

    #[test]
    fn full_entries_stand_alone_and_short_ones_inherit_from_the_first() {
        assert_eq!(
            urls(
                "amqps://tm:s3cret@r0:5671/prod?heartbeat=10, r1:5681 ,r2,[::1]:5699,\
                 amqp://other:pw@r3/%2f,"
            ),
            [
                "amqps://tm:s3cret@r0:5671/prod?heartbeat=10",
                "amqps://tm:s3cret@r1:5681/prod?heartbeat=10",
                // No port: the scheme's default (here amqps, 5671).
                "amqps://tm:s3cret@r2/prod?heartbeat=10",
                "amqps://tm:s3cret@[::1]:5699/prod?heartbeat=10",
                "amqp://other:pw@r3/%2f",
            ]
        );
    }

    #[test]
    fn malformed_lists_are_refused_without_showing_any_password() {
        for (list, why) in [
            ("", "empty"),
            (" , ", "empty"),
            ("r1:5672", "entry 1 of the AMQP URL list must be a whole"),
            (
                "http://u:canary@h/",
                "entry 1 of the AMQP URL list is not an amqp://",
            ),
            (
                "amqp://u:canary@h/%2f,h2:notaport",
                "entry 2 of the AMQP URL list is not host[:port]",
            ),
            ("amqp://u:canary@h/%2f,h2:0", "entry 2"),
            ("amqp://u:canary@h/%2f,::1", "brackets"),
            ("amqp://u:canary@h/%2f,u2:x@h2", "entry 2"),
            (
                "amqp://u:canary@h/%2f?connection_timeout=soon",
                "connection_timeout",
            ),
            // A raw comma in the password splits the list where it should not.
            ("amqp://u:can,ary@h:5672/%2f", "%2C"),
        ] {
            let got = refused(list);
            assert!(got.contains(why), "{list}: {got}");
            assert!(!got.contains("canary") && !got.contains("ary@"), "{got}");
        }
    }

    #[test]
    fn the_debug_of_a_list_hides_every_password() {
        let u = AmqpUrl::new(
            "amqp://tm:canary1@r0:5672/%2f,amqp://tm:canary2@r1:5672/%2f,r2:5672,amqp://u:can,ary3@r4",
        );
        let shown = format!("{u:?}");
        assert!(
            !shown.contains("canary") && !shown.contains("ary3"),
            "{shown}"
        );
        assert_eq!(
            shown,
            "\"amqp://tm:***@r0:5672/%2f,amqp://tm:***@r1:5672/%2f,r2:5672,<not a URL>,<not host:port>\""
        );
        assert_eq!(&*u, u.0.as_str());
        let eps = AmqpUrl::new("amqp://tm:canary@r0/%2f,r1:5673")
            .endpoints()
            .unwrap();
        assert_eq!(eps[1].redacted(), "amqp://tm:***@r1:5673/%2f");
        assert_eq!(format!("{:?}", eps[1]), "\"amqp://tm:***@r1:5673/%2f\"");
    }

    #[test]
    fn connection_timeout_is_read_from_the_query() {
        let eps = AmqpUrl::new("amqp://h/%2f?connection_timeout=1500,h2")
            .endpoints()
            .unwrap();
        assert_eq!(
            eps[0].connection_timeout(),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(
            eps[1].connection_timeout(),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(
            AmqpUrl::new("amqp://h").endpoints().unwrap()[0].connection_timeout(),
            None
        );
    }

    #[test]
    fn every_order_comes_up_and_the_lost_node_goes_last() {
        let eps = AmqpUrl::new("amqp://a,b,c").endpoints().unwrap();
        let mut firsts = std::collections::HashSet::new();
        for _ in 0..200 {
            let order = shuffled(&eps, Some(&eps[1]));
            assert_eq!(order.len(), 3);
            assert_eq!(order[2], eps[1]);
            firsts.insert(order[0].url().to_string());
        }
        assert_eq!(firsts.len(), 2, "{firsts:?}");
        let mut seen = std::collections::HashSet::new();
        for _ in 0..200 {
            seen.insert(shuffled(&eps, None)[0].url().to_string());
        }
        assert_eq!(seen.len(), 3);
        // One endpoint: it is also the last one, and still tried.
        let one = AmqpUrl::new("amqp://a").endpoints().unwrap();
        assert_eq!(shuffled(&one, Some(&one[0])), one);
    }
}
