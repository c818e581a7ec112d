//! One pass over a response body that picks out every value the engine needs.
//!
//! Pages are large (1000 records of a few hundred bytes) and the values we
//! want (records, next cursor, has_more, …) are few. Parsing the body into a
//! `serde_json::Value` would allocate every field of every record; instead a
//! trie of the wanted pointers drives a single serde pass that borrows each
//! record as a `&RawValue` (its exact bytes, as the API sent them) and skips
//! everything else.

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;

use crate::pointer::JsonPointer;

#[derive(Default, Clone)]
struct Node {
    children: Vec<(String, Node)>,
    /// Index into the output slots, or `RECORDS`.
    slot: Option<usize>,
}

const RECORDS: usize = usize::MAX;

impl Node {
    fn insert(&mut self, segs: &[String], slot: usize) {
        match segs.split_first() {
            None => self.slot = Some(slot),
            Some((first, rest)) => {
                let i = match self.children.iter().position(|(k, _)| k == first) {
                    Some(i) => i,
                    None => {
                        self.children.push((first.clone(), Node::default()));
                        self.children.len() - 1
                    }
                };
                self.children[i].1.insert(rest, slot);
            }
        }
    }
    fn child(&self, key: &str) -> Option<&Node> {
        self.children.iter().find(|(k, _)| k == key).map(|(_, n)| n)
    }
}

/// What was found.
pub(crate) struct Extracted<'a> {
    /// The records array, if the pointer resolved.
    pub records: Option<Vec<&'a RawValue>>,
    /// When the records pointer resolved to something other than an array: what it was.
    pub records_wrong_kind: Option<&'static str>,
    pub values: Vec<Option<&'a RawValue>>,
}

/// A reusable extraction plan for one set of pointers.
#[derive(Clone)]
pub(crate) struct Plan {
    root: Node,
    n: usize,
}

impl Plan {
    pub fn new(records: &JsonPointer, values: &[&JsonPointer]) -> Self {
        let mut root = Node::default();
        root.insert(records.segments(), RECORDS);
        for (i, p) in values.iter().enumerate() {
            root.insert(p.segments(), i);
        }
        Plan {
            root,
            n: values.len(),
        }
    }

    pub fn run<'a>(&self, body: &'a [u8]) -> Result<Extracted<'a>, serde_json::Error> {
        let mut out = Extracted {
            records: None,
            records_wrong_kind: None,
            values: vec![None; self.n],
        };
        let mut de = serde_json::Deserializer::from_slice(body);
        Walk {
            node: &self.root,
            out: &mut out,
        }
        .deserialize(&mut de)?;
        de.end()?;
        Ok(out)
    }
}

/// The value at `ptr` inside `json` (one record), borrowed from it; `None`
/// when the pointer finds nothing.
pub fn raw_at<'a>(
    json: &'a str,
    ptr: &JsonPointer,
) -> Result<Option<&'a RawValue>, serde_json::Error> {
    ValuePlan::new(ptr).run(json)
}

/// A reusable plan that picks one value out of a small document (a
/// record): built once per paginator, run once per record.
#[derive(Clone)]
pub(crate) struct ValuePlan {
    root: Node,
    whole: bool,
}

impl ValuePlan {
    pub fn new(ptr: &JsonPointer) -> Self {
        let mut root = Node::default();
        root.insert(ptr.segments(), 0);
        ValuePlan {
            root,
            whole: ptr.is_root(),
        }
    }

    pub fn run<'a>(&self, json: &'a str) -> Result<Option<&'a RawValue>, serde_json::Error> {
        if self.whole {
            return serde_json::from_str::<&RawValue>(json).map(Some);
        }
        Ok(values_in(&self.root, 1, json)?[0])
    }
}

/// A reusable plan that picks a few values out of a small document (a
/// record's key and version) in one borrowed pass: built once per feed,
/// run once per record. The same pointer twice shares one slot.
#[derive(Clone)]
pub(crate) struct PointsPlan {
    root: Node,
    /// Per pointer asked for, its slot.
    slots: Vec<usize>,
    distinct: usize,
}

