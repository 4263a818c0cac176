//! Property tests: the bounded-time fuzzing of fleetcast's pure core that runs in CI.
//!
//! Only the stable toolchain is available (no cargo-fuzz), so these proptest properties are
//! the fuzzers: arbitrary and structured inputs for the frame reader, the request-head parser,
//! the path classifier, the native message parser, the JSON helpers and a whole session.
//!
//! Case counts are set per property (a few thousand for cheap ones, fewer for the session)
//! so that `cargo test --test props` stays well under 20 s in a debug build.
//! For a long run, `FLEETCAST_PROPTEST_CASES=N` replaces every property's case count:
//!
//! ```text
//! FLEETCAST_PROPTEST_CASES=200000 cargo test --release --test props
//! ```
//!
//! Inputs are random on every run (proptest's default seeding), and no
//! `proptest-regressions/` files are written. When a property fails, proptest prints the
//! shrunk input: keep it as a named `#[test]` in the regression section at the bottom.

use fleetcast::auth::{self, Authenticator, Credential};
use fleetcast::config::{ApiKeyConfig, AuthConfig, Limits};
use fleetcast::dialect::native::{self, Command, Parser};
use fleetcast::event::{Event, Publication};
use fleetcast::json;
use fleetcast::model::{Channel, Role};
use fleetcast::session::{Action, Ctx, Now, Session};
use fleetcast::wire::frame::{FrameError, FrameReader, Message};
use fleetcast::wire::handshake::{self, Endpoint, Head, Scope};
use proptest::prelude::*;
use proptest::sample::{Index, select};
use proptest::test_runner::Config as ProptestConfig;
use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::ser::{Serialize, SerializeMap, SerializeSeq, Serializer};
use simd_json::prelude::{ValueAsArray, ValueAsObject, ValueAsScalar, ValueObjectAccess};
use std::collections::BTreeSet;
use std::fmt;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// A property's configuration: `default_cases` unless `FLEETCAST_PROPTEST_CASES` is set.
fn config(default_cases: u32) -> ProptestConfig {
    let cases = std::env::var("FLEETCAST_PROPTEST_CASES")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default_cases);
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// A small deterministic generator for choices that need no shrinking (masks, formatting).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next() % n }
    }
    /// True with probability `percent`/100.
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

// =====================================================================================
// A JSON model that keeps member order and duplicate names
// =====================================================================================

#[derive(Clone, Debug, PartialEq)]
enum J {
    Null,
    Bool(bool),
    Num(serde_json::Number),
    Str(String),
    Arr(Vec<J>),
    Obj(Vec<(String, J)>),
}

impl J {
    fn s(s: &str) -> J {
        J::Str(s.to_string())
    }
    fn int(n: i64) -> J {
        J::Num(n.into())
    }
    fn float(x: f64) -> J {
        J::Num(serde_json::Number::from_f64(x).expect("finite"))
    }
    /// The first member named `key` (what the broker's parser sees for small objects).
    fn get(&self, key: &str) -> Option<&J> {
        match self {
            J::Obj(m) => m.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }
    fn as_str(&self) -> Option<&str> {
        match self {
            J::Str(s) => Some(s),
            _ => None,
        }
    }
}

impl Serialize for J {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            J::Null => s.serialize_unit(),
            J::Bool(b) => s.serialize_bool(*b),
            J::Num(n) => n.serialize(s),
            J::Str(x) => s.serialize_str(x),
            J::Arr(items) => {
                let mut seq = s.serialize_seq(Some(items.len()))?;
                for i in items {
                    seq.serialize_element(i)?;
                }
                seq.end()
            }
            J::Obj(members) => {
                let mut map = s.serialize_map(Some(members.len()))?;
                for (k, v) in members {
                    map.serialize_entry(k, v)?;
                }
                map.end()
            }
        }
    }
}

impl<'de> Deserialize<'de> for J {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<J, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = J;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_unit<E>(self) -> Result<J, E> {
                Ok(J::Null)
            }
            fn visit_bool<E>(self, b: bool) -> Result<J, E> {
                Ok(J::Bool(b))
            }
            fn visit_i64<E>(self, n: i64) -> Result<J, E> {
                Ok(J::Num(n.into()))
            }
            fn visit_u64<E>(self, n: u64) -> Result<J, E> {
                Ok(J::Num(n.into()))
            }
            fn visit_f64<E: de::Error>(self, x: f64) -> Result<J, E> {
                serde_json::Number::from_f64(x)
                    .map(J::Num)
                    .ok_or_else(|| E::custom("non-finite number"))
            }
            fn visit_str<E>(self, s: &str) -> Result<J, E> {
                Ok(J::Str(s.to_string()))
            }
            fn visit_string<E>(self, s: String) -> Result<J, E> {
                Ok(J::Str(s))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut a: A) -> Result<J, A::Error> {
                let mut out = Vec::new();
                while let Some(v) = a.next_element()? {
                    out.push(v);
                }
                Ok(J::Arr(out))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut a: A) -> Result<J, A::Error> {
                let mut out = Vec::new();
                while let Some((k, v)) = a.next_entry::<String, J>()? {
                    out.push((k, v));
                }
                Ok(J::Obj(out))
            }
        }
        d.deserialize_any(V)
    }
}

/// Parses JSON text into the order-keeping model (serde_json's grammar).
fn parse_j(bytes: &[u8]) -> Option<J> {
    serde_json::from_slice(bytes).ok()
}

/// The value simd-json (the broker's validator) built, in the order-keeping model.
fn from_simd(v: &simd_json::BorrowedValue<'_>) -> J {
    if let Some(o) = v.as_object() {
        J::Obj(
            o.iter()
                .map(|(k, v)| (k.to_string(), from_simd(v)))
                .collect(),
        )
    } else if let Some(a) = v.as_array() {
        J::Arr(a.iter().map(from_simd).collect())
    } else if let Some(s) = v.as_str() {
        J::s(s)
    } else if let Some(b) = v.as_bool() {
        J::Bool(b)
    } else if let Some(n) = v.as_u64() {
        J::Num(n.into())
    } else if let Some(n) = v.as_i64() {
        J::Num(n.into())
    } else if let Some(x) = v.as_f64() {
        J::float(x)
    } else {
        J::Null
    }
}

/// Equality up to float rounding (serde_json's default float parser may be one ulp off),
/// member order included.
fn same(a: &J, b: &J) -> bool {
    match (a, b) {
        (J::Num(_), J::Num(_)) => same_unordered(a, b),
        (J::Arr(x), J::Arr(y)) => x.len() == y.len() && x.iter().zip(y).all(|(a, b)| same(a, b)),
        (J::Obj(x), J::Obj(y)) => {
            x.len() == y.len()
                && x.iter()
                    .zip(y)
                    .all(|((ka, va), (kb, vb))| ka == kb && same(va, vb))
        }
        _ => a == b,
    }
}

/// Parsed `text` is `expected`, as [`same`] sees it.
fn parses_to(text: &[u8], expected: Option<&J>) -> Result<(), TestCaseError> {
    let got = parse_j(text);
    let ok = match (&got, expected) {
        (Some(g), Some(e)) => same(g, e),
        (None, None) => true,
        _ => false,
    };
    prop_assert!(
        ok,
        "{:?} parsed to {:?}, expected {:?}",
        String::from_utf8_lossy(text),
        got,
        expected
    );
    Ok(())
}

/// Equality up to float rounding and the order of object members.
fn same_unordered(a: &J, b: &J) -> bool {
    match (a, b) {
        (J::Num(x), J::Num(y)) => {
            if x == y {
                return true;
            }
            let (x, y) = (x.as_f64().unwrap(), y.as_f64().unwrap());
            (x - y).abs() <= 1e-9 * x.abs().max(y.abs()).max(1e-300)
        }
        (J::Arr(x), J::Arr(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(a, b)| same_unordered(a, b))
        }
        (J::Obj(x), J::Obj(y)) => {
            let sorted = |m: &[(String, J)]| {
                let mut m = m.to_vec();
                m.sort_by(|a, b| a.0.cmp(&b.0));
                m
            };
            let (x, y) = (sorted(x), sorted(y));
            x.len() == y.len()
                && x.iter()
                    .zip(&y)
                    .all(|((ka, va), (kb, vb))| ka == kb && same_unordered(va, vb))
        }
        _ => a == b,
    }
}

/// How a JSON value is written.
#[derive(Clone, Debug)]
enum Style {
    Compact,
    Pretty,
    /// Random whitespace between tokens and random (valid) escapes in strings.
    Random(u64),
}

fn encode(j: &J, style: &Style) -> Vec<u8> {
    match style {
        Style::Compact => serde_json::to_vec(j).unwrap(),
        Style::Pretty => serde_json::to_vec_pretty(j).unwrap(),
        Style::Random(seed) => {
            let mut out = Vec::new();
            let mut rng = Rng(*seed);
            ws(&mut out, &mut rng);
            write_random(j, &mut rng, &mut out);
            ws(&mut out, &mut rng);
            out
        }
    }
}

fn ws(out: &mut Vec<u8>, rng: &mut Rng) {
    while rng.chance(20) {
        out.push(b" \n\r\t"[rng.below(4) as usize]);
    }
}

fn write_random(j: &J, rng: &mut Rng, out: &mut Vec<u8>) {
    match j {
        J::Null => out.extend_from_slice(b"null"),
        J::Bool(b) => out.extend_from_slice(if *b { b"true" } else { b"false" }),
        J::Num(n) => out.extend_from_slice(n.to_string().as_bytes()),
        J::Str(s) => write_random_str(s, rng, out),
        J::Arr(items) => {
            out.push(b'[');
            ws(out, rng);
            for (i, v) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                    ws(out, rng);
                }
                write_random(v, rng, out);
                ws(out, rng);
            }
            out.push(b']');
        }
        J::Obj(members) => {
            out.push(b'{');
            ws(out, rng);
            for (i, (k, v)) in members.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                    ws(out, rng);
                }
                write_random_str(k, rng, out);
                ws(out, rng);
                out.push(b':');
                ws(out, rng);
                write_random(v, rng, out);
                ws(out, rng);
            }
            out.push(b'}');
        }
    }
}

/// A string literal where any character may be written as an escape.
fn write_random_str(s: &str, rng: &mut Rng, out: &mut Vec<u8>) {
    let escape_rate = [0, 5, 30, 100][rng.below(4) as usize];
    out.push(b'"');
    for c in s.chars() {
        let hex = |out: &mut Vec<u8>, unit: u32, upper: bool| {
            let h = if upper {
                format!("\\u{unit:04X}")
            } else {
                format!("\\u{unit:04x}")
            };
            out.extend_from_slice(h.as_bytes());
        };
        let must = c == '"' || c == '\\' || (c as u32) < 0x20;
        if !must && !rng.chance(escape_rate) {
            let mut b = [0; 4];
            out.extend_from_slice(c.encode_utf8(&mut b).as_bytes());
            continue;
        }
        let short = match c {
            '"' => Some("\\\""),
            '\\' => Some("\\\\"),
            '/' => Some("\\/"),
            '\u{8}' => Some("\\b"),
            '\u{c}' => Some("\\f"),
            '\n' => Some("\\n"),
            '\r' => Some("\\r"),
            '\t' => Some("\\t"),
            _ => None,
        };
        match short {
            Some(e) if rng.chance(70) => out.extend_from_slice(e.as_bytes()),
            _ => {
                let upper = rng.chance(50);
                let mut units = [0u16; 2];
                for u in c.encode_utf16(&mut units) {
                    hex(out, *u as u32, upper);
                }
            }
        }
    }
    out.push(b'"');
}

fn arb_style() -> impl Strategy<Value = Style> {
    prop_oneof![
        1 => Just(Style::Compact),
        1 => Just(Style::Pretty),
        3 => any::<u64>().prop_map(Style::Random),
    ]
}

// =====================================================================================
// JSON generators
// =====================================================================================

/// Member names the native dialect reads, plus a few others.
const KEYS: &[&str] = &[
    "type",
    "id",
    "payload",
    "channel",
    "timestamp",
    "ack",
    "messages",
    "vehicle_id",
    "trip_id",
    "driver_id",
    "device_id",
    "location",
    "latitude",
    "longitude",
    "speed",
    "heading",
    "accuracy",
    "altitude",
    "severity",
    "category",
    "alert_type",
    "status",
    "new_status",
    "event",
    "alert_id",
    "fleet_id",
    "action",
    "data",
    "filters",
    "vehicle_ids",
    "metrics",
    "status_types",
    "subscriptions",
    "api_key",
    "token",
    "telemetry",
    "fuel_level",
    "engine_rpm",
];

const VIEWER_KEY: &str = "viewer-key-0123456789";
const DEVICE_KEY: &str = "device-key-0123456789";
const SERVICE_KEY: &str = "service-key-0123456789";
const ADMIN_KEY: &str = "admin-key-0123456789";
const HS256_SECRET: &str = "props-hs256-secret-0123456789abcdef";

/// String values the native dialect gives meaning to, plus edge cases.
fn words() -> &'static [String] {
    static W: OnceLock<Vec<String>> = OnceLock::new();
    W.get_or_init(|| {
        let mut w: Vec<String> = [
            "auth",
            "subscribe",
            "unsubscribe",
            "request",
            "ping",
            "ack",
            "batch",
            "publish",
            "low",
            "medium",
            "high",
            "critical",
            "info",
            "warning",
            "error",
            "v1",
            "v2",
            "t1",
            "d1",
            "a1",
            "fleet_a",
            "fleet_b",
            "",
            "2024-03-15T14:30:00.123Z",
            "2024-03-15T14:30:00+02:00",
            "1970-01-01T00:00:00Z",
            "9999-12-31T23:59:59.999Z",
            "yesterday",
            "online",
            "offline",
            "trip_started",
            "harsh_braking",
            VIEWER_KEY,
            DEVICE_KEY,
            SERVICE_KEY,
            ADMIN_KEY,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        for c in Channel::ALL {
            w.push(c.name().into());
            w.push(c.event_type().into());
        }
        w.push("x".repeat(128));
        w.push("y".repeat(129));
        w.push(token().to_string());
        w
    })
}

/// An HS256 token for fleet_a that expires 30 s into every session's fake clock.
fn token() -> &'static str {
    static T: OnceLock<String> = OnceLock::new();
    T.get_or_init(|| {
        auth::mint_hs256(
            HS256_SECRET,
            "u-token",
            "fleet_a",
            Role::Service,
            START_UNIX_MS as u64 / 1000 + 30,
            None,
        )
        .unwrap()
    })
}

fn arb_key() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => select(KEYS).prop_map(str::to_string),
        1 => "[a-z_]{0,8}",
        1 => any::<String>().prop_map(|s| s.chars().take(8).collect()),
    ]
}

fn arb_string() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => select(words()).prop_map(|s| s.clone()),
        2 => any::<String>().prop_map(|s| s.chars().take(24).collect()),
        1 => "[a-z0-9_\\-]{0,12}",
    ]
}

fn arb_number() -> impl Strategy<Value = J> {
    prop_oneof![
        (-5i64..200).prop_map(J::int),
        any::<i64>().prop_map(J::int),
        any::<u64>().prop_map(|n| J::Num(n.into())),
        (-200.0f64..200.0).prop_map(J::float),
        any::<f64>()
            .prop_filter("finite", |x| x.is_finite())
            .prop_map(J::float),
    ]
}

