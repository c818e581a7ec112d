//! Inputs the fuzz target `response` (fuzz/fuzz_targets/response.rs) found,
//! minimized, kept as tests: each once made `Paginator::read` panic. The
//! same inputs are in fuzz/seeds/response/regression-*, which `fuzz/check`
//! replays. See docs/FUZZING.md.

use url::Url;

use super::{Next, Paginator, Position, ReadError};
use crate::config::{PaginationConfig, PaginationSpec};

fn paginator(pagination: &str) -> Paginator {
    let p: PaginationConfig = serde_yaml_ng::from_str(pagination).expect("pagination block");
    let records = "/r".parse().expect("pointer");
    let spec = PaginationSpec::resolve(&p, Some(&records)).expect("valid pagination");
    let base = Url::parse("https://api.example.com/").expect("url");
    Paginator::new(&base, "/p", spec, vec![], None)
}

fn read(pag: &Paginator, at: &str, body: &str) -> Result<Next, ReadError> {
    let pos = Position::At(at.to_string());
    let req = pag.request(&pos).expect("request");
    pag.read(&pos, &req, &Vec::new(), body.as_bytes())
        .map(|p| p.next)
}

/// fuzz/seeds/response/regression-page-below-first: a page number below
/// `first_page` (a `pull --cursor` or a checkpoint from before first_page
/// changed) underflowed `this + 1 - first` when the body had totals.
#[test]
fn page_below_first_page_with_totals() {
    let pag = paginator("{ page_param: p, first_page: 5, total_pages: /pages }");
    assert_eq!(
        read(&pag, "2", r#"{"r":[{"id":1}],"pages":6}"#),
        Ok(Next::More("3".into()))
    );
    assert_eq!(
        read(&pag, "2", r#"{"r":[],"pages":6}"#),
        Ok(Next::End {
            resume: Some("2".into())
        })
    );
    let pag = paginator("{ page_param: p, first_page: 5, page_size: 7, total_count: /count }");
    assert_eq!(
        read(&pag, "0", r#"{"r":[{"id":1}],"count":40}"#),
        Ok(Next::More("1".into()))
    );
}

/// The largest page number or offset cannot advance: an error, not an
/// overflow; and the page count times page_size saturates.
#[test]
fn page_and_offset_at_the_top_of_u64() {
    let max = u64::MAX.to_string();
    let pag = paginator("{ page_param: p }");
    assert!(matches!(
        read(&pag, &max, r#"{"r":[{"id":1}]}"#),
        Err(ReadError::BadPosition { field: "page", .. })
    ));
    let pag = paginator("{ offset_param: o }");
    assert!(matches!(
        read(&pag, &max, r#"{"r":[{"id":1}]}"#),
        Err(ReadError::BadPosition {
            field: "offset",
            ..
        })
    ));
    let pag = paginator("{ page_param: p, first_page: 0, page_size: 1000, total_count: /c }");
    assert_eq!(
        read(
            &pag,
            &(u64::MAX / 2).to_string(),
            r#"{"r":[{"id":1}],"c":5}"#
        ),
        Ok(Next::End {
            resume: Some((u64::MAX / 2).to_string())
        })
    );
    let pag = paginator(&format!("{{ page_param: p, first_page: {max} }}"));
    let start = Position::Start { from: None };
    let req = pag.request(&start).expect("request");
    assert!(matches!(
        pag.read(&start, &req, &Vec::new(), br#"{"r":[{"id":1}]}"#),
        Err(ReadError::BadPosition { field: "page", .. })
    ));
}

/// fuzz/seeds/response/regression-long-self-cursor: the `Self` cursor of
/// the last page, stored as the resume point, skipped max_cursor_bytes.
#[test]
fn long_self_cursor_is_refused_like_a_long_next_cursor() {
    let pag = paginator("{ cursor_param: c, next_cursor: /next, self_cursor: /self }")
        .with_max_cursor_len(64);
    let long = "x".repeat(100);
    assert_eq!(
        read(
            &pag,
            "n1",
            &format!(r#"{{"r":[{{"id":1}}],"self":"{long}"}}"#)
        ),
        Err(ReadError::CursorTooLong {
            len: 100,
            limit: 64
        })
    );
    assert_eq!(
        read(&pag, "n1", r#"{"r":[{"id":1}],"self":"n1"}"#),
        Ok(Next::End {
            resume: Some("n1".into())
        })
    );
}
