//! Small JSON helpers for the hot path: an escaping writer and a span scanner.
//!
//! The broker forwards publishers' payloads untouched, in their field order, so it never
//! re-serializes them: simd-json validates a message and extracts the fields routing needs,
//! and [`object_members`] finds the byte ranges of the members to copy verbatim.
//! The scanner assumes its input already passed simd-json validation.

use std::borrow::Cow;
use std::ops::Range;

/// Appends `s` as a JSON string literal (with quotes).
pub fn write_str(out: &mut Vec<u8>, s: &str) {
    out.push(b'"');
    let bytes = s.as_bytes();
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let esc: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0..=0x1f => {
                out.extend_from_slice(&bytes[start..i]);
                out.extend_from_slice(b"\\u00");
                out.push(HEX[(b >> 4) as usize]);
                out.push(HEX[(b & 0xf) as usize]);
                start = i + 1;
                continue;
            }
            _ => continue,
        };
        out.extend_from_slice(&bytes[start..i]);
        out.extend_from_slice(esc);
        start = i + 1;
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// A finite number in its shortest form that reads back to the same value (`36`, `7.85`);
/// `null` for NaN and infinities, which JSON cannot hold.
pub fn write_f64(out: &mut Vec<u8>, v: f64) {
    use std::io::Write;
    if v.is_finite() {
        let _ = write!(out, "{v}");
    } else {
        out.extend_from_slice(b"null");
    }
}

pub fn write_i64(out: &mut Vec<u8>, n: i64) {
    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
}

pub fn write_u64(out: &mut Vec<u8>, n: u64) {
    let mut b = itoa::Buffer::new();
    out.extend_from_slice(b.format(n).as_bytes());
}

/// Appends `"key":`, escaped as needed.
pub fn write_key(out: &mut Vec<u8>, key: &str) {
    write_str(out, key);
    out.push(b':');
}

fn skip_ws(b: &[u8], mut i: usize) -> usize {
    while i < b.len() && matches!(b[i], b' ' | b'\n' | b'\r' | b'\t') {
        i += 1;
    }
    i
}

/// End (exclusive) of the string starting at `b[i] == '"'`.
fn skip_string(b: &[u8], mut i: usize) -> usize {
    i += 1;
    while i < b.len() {
        match b[i] {
            b'\\' => i += 2,
            b'"' => return i + 1,
            _ => i += 1,
        }
    }
    b.len()
}

/// End (exclusive) of the value starting at `b[i]` (after whitespace).
fn skip_value(b: &[u8], i: usize) -> usize {
    match b.get(i) {
        Some(b'"') => skip_string(b, i),
        Some(b'{') | Some(b'[') => {
            let mut depth = 0usize;
            let mut j = i;
            while j < b.len() {
                match b[j] {
                    b'"' => {
                        j = skip_string(b, j);
                        continue;
                    }
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth -= 1;
                        if depth == 0 {
                            return j + 1;
                        }
                    }
                    _ => {}
                }
                j += 1;
            }
            b.len()
        }
        Some(_) => {
            let mut j = i;
            while j < b.len() && !matches!(b[j], b',' | b'}' | b']' | b' ' | b'\n' | b'\r' | b'\t')
            {
                j += 1;
            }
            j
        }
        None => i,
    }
}

/// Whether the JSON text `b` nests arrays and objects more than `limit` levels deep
/// (a top-level object is level 1). Strings are skipped; `b` must be valid JSON.
pub fn nests_deeper_than(b: &[u8], limit: usize) -> bool {
    let mut depth = 0usize;
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'"' => {
                i = skip_string(b, i);
                continue;
            }
            b'{' | b'[' => {
                depth += 1;
                if depth > limit {
                    return true;
                }
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
        i += 1;
    }
    false
}

/// One member of an object: the raw key (without quotes, still escaped) and the value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub key: Range<usize>,
    pub value: Range<usize>,
}