fn arb_leaf() -> impl Strategy<Value = J> {
    prop_oneof![
        1 => Just(J::Null),
        1 => any::<bool>().prop_map(J::Bool),
        3 => arb_number(),
        4 => arb_string().prop_map(J::Str),
    ]
}

/// Any JSON value of bounded depth and size; member names are often meaningful ones.
fn arb_json() -> impl Strategy<Value = J> {
    arb_leaf().prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(J::Arr),
            prop::collection::vec((arb_key(), inner), 0..8).prop_map(J::Obj),
        ]
    })
}

/// An optional member.
fn opt<S: Strategy<Value = J> + 'static>(
    key: &'static str,
    s: S,
) -> BoxedStrategy<Option<(String, J)>> {
    prop::option::weighted(0.5, s.prop_map(move |v| (key.to_string(), v))).boxed()
}

fn members_of(parts: Vec<Option<(String, J)>>) -> Vec<(String, J)> {
    parts.into_iter().flatten().collect()
}

fn arb_id_value() -> impl Strategy<Value = J> {
    prop_oneof![
        4 => select(&["v1", "v2", "t1", "d1", "a1"][..]).prop_map(J::s),
        1 => (0i64..1000).prop_map(J::int),
        1 => arb_leaf(),
    ]
}

fn arb_channel_name() -> impl Strategy<Value = J> {
    prop_oneof![
        8 => select(&Channel::ALL[..]).prop_map(|c| J::s(c.name())),
        1 => arb_leaf(),
    ]
}

fn arb_message_id() -> BoxedStrategy<Option<(String, J)>> {
    opt(
        "id",
        prop_oneof![
            "[a-z0-9\\-]{1,8}".prop_map(J::Str),
            (-5i64..100000).prop_map(J::int),
            arb_leaf(),
        ],
    )
}

fn arb_timestamp() -> BoxedStrategy<Option<(String, J)>> {
    opt(
        "timestamp",
        prop_oneof![
            8 => select(&[
                "2024-03-15T14:30:00.123Z",
                "2024-03-15T14:30:00+02:00",
                "2024-03-15t14:30:00z",
                "2023-11-14T22:13:20.5-01:30",
                "yesterday",
            ][..]).prop_map(J::s),
            1 => arb_leaf(),
        ],
    )
}

fn arb_list_or_one(item: BoxedStrategy<J>) -> BoxedStrategy<J> {
    prop_oneof![
        item.clone(),
        prop::collection::vec(item, 0..4).prop_map(J::Arr),
        Just(J::Null),
    ]
    .boxed()
}

fn arb_filters() -> BoxedStrategy<J> {
    let ids = arb_id_value().boxed();
    let sev = prop_oneof![
        select(&["low", "medium", "high", "critical", "info", "bogus"][..]).prop_map(J::s),
        arb_leaf()
    ]
    .boxed();
    let word = arb_string().prop_map(J::Str).boxed();
    (
        opt("vehicle_id", arb_list_or_one(ids.clone())),
        opt("vehicle_ids", arb_list_or_one(ids.clone())),
        opt("device_id", arb_list_or_one(ids.clone())),
        opt("trip_id", arb_list_or_one(ids.clone())),
        opt("driver_id", arb_list_or_one(ids)),
        opt("severity", arb_list_or_one(sev)),
        opt("category", arb_list_or_one(word.clone())),
        opt("metrics", arb_list_or_one(word.clone())),
        opt("status_types", arb_list_or_one(word)),
    )
        .prop_map(|(a, b, c, d, e, f, g, h, i)| J::Obj(members_of(vec![a, b, c, d, e, f, g, h, i])))
        .prop_shuffle_members()
        .boxed()
}

/// Shuffling the members of generated objects (member order must not matter).
trait ShuffleMembers: Strategy<Value = J> + Sized + 'static {
    fn prop_shuffle_members(self) -> BoxedStrategy<J> {
        (self, any::<u64>())
            .prop_map(|(j, seed)| match j {
                J::Obj(mut m) => {
                    let mut rng = Rng(seed);
                    for i in (1..m.len()).rev() {
                        m.swap(i, rng.below(i as u64 + 1) as usize);
                    }
                    J::Obj(m)
                }
                other => other,
            })
            .boxed()
    }
}
impl<S: Strategy<Value = J> + Sized + 'static> ShuffleMembers for S {}

fn arb_auth() -> BoxedStrategy<J> {
    let cred = prop_oneof![
        select(
            &[
                VIEWER_KEY,
                DEVICE_KEY,
                SERVICE_KEY,
                ADMIN_KEY,
                "nope-nope-nope"
            ][..]
        )
        .prop_map(|k| ("api_key".to_string(), J::s(k))),
        Just(("token".to_string(), J::s(token()))),
        arb_leaf().prop_map(|v| ("api_key".to_string(), v)),
        arb_leaf().prop_map(|v| ("token".to_string(), v)),
    ];
    let payload = (
        prop::option::weighted(0.9, cred),
        opt(
            "fleet_id",
            prop_oneof![
                select(&["fleet_a", "fleet_b"][..]).prop_map(J::s),
                arb_leaf()
            ],
        ),
        opt(
            "subscriptions",
            prop_oneof![
                prop::collection::vec(arb_channel_name(), 0..4).prop_map(J::Arr),
                arb_leaf()
            ],
        ),
    )
        .prop_map(|(c, f, s)| J::Obj(members_of(vec![c, f, s])))
        .prop_shuffle_members();
    (arb_message_id(), payload)
        .prop_map(|(id, p)| {
            J::Obj(members_of(vec![
                Some(("type".into(), J::s("auth"))),
                id,
                Some(("payload".into(), p)),
            ]))
        })
        .prop_shuffle_members()
}

fn arb_subscribe() -> BoxedStrategy<J> {
    let action = opt(
        "action",
        prop_oneof![
            8 => select(&["subscribe", "unsubscribe", "request"][..]).prop_map(J::s),
            1 => arb_leaf(),
        ],
    );
    let payload = (
        action,
        any::<bool>(),
        arb_channel_name(),
        opt("filters", arb_filters()),
    )
        .prop_map(|(action, in_data, channel, filters)| {
            let mut m = members_of(vec![action]);
            if in_data {
                let data = J::Obj(members_of(vec![Some(("channel".into(), channel)), filters]));
                m.push(("data".into(), data));
            } else {
                m.push(("channel".into(), channel));
                m.extend(filters);
            }
            J::Obj(m)
        })
        .prop_shuffle_members();
    (
        select(&["subscribe", "unsubscribe"][..]),
        arb_message_id(),
        payload,
    )
        .prop_map(|(ty, id, p)| {
            J::Obj(members_of(vec![
                Some(("type".into(), J::s(ty))),
                id,
                Some(("payload".into(), p)),
            ]))
        })
        .prop_shuffle_members()
}

/// A publish payload that is valid for its channel most of the time.
fn arb_publish_payload(channel: Channel) -> BoxedStrategy<J> {
    let vehicle = || opt("vehicle_id", arb_id_value());
    let extra = prop::collection::vec((arb_key(), arb_json()), 0..3);
    let sev = || {
        prop_oneof![
            6 => select(&["low", "medium", "high", "critical", "warning"][..]).prop_map(J::s),
            1 => arb_leaf(),
        ]
    };
    let word = || arb_string().prop_map(J::Str);
    let specific: BoxedStrategy<Vec<Option<(String, J)>>> = match channel {
        Channel::VehicleLocations => {
            let coord = |bound: f64| {
                prop_oneof![
                    8 => (-bound..=bound).prop_map(J::float),
                    1 => (-(bound as i64)..=bound as i64).prop_map(J::int),
                    1 => arb_leaf(),
                ]
            };
            let location = (
                opt("latitude", coord(90.0)),
                opt("longitude", coord(180.0)),
                opt(
                    "speed",
                    prop_oneof![arb_number(), Just(J::Null), arb_leaf()],
                ),
                opt("heading", arb_number()),
            )
                .prop_map(|(a, b, c, d)| J::Obj(members_of(vec![a, b, c, d])))
                .prop_shuffle_members();
            (
                prop::option::weighted(
                    0.9,
                    arb_id_value().prop_map(|v| ("vehicle_id".to_string(), v)),
                ),
                opt("location", prop_oneof![8 => location, 1 => arb_leaf()]),
            )
                .prop_map(|(v, l)| vec![v, l])
                .boxed()
        }
        Channel::Alerts | Channel::MaintenanceAlerts => (
            opt("alert_id", arb_id_value()),
            opt("severity", sev()),
            opt("category", word()),
            opt("alert_type", word()),
            vehicle(),
        )
            .prop_map(|(a, b, c, d, e)| vec![a, b, c, d, e])
            .boxed(),
        Channel::Telemetry => (
            vehicle(),
            opt(
                "telemetry",
                prop::collection::vec(
                    (
                        prop_oneof![
                            select(&["fuel_level", "engine_rpm", "odometer"][..])
                                .prop_map(str::to_string),
                            arb_key()
                        ],
                        arb_number(),
                    ),
                    0..5,
                )
                .prop_map(J::Obj),
            ),
        )
            .prop_map(|(a, b)| vec![a, b])
            .boxed(),
        Channel::TripEvents => (
            opt("trip_id", arb_id_value()),
            opt("event", word()),
            vehicle(),
        )
            .prop_map(|(a, b, c)| vec![a, b, c])
            .boxed(),
        Channel::DeviceStatus => (
            vehicle(),
            opt("device_id", arb_id_value()),
            opt("status", word()),
            opt("new_status", word()),
        )
            .prop_map(|(a, b, c, d)| vec![a, b, c, d])
            .boxed(),
        Channel::DriverStatus => (
            opt("driver_id", arb_id_value()),
            vehicle(),
            opt("status", word()),
        )
            .prop_map(|(a, b, c)| vec![a, b, c])
            .boxed(),
        _ => (vehicle(), opt("trip_id", arb_id_value()))
            .prop_map(|(a, b)| vec![a, b])
            .boxed(),
    };
    (
        specific,
        opt(
            "fleet_id",
            prop_oneof![
                select(&["fleet_a", "fleet_b"][..]).prop_map(J::s),
                arb_leaf()
            ],
        ),
        extra,
    )
        .prop_map(|(m, f, extra)| {
            let mut m = members_of(m);
            m.extend(f);
            // Extra members never repeat a name the channel reads.
            for (k, v) in extra {
                if !m.iter().any(|(x, _)| *x == k) {
                    m.push((k, v));
                }
            }
            J::Obj(m)
        })
        .prop_shuffle_members()
}

fn arb_publish() -> BoxedStrategy<J> {
    let publishable: Vec<Channel> = Channel::ALL
        .into_iter()
        .filter(|c| *c != Channel::System)
        .collect();
    (
        select(publishable),
        any::<bool>(),
        arb_message_id(),
        arb_timestamp(),
        opt(
            "ack",
            prop_oneof![any::<bool>().prop_map(J::Bool), arb_leaf()],
        ),
    )
        .prop_flat_map(|(channel, generic, id, ts, ack)| {
            arb_publish_payload(channel).prop_map(move |payload| {
                let mut m = vec![];
                if generic {
                    m.push(("type".to_string(), J::s("publish")));
                    m.push(("channel".to_string(), J::s(channel.name())));
                } else {
                    m.push(("type".to_string(), J::s(channel.event_type())));
                }
                m.extend(id.clone());
                m.extend(ts.clone());
                m.extend(ack.clone());
                m.push(("payload".to_string(), payload));
                J::Obj(m)
            })
        })
        .prop_shuffle_members()
}

fn arb_simple() -> BoxedStrategy<J> {
    (select(&["ping", "ack"][..]), arb_message_id())
        .prop_map(|(ty, id)| J::Obj(members_of(vec![Some(("type".into(), J::s(ty))), id])))
        .prop_shuffle_members()
}

/// A message of every kind the native dialect knows, mostly valid, members shuffled.
fn arb_valid_message() -> BoxedStrategy<J> {
    let single = prop_oneof![
        2 => arb_auth(),
        3 => arb_subscribe(),
        5 => arb_publish(),
        1 => arb_simple(),
    ]
    .boxed();
    let batch = (
        prop::collection::vec(prop_oneof![8 => single.clone(), 1 => arb_json()], 0..5),
        arb_message_id(),
    )
        .prop_map(|(items, id)| {
            J::Obj(members_of(vec![
                Some(("type".into(), J::s("batch"))),
                id,
                Some(("messages".into(), J::Arr(items))),
            ]))
        })
        .prop_shuffle_members();
    prop_oneof![6 => single, 1 => batch].boxed()
}

/// Replaces, removes or adds top-level members (never duplicating a name).
fn mutate_members(j: J, edits: &[(u8, Index, J, String)]) -> J {
    let J::Obj(mut m) = j else { return j };
    for (op, at, value, key) in edits {
        match op % 3 {
            0 if !m.is_empty() => {
                let i = at.index(m.len());
                m[i].1 = value.clone();
            }
            1 if !m.is_empty() => {
                m.remove(at.index(m.len()));
            }
            _ => {
                if !m.iter().any(|(k, _)| k == key) {
                    m.insert(at.index(m.len() + 1), (key.clone(), value.clone()));
                }
            }
        }
    }
    J::Obj(m)
}

/// Messages as values: valid ones, ones with members edited, and random objects.
fn arb_message_value() -> impl Strategy<Value = J> {
    prop_oneof![
        4 => arb_valid_message(),
        3 => (
            arb_valid_message(),
            prop::collection::vec((any::<u8>(), any::<Index>(), arb_json(), arb_key()), 1..3),
        )
            .prop_map(|(j, edits)| mutate_members(j, &edits)),
        1 => prop::collection::vec((arb_key(), arb_json()), 0..6).prop_map(|m| {
            // Random objects: unique top-level names.
            let mut seen = BTreeSet::new();
            J::Obj(m.into_iter().filter(|(k, _)| seen.insert(k.clone())).collect())
        }),
        1 => arb_json(),
    ]
}

/// Byte-level damage: flips, insertions (of structural bytes, mostly), deletions,
/// duplicated and truncated spans.
#[derive(Clone, Debug)]
enum Mutation {
    Flip(Index, u8),
    Insert(Index, u8),
    Delete(Index),
    Duplicate(Index, Index),
    Truncate(Index),
}

fn arb_mutation() -> impl Strategy<Value = Mutation> {
    let byte = prop_oneof![select(&b"{}[]\",:\\ 0-1.eE+tfnu/"[..]), any::<u8>(),];
    prop_oneof![
        3 => (any::<Index>(), 0u8..8).prop_map(|(i, b)| Mutation::Flip(i, b)),
        3 => (any::<Index>(), byte).prop_map(|(i, b)| Mutation::Insert(i, b)),
        3 => any::<Index>().prop_map(Mutation::Delete),
        1 => (any::<Index>(), any::<Index>()).prop_map(|(a, b)| Mutation::Duplicate(a, b)),
        1 => any::<Index>().prop_map(Mutation::Truncate),
    ]
}

