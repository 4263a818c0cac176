//! The native dialect (SPEC §5, `seeds/bookovia-streaming-api.txt`): decoding client
//! messages into commands, and encoding replies and events.
//!
//! Decoding copies the message into a scratch buffer that simd-json parses in place; the
//! original bytes are kept so that payloads and ids are forwarded byte for byte.

use crate::event::{Alert, Canon, Event, Location, Metric};
use crate::json::{self, array_elements};
use crate::model::{Channel, EntityKeys, Role};
use crate::session::Reply;
use crate::wire::frame;
use simd_json::BorrowedValue as Value;
use simd_json::prelude::*;
use std::borrow::Cow;
use std::ops::Range;

/// A client message the session acts on.
#[derive(Debug)]
pub enum Command {
    Auth(AuthRequest),
    Subscribe(SubscribeRequest),
    Publish(PublishRequest),
    /// Ranges of the batch items in the original message.
    Batch(Vec<Range<usize>>),
    Ping,
    Ack,
}

#[derive(Debug, Default)]
pub struct AuthRequest {
    pub api_key: Option<String>,
    pub token: Option<String>,
    pub fleet_id: Option<String>,
    pub subscriptions: Vec<Channel>,
    /// `fleet_id` must name a fleet the broker knows: another fleet's is 403, an unknown
    /// one 404 (Telematics `instance_id`).
    pub fleet_must_exist: bool,
    /// The identity the client claims besides its credential (Tracking `user_id` and
    /// `role`): the credential must be that user, or allowed to act for it.
    pub acting_as: Option<(String, Role)>,
    /// Subscriptions made once authenticated (Telematics: the instance, or one device).
    pub then_subscribe: Vec<SubscribeRequest>,
    /// Fields the dialect's auth reply repeats (Telematics `units`, `timezone`).
    pub echo: Vec<(&'static str, Box<str>)>,
    /// How the connection's events write timestamps (Telematics `date_format`).
    pub time: Option<super::view::TimeView>,
    /// A session hash from `user/auth` (iTrack), instead of a key or token.
    pub session_hash: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubAction {
    Subscribe,
    Unsubscribe,
    Request,
}

#[derive(Debug)]
pub struct SubscribeRequest {
    pub action: SubAction,
    pub channel: Channel,
    pub filters: Filters,
    /// `since: {epoch, seq}`: the last event the client saw.
    pub since: Option<(u64, u64)>,
}

/// Subscription filters. Entity filters select events about any named entity; value
/// filters are checked per connection at delivery.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filters {
    pub vehicles: Vec<Box<str>>,
    pub trips: Vec<Box<str>>,
    pub drivers: Vec<Box<str>>,
    /// Accepted severities, as words of [`crate::model::SEVERITIES`]; empty accepts all.
    pub severities: Vec<Box<str>>,
    pub categories: Vec<Box<str>>,
    pub metrics: Vec<Box<str>>,
    pub status_types: Vec<Box<str>>,
    /// At most one update per entity per this interval (state channels; the newest
    /// pending value wins). `None`: real time.
    pub frequency_ms: Option<u64>,
}

impl Filters {
    pub fn has_entities(&self) -> bool {
        !(self.vehicles.is_empty() && self.trips.is_empty() && self.drivers.is_empty())
    }
}

/// A validated publish: what routing needs, and where the payload sits in the message.
#[derive(Debug)]
pub struct PublishRequest {
    pub channel: Channel,
    pub payload: Range<usize>,
    /// A native payload made by another dialect from the canonical parts (then `payload`
    /// is unused).
    pub synthesized: Option<Vec<u8>>,
    pub keys: EntityKeys,
    pub severity: Option<Box<str>>,
    pub category: Option<Box<str>>,
    pub status: Option<Box<str>>,
    pub canon: Canon,
    /// The publisher's own timestamp: raw string range and UNIX milliseconds.
    pub timestamp: Option<(Range<usize>, i64)>,
    pub fleet_id: Option<Box<str>>,
    /// `device_id` when the payload names one (it is the vehicle when `vehicle_id` is
    /// absent; either way a device's scope must cover it).
    pub device_id: Option<Box<str>>,
    pub ack: bool,
}

/// A refused message: the `error` reply's code, message and the field at fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProtoError {
    pub code: u16,
    pub message: Cow<'static, str>,
    pub field: Option<&'static str>,
}

impl ProtoError {
    pub fn new(code: u16, message: impl Into<Cow<'static, str>>) -> ProtoError {
        ProtoError {
            code,
            message: message.into(),
            field: None,
        }
    }
    pub fn field(field: &'static str, message: impl Into<Cow<'static, str>>) -> ProtoError {
        ProtoError {
            code: 400,
            message: message.into(),
            field: Some(field),
        }
    }

    /// A 403 naming the field whose value is outside the credential's scope.
    pub fn forbidden(field: &'static str, message: impl Into<Cow<'static, str>>) -> ProtoError {
        ProtoError {
            code: 403,
            message: message.into(),
            field: Some(field),
        }
    }
}

/// Reusable parse state owned by a shard (no allocation per message once warm).
#[derive(Default)]
pub struct Parser {
    scratch: Vec<u8>,
    buffers: simd_json::Buffers,
}

/// Longest entity id accepted.
const MAX_ID_LEN: usize = 128;
/// Most entries in one filter list.
const MAX_FILTER_LIST: usize = 256;
/// Deepest nesting of objects and arrays accepted in a message (the message itself is
/// level 1). Payloads are forwarded as they are, and many subscribers' JSON parsers refuse
/// deep nesting (serde_json at 128 levels): one publisher must not break them all.
pub const MAX_DEPTH: usize = 32;
/// Members of a payload object. A 1 KiB message holds fewer; an HTTP item is bounded by
/// the same size, so this is a second, cheap fence for the duplicate-name check.
pub const MAX_MEMBERS: usize = 256;

