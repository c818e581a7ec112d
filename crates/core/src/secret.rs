//! Secrets in config: either a literal, a `${VAR}` reference to the
//! environment of the process that sends the request, or a `${file:/path}`
//! reference to a file on that process's machine (a mounted Kubernetes or
//! Docker secret), read at each resolution so a rotated file is picked up.
//! One trailing newline of a file is dropped.
//!
//! A [`Secret`] stores the template as written, never the resolved value, so
//! whatever is stored, logged or sent over a queue carries `${VAR}` only.
//! [`Secret::resolve`] is called at request time; its `Debug` output is
//! redacted. A literal secret in a config file is allowed (for the demo and
//! tests) but its value is redacted in every `Debug` and error message.

use std::borrow::Cow;
use std::fmt;

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Serialize};

/// A secret as written in the config: `"${HELPDESK_TOKEN}"` or a literal.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

/// Why a secret could not be resolved. Names the variable, never a value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretError {
    #[error("environment variable {var} is not set (needed for a secret)")]
    Unset { var: String },
    #[error("malformed secret reference: an unclosed `${{` (write `${{VAR}}`)")]
    Malformed,
    /// The file could not be read now (missing, unreadable, not UTF-8): a
    /// mounted secret may not have arrived yet, so this may pass.
    #[error("cannot read the secret file {path}: {reason}")]
    File { path: String, reason: String },
    #[error("the secret file {path} must be given by an absolute path")]
    RelativeFile { path: String },
}

/// The prefix of a file reference: `${file:/run/secrets/token}`.
pub const FILE_PREFIX: &str = "file:";

/// Read a secret file: its content without one trailing newline.
fn read_file(path: &str) -> Result<String, SecretError> {
    let fail = |reason: String| SecretError::File {
        path: path.to_string(),
        reason,
    };
    if !std::path::Path::new(path).is_absolute() {
        return Err(SecretError::RelativeFile {
            path: path.to_string(),
        });
    }
    let bytes = std::fs::read(path).map_err(|e| fail(e.kind().to_string()))?;
    let mut text = String::from_utf8(bytes).map_err(|_| fail("not UTF-8".into()))?;
    if text.ends_with('\n') {
        text.pop();
        if text.ends_with('\r') {
            text.pop();
        }
    }
    Ok(text)
}

/// A resolved secret value. `Debug` and `Display` print `***`.
#[derive(Clone, PartialEq, Eq)]
pub struct Resolved(String);