fn apply_mutations(mut b: Vec<u8>, ms: &[Mutation]) -> Vec<u8> {
    for m in ms {
        match m {
            Mutation::Flip(i, bit) if !b.is_empty() => {
                let i = i.index(b.len());
                b[i] ^= 1 << bit;
            }
            Mutation::Insert(i, x) => {
                let i = i.index(b.len() + 1);
                b.insert(i, *x);
            }
            Mutation::Delete(i) if !b.is_empty() => {
                b.remove(i.index(b.len()));
            }
            Mutation::Duplicate(i, j) if !b.is_empty() => {
                let (mut s, mut e) = (i.index(b.len()), j.index(b.len()));
                if s > e {
                    std::mem::swap(&mut s, &mut e);
                }
                let span = b[s..e.min(s + 64)].to_vec();
                b.splice(e..e, span);
            }
            Mutation::Truncate(i) => b.truncate(i.index(b.len() + 1)),
            _ => {}
        }
    }
    b
}

/// A valid message, serialized in some style, then damaged.
fn arb_mutated_message() -> impl Strategy<Value = Vec<u8>> {
    (
        arb_valid_message(),
        arb_style(),
        prop::collection::vec(arb_mutation(), 1..5),
    )
        .prop_map(|(j, style, ms)| apply_mutations(encode(&j, &style), &ms))
}

// =====================================================================================
// 1-2. RFC 6455 frames
// =====================================================================================

