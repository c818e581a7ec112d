//! Tenants: one feed definition run once per account of the same API.
//!
//! A tenanted source names its tenants (a file, a list, or the operator's
//! `tidemark tenants add`); every feed of it runs once per tenant, so a
//! job is (feed, tenant, partition). Within the state store and on the wire
//! the tenant travels inside the job's partition id, `<tenant>/<partition>`
//! ([`job_partition`]): tenant names cannot hold `/`, so the split is
//! unambiguous, and every store index, lease and commit works unchanged.
//!
//! Templates: `{tenant}` and `{vars.NAME}` may appear in a tenanted
//! source's `base_url`, `auth` secrets and `headers`, and in its feeds'
//! `path` and `params`. They are substituted into the text as written
//! (into a `${file:/…/{tenant}}` reference too, which is then resolved at
//! request time as any other). Any other brace is literal text.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::de::{self, MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};

/// The longest tenant name.
pub const MAX_NAME_LEN: usize = 63;

/// One tenant: a name and the values its templates may use.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Tenant {
    /// `[a-z0-9_-]`, 1 to 63 characters: it becomes part of job ids and routing keys.
    pub name: String,
    /// Values for `{vars.NAME}` (not secrets: they travel in page tasks).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub vars: BTreeMap<String, String>,
}

impl Tenant {
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            vars: BTreeMap::new(),
        }
    }
    pub fn with_var(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.vars.insert(name.into(), value.into());
        self
    }
}

/// Why `name` cannot be a tenant name, if it cannot.
pub fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return Err(format!(
            "tenant name {name:?} must be 1 to {MAX_NAME_LEN} characters"
        ));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'-'))
    {
        return Err(format!(
            "tenant name {name:?} may hold only a-z, 0-9, '_' and '-' (it becomes part of job ids and routing keys)"
        ));
    }
    Ok(())
}

/// Why `name` cannot name a var, if it cannot.
pub fn check_var_name(name: &str) -> Result<(), String> {
    if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
        return Err(format!(
            "var name {name:?} may hold only letters, digits and '_'"
        ));
    }
    Ok(())
}

/// Why `value` cannot be the value of var `name`, if it cannot: no `$`,
/// `{` or `}` (a var must not bring a `${VAR}` or `${file:}` reference, or
/// a template, of its own) and no control characters.
pub fn check_var_value(name: &str, value: &str) -> Result<(), String> {
    if value
        .chars()
        .any(|c| matches!(c, '$' | '{' | '}') || c.is_control())
    {
        return Err(format!(
            "vars.{name} may not hold '$', '{{', '}}' or control characters"
        ));
    }
    Ok(())
}

/// Where a template is filled in: what its values may hold there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Place {
    /// A base URL: a value must not move the host or the path (no `/ \ ? # @ : %`, no spaces).
    BaseUrl,
    /// A path: no `? # \ %`, spaces or `..`.
    Path,
    /// A secret: inside a `${…}` reference a value is one file or variable
    /// name part (`A-Z a-z 0-9 _ . -`, no `..`); outside it, any text.
    Secret,
    /// Parameters and header values: any text.
    Text,
}

/// Why `value` may not stand at `place`, if it may not.
fn fits(place: Place, in_reference: bool, value: &str) -> Result<(), &'static str> {
    let bad = |set: &str| value.chars().any(|c| set.contains(c) || c.is_whitespace());
    match place {
        Place::BaseUrl if bad("/\\?#@:%") => Err("a base URL (it would move the host or path)"),
        Place::Path if bad("?#\\%") || value.contains("..") => Err("a path"),
        Place::Secret
            if in_reference
                && (value.contains("..")
                    || !value
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))) =>
        {
            Err("a secret reference (it would name another file or variable)")
        }
        _ => Ok(()),
    }
}

/// [`substitute`], checking that each value may stand where it goes
/// ([`Place`]): a tenant's vars can then never reach another tenant's
/// secret file, the environment, or another host.
pub fn substitute_at(text: &str, tenant: &Tenant, place: Place) -> Result<String, String> {
    // The byte ranges of the `${…}` references, braces nested.
    let mut references = Vec::new();
    if place == Place::Secret {
        let b = text.as_bytes();
        let mut i = 0;
        while i + 1 < b.len() {
            if b[i] == b'$' && b[i + 1] == b'{' {
                let (start, mut depth, mut j) = (i, 0usize, i + 1);
                while j < b.len() {
                    match b[j] {
                        b'{' => depth += 1,
                        b'}' => {
                            depth -= 1;
                            if depth == 0 {
                                break;
                            }
                        }
                        _ => {}
                    }
                    j += 1;
                }
                references.push(start..j);
                i = j;
            }
            i += 1;
        }
    }
    for (range, r) in scan(text) {
        let value = match r {
            Ref::Tenant => tenant.name.as_str(),
            Ref::Var(v) => match tenant.vars.get(v) {
                Some(value) => value.as_str(),
                None => continue, // substitute names it
            },
        };
        let inside = references
            .iter()
            .any(|x| x.start < range.start && range.end <= x.end);
        if let Err(why) = fits(place, inside, value) {
            let what = match r {
                Ref::Tenant => "{tenant}".to_string(),
                Ref::Var(v) => format!("vars.{v}"),
            };
            return Err(format!(
                "tenant {}: the value of {what} ({value:?}) cannot stand in {why}",
                tenant.name
            ));
        }
    }
    substitute(text, tenant)
}