/// A dialect's decoder of one parsed message: the raw text, its parsed value, and where
/// each top-level member's raw value sits.
pub type DecodeFn<'d> = dyn Fn(&[u8], &Value<'_>, &dyn Fn(&str) -> Option<Range<usize>>) -> Result<Command, ProtoError>
    + 'd;

impl Parser {
    /// Decodes one message. Returns the raw range of its `id` (for the reply) and the
    /// command or the reason it was refused.
    pub fn decode(&mut self, raw: &[u8]) -> (Option<Range<usize>>, Result<Command, ProtoError>) {
        self.decode_with(raw, &decode_value)
    }

    /// Parses `raw` and applies the checks every JSON dialect shares (an object, no
    /// repeated `payload`/`timestamp`, nesting), then `decode` makes the command.
    pub fn decode_with(
        &mut self,
        raw: &[u8],
        decode: &DecodeFn,
    ) -> (Option<Range<usize>>, Result<Command, ProtoError>) {
        self.scratch.clear();
        self.scratch.extend_from_slice(raw);
        let value =
            match simd_json::to_borrowed_value_with_buffers(&mut self.scratch, &mut self.buffers) {
                Ok(v) => v,
                Err(e) => {
                    return (
                        None,
                        Err(ProtoError::new(400, format!("malformed JSON: {e}"))),
                    );
                }
            };
        let members = json::object_members(raw);
        let Some(members) = members.filter(|_| value.is_object()) else {
            return (
                None,
                Err(ProtoError::new(400, "a message must be a JSON object")),
            );
        };
        let range_of = |k: &str| {
            members
                .iter()
                .find(|m| json::key_is(&raw[m.key.clone()], k))
                .map(|m| m.value.clone())
        };
        // These members are validated from simd-json's value (which keeps the first of a
        // repeated name up to 32 members, the last beyond) and forwarded from their raw
        // bytes: a repeated one could forward bytes other than those validated.
        for k in ["payload", "timestamp"] {
            let mut named = members
                .iter()
                .filter(|m| json::key_is(&raw[m.key.clone()], k));
            if named.nth(1).is_some() {
                return (
                    None,
                    Err(ProtoError::field(k, format!("duplicate member {k:?}"))),
                );
            }
        }
        let id = range_of("id").filter(|r| matches!(raw[r.start], b'"' | b'-' | b'0'..=b'9'));
        if json::nests_deeper_than(raw, MAX_DEPTH) {
            let e = ProtoError::new(400, format!("nested deeper than {MAX_DEPTH} levels"));
            return (id, Err(e));
        }
        (id, decode(raw, &value, &range_of))
    }
}

/// The message's `type`, which every JSON dialect but Tracking and iTrack dispatches on.
pub(crate) fn message_type<'v>(v: &'v Value<'_>) -> Result<&'v str, ProtoError> {
    v.get("type")
        .ok_or_else(|| ProtoError::field("type", "missing message type"))?
        .as_str()
        .ok_or_else(|| ProtoError::field("type", "type must be a string"))
}

fn decode_value(
    raw: &[u8],
    v: &Value<'_>,
    range_of: &dyn Fn(&str) -> Option<Range<usize>>,
) -> Result<Command, ProtoError> {
    let ty = message_type(v)?;
    let empty = Value::from(simd_json::value::borrowed::Object::new());
    let payload = v.get("payload").unwrap_or(&empty);
    match ty {
        "auth" => decode_auth(payload).map(Command::Auth),
        "subscribe" | "unsubscribe" => decode_subscribe(ty, payload).map(Command::Subscribe),
        "ping" => Ok(Command::Ping),
        "ack" => Ok(Command::Ack),
        "batch" => decode_batch(raw, range_of),
        "publish" => {
            let name = v
                .get("channel")
                .or_else(|| payload.get("channel"))
                .and_then(|c| c.as_str())
                .ok_or_else(|| ProtoError::field("channel", "publish needs a channel"))?;
            let channel = Channel::parse(name)
                .filter(|c| *c != Channel::System)
                .ok_or_else(|| ProtoError::field("channel", format!("unknown channel {name:?}")))?;
            decode_publish(raw, channel, v, payload, range_of).map(Command::Publish)
        }
        other => match Channel::from_publish_type(other) {
            Some(channel) => {
                decode_publish(raw, channel, v, payload, range_of).map(Command::Publish)
            }
            None => Err(ProtoError::field(
                "type",
                format!("unknown message type {other:?}"),
            )),
        },
    }
}

/// `{"messages": [...]}`: the ranges of the items.
pub(crate) fn decode_batch(
    raw: &[u8],
    range_of: &dyn Fn(&str) -> Option<Range<usize>>,
) -> Result<Command, ProtoError> {
    let r = range_of("messages")
        .ok_or_else(|| ProtoError::field("messages", "batch needs a messages array"))?;
    array_elements(&raw[r.clone()])
        .map(|items| {
            Command::Batch(
                items
                    .into_iter()
                    .map(|i| i.start + r.start..i.end + r.start)
                    .collect(),
            )
        })
        .ok_or_else(|| ProtoError::field("messages", "messages must be an array"))
}

pub(crate) fn opt_string(v: &Value<'_>, key: &'static str) -> Result<Option<String>, ProtoError> {
    match v.get(key) {
        None => Ok(None),
        Some(x) if x.is_null() => Ok(None),
        Some(x) => x
            .as_str()
            .map(|s| Some(s.to_string()))
            .ok_or_else(|| ProtoError::field(key, format!("{key} must be a string"))),
    }
}