impl PointsPlan {
    pub fn new(ptrs: &[&JsonPointer]) -> Self {
        let mut root = Node::default();
        let mut seen: Vec<&JsonPointer> = Vec::new();
        let mut slots = Vec::with_capacity(ptrs.len());
        for p in ptrs {
            let slot = match seen.iter().position(|q| q == p) {
                Some(i) => i,
                None => {
                    seen.push(p);
                    root.insert(p.segments(), seen.len() - 1);
                    seen.len() - 1
                }
            };
            slots.push(slot);
        }
        PointsPlan {
            root,
            slots,
            distinct: seen.len(),
        }
    }

    /// The value at each pointer (in the order given to [`PointsPlan::new`]).
    pub fn run<'a>(&self, json: &'a str) -> Result<Vec<Option<&'a RawValue>>, serde_json::Error> {
        let found = values_in(&self.root, self.distinct, json)?;
        Ok(self.slots.iter().map(|&i| found[i]).collect())
    }
}

/// The `n` slots of the trie `root` filled from one small document.
fn values_in<'a>(
    root: &Node,
    n: usize,
    json: &'a str,
) -> Result<Vec<Option<&'a RawValue>>, serde_json::Error> {
    let mut out = Extracted {
        records: None,
        records_wrong_kind: None,
        values: vec![None; n],
    };
    let mut de = serde_json::Deserializer::from_str(json);
    Walk {
        node: root,
        out: &mut out,
    }
    .deserialize(&mut de)?;
    de.end()?;
    Ok(out.values)
}

struct Walk<'n, 'o, 'a> {
    node: &'n Node,
    out: &'o mut Extracted<'a>,
}

impl<'de: 'a, 'a> DeserializeSeed<'de> for Walk<'_, '_, 'a> {
    type Value = ();
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        match self.node.slot {
            Some(RECORDS) => {
                // The records array; pointers below it are rejected by validation.
                d.deserialize_any(RecordsVisitor { out: self.out })
            }
            Some(i) if self.node.children.is_empty() => {
                let raw = <&'de RawValue as serde::Deserialize>::deserialize(d)?;
                self.out.values[i] = Some(raw);
                Ok(())
            }
            Some(i) => {
                // Both wanted itself and a parent of other wanted values: keep the
                // raw value and walk it again (rare; small values only).
                let raw = <&'de RawValue as serde::Deserialize>::deserialize(d)?;
                self.out.values[i] = Some(raw);
                let mut inner = serde_json::Deserializer::from_str(raw.get());
                Walk {
                    node: &Node {
                        children: clone_children(&self.node.children),
                        slot: None,
                    },
                    out: self.out,
                }
                .deserialize(&mut inner)
                .map_err(de::Error::custom)
            }
            None => d.deserialize_any(self),
        }
    }
}

fn clone_children(c: &[(String, Node)]) -> Vec<(String, Node)> {
    c.iter()
        .map(|(k, n)| {
            (
                k.clone(),
                Node {
                    children: clone_children(&n.children),
                    slot: n.slot,
                },
            )
        })
        .collect()
}

impl<'de: 'a, 'a> Visitor<'de> for Walk<'_, '_, 'a> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<(), M::Error> {
        while let Some(Key(key)) = map.next_key::<Key<'de>>()? {
            match self.node.child(&key) {
                Some(child) => map.next_value_seed(Walk {
                    node: child,
                    out: self.out,
                })?,
                None => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(())
    }
    fn visit_seq<S: SeqAccess<'de>>(self, mut seq: S) -> Result<(), S::Error> {
        let mut i = 0usize;
        loop {
            let child = self.node.child(&i.to_string());
            let more = match child {
                Some(child) => seq
                    .next_element_seed(Walk {
                        node: child,
                        out: self.out,
                    })?
                    .is_some(),
                None => seq.next_element::<IgnoredAny>()?.is_some(),
            };
            if !more {
                return Ok(());
            }
            i += 1;
        }
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }
}

