//! Applying a source's auth and extra headers to a request. Secrets are
//! resolved here, per request, and the resulting header values are marked
//! sensitive so no Debug output shows them.

use base64::Engine;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use tidemark_core::config::AuthConfig;
use tidemark_core::secret::Secret;
use url::Url;

use crate::FetchError;

fn sensitive(value: &str) -> Result<HeaderValue, FetchError> {
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

/// Add auth and configured headers to `headers`, and an api key in the query to `url`.
pub fn apply(
    auth: Option<&AuthConfig>,
    extra: &std::collections::BTreeMap<String, Secret>,
    headers: &mut HeaderMap,
    url: &mut Url,
) -> Result<(), FetchError> {
    for (k, v) in extra {
        headers.insert(name(k)?, sensitive(v.resolve()?.expose())?);
    }
    let Some(auth) = auth else { return Ok(()) };
    if let Some(token) = &auth.bearer {
        let t = token.resolve()?;
        headers.insert(
            reqwest::header::AUTHORIZATION,
            sensitive(&format!("Bearer {}", t.expose()))?,
        );
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
    }
    if let Some(k) = &auth.api_key {
        let value = k.value.resolve()?;
        match (&k.header, &k.query) {
            (Some(h), _) => {
                headers.insert(name(h)?, sensitive(value.expose())?);
            }
            (None, Some(q)) => {
                url.query_pairs_mut().append_pair(q, value.expose());
            }
            (None, None) => return Err(FetchError::Config("api_key needs header or query".into())),
        }
    }
    Ok(())
}