impl Resolved {
    /// A secret value obtained at run time (an OAuth2 access token).
    pub fn from_value(value: String) -> Self {
        Self(value)
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Resolved {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Display for Resolved {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl Secret {
    pub fn new(template: impl Into<String>) -> Self {
        Self(template.into())
    }

    /// The names of the `${VAR}` references in this secret (a file
    /// reference is named `file:/path`).
    pub fn variables(&self) -> Result<Vec<&str>, SecretError> {
        let mut out = Vec::new();
        let mut rest = self.0.as_str();
        while let Some(start) = rest.find("${") {
            let after = &rest[start + 2..];
            let end = after.find('}').ok_or(SecretError::Malformed)?;
            out.push(&after[..end]);
            rest = &after[end + 1..];
        }
        Ok(out)
    }

    /// True when the secret is written inline rather than referenced.
    pub fn is_literal(&self) -> bool {
        !self.0.contains("${")
    }

    /// Substitute every `${VAR}` using `lookup` (normally `std::env::var`)
    /// and every `${file:/path}` with the file's content.
    pub fn resolve_with(
        &self,
        lookup: impl Fn(&str) -> Option<String>,
    ) -> Result<Resolved, SecretError> {
        let mut out = String::with_capacity(self.0.len());
        let mut rest = self.0.as_str();
        while let Some(start) = rest.find("${") {
            out.push_str(&rest[..start]);
            let after = &rest[start + 2..];
            let end = after.find('}').ok_or(SecretError::Malformed)?;
            let var = &after[..end];
            let value = match var.strip_prefix(FILE_PREFIX) {
                Some(path) => read_file(path)?,
                None => lookup(var).ok_or_else(|| SecretError::Unset {
                    var: var.to_string(),
                })?,
            };
            out.push_str(&value);
            rest = &after[end + 1..];
        }
        out.push_str(rest);
        Ok(Resolved(out))
    }

    /// Resolve against this process's environment.
    pub fn resolve(&self) -> Result<Resolved, SecretError> {
        self.resolve_with(|v| std::env::var(v).ok())
    }

    /// The template as written; safe to store because references are not values.
    /// For a literal secret this is the value itself, so callers that print
    /// use [`Secret::display_safe`].
    pub fn template(&self) -> &str {
        &self.0
    }

    /// What may be shown to a person: the template if it only references
    /// variables, `***` if it holds a literal value.
    pub fn display_safe(&self) -> String {
        if self.is_literal() {
            "***".to_string()
        } else {
            let mut s = String::new();
            for v in self.variables().unwrap_or_default() {
                if !s.is_empty() {
                    s.push(' ');
                }
                s.push_str("${");
                s.push_str(v);
                s.push('}');
            }
            s
        }
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secret({})", self.display_safe())
    }
}

/// The loader takes any text; `validate` then refuses a `${` with no `}`
/// after it ([`Secret::variables`]). Every `${` before the last `}` is
/// closed by it, so the rule is: no `${` after the last `}`. The pattern says
/// so without look-ahead (which not every regex engine has).
const SECRET_PATTERN: &str = r"^(?:[\s\S]*\})?(?:[^$}]|\$+[^${}])*\$*$";

impl JsonSchema for Secret {
    fn schema_name() -> Cow<'static, str> {
        "Secret".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "description": "A secret: \"${VAR}\" (an environment variable of the process that sends the request), \"${file:/absolute/path}\" (a file's content, one trailing newline dropped), text around either, or a literal (stored with the config, so `validate` warns). Only the reference is stored and logged.",
            "type": "string",
            "pattern": SECRET_PATTERN,
            "examples": ["${API_TOKEN}", "${file:/run/secrets/api-token}"]
        })
    }
}

/// The URL of a service tidemark connects to (`REDIS_URL`, `AMQP_URL`),
/// which may carry a password. It reads as a `&str` where it is used; its
/// `Debug` shows `***` for the password, so a struct that holds one can
/// derive `Debug` without putting the password in a log line. It has no
/// `Display`, so it cannot be formatted into a message by accident.
#[derive(Clone, PartialEq, Eq)]
pub struct ServiceUrl(String);

impl ServiceUrl {
    pub fn new(url: impl Into<String>) -> Self {
        Self(url.into())
    }

    /// The URL with its password (if any) replaced by `***`.
    pub fn redacted(&self) -> String {
        match url::Url::parse(&self.0) {
            Ok(mut u) => {
                if u.password().is_some() {
                    // Only fails for URLs that cannot have a password.
                    let _ = u.set_password(Some("***"));
                }
                // A password in the query (`sentinel_password=`) too.
                let secret = |k: &str| k.to_ascii_lowercase().contains("pass");
                if u.query_pairs().any(|(k, _)| secret(&k)) {
                    let pairs: Vec<(String, String)> = u
                        .query_pairs()
                        .map(|(k, v)| {
                            let v = if secret(&k) {
                                "***".into()
                            } else {
                                v.into_owned()
                            };
                            (k.into_owned(), v)
                        })
                        .collect();
                    u.query_pairs_mut().clear().extend_pairs(pairs);
                }
                u.to_string()
            }
            Err(_) => "<not a URL>".into(),
        }
    }
}

impl std::ops::Deref for ServiceUrl {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl From<String> for ServiceUrl {
    fn from(s: String) -> Self {
        Self(s)
    }
}

impl std::str::FromStr for ServiceUrl {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Self(s.to_string()))
    }
}