fn decode_auth(p: &Value<'_>) -> Result<AuthRequest, ProtoError> {
    let mut subscriptions = Vec::new();
    if let Some(list) = p.get("subscriptions") {
        let list = list.as_array().ok_or_else(|| {
            ProtoError::field("subscriptions", "subscriptions must be a list of channels")
        })?;
        for c in list.iter().take(Channel::COUNT + 1) {
            let name = c.as_str().unwrap_or("");
            subscriptions.push(Channel::parse(name).ok_or_else(|| {
                ProtoError::field("subscriptions", format!("unknown channel {name:?}"))
            })?);
        }
    }
    Ok(AuthRequest {
        api_key: opt_string(p, "api_key")?,
        token: opt_string(p, "token")?,
        fleet_id: opt_string(p, "fleet_id")?,
        subscriptions,
        ..AuthRequest::default()
    })
}

fn decode_subscribe(ty: &str, p: &Value<'_>) -> Result<SubscribeRequest, ProtoError> {
    let action = match p.get("action").map(|a| a.as_str()) {
        None => {
            if ty == "unsubscribe" {
                SubAction::Unsubscribe
            } else {
                SubAction::Subscribe
            }
        }
        Some(Some("subscribe")) => SubAction::Subscribe,
        Some(Some("unsubscribe")) => SubAction::Unsubscribe,
        Some(Some("request")) => SubAction::Request,
        Some(_) => {
            return Err(ProtoError::field(
                "action",
                "action must be subscribe, unsubscribe or request",
            ));
        }
    };
    let data = p.get("data");
    let name = p
        .get("channel")
        .or_else(|| data.and_then(|d| d.get("channel")))
        .ok_or_else(|| ProtoError::field("channel", "missing channel"))?;
    let name = name
        .as_str()
        .ok_or_else(|| ProtoError::field("channel", "channel must be a string"))?;
    let channel = Channel::parse(name)
        .ok_or_else(|| ProtoError::field("channel", format!("unknown channel {name:?}")))?;
    let filters = match p
        .get("filters")
        .or_else(|| data.and_then(|d| d.get("filters")))
    {
        None => Filters::default(),
        Some(f) if f.is_null() => Filters::default(),
        Some(f) if f.is_object() => decode_filters(f)?,
        Some(_) => return Err(ProtoError::field("filters", "filters must be an object")),
    };
    let since = match p.get("since").or_else(|| data.and_then(|d| d.get("since"))) {
        None => None,
        Some(s) if s.is_null() => None,
        Some(s) => {
            let n = |k| s.get(k).and_then(|v| v.as_u64());
            match (n("epoch"), n("seq")) {
                (Some(e), Some(q)) => Some((e, q)),
                _ => {
                    return Err(ProtoError::field(
                        "since",
                        "since must be {\"epoch\": integer, \"seq\": integer}",
                    ));
                }
            }
        }
    };
    Ok(SubscribeRequest {
        action,
        channel,
        filters,
        since,
    })
}

/// An entity id: a non-empty string or an integer (some seeds number their devices).
pub(crate) fn entity_id(v: &Value<'_>) -> Option<Box<str>> {
    if let Some(s) = v.as_str() {
        return (!s.is_empty() && s.len() <= MAX_ID_LEN).then(|| s.into());
    }
    if v.is_i64() || v.is_u64() {
        return Some(v.to_string().into());
    }
    None
}

/// A filter value given as one item or a list of items.
fn list<T>(
    v: Option<&Value<'_>>,
    field: &'static str,
    item: impl Fn(&Value<'_>) -> Option<T>,
    out: &mut Vec<T>,
) -> Result<(), ProtoError> {
    let Some(v) = v else { return Ok(()) };
    let bad = || ProtoError::field(field, format!("invalid {field}"));
    match v.as_array() {
        Some(items) => {
            if items.len() > MAX_FILTER_LIST {
                return Err(ProtoError::field(
                    field,
                    format!("at most {MAX_FILTER_LIST} entries"),
                ));
            }
            for i in items {
                out.push(item(i).ok_or_else(bad)?);
            }
        }
        None if v.is_null() => {}
        None => out.push(item(v).ok_or_else(bad)?),
    }
    Ok(())
}

/// `"real-time"` (Some(None)), or an interval `"500ms"`, `"5s"`, `"1m"` of at most an
/// hour (Some(Some(ms))); anything else `None`.
pub fn parse_frequency(s: &str) -> Option<Option<u64>> {
    if matches!(s, "real-time" | "realtime" | "real_time") {
        return Some(None);
    }
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit())?);
    let n: u64 = num.parse().ok()?;
    let ms = match unit {
        "ms" => n,
        "s" => n.checked_mul(1000)?,
        "m" => n.checked_mul(60_000)?,
        _ => return None,
    };
    (ms > 0 && ms <= 3_600_000).then_some(Some(ms))
}

pub(crate) fn decode_filters(f: &Value<'_>) -> Result<Filters, ProtoError> {
    let mut out = Filters::default();
    list(
        f.get("vehicle_id"),
        "vehicle_id",
        entity_id,
        &mut out.vehicles,
    )?;
    list(
        f.get("vehicle_ids"),
        "vehicle_ids",
        entity_id,
        &mut out.vehicles,
    )?;
    list(
        f.get("device_id"),
        "device_id",
        entity_id,
        &mut out.vehicles,
    )?;
    list(f.get("trip_id"), "trip_id", entity_id, &mut out.trips)?;
    list(f.get("trip_ids"), "trip_ids", entity_id, &mut out.trips)?;
    list(f.get("driver_id"), "driver_id", entity_id, &mut out.drivers)?;
    list(
        f.get("driver_ids"),
        "driver_ids",
        entity_id,
        &mut out.drivers,
    )?;
    list(
        f.get("severity"),
        "severity",
        |v| {
            v.as_str()
                .and_then(crate::model::severity_word)
                .map(Into::into)
        },
        &mut out.severities,
    )?;
    out.frequency_ms = match f.get("frequency") {
        None => None,
        Some(v) if v.is_null() => None,
        Some(v) => match v.as_str().map(parse_frequency) {
            Some(Some(ms)) => ms,
            _ => {
                return Err(ProtoError::field(
                    "frequency",
                    "frequency must be \"real-time\" or an interval such as \"1s\", \"500ms\", \"5m\"",
                ));
            }
        },
    };
    let word = |v: &Value<'_>| v.as_str().filter(|s| s.len() <= MAX_ID_LEN).map(Into::into);
    list(f.get("category"), "category", word, &mut out.categories)?;
    list(f.get("alert_type"), "alert_type", word, &mut out.categories)?;
    list(f.get("metrics"), "metrics", word, &mut out.metrics)?;
    list(
        f.get("status_types"),
        "status_types",
        word,
        &mut out.status_types,
    )?;
    Ok(out)
}

