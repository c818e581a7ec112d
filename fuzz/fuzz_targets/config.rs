//! Fuzz the config parser: `config::load_str` (serde_yaml_ng with
//! serde_path_to_error, the yaml-rust2 location index, and `validate`) on
//! any text, then what `tidemark validate`, `pull` and the coordinator do
//! with a config that loaded: resolve each feed's pagination and request
//! dialect (method, `read_only`, JSON cursor), list its partitions, build
//! its paginators and their requests at the start and at a few positions
//! (a JSON text, a plain string, a number, a URL).
//!
//! Two modes, by the corpus: arbitrary text, and mutations of the valid
//! configs in fuzz/seeds/config (examples/mock.yaml, k8s/base/feeds.yaml,
//! deploy/compose/feeds.yaml, the README's YAML), helped by the field names
//! in fuzz/config.dict. Errors are fine; panics, hangs and huge memory are not.
#![no_main]

use std::sync::OnceLock;

use chrono::DateTime;
use libfuzzer_sys::fuzz_target;
use tidemark_core::checkpoint::Stage;
use tidemark_core::config;
use tidemark_core::pagination::Position;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let loaded = config::load_str("fuzz.yaml", &text);
    if debug() {
        // TIDEMARK_FUZZ_DEBUG=1 with -runs=0: what each seed loads as.
        match &loaded {
            Ok(c) => eprintln!(
                "loaded: {} sources, {} feeds",
                c.sources.len(),
                c.feeds.len()
            ),
            Err(e) => eprintln!("errors:\n{e}"),
        }
    }
    let Ok(cfg) = loaded else {
        return;
    };
    // A fixed "now", so a run is reproducible.
    let now = DateTime::from_timestamp(1_800_000_000, 0).expect("time");
    for feed in &cfg.feeds {
        // Validation passed: these must not fail.
        let source = cfg
            .source_of(feed)
            .expect("a validated feed has its source");
        feed.pagination_spec()
            .expect("a validated feed has a pagination spec");
        let _ = feed.effective_start();
        // The request dialect, as `validate`, `status` and `rewind` read it.
        let json_cursor = feed.cursor_is_json();
        let method = feed.method();
        let read_only = feed.read_only();
        let Ok(parts) = feed.partitions(now) else {
            continue;
        };
        for part in parts.iter().take(3) {
            let Ok(pos) = feed.start_position(part) else {
                continue;
            };
            for stage in [Stage::Bulk, Stage::Incremental] {
                let Ok(p) = feed.paginator_for(source, part, stage) else {
                    continue;
                };
                // The feed's start, then positions as checkpoints, `pull
                // --cursor` and `rewind --cursor` hand them in: JSON text,
                // a plain string, a number, a URL.
                let positions = [
                    pos.clone(),
                    Position::Start { from: None },
                    Position::At(r#"[1,"a"]"#.into()),
                    Position::At(r#""abc""#.into()),
                    Position::At("abc".into()),
                    Position::At("2".into()),
                    Position::At(p.endpoint().to_string()),
                ];
                for at in &positions {
                    let Ok(req) = p.request_in_chain(at, Some(now)) else {
                        continue;
                    };
                    assert_eq!(req.method, method, "the request's method is the feed's");
                    assert_eq!(
                        req.read_only, read_only,
                        "the request's read_only is the feed's"
                    );
                    if let Some(b) = &req.body
                        && let Err(e) = json_check(b)
                    {
                        panic!(
                            "a request body that is not JSON ({e}): {}",
                            String::from_utf8_lossy(b)
                        );
                    }
                }
                // A cursor kept as JSON text: the feed says so (status and
                // rewind go by it), and text that is not JSON is refused.
                if p.cursor_in_body() {
                    assert!(
                        json_cursor,
                        "a body cursor on a feed whose cursor_is_json() is false"
                    );
                    assert!(
                        p.request(&Position::At("abc".into())).is_err(),
                        "a body cursor that is not JSON was sent"
                    );
                }
            }
        }
    }
});

fn debug() -> bool {
    static DEBUG: OnceLock<bool> = OnceLock::new();
    *DEBUG.get_or_init(|| std::env::var_os("TIDEMARK_FUZZ_DEBUG").is_some())
}

/// Whether `bytes` is one JSON value, at any depth (a YAML body may nest
/// deeper than serde_json's default limit).
fn json_check(bytes: &[u8]) -> Result<(), serde_json::Error> {
    use serde::Deserialize;
    let mut de = serde_json::Deserializer::from_slice(bytes);
    de.disable_recursion_limit();
    serde::de::IgnoredAny::deserialize(&mut de)?;
    de.end()
}