/// The job partition id of `partition` of `tenant`: `<tenant>/<partition>`.
pub fn job_partition(tenant: &str, partition: &str) -> String {
    format!("{tenant}/{partition}")
}

/// The tenant and partition of a tenanted job's partition id.
pub fn split_job_partition(id: &str) -> Option<(&str, &str)> {
    id.split_once('/').filter(|(t, _)| check_name(t).is_ok())
}

/// One template reference in a text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ref<'a> {
    /// `{tenant}`
    Tenant,
    /// `{vars.NAME}`
    Var(&'a str),
}

/// Each reference in `text`, with its byte range.
fn scan(text: &str) -> Vec<(std::ops::Range<usize>, Ref<'_>)> {
    let mut out = Vec::new();
    let mut at = 0;
    while let Some(i) = text[at..].find('{').map(|i| i + at) {
        let rest = &text[i..];
        if rest.starts_with("{tenant}") {
            out.push((i..i + 8, Ref::Tenant));
            at = i + 8;
            continue;
        }
        if let Some(var) = rest.strip_prefix("{vars.")
            && let Some(end) = var.find('}')
            && check_var_name(&var[..end]).is_ok()
        {
            let len = 6 + end + 1;
            out.push((i..i + len, Ref::Var(&var[..end])));
            at = i + len;
            continue;
        }
        at = i + 1;
    }
    out
}

/// The template references in `text` (`{tenant}`, `{vars.NAME}`).
pub fn refs(text: &str) -> Vec<Ref<'_>> {
    scan(text).into_iter().map(|(_, r)| r).collect()
}

/// `text` with its references filled in from `tenant`; an unknown var is an error.
pub fn substitute(text: &str, tenant: &Tenant) -> Result<String, String> {
    let found = scan(text);
    if found.is_empty() {
        return Ok(text.to_string());
    }
    let mut out = String::with_capacity(text.len() + 16);
    let mut last = 0;
    for (range, r) in found {
        out.push_str(&text[last..range.start]);
        match r {
            Ref::Tenant => out.push_str(&tenant.name),
            Ref::Var(v) => match tenant.vars.get(v) {
                Some(value) => out.push_str(value),
                None => {
                    return Err(format!(
                        "tenant {} has no vars.{v}, which the config uses",
                        tenant.name
                    ));
                }
            },
        }
        last = range.end;
    }
    out.push_str(&text[last..]);
    Ok(out)
}

/// A stand-in tenant whose every var is set: to check that a template
/// makes sense whatever tenant fills it.
pub fn sample(vars: &BTreeSet<String>) -> Tenant {
    Tenant {
        name: "sample-tenant".into(),
        vars: vars.iter().map(|v| (v.clone(), "sample".into())).collect(),
    }
}

impl<'de> Deserialize<'de> for Tenant {
    /// A tenant is written as its name (`- acme`) or as
    /// `{ name: acme, vars: { region: eu } }`.
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Tenant;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a tenant name, or a mapping with name and vars")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Tenant, E> {
                Ok(Tenant::new(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Tenant, E> {
                Ok(Tenant::new(v.to_string()))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Tenant, A::Error> {
                let mut name: Option<String> = None;
                let mut vars: Option<BTreeMap<String, serde_json::Value>> = None;
                while let Some(key) = map.next_key::<String>()? {
                    match key.as_str() {
                        "name" => name = Some(map.next_value::<ScalarString>()?.0),
                        "vars" => vars = Some(map.next_value()?),
                        other => {
                            return Err(de::Error::unknown_field(other, &["name", "vars"]));
                        }
                    }
                }
                let name = name.ok_or_else(|| de::Error::missing_field("name"))?;
                let vars = vars
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(k, v)| match v {
                        serde_json::Value::String(s) => Ok((k, s)),
                        serde_json::Value::Number(n) => Ok((k, n.to_string())),
                        serde_json::Value::Bool(b) => Ok((k, b.to_string())),
                        _ => Err(de::Error::custom(format!(
                            "vars.{k}: expected a string, number or boolean"
                        ))),
                    })
                    .collect::<Result<_, _>>()?;
                Ok(Tenant { name, vars })
            }
        }
        d.deserialize_any(V)
    }
}