fn required_id(p: &Value<'_>, field: &'static str) -> Result<Box<str>, ProtoError> {
    match p.get(field) {
        None => Err(ProtoError::field(field, format!("missing {field}"))),
        Some(v) => entity_id(v).ok_or_else(|| {
            ProtoError::field(
                field,
                format!("{field} must be a non-empty string of at most {MAX_ID_LEN} bytes"),
            )
        }),
    }
}

fn optional_id(p: &Value<'_>, field: &'static str) -> Result<Option<Box<str>>, ProtoError> {
    match p.get(field) {
        None => Ok(None),
        Some(v) if v.is_null() => Ok(None),
        Some(_) => required_id(p, field).map(Some),
    }
}

fn coordinate(loc: &Value<'_>, field: &'static str, bound: f64) -> Result<(), ProtoError> {
    let v = loc
        .get(field)
        .ok_or_else(|| ProtoError::field(field, format!("missing location.{field}")))?;
    let x = v
        .cast_f64()
        .filter(|x| x.is_finite())
        .ok_or_else(|| ProtoError::field(field, format!("location.{field} must be a number")))?;
    if !(-bound..=bound).contains(&x) {
        return Err(ProtoError::field(
            field,
            format!("location.{field} must be in [-{bound}, {bound}]"),
        ));
    }
    Ok(())
}

fn decode_publish(
    raw: &[u8],
    channel: Channel,
    msg: &Value<'_>,
    p: &Value<'_>,
    range_of: &dyn Fn(&str) -> Option<Range<usize>>,
) -> Result<PublishRequest, ProtoError> {
    let payload =
        range_of("payload").ok_or_else(|| ProtoError::field("payload", "missing payload"))?;
    if !p.is_object() {
        return Err(ProtoError::field("payload", "payload must be an object"));
    }
    // Routing reads the first of a repeated name, most clients the last: refuse repeats
    // so that what subscribers read is what was authorized (a device's own vehicle).
    let body = &raw[payload.clone()];
    let members = json::object_members(body).unwrap_or_default();
    if members.len() > MAX_MEMBERS {
        return Err(ProtoError::field(
            "payload",
            format!("payload has more than {MAX_MEMBERS} members"),
        ));
    }
    // Linear: each unescaped name goes into a set once (no comparison of every pair).
    let mut seen = std::collections::HashSet::with_capacity(members.len());
    for m in &members {
        let name = json::unescape(&body[m.key.clone()]);
        if !seen.insert(name) {
            let name = json::unescape(&body[m.key.clone()]);
            return Err(ProtoError::field(
                "payload",
                format!("duplicate payload member {name:?}"),
            ));
        }
    }
    let mut keys = EntityKeys {
        vehicle: optional_id(p, "vehicle_id")?,
        trip: optional_id(p, "trip_id")?,
        driver: optional_id(p, "driver_id")?,
    };
    let device_id = optional_id(p, "device_id")?;
    if keys.vehicle.is_none() {
        keys.vehicle = device_id.clone();
    }
    let mut severity = None;
    let mut category = None;
    let mut status = None;
    let opt_word = |field: &'static str| -> Result<Option<Box<str>>, ProtoError> {
        Ok(opt_string(p, field)?.map(|s| s.into_boxed_str()))
    };
    match channel {
        Channel::VehicleLocations => {
            required_id(p, "vehicle_id")?;
            let loc = p
                .get("location")
                .ok_or_else(|| ProtoError::field("location", "missing location"))?;
            if !loc.is_object() {
                return Err(ProtoError::field("location", "location must be an object"));
            }
            coordinate(loc, "latitude", 90.0)?;
            coordinate(loc, "longitude", 180.0)?;
            for f in ["speed", "heading", "accuracy", "altitude"] {
                if let Some(v) = loc.get(f)
                    && !v.is_null()
                    && v.cast_f64().is_none()
                {
                    return Err(ProtoError::field(
                        "location",
                        format!("location.{f} must be a number"),
                    ));
                }
            }
        }
        Channel::Telemetry | Channel::RouteProgress => {
            if keys.vehicle.is_none() {
                return Err(ProtoError::field("vehicle_id", "missing vehicle_id"));
            }
        }
        Channel::DeviceStatus => {
            if keys.vehicle.is_none() {
                return Err(ProtoError::field(
                    "vehicle_id",
                    "missing vehicle_id (or device_id)",
                ));
            }
            status = opt_word("status")?.or(opt_word("new_status")?);
        }
        Channel::DriverStatus => {
            if keys.driver.is_none() && keys.vehicle.is_none() {
                return Err(ProtoError::field(
                    "driver_id",
                    "missing driver_id or vehicle_id",
                ));
            }
            status = opt_word("status")?;
        }
        Channel::TripEvents => {
            required_id(p, "trip_id")?;
            opt_string(p, "event")?.ok_or_else(|| ProtoError::field("event", "missing event"))?;
        }
        Channel::Alerts | Channel::MaintenanceAlerts => {
            if channel == Channel::Alerts {
                required_id(p, "alert_id")?;
            }
            let s = opt_string(p, "severity")?;
            severity = match s {
                Some(s) => Some(
                    crate::model::severity_word(&s)
                        .ok_or_else(|| {
                            ProtoError::field(
                                "severity",
                                "severity must be one of info, low, medium, warning, high, critical",
                            )
                        })?
                        .into(),
                ),
                None if channel == Channel::Alerts => {
                    return Err(ProtoError::field("severity", "missing severity"));
                }
                None => None,
            };
            category = opt_word("category")?.or(opt_word("alert_type")?);
            if channel == Channel::Alerts && category.is_none() {
                return Err(ProtoError::field("category", "missing category"));
            }
        }
        Channel::FleetMetrics => {}
        Channel::System => {
            return Err(ProtoError::new(
                403,
                "the system channel is published by the broker",
            ));
        }
    }
    let timestamp = decode_timestamp(msg, range_of)?;
    let ack = msg.get("ack").and_then(|a| a.as_bool()).unwrap_or(false);
    Ok(PublishRequest {
        channel,
        payload,
        synthesized: None,
        keys,
        severity,
        category,
        status,
        timestamp,
        fleet_id: opt_string(p, "fleet_id")?.map(Into::into),
        canon: canon_of(channel, p, body),
        device_id,
        ack,
    })
}

