//! Applying a source's auth and extra headers to a request. Secrets are
//! resolved here, per request, and the resulting header values are marked
//! sensitive so no Debug output shows them.

use base64::Engine;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use tidemark_core::config::AuthConfig;
use tidemark_core::secret::Secret;
use url::Url;

use crate::FetchError;

pub(crate) fn sensitive(value: &str) -> Result<HeaderValue, FetchError> {
    let mut v = HeaderValue::from_str(value).map_err(|_| {
        FetchError::Config("a secret holds characters not allowed in an HTTP header".into())
    })?;
    v.set_sensitive(true);
    Ok(v)
}

fn name(n: &str) -> Result<HeaderName, FetchError> {
    HeaderName::from_bytes(n.as_bytes())
        .map_err(|_| FetchError::Config(format!("invalid header name {n:?}")))
}

/// `text` with every occurrence of each of `secrets` (of 4 bytes or more)
/// replaced by `***`: for what an API or a token endpoint echoes back.
pub(crate) fn scrub(text: &str, secrets: &[&str]) -> String {
    let mut out = text.to_string();
    for s in secrets.iter().filter(|s| s.len() >= 4) {
        out = out.replace(*s, "***");
    }
    out
}

/// The secret values one request carries, to scrub from what comes back.
pub(crate) type Sent = Vec<tidemark_core::secret::Resolved>;

/// Add auth and configured headers to `headers`, and an api key in the
/// query to `url`; an OAuth2 source's token is added by the caller.
/// Returns the secret values added.
pub fn apply(
    auth: Option<&AuthConfig>,
    extra: &std::collections::BTreeMap<String, Secret>,
    headers: &mut HeaderMap,
    url: &mut Url,
) -> Result<Sent, FetchError> {
    let mut sent = Sent::new();
    for (k, v) in extra {
        let value = v.resolve()?;
        headers.insert(name(k)?, sensitive(value.expose())?);
        if !v.is_literal() {
            sent.push(value);
        }
    }
    let Some(auth) = auth else { return Ok(sent) };
    if let Some(token) = &auth.bearer {
        let t = token.resolve()?;
        headers.insert(
            reqwest::header::AUTHORIZATION,
            sensitive(&format!("Bearer {}", t.expose()))?,
        );
        sent.push(t);
    }
    if let Some(b) = &auth.basic {
        let (u, p) = (b.username.resolve()?, b.password.resolve()?);
        let enc = base64::engine::general_purpose::STANDARD.encode(format!(
            "{}:{}",
            u.expose(),
            p.expose()
        ));
        headers.insert(
            reqwest::header::AUTHORIZATION,
            sensitive(&format!("Basic {enc}"))?,
        );
        sent.extend([p, tidemark_core::secret::Resolved::from_value(enc)]);
    }
    if let Some(k) = &auth.api_key {
        let value = k.value.resolve()?;
        match (&k.header, &k.query) {
            (Some(h), _) => {
                headers.insert(name(h)?, sensitive(value.expose())?);
            }
            (None, Some(q)) => {
                // Replace a key the URL already carries (a next URL that
                // echoed it) instead of sending it twice.
                tidemark_core::pagination::remove_query_params(url, &[q]);
                url.query_pairs_mut().append_pair(q, value.expose());
            }
            (None, None) => return Err(FetchError::Config("api_key needs header or query".into())),
        }
        sent.push(value);
    }
    Ok(sent)
}

/// The bearer header of an OAuth2 token.
pub(crate) fn bearer(token: &str) -> Result<HeaderValue, FetchError> {
    sensitive(&format!("Bearer {token}"))
}