/// A scalar read as text (a name written as a number stays a name).
struct ScalarString(String);

impl<'de> Deserialize<'de> for ScalarString {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match serde_json::Value::deserialize(d)? {
            serde_json::Value::String(s) => Ok(Self(s)),
            serde_json::Value::Number(n) => Ok(Self(n.to_string())),
            _ => Err(de::Error::custom("expected a string")),
        }
    }
}

impl JsonSchema for Tenant {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Tenant".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "description": "A tenant: its name, or its name and the values of its `{vars.NAME}` templates.",
            "oneOf": [
                { "type": "string", "pattern": "^[a-z0-9_-]{1,63}$" },
                {
                    "type": "object",
                    "properties": {
                        "name": { "type": "string", "pattern": "^[a-z0-9_-]{1,63}$" },
                        "vars": {
                            "type": "object",
                            "propertyNames": { "pattern": "^[A-Za-z0-9_]+$" },
                            "additionalProperties": { "type": ["string", "number", "boolean"] }
                        }
                    },
                    "required": ["name"],
                    "additionalProperties": false
                }
            ]
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_fill_tenant_and_vars_and_leave_other_braces() {
        let t = Tenant::new("acme").with_var("region", "eu");
        assert_eq!(
            substitute("https://{tenant}.{vars.region}.example/{x}", &t).unwrap(),
            "https://acme.eu.example/{x}"
        );
        assert_eq!(
            substitute("${file:/run/secrets/{tenant}}", &t).unwrap(),
            "${file:/run/secrets/acme}"
        );
        assert_eq!(
            substitute(r#"{"q":{tenant}}"#, &t).unwrap(),
            r#"{"q":acme}"#
        );
        let err = substitute("{vars.zone}", &t).unwrap_err();
        assert!(err.contains("vars.zone"), "{err}");
        assert_eq!(
            refs("{tenant}-{vars.a_1}-{vars.}-{vars.b c}"),
            vec![Ref::Tenant, Ref::Var("a_1")]
        );
    }

    #[test]
    fn a_var_cannot_reach_another_secret_host_or_path() {
        let t = |v: &str| Tenant::new("acme").with_var("x", v);
        let secret = "${file:/run/secrets/{vars.x}}";
        assert_eq!(
            substitute_at(secret, &t("acme-01.token"), Place::Secret).unwrap(),
            "${file:/run/secrets/acme-01.token}"
        );
        for evil in ["../globex", "a/b", "x y"] {
            assert!(
                substitute_at(secret, &t(evil), Place::Secret).is_err(),
                "{evil}"
            );
        }
        // Outside a reference, a secret may hold any text (an email, say).
        assert!(substitute_at("{vars.x}/token", &t("me@acme.example"), Place::Secret).is_ok());
        for evil in ["evil.io/x?", "a@b", "b:80"] {
            assert!(
                substitute_at("https://{vars.x}.example", &t(evil), Place::BaseUrl).is_err(),
                "{evil}"
            );
        }
        assert!(substitute_at("https://{vars.x}.example", &t("eu-1"), Place::BaseUrl).is_ok());
        assert!(substitute_at("/api/{vars.x}", &t("../admin"), Place::Path).is_err());
        assert!(substitute_at("/api/{vars.x}", &t("v2/eu"), Place::Path).is_ok());
        assert!(check_var_value("x", "${AMQP_URL}").is_err());
        assert!(check_var_value("x", "{tenant}").is_err());
        assert!(check_var_value("x", "plain value/with: anything").is_ok());
    }

    #[test]
    fn names_are_checked_and_job_ids_split_back() {
        assert!(check_name("acme-01_x").is_ok());
        for bad in ["", "Acme", "a/b", "a.b", &"a".repeat(64)] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
        let id = job_partition("acme", "2024-01-01T00:00:00Z");
        assert_eq!(
            split_job_partition(&id),
            Some(("acme", "2024-01-01T00:00:00Z"))
        );
        assert_eq!(split_job_partition("all"), None);
        assert_eq!(split_job_partition("a b/c"), None);
    }

    #[test]
    fn a_tenant_is_a_name_or_a_mapping() {
        let list: Vec<Tenant> =
            serde_yaml_ng::from_str("- acme\n- name: globex\n  vars: { region: eu, shard: 3 }\n")
                .unwrap();
        assert_eq!(list[0], Tenant::new("acme"));
        assert_eq!(
            list[1],
            Tenant::new("globex")
                .with_var("region", "eu")
                .with_var("shard", "3")
        );
        assert!(serde_yaml_ng::from_str::<Vec<Tenant>>("- { name: a, token: x }").is_err());
        assert!(serde_yaml_ng::from_str::<Vec<Tenant>>("- { vars: {} }").is_err());
    }
}