/// The canonical parts of a native payload (`p` parsed, `body` its raw text): read once,
/// when the publish is accepted, for the other dialects' encoders.
fn canon_of(channel: Channel, p: &Value<'_>, body: &[u8]) -> Canon {
    let text = |k: &str| -> Option<Box<str>> { p.get(k).and_then(|v| v.as_str()).map(Into::into) };
    let raw = |k: &str| -> Option<Box<str>> {
        json::member(body, k)
            .and_then(|r| std::str::from_utf8(r).ok())
            .map(Into::into)
    };
    // The parsed value says which members exist: their raw text is looked up (a scan of
    // the payload) only when they do.
    let has = |k: &str| p.get(k).is_some();
    let mut c = Canon {
        metadata: p
            .get("metadata")
            .filter(|m| m.is_object())
            .and_then(|_| raw("metadata")),
        ..Canon::default()
    };
    match channel {
        Channel::VehicleLocations => {
            if let Some(loc) = p.get("location") {
                let num = |k: &str| loc.get(k).and_then(|v| v.cast_f64());
                c.location = Some(Location {
                    lat: num("latitude").unwrap_or(0.0),
                    lon: num("longitude").unwrap_or(0.0),
                    speed_kmh: num("speed"),
                    heading: num("heading"),
                    accuracy_m: num("accuracy"),
                    altitude_m: num("altitude"),
                });
            }
            if has("telemetry")
                && let Some(t) = json::member(body, "telemetry")
            {
                c.metrics = metrics_of(t, &[]);
            }
        }
        Channel::Telemetry => {
            c.metrics =
                match json::member(body, "telemetry").or_else(|| json::member(body, "metrics")) {
                    Some(t) if t.first() == Some(&b'{') => metrics_of(t, &[]),
                    // Flat: every member but the ids is a metric.
                    _ => metrics_of(body, &NOT_METRICS),
                };
        }
        Channel::Alerts | Channel::MaintenanceAlerts => {
            c.alert = Some(Alert {
                id: has("alert_id")
                    .then(|| raw("alert_id"))
                    .flatten()
                    .filter(|r| json::valid_id(r.as_bytes())),
                title: text("title"),
                message: text("message").or_else(|| text("description")),
            });
        }
        Channel::DeviceStatus | Channel::DriverStatus => c.reason = text("reason"),
        Channel::TripEvents => c.trip_event = text("event"),
        _ => {}
    }
    c
}

/// Payload members of a flat `telemetry_update` that are not metrics.
const NOT_METRICS: [&str; 8] = [
    "vehicle_id",
    "device_id",
    "trip_id",
    "driver_id",
    "fleet_id",
    "timestamp",
    "metadata",
    "units",
];

/// Metrics of a JSON object: `name: number` or `name: {value, unit}`; names in `skip`
/// and values of other kinds are left out.
pub(crate) fn metrics_of(obj: &[u8], skip: &[&str]) -> Vec<Metric> {
    let mut out = Vec::new();
    for m in json::object_members(obj).unwrap_or_default() {
        let key = &obj[m.key.clone()];
        if skip.iter().any(|s| json::key_is(key, s)) {
            continue;
        }
        let v = &obj[m.value.clone()];
        let (value, unit) = match v.first() {
            Some(b'-' | b'0'..=b'9') => (v, None),
            Some(b'{') => match json::member(v, "value") {
                Some(value) => (
                    value,
                    json::member(v, "unit")
                        .filter(|u| u.first() == Some(&b'"'))
                        .map(|u| json::unescape(&u[1..u.len() - 1]).into_owned().into()),
                ),
                None => continue,
            },
            _ => continue,
        };
        let Ok(value) = std::str::from_utf8(value) else {
            continue;
        };
        out.push(Metric {
            name: json::unescape(key).into_owned().into(),
            value: value.into(),
            unit,
        });
    }
    out
}

/// The message's top-level `timestamp`: its raw range and UNIX milliseconds.
pub(crate) fn decode_timestamp(
    msg: &Value<'_>,
    range_of: &dyn Fn(&str) -> Option<Range<usize>>,
) -> Result<Option<(Range<usize>, i64)>, ProtoError> {
    Ok(match msg.get("timestamp") {
        None => None,
        Some(t) if t.is_null() => None,
        Some(t) => {
            let s = t
                .as_str()
                .ok_or_else(|| ProtoError::field("timestamp", "timestamp must be a string"))?;
            let ms = parse_rfc3339_ms(s)
                .ok_or_else(|| ProtoError::field("timestamp", "timestamp must be RFC 3339"))?;
            let range = range_of("timestamp")
                .ok_or_else(|| ProtoError::field("timestamp", "timestamp must be a string"))?;
            Some((range, ms))
        }
    })
}

pub fn parse_rfc3339_ms(s: &str) -> Option<i64> {
    let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok()?;
    i64::try_from(t.unix_timestamp_nanos() / 1_000_000).ok()
}