impl fmt::Debug for ServiceUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.redacted())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_url_debug_hides_the_password() {
        let u = ServiceUrl::new("amqp://tm:hunter2@rabbit:5672/%2f");
        let shown = format!("{u:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("amqp://tm:***@rabbit:5672/%2f"), "{shown}");
        assert_eq!(&*u, "amqp://tm:hunter2@rabbit:5672/%2f");
        let plain = ServiceUrl::new("redis://127.0.0.1:6379");
        assert_eq!(format!("{plain:?}"), "\"redis://127.0.0.1:6379\"");
        assert_eq!(
            format!("{:?}", ServiceUrl::new("rediss://:p%40ss@h/0")),
            "\"rediss://:***@h/0\""
        );
        assert_eq!(
            format!("{:?}", ServiceUrl::new("not a url hunter2")),
            "\"<not a URL>\""
        );
    }

    #[test]
    fn resolves_references_and_names_missing_variables() {
        let s = Secret::new("Bearer ${TOKEN}");
        let got = s
            .resolve_with(|v| (v == "TOKEN").then(|| "abc".to_string()))
            .unwrap();
        assert_eq!(got.expose(), "Bearer abc");
        let err = Secret::new("${NOPE}").resolve_with(|_| None).unwrap_err();
        assert_eq!(err, SecretError::Unset { var: "NOPE".into() });
        assert!(err.to_string().contains("NOPE"));
    }

    #[test]
    fn debug_never_shows_values() {
        let lit = Secret::new("hunter2");
        assert!(!format!("{lit:?}").contains("hunter2"));
        let r = lit.resolve_with(|_| None).unwrap();
        assert_eq!(format!("{r:?} {r}"), "*** ***");
        assert_eq!(format!("{:?}", Secret::new("${A}")), "Secret(${A})");
    }

    #[test]
    fn unclosed_reference_is_an_error() {
        assert_eq!(
            Secret::new("${OOPS").resolve_with(|_| None).unwrap_err(),
            SecretError::Malformed
        );
    }

    #[test]
    fn file_references_read_the_file_without_its_trailing_newline() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "s3cr3t\n").unwrap();
        let s = Secret::new(format!("Bearer ${{file:{}}}", path.display()));
        assert_eq!(s.resolve_with(|_| None).unwrap().expose(), "Bearer s3cr3t");
        // Rotated on disk: the next resolution reads the new value.
        std::fs::write(&path, "n3w\r\n").unwrap();
        assert_eq!(s.resolve_with(|_| None).unwrap().expose(), "Bearer n3w");
        assert_eq!(s.display_safe(), format!("${{file:{}}}", path.display()));

        let missing = dir.path().join("nope");
        let err = Secret::new(format!("${{file:{}}}", missing.display()))
            .resolve_with(|_| None)
            .unwrap_err();
        assert!(
            matches!(&err, SecretError::File { path, .. } if path.ends_with("nope")),
            "{err}"
        );
        let err = Secret::new("${file:relative/token}")
            .resolve_with(|_| None)
            .unwrap_err();
        assert!(err.to_string().contains("absolute"), "{err}");
    }
}

#[cfg(test)]
mod service_url_tests {
    use super::ServiceUrl;

    #[test]
    fn passwords_are_hidden_in_the_user_info_and_the_query() {
        let u = ServiceUrl::from(
            "redis+sentinel://:data-pw@10.0.0.1:26379/mymaster?sentinel_password=s-pw&db=2"
                .to_string(),
        );
        let shown = u.redacted();
        assert!(
            !shown.contains("data-pw") && !shown.contains("s-pw"),
            "{shown}"
        );
        assert!(
            shown.contains("db=2") && shown.contains("sentinel_password=***"),
            "{shown}"
        );
        let plain = ServiceUrl::from("amqp://guest:guest@127.0.0.1:5672/%2f".to_string());
        assert_eq!(plain.redacted(), "amqp://guest:***@127.0.0.1:5672/%2f");
    }
}
