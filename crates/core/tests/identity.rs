//! A record's key and version, read by the borrowed one-pass plan every
//! walk uses, are exactly what parsing the record into a tree and following
//! the pointers gives: the same text, the same errors. Message ids and
//! high-water marks hash and compare that text, so any difference would
//! re-send records or skip versions after an upgrade.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is the failure report

use proptest::prelude::*;
use serde_json::value::RawValue;
use tidemark_core::pointer::JsonPointer;
use tidemark_core::record::{IdentityPlan, identity};

/// Any JSON value, small, with the names the pointers below look for.
fn json() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::Bool),
        any::<i64>().prop_map(|n| serde_json::json!(n)),
        any::<u64>().prop_map(|n| serde_json::json!(n)),
        (-1e12f64..1e12).prop_map(|f| serde_json::json!(f)),
        "[a-z\"\\\\\u{e9}\u{1F600} ]{0,8}".prop_map(serde_json::Value::String),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::Array),
            prop::collection::vec(
                (
                    prop_oneof![
                        Just("id"),
                        Just("v"),
                        Just("meta"),
                        Just("0"),
                        Just("a~b"),
                        Just("x")
                    ],
                    inner
                ),
                0..5
            )
            .prop_map(|kv| serde_json::Value::Object(
                kv.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
            )),
        ]
    })
}

fn pointer() -> impl Strategy<Value = JsonPointer> {
    prop_oneof![
        Just("/id"),
        Just("/v"),
        Just("/meta/v"),
        Just("/meta/0"),
        Just("/0"),
        Just("/a~0b"),
        Just("/meta/id/v"),
        Just(""),
    ]
    .prop_map(|p| p.parse().unwrap())
}

/// The record as an API might send it: compact, or spread out.
fn text(v: &serde_json::Value, pretty: bool) -> Box<RawValue> {
    let s = if pretty {
        serde_json::to_string_pretty(v).unwrap()
    } else {
        serde_json::to_string(v).unwrap()
    };
    RawValue::from_string(s).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]
    #[test]
    fn the_plan_reads_what_the_tree_reads(
        v in json(),
        key in pointer(),
        version in prop::option::of(pointer()),
        pretty in any::<bool>(),
    ) {
        let record = text(&v, pretty);
        let plan = IdentityPlan::new(key.clone(), version.clone());
        prop_assert_eq!(plan.read(&record), identity(&record, &key, version.as_ref()));
    }
}

#[test]
fn duplicate_names_keep_the_last_and_numbers_keep_serde_json_s_text() {
    let record = RawValue::from_string(
        r#"{"id": 1, "id": "second", "v": 1.50, "meta": {"v": 10000000000000000000000}}"#.into(),
    )
    .unwrap();
    for version in ["/v", "/meta/v"] {
        let (key, version): (JsonPointer, JsonPointer) =
            ("/id".parse().unwrap(), version.parse().unwrap());
        let plan = IdentityPlan::new(key.clone(), Some(version.clone()));
        assert_eq!(
            plan.read(&record),
            identity(&record, &key, Some(&version)),
            "{version}"
        );
    }
    // The same pointer as key and version reads the same value for both.
    let id: JsonPointer = "/id".parse().unwrap();
    let both = IdentityPlan::new(id.clone(), Some(id.clone()))
        .read(&record)
        .unwrap();
    assert_eq!(
        (both.key.as_str(), both.version.as_deref()),
        ("second", Some("second"))
    );
}
