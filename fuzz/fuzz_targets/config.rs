//! Fuzz the config parser: `config::load_str` (serde_yaml_ng with
//! serde_path_to_error, the yaml-rust2 location index, and `validate`) on
//! any text, then what `tidemark validate`, `pull` and the coordinator do
//! with a config that loaded: resolve each feed's pagination, list its
//! partitions, build its paginators and their first requests.
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
        let Ok(parts) = feed.partitions(now) else {
            continue;
        };
        for part in parts.iter().take(3) {
            let Ok(pos) = feed.start_position(part) else {
                continue;
            };
            for stage in [Stage::Bulk, Stage::Incremental] {
                if let Ok(p) = feed.paginator_for(source, part, stage) {
                    let _ = p.request(&pos);
                }
            }
        }
    }
});

fn debug() -> bool {
    static DEBUG: OnceLock<bool> = OnceLock::new();
    *DEBUG.get_or_init(|| std::env::var_os("TIDEMARK_FUZZ_DEBUG").is_some())
}
