//! The iTrack dialect (SPEC §6, `seeds/itrack-websocket-api.txt`; the shapes the seed
//! leaves out follow the public Navixy-style API it comes from) on `/event/subscription`
//! and `/v2/event/subscription`, with or without a trailing slash.
//!
//! ```text
//!  client (atmosphere.js)                               broker
//!    |-- GET /v2/user/auth?login=&password= (HTTP) ------>|
//!    |<- {"success":true,"hash":H} ------------------------|
//!    |== upgrade ?X-Atmosphere-Transport=websocket&... ===>|
//!    |<- "<uuid>|30000|X|" (Atmosphere handshake) ---------|
//!    |-- {action:"subscribe",hash:H,events:["state"],trackers:[15564]} ->|
//!    |<- {type:"response",action:"subscription/subscribe",...} ---------|
//!    |<- {type:"event",event:"state",data:{...}} (current state, then each change)
//!    |<- "X" ... "X" ->  (heartbeats, both ways)
//! ```
//!
//! Every client message carries the session `hash` from `user/auth` and is authenticated
//! anew: it decodes to an `auth` whose `then_subscribe` is the (un)subscription, and the
//! session accepts a repeat of the same identity. A message's "id", for the replies that
//! answer it, is the whole request: an error says the `action` it answers and echoes the
//! request's parameters in `data` (without `action` and `hash`), as the API does.
//!
//! Trackers are the core's vehicles: tracker 15564 is the entity `"15564"`, whoever
//! published it. Positions become `state` events, judged at encoding time against the
//! node's `[itrack]` thresholds (`connection_status`, `movement_status`). Times are
//! `YYYY-MM-DD HH:MM:SS` in UTC.
//!
//! Errors are `{type:"error", action, status:{code, description}, data, message}` with the
//! API's error codes ([`error_status`]); `message` (ours) says what exactly was wrong.

use super::native::{
    self, AuthRequest, Command, Filters, Parser, ProtoError, SubAction, SubscribeRequest,
};
use super::view::{StateRules, View};
use super::{Codec, DialectId, Heartbeat, ITRACK};
use crate::event::Event;
use crate::json;
use crate::model::Channel;
use crate::session::Reply;
use crate::wire::frame;
use simd_json::BorrowedValue as Value;
use simd_json::prelude::*;
use std::borrow::Cow;
use std::cell::Cell;
use std::ops::Range;
use std::time::{SystemTime, UNIX_EPOCH};

pub struct Itrack;

/// The only event this broker streams.
const STATE: &str = "state";

/// Most trackers one message may name (the session's subscription cap still applies).
const MAX_TRACKERS: usize = 256;

/// The heartbeat frame, both ways.
const HEARTBEAT: &[u8] = b"X";

/// The `field` of a refusal of the message as a whole (not JSON, not an object, too deep):
/// the API's "Wrong request format".
const REQUEST: &str = "request";

/// The API's error `code` and `description` for a refusal with the core's `code` (and
/// the field at fault):
///
/// | core | code | description | when |
/// |---|---|---|---|
/// | 400, field `request`/`action` | 5 | Wrong request format | not a JSON object, missing or unknown `action` |
/// | 400 | 7 | Invalid parameters | `events`, `trackers`, subscription cap |
/// | 401 | 3 | Wrong user hash | missing, unknown or expired `hash` |
/// | 403 | 11 | Access denied | a tracker the user does not follow (the same whether it exists elsewhere or not at all) |
/// | 404 | 201 | Not found in database | |
/// | 408 | 4 | User or API key not found or session ended | no subscribe within the auth timeout |
/// | 409 | 13 | Operation not permitted | another user's hash on this connection |
/// | 413 | 9 | Too large request | |
/// | 429 | 15 | Too many requests (rate limit exceeded) | message rate, connection caps |
/// | 503 | 8 | Queue service error, try again later | node capacity |
/// | other | 6 | Unexpected error | |
pub fn error_status(code: u16, field: Option<&str>) -> (u16, &'static str) {
    match code {
        400 if matches!(field, Some(REQUEST | "action")) => (5, "Wrong request format"),
        400 => (7, "Invalid parameters"),
        401 => (3, "Wrong user hash"),
        403 => (11, "Access denied"),
        404 => (201, "Not found in database"),
        408 => (4, "User or API key not found or session ended"),
        409 => (13, "Operation not permitted"),
        413 => (9, "Too large request"),
        429 => (15, "Too many requests (rate limit exceeded)"),
        503 => (8, "Queue service error, try again later"),
        _ => (6, "Unexpected error"),
    }
}

impl Codec for Itrack {
    fn id(&self) -> DialectId {
        ITRACK
    }

