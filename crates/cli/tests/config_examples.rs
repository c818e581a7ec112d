//! Every example config, `examples/*.yaml` and each ```yaml block of
//! docs/CONFIGURATION.md (each a whole config, by agreement), validates
//! against the JSON Schema that `tidemark schema` prints and passes
//! `tidemark validate`; and the schema refuses what the loader refuses.
//!
//! A block marked ```yaml file=NAME is not a config but a file configs name
//! (a tenants file): it is written as NAME next to every config before any
//! is validated, must read as a tenants file on its own, and must be named
//! by some config of the page (which then validates it with its templates).
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is the failure report

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{Value, json};
use tidemark_core::config::{Preset, load_str, load_tenants_str};

const BIN: &str = env!("CARGO_BIN_EXE_tidemark");

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// One config to check: where it comes from (`file` or `file:line`) and its text.
struct Example {
    place: String,
    text: String,
}

/// A file a config of the page names (```yaml file=NAME): where it is, its
/// name and its text.
struct NamedFile {
    place: String,
    name: String,
    text: String,
}

/// A ```yaml block: the line of its first line of YAML, the `file=NAME` of
/// its info string if any, and its text.
#[derive(Debug, PartialEq)]
struct Block {
    line: usize,
    file: Option<String>,
    text: String,
}

/// What a fence's info string says: `None` for a block that is not YAML,
/// else the block's `file=NAME` (any other word after `yaml` is refused, so
/// no block is skipped by a typo).
fn yaml_info(info: &str) -> Option<Option<String>> {
    let mut words = info.split_whitespace();
    if !matches!(words.next(), Some("yaml" | "yml")) {
        return None;
    }
    let mut file = None;
    for w in words {
        match w.strip_prefix("file=") {
            Some(name) if !name.is_empty() && !name.contains('/') && file.is_none() => {
                file = Some(name.to_string());
            }
            _ => panic!(
                "a ```{info} block: after `yaml` only one file=NAME (a plain file name) may follow"
            ),
        }
    }
    Some(file)
}

/// The ```yaml blocks of a markdown text, each with the line of its first
/// line of YAML. Fences may be indented (inside a list item); the block's
/// lines lose that indentation. Other fenced blocks are skipped whole.
fn yaml_blocks(markdown: &str) -> Vec<Block> {
    enum Fence {
        Outside,
        Other,
        Yaml {
            line: usize,
            indent: usize,
            file: Option<String>,
            text: String,
        },
    }
    let mut blocks = Vec::new();
    let mut fence = Fence::Outside;
    for (i, line) in markdown.lines().enumerate() {
        let trimmed = line.trim_start();
        let indent = line.len() - trimmed.len();
        let is_fence = trimmed.starts_with("```");
        let lang = trimmed.trim_start_matches('`').trim();
        // A closing fence has no info string; "```yaml" inside another block is text.
        let closes = is_fence && lang.is_empty();
        fence = match fence {
            Fence::Outside if is_fence => match yaml_info(lang) {
                Some(file) => Fence::Yaml {
                    line: i + 2,
                    indent,
                    file,
                    text: String::new(),
                },
                None => Fence::Other,
            },
            Fence::Other if closes => Fence::Outside,
            Fence::Yaml {
                line, file, text, ..
            } if closes => {
                blocks.push(Block { line, file, text });
                Fence::Outside
            }
            Fence::Yaml {
                line: at,
                indent: fence_indent,
                file,
                mut text,
            } => {
                text.push_str(&line[indent.min(fence_indent)..]);
                text.push('\n');
                Fence::Yaml {
                    line: at,
                    indent: fence_indent,
                    file,
                    text,
                }
            }
            other => other,
        };
    }
    assert!(
        matches!(fence, Fence::Outside),
        "an unclosed fenced block in the markdown"
    );
    blocks
}

