//! RFC 8288 `Link` header parsing: just enough to find `rel="next"`.
//!
//! Written by hand because it is small and must tolerate what real APIs send:
//! commas inside `<...>`, quoted and unquoted `rel`, several space-separated
//! relation types, several Link headers joined with ", ".

/// The target of the first link whose relation types include `rel`.
pub fn find_rel<'h>(header: &'h str, rel: &str) -> Option<&'h str> {
    let mut rest = header;
    loop {
        let open = rest.find('<')?;
        let after = &rest[open + 1..];
        let close = after.find('>')?;
        let target = after[..close].trim();
        let mut params = &after[close + 1..];
        // Parameters run until the next link, which starts at a ',' outside quotes.
        let mut end = params.len();
        let mut in_quotes = false;
        for (i, c) in params.char_indices() {
            match c {
                '"' => in_quotes = !in_quotes,
                ',' if !in_quotes => {
                    end = i;
                    break;
                }
                _ => {}
            }
        }
        let next = &params[end..];
        params = &params[..end];
        for param in params.split(';') {
            let Some((name, value)) = param.split_once('=') else {
                continue;
            };
            if !name.trim().eq_ignore_ascii_case("rel") {
                continue;
            }
            let value = value.trim().trim_matches('"');
            if value
                .split_ascii_whitespace()
                .any(|r| r.eq_ignore_ascii_case(rel))
            {
                return Some(target);
            }
        }
        rest = next;
    }
}

#[cfg(test)]
mod tests {
    use super::find_rel;

    #[test]
    fn finds_next_among_others() {
        let h = r#"<https://api.test/x?page=2&a=1,2>; rel="next", <https://api.test/x?page=9>; rel="last""#;
        assert_eq!(find_rel(h, "next"), Some("https://api.test/x?page=2&a=1,2"));
        assert_eq!(find_rel(h, "last"), Some("https://api.test/x?page=9"));
        assert_eq!(find_rel(h, "prev"), None);
    }

    #[test]
    fn unquoted_multiple_and_odd_spacing() {
        assert_eq!(find_rel("<a>;rel=next", "next"), Some("a"));
        assert_eq!(
            find_rel(r#"<b> ; title="x, y" ; rel="prev next""#, "next"),
            Some("b")
        );
        assert_eq!(find_rel(r#"<c>; REL="Next""#, "next"), Some("c"));
        assert_eq!(find_rel("garbage", "next"), None);
        assert_eq!(find_rel("<unterminated; rel=next", "next"), None);
    }
}