/// The members of the object that spans `b` (leading/trailing whitespace allowed), in order.
/// Returns `None` if `b` is not an object. `b` must be valid JSON.
pub fn object_members(b: &[u8]) -> Option<Vec<Member>> {
    let mut out = Vec::new();
    let mut i = skip_ws(b, 0);
    if b.get(i) != Some(&b'{') {
        return None;
    }
    i = skip_ws(b, i + 1);
    if b.get(i) == Some(&b'}') {
        return Some(out);
    }
    loop {
        if b.get(i) != Some(&b'"') {
            return None;
        }
        let kend = skip_string(b, i);
        let key = i + 1..kend - 1;
        i = skip_ws(b, kend);
        if b.get(i) != Some(&b':') {
            return None;
        }
        let vstart = skip_ws(b, i + 1);
        let vend = skip_value(b, vstart);
        out.push(Member {
            key,
            value: vstart..vend,
        });
        i = skip_ws(b, vend);
        match b.get(i) {
            Some(b',') => i = skip_ws(b, i + 1),
            Some(b'}') => return Some(out),
            _ => return None,
        }
    }
}

/// Whether a raw member name (as in [`Member::key`], still escaped) is `key`.
pub fn key_is(raw: &[u8], key: &str) -> bool {
    raw == key.as_bytes() || (raw.contains(&b'\\') && unescape(raw) == key)
}

/// The text of a raw string body (between its quotes, from valid JSON), escapes decoded.
pub fn unescape(raw: &[u8]) -> Cow<'_, str> {
    if !raw.contains(&b'\\') {
        return String::from_utf8_lossy(raw);
    }
    let hex4 = |at: usize| {
        raw.get(at..at + 4)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u32::from_str_radix(h, 16).ok())
    };
    let mut out = String::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        let start = i;
        while i < raw.len() && raw[i] != b'\\' {
            i += 1;
        }
        out.push_str(&String::from_utf8_lossy(&raw[start..i]));
        if i + 1 >= raw.len() {
            break;
        }
        let c = match raw[i + 1] {
            b'b' => '\u{8}',
            b'f' => '\u{c}',
            b'n' => '\n',
            b'r' => '\r',
            b't' => '\t',
            b'u' => {
                let hi = hex4(i + 2).unwrap_or(0xFFFD);
                i += 4;
                let lo = (raw.get(i + 2..i + 4) == Some(b"\\u"))
                    .then(|| hex4(i + 4))
                    .flatten()
                    .filter(|lo| (0xD800..0xDC00).contains(&hi) && (0xDC00..0xE000).contains(lo));
                match lo {
                    Some(lo) => {
                        i += 6;
                        char::from_u32(0x10000 + ((hi - 0xD800) << 10) + (lo - 0xDC00))
                    }
                    None => char::from_u32(hi),
                }
                .unwrap_or('\u{FFFD}')
            }
            other => other as char,
        };
        out.push(c);
        i += 2;
    }
    Cow::Owned(out)
}

/// The raw value of the top-level member `key` of the object `b`.
pub fn member<'a>(b: &'a [u8], key: &str) -> Option<&'a [u8]> {
    object_members(b)?
        .into_iter()
        .find(|m| key_is(&b[m.key.clone()], key))
        .map(|m| &b[m.value])
}

/// Whether `raw` is exactly one JSON string or number: safe to copy into a reply as a
/// message id (an id taken from a message that failed to parse may be any bytes).
pub fn valid_id(raw: &[u8]) -> bool {
    match raw.first() {
        Some(b'"') => valid_string(raw),
        Some(b'-' | b'0'..=b'9') => valid_number(raw),
        _ => false,
    }
}

fn valid_string(raw: &[u8]) -> bool {
    if raw.len() < 2 || raw[raw.len() - 1] != b'"' {
        return false;
    }
    let body = &raw[1..raw.len() - 1];
    let mut i = 0;
    while i < body.len() {
        match body[i] {
            b'"' | 0..=0x1f => return false,
            b'\\' => match body.get(i + 1) {
                Some(b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't') => i += 2,
                Some(b'u')
                    if body.len() >= i + 6
                        && body[i + 2..i + 6].iter().all(u8::is_ascii_hexdigit) =>
                {
                    i += 6
                }
                _ => return false,
            },
            _ => i += 1,
        }
    }
    std::str::from_utf8(body).is_ok()
}