    fn name(&self) -> &'static str {
        "itrack"
    }

    fn decode(
        &self,
        parser: &mut Parser,
        raw: &[u8],
        _acting_as: Option<&str>,
    ) -> (Option<Range<usize>>, Result<Command, ProtoError>) {
        // The client's heartbeat: hearing it is enough.
        if raw == HEARTBEAT {
            return (None, Ok(Command::Ack));
        }
        let parsed = Cell::new(false);
        let (_, result) = parser.decode_with(raw, &|_, v, _| {
            parsed.set(true);
            decode_value(v)
        });
        if parsed.get() {
            // The request is the "id" its replies carry (`action` and `data` of errors).
            (Some(0..raw.len()), result)
        } else {
            let result = result.map_err(|e| ProtoError {
                field: Some(REQUEST),
                ..e
            });
            (None, result)
        }
    }

    fn encode_reply(&self, reply: &Reply, _ts: &str) -> Option<Vec<u8>> {
        let mut o = Vec::with_capacity(160);
        match reply {
            // The subscription's response says it all.
            Reply::AuthOk { .. } => return None,
            Reply::AuthError { id, code, message } => {
                write_error(&mut o, id.as_deref(), *code, None, message)
            }
            Reply::Error { id, error } => write_error(
                &mut o,
                id.as_deref(),
                error.code,
                error.field,
                &error.message,
            ),
            Reply::Subscribed { filters, .. } => {
                o.extend_from_slice(
                    b"{\"type\":\"response\",\"action\":\"subscription/subscribe\",\
                      \"events\":[\"state\"],\"data\":{\"state\":{",
                );
                for (i, t) in distinct(&filters.vehicles).enumerate() {
                    if i > 0 {
                        o.push(b',');
                    }
                    json::write_key(&mut o, t);
                    o.extend_from_slice(b"\"normal\"");
                }
                o.extend_from_slice(b"}}}");
            }
            Reply::Unsubscribed { filters, .. } => {
                // The API answers with the list of the request's tracker ids.
                o.extend_from_slice(
                    b"{\"type\":\"response\",\"action\":\"subscription/unsubscribe\",\
                      \"events\":[\"state\"],\"data\":[",
                );
                for (i, t) in distinct(&filters.vehicles).enumerate() {
                    if i > 0 {
                        o.push(b',');
                    }
                    write_tracker_id(&mut o, t);
                }
                o.extend_from_slice(b"]}");
            }
            // No pings in JSON, no publishes, no one-off snapshot requests.
            Reply::Pong { .. } | Reply::Ack { .. } | Reply::Snapshot { .. } => return None,
            Reply::Heartbeat => return Some(frame::text_frame(HEARTBEAT)),
            Reply::WsPong(p) => return Some(frame::pong_frame(p)),
        }
        Some(frame::text_frame(&o))
    }

    fn encode_event(&self, ev: &Event) -> Option<Vec<u8>> {
        state_event(ev, &StateRules::default(), now_ms())
    }

    fn encode_projected(&self, ev: &Event, view: &View) -> Option<Vec<u8>> {
        let rules = view.states.as_deref().copied().unwrap_or_default();
        state_event(ev, &rules, now_ms())
    }

    /// A text frame `X` (not a WebSocket ping); the client's `X` is its answer.
    fn heartbeat(&self) -> Heartbeat {
        Heartbeat::Json
    }

    fn shows_tracker_states(&self) -> bool {
        true
    }

    /// atmosphere.js falls back to other transports (long-polling, SSE...) with plain
    /// HTTP requests: tell them which one there is.
    fn check_handshake(&self, query: &[(String, String)]) -> Result<(), (u16, String)> {
        let transport = query
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("X-Atmosphere-Transport"))
            .map(|(_, v)| v.as_str());
        match transport {
            Some(t) if !t.eq_ignore_ascii_case("websocket") => {
                let shown: String = t.chars().take(32).collect();
                Err((
                    400,
                    format!(
                        "X-Atmosphere-Transport={shown:?} is not supported: only the websocket \
                         transport is (X-Atmosphere-Transport=websocket)"
                    ),
                ))
            }
            _ => Ok(()),
        }
    }

    /// The Atmosphere protocol's handshake: `<tracking id>|<heartbeat ms>|X|`.
    fn greeting(&self, heartbeat_ms: u64) -> Option<Vec<u8>> {
        let text = format!("{}|{heartbeat_ms}|X|", uuid_v4());
        Some(frame::text_frame(text.as_bytes()))
    }

    fn dev_hint(&self, host: &str, _key: &str, _fleet: &str) -> String {
        format!(
            "curl 'http://{host}/v2/user/auth?login=demo&password=<the password printed above>' \
             for a hash, then ws://{host}/v2/event/subscription?X-Atmosphere-tracking-id=0\
             &X-Atmosphere-Framework=2.3.6-javascript&X-Atmosphere-Transport=websocket\
             &Content-Type=application/json&X-atmo-protocol=true and send \
             {{\"action\":\"subscribe\",\"hash\":\"<hash>\",\"events\":[\"state\"],\
             \"trackers\":[15564]}}"
        )
    }
}

// ---------------------------------------------------------------------- decoding

/// `{action, hash, events, trackers}`: an auth with the session hash, then the
/// (un)subscription of the trackers' positions.
fn decode_value(v: &Value<'_>) -> Result<Command, ProtoError> {
    let action = match v.get("action") {
        None => {
            return Err(ProtoError::field(
                "action",
                "missing action (subscribe or unsubscribe)",
            ));
        }
        Some(a) => a
            .as_str()
            .ok_or_else(|| ProtoError::field("action", "action must be a string"))?,
    };
    let action = match action {
        "subscribe" => SubAction::Subscribe,
        "unsubscribe" => SubAction::Unsubscribe,
        other => {
            return Err(ProtoError::field(
                "action",
                format!("unknown action {other:?} (subscribe or unsubscribe)"),
            ));
        }
    };
    let hash = match v.get("hash").filter(|h| !h.is_null()) {
        None => return Err(wrong_hash("missing hash: send the hash user/auth returned")),
        Some(h) => h
            .as_str()
            .filter(|h| !h.is_empty())
            .ok_or_else(|| wrong_hash("hash must be the string user/auth returned"))?,
    };
    let events = v
        .get("events")
        .filter(|e| !e.is_null())
        .ok_or_else(|| ProtoError::field("events", "missing events (e.g. [\"state\"])"))?
        .as_array()
        .ok_or_else(|| ProtoError::field("events", "events must be a list (e.g. [\"state\"])"))?;
    if events.is_empty() {
        return Err(ProtoError::field(
            "events",
            "events must name at least one event (\"state\")",
        ));
    }
    for e in events.iter() {
        match e.as_str() {
            Some(STATE) => {}
            Some(other) => {
                return Err(ProtoError::field(
                    "events",
                    format!("unknown event {other:?} (the one event is \"state\")"),
                ));
            }
            None => {
                return Err(ProtoError::field(
                    "events",
                    "events must be a list of event names (\"state\")",
                ));
            }
        }
    }
    let trackers = v
        .get("trackers")
        .filter(|t| !t.is_null())
        .ok_or_else(|| ProtoError::field("trackers", "missing trackers (a list of tracker ids)"))?
        .as_array()
        .ok_or_else(|| ProtoError::field("trackers", "trackers must be a list of tracker ids"))?;
    if trackers.is_empty() {
        return Err(ProtoError::field(
            "trackers",
            "trackers must name at least one tracker",
        ));
    }
    if trackers.len() > MAX_TRACKERS {
        return Err(ProtoError::field(
            "trackers",
            format!("at most {MAX_TRACKERS} trackers per message"),
        ));
    }
    let mut vehicles: Vec<Box<str>> = Vec::with_capacity(trackers.len());
    for t in trackers.iter() {
        let id = native::entity_id(t).ok_or_else(|| {
            ProtoError::field(
                "trackers",
                format!("{t} is not a tracker id (an integer, or a non-empty string)"),
            )
        })?;
        if !vehicles.contains(&id) {
            vehicles.push(id);
        }
    }
    Ok(Command::Auth(AuthRequest {
        session_hash: Some(hash.to_owned()),
        then_subscribe: vec![SubscribeRequest {
            action,
            channel: Channel::VehicleLocations,
            filters: Filters {
                vehicles,
                ..Filters::default()
            },
            since: None,
        }],
        ..AuthRequest::default()
    }))
}