/// A client frame: FIN/RSV/opcode byte, masked payload; `form` picks the length encoding
/// (0: the shortest, 1: 16-bit, 2: 64-bit, when the length fits).
fn client_frame(out: &mut Vec<u8>, first: u8, payload: &[u8], mask: [u8; 4], form: u8) {
    out.push(first);
    let n = payload.len();
    match form {
        2 => {
            out.push(0x80 | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
        1 if n <= 0xFFFF => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        _ if n <= 125 => out.push(0x80 | n as u8),
        _ if n <= 0xFFFF => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        _ => {
            out.push(0x80 | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
}

/// A decoded message, owned.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Out {
    Text(Vec<u8>),
    Binary(Vec<u8>),
    Ping(Vec<u8>),
    Pong,
    Close(Option<u16>),
}

fn own(m: Message<'_>) -> Out {
    match m {
        Message::Text(t) => Out::Text(t.to_vec()),
        Message::Binary(b) => Out::Binary(b.to_vec()),
        Message::Ping(p) => Out::Ping(p.to_vec()),
        Message::Pong => Out::Pong,
        Message::Close(c) => Out::Close(c),
    }
}

/// What a reader made of a byte stream: the messages, then the error or the bytes left.
#[derive(Debug, PartialEq, Eq)]
struct Outcome {
    messages: Vec<Out>,
    end: Result<usize, FrameError>,
}

/// Feeds `bytes` to a fresh reader the way a socket loop does: the unconsumed remainder
/// plus the next chunk, `cuts` giving the chunk boundaries. Asserts that no call consumes
/// more than it was given and that an incomplete remainder is left untouched.
fn feed_chunked(limit: usize, bytes: &[u8], cuts: &[usize]) -> Outcome {
    let mut reader = FrameReader::new(limit);
    let mut messages = Vec::new();
    let mut buf: Vec<u8> = Vec::new();
    let mut bounds: Vec<usize> = cuts.iter().map(|&c| c.min(bytes.len())).collect();
    bounds.push(bytes.len());
    bounds.sort_unstable();
    let mut from = 0;
    for to in bounds {
        buf.extend_from_slice(&bytes[from..to]);
        from = to;
        let before = buf.clone();
        match reader.decode(&mut buf, |m| {
            messages.push(own(m));
            true
        }) {
            Ok(n) => {
                assert!(n <= buf.len(), "consumed {n} of {} bytes", buf.len());
                assert_eq!(
                    buf[n..],
                    before[n..],
                    "the unconsumed remainder was modified"
                );
                buf.drain(..n);
            }
            Err(e) => {
                return Outcome {
                    messages,
                    end: Err(e),
                };
            }
        }
    }
    Outcome {
        messages,
        end: Ok(buf.len()),
    }
}

/// Decodes `bytes` with a callback that stops after every message, resuming each time.
fn feed_one_at_a_time(limit: usize, bytes: &[u8]) -> Outcome {
    let mut reader = FrameReader::new(limit);
    let mut messages = Vec::new();
    let mut buf = bytes.to_vec();
    loop {
        let seen = messages.len();
        match reader.decode(&mut buf, |m| {
            messages.push(own(m));
            false
        }) {
            Ok(n) => {
                assert!(n <= buf.len());
                assert!(messages.len() <= seen + 1, "decode went on after false");
                buf.drain(..n);
                if n == 0 {
                    return Outcome {
                        messages,
                        end: Ok(buf.len()),
                    };
                }
            }
            Err(e) => {
                return Outcome {
                    messages,
                    end: Err(e),
                };
            }
        }
    }
}

/// Invariants of anything a reader delivers.
fn check_delivered(messages: &[Out], limit: usize) {
    for m in messages {
        match m {
            Out::Text(t) => {
                assert!(std::str::from_utf8(t).is_ok(), "text is not UTF-8");
                assert!(t.len() <= limit, "text of {} over limit {limit}", t.len());
            }
            Out::Binary(b) => assert!(b.len() <= limit),
            Out::Ping(p) => assert!(p.len() <= 125),
            Out::Pong => {}
            Out::Close(Some(c)) => {
                assert!(matches!(c, 1000..=1003 | 1007..=1011 | 3000..=4999), "{c}")
            }
            Out::Close(None) => {}
        }
    }
}

/// A frame that is plausible enough to reach the reader's checks.
#[derive(Clone, Debug)]
struct RawFrame {
    first: u8,
    masked: bool,
    form: u8,
    payload: Vec<u8>,
    mask: [u8; 4],
}

fn arb_raw_frame() -> impl Strategy<Value = RawFrame> {
    let first = prop_oneof![
        8 => select(&[0x81u8, 0x82, 0x01, 0x02, 0x00, 0x80, 0x89, 0x8A, 0x88][..]),
        2 => any::<u8>(),
    ];
    let payload = prop_oneof![
        6 => prop::collection::vec(any::<u8>(), 0..40),
        2 => any::<String>().prop_map(String::into_bytes),
        1 => (any::<u16>(), prop::collection::vec(any::<u8>(), 0..8)).prop_map(|(code, r)| {
            let mut p = code.to_be_bytes().to_vec();
            p.extend(r);
            p
        }),
        1 => (120usize..300, any::<u8>()).prop_map(|(n, b)| vec![b; n]),
    ];
    (
        first,
        prop::bool::weighted(0.95),
        0u8..3,
        payload,
        any::<[u8; 4]>(),
    )
        .prop_map(|(first, masked, form, payload, mask)| RawFrame {
            first,
            masked,
            form,
            payload,
            mask,
        })
}

fn raw_frames_bytes(frames: &[RawFrame]) -> Vec<u8> {
    let mut out = Vec::new();
    for f in frames {
        if f.masked {
            client_frame(&mut out, f.first, &f.payload, f.mask, f.form);
        } else {
            let mut tmp = Vec::new();
            client_frame(&mut tmp, f.first, &f.payload, [0; 4], f.form);
            // Same frame without the mask bit and key.
            let key_at = tmp.len() - f.payload.len() - 4;
            tmp[1] &= 0x7F;
            tmp.drain(key_at..key_at + 4);
            out.extend(tmp);
        }
    }
    out
}

/// A message a client sends, and how it is framed.
#[derive(Clone, Debug)]
enum ClientMsg {
    /// Data message, the cut points of its fragments, pings to interleave (gap index).
    Data {
        text: bool,
        payload: Vec<u8>,
        cuts: Vec<Index>,
        pings: Vec<(Index, Vec<u8>)>,
    },
    Ping(Vec<u8>),
    Pong(Vec<u8>),
}

fn arb_text(max: usize) -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(any::<char>(), 0..=max.min(200)).prop_map(move |cs| {
        let mut s: String = cs.into_iter().collect();
        while s.len() > max {
            s.pop();
        }
        s.into_bytes()
    })
}

fn arb_binary(max: usize) -> BoxedStrategy<Vec<u8>> {
    let small = prop::collection::vec(any::<u8>(), 0..=max.min(300));
    if max <= 300 {
        return small.boxed();
    }
    prop_oneof![
        9 => small,
        // Large payloads (16- and 64-bit lengths), filled cheaply.
        1 => (301..=max, any::<u64>()).prop_map(|(n, seed)| {
            let mut r = Rng(seed);
            (0..n).map(|_| r.next() as u8).collect()
        }),
    ]
    .boxed()
}

fn arb_client_msg(limit: usize) -> impl Strategy<Value = ClientMsg> {
    let control = || prop::collection::vec(any::<u8>(), 0..=125);
    let data = (
        any::<bool>(),
        prop::collection::vec(any::<Index>(), 0..5),
        prop::collection::vec((any::<Index>(), control()), 0..3),
    )
        .prop_flat_map(move |(text, cuts, pings)| {
            let payload = if text {
                arb_text(limit).boxed()
            } else {
                arb_binary(limit)
            };
            payload.prop_map(move |payload| ClientMsg::Data {
                text,
                payload,
                cuts: cuts.clone(),
                pings: pings.clone(),
            })
        });
    prop_oneof![
        6 => data,
        2 => control().prop_map(ClientMsg::Ping),
        1 => control().prop_map(ClientMsg::Pong),
    ]
}

/// Frames `msgs` (plus an optional final close) and the messages a reader must yield.
fn frame_stream(
    msgs: &[ClientMsg],
    close: Option<(u16, String)>,
    seed: u64,
) -> (Vec<u8>, Vec<Out>) {
    let mut rng = Rng(seed);
    let mut mask = || (rng.next() as u32).to_ne_bytes();
    let mut bytes = Vec::new();
    let mut expected = Vec::new();
    for m in msgs {
        match m {
            ClientMsg::Ping(p) => {
                client_frame(&mut bytes, 0x89, p, mask(), 0);
                expected.push(Out::Ping(p.clone()));
            }
            ClientMsg::Pong(p) => {
                client_frame(&mut bytes, 0x8A, p, mask(), 0);
                expected.push(Out::Pong);
            }
            ClientMsg::Data {
                text,
                payload,
                cuts,
                pings,
            } => {
                let mut points: Vec<usize> =
                    cuts.iter().map(|c| c.index(payload.len() + 1)).collect();
                points.sort_unstable();
                points.dedup();
                let mut pieces = Vec::new();
                let mut from = 0;
                for p in points {
                    pieces.push(&payload[from..p]);
                    from = p;
                }
                pieces.push(&payload[from..]);
                let gaps = pieces.len() - 1;
                for (i, piece) in pieces.iter().enumerate() {
                    let fin = if i == gaps { 0x80 } else { 0 };
                    let op = if i > 0 {
                        0x0
                    } else if *text {
                        0x1
                    } else {
                        0x2
                    };
                    client_frame(&mut bytes, fin | op, piece, mask(), 0);
                    if i < gaps {
                        for (at, p) in pings {
                            if at.index(gaps) == i {
                                client_frame(&mut bytes, 0x89, p, mask(), 0);
                                expected.push(Out::Ping(p.clone()));
                            }
                        }
                    }
                }
                expected.push(if *text {
                    Out::Text(payload.clone())
                } else {
                    Out::Binary(payload.clone())
                });
            }
        }
    }
    if let Some((code, reason)) = close {
        let mut p = code.to_be_bytes().to_vec();
        p.extend_from_slice(reason.as_bytes());
        client_frame(&mut bytes, 0x88, &p, mask(), 0);
        expected.push(Out::Close(Some(code)));
    }
    (bytes, expected)
}

fn arb_limit() -> impl Strategy<Value = usize> {
    prop_oneof![
        3 => 0usize..200,
        3 => 200usize..5000,
        1 => 65_000usize..70_000,
    ]
}

fn arb_close() -> impl Strategy<Value = Option<(u16, String)>> {
    prop::option::of((
        prop_oneof![1000u16..=1003, 1007u16..=1011, 3000u16..=4999],
        "[a-zé ]{0,40}",
    ))
}

proptest! {
    #![proptest_config(config(3000))]

    /// Arbitrary bytes, whole or in chunks: no panic, no over-consumption, the same
    /// messages and the same verdict however the stream is cut.
    #[test]
    fn frames_arbitrary_bytes(
        bytes in prop::collection::vec(any::<u8>(), 0..400),
        limit in 0usize..300,
        cuts in prop::collection::vec(any::<Index>(), 0..10),
    ) {
        let cuts: Vec<usize> = cuts.iter().map(|c| c.index(bytes.len() + 1)).collect();
        let whole = feed_chunked(limit, &bytes, &[]);
        check_delivered(&whole.messages, limit);
        prop_assert_eq!(&feed_chunked(limit, &bytes, &cuts), &whole);
        prop_assert_eq!(&feed_one_at_a_time(limit, &bytes), &whole);
    }

    /// Streams of plausible frames (valid, reserved, unmasked, oversized, bad close codes,
    /// bad UTF-8), possibly damaged: the same properties, deeper into the reader.
    #[test]
    fn frames_plausible_streams(
        frames in prop::collection::vec(arb_raw_frame(), 0..8),
        limit in 0usize..300,
        damage in prop::collection::vec((any::<Index>(), any::<u8>()), 0..2),
        cuts in prop::collection::vec(any::<Index>(), 0..10),
        bytewise in prop::bool::weighted(0.2),
    ) {
        let mut bytes = raw_frames_bytes(&frames);
        for (at, b) in &damage {
            if !bytes.is_empty() {
                let i = at.index(bytes.len());
                bytes[i] = *b;
            }
        }
        let cuts: Vec<usize> = if bytewise {
            (0..bytes.len()).collect()
        } else {
            cuts.iter().map(|c| c.index(bytes.len() + 1)).collect()
        };
        let whole = feed_chunked(limit, &bytes, &[]);
        check_delivered(&whole.messages, limit);
        prop_assert_eq!(&feed_chunked(limit, &bytes, &cuts), &whole);
        prop_assert_eq!(&feed_one_at_a_time(limit, &bytes), &whole);
    }
}

proptest! {
    #![proptest_config(config(1000))]

    /// Valid masked client streams (fragmented data messages with pings in between,
    /// random masks, a final close) yield exactly the original messages, however chunked.
    #[test]
    fn frames_valid_streams_roundtrip(
        (limit, msgs) in arb_limit().prop_flat_map(|limit| {
            (Just(limit), prop::collection::vec(arb_client_msg(limit), 0..6))
        }),
        close in arb_close(),
        seed in any::<u64>(),
        cuts in prop::collection::vec(any::<Index>(), 0..16),
    ) {
        let (bytes, expected) = frame_stream(&msgs, close, seed);
        let expect = Outcome { messages: expected, end: Ok(0) };
        prop_assert_eq!(&feed_chunked(limit, &bytes, &[]), &expect);
        let cuts: Vec<usize> = cuts.iter().map(|c| c.index(bytes.len() + 1)).collect();
        prop_assert_eq!(&feed_chunked(limit, &bytes, &cuts), &expect);
        prop_assert_eq!(&feed_one_at_a_time(limit, &bytes), &expect);
        if bytes.len() <= 2048 {
            let every: Vec<usize> = (0..bytes.len()).collect();
            prop_assert_eq!(&feed_chunked(limit, &bytes, &every), &expect);
        }
    }
}

proptest! {
    #![proptest_config(config(1500))]

    /// A data frame announcing more than the limit is refused with TooBig (close 1009) as
    /// soon as its header is complete, whatever part of the payload has arrived; a shorter
    /// prefix of the header just waits. The same for a continuation that would push the
    /// message past the limit.
    #[test]
    fn frames_too_big_refused_before_payload(
        limit in 0usize..100_000,
        excess in prop_oneof![1u64..1000, 1u64..u32::MAX as u64, 1u64..u64::MAX / 2],
        first_fragment in prop::option::of(0usize..3_000),
        opcode in select(&[0x1u8, 0x2][..]),
        fin in any::<bool>(),
        form in 0u8..3,
        mask in any::<[u8; 4]>(),
        present in 0usize..64,
        pings_before in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..4), 0..2),
    ) {
        let mut bytes = Vec::new();
        for p in &pings_before {
            client_frame(&mut bytes, 0x89, p, mask, 0);
        }
        // An unfinished message of `done` bytes already read, when a continuation is tested.
        let done = first_fragment.map(|n| n.min(limit));
        if let Some(done) = done {
            client_frame(&mut bytes, opcode, &vec![b'a'; done], mask, 0);
        }
        let room = (limit - done.unwrap_or(0)) as u64;
        let len = room.saturating_add(excess);
        let first = if fin { 0x80 } else { 0 } | if done.is_some() { 0x0 } else { opcode };
        let before_header = bytes.len();
        bytes.push(first);
        match form {
            0 if len <= 125 => bytes.push(0x80 | len as u8),
            0 | 1 if len <= 0xFFFF => {
                bytes.push(0x80 | 126);
                bytes.extend_from_slice(&(len as u16).to_be_bytes());
            }
            _ => {
                bytes.push(0x80 | 127);
                bytes.extend_from_slice(&len.to_be_bytes());
            }
        }
        bytes.extend_from_slice(&mask);
        let header_end = bytes.len();
        bytes.extend(std::iter::repeat_n(b'a', present.min((len - 1) as usize)));
        for cut in before_header..header_end {
            let partial = feed_chunked(limit, &bytes[..cut], &[]);
            prop_assert_eq!(partial.end, Ok(cut - before_header), "header cut at {}", cut);
        }
        let out = feed_chunked(limit, &bytes, &[]);
        prop_assert_eq!(out.end, Err(FrameError::TooBig));
        prop_assert_eq!(FrameError::TooBig.close_code(), 1009);
        prop_assert_eq!(out.messages.len(), pings_before.len());
    }
}

// =====================================================================================
// 3. The native parser
// =====================================================================================

/// What a decode means, without byte offsets: equal for any encoding of the same value.
fn meaning(
    raw: &[u8],
    id: &Option<std::ops::Range<usize>>,
    cmd: &Result<Command, native::ProtoError>,
) -> String {
    let id = id.as_ref().map(|r| parse_j(&raw[r.clone()]));
    let cmd = match cmd {
        Ok(Command::Publish(p)) => format!(
            "publish {:?} keys={:?} sev={:?} cat={:?} status={:?} ts={:?} fleet={:?} ack={} payload={:?}",
            p.channel,
            p.keys,
            p.severity,
            p.category,
            p.status,
            p.timestamp.as_ref().map(|t| t.1),
            p.fleet_id,
            p.ack,
            parse_j(&raw[p.payload.clone()]),
        ),
        Ok(Command::Batch(items)) => format!(
            "batch {:?}",
            items
                .iter()
                .map(|r| parse_j(&raw[r.clone()]))
                .collect::<Vec<_>>()
        ),
        Ok(other) => format!("{other:?}"),
        Err(e) => format!("error {e:?}"),
    };
    format!("id={id:?} {cmd}")
}

/// Checks every range a decode returned against the message (any input).
fn check_decode(
    raw: &[u8],
    id: &Option<std::ops::Range<usize>>,
    cmd: &Result<Command, native::ProtoError>,
) -> Result<(), TestCaseError> {
    if let Some(r) = id {
        let v = parse_j(&raw[r.clone()]);
        prop_assert!(
            matches!(v, Some(J::Str(_) | J::Num(_))),
            "id {:?} is not a JSON string or number",
            String::from_utf8_lossy(&raw[r.clone()])
        );
    }
    match cmd {
        Ok(Command::Publish(p)) => {
            let forwarded = parse_j(&raw[p.payload.clone()]);
            prop_assert!(
                matches!(forwarded, Some(J::Obj(_))),
                "forwarded payload {:?} is not an object",
                String::from_utf8_lossy(&raw[p.payload.clone()])
            );
            // The bytes forwarded are the payload that was validated.
            let mut scratch = raw.to_vec();
            let validated = simd_json::to_borrowed_value(&mut scratch).expect("decode accepted it");
            let validated = from_simd(validated.get("payload").expect("validated payload"));
            prop_assert!(
                same_unordered(forwarded.as_ref().unwrap(), &validated),
                "forwarded {:?} but validated {:?}",
                forwarded,
                validated
            );
            if let Some((r, ms)) = &p.timestamp {
                let Some(J::Str(t)) = parse_j(&raw[r.clone()]) else {
                    return Err(TestCaseError::fail("timestamp range is not a string"));
                };
                prop_assert_eq!(native::parse_rfc3339_ms(&t), Some(*ms));
            }
        }
        Ok(Command::Batch(items)) => {
            for r in items {
                prop_assert!(parse_j(&raw[r.clone()]).is_some(), "batch item is not JSON");
            }
        }
        _ => {}
    }
    Ok(())
}

/// Top-level objects whose names repeat (`payload`, `timestamp`, ...), written in any style,
/// sometimes padded past 32 members (where simd-json switches to a hash map).
fn arb_duplicated() -> impl Strategy<Value = J> {
    (
        arb_publish(),
        prop::collection::vec(
            (
                select(&["payload", "timestamp", "id", "type", "messages", "ack"][..]),
                prop_oneof![
                    arb_publish_payload(Channel::FleetMetrics),
                    arb_json(),
                    arb_timestamp().prop_map(|t| t.map(|t| t.1).unwrap_or(J::Null)),
                ],
                any::<Index>(),
            ),
            1..3,
        ),
        prop::option::weighted(0.3, 20usize..40),
    )
        .prop_map(|(j, dups, pad)| {
            let J::Obj(mut m) = j else { unreachable!() };
            for (k, v, at) in dups {
                m.insert(at.index(m.len() + 1), (k.to_string(), v));
            }
            for i in 0..pad.unwrap_or(0) {
                m.push((format!("pad{i}"), J::int(i as i64)));
            }
            J::Obj(m)
        })
}

proptest! {
    #![proptest_config(config(3000))]

    /// Arbitrary bytes: no panic, and every range returned is sound.
    #[test]
    fn parser_arbitrary_bytes(raw in prop::collection::vec(any::<u8>(), 0..300)) {
        let (id, cmd) = Parser::default().decode(&raw);
        check_decode(&raw, &id, &cmd)?;
    }
}

proptest! {
    #![proptest_config(config(2000))]

    /// Valid messages damaged byte by byte: no panic; a publish that still passes forwards
    /// exactly the payload it validated.
    #[test]
    fn parser_mutated_messages(raw in arb_mutated_message()) {
        let mut parser = Parser::default();
        let (id, cmd) = parser.decode(&raw);
        check_decode(&raw, &id, &cmd)?;
        // The parser's reused buffers do not leak state between messages.
        let again = parser.decode(&raw);
        prop_assert_eq!(meaning(&raw, &again.0, &again.1), meaning(&raw, &id, &cmd));
    }
}

proptest! {
    #![proptest_config(config(1500))]

    /// Any JSON value (mostly message-shaped): the decode means the same whatever the
    /// encoding (compact, pretty, random whitespace and escapes), and a publish forwards
    /// the original payload, id and timestamp.
    #[test]
    fn parser_json_values(msg in arb_message_value(), seeds in any::<[u64; 2]>()) {
        let mut parser = Parser::default();
        let mut meanings = Vec::new();
        for style in [Style::Compact, Style::Pretty, Style::Random(seeds[0]), Style::Random(seeds[1])] {
            let raw = encode(&msg, &style);
            let (id, cmd) = parser.decode(&raw);
            check_decode(&raw, &id, &cmd)?;
            if let Some(r) = &id {
                parses_to(&raw[r.clone()], msg.get("id"))?;
            }
            if let Ok(Command::Publish(p)) = &cmd {
                parses_to(&raw[p.payload.clone()], msg.get("payload"))?;
                if let Some((r, _)) = &p.timestamp {
                    parses_to(&raw[r.clone()], msg.get("timestamp"))?;
                }
            }
            if let Ok(Command::Batch(items)) = &cmd {
                let Some(J::Arr(original)) = msg.get("messages") else {
                    return Err(TestCaseError::fail("batch decoded without messages"));
                };
                prop_assert_eq!(items.len(), original.len());
                for (r, o) in items.iter().zip(original) {
                    parses_to(&raw[r.clone()], Some(o))?;
                }
            }
            meanings.push((style, meaning(&raw, &id, &cmd)));
        }
        for (style, m) in &meanings[1..] {
            prop_assert_eq!(m, &meanings[0].1, "{:?} vs compact", style);
        }
    }
}

proptest! {
    #![proptest_config(config(1000))]

    /// Repeated top-level names: whatever the parser decides, a publish forwards the
    /// payload it validated (not another member of the same name).
    #[test]
    fn parser_duplicate_members(msg in arb_duplicated(), style in arb_style()) {
        let raw = encode(&msg, &style);
        let (id, cmd) = Parser::default().decode(&raw);
        check_decode(&raw, &id, &cmd)?;
    }
}

// =====================================================================================
// 4. JSON helpers
// =====================================================================================

fn decoded_key(raw: &[u8]) -> String {
    let mut quoted = b"\"".to_vec();
    quoted.extend_from_slice(raw);
    quoted.push(b'"');
    serde_json::from_slice(&quoted).expect("a raw key is a valid string body")
}

fn arb_members() -> impl Strategy<Value = Vec<(String, J)>> {
    prop::collection::vec(
        (
            prop_oneof![
                arb_key(),
                any::<String>(),
                select(words()).prop_map(|s| s.clone())
            ],
            prop_oneof![3 => arb_leaf(), 2 => arb_json()],
        ),
        0..8,
    )
}

proptest! {
    #![proptest_config(config(5000))]

    /// `write_str` writes a literal that parses back to the same string.
    #[test]
    fn json_write_str_roundtrip(s in prop_oneof![
        any::<String>(),
        prop::collection::vec(any::<char>(), 0..64).prop_map(String::from_iter),
        prop::collection::vec(0u8..0x80, 0..64).prop_map(|b| String::from_utf8(b).unwrap()),
    ]) {
        let mut out = b"junk".to_vec();
        json::write_str(&mut out, &s);
        prop_assert_eq!(&out[..4], b"junk");
        let lit = &out[4..];
        prop_assert!(lit.iter().all(|&b| b >= 0x20), "raw control byte in {:?}", lit);
        let back: String = serde_json::from_slice(lit).unwrap();
        prop_assert_eq!(back, s);
    }
}

proptest! {
    #![proptest_config(config(1000))]

    /// `object_members` finds every member of a serialized object, in order, with the
    /// right name and value span; `array_elements` does the same for arrays.
    #[test]
    fn json_members_and_elements(members in arb_members(), style in arb_style()) {
        let obj = J::Obj(members.clone());
        let text = encode(&obj, &style);
        let found = json::object_members(&text).expect("an object");
        prop_assert_eq!(found.len(), members.len());
        for (m, (k, v)) in found.iter().zip(&members) {
            prop_assert_eq!(&decoded_key(&text[m.key.clone()]), k);
            parses_to(&text[m.value.clone()], Some(v))?;
        }
        let arr = J::Arr(members.iter().map(|(_, v)| v.clone()).collect());
        let text = encode(&arr, &style);
        let found = json::array_elements(&text).expect("an array");
        prop_assert_eq!(found.len(), members.len());
        for (r, (_, v)) in found.iter().zip(&members) {
            parses_to(&text[r.clone()], Some(v))?;
        }
        prop_assert!(json::object_members(&text).is_none());
        if !members.is_empty() {
            prop_assert!(json::array_elements(&encode(&obj, &style)).is_none());
        }
    }

    /// `project_metrics` keeps every member and its order, and reduces each `telemetry`
    /// object to the named metrics, in their original order.
    #[test]
    fn json_project_metrics(
        members in arb_members(),
        telemetry in prop::collection::vec(
            prop::collection::vec((prop_oneof![
                select(&["fuel_level", "engine_rpm", "odometer", "speed"][..]).prop_map(str::to_string),
                arb_key(),
            ], prop_oneof![4 => arb_number(), 1 => arb_json()]), 0..6),
            0..3,
        ),
        at in prop::collection::vec(any::<Index>(), 3),
        metrics in prop::collection::vec(prop_oneof![
            select(&["fuel_level", "engine_rpm", "odometer", "speed"][..]).prop_map(str::to_string),
            arb_key(),
        ], 0..4),
        style in arb_style(),
    ) {
        let mut members = members;
        for (t, at) in telemetry.into_iter().zip(at) {
            members.insert(at.index(members.len() + 1), ("telemetry".to_string(), J::Obj(t)));
        }
        let payload = encode(&J::Obj(members.clone()), &style);
        let metrics: Vec<Box<str>> = metrics.into_iter().map(Into::into).collect();
        let out = native::project_metrics(&payload, &metrics);
        let expected = J::Obj(
            members
                .into_iter()
                .map(|(k, v)| match v {
                    J::Obj(inner) if k == "telemetry" => (
                        k,
                        J::Obj(
                            inner
                                .into_iter()
                                .filter(|(ik, _)| metrics.iter().any(|m| **m == **ik))
                                .collect(),
                        ),
                    ),
                    v => (k, v),
                })
                .collect(),
        );
        parses_to(&out, Some(&expected))?;
    }
}

// =====================================================================================
// 5. HTTP request heads and paths
// =====================================================================================

const NATIVE_PATH: &str = "/v1/streaming/websocket";

/// An RFC 3986 path segment for `id`: unreserved characters and sub-delims as they are
/// (when `raw` allows), everything else percent-encoded (hex case from `upper`).
fn encode_segment(id: &str, raw: &[bool], upper: bool) -> String {
    let mut out = String::new();
    for (i, b) in id.bytes().enumerate() {
        let unreserved = b.is_ascii_alphanumeric() || b"-._~".contains(&b);
        let sub_delim = b"!$&'()*+,;=:@".contains(&b);
        if unreserved || (sub_delim && raw[i % raw.len()]) {
            out.push(b as char);
        } else if upper {
            out.push_str(&format!("%{b:02X}"));
        } else {
            out.push_str(&format!("%{b:02x}"));
        }
    }
    out
}

#[derive(Clone, Debug)]
struct ReqSpec {
    method: &'static str,
    path: String,
    query: Vec<(String, String)>,
    version: &'static str,
    headers: Vec<(String, Vec<u8>)>,
    tail: Vec<u8>,
}

fn arb_header() -> impl Strategy<Value = (String, Vec<u8>)> {
    let name = prop_oneof![
        select(
            &[
                "Host",
                "Upgrade",
                "upgrade",
                "Connection",
                "CONNECTION",
                "Sec-WebSocket-Key",
                "sec-websocket-version",
                "Authorization",
                "X-Other",
            ][..]
        )
        .prop_map(str::to_string),
        "[A-Za-z0-9!#$%&'*+.^_`|~-]{1,12}",
    ];
    let value = prop_oneof![
        select(
            &[
                "websocket",
                "WebSocket",
                "keep-alive, Upgrade",
                "upgrade",
                "13",
                "dGhlIHNhbXBsZSBub25jZQ==",
                "Bearer abc",
                "bearer  x.y.z ",
            ][..]
        )
        .prop_map(|s| s.as_bytes().to_vec()),
        "[ -~]{0,20}".prop_map(String::into_bytes),
        prop::collection::vec(any::<u8>(), 0..12),
    ];
    (name, value)
}

fn arb_request() -> impl Strategy<Value = ReqSpec> {
    (
        select(&["GET", "POST", "HEAD", "OPTIONS"][..]),
        prop::collection::vec("[A-Za-z0-9._~!$&'()*+,;=:@%-]{0,10}", 0..5),
        prop::collection::vec((any::<String>(), any::<String>()), 0..4),
        select(&["HTTP/1.1", "HTTP/1.0"][..]),
        prop::collection::vec(arb_header(), 0..8),
        prop::collection::vec(any::<u8>(), 0..16),
    )
        .prop_map(|(method, segs, query, version, headers, tail)| ReqSpec {
            method,
            path: format!("/{}", segs.join("/")),
            query,
            version,
            headers,
            tail,
        })
}

fn request_bytes(r: &ReqSpec) -> (Vec<u8>, usize) {
    let mut target = r.path.clone();
    if !r.query.is_empty() {
        target.push('?');
        target.push_str(
            &form_urlencoded::Serializer::new(String::new())
                .extend_pairs(&r.query)
                .finish(),
        );
    }
    let mut out = format!("{} {} {}\r\n", r.method, target, r.version).into_bytes();
    for (k, v) in &r.headers {
        out.extend_from_slice(k.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(v);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    let head = out.len();
    out.extend_from_slice(&r.tail);
    (out, head)
}

proptest! {
    #![proptest_config(config(2000))]

    /// Arbitrary bytes: no panic; a complete head lies inside the input and the limit.
    #[test]
    fn handshake_arbitrary_bytes(
        raw in prop_oneof![
            prop::collection::vec(any::<u8>(), 0..600),
            arb_request().prop_map(|r| request_bytes(&r).0),
            (arb_request(), prop::collection::vec(arb_mutation(), 1..4))
                .prop_map(|(r, ms)| apply_mutations(request_bytes(&r).0, &ms)),
        ],
        max_head in 0usize..1200,
    ) {
        match handshake::parse_request(&raw, max_head) {
            Ok((Head::Complete(n), _)) => prop_assert!(n <= raw.len() && n <= max_head),
            Ok((Head::Partial, _)) => prop_assert!(raw.len() < max_head),
            Err(_) => {}
        }
    }

    /// Well-formed heads parse to their path, query and upgrade headers.
    #[test]
    fn handshake_well_formed(r in arb_request()) {
        let (raw, head) = request_bytes(&r);
        let parsed = handshake::parse_request(&raw, 1 << 20);
        // Header values with control bytes (httparse takes a bare LF as a line end, refuses
        // others) or not UTF-8 (the broker refuses them) are only checked for no panic.
        let clean = r.headers.iter().all(|(_, v)| {
            std::str::from_utf8(v).is_ok() && v.iter().all(|&b| b >= 0x20 && b != 0x7f || b == b'\t')
        });
        if !clean {
            return Ok(());
        }
        // A repeated credential or length is refused (request smuggling), whatever else.
        let count = |name: &str| r.headers.iter().filter(|(k, _)| k.eq_ignore_ascii_case(name)).count();
        if count("authorization") > 1 || count("content-length") > 1 {
            prop_assert!(parsed.is_err(), "{:?}", String::from_utf8_lossy(&raw));
            return Ok(());
        }
        if count("content-length") + count("transfer-encoding") > 0 {
            return Ok(());
        }
        let Ok((Head::Complete(n), req)) = parsed else {
            return Err(TestCaseError::fail(format!(
                "{:?}: {:?}",
                String::from_utf8_lossy(&raw),
                parsed.map(|p| p.0)
            )));
        };
        prop_assert_eq!(n, head);
        prop_assert_eq!(&req.method, r.method);
        prop_assert_eq!(&req.path, &r.path);
        prop_assert_eq!(&req.query, &r.query);
        let last = |name: &str| {
            r.headers
                .iter()
                .rev()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| String::from_utf8(v.clone()).unwrap().trim_matches([' ', '\t']).to_string())
        };
        prop_assert_eq!(req.ws_key, last("sec-websocket-key"));
        prop_assert_eq!(req.ws_version, last("sec-websocket-version"));
        let has = |name: &str, token: &str| {
            last(name).is_some_and(|v| v.split(',').any(|p| p.trim().eq_ignore_ascii_case(token)))
        };
        prop_assert_eq!(req.upgrade_websocket, has("upgrade", "websocket"));
        prop_assert_eq!(req.connection_upgrade, has("connection", "upgrade"));
    }
}

proptest! {
    #![proptest_config(config(5000))]

    /// Arbitrary strings: no panic; only the native endpoints upgrade.
    #[test]
    fn classify_arbitrary(path in prop_oneof![
        any::<String>(),
        (select(&["fleet", "vehicle", "trip", "car", ""][..]), any::<String>())
            .prop_map(|(k, rest)| format!("{NATIVE_PATH}/{k}/{rest}")),
        "/v1/streaming/websocket[/a-z%0-9+&=]{0,20}",
    ]) {
        let e = Endpoint::classify(&path);
        prop_assert_eq!(e.is_websocket(), matches!(e, Endpoint::Native(_)));
        if e.is_websocket() {
            prop_assert!(path.starts_with(NATIVE_PATH));
        }
    }

    /// `/v1/streaming/websocket/{kind}/{id}` with the id as an RFC 3986 path segment
    /// scopes the connection to exactly that id.
    #[test]
    fn classify_scoped_paths(
        kind in select(&["fleet", "vehicle", "trip"][..]),
        id in prop_oneof![
            any::<String>(),
            "[a-z0-9 +&=%/?#!$'()*,;:@._~-]{1,12}",
        ].prop_filter("non-empty", |s| !s.is_empty()),
        raw in prop::collection::vec(any::<bool>(), 1..8),
        upper in any::<bool>(),
        slash in any::<bool>(),
    ) {
        let path = format!(
            "{NATIVE_PATH}/{kind}/{}{}",
            encode_segment(&id, &raw, upper),
            if slash { "/" } else { "" }
        );
        let scope = match kind {
            "fleet" => Scope::Fleet(id.as_str().into()),
            "vehicle" => Scope::Vehicle(id.as_str().into()),
            _ => Scope::Trip(id.as_str().into()),
        };
        prop_assert_eq!(Endpoint::classify(&path), Endpoint::Native(scope), "{}", path);
    }
}

// =====================================================================================
// 6. A whole session
// =====================================================================================

const START_UNIX_MS: i64 = 1_750_000_000_000;

struct Harness {
    limits: Limits,
    auth: Authenticator,
    parser: Parser,
    t0: Instant,
}

impl Harness {
    fn new() -> Harness {
        let key = |k: &str, role| ApiKeyConfig {
            key: k.into(),
            key_sha256: None,
            user_id: format!("u-{role:?}"),
            tenant: "fleet_a".into(),
            role,
            vehicles: if role == Role::Device {
                vec!["v1".into()]
            } else {
                vec![]
            },
            drivers: vec![],
            trips: vec![],
        };
        let auth = Authenticator::new(&AuthConfig {
            jwt_hs256_secret: Some(HS256_SECRET.into()),
            api_keys: vec![
                key(VIEWER_KEY, Role::Viewer),
                key(DEVICE_KEY, Role::Device),
                key(SERVICE_KEY, Role::Service),
                key(ADMIN_KEY, Role::Admin),
            ],
            ..Default::default()
        })
        .unwrap();
        Harness {
            limits: Limits {
                max_subscriptions: 8,
                max_batch: 4,
                ..Limits::default()
            },
            auth,
            parser: Parser::default(),
            t0: Instant::now(),
        }
    }

    fn at(&self, ms: u64) -> Now {
        Now {
            mono: self.t0 + Duration::from_millis(ms),
            unix_ms: START_UNIX_MS + ms as i64,
        }
    }
}

#[derive(Clone, Debug)]
enum Step {
    Text(String),
    Tick,
    Ping(Vec<u8>),
    Pong,
    Binary,
    Close,
}

fn arb_session_text() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => (arb_valid_message(), arb_style())
            .prop_map(|(j, s)| String::from_utf8(encode(&j, &s)).unwrap()),
        2 => (arb_message_value(), arb_style())
            .prop_map(|(j, s)| String::from_utf8(encode(&j, &s)).unwrap()),
        2 => arb_mutated_message().prop_map(|b| String::from_utf8_lossy(&b).into_owned()),
        1 => any::<String>(),
    ]
}