struct RecordsVisitor<'o, 'a> {
    out: &'o mut Extracted<'a>,
}

impl RecordsVisitor<'_, '_> {
    fn wrong<E>(self, kind: &'static str) -> Result<(), E> {
        self.out.records_wrong_kind = Some(kind);
        Ok(())
    }
}

impl<'de: 'a, 'a> Visitor<'de> for RecordsVisitor<'_, 'a> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an array of records")
    }
    fn visit_seq<S: SeqAccess<'de>>(self, mut seq: S) -> Result<(), S::Error> {
        let mut v = Vec::with_capacity(seq.size_hint().unwrap_or(64));
        while let Some(r) = seq.next_element::<&'de RawValue>()? {
            v.push(r);
        }
        self.out.records = Some(v);
        Ok(())
    }
    fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<(), M::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        self.wrong("an object")
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        self.wrong("a boolean")
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        self.wrong("a number")
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        self.wrong("a number")
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        self.wrong("a number")
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        self.wrong("a string")
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        self.wrong("null")
    }
}

/// An object key, borrowed from the input when it has no escapes.
struct Key<'de>(Cow<'de, str>);

impl<'de> serde::Deserialize<'de> for Key<'de> {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string key")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v.to_string())))
            }
        }
        d.deserialize_str(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> JsonPointer {
        s.parse().unwrap()
    }

    #[test]
    fn picks_records_and_values_in_one_pass() {
        let body = br#"{"meta":{"hasMore":true,"next":"abc"},"data":[{"id":1}, {"id":2,"x":[1,2]}],"z":null}"#;
        let plan = Plan::new(
            &p("/data"),
            &[&p("/meta/hasMore"), &p("/meta/next"), &p("/missing")],
        );
        let got = plan.run(body).unwrap();
        let recs: Vec<&str> = got.records.unwrap().iter().map(|r| r.get()).collect();
        assert_eq!(recs, [r#"{"id":1}"#, r#"{"id":2,"x":[1,2]}"#]);
        assert_eq!(got.values[0].unwrap().get(), "true");
        assert_eq!(got.values[1].unwrap().get(), "\"abc\"");
        assert!(got.values[2].is_none());
    }

    #[test]
    fn root_array_and_escaped_keys() {
        let plan = Plan::new(&p(""), &[]);
        assert_eq!(
            plan.run(b"[1, {\"a\":2}]").unwrap().records.unwrap().len(),
            2
        );
        let plan = Plan::new(&p("/a~1b"), &[&p("/q\"")]);
        let got = plan.run(br#"{"a/b":[], "q\"": 5}"#).unwrap();
        assert_eq!(got.records.unwrap().len(), 0);
        assert_eq!(got.values[0].unwrap().get(), "5");
    }

    #[test]
    fn wrong_kinds_and_broken_json() {
        let plan = Plan::new(&p("/data"), &[]);
        let got = plan.run(br#"{"data":{"id":1}}"#).unwrap();
        assert!(got.records.is_none());
        assert_eq!(got.records_wrong_kind, Some("an object"));
        assert!(plan.run(br#"{"data":[{"id":1}"#).is_err());
        assert!(plan.run(b"{\"data\":[\"\xff\"]}").is_err());
        assert!(plan.run(br#"{"data":[]} trailing"#).is_err());
    }

    #[test]
    fn array_indexes_and_nested_wanted_parents() {
        let plan = Plan::new(&p("/r"), &[&p("/m"), &p("/m/k"), &p("/list/1")]);
        let got = plan
            .run(br#"{"r":[],"m":{"k":"v"},"list":["a","b"]}"#)
            .unwrap();
        assert_eq!(got.values[0].unwrap().get(), r#"{"k":"v"}"#);
        assert_eq!(got.values[1].unwrap().get(), "\"v\"");
        assert_eq!(got.values[2].unwrap().get(), "\"b\"");
    }
}