fn wrong_hash(message: &'static str) -> ProtoError {
    ProtoError {
        code: 401,
        message: Cow::Borrowed(message),
        field: Some("hash"),
    }
}

// ---------------------------------------------------------------------- encoding

/// `{type:"error", action, status:{code, description}, data, message}`. `request` is the
/// message answered, when known (the "id" [`Itrack::decode`] gave it).
fn write_error(
    o: &mut Vec<u8>,
    request: Option<&[u8]>,
    code: u16,
    field: Option<&str>,
    message: &str,
) {
    let (api_code, description) = error_status(code, field);
    let (action, data) = request.map(request_parts).unwrap_or((None, None));
    o.extend_from_slice(b"{\"type\":\"error\",\"action\":");
    match action {
        Some(a) => json::write_str(o, a),
        None => o.extend_from_slice(b"null"),
    }
    o.extend_from_slice(b",\"status\":{\"code\":");
    json::write_u64(o, api_code as u64);
    o.extend_from_slice(b",\"description\":");
    json::write_str(o, description);
    o.extend_from_slice(b"},\"data\":");
    match data {
        Some(d) => o.extend_from_slice(d.as_bytes()),
        None => o.extend_from_slice(b"null"),
    }
    o.extend_from_slice(b",\"message\":");
    json::write_str(o, message);
    o.push(b'}');
}

/// The API action a request asked for (`subscription/subscribe`), and its parameters
/// without `action` and `hash` (JSON text). Nothing for bytes that are not a JSON object
/// (an id another dialect's message gave).
fn request_parts(raw: &[u8]) -> (Option<&'static str>, Option<String>) {
    if raw.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return (None, None);
    }
    let mut copy = raw.to_vec();
    let Ok(mut v) = simd_json::to_borrowed_value(&mut copy) else {
        return (None, None);
    };
    let Some(obj) = v.as_object_mut() else {
        return (None, None);
    };
    let action = match obj.get("action").and_then(|a| a.as_str()) {
        Some("subscribe") => Some("subscription/subscribe"),
        Some("unsubscribe") => Some("subscription/unsubscribe"),
        _ => None,
    };
    obj.remove("action");
    obj.remove("hash");
    (action, Some(v.encode()))
}

/// Each id once, in order.
fn distinct(ids: &[Box<str>]) -> impl Iterator<Item = &str> {
    ids.iter()
        .enumerate()
        .filter(|(i, id)| !ids[..*i].contains(id))
        .map(|(_, id)| &**id)
}

/// A tracker id: a JSON number when the entity id is a plain decimal (`"15564"` ->
/// `15564`, as the API numbers trackers); otherwise the string.
fn write_tracker_id(o: &mut Vec<u8>, id: &str) {
    let numeric = !id.is_empty()
        && id.len() <= 15
        && id.bytes().all(|b| b.is_ascii_digit())
        && (id == "0" || !id.starts_with('0'));
    if numeric {
        o.extend_from_slice(id.as_bytes());
    } else {
        json::write_str(o, id);
    }
}

fn write_opt_f64(o: &mut Vec<u8>, v: Option<f64>) {
    match v {
        Some(v) => json::write_f64(o, v),
        None => o.extend_from_slice(b"null"),
    }
}