fn arb_step() -> impl Strategy<Value = (Step, u64)> {
    let step = prop_oneof![
        12 => arb_session_text().prop_map(Step::Text),
        3 => Just(Step::Tick),
        1 => prop::collection::vec(any::<u8>(), 0..8).prop_map(Step::Ping),
        1 => Just(Step::Pong),
        1 => prop::sample::select(vec![Step::Binary, Step::Close]),
    ];
    // Short gaps, and long silences that reach the auth timeout (10 s), the token expiry
    // (30 s) and the heartbeat timeout (60 s).
    let delay = prop_oneof![6 => 0u64..2_000, 1 => 0u64..40_000, 1 => 25_000u64..70_000];
    (step, delay)
}

fn arb_scope() -> impl Strategy<Value = Scope> {
    prop_oneof![
        3 => Just(Scope::None),
        1 => Just(Scope::Fleet("fleet_a".into())),
        1 => Just(Scope::Fleet("fleet_b".into())),
        1 => Just(Scope::Vehicle("v1".into())),
        1 => Just(Scope::Trip("t1".into())),
    ]
}

/// A server frame (unmasked, final) split into opcode and payload.
fn server_frame(f: &[u8]) -> Result<(u8, &[u8]), TestCaseError> {
    prop_assert!(
        f.len() >= 2 && f[0] & 0xF0 == 0x80 && f[1] & 0x80 == 0,
        "bad frame head {:02x?}",
        &f[..f.len().min(2)]
    );
    let (len, hl) = match f[1] & 0x7F {
        126 => (u16::from_be_bytes([f[2], f[3]]) as usize, 4),
        127 => (
            u64::from_be_bytes(f[2..10].try_into().unwrap()) as usize,
            10,
        ),
        n => (n as usize, 2),
    };
    prop_assert_eq!(f.len(), hl + len, "frame length");
    Ok((f[0] & 0x0F, &f[hl..]))
}

/// Checks one reply: a JSON object with a string `type`, an `id` and a `timestamp`;
/// errors carry a numeric `payload.code`. Returns the type.
fn check_reply(json: &[u8]) -> Result<String, TestCaseError> {
    let Some(v) = parse_j(json) else {
        return Err(TestCaseError::fail(format!(
            "reply is not JSON: {}",
            String::from_utf8_lossy(json)
        )));
    };
    let ty = v.get("type").and_then(J::as_str);
    prop_assert!(ty.is_some(), "reply without a type: {:?}", v);
    prop_assert!(v.get("id").is_some(), "reply without an id: {:?}", v);
    prop_assert!(v.get("timestamp").and_then(J::as_str).is_some(), "{:?}", v);
    if matches!(ty, Some("error" | "auth_error")) {
        let code = v.get("payload").and_then(|p| p.get("code"));
        prop_assert!(
            matches!(code, Some(J::Num(n)) if n.as_u64().is_some_and(|c| (400..600).contains(&c))),
            "error without a numeric code: {:?}",
            v
        );
        prop_assert!(
            v.get("payload")
                .and_then(|p| p.get("message"))
                .and_then(J::as_str)
                .is_some()
        );
    }
    Ok(ty.unwrap_or_default().to_string())
}

/// Checks one accepted publish and the event the shard would encode from it.
fn check_publication(p: Publication, t0: Instant) -> Result<(), TestCaseError> {
    let payload = parse_j(&p.payload);
    prop_assert!(
        matches!(payload, Some(J::Obj(_))),
        "published payload {:?}",
        String::from_utf8_lossy(&p.payload)
    );
    if let Some(id) = &p.id {
        prop_assert!(
            matches!(parse_j(id), Some(J::Str(_) | J::Num(_))),
            "id {:?}",
            String::from_utf8_lossy(id)
        );
    }
    prop_assert_eq!(
        native::parse_rfc3339_ms(&p.timestamp),
        Some(p.ts_ms),
        "timestamp text {:?}",
        &p.timestamp
    );
    let ev = Event::encode("fleet_a".into(), p, 1, 1, b"\"e-1\"", t0);
    let (op, json) = server_frame(&ev.frame)?;
    prop_assert_eq!(op, 1);
    let v = parse_j(json);
    prop_assert_eq!(v.as_ref().and_then(|v| v.get("payload")), payload.as_ref());
    prop_assert_eq!(parse_j(ev.payload_bytes()), payload.clone());
    prop_assert_eq!(
        v.as_ref()
            .and_then(|v| v.get("timestamp"))
            .and_then(J::as_str)
            .map(native::parse_rfc3339_ms),
        Some(Some(ev.ts_ms))
    );
    let projected = ev
        .projected_frame(fleetcast::dialect::NATIVE, &["fuel_level".into()])
        .expect("the native dialect shows every event");
    let (_, pj) = server_frame(&projected)?;
    prop_assert!(matches!(parse_j(pj), Some(J::Obj(_))));
    Ok(())
}

/// An endpoint scoped to a vehicle or a trip selects nothing else.
fn check_in_scope(scope: &Scope, sel: &fleetcast::session::Selection) -> Result<(), TestCaseError> {
    let only = |list: &[Box<str>], id: &str| list.iter().all(|x| &**x == id);
    match scope {
        Scope::Vehicle(v) => prop_assert!(
            !sel.all && sel.trips.is_empty() && sel.drivers.is_empty() && only(&sel.vehicles, v),
            "{:?} outside {:?}",
            sel,
            scope
        ),
        Scope::Trip(t) => prop_assert!(
            !sel.all && sel.vehicles.is_empty() && sel.drivers.is_empty() && only(&sel.trips, t),
            "{:?} outside {:?}",
            sel,
            scope
        ),
        Scope::None | Scope::Fleet(_) => {}
    }
    Ok(())
}

/// The index keys a selection names, as (channel, kind, key).
fn keys_of(channel: Channel, s: &fleetcast::session::Selection) -> Vec<(usize, u8, Box<str>)> {
    let c = channel.index();
    let mut out = Vec::new();
    if s.all {
        out.push((c, 0, "*".into()));
    }
    out.extend(s.vehicles.iter().map(|k| (c, 1, k.clone())));
    out.extend(s.trips.iter().map(|k| (c, 2, k.clone())));
    out.extend(s.drivers.iter().map(|k| (c, 3, k.clone())));
    out
}