fn valid_number(raw: &[u8]) -> bool {
    let mut i = usize::from(raw.first() == Some(&b'-'));
    let digits = |i: &mut usize| {
        let start = *i;
        while raw.get(*i).is_some_and(u8::is_ascii_digit) {
            *i += 1;
        }
        *i - start
    };
    match raw.get(i) {
        Some(b'0') => i += 1,
        Some(b'1'..=b'9') => {
            digits(&mut i);
        }
        _ => return false,
    }
    if raw.get(i) == Some(&b'.') {
        i += 1;
        if digits(&mut i) == 0 {
            return false;
        }
    }
    if matches!(raw.get(i), Some(b'e' | b'E')) {
        i += 1;
        if matches!(raw.get(i), Some(b'+' | b'-')) {
            i += 1;
        }
        if digits(&mut i) == 0 {
            return false;
        }
    }
    i == raw.len()
}

/// The raw elements of the array that spans `b`, in order. `b` must be valid JSON.
pub fn array_elements(b: &[u8]) -> Option<Vec<Range<usize>>> {
    let mut out = Vec::new();
    let mut i = skip_ws(b, 0);
    if b.get(i) != Some(&b'[') {
        return None;
    }
    i = skip_ws(b, i + 1);
    if b.get(i) == Some(&b']') {
        return Some(out);
    }
    loop {
        let end = skip_value(b, i);
        out.push(i..end);
        i = skip_ws(b, end);
        match b.get(i) {
            Some(b',') => i = skip_ws(b, i + 1),
            Some(b']') => return Some(out),
            _ => return None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_ids_are_one_string_or_number() {
        for ok in [&br#""a""#[..], br#""\u00e9\n""#, b"0", b"-12.5e+3", b"7"] {
            assert!(valid_id(ok), "{}", String::from_utf8_lossy(ok));
        }
        for bad in [
            &br#""x"},{"evil":1"#[..],
            br#""a"#,
            br#""a\q""#,
            b"01",
            b"1.",
            b"-",
            b"true",
            b"{}",
            b"\"a\x01\"",
        ] {
            assert!(!valid_id(bad), "{}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn escapes_strings() {
        let mut v = Vec::new();
        write_str(&mut v, "a\"b\\c\nd\u{1}é");
        assert_eq!(std::str::from_utf8(&v).unwrap(), r#""a\"b\\c\nd\u0001é""#);
        let back: String = serde_json::from_slice(&v).unwrap();
        assert_eq!(back, "a\"b\\c\nd\u{1}é");
    }

    #[test]
    fn finds_members_in_order_with_nesting() {
        let src = br#" { "type" : "x", "payload": {"a": [1, {"b": "}"}], "s": "q\"}"}, "n": -1.5e3 , "t":true}"#;
        let m = object_members(src).unwrap();
        let keys: Vec<&[u8]> = m.iter().map(|m| &src[m.key.clone()]).collect();
        assert_eq!(keys, vec![&b"type"[..], b"payload", b"n", b"t"]);
        assert_eq!(
            member(src, "payload").unwrap(),
            br#"{"a": [1, {"b": "}"}], "s": "q\"}"}"#
        );
        assert_eq!(member(src, "n").unwrap(), b"-1.5e3");
        assert_eq!(member(src, "t").unwrap(), b"true");
        assert!(member(src, "zz").is_none());
        assert_eq!(object_members(b"{}").unwrap(), vec![]);
        assert!(object_members(b"[1]").is_none());
    }

    #[test]
    fn measures_nesting_outside_strings() {
        assert!(!nests_deeper_than(br#"{"a":[1,{"b":2}]}"#, 3));
        assert!(nests_deeper_than(br#"{"a":[1,{"b":[]}]}"#, 3));
        assert!(!nests_deeper_than(br#"{"a":"[[[[{{{{\"[[[["}"#, 1));
        assert!(nests_deeper_than(&[b'['; 33], 32));
    }

    #[test]
    fn finds_array_elements() {
        let src = br#"[ {"a":[1,2]}, "x,y" ,3]"#;
        let el: Vec<&[u8]> = array_elements(src)
            .unwrap()
            .into_iter()
            .map(|r| &src[r])
            .collect();
        assert_eq!(el, vec![&br#"{"a":[1,2]}"#[..], br#""x,y""#, b"3"]);
        assert!(array_elements(b"[]").unwrap().is_empty());
    }
}