/// The `state` event of a position, its statuses judged by `rules` at `now_ms`; nothing
/// for other events (the API streams tracker states).
fn state_event(ev: &Event, rules: &StateRules, now_ms: i64) -> Option<Vec<u8>> {
    if ev.channel != Channel::VehicleLocations {
        return None;
    }
    let loc = ev.canon.location?;
    let tracker = ev.keys.vehicle.as_deref()?;
    let mut o = Vec::with_capacity(360);
    o.extend_from_slice(b"{\"type\":\"event\",\"event\":\"state\",\"user_time\":");
    write_datetime(&mut o, now_ms);
    o.extend_from_slice(b",\"data\":{\"source_id\":");
    write_tracker_id(&mut o, tracker);
    o.extend_from_slice(b",\"gps\":{\"updated\":");
    write_datetime(&mut o, ev.ts_ms);
    o.extend_from_slice(b",\"location\":{\"lat\":");
    json::write_f64(&mut o, loc.lat);
    o.extend_from_slice(b",\"lng\":");
    json::write_f64(&mut o, loc.lon);
    o.extend_from_slice(b"},\"heading\":");
    write_opt_f64(&mut o, loc.heading);
    // km/h, the core's unit and the API's.
    o.extend_from_slice(b",\"speed\":");
    write_opt_f64(&mut o, loc.speed_kmh);
    o.extend_from_slice(b",\"alt\":");
    write_opt_f64(&mut o, loc.altitude_m);
    o.extend_from_slice(b"},\"connection_status\":");
    json::write_str(&mut o, rules.connection_status(ev.ts_ms, now_ms));
    o.extend_from_slice(b",\"movement_status\":");
    let speed = loc.speed_kmh.filter(|s| s.is_finite()).unwrap_or(0.0);
    let at_rest_since = ev.stopped_since_ms.unwrap_or(ev.ts_ms);
    json::write_str(&mut o, rules.movement_status(speed, at_rest_since, now_ms));
    o.extend_from_slice(b",\"last_update\":");
    write_datetime(&mut o, ev.ts_ms);
    o.extend_from_slice(b"}}");
    Some(o)
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// `"YYYY-MM-DD HH:MM:SS"` in UTC, as the API writes times (any instant: years outside
/// 0..=9999 are written as they are).
fn write_datetime(o: &mut Vec<u8>, unix_ms: i64) {
    let secs = unix_ms.div_euclid(1000);
    let (days, in_day) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, m, d) = civil_from_days(days);
    let two = |o: &mut Vec<u8>, n: i64| {
        o.push(b'0' + (n / 10) as u8);
        o.push(b'0' + (n % 10) as u8);
    };
    o.push(b'"');
    if (0..=9999).contains(&y) {
        two(o, y / 100);
        two(o, y % 100);
    } else {
        json::write_i64(o, y);
    }
    o.push(b'-');
    two(o, m);
    o.push(b'-');
    two(o, d);
    o.push(b' ');
    two(o, in_day / 3600);
    o.push(b':');
    two(o, in_day / 60 % 60);
    o.push(b':');
    two(o, in_day % 60);
    o.push(b'"');
}