/// RFC 3339 UTC with milliseconds, e.g. `2024-03-15T14:30:00.123Z`.
pub fn format_rfc3339_ms(unix_ms: i64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(unix_ms as i128 * 1_000_000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    let f = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
    );
    t.format(&f).unwrap_or_default()
}

// ---------------------------------------------------------------- encoding

/// Starts a server message: `{"type":T,"id":ID,"timestamp":TS` (no closing brace).
fn open(out: &mut Vec<u8>, ty: &str, id: Option<&[u8]>, ts: &str) {
    out.extend_from_slice(b"{\"type\":");
    json::write_str(out, ty);
    out.extend_from_slice(b",\"id\":");
    match id {
        Some(raw) => out.extend_from_slice(raw),
        None => out.extend_from_slice(b"null"),
    }
    out.extend_from_slice(b",\"timestamp\":");
    json::write_str(out, ts);
}

/// A reply with a JSON payload written by `payload`.
pub fn reply(ty: &str, id: Option<&[u8]>, ts: &str, payload: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut out = Vec::with_capacity(160);
    open(&mut out, ty, id, ts);
    out.extend_from_slice(b",\"payload\":");
    payload(&mut out);
    out.push(b'}');
    out
}

pub fn error(id: Option<&[u8]>, ts: &str, e: &ProtoError) -> Vec<u8> {
    reply("error", id, ts, |o| write_error_payload(o, e))
}

/// The payload of an `error`: `{"code":..,"message":..,"field":..}`.
pub fn write_error_payload(o: &mut Vec<u8>, e: &ProtoError) {
    o.extend_from_slice(b"{\"code\":");
    json::write_u64(o, e.code as u64);
    o.extend_from_slice(b",\"message\":");
    json::write_str(o, &e.message);
    if let Some(f) = e.field {
        o.extend_from_slice(b",\"field\":");
        json::write_str(o, f);
    }
    o.push(b'}');
}

/// The native dialect (SPEC §5): the reference shapes.
pub struct Native;

impl super::Codec for Native {
    fn id(&self) -> super::DialectId {
        super::NATIVE
    }

    fn name(&self) -> &'static str {
        "native"
    }

    fn dev_hint(&self, host: &str, key: &str, fleet: &str) -> String {
        format!("ws://{host}/v1/streaming/websocket?api_key={key}&fleet_id={fleet}")
    }

    fn decode(
        &self,
        parser: &mut Parser,
        raw: &[u8],
        _acting_as: Option<&str>,
    ) -> (Option<Range<usize>>, Result<Command, ProtoError>) {
        parser.decode(raw)
    }

    fn encode_reply(&self, reply: &Reply, ts: &str) -> Option<Vec<u8>> {
        fn raw(id: &Option<Vec<u8>>) -> Option<&[u8]> {
            id.as_deref()
        }
        let json = match reply {
            Reply::AuthOk {
                id,
                connection_id,
                principal: p,
                limits,
                ..
            } => self::reply("auth_success", raw(id), ts, |o| {
                o.extend_from_slice(b"{\"connection_id\":");
                json::write_str(o, connection_id);
                o.extend_from_slice(b",\"user_id\":");
                json::write_str(o, &p.user_id);
                o.extend_from_slice(b",\"fleet_id\":");
                json::write_str(o, &p.tenant);
                o.extend_from_slice(b",\"role\":");
                json::write_str(o, p.role.name());
                o.extend_from_slice(b",\"server_time\":");
                json::write_str(o, ts);
                o.extend_from_slice(b",\"limits\":{\"max_message_bytes\":");
                json::write_u64(o, limits.max_message_bytes as u64);
                o.extend_from_slice(b",\"max_subscriptions\":");
                json::write_u64(o, limits.max_subscriptions as u64);
                o.extend_from_slice(b",\"max_batch\":");
                json::write_u64(o, limits.max_batch as u64);
                o.extend_from_slice(b",\"heartbeat_interval_ms\":");
                json::write_u64(o, limits.heartbeat_interval_ms);
                o.extend_from_slice(b"}}");
            }),
            Reply::AuthError { id, code, message } => self::reply("auth_error", raw(id), ts, |o| {
                write_code_message(o, *code, message)
            }),
            Reply::Error { id, error } => self::error(raw(id), ts, error),
            Reply::Pong { id } => self::reply("pong", raw(id), ts, |o| {
                o.extend_from_slice(b"{\"server_time\":");
                json::write_str(o, ts);
                o.push(b'}');
            }),
            Reply::Subscribed {
                id,
                channel,
                filters,
                position,
            } => self::reply("subscribed", raw(id), ts, |o| {
                write_channel_filters(o, *channel, filters);
                if let Some(pos) = position {
                    o.pop();
                    o.extend_from_slice(b",\"epoch\":");
                    json::write_u64(o, pos.epoch);
                    o.extend_from_slice(b",\"seq\":");
                    json::write_u64(o, pos.seq);
                    match pos.recovered {
                        Some(true) => o.extend_from_slice(b",\"recovered\":true"),
                        Some(false) => o.extend_from_slice(b",\"recovered\":false"),
                        None => {}
                    }
                    o.push(b'}');
                }
            }),
            Reply::Unsubscribed {
                id,
                channel,
                filters,
            } => self::reply("unsubscribed", raw(id), ts, |o| {
                write_channel_filters(o, *channel, filters)
            }),
            Reply::Snapshot {
                id,
                channel,
                events,
            } => self::reply("snapshot", raw(id), ts, |o| {
                o.extend_from_slice(b"{\"channel\":");
                json::write_str(o, channel.name());
                o.extend_from_slice(b",\"items\":[");
                for (i, ev) in events.iter().enumerate() {
                    if i > 0 {
                        o.push(b',');
                    }
                    o.extend_from_slice(ev.json());
                }
                o.extend_from_slice(b"]}");
            }),
            Reply::Ack { id, channel, seq } => self::reply("ack", raw(id), ts, |o| {
                o.extend_from_slice(match seq {
                    Some(_) => b"{\"status\":\"accepted\",\"channel\":",
                    None => b"{\"status\":\"duplicate\",\"channel\":",
                });
                json::write_str(o, channel.name());
                if let Some(seq) = seq {
                    o.extend_from_slice(b",\"seq\":");
                    json::write_u64(o, *seq);
                }
                o.push(b'}');
            }),
            Reply::Heartbeat => return Some(frame::ping_frame(b"")),
            Reply::WsPong(payload) => return Some(frame::pong_frame(payload)),
        };
        Some(frame::text_frame(&json))
    }

    fn encode_event(&self, ev: &Event) -> Option<Vec<u8>> {
        Some(ev.json().to_vec())
    }

    fn encode_projected(&self, ev: &Event, view: &super::view::View) -> Option<Vec<u8>> {
        // The native dialect shows the publisher's own timestamps: only `metrics` applies.
        let Some(metrics) = view.metrics.as_deref() else {
            return self.encode_event(ev);
        };
        let json = ev.json();
        let (ps, pe) = ev.payload_range_in_json();
        let mut out = Vec::with_capacity(json.len());
        out.extend_from_slice(&json[..ps]);
        out.extend_from_slice(&project_metrics(&json[ps..pe], metrics));
        out.extend_from_slice(&json[pe..]);
        Some(out)
    }
}