/// The example configs, and the files they name.
fn examples() -> (Vec<Example>, Vec<NamedFile>) {
    let root = repo_root();
    let mut out = Vec::new();
    let mut named = Vec::new();
    let mut files: Vec<PathBuf> = std::fs::read_dir(root.join("examples"))
        .expect("examples/ exists")
        .map(|e| e.expect("a directory entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no examples/*.yaml");
    for path in files {
        out.push(Example {
            place: format!("examples/{}", path.file_name().unwrap().to_string_lossy()),
            text: std::fs::read_to_string(&path).expect("readable example"),
        });
    }
    let doc = root.join("docs/CONFIGURATION.md");
    let markdown = std::fs::read_to_string(&doc)
        .unwrap_or_else(|e| panic!("docs/CONFIGURATION.md must exist ({e})"));
    let blocks = yaml_blocks(&markdown);
    assert!(
        !blocks.is_empty(),
        "docs/CONFIGURATION.md has no ```yaml block"
    );
    for Block { line, file, text } in blocks {
        let place = format!("docs/CONFIGURATION.md:{line}");
        match file {
            Some(name) => named.push(NamedFile { place, name, text }),
            None => out.push(Example { place, text }),
        }
    }
    (out, named)
}

/// The schema as `tidemark schema` prints it: exit 0, pretty JSON, the
/// same document the library builds.
fn printed_schema() -> Value {
    let out = Command::new(BIN)
        .arg("schema")
        .output()
        .expect("run tidemark");
    assert!(
        out.status.success(),
        "tidemark schema: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("UTF-8");
    assert!(
        text.starts_with("{\n  \""),
        "not pretty-printed: {text:.40}"
    );
    let schema: Value = serde_json::from_str(&text).expect("tidemark schema prints JSON");
    assert_eq!(schema, tidemark_core::config::json_schema());
    schema
}

/// Validators of the schema under its own draft (2020-12) and under draft 7,
/// the rules yaml-language-server (VS Code's YAML extension and others)
/// validates with: the schema uses only keywords draft 7 knows, so an
/// editor flags the same things.
fn validators(schema: &Value) -> [(&'static str, jsonschema::Validator); 2] {
    [
        (
            "the schema",
            jsonschema::validator_for(schema).expect("the schema compiles"),
        ),
        (
            "the schema under draft 7",
            jsonschema::draft7::new(schema).expect("the schema compiles as draft 7"),
        ),
    ]
}

/// YAML as the loader reads it (serde_yaml_ng, the same YAML 1.2 reader),
/// as JSON: what an editor's yaml-language-server checks too.
fn to_json(text: &str) -> Result<Value, String> {
    serde_yaml_ng::from_str(text).map_err(|e| format!("not YAML: {e}"))
}

/// The schema's complaints about `text`, one per line; empty when it passes.
fn schema_errors(validator: &jsonschema::Validator, text: &str) -> String {
    match to_json(text) {
        Ok(json) => validator
            .iter_errors(&json)
            .map(|e| format!("  at {}: {e}", e.instance_path()))
            .collect::<Vec<_>>()
            .join("\n"),
        Err(e) => format!("  {e}"),
    }
}

#[test]
fn every_example_config_fits_the_schema_and_validates() {
    let validators = validators(&printed_schema());
    let dir = tempfile::tempdir().unwrap();
    let mut failures = Vec::new();
    let (examples, named) = examples();
    // The files configs name, next to every config: written first.
    let mut seen = BTreeMap::new();
    for f in &named {
        if let Some(first) = seen.insert(f.name.clone(), f.place.clone()) {
            failures.push(format!(
                "{}: file={} again (first at {first}): each name once per page",
                f.place, f.name
            ));
        }
        if let Err(e) = load_tenants_str(&f.name, &f.text, &BTreeMap::new()) {
            failures.push(format!(
                "{}: file={} is not a tenants file:\n{e}",
                f.place, f.name
            ));
        }
        // Some source's `tenants.file` is this name.
        let named_by = |ex: &Example| {
            to_json(&ex.text).is_ok_and(|config| {
                config["sources"].as_object().is_some_and(|sources| {
                    sources
                        .values()
                        .any(|s| s["tenants"]["file"].as_str() == Some(f.name.as_str()))
                })
            })
        };
        if !examples.iter().any(named_by) {
            failures.push(format!(
                "{}: file={} is named by no config example (`file: {}`), so nothing validates it",
                f.place, f.name, f.name
            ));
        }
        std::fs::write(dir.path().join(&f.name), &f.text).unwrap();
    }
    for (i, ex) in examples.iter().enumerate() {
        for (name, validator) in &validators {
            let errors = schema_errors(validator, &ex.text);
            if !errors.is_empty() {
                failures.push(format!("{}: refused by {name}:\n{errors}", ex.place));
            }
        }
        let file = dir.path().join(format!("example-{i}.yaml"));
        std::fs::write(&file, &ex.text).unwrap();
        let out = Command::new(BIN)
            .args(["validate", "--config"])
            .arg(&file)
            .output()
            .expect("run tidemark validate");
        if !out.status.success() {
            failures.push(format!(
                "{}: tidemark validate exits with {:?} (line 1 of {} is {0}):\n{}{}",
                ex.place,
                out.status.code(),
                file.display(),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n\n"));
}

/// A small config both the schema and the loader accept; the checks below
/// change one thing in it.
const BASE: &str = r#"
sources:
  api:
    base_url: https://api.example.com
    auth: { bearer: "${API_TOKEN}" }
    retry: { max_attempts: 3, base_delay: 250ms }
feeds:
  - name: tickets
    source: api
    path: /tickets
    records: /data
    pagination: { preset: start_after, page_size: 100 }
    key: /id
    every: 5m
    lag: 0
    start: { param: since, from: 2024-01-01 }
    partitions: { param: region, values: [eu, 1, true] }
"#;

fn edited(from: &str, to: &str) -> String {
    assert!(BASE.contains(from), "BASE has no {from:?}");
    BASE.replacen(from, to, 1)
}

#[test]
fn the_schema_refuses_what_the_loader_refuses() {
    let validators = validators(&printed_schema());
    for (name, validator) in &validators {
        let errors = schema_errors(validator, BASE);
        assert!(errors.is_empty(), "BASE refused by {name}:\n{errors}");
    }
    load_str("BASE", BASE).expect("the loader takes BASE");

    for (what, text) in [
        (
            "an unknown feed field",
            edited("    every: 5m\n", "    every: 5m\n    colour: blue\n"),
        ),
        (
            "an unknown pagination field",
            edited("page_size: 100 }", "page_size: 100, pages: 3 }"),
        ),
        ("an unknown top-level field", format!("{BASE}extra: 1\n")),
        (
            "a duration without a unit",
            edited("every: 5m", "every: \"10\""),
        ),
        ("a duration in words", edited("every: 5m", "every: soon")),
        ("a number as a duration", edited("lag: 0", "lag: 30")),
        (
            "a bad preset name",
            edited("preset: start_after", "preset: zendesk"),
        ),
        (
            "a key that is no JSON pointer",
            edited("key: /id", "key: id"),
        ),
        (
            "a secret with an unclosed ${",
            edited("\"${API_TOKEN}\"", "\"${API_TOKEN\""),
        ),
        (
            "zero attempts",
            edited("max_attempts: 3", "max_attempts: 0"),
        ),
        (
            "a feed name with a space",
            edited("name: tickets", "name: my tickets"),
        ),
        (
            "a next_cursor in no known form",
            edited(
                "preset: start_after,",
                "cursor_param: c, next_cursor: \"header:\",",
            ),
        ),
        ("a missing key", edited("    key: /id\n", "")),
    ] {
        for (name, validator) in &validators {
            assert!(
                !schema_errors(validator, &text).is_empty(),
                "{name} takes {what}:\n{text}"
            );
        }
        assert!(
            load_str("edited", &text).is_err(),
            "the loader takes {what}:\n{text}"
        );
    }
}

#[test]
fn the_schema_names_every_preset_the_loader_knows() {
    let schema = printed_schema();
    let validator = jsonschema::validator_for(&schema).unwrap();
    let named: Vec<&str> = schema["$defs"]["Preset"]["oneOf"]
        .as_array()
        .expect("the schema's Preset lists the presets")
        .iter()
        .filter_map(|p| p["const"].as_str())
        .collect();
    assert_eq!(
        named,
        Preset::NAMES,
        "the schema's presets and the loader's"
    );
    for name in Preset::NAMES {
        let config = edited("preset: start_after", &format!("preset: {name}"));
        let errors = schema_errors(&validator, &config);
        assert!(errors.is_empty(), "preset {name} refused:\n{errors}");
        load_str("preset", &config)
            .unwrap_or_else(|e| panic!("the loader refuses preset {name}: {e}"));
    }
    let unknown = edited("preset: start_after", "preset: zendesk");
    assert!(!schema_errors(&validator, &unknown).is_empty());
}

#[test]
fn yaml_blocks_are_found_with_their_lines() {
    let md = "# T\n\n```yaml\na: 1\n```\n\ntext\n\n- item\n\n  ```yaml\n  b: 2\n  ```\n```sh\n```yaml\n```\n```yaml file=t.yaml\n- acme\n```\n";
    let block = |line, file: Option<&str>, text: &str| Block {
        line,
        file: file.map(str::to_string),
        text: text.to_string(),
    };
    assert_eq!(
        yaml_blocks(md),
        vec![
            block(4, None, "a: 1\n"),
            block(12, None, "b: 2\n"),
            block(18, Some("t.yaml"), "- acme\n"),
        ]
    );
    assert_eq!(to_json("b: 2\n").unwrap(), json!({"b": 2}));
}

#[test]
#[should_panic(expected = "only one file=NAME")]
fn a_yaml_block_with_an_unknown_word_is_refused() {
    yaml_blocks("```yaml tenants.yaml\n- acme\n```\n");
}
