//! One-pass scans over JSON bytes that only need to know what is inside a
//! string: the nesting-depth limit and compacting a record to one line.
//! Neither validates the JSON; the parser does that.

/// Tracks whether a byte of JSON is inside a string (quotes and escapes
/// included).
#[derive(Debug, Default)]
struct Strings {
    in_string: bool,
    escaped: bool,
}

impl Strings {
    /// Feed the next byte; true when it belongs to a string.
    fn inside(&mut self, b: u8) -> bool {
        if self.in_string {
            if self.escaped {
                self.escaped = false;
            } else if b == b'\\' {
                self.escaped = true;
            } else if b == b'"' {
                self.in_string = false;
            }
            true
        } else if b == b'"' {
            self.in_string = true;
            true
        } else {
            false
        }
    }
}

/// True when `body` nests arrays and objects deeper than `limit`.
///
/// Most of a page's bytes are inside strings: those are skipped with
/// `memchr` (to the next quote or backslash) rather than byte by byte.
pub fn nested_deeper_than(body: &[u8], limit: usize) -> bool {
    let mut depth = 0usize;
    let mut i = 0usize;
    while i < body.len() {
        match body[i] {
            b'"' => {
                // Find the closing quote, stepping over escapes.
                i += 1;
                loop {
                    let Some(rest) = body.get(i..) else {
                        return false;
                    };
                    match memchr::memchr2(b'"', b'\\', rest) {
                        None => return false,
                        Some(j) if body[i + j] == b'\\' => i += j + 2,
                        Some(j) => {
                            i += j;
                            break;
                        }
                    }
                }
            }
            b'[' | b'{' => {
                depth += 1;
                if depth > limit {
                    return true;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
        i += 1;
    }
    false
}

/// Append `input` to `out` without the whitespace outside strings, so a
/// pretty-printed record fits one line. Inside strings JSON has no raw
/// newlines, so the bytes there are kept as they are.
pub fn compact_json(input: &[u8], out: &mut Vec<u8>) {
    let mut strings = Strings::default();
    for &b in input {
        if strings.inside(b) || !matches!(b, b' ' | b'\n' | b'\r' | b'\t') {
            out.push(b);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::{compact_json, nested_deeper_than};

    #[test]
    fn compacting_keeps_strings_intact() {
        let mut out = Vec::new();
        compact_json(
            b"{\n  \"a b\": \"x \\\" \\n y\",\n  \"n\": [1, 2]\n}",
            &mut out,
        );
        assert_eq!(
            String::from_utf8(out).unwrap(),
            r#"{"a b":"x \" \n y","n":[1,2]}"#
        );
    }

    #[test]
    fn depth_counts_brackets_outside_strings_only() {
        assert!(!nested_deeper_than(br#"[[{"a":"[[[[\"[["}]]"#, 3));
        assert!(nested_deeper_than(br#"[[{"a":[1]}]]"#, 3));
        assert!(!nested_deeper_than(br#"[[{"a":[1]}]]"#, 4));
        assert!(!nested_deeper_than(b"[][][][]", 1));
        // A string cut off after its backslash ends the scan.
        assert!(!nested_deeper_than(b"\"ab\\", 0));
        assert!(!nested_deeper_than(b"{\"a\":\"\\", 1));
    }

    /// The byte-by-byte scan the memchr one replaced.
    fn reference(body: &[u8], limit: usize) -> bool {
        let mut strings = super::Strings::default();
        let mut depth = 0usize;
        for &b in body {
            if strings.inside(b) {
                continue;
            }
            match b {
                b'[' | b'{' => {
                    depth += 1;
                    if depth > limit {
                        return true;
                    }
                }
                b']' | b'}' => depth = depth.saturating_sub(1),
                _ => {}
            }
        }
        false
    }

    proptest::proptest! {
        #[test]
        fn the_fast_scan_agrees_with_the_byte_by_byte_one(
            body in proptest::collection::vec(proptest::sample::select(b"[]{}\"\\a,:".to_vec()), 0..64),
            limit in 0usize..6,
        ) {
            proptest::prop_assert_eq!(nested_deeper_than(&body, limit), reference(&body, limit));
        }
    }
}