/// Year, month (1..=12) and day (1..=31) of a day counted from 1970-01-01 (proleptic
/// Gregorian; Howard Hinnant's `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// A random (version 4) UUID, lowercase: the connection's Atmosphere tracking id.
fn uuid_v4() -> String {
    let mut b = [0u8; 16];
    if getrandom::fill(&mut b).is_err() {
        // No system randomness: still unique per connection on this node.
        use sha2::Digest;
        use std::sync::atomic::{AtomicU64, Ordering};
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let t = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let digest = sha2::Sha256::new()
            .chain_update(t.to_le_bytes())
            .chain_update(n.to_le_bytes())
            .finalize();
        b.copy_from_slice(&digest[..16]);
    }
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(36);
    for (i, x) in b.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            s.push('-');
        }
        s.push(HEX[(x >> 4) as usize] as char);
        s.push(HEX[(x & 0xf) as usize] as char);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Canon, Location, Publication};
    use crate::model::EntityKeys;
    use serde_json::{Value as J, json};
    use std::sync::Arc;
    use std::time::Instant;

    fn decode(text: &str) -> (Option<Range<usize>>, Result<Command, ProtoError>) {
        Itrack.decode(&mut Parser::default(), text.as_bytes(), None)
    }

    /// The text of one final, unmasked text frame.
    fn frame_text(f: &[u8]) -> &str {
        assert_eq!(f[0], 0x81, "one final text frame");
        let (len, head) = match f[1] {
            126 => (u16::from_be_bytes([f[2], f[3]]) as usize, 4),
            n => (n as usize, 2),
        };
        assert_eq!(f.len(), head + len, "frame length");
        std::str::from_utf8(&f[head..]).unwrap()
    }

    fn frame_json(f: &[u8]) -> J {
        serde_json::from_str(frame_text(f)).expect("JSON")
    }

    fn reply(r: &Reply) -> J {
        frame_json(&Itrack.encode_reply(r, "t").expect("a frame"))
    }

    /// The error reply a refused message gets, as the session makes it.
    fn refusal(text: &str) -> J {
        let (id, r) = decode(text);
        let error = r.expect_err("refused");
        let id = id.map(|r| text.as_bytes()[r].to_vec());
        reply(&Reply::Error { id, error })
    }

    fn subscription(text: &str) -> (String, SubscribeRequest) {
        match decode(text).1 {
            Ok(Command::Auth(mut a)) => {
                assert_eq!(a.then_subscribe.len(), 1);
                let s = a.then_subscribe.pop().unwrap();
                (a.session_hash.unwrap(), s)
            }
            other => panic!("{text}: {other:?}"),
        }
    }

    fn filters(v: &[&str]) -> Filters {
        Filters {
            vehicles: v.iter().map(|&s| s.into()).collect(),
            ..Filters::default()
        }
    }

    #[test]
    fn subscribe_and_unsubscribe_carry_the_hash_and_the_trackers() {
        let (hash, s) = subscription(
            r#"{"action":"subscribe","hash":"f4bf1b75403d851653dad99c78c4b237","events":["state"],"trackers":[15564,"15565",15564,"truck-7"]}"#,
        );
        assert_eq!(hash, "f4bf1b75403d851653dad99c78c4b237");
        assert_eq!(s.action, SubAction::Subscribe);
        assert_eq!(s.channel, Channel::VehicleLocations);
        assert_eq!(s.filters, filters(&["15564", "15565", "truck-7"]));
        assert_eq!(s.since, None);
        let (_, s) = subscription(
            r#"{"action":"unsubscribe","hash":"h","events":["state"],"trackers":[15568]}"#,
        );
        assert_eq!(s.action, SubAction::Unsubscribe);
        assert_eq!(s.filters, filters(&["15568"]));
        // The request itself is what its replies answer.
        let text = r#" {"action":"subscribe","hash":"h","events":["state"],"trackers":[1]} "#;
        assert_eq!(decode(text).0, Some(0..text.len()));
    }

    #[test]
    fn heartbeats_are_heard_not_parsed() {
        assert!(matches!(decode("X"), (None, Ok(Command::Ack))));
        assert_eq!(
            Itrack.encode_reply(&Reply::Heartbeat, "t"),
            Some(frame::text_frame(b"X"))
        );
        // Anything else that is not JSON is a malformed request.
        for text in ["x", "X ", "XX", "", "X|"] {
            let (id, r) = decode(text);
            let e = r.expect_err(text);
            assert_eq!(
                (id, e.code, e.field),
                (None, 400, Some(REQUEST)),
                "{text:?}"
            );
        }
    }

    #[test]
    fn refusals_have_the_api_codes() {
        let cases = [
            // (message, code, description, action, data)
            (
                r#"{"action":"subscribe","events":["state"],"trackers":[15564]}"#,
                3,
                "Wrong user hash",
                json!("subscription/subscribe"),
                json!({"events":["state"],"trackers":[15564]}),
            ),
            (
                r#"{"action":"unsubscribe","hash":"","events":["state"],"trackers":[15564]}"#,
                3,
                "Wrong user hash",
                json!("subscription/unsubscribe"),
                json!({"events":["state"],"trackers":[15564]}),
            ),
            (
                r#"{"action":"subscribe","hash":"h","events":["state","readings"],"trackers":[1]}"#,
                7,
                "Invalid parameters",
                json!("subscription/subscribe"),
                json!({"events":["state","readings"],"trackers":[1]}),
            ),
            (
                r#"{"action":"subscribe","hash":"h","events":[],"trackers":[1]}"#,
                7,
                "Invalid parameters",
                json!("subscription/subscribe"),
                json!({"events":[],"trackers":[1]}),
            ),
            (
                r#"{"action":"subscribe","hash":"h","events":["state"],"trackers":[]}"#,
                7,
                "Invalid parameters",
                json!("subscription/subscribe"),
                json!({"events":["state"],"trackers":[]}),
            ),
            (
                r#"{"action":"subscribe","hash":"h","events":["state"]}"#,
                7,
                "Invalid parameters",
                json!("subscription/subscribe"),
                json!({"events":["state"]}),
            ),
            (
                r#"{"action":"subscribe","hash":"h","events":["state"],"trackers":[1.5]}"#,
                7,
                "Invalid parameters",
                json!("subscription/subscribe"),
                json!({"events":["state"],"trackers":[1.5]}),
            ),
            (
                r#"{"action":"teleport","hash":"h"}"#,
                5,
                "Wrong request format",
                J::Null,
                json!({}),
            ),
            (
                r#"{"hash":"h"}"#,
                5,
                "Wrong request format",
                J::Null,
                json!({}),
            ),
            ("{nope", 5, "Wrong request format", J::Null, J::Null),
            ("[1,2]", 5, "Wrong request format", J::Null, J::Null),
        ];
        for (text, code, description, action, data) in cases {
            let v = refusal(text);
            assert_eq!(v["type"], "error", "{text}: {v}");
            assert_eq!(
                v["status"],
                json!({"code":code,"description":description}),
                "{text}: {v}"
            );
            assert_eq!(v["action"], action, "{text}: {v}");
            assert_eq!(v["data"], data, "{text}: {v}");
            assert!(v["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
        }
        // The unknown event is named.
        let v =
            refusal(r#"{"action":"subscribe","hash":"h","events":["readings"],"trackers":[1]}"#);
        assert!(
            v["message"].as_str().unwrap().contains("\"readings\""),
            "{v}"
        );
    }

    #[test]
    fn the_core_codes_map_to_the_api_codes() {
        let request =
            br#"{"action":"unsubscribe","hash":"secret","events":["state"],"trackers":[15564]}"#;
        for (code, api) in [
            (401, 3),
            (403, 11),
            (404, 201),
            (408, 4),
            (409, 13),
            (413, 9),
            (429, 15),
            (503, 8),
            (500, 6),
        ] {
            let v = reply(&Reply::AuthError {
                id: Some(request.to_vec()),
                code,
                message: "why".into(),
            });
            assert_eq!(v["status"]["code"], api, "{code}: {v}");
            assert_eq!(v["action"], "subscription/unsubscribe");
            assert_eq!(
                v["data"],
                json!({"events":["state"],"trackers":[15564]}),
                "no hash"
            );
            assert_eq!(v["message"], "why");
            let v = reply(&Reply::Error {
                id: None,
                error: ProtoError::new(code, "why"),
            });
            assert_eq!(
                (&v["status"]["code"], &v["action"], &v["data"]),
                (&json!(api), &J::Null, &J::Null)
            );
        }
        assert_eq!(error_status(401, None).1, "Wrong user hash");
        // Another dialect's id is not a request.
        let v = reply(&Reply::Error {
            id: Some(b"\"auth-1\"".to_vec()),
            error: ProtoError::new(400, "x"),
        });
        assert_eq!((&v["action"], &v["data"]), (&J::Null, &J::Null));
    }

    #[test]
    fn responses_list_the_trackers() {
        let subscribed = Reply::Subscribed {
            id: None,
            channel: Channel::VehicleLocations,
            filters: filters(&["15564", "truck-7", "15564", "0015"]),
            position: None,
        };
        assert_eq!(
            frame_text(&Itrack.encode_reply(&subscribed, "t").unwrap()),
            r#"{"type":"response","action":"subscription/subscribe","events":["state"],"data":{"state":{"15564":"normal","truck-7":"normal","0015":"normal"}}}"#
        );
        let unsubscribed = Reply::Unsubscribed {
            id: None,
            channel: Channel::VehicleLocations,
            filters: filters(&["15568", "truck-7", "0015"]),
        };
        assert_eq!(
            frame_text(&Itrack.encode_reply(&unsubscribed, "t").unwrap()),
            r#"{"type":"response","action":"subscription/unsubscribe","events":["state"],"data":[15568,"truck-7","0015"]}"#
        );
        for quiet in [
            Reply::Pong { id: None },
            Reply::Ack {
                id: None,
                channel: Channel::VehicleLocations,
                seq: Some(1),
            },
            Reply::Snapshot {
                id: None,
                channel: Channel::VehicleLocations,
                events: vec![],
            },
        ] {
            assert!(Itrack.encode_reply(&quiet, "t").is_none(), "{quiet:?}");
        }
        assert_eq!(
            Itrack.encode_reply(&Reply::WsPong(b"p".to_vec()), "t"),
            Some(frame::pong_frame(b"p"))
        );
    }

    fn position(vehicle: &str, loc: Option<Location>, ts_ms: i64, stopped: Option<i64>) -> Event {
        let p = Publication {
            channel: Channel::VehicleLocations,
            id: None,
            payload: b"{}".to_vec(),
            keys: EntityKeys {
                vehicle: Some(vehicle.into()),
                trip: None,
                driver: None,
            },
            severity: None,
            category: None,
            status: None,
            canon: Canon {
                location: loc,
                ..Canon::default()
            },
            timestamp: "t".into(),
            ts_ms,
            ack: false,
            publisher: "p".into(),
            bind_check: Default::default(),
        };
        let mut ev = Event::encode("f".into(), p, 1, 1, b"\"e\"", Instant::now());
        ev.stopped_since_ms = stopped;
        ev
    }

    #[test]
    fn positions_are_states_judged_when_encoded() {
        // 2018-10-17 12:51:43 UTC.
        let t = 1_539_780_703_000;
        let rules = StateRules {
            idle_after_ms: 60_000,
            offline_after_ms: 600_000,
            parked_after_ms: 300_000,
            moving_kmh: 5,
        };
        let loc = Location {
            lat: 14.330065796228606,
            lon: -90.99037259141691,
            speed_kmh: Some(36.5),
            heading: Some(248.0),
            accuracy_m: Some(5.0),
            altitude_m: Some(431.0),
        };
        let ev = position("10284", Some(loc), t, None);
        let text = String::from_utf8(state_event(&ev, &rules, t + 12_000).unwrap()).unwrap();
        assert_eq!(
            text,
            r#"{"type":"event","event":"state","user_time":"2018-10-17 12:51:55","data":{"source_id":10284,"gps":{"updated":"2018-10-17 12:51:43","location":{"lat":14.330065796228606,"lng":-90.99037259141691},"heading":248,"speed":36.5,"alt":431},"connection_status":"active","movement_status":"moving","last_update":"2018-10-17 12:51:43"}}"#
        );
        let status = |ev: &Event, now| {
            let v: J = serde_json::from_slice(&state_event(ev, &rules, now).unwrap()).unwrap();
            (
                v["data"]["connection_status"].as_str().unwrap().to_owned(),
                v["data"]["movement_status"].as_str().unwrap().to_owned(),
            )
        };
        let s = |a: &str, b: &str| (a.to_owned(), b.to_owned());
        assert_eq!(status(&ev, t + 60_000), s("idle", "moving"));
        assert_eq!(status(&ev, t + 600_000), s("offline", "moving"));
        let slow = Location {
            speed_kmh: Some(5.0),
            ..loc
        };
        // At rest since 4 minutes before this position: stopped, then parked.
        let resting = position("10284", Some(slow), t, Some(t - 240_000));
        assert_eq!(status(&resting, t + 1_000), s("active", "stopped"));
        assert_eq!(status(&resting, t + 60_000), s("idle", "parked"));
        // Not known to be at rest before: since this position.
        let fresh = position("10284", Some(slow), t, None);
        assert_eq!(status(&fresh, t + 299_999), s("idle", "stopped"));
        assert_eq!(status(&fresh, t + 300_000), s("idle", "parked"));
        // Unknown values are null; a speed unknown counts as at rest.
        let bare = Location {
            lat: 1.0,
            lon: 2.0,
            ..Location::default()
        };
        let v: J = serde_json::from_slice(
            &state_event(&position("truck-7", Some(bare), t, None), &rules, t).unwrap(),
        )
        .unwrap();
        assert_eq!(v["data"]["source_id"], "truck-7");
        assert_eq!(
            v["data"]["gps"],
            json!({"updated":"2018-10-17 12:51:43","location":{"lat":1,"lng":2},"heading":null,"speed":null,"alt":null})
        );
        assert_eq!(v["data"]["movement_status"], "stopped");
        // Not a position: nothing.
        assert!(state_event(&position("1", None, t, None), &rules, t).is_none());
        assert!(Itrack.encode_event(&position("1", None, t, None)).is_none());
        // The view's rules, else the defaults.
        let ev = position("1", Some(loc), now_ms() - 200_000, None);
        let shown = |view: &View| -> J {
            serde_json::from_slice(&Itrack.encode_projected(&ev, view).unwrap()).unwrap()
        };
        let strict = View {
            states: Some(Arc::new(StateRules {
                offline_after_ms: 100_000,
                ..rules
            })),
            ..View::default()
        };
        assert_eq!(shown(&strict)["data"]["connection_status"], "offline");
        assert_eq!(shown(&View::default())["data"]["connection_status"], "idle");
    }

    #[test]
    fn times_are_utc_civil_times() {
        let shown = |ms| {
            let mut o = Vec::new();
            write_datetime(&mut o, ms);
            String::from_utf8(o).unwrap()
        };
        assert_eq!(shown(0), "\"1970-01-01 00:00:00\"");
        assert_eq!(shown(-1), "\"1969-12-31 23:59:59\"");
        assert_eq!(shown(951_782_400_000), "\"2000-02-29 00:00:00\"");
        assert_eq!(shown(253_402_300_799_999), "\"9999-12-31 23:59:59\"");
        assert_eq!(shown(253_402_300_800_000), "\"10000-01-01 00:00:00\"");
        for ms in [i64::MIN, i64::MAX] {
            let _: J = serde_json::from_str(&shown(ms)).unwrap();
        }
    }

    #[test]
    fn the_greeting_is_the_atmosphere_handshake() {
        let a = Itrack.greeting(30_000).unwrap();
        let text = frame_text(&a);
        let parts: Vec<&str> = text.split('|').collect();
        assert_eq!(parts.len(), 4, "{text}");
        assert_eq!(&parts[1..], ["30000", "X", ""]);
        let uuid = parts[0];
        assert_eq!(uuid.len(), 36, "{uuid}");
        for (i, c) in uuid.char_indices() {
            if matches!(i, 8 | 13 | 18 | 23) {
                assert_eq!(c, '-', "{uuid}");
            } else {
                assert!(c.is_ascii_hexdigit() && !c.is_ascii_uppercase(), "{uuid}");
            }
        }
        assert_eq!(&uuid[14..15], "4", "version 4: {uuid}");
        assert!("89ab".contains(&uuid[19..20]), "variant: {uuid}");
        let b = Itrack.greeting(30_000).unwrap();
        assert_ne!(a, b, "fresh per connection");
    }

    #[test]
    fn only_the_websocket_transport_is_served() {
        let q = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let seed = q(&[
            ("X-Atmosphere-tracking-id", "0"),
            ("X-Atmosphere-Framework", "2.3.6-javascript"),
            ("X-Atmosphere-Transport", "websocket"),
            ("Content-Type", "application/json"),
            ("X-atmo-protocol", "true"),
        ]);
        assert!(Itrack.check_handshake(&seed).is_ok());
        assert!(Itrack.check_handshake(&[]).is_ok());
        let (status, message) = Itrack
            .check_handshake(&q(&[("X-Atmosphere-Transport", "long-polling")]))
            .unwrap_err();
        assert_eq!(status, 400);
        assert!(
            message.contains("long-polling") && message.contains("websocket"),
            "{message}"
        );
    }

    #[test]
    fn the_dev_hint_logs_in_then_subscribes() {
        let hint = Itrack.dev_hint("127.0.0.1:8000", "k", "fleet_001");
        assert!(
            hint.contains("http://127.0.0.1:8000/v2/user/auth?login=demo&password="),
            "{hint}"
        );
        assert!(hint.contains("the password printed above"), "{hint}");
        assert!(
            hint.contains("ws://127.0.0.1:8000/v2/event/subscription?X-Atmosphere-tracking-id=0&X-Atmosphere-Framework=2.3.6-javascript&X-Atmosphere-Transport=websocket&Content-Type=application/json&X-atmo-protocol=true"),
            "{hint}"
        );
        assert!(
            hint.contains(
                r#"{"action":"subscribe","hash":"<hash>","events":["state"],"trackers":[15564]}"#
            ),
            "{hint}"
        );
    }

    mod fuzz {
        use super::*;
        use proptest::prelude::*;

        fn arb_value() -> impl Strategy<Value = J> {
            prop_oneof![
                3 => prop::sample::select(vec![
                    "subscribe", "unsubscribe", "state", "readings", "f4bf1b75403d851653dad99c78c4b237",
                    "15564", "", "X",
                ]).prop_map(|s| json!(s)),
                2 => "[a-zA-Z0-9/_\\-\"\\\\é.]{0,16}".prop_map(J::String),
                2 => any::<i64>().prop_map(|n| json!(n)),
                1 => any::<f64>().prop_map(|x| json!(x)),
                1 => any::<bool>().prop_map(J::Bool),
                1 => Just(J::Null),
                2 => prop::collection::vec(
                    prop_oneof![
                        Just(json!("state")),
                        any::<u32>().prop_map(|n| json!(n)),
                        "[a-z0-9]{0,6}".prop_map(J::String),
                        Just(J::Null),
                        Just(json!(1.5)),
                    ],
                    0..5,
                ).prop_map(J::Array),
                1 => Just(json!({"x": 1})),
            ]
        }

        fn arb_message() -> impl Strategy<Value = String> {
            let names = prop::sample::select(vec![
                "action", "hash", "events", "trackers", "requests", "id", "other",
            ]);
            let action = prop::sample::select(vec!["subscribe", "unsubscribe", "ping"]);
            (action, prop::collection::vec((names, arb_value()), 0..6)).prop_map(|(a, kv)| {
                let mut m = serde_json::Map::new();
                m.insert("action".into(), json!(a));
                for (k, v) in kv {
                    m.insert(k.to_string(), v);
                }
                J::Object(m).to_string()
            })
        }

        fn arb_location() -> impl Strategy<Value = Option<Location>> {
            let opt = || prop::option::of(prop_oneof![4 => -500.0f64..500.0, 1 => any::<f64>()]);
            prop::option::weighted(
                0.9,
                (any::<f64>(), -180.0f64..180.0, opt(), opt(), opt(), opt()).prop_map(
                    |(lat, lon, speed_kmh, heading, accuracy_m, altitude_m)| Location {
                        lat,
                        lon,
                        speed_kmh,
                        heading,
                        accuracy_m,
                        altitude_m,
                    },
                ),
            )
        }

        /// A frame this dialect sends: a JSON object, or the heartbeat `X`.
        fn check_frame(f: &[u8]) -> Result<(), TestCaseError> {
            if f[0] == 0x8A {
                return Ok(());
            }
            let text = frame_text(f);
            if text != "X" {
                let v: J = serde_json::from_str(text)
                    .map_err(|e| TestCaseError::fail(format!("{e}: {text}")))?;
                prop_assert!(v.is_object(), "{}", text);
                prop_assert!(v["type"].is_string(), "{}", text);
            }
            Ok(())
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(2000))]

            /// Any message or bytes decode without panic; an accepted message is one
            /// authenticated (un)subscription of tracker positions; every reply to it,
            /// or refusal of it, is one JSON frame with the API's shape.
            #[test]
            fn decoding_anything(msg in prop_oneof![
                3 => arb_message(),
                1 => prop::collection::vec(any::<u8>(), 0..120)
                    .prop_map(|b| String::from_utf8_lossy(&b).into_owned()),
            ]) {
                let (id, r) = decode(&msg);
                let id = id.map(|r| msg.as_bytes()[r].to_vec());
                match r {
                    Err(error) => {
                        prop_assert!(matches!(error.code, 400 | 401), "{:?}", error);
                        let f = Itrack.encode_reply(&Reply::Error { id: id.clone(), error: error.clone() }, "t").unwrap();
                        check_frame(&f)?;
                        let v = frame_json(&f);
                        prop_assert_eq!(&v["type"], "error");
                        let code = v["status"]["code"].as_u64().unwrap();
                        prop_assert!([3, 5, 7].contains(&code), "{}", v);
                        prop_assert!(v["data"].is_object() || v["data"].is_null());
                        prop_assert!(v["data"].get("hash").is_none(), "{}", v);
                        let f = Itrack.encode_reply(&Reply::AuthError { id, code: error.code, message: error.message.into() }, "t").unwrap();
                        check_frame(&f)?;
                    }
                    Ok(Command::Auth(a)) => {
                        prop_assert!(a.session_hash.as_deref().is_some_and(|h| !h.is_empty()));
                        prop_assert_eq!(a.then_subscribe.len(), 1);
                        let s = &a.then_subscribe[0];
                        prop_assert_eq!(s.channel, Channel::VehicleLocations);
                        prop_assert!(!s.filters.vehicles.is_empty());
                        let f = s.filters.clone();
                        let r = if s.action == SubAction::Subscribe {
                            Reply::Subscribed { id: id.clone(), channel: s.channel, filters: f, position: None }
                        } else {
                            Reply::Unsubscribed { id: id.clone(), channel: s.channel, filters: f }
                        };
                        let f = Itrack.encode_reply(&r, "t").unwrap();
                        check_frame(&f)?;
                        let n = match frame_json(&f)["data"].clone() {
                            J::Array(l) => l.len(),
                            J::Object(o) => o["state"].as_object().unwrap().len(),
                            other => return Err(TestCaseError::fail(format!("data {other}"))),
                        };
                        prop_assert_eq!(n, s.filters.vehicles.len(), "one entry per tracker");
                    }
                    Ok(Command::Ack) => prop_assert_eq!(msg.as_str(), "X"),
                    Ok(other) => prop_assert!(false, "{:?}", other),
                }
            }

            /// Every position of any entity, anywhere in time, encodes as one JSON event
            /// whose numbers are the canonical ones; statuses are among the API's.
            #[test]
            fn events_encode_as_json(
                vehicle in prop_oneof![
                    "[0-9]{1,18}".prop_map(String::from),
                    "[a-z0-9\"\\\\é\\-]{1,10}".prop_map(String::from),
                ],
                loc in arb_location(),
                ts_ms in prop_oneof![any::<i64>(), 0i64..4_000_000_000_000],
                stopped in prop::option::of(any::<i64>()),
                now in prop_oneof![any::<i64>(), 0i64..4_000_000_000_000],
            ) {
                let ev = position(&vehicle, loc, ts_ms, stopped);
                let Some(json) = state_event(&ev, &StateRules::default(), now) else {
                    prop_assert!(loc.is_none());
                    return Ok(());
                };
                check_frame(&frame::text_frame(&json))?;
                let v: J = serde_json::from_slice(&json).unwrap();
                let loc = loc.unwrap();
                let d = &v["data"];
                // A finite number reads back exactly; anything else is null.
                let shown = |v: &J, x: Option<f64>| match x.filter(|x| x.is_finite()) {
                    Some(x) => v.as_f64() == Some(x),
                    None => v.is_null(),
                };
                prop_assert!(shown(&d["gps"]["location"]["lat"], Some(loc.lat)), "{}", v);
                prop_assert!(shown(&d["gps"]["location"]["lng"], Some(loc.lon)), "{}", v);
                prop_assert!(shown(&d["gps"]["speed"], loc.speed_kmh), "{}", v);
                prop_assert!(shown(&d["gps"]["heading"], loc.heading), "{}", v);
                prop_assert!(shown(&d["gps"]["alt"], loc.altitude_m), "{}", v);
                prop_assert!(["active", "idle", "offline"].contains(&d["connection_status"].as_str().unwrap()));
                prop_assert!(["moving", "stopped", "parked"].contains(&d["movement_status"].as_str().unwrap()));
                match &d["source_id"] {
                    J::Number(n) => prop_assert_eq!(n.to_string(), vehicle),
                    J::String(s) => prop_assert_eq!(s, &vehicle),
                    other => prop_assert!(false, "{}", other),
                }
                let _ = Itrack.encode_projected(&ev, &View::default()).unwrap();
            }

            /// The hand-written calendar agrees with the `time` crate where it has one.
            #[test]
            fn civil_times_agree_with_time(ms in -62_135_596_800_000i64..253_402_300_800_000) {
                let mut o = Vec::new();
                write_datetime(&mut o, ms);
                let t = time::OffsetDateTime::from_unix_timestamp(ms.div_euclid(1000)).unwrap();
                let f = time::macros::format_description!("\"[year]-[month]-[day] [hour]:[minute]:[second]\"");
                prop_assert_eq!(String::from_utf8(o).unwrap(), t.format(&f).unwrap());
            }
        }
    }
}