proptest! {
    #![proptest_config(config(500))]

    /// A session fed arbitrary messages and ticks never panics; every frame it sends is
    /// well formed, every reply a JSON object (errors with a numeric code), an auth error is
    /// followed by a close and nothing follows the close, every publish forwards a JSON
    /// object and stays within the role and the endpoint scope, and the index changes it
    /// asks for add up to the subscriptions it reports.
    #[test]
    fn session_survives_anything(
        scope in arb_scope(),
        preauth in prop::option::of(select(&[VIEWER_KEY, DEVICE_KEY, SERVICE_KEY, ADMIN_KEY, "token"][..])),
        steps in prop::collection::vec(arb_step(), 1..16),
    ) {
        let mut h = Harness::new();
        let principal = preauth.map(|k| {
            let cred = if k == "token" { Credential::Token(token()) } else { Credential::ApiKey(k) };
            h.auth.authenticate(cred, START_UNIX_MS as u64 / 1000).unwrap()
        });
        let mut authed = principal.is_some();
        let mut s = Session::new("c0-1-1".into(), scope.clone(), principal, h.t0, &h.limits);
        let mut clock = 0u64;
        let mut last_heard = 0u64;
        let mut closed = false;
        let mut index = BTreeSet::new();
        for (step, delay) in steps {
            clock += delay;
            let now = h.at(clock);
            let mut ctx = Ctx { limits: &h.limits, auth: &h.auth, parser: &mut h.parser, admission: &fleetcast::session::AdmitAll };
            if !matches!(step, Step::Tick) {
                last_heard = clock;
            }
            match &step {
                Step::Text(t) => s.handle_message(now, Message::Text(t.as_bytes()), &mut ctx),
                Step::Tick => s.handle_tick(now),
                Step::Ping(p) => s.handle_message(now, Message::Ping(p), &mut ctx),
                Step::Pong => s.handle_message(now, Message::Pong, &mut ctx),
                Step::Binary => s.handle_message(now, Message::Binary(b"x"), &mut ctx),
                Step::Close => s.handle_message(now, Message::Close(Some(1000)), &mut ctx),
            }
            let mut auth_failed = false;
            while let Some(a) = s.poll_action() {
                prop_assert!(!closed, "{:?} after the close", a);
                match a {
                    Action::Reply(r) => {
                        let Some(f) = s.codec().encode_reply(&r, "2024-03-15T14:30:00.000Z") else {
                            continue;
                        };
                        let (op, body) = server_frame(&f)?;
                        match op {
                            1 => auth_failed |= check_reply(body)? == "auth_error",
                            9 | 10 => prop_assert!(body.len() <= 125),
                            other => prop_assert!(false, "opcode {} sent as data", other),
                        }
                    }
                    Action::Breach(_) => {}
                    Action::Close { code, .. } => {
                        prop_assert!(matches!(code, 1000..=1003 | 1007..=1011 | 3000..=4999));
                        prop_assert!(!auth_failed || code == 1008, "auth_error then close {}", code);
                        closed = true;
                    }
                    Action::Publish(p) => {
                        let role = s.principal().map(|p| p.role);
                        prop_assert!(role.is_some_and(|r| r.may_publish(p.channel)), "{:?} published {:?}", role, p.channel);
                        if role == Some(Role::Device) {
                            prop_assert_eq!(p.keys.vehicle.as_deref(), Some("v1"), "device published for another vehicle");
                        }
                        if let Scope::Vehicle(v) = &scope {
                            prop_assert!(p.keys.vehicle.as_ref().is_none_or(|x| x == v), "{:?} outside the scope", p.keys);
                        }
                        check_publication(p, h.t0)?
                    }
                    Action::Subscribe { channel, added, snapshot, reply, .. } => {
                        let f = s.codec().encode_reply(&reply, "2024-03-15T14:30:00.000Z");
                        let f = f.expect("subscribed has a frame");
                        prop_assert_eq!(check_reply(server_frame(&f)?.1)?, "subscribed");
                        let role = s.principal().map(|p| p.role);
                        prop_assert!(role.is_some_and(|r| r.may_subscribe(channel)), "{:?} subscribed {:?}", role, channel);
                        check_in_scope(&scope, &added)?;
                        check_in_scope(&scope, &snapshot)?;
                        for k in keys_of(channel, &added) {
                            prop_assert!(index.insert(k.clone()), "{:?} added twice", k);
                        }
                    }
                    Action::Unsubscribe { channel, removed } => {
                        for k in keys_of(channel, &removed) {
                            prop_assert!(index.remove(&k), "{:?} removed but never added", k);
                        }
                    }
                    Action::SnapshotRequest { selection, .. } => check_in_scope(&scope, &selection)?,
                    Action::Authenticated => authed = true,
                    Action::Deliver { .. } => {}
                }
            }
            prop_assert!(closed || !auth_failed, "auth_error without a close");
            if matches!(step, Step::Tick) {
                prop_assert!(closed || authed || clock < h.limits.auth_timeout_ms, "auth deadline passed at {}", clock);
                prop_assert!(closed || clock - last_heard < 2 * h.limits.heartbeat_interval_ms, "silent since {}, now {}", last_heard, clock);
            }
            prop_assert_eq!(closed, s.is_closed());
            let held: Vec<_> = s.subscriptions().flat_map(|(c, sel)| keys_of(c, sel)).collect();
            prop_assert_eq!(held.len(), s.subscription_count());
            prop_assert!(s.subscription_count() <= h.limits.max_subscriptions);
            prop_assert_eq!(held.into_iter().collect::<BTreeSet<_>>(), index.clone());
        }
    }
}

// =====================================================================================
// Regressions: minimal inputs the properties found, kept as plain tests
// =====================================================================================

/// Decodes a message with a fresh parser.
fn decode_str(msg: &str) -> (Option<String>, Result<Command, native::ProtoError>) {
    let (id, cmd) = Parser::default().decode(msg.as_bytes());
    (id.map(|r| msg[r].to_string()), cmd)
}

/// Runs `messages` through a session authenticated as a service; returns its actions.
fn session_actions(messages: &[&str]) -> Vec<Action> {
    let mut h = Harness::new();
    let principal = h
        .auth
        .authenticate(Credential::ApiKey(SERVICE_KEY), 0)
        .unwrap();
    let mut s = Session::new(
        "c0-1-1".into(),
        Scope::None,
        Some(principal),
        h.t0,
        &h.limits,
    );
    let mut out = Vec::new();
    for m in messages {
        let now = h.at(1);
        let mut ctx = Ctx {
            limits: &h.limits,
            auth: &h.auth,
            parser: &mut h.parser,
            admission: &fleetcast::session::AdmitAll,
        };
        s.handle_message(now, Message::Text(m.as_bytes()), &mut ctx);
        out.extend(std::iter::from_fn(|| s.poll_action()));
    }
    out
}

/// Found by `parser_mutated_messages` and `session_survives_anything`: a `timestamp` name
/// written with an escape was seen by simd-json but not by the raw scanner, and
/// `decode_publish` panicked on `expect("present")`.
#[test]
fn regression_escaped_timestamp_name_does_not_panic() {
    let msg = r#"{"type":"fleet_metrics","payload":{},"times\u0074amp":"2024-03-15T14:30:00Z"}"#;
    let (_, cmd) = decode_str(msg);
    let Ok(Command::Publish(p)) = cmd else {
        panic!("{cmd:?}")
    };
    let (r, ms) = p.timestamp.expect("a timestamp");
    assert_eq!(&msg[r], "\"2024-03-15T14:30:00Z\"");
    assert_eq!(ms, 1_710_513_000_000);
}