fn write_code_message(o: &mut Vec<u8>, code: u16, message: &str) {
    o.extend_from_slice(b"{\"code\":");
    json::write_u64(o, code as u64);
    o.extend_from_slice(b",\"message\":");
    json::write_str(o, message);
    o.push(b'}');
}

fn write_list(o: &mut Vec<u8>, key: &str, list: &[Box<str>], first: &mut bool) {
    if list.is_empty() {
        return;
    }
    if !*first {
        o.push(b',');
    }
    *first = false;
    json::write_key(o, key);
    o.push(b'[');
    for (i, v) in list.iter().enumerate() {
        if i > 0 {
            o.push(b',');
        }
        json::write_str(o, v);
    }
    o.push(b']');
}

fn write_channel_filters(o: &mut Vec<u8>, channel: Channel, f: &Filters) {
    o.extend_from_slice(b"{\"channel\":");
    json::write_str(o, channel.name());
    o.extend_from_slice(b",\"filters\":{");
    let mut first = true;
    write_list(o, "vehicle_ids", &f.vehicles, &mut first);
    write_list(o, "trip_ids", &f.trips, &mut first);
    write_list(o, "driver_ids", &f.drivers, &mut first);
    write_list(o, "severity", &f.severities, &mut first);
    write_list(o, "category", &f.categories, &mut first);
    write_list(o, "metrics", &f.metrics, &mut first);
    write_list(o, "status_types", &f.status_types, &mut first);
    o.extend_from_slice(b"}}");
}

/// The fields of an event besides its payload.
pub struct EventHead<'a> {
    pub channel: Channel,
    /// Raw JSON of the id (the publisher's, or a fresh string).
    pub id: &'a [u8],
    pub timestamp: &'a str,
    /// `(seq, epoch)` on event channels.
    pub seq: Option<(u64, u64)>,
}

/// Encodes a data event around a raw payload. Returns the JSON and the payload's range in it.
pub fn event(head: &EventHead<'_>, payload: &[u8]) -> (Vec<u8>, Range<usize>) {
    let mut out = Vec::with_capacity(payload.len() + 160);
    open(
        &mut out,
        head.channel.event_type(),
        Some(head.id),
        head.timestamp,
    );
    out.extend_from_slice(b",\"channel\":");
    json::write_str(&mut out, head.channel.name());
    if let Some((seq, epoch)) = head.seq {
        out.extend_from_slice(b",\"seq\":");
        json::write_u64(&mut out, seq);
        out.extend_from_slice(b",\"epoch\":");
        json::write_u64(&mut out, epoch);
    }
    out.extend_from_slice(b",\"payload\":");
    let start = out.len();
    out.extend_from_slice(payload);
    let range = start..out.len();
    out.push(b'}');
    (out, range)
}