/// Found by `parser_json_values`: member names written with escapes (`"\u0069d"` is
/// `"id"`) were invisible to the raw scanner, so the same message meant different things
/// depending on how it was encoded.
#[test]
fn regression_escaped_member_names_are_found() {
    let (id, cmd) = decode_str(r#"{"type":"ping","\u0069d":"a"}"#);
    assert_eq!(id.as_deref(), Some("\"a\""));
    assert!(matches!(cmd, Ok(Command::Ping)));
    let msg = r#"{"type":"fleet_metrics","pay\u006coad":{"a":1}}"#;
    let (_, cmd) = decode_str(msg);
    let Ok(Command::Publish(p)) = cmd else {
        panic!("{cmd:?}")
    };
    assert_eq!(&msg[p.payload], r#"{"a":1}"#);
    let msg = r#"{"type":"batch","m\u0065ssages":[{"type":"ping"}]}"#;
    assert!(matches!(decode_str(msg).1, Ok(Command::Batch(items)) if items.len() == 1));
}

/// Found by `parser_duplicate_members`: with a repeated `payload`, simd-json validated one
/// member (the first up to 32 members, the last beyond) while the raw scanner forwarded the
/// first, so an invalid payload could be published under a validated one.
#[test]
fn regression_duplicate_payload_is_refused() {
    let valid = r#"{"vehicle_id":"v1","location":{"latitude":0.0,"longitude":0.0}}"#;
    let pad: String = (0..32).map(|i| format!(",\"pad{i}\":{i}")).collect();
    for msg in [
        format!(r#"{{"type":"location_update","payload":{{}},"payload":{valid}{pad}}}"#),
        format!(r#"{{"type":"location_update","pay\u006coad":{valid},"payload":5}}"#),
        format!(r#"{{"type":"location_update","payload":{valid},"payload":5}}"#),
    ] {
        let (_, cmd) = decode_str(&msg);
        let e = cmd.expect_err(&msg);
        assert_eq!((e.code, e.field), (400, Some("payload")), "{msg}");
    }
}

/// Found with `session_survives_anything`: the escaped name was validated as the string
/// timestamp while the raw scanner pointed the session at the number `5`, and slicing off
/// its quotes panicked.
#[test]
fn regression_duplicate_timestamp_does_not_panic_the_session() {
    let actions = session_actions(&[
        r#"{"type":"fleet_metrics","payload":{},"times\u0074amp":"2024-03-15T14:30:00Z","timestamp":5}"#,
    ]);
    assert!(
        !actions.iter().any(|a| matches!(a, Action::Publish(_))),
        "{actions:?}"
    );
}

/// Found by `session_survives_anything`: a timestamp with escapes in its text was copied
/// into the event still escaped (`2024-03-15T14:30:00\u002e123Z`).
#[test]
fn regression_escaped_timestamp_text_is_decoded() {
    let actions = session_actions(&[
        r#"{"type":"fleet_metrics","payload":{},"timestamp":"2024-03-15T14:30:00\u002e123Z"}"#,
    ]);
    let Some(Action::Publish(p)) = actions
        .into_iter()
        .find(|a| matches!(a, Action::Publish(_)))
    else {
        panic!("no publish")
    };
    assert_eq!(p.timestamp, "2024-03-15T14:30:00.123Z");
    assert_eq!(p.ts_ms, 1_710_513_000_123);
}

/// Found by `json_project_metrics`: names written with escapes were compared raw, so an
/// escaped `telemetry` was not projected and an escaped metric name was dropped.
#[test]
fn regression_project_metrics_reads_escaped_names() {
    let metrics: Vec<Box<str>> = vec!["fuel_level".into()];
    let out = native::project_metrics(br#"{"teleme\u0074ry":{"fuel_level":1,"rpm":2}}"#, &metrics);
    assert_eq!(out, br#"{"teleme\u0074ry":{"fuel_level":1}}"#);
    let out = native::project_metrics(br#"{"telemetry":{"fuel\u005flevel":1,"rpm":2}}"#, &metrics);
    assert_eq!(out, br#"{"telemetry":{"fuel\u005flevel":1}}"#);
}

/// Found by `classify_scoped_paths`: the id was decoded as a form value, so `&` ended it
/// and `+` became a space; in a path segment (RFC 3986) both are themselves.
#[test]
fn regression_scoped_path_ids_keep_plus_and_ampersand() {
    assert_eq!(
        Endpoint::classify("/v1/streaming/websocket/fleet/a&b"),
        Endpoint::Native(Scope::Fleet("a&b".into()))
    );
    assert_eq!(
        Endpoint::classify("/v1/streaming/websocket/vehicle/truck+1/"),
        Endpoint::Native(Scope::Vehicle("truck+1".into()))
    );
    assert_eq!(
        Endpoint::classify("/v1/streaming/websocket/trip/t%201%2b%zz"),
        Endpoint::Native(Scope::Trip("t 1+%zz".into()))
    );
}

// =====================================================================================
// 7. Dialects: an event published in any dialect is shown in every dialect
// =====================================================================================

use fleetcast::dialect::{CODECS, DialectId, NATIVE, VALTRONICS};
use fleetcast::session::Reply;

/// The publishing dialects this section generates messages for (a dialect that publishes
/// gets its generator here; every dialect in `CODECS` is checked as a subscriber).
const PUBLISHING: [DialectId; 2] = [NATIVE, VALTRONICS];

/// Whether generated member names may hold characters that JSON must escape (`"`, `\`,
/// controls): they must, since clients choose metric names (this found `json::write_key`
/// writing them unescaped; see `valtronics_metric_names_are_escaped` below).
const NAMES_NEEDING_ESCAPES: bool = true;

/// `j` with every member name, at any depth, freed of characters JSON must escape (unless
/// [`NAMES_NEEDING_ESCAPES`]). Names are still written with random escapes.
fn names_without_escapes(j: J) -> J {
    let plain = |k: String| -> String {
        k.chars()
            .map(|c| {
                if c == '"' || c == '\\' || (c as u32) < 0x20 {
                    '_'
                } else {
                    c
                }
            })
            .collect()
    };
    match j {
        _ if NAMES_NEEDING_ESCAPES => j,
        J::Obj(m) => J::Obj(
            m.into_iter()
                .map(|(k, v)| (plain(k), names_without_escapes(v)))
                .collect(),
        ),
        J::Arr(items) => J::Arr(items.into_iter().map(names_without_escapes).collect()),
        other => other,
    }
}

/// Entity ids as publishers write them: numbers (the Valtronics seed numbers its devices),
/// decimal strings with and without leading zeros, up to and past 15 digits, negative
/// numbers, and text with quotes, backslashes, controls and non-ASCII.
fn arb_entity_id() -> BoxedStrategy<J> {
    prop_oneof![
        2 => (0i64..100_000).prop_map(J::int),
        1 => any::<i64>().prop_map(J::int),
        1 => any::<u64>().prop_map(|n| J::Num(n.into())),
        3 => "0|[1-9][0-9]{0,14}|0[0-9]{1,5}|[1-9][0-9]{15,19}|-[1-9][0-9]{0,5}|1\\.5|1e3"
            .prop_map(J::Str),
        2 => select(
            &[
                "v1",
                "vehicle_001",
                "truck \"7\"",
                "a\\b",
                "ünï",
                "tab\there",
                "nul\u{0}",
                "\u{1F69A}",
                "</script>",
                " 15",
            ][..]
        )
        .prop_map(J::s),
        2 => any::<String>().prop_map(|s| J::Str(s.chars().take(20).collect())),
    ]
    .boxed()
}

/// Metric names: the seeds' (some with a default unit), and any text.
fn arb_metric_name() -> BoxedStrategy<String> {
    prop_oneof![
        4 => select(
            &[
                "temperature",
                "humidity",
                "fuel_level",
                "engine_rpm",
                "speed",
                "battery_voltage",
                "odometer",
                "tyre_pressure",
            ][..]
        )
        .prop_map(str::to_string),
        1 => "[a-z_]{1,10}",
        1 => any::<String>().prop_map(|s| s.chars().take(12).collect()),
        1 => select(&["quo\"te", "back\\slash", "new\nline", "nul\u{0}", "ünit", "\u{2028}", ""][..])
            .prop_map(str::to_string),
    ]
    .boxed()
}

/// A telemetry value: a number, `{value, unit}` (value of any kind, unit of any text), or
/// something that is not a metric at all.
fn arb_metric_value() -> BoxedStrategy<J> {
    let unit = prop_oneof![
        3 => select(&["°C", "%", "km/h", "V", "", "\"q\"", "a\\b", "\u{7f}\t"][..]).prop_map(J::s),
        2 => arb_string().prop_map(J::Str),
        1 => arb_leaf(),
    ];
    let value = prop_oneof![4 => arb_number(), 1 => arb_leaf(), 1 => arb_json()];
    let extra = prop::collection::vec((arb_key(), arb_leaf()), 0..2);
    prop_oneof![
        4 => arb_number(),
        3 => (value, opt("unit", unit), extra)
            .prop_map(|(v, unit, extra)| {
                let mut m = vec![("value".to_string(), v)];
                m.extend(unit);
                for (k, x) in extra {
                    if !m.iter().any(|(n, _)| *n == k) {
                        m.push((k, x));
                    }
                }
                J::Obj(m)
            })
            .prop_shuffle_members(),
        1 => arb_leaf(),
        1 => arb_json(),
    ]
    .boxed()
}

fn arb_telemetry_object() -> BoxedStrategy<J> {
    prop::collection::vec((arb_metric_name(), arb_metric_value()), 0..6)
        .prop_map(J::Obj)
        .boxed()
}

/// A `metadata` member: mostly an object of anything.
fn arb_metadata() -> BoxedStrategy<Option<(String, J)>> {
    let obj = prop::collection::vec((arb_key(), arb_json()), 0..5).prop_map(|m| {
        let mut seen = BTreeSet::new();
        J::Obj(
            m.into_iter()
                .filter(|(k, _)| seen.insert(k.clone()))
                .collect(),
        )
    });
    opt("metadata", prop_oneof![6 => obj, 1 => arb_leaf()])
}

fn arb_severity() -> BoxedStrategy<J> {
    prop_oneof![
        8 => select(fleetcast::model::SEVERITIES.to_vec()).prop_map(J::s),
        1 => select(&["CRITICAL", "bogus", ""][..]).prop_map(J::s),
        1 => arb_leaf(),
    ]
    .boxed()
}

fn arb_alert_id() -> BoxedStrategy<J> {
    prop_oneof![
        3 => (0i64..100_000).prop_map(J::int),
        2 => "[a-z0-9\\-]{1,8}".prop_map(J::Str),
        1 => (-1e6f64..1e6).prop_map(J::float),
        1 => arb_entity_id(),
        1 => arb_leaf(),
    ]
    .boxed()
}

/// Any text, or occasionally not text (refused).
fn arb_field_text() -> BoxedStrategy<J> {
    prop_oneof![
        6 => arb_string().prop_map(J::Str),
        1 => select(&["a \"quoted\" \\ title", "line\nbreak\u{0}", "</script>\u{2028}"][..])
            .prop_map(J::s),
        1 => Just(J::Null),
        1 => arb_leaf(),
    ]
    .boxed()
}

/// An event's own time: RFC 3339 in its variants (offsets, fractions, lower case), and
/// now and then something else (refused).
fn arb_event_timestamp() -> BoxedStrategy<Option<(String, J)>> {
    let rfc3339 = (
        2020u32..2026,
        1u32..13,
        1u32..29,
        0u32..24,
        0u32..60,
        0u32..60,
        prop_oneof![Just(String::new()), "\\.[0-9]{1,9}"],
        prop_oneof![
            Just("Z".to_string()),
            Just("z".to_string()),
            "[+-](0[0-9]|1[0-3]):[0-5][0-9]"
        ],
        any::<bool>(),
    )
        .prop_map(|(y, mo, d, h, mi, s, frac, zone, lower)| {
            let t = format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}{frac}{zone}");
            J::Str(if lower { t.to_lowercase() } else { t })
        });
    opt(
        "timestamp",
        prop_oneof![8 => rfc3339, 1 => arb_timestamp().prop_map(|t| t.map_or(J::Null, |(_, v)| v))],
    )
}

/// The members every publish of either dialect may carry next to its own.
fn envelope() -> impl Strategy<Value = Vec<(String, J)>> {
    (
        arb_message_id(),
        arb_event_timestamp(),
        opt(
            "ack",
            prop_oneof![4 => any::<bool>().prop_map(J::Bool), 1 => arb_leaf()],
        ),
    )
        .prop_map(|(id, ts, ack)| members_of(vec![id, ts, ack]))
}

/// A Valtronics publish (`telemetry_update`, `alert`, `device_status_update`), fields at
/// the top level, about a device from `ids`.
fn arb_valtronics_publish(ids: BoxedStrategy<J>) -> BoxedStrategy<J> {
    let telemetry = (
        Just("telemetry_update"),
        prop_oneof![8 => arb_telemetry_object(), 1 => arb_leaf()]
            .prop_map(|t| vec![Some(("telemetry".to_string(), t))]),
    );
    let alert = (
        Just("alert"),
        (
            prop::option::weighted(
                0.95,
                arb_alert_id().prop_map(|v| ("alert_id".to_string(), v)),
            ),
            prop::option::weighted(
                0.95,
                arb_severity().prop_map(|v| ("severity".to_string(), v)),
            ),
            opt("title", arb_field_text()),
            opt("message", arb_field_text()),
            opt("alert_type", arb_field_text()),
        )
            .prop_map(|(a, b, c, d, e)| vec![a, b, c, d, e]),
    );
    let status = (
        Just("device_status_update"),
        (
            prop_oneof![
                6 => arb_field_text().prop_map(|v| Some(("new_status".to_string(), v))),
                1 => arb_field_text().prop_map(|v| Some(("status".to_string(), v))),
                1 => Just(None),
            ],
            opt("reason", arb_field_text()),
        )
            .prop_map(|(a, b)| vec![a, b]),
    );
    (
        prop_oneof![telemetry.boxed(), alert.boxed(), status.boxed()],
        prop::option::weighted(0.95, ids.prop_map(|v| ("device_id".to_string(), v))),
        arb_metadata(),
        envelope(),
    )
        .prop_map(|((ty, specific), device, metadata, env)| {
            let mut m = vec![("type".to_string(), J::s(ty))];
            m.extend(members_of(specific));
            m.extend(device);
            m.extend(metadata);
            m.extend(env);
            J::Obj(m)
        })
        .prop_shuffle_members()
}

/// The native payloads whose channels other dialects show (telemetry, alerts, device
/// status, fleet metrics), with the entity under `vehicle_id` or `device_id`.
fn arb_native_dialect_payload(ids: BoxedStrategy<J>) -> BoxedStrategy<(Channel, J)> {
    let entity = move || {
        let ids = ids.clone();
        prop_oneof![
            4 => ids.clone().prop_map(|v| Some(("vehicle_id".to_string(), v))),
            2 => ids.prop_map(|v| Some(("device_id".to_string(), v))),
            1 => Just(None),
        ]
    };
    let telemetry = (
        entity(),
        prop_oneof![
            // Nested under `telemetry` (or `metrics`), or flat beside the ids.
            3 => arb_telemetry_object().prop_map(|t| vec![("telemetry".to_string(), t)]),
            1 => arb_telemetry_object().prop_map(|t| vec![("metrics".to_string(), t)]),
            2 => arb_telemetry_object().prop_map(|t| match t {
                J::Obj(m) => m,
                _ => vec![],
            }),
        ],
    )
        .prop_map(|(e, rest)| {
            let mut m = members_of(vec![e]);
            m.extend(rest);
            (Channel::Telemetry, m)
        });
    let alert = (
        select(&[Channel::Alerts, Channel::MaintenanceAlerts][..]),
        (
            entity(),
            prop::option::weighted(
                0.9,
                arb_alert_id().prop_map(|v| ("alert_id".to_string(), v)),
            ),
            prop::option::weighted(
                0.9,
                arb_severity().prop_map(|v| ("severity".to_string(), v)),
            ),
            prop_oneof![
                6 => arb_field_text().prop_map(|v| Some(("category".to_string(), v))),
                3 => arb_field_text().prop_map(|v| Some(("alert_type".to_string(), v))),
                1 => Just(None),
            ],
            opt("title", arb_field_text()),
            opt("message", arb_field_text()),
            opt("description", arb_field_text()),
        ),
    )
        .prop_map(|(c, (a, b, d, e, f, g, h))| (c, members_of(vec![a, b, d, e, f, g, h])));
    let status = (
        entity(),
        prop_oneof![
            3 => arb_field_text().prop_map(|v| Some(("status".to_string(), v))),
            1 => arb_field_text().prop_map(|v| Some(("new_status".to_string(), v))),
            1 => Just(None),
        ],
        opt("reason", arb_field_text()),
    )
        .prop_map(|(a, b, c)| (Channel::DeviceStatus, members_of(vec![a, b, c])));
    let fleet = (
        prop_oneof![
            4 => arb_telemetry_object().prop_map(|t| Some(("metrics".to_string(), t))),
            1 => arb_leaf().prop_map(|t| Some(("metrics".to_string(), t))),
            1 => Just(None),
        ],
        opt("cpu_percent", arb_number()),
    )
        .prop_map(|(a, b)| (Channel::FleetMetrics, members_of(vec![a, b])));
    (
        prop_oneof![3 => telemetry, 3 => alert, 2 => status, 1 => fleet],
        arb_metadata(),
        any::<u64>(),
    )
        .prop_map(|((channel, mut m), metadata, seed)| {
            m.extend(metadata);
            // A repeated name is refused (a flat metric named like an id): keep the first.
            let mut seen = BTreeSet::new();
            m.retain(|(k, _)| seen.insert(k.clone()));
            let mut rng = Rng(seed);
            for i in (1..m.len()).rev() {
                m.swap(i, rng.below(i as u64 + 1) as usize);
            }
            (channel, J::Obj(m))
        })
        .boxed()
}

/// A native publish: one of the shapes above (as its event type or as `publish` with a
/// channel), or any of the shapes the session property generates.
fn arb_native_dialect_publish(ids: BoxedStrategy<J>) -> BoxedStrategy<J> {
    let own = (arb_native_dialect_payload(ids), any::<bool>(), envelope()).prop_map(
        |((channel, payload), generic, env)| {
            let mut m = if generic {
                vec![
                    ("type".to_string(), J::s("publish")),
                    ("channel".to_string(), J::s(channel.name())),
                ]
            } else {
                vec![("type".to_string(), J::s(channel.event_type()))]
            };
            m.extend(env);
            m.push(("payload".to_string(), payload));
            J::Obj(m)
        },
    );
    prop_oneof![4 => own.prop_shuffle_members(), 1 => arb_publish()].boxed()
}

/// A Valtronics `subscribe`/`unsubscribe`, filters at the top level or under `filters`
/// (for the `subscribed` replies, which name the devices).
fn arb_valtronics_subscribe(ids: BoxedStrategy<J>) -> BoxedStrategy<J> {
    let devices = prop_oneof![
        ids.clone(),
        prop::collection::vec(ids, 0..4).prop_map(J::Arr),
    ];
    let filters = (
        opt(
            "metrics",
            prop::collection::vec(arb_metric_name().prop_map(J::Str), 0..3).prop_map(J::Arr),
        ),
        opt(
            "severity",
            prop::collection::vec(arb_severity(), 0..3).prop_map(J::Arr),
        ),
        opt("device_id", devices.clone()),
        opt("alert_type", arb_field_text()),
        opt(
            "frequency",
            select(&["real-time", "1s", "500ms", "soon"][..]).prop_map(J::s),
        ),
    )
        .prop_map(|(a, b, c, d, e)| J::Obj(members_of(vec![a, b, c, d, e])));
    (
        select(&["subscribe", "unsubscribe"][..]),
        prop_oneof![
            8 => select(&["telemetry", "alerts", "devices", "system"][..]).prop_map(J::s),
            1 => arb_leaf(),
        ],
        opt("device_id", devices),
        opt("filters", filters),
        arb_message_id(),
    )
        .prop_map(|(ty, channel, device, filters, id)| {
            J::Obj(members_of(vec![
                Some(("type".into(), J::s(ty))),
                Some(("channel".into(), channel)),
                device,
                filters,
                id,
            ]))
        })
        .prop_shuffle_members()
}

/// A message of dialect `d`: mostly a publish, sometimes a batch of them, a subscribe or
/// a ping.
fn arb_dialect_message(d: DialectId, ids: BoxedStrategy<J>) -> BoxedStrategy<J> {
    let (publish, subscribe) = if d == VALTRONICS {
        (
            arb_valtronics_publish(ids.clone()),
            arb_valtronics_subscribe(ids),
        )
    } else {
        (arb_native_dialect_publish(ids), arb_subscribe())
    };
    let batch = (
        prop::collection::vec(publish.clone(), 0..5),
        arb_message_id(),
    )
        .prop_map(|(items, id)| {
            J::Obj(members_of(vec![
                Some(("type".into(), J::s("batch"))),
                id,
                Some(("messages".into(), J::Arr(items))),
            ]))
        });
    let ping = arb_message_id()
        .prop_map(|id| J::Obj(members_of(vec![Some(("type".into(), J::s("ping"))), id])));
    prop_oneof![8 => publish, 2 => batch, 1 => subscribe, 1 => ping].boxed()
}

#[derive(Debug, Clone)]
struct DialectCase {
    dialect: DialectId,
    key: &'static str,
    /// The credential came with the handshake (else an `auth` message in the dialect).
    preauth: bool,
    /// The endpoint's channel (Valtronics `/ws/alerts`...).
    preset: Option<Channel>,
    messages: Vec<(J, Style)>,
    /// The entity's previous status (what the store knows when it encodes the event).
    prev_status: Option<String>,
    /// A subscription's `metrics` filter.
    metrics: Vec<String>,
}

fn arb_dialect_case() -> impl Strategy<Value = DialectCase> {
    (
        select(PUBLISHING.to_vec()),
        prop_oneof![4 => Just(SERVICE_KEY), 1 => Just(DEVICE_KEY)],
        any::<bool>(),
        prop::option::weighted(
            0.3,
            select(
                &[
                    Channel::Telemetry,
                    Channel::Alerts,
                    Channel::DeviceStatus,
                    Channel::System,
                ][..],
            ),
        ),
        prop::option::of(arb_string()),
        prop::collection::vec(arb_metric_name(), 0..3),
    )
        .prop_flat_map(|(dialect, key, preauth, preset, prev_status, metrics)| {
            // A device publishes for its own vehicle (v1); anything else is refused.
            let ids = if key == DEVICE_KEY {
                prop_oneof![8 => Just(J::s("v1")), 1 => arb_entity_id()].boxed()
            } else {
                arb_entity_id()
            };
            let messages = prop::collection::vec(
                (
                    arb_dialect_message(dialect, ids).prop_map(names_without_escapes),
                    arb_style(),
                ),
                1..6,
            );
            (
                messages,
                Just((dialect, key, preauth, preset, prev_status, metrics)),
            )
                .prop_map(
                    |(messages, (dialect, key, preauth, preset, prev_status, metrics))| {
                        DialectCase {
                            dialect,
                            key,
                            preauth,
                            preset,
                            messages,
                            prev_status,
                            metrics,
                        }
                    },
                )
        })
}

/// The `auth` message of dialect `d` for an API key.
fn auth_message(d: DialectId, key: &str) -> String {
    if d == VALTRONICS {
        serde_json::json!({"type": "auth", "token": key, "id": "auth-1"}).to_string()
    } else {
        serde_json::json!({"type": "auth", "id": "auth-1", "payload": {"api_key": key}}).to_string()
    }
}

/// A reply in every dialect: nothing, one JSON object in a text frame, or a control frame.
fn check_reply_in_every_dialect(r: &Reply) -> Result<(), TestCaseError> {
    for codec in CODECS {
        let Some(all) = codec.encode_reply(r, "2024-03-15T14:30:00.000Z") else {
            continue;
        };
        // A reply may be several frames (Telematics answers `authenticate` with
        // `authenticated` and `welcome`).
        for f in split_frames(&all)? {
            let (op, body) = server_frame(f)?;
            match op {
                1 => prop_assert!(
                    matches!(parse_j(body), Some(J::Obj(_))),
                    "{} reply is not a JSON object: {:?} for {:?}",
                    codec.name(),
                    String::from_utf8_lossy(body),
                    r
                ),
                9 | 10 => prop_assert!(body.len() <= 125),
                other => prop_assert!(false, "{} sent {:?} as opcode {}", codec.name(), r, other),
            }
        }
    }
    Ok(())
}

/// The complete server frames one after another in `b`.
fn split_frames(mut b: &[u8]) -> Result<Vec<&[u8]>, TestCaseError> {
    let mut out = Vec::new();
    while !b.is_empty() {
        prop_assert!(b.len() >= 2, "a frame head cut short");
        let (len, hl) = match b[1] & 0x7F {
            126 => (u16::from_be_bytes([b[2], b[3]]) as usize, 4),
            127 => (
                u64::from_be_bytes(b[2..10].try_into().unwrap()) as usize,
                10,
            ),
            n => (n as usize, 2),
        };
        prop_assert!(b.len() >= hl + len, "a frame cut short");
        out.push(&b[..hl + len]);
        b = &b[hl + len..];
    }
    Ok(out)
}

/// An event frame: one final unmasked text frame holding a JSON object.
fn event_object(f: &[u8], what: &str) -> Result<J, TestCaseError> {
    let (op, body) = server_frame(f)?;
    prop_assert_eq!(op, 1, "{} is not a text frame", what);
    match parse_j(body) {
        Some(v @ J::Obj(_)) => Ok(v),
        _ => Err(TestCaseError::fail(format!(
            "{what} is not a JSON object: {:?}",
            String::from_utf8_lossy(body)
        ))),
    }
}

/// Whether an entity id is written as a JSON number in the Valtronics dialect: a plain
/// decimal of at most 15 digits without leading zeros (so that it reads back the same).
fn valtronics_numeric(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 15
        && id.bytes().all(|b| b.is_ascii_digit())
        && (id == "0" || !id.starts_with('0'))
}

/// A Valtronics event: a known type, the event's time, and `device_id` by the ids rule (a
/// number iff the entity id is a plain decimal, else the id as a string).
fn check_valtronics_event(v: &J, ev: &Event, what: &str) -> Result<(), TestCaseError> {
    let ty = v.get("type").and_then(J::as_str).unwrap_or_default();
    prop_assert!(
        matches!(
            ty,
            "telemetry_update" | "alert" | "device_status_update" | "system_status_update"
        ),
        "{}: type {:?}",
        what,
        ty
    );
    prop_assert_eq!(
        v.get("timestamp").and_then(J::as_str),
        Some(&*ev.timestamp),
        "{}: timestamp",
        what
    );
    let entity = ev.keys.vehicle.as_deref();
    match (v.get("device_id"), entity) {
        (Some(J::Num(n)), Some(id)) => prop_assert!(
            valtronics_numeric(id) && n.to_string() == id,
            "{}: entity {:?} sent as the number {}",
            what,
            id,
            n
        ),
        (Some(J::Str(s)), Some(id)) => prop_assert!(
            !valtronics_numeric(id) && s == id,
            "{}: entity {:?} sent as the string {:?}",
            what,
            id,
            s
        ),
        (None, None) => {}
        // The node's and a fleet's figures are about no device.
        (None, Some(_)) if ty == "system_status_update" => {}
        (d, e) => prop_assert!(false, "{}: device_id {:?} for entity {:?}", what, d, e),
    }
    Ok(())
}

/// Every frame of `ev` in every dialect, whole and projected to `metrics`.
fn check_every_dialect(
    ev: &Event,
    publisher: DialectId,
    metrics: &[Box<str>],
) -> Result<(), TestCaseError> {
    for codec in CODECS {
        let d = codec.id();
        let name = codec.name();
        match ev.frame_in(d) {
            Some(f) => {
                let v = event_object(f, &format!("{name} frame of {:?}", ev.channel))?;
                if d == VALTRONICS {
                    check_valtronics_event(&v, ev, "valtronics frame")?;
                }
            }
            None => prop_assert!(
                d != NATIVE && d != publisher,
                "no {} frame for a {:?} event published in {}",
                name,
                ev.channel,
                codec_name(publisher)
            ),
        }
        for only in [metrics, &[]] {
            let Some(f) = ev.projected_frame(d, only) else {
                prop_assert!(d != NATIVE, "no native projection");
                continue;
            };
            let what = format!("{name} frame of {:?} projected to {only:?}", ev.channel);
            let v = event_object(&f, &what)?;
            if d == VALTRONICS {
                check_valtronics_event(&v, ev, &what)?;
            }
        }
    }
    Ok(())
}

fn codec_name(d: DialectId) -> &'static str {
    fleetcast::dialect::codec(d).name()
}

/// The entity a publish names (`vehicle_id`, else `device_id`, at the top level or in the
/// payload), as the broker spells entity ids: a number by its decimal text.
fn entities_named(j: &J, out: &mut BTreeSet<String>) {
    let as_entity = |v: &J| match v {
        J::Str(s) => Some(s.clone()),
        J::Num(n) => Some(n.to_string()),
        _ => None,
    };
    for holder in [Some(j), j.get("payload")].into_iter().flatten() {
        for k in ["vehicle_id", "device_id"] {
            out.extend(holder.get(k).and_then(as_entity));
        }
    }
    if let Some(J::Arr(items)) = j.get("messages") {
        for i in items {
            entities_named(i, out);
        }
    }
}

proptest! {
    #![proptest_config(config(500))]

    /// An event accepted from any publishing dialect re-encodes to every dialect without
    /// panic: each frame (whole, or projected to a `metrics` filter) is absent or one final
    /// unmasked text frame holding a JSON object; the native dialect and the publisher's
    /// own always have one; a Valtronics `device_id` is a number exactly when the entity id
    /// is a plain decimal, else that id as a string. Every reply the session made encodes
    /// to JSON (or nothing, or a control frame) in every dialect.
    #[test]
    fn dialect_events_reencode_everywhere(case in arb_dialect_case()) {
        let mut h = Harness::new();
        let principal = case.preauth.then(|| {
            h.auth.authenticate(Credential::ApiKey(case.key), START_UNIX_MS as u64 / 1000).unwrap()
        });
        let mut s = Session::new("c0-1-1".into(), Scope::None, principal, h.t0, &h.limits)
            .with_dialect(fleetcast::dialect::codec(case.dialect), case.preset, &h.limits, h.at(0));
        let mut texts: Vec<String> = Vec::new();
        if !case.preauth {
            texts.push(auth_message(case.dialect, case.key));
        }
        let mut named = BTreeSet::new();
        for (j, style) in &case.messages {
            entities_named(j, &mut named);
            texts.push(String::from_utf8(encode(j, style)).unwrap());
        }
        let metrics: Vec<Box<str>> = case.metrics.iter().map(|m| m.as_str().into()).collect();
        let mut published = 0u64;
        for (i, text) in texts.iter().enumerate() {
            let now = h.at(100 * i as u64 + 1);
            let mut ctx = Ctx { limits: &h.limits, auth: &h.auth, parser: &mut h.parser, admission: &fleetcast::session::AdmitAll };
            s.handle_message(now, Message::Text(text.as_bytes()), &mut ctx);
            while let Some(a) = s.poll_action() {
                match a {
                    Action::Reply(r) => check_reply_in_every_dialect(&r)?,
                    Action::Subscribe { reply, .. } => check_reply_in_every_dialect(&reply)?,
                    Action::Publish(p) => {
                        published += 1;
                        prop_assert!(
                            matches!(parse_j(&p.payload), Some(J::Obj(_))),
                            "{} publish made the native payload {:?}",
                            codec_name(case.dialect),
                            String::from_utf8_lossy(&p.payload)
                        );
                        if let Some(v) = &p.keys.vehicle {
                            prop_assert!(named.contains(&**v), "entity {:?} not among {:?}", v, named);
                        }
                        let (id, channel) = (p.id.clone(), p.channel);
                        let mut ev = Event::encode("fleet_a".into(), p, published, 1, b"\"e-1\"", h.t0);
                        ev.prev_status = case.prev_status.as_deref().map(Into::into);
                        check_every_dialect(&ev, case.dialect, &metrics)?;
                        // What the shard answers about it: the ack (accepted or a
                        // duplicate), and a snapshot holding it.
                        for seq in [Some(published), None] {
                            check_reply_in_every_dialect(&Reply::Ack { id: id.clone(), channel, seq })?;
                        }
                        let events = vec![std::sync::Arc::new(ev)];
                        check_reply_in_every_dialect(&Reply::Snapshot { id, channel, events })?;
                    }
                    _ => {}
                }
            }
        }
    }
}

/// Runs `messages` through a session of dialect `d` authenticated as a service; returns the
/// event of every publish it accepted.
fn dialect_events(d: DialectId, messages: &[&str]) -> Vec<Event> {
    let mut h = Harness::new();
    let principal = h
        .auth
        .authenticate(Credential::ApiKey(SERVICE_KEY), 0)
        .unwrap();
    let mut s = Session::new(
        "c0-1-1".into(),
        Scope::None,
        Some(principal),
        h.t0,
        &h.limits,
    )
    .with_dialect(fleetcast::dialect::codec(d), None, &h.limits, h.at(0));
    let mut out = Vec::new();
    for m in messages {
        let now = h.at(1);
        let mut ctx = Ctx {
            limits: &h.limits,
            auth: &h.auth,
            parser: &mut h.parser,
            admission: &fleetcast::session::AdmitAll,
        };
        s.handle_message(now, Message::Text(m.as_bytes()), &mut ctx);
        while let Some(a) = s.poll_action() {
            if let Action::Publish(p) = a {
                out.push(Event::encode("fleet_a".into(), p, 1, 1, b"\"e-1\"", h.t0));
            }
        }
    }
    out
}

/// The JSON text of an event in dialect `d` (`None`: no frame, or not JSON).
fn frame_json(ev: &Event, d: DialectId) -> Option<J> {
    let f = ev.frame_in(d)?;
    let (_, body) = server_frame(f).ok()?;
    parse_j(body)
}

/// Found by `dialect_events_reencode_everywhere` with [`NAMES_NEEDING_ESCAPES`] on: the
/// Valtronics codec writes metric names with `json::write_key`, which does not escape.
/// A metric named with a quote, a backslash or a control character makes the Valtronics
/// `telemetry_update` and `system_status_update` (fleet metrics) frames invalid JSON, and
/// so does the native payload that a Valtronics `telemetry_update` synthesizes (native
/// subscribers get invalid JSON too).
#[test]
fn valtronics_metric_names_are_escaped() {
    let natively = dialect_events(
        NATIVE,
        &[
            r#"{"type":"telemetry_update","payload":{"vehicle_id":"v1","telemetry":{"quo\"te":1,"new\nline":2,"back\\slash":3}}}"#,
            r#"{"type":"fleet_metrics","payload":{"metrics":{"quo\"te":0}}}"#,
        ],
    );
    let from_valtronics = dialect_events(
        VALTRONICS,
        &[
            r#"{"type":"telemetry_update","device_id":7,"telemetry":{"quo\"te":1,"new\nline":{"value":2,"unit":"V"}}}"#,
        ],
    );
    assert_eq!((natively.len(), from_valtronics.len()), (2, 1));
    for ev in natively.iter().chain(&from_valtronics) {
        for d in [NATIVE, VALTRONICS] {
            let f = ev.frame_in(d).expect("a frame");
            let text = f.iter().position(|&b| b == b'{').map_or(f, |i| &f[i..]);
            assert!(
                frame_json(ev, d).is_some(),
                "{} frame is not JSON: {}",
                codec_name(d),
                String::from_utf8_lossy(text)
            );
        }
    }
    let names = |v: Option<J>| match v.as_ref().and_then(|v| v.get("telemetry")) {
        Some(J::Obj(m)) => m.iter().map(|(k, _)| k.clone()).collect::<Vec<_>>(),
        other => panic!("telemetry {other:?}"),
    };
    assert_eq!(
        names(frame_json(&natively[0], VALTRONICS)),
        ["quo\"te", "new\nline", "back\\slash"]
    );
}

/// Found while writing `dialect_events_reencode_everywhere`: the canonical parts other
/// dialects are encoded from are read with `json::member`, which compares member names
/// as written, so a name written with an escape (`"teleme\u0074ry"`, `"alert\u005fid"`,
/// `"meta\u0064ata"`, `"valu\u0065"`) is not found although simd-json, validation and
/// routing see it: the same message means different things to Valtronics subscribers
/// depending on how it was encoded (no telemetry frame, `alert_id: null`, metadata lost,
/// or a Valtronics `telemetry_update` refused with "no metric in telemetry").
#[test]
fn canonical_parts_read_escaped_member_names() {
    let pairs = [
        (
            NATIVE,
            r#"{"type":"telemetry_update","payload":{"vehicle_id":"v1","telemetry":{"fuel_level":5}}}"#,
            r#"{"type":"telemetry_update","payload":{"vehicle_id":"v1","teleme\u0074ry":{"fuel_level":5}}}"#,
        ),
        (
            NATIVE,
            r#"{"type":"safety_alert","payload":{"vehicle_id":"v1","alert_id":"a1","severity":"low","category":"x","metadata":{"k":1}}}"#,
            r#"{"type":"safety_alert","payload":{"vehicle_id":"v1","alert\u005fid":"a1","severity":"low","category":"x","meta\u0064ata":{"k":1}}}"#,
        ),
        (
            VALTRONICS,
            r#"{"type":"telemetry_update","device_id":7,"telemetry":{"t":{"value":1,"unit":"C"}}}"#,
            r#"{"type":"telemetry_update","device_id":7,"telemetry":{"t":{"valu\u0065":1,"unit":"C"}}}"#,
        ),
    ];
    for (d, plain, escaped) in pairs {
        let a = dialect_events(d, &[plain]);
        let b = dialect_events(d, &[escaped]);
        assert_eq!((a.len(), b.len()), (1, 1), "{escaped}");
        assert_eq!(
            frame_json(&a[0], VALTRONICS),
            frame_json(&b[0], VALTRONICS),
            "{escaped}"
        );
    }
}