/// Projects a payload's `telemetry` object to the given metric names, keeping every other
/// member and the order of all members. Used only for subscribers with a `metrics` filter.
pub fn project_metrics(payload: &[u8], metrics: &[Box<str>]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len());
    let Some(members) = json::object_members(payload) else {
        return payload.to_vec();
    };
    out.push(b'{');
    for (i, m) in members.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.push(b'"');
        out.extend_from_slice(&payload[m.key.clone()]);
        out.extend_from_slice(b"\":");
        let value = &payload[m.value.clone()];
        if json::key_is(&payload[m.key.clone()], "telemetry")
            && let Some(inner) = json::object_members(value)
        {
            out.push(b'{');
            let mut first = true;
            for im in inner.iter().filter(|im| {
                metrics
                    .iter()
                    .any(|k| json::key_is(&value[im.key.clone()], k))
            }) {
                if !first {
                    out.push(b',');
                }
                first = false;
                out.push(b'"');
                out.extend_from_slice(&value[im.key.clone()]);
                out.extend_from_slice(b"\":");
                out.extend_from_slice(&value[im.value.clone()]);
            }
            out.push(b'}');
        } else {
            out.extend_from_slice(value);
        }
    }
    out.push(b'}');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dec(s: &str) -> (Option<String>, Result<Command, ProtoError>) {
        let mut p = Parser::default();
        let (id, r) = p.decode(s.as_bytes());
        (id.map(|r| s[r].to_string()), r)
    }

    #[test]
    fn auth_and_subscribe_shapes() {
        let (id, c) = dec(
            r#"{"type":"auth","id":"a1","payload":{"api_key":"k","fleet_id":"f","subscriptions":["alerts"]}}"#,
        );
        assert_eq!(id.as_deref(), Some("\"a1\""));
        let Command::Auth(a) = c.unwrap() else {
            panic!()
        };
        assert_eq!(
            (a.api_key.as_deref(), a.fleet_id.as_deref()),
            (Some("k"), Some("f"))
        );
        assert_eq!(a.subscriptions, vec![Channel::Alerts]);

        let (_, c) = dec(
            r#"{"type":"subscribe","payload":{"action":"subscribe","data":{"channel":"alerts"},"filters":{"severity":["high","critical"],"vehicle_ids":["v1",7]}}}"#,
        );
        let Command::Subscribe(s) = c.unwrap() else {
            panic!()
        };
        assert_eq!(s.channel, Channel::Alerts);
        assert_eq!(s.filters.vehicles, vec!["v1".into(), "7".into()]);
        assert_eq!(
            s.filters.severities,
            vec![Box::<str>::from("high"), "critical".into()]
        );
        let (_, c) =
            dec(r#"{"type":"subscribe","payload":{"action":"unsubscribe","channel":"telemetry"}}"#);
        assert!(matches!(
            c.unwrap(),
            Command::Subscribe(SubscribeRequest {
                action: SubAction::Unsubscribe,
                ..
            })
        ));
    }

    #[test]
    fn publish_validation_names_the_field() {
        let cases = [
            (
                r#"{"type":"location_update","payload":{"location":{"latitude":1,"longitude":2}}}"#,
                "vehicle_id",
            ),
            (
                r#"{"type":"location_update","payload":{"vehicle_id":"v","location":{"latitude":91,"longitude":2}}}"#,
                "latitude",
            ),
            (
                r#"{"type":"location_update","payload":{"vehicle_id":"v","location":{"latitude":1,"longitude":-181}}}"#,
                "longitude",
            ),
            (
                r#"{"type":"location_update","payload":{"vehicle_id":"v","location":{"latitude":"1","longitude":2}}}"#,
                "latitude",
            ),
            (
                r#"{"type":"safety_alert","payload":{"alert_id":"a","severity":"meh","category":"x"}}"#,
                "severity",
            ),
            (
                r#"{"type":"safety_alert","payload":{"alert_id":"a","severity":"low"}}"#,
                "category",
            ),
            (
                r#"{"type":"trip_event","payload":{"event":"trip_started"}}"#,
                "trip_id",
            ),
            (
                r#"{"type":"location_update","timestamp":"yesterday","payload":{"vehicle_id":"v","location":{"latitude":1,"longitude":2}}}"#,
                "timestamp",
            ),
            (r#"{"type":"teleport","payload":{}}"#, "type"),
            (
                r#"{"type":"publish","channel":"nope","payload":{}}"#,
                "channel",
            ),
        ];
        for (msg, field) in cases {
            let e = dec(msg).1.unwrap_err();
            assert_eq!((e.code, e.field), (400, Some(field)), "{msg}: {e:?}");
        }
        assert_eq!(dec("{not json").1.unwrap_err().code, 400);
        assert_eq!(dec("[1,2]").1.unwrap_err().code, 400);
        assert_eq!(dec(r#"{"type":5}"#).1.unwrap_err().field, Some("type"));
    }

    #[test]
    fn publish_keeps_payload_bytes_and_encodes_once() {
        let msg = r#"{"type":"location_update","id":"m1","payload":{"zeta":1,"vehicle_id":"v1","location":{"latitude":40.7128,"longitude":-74.006},"alpha":{"x":[1,2]}}}"#;
        let (id, c) = dec(msg);
        let Command::Publish(p) = c.unwrap() else {
            panic!()
        };
        assert_eq!(p.keys.vehicle.as_deref(), Some("v1"));
        let payload = &msg[p.payload.clone()];
        let id = id.unwrap();
        let head = EventHead {
            channel: p.channel,
            id: id.as_bytes(),
            timestamp: "2024-03-15T14:30:00.000Z",
            seq: None,
        };
        let (bytes, range) = event(&head, payload.as_bytes());
        let text = std::str::from_utf8(&bytes).unwrap();
        assert_eq!(&text[range], payload);
        assert_eq!(
            text,
            r#"{"type":"location_update","id":"m1","timestamp":"2024-03-15T14:30:00.000Z","channel":"vehicle_locations","payload":{"zeta":1,"vehicle_id":"v1","location":{"latitude":40.7128,"longitude":-74.006},"alpha":{"x":[1,2]}}}"#
        );
    }

    #[test]
    fn repeated_payload_members_are_refused() {
        let e = dec(r#"{"type":"location_update","payload":{"vehicle_id":"v1","location":{"latitude":1,"longitude":2},"vehicle_\u0069d":"v2"}}"#).1.unwrap_err();
        assert_eq!((e.code, e.field), (400, Some("payload")));
    }

    #[test]
    fn batch_items_are_ranges() {
        let msg = r#"{"type":"batch","messages":[{"type":"ping"},{"type":"ack"}]}"#;
        let Command::Batch(items) = dec(msg).1.unwrap() else {
            panic!()
        };
        assert_eq!(
            items.iter().map(|r| &msg[r.clone()]).collect::<Vec<_>>(),
            vec![r#"{"type":"ping"}"#, r#"{"type":"ack"}"#]
        );
    }

    #[test]
    fn metrics_projection_keeps_order() {
        let p = br#"{"vehicle_id":"v","telemetry":{"fuel_level":75.5,"engine_rpm":2100,"odometer":1},"x":1}"#;
        let out = project_metrics(p, &["odometer".into(), "fuel_level".into()]);
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            r#"{"vehicle_id":"v","telemetry":{"fuel_level":75.5,"odometer":1},"x":1}"#
        );
    }

    #[test]
    fn timestamps() {
        assert_eq!(
            format_rfc3339_ms(1_710_513_000_123),
            "2024-03-15T14:30:00.123Z"
        );
        assert_eq!(
            parse_rfc3339_ms("2024-03-15T14:30:00.123Z"),
            Some(1_710_513_000_123)
        );
    }
}
