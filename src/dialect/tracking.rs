//! The Tracking API dialect (SPEC §6, `seeds/tracking-api.txt`) on `/v1/track`: drivers
//! send their position, offices watch their company's drivers.
//!
//! ```text
//!  driver                         broker                          office
//!    |-- authenticate ------------->|<------------- authenticate --|
//!    |<- authenticated -------------|-------------- authenticated ->|
//!    |                              |<- subscribe {driver_id} -----|
//!    |                              |--- subscribed --------------->|
//!    |-- location_update ---------->|--- location_update ---------->|
//! ```
//!
//! Client messages name their `action`, with their fields in `payload` (the same fields
//! are read at the top level when the payload does not have them). A driver is the
//! `device` role and its `user_id` is its vehicle: its `location_update`s are native
//! publishes on `vehicle_locations` for that vehicle, so native (and every other dialect's)
//! subscribers see them, and Tracking offices see every publish of a location, whatever
//! its dialect. An office is the `viewer` role; its `driver_id` filter is a vehicle.
//!
//! Errors carry the seed's names (`Unauthorized`, `InvalidAction`, `Forbidden`,
//! `BadPayload`) where one fits, and names of our own for the rest; [`error_name`] is the
//! one table from the core's codes to them.

use super::native::{
    self, AuthRequest, Command, Filters, Parser, ProtoError, PublishRequest, SubAction,
    SubscribeRequest,
};
use super::{Codec, DialectId, TRACKING};
use crate::event::{Canon, Event, Location};
use crate::json;
use crate::model::{Channel, EntityKeys, Role};
use crate::session::Reply;
use crate::wire::frame;
use simd_json::BorrowedValue as Value;
use simd_json::prelude::*;
use std::ops::Range;

pub struct Tracking;

/// Most drivers one subscribe may name (the session's subscription cap still applies).
const MAX_DRIVERS: usize = 256;

/// The actions a client may send, for the `InvalidAction` message.
const ACTIONS: &str = "authenticate, location_update, subscribe, subscribe_all, unsubscribe, \
                       unsubscribe_all, ping";

/// The `error` name of a refusal with the core's `code` (and the field at fault):
///
/// | code | name | when |
/// |---|---|---|
/// | 400, field `action` | `InvalidAction` | missing or unknown action |
/// | 400, 413 | `BadPayload` | malformed JSON, missing or ill-typed field, subscription cap |
/// | 401, 408 | `Unauthorized` | bad or missing token, not authenticated yet, token expired, auth timeout |
/// | 403 | `Forbidden` | a driver subscribing, an office sending locations, another vehicle |
/// | 404 | `NotFound` | |
/// | 409 | `Conflict` | a second `authenticate` as another principal |
/// | 429 | `RateLimited` | over the message rate; `LimitExceeded` for a connection cap at authentication |
/// | 503 | `Unavailable` | node capacity |
/// | other | `InternalError` | |
///
/// A location update within the vehicle's interval (429) is `BadPayload` with a message
/// naming the limit, as SPEC §8 says for this dialect ([`is_location_rate`]).
pub fn error_name(code: u16, field: Option<&str>) -> &'static str {
    match code {
        400 if field == Some("action") => "InvalidAction",
        400 | 413 => "BadPayload",
        401 | 408 => "Unauthorized",
        403 => "Forbidden",
        404 => "NotFound",
        409 => "Conflict",
        429 => "RateLimited",
        503 => "Unavailable",
        _ => "InternalError",
    }
}

/// The `error` name of a refused authentication (followed by close 1008).
fn auth_error_name(code: u16) -> &'static str {
    match code {
        // The user's or the company's connection cap, or its new-connection rate.
        429 => "LimitExceeded",
        other => error_name(other, None),
    }
}

/// The store's refusal of a location update within its vehicle's interval
/// (`limits.location_update_interval_ms`), told apart from the other 429s by its message.
fn is_location_rate(e: &ProtoError) -> bool {
    e.code == 429 && e.message.contains("location update")
}

impl Codec for Tracking {
    fn id(&self) -> DialectId {
        TRACKING
    }

    fn name(&self) -> &'static str {
        "tracking"
    }

    fn decode(
        &self,
        parser: &mut Parser,
        raw: &[u8],
        acting_as: Option<&str>,
    ) -> (Option<Range<usize>>, Result<Command, ProtoError>) {
        parser.decode_with(raw, &|raw, v, range_of| {
            decode_value(raw, v, range_of, acting_as)
        })
    }

    fn encode_reply(&self, reply: &Reply, _ts: &str) -> Option<Vec<u8>> {
        let mut o = Vec::with_capacity(128);
        let id = match reply {
            Reply::AuthOk {
                id,
                principal,
                acting_as,
                ..
            } => {
                o.extend_from_slice(b"{\"type\":\"authenticated\",\"payload\":{\"user_id\":");
                json::write_str(&mut o, acting_as.as_deref().unwrap_or(&principal.user_id));
                o.extend_from_slice(if principal.role == Role::Device {
                    b",\"role\":\"driver\"}"
                } else {
                    b",\"role\":\"office\"}"
                });
                id
            }
            Reply::AuthError { id, code, message } => {
                write_error(&mut o, auth_error_name(*code), *code, message, None);
                id
            }
            Reply::Error { id, error } if is_location_rate(error) => {
                let message = format!("location_rate limit: {}", error.message);
                write_error(&mut o, "BadPayload", error.code, &message, None);
                o.extend_from_slice(b",\"limit\":\"location_rate\"");
                id
            }
            Reply::Error { id, error } => {
                let name = error_name(error.code, error.field);
                write_error(&mut o, name, error.code, &error.message, error.field);
                id
            }
            Reply::Pong { id } => {
                o.extend_from_slice(b"{\"action\":\"pong\"");
                id
            }
            Reply::Subscribed { id, filters, .. } => {
                o.extend_from_slice(b"{\"type\":\"subscribed\",\"payload\":");
                write_selection(&mut o, filters);
                id
            }
            Reply::Unsubscribed { id, filters, .. } => {
                o.extend_from_slice(b"{\"type\":\"unsubscribed\",\"payload\":");
                write_selection(&mut o, filters);
                id
            }
            // Tracking has no acks and no one-off snapshot request; an office's snapshot
            // on subscribe comes as `location_update` events.
            Reply::Ack { .. } | Reply::Snapshot { .. } => return None,
            Reply::Heartbeat => return Some(frame::ping_frame(b"")),
            Reply::WsPong(p) => return Some(frame::pong_frame(p)),
        };
        if let Some(id) = id {
            o.extend_from_slice(b",\"id\":");
            o.extend_from_slice(id);
        }
        o.push(b'}');
        Some(frame::text_frame(&o))
    }

    fn encode_event(&self, ev: &Event) -> Option<Vec<u8>> {
        if ev.channel != Channel::VehicleLocations {
            return None;
        }
        let loc = ev.canon.location.as_ref()?;
        let driver = ev.keys.vehicle.as_deref()?;
        let mut o = Vec::with_capacity(160);
        o.extend_from_slice(b"{\"type\":\"location_update\",\"payload\":{\"driver_id\":");
        json::write_str(&mut o, driver);
        o.extend_from_slice(b",\"lat\":");
        json::write_f64(&mut o, loc.lat);
        o.extend_from_slice(b",\"lng\":");
        json::write_f64(&mut o, loc.lon);
        o.extend_from_slice(b",\"speed\":");
        write_opt_f64(&mut o, loc.speed_kmh);
        o.extend_from_slice(b",\"bearing\":");
        write_opt_f64(&mut o, loc.heading);
        o.extend_from_slice(b",\"timestamp\":");
        json::write_str(&mut o, &ev.timestamp);
        o.extend_from_slice(b"}}");
        Some(o)
    }

    /// Tracking subscriptions have no metric projection and no time view: the shared
    /// frame is what every office sees.
    fn encode_projected(&self, ev: &Event, _view: &super::view::View) -> Option<Vec<u8>> {
        self.encode_event(ev)
    }

    fn dev_hint(&self, host: &str, key: &str, _fleet: &str) -> String {
        // Dev mode's keys are `dev-<role>-<hex>` for the user `dev-<role>`.
        let user = match key.rsplit_once('-') {
            Some((user, _)) if key.starts_with("dev-") => user,
            _ => "<your user_id>",
        };
        format!(
            "ws://{host}/v1/track, then send {{\"action\":\"authenticate\",\"payload\":\
             {{\"user_id\":\"{user}\",\"role\":\"office\",\"token\":\"{key}\"}}}} \
             (a driver: \"role\":\"driver\", its vehicle id as user_id, the device key)"
        )
    }
}

fn write_error(o: &mut Vec<u8>, name: &str, code: u16, message: &str, field: Option<&str>) {
    o.extend_from_slice(b"{\"type\":\"error\",\"error\":");
    json::write_str(o, name);
    o.extend_from_slice(b",\"message\":");
    json::write_str(o, message);
    o.extend_from_slice(b",\"code\":");
    json::write_u64(o, code as u64);
    if let Some(f) = field {
        o.extend_from_slice(b",\"field\":");
        json::write_str(o, f);
    }
}

fn write_opt_f64(o: &mut Vec<u8>, v: Option<f64>) {
    match v {
        Some(v) => json::write_f64(o, v),
        None => o.extend_from_slice(b"null"),
    }
}

/// `{"driver_id":D}`, `{"driver_ids":[..]}` for several, or `{"all":true}`.
fn write_selection(o: &mut Vec<u8>, f: &Filters) {
    match f.vehicles.as_slice() {
        [] => o.extend_from_slice(b"{\"all\":true}"),
        [one] => {
            o.extend_from_slice(b"{\"driver_id\":");
            json::write_str(o, one);
            o.push(b'}');
        }
        many => {
            o.extend_from_slice(b"{\"driver_ids\":[");
            for (i, v) in many.iter().enumerate() {
                if i > 0 {
                    o.push(b',');
                }
                json::write_str(o, v);
            }
            o.extend_from_slice(b"]}");
        }
    }
}

// ---------------------------------------------------------------------- decoding

/// A message's fields: those of `payload`, else those at the top level.
struct Fields<'v, 'a> {
    payload: Option<&'v Value<'a>>,
    top: &'v Value<'a>,
}

impl<'v, 'a> Fields<'v, 'a> {
    /// The field `k`; `null` counts as absent.
    fn get(&self, k: &str) -> Option<&'v Value<'a>> {
        self.payload
            .and_then(|p| p.get(k))
            .or_else(|| self.top.get(k))
            .filter(|v| !v.is_null())
    }

    fn string(&self, k: &'static str) -> Result<Option<String>, ProtoError> {
        match self.get(k) {
            None => Ok(None),
            Some(v) => v
                .as_str()
                .map(|s| Some(s.to_owned()))
                .ok_or_else(|| ProtoError::field(k, format!("{k} must be a string"))),
        }
    }

    /// A finite number, in `[-bound, bound]` when a bound is given.
    fn number(&self, k: &'static str, bound: Option<f64>) -> Result<Option<f64>, ProtoError> {
        let Some(v) = self.get(k) else {
            return Ok(None);
        };
        let x = v
            .cast_f64()
            .filter(|x| x.is_finite())
            .ok_or_else(|| ProtoError::field(k, format!("{k} must be a number")))?;
        if let Some(b) = bound
            && !(-b..=b).contains(&x)
        {
            return Err(ProtoError::field(k, format!("{k} must be in [-{b}, {b}]")));
        }
        Ok(Some(x))
    }

    fn required_number(&self, k: &'static str, bound: f64) -> Result<f64, ProtoError> {
        self.number(k, Some(bound))?
            .ok_or_else(|| ProtoError::field(k, format!("missing {k}")))
    }
}

fn decode_value(
    raw: &[u8],
    v: &Value<'_>,
    range_of: &dyn Fn(&str) -> Option<Range<usize>>,
    acting_as: Option<&str>,
) -> Result<Command, ProtoError> {
    let action = v
        .get("action")
        .ok_or_else(|| ProtoError::field("action", format!("missing action ({ACTIONS})")))?
        .as_str()
        .ok_or_else(|| ProtoError::field("action", "action must be a string"))?;
    let payload = match v.get("payload") {
        None => None,
        Some(p) if p.is_null() => None,
        Some(p) if p.is_object() => Some(p),
        Some(_) => return Err(ProtoError::field("payload", "payload must be an object")),
    };
    let f = Fields { payload, top: v };
    match action {
        "authenticate" => decode_auth(&f).map(Command::Auth),
        "location_update" => decode_location(raw, &f, range_of, acting_as).map(Command::Publish),
        "subscribe" => decode_subscribe(SubAction::Subscribe, &f, false),
        "subscribe_all" => decode_subscribe(SubAction::Subscribe, &f, true),
        "unsubscribe" => decode_subscribe(SubAction::Unsubscribe, &f, false),
        "unsubscribe_all" => decode_subscribe(SubAction::Unsubscribe, &f, true),
        "ping" => Ok(Command::Ping),
        // A client answering the heartbeat in JSON, as the seed tells it to: nothing to do.
        "pong" => Ok(Command::Ack),
        other => Err(ProtoError::field(
            "action",
            format!("unknown action {other:?} ({ACTIONS})"),
        )),
    }
}

/// `authenticate`: the credential (`token`, a JWT or an API key) and the identity the
/// client claims (`user_id`, `role`), which the session checks against the credential.
fn decode_auth(f: &Fields<'_, '_>) -> Result<AuthRequest, ProtoError> {
    let user = match f.get("user_id") {
        None => return Err(ProtoError::field("user_id", "missing user_id")),
        Some(u) => native::entity_id(u)
            .ok_or_else(|| ProtoError::field("user_id", "user_id must be a non-empty string"))?,
    };
    let role = match f.string("role")?.as_deref() {
        Some("driver") => Role::Device,
        Some("office") => Role::Viewer,
        Some(_) => return Err(ProtoError::field("role", "role must be driver or office")),
        None => return Err(ProtoError::field("role", "missing role (driver or office)")),
    };
    // Without a token the session refuses the authentication (Unauthorized), unless the
    // connection is already authenticated (a repeat).
    let token = f.string("token")?;
    // A JWT has three dot-separated parts; anything else is an API key.
    let jwt = token.as_ref().is_some_and(|t| t.matches('.').count() == 2);
    let (token, api_key) = if jwt { (token, None) } else { (None, token) };
    Ok(AuthRequest {
        api_key,
        token,
        acting_as: Some((user.into(), role)),
        ..AuthRequest::default()
    })
}

/// A driver's `location_update {lat, lng, speed (km/h), bearing}`: a publish on
/// `vehicle_locations` for the driver's vehicle, with a native payload made from the
/// validated fields.
fn decode_location(
    raw: &[u8],
    f: &Fields<'_, '_>,
    range_of: &dyn Fn(&str) -> Option<Range<usize>>,
    acting_as: Option<&str>,
) -> Result<PublishRequest, ProtoError> {
    let Some(vehicle) = acting_as else {
        return Err(ProtoError::new(
            401,
            "authenticate (action authenticate, role driver) before sending location updates",
        ));
    };
    let lat = f.required_number("lat", 90.0)?;
    let lon = f.required_number("lng", 180.0)?;
    let speed = f.number("speed", None)?;
    let heading = f.number("bearing", None)?;
    let timestamp = decode_timestamp(raw, f, range_of)?;

    let mut p = Vec::with_capacity(128);
    p.extend_from_slice(b"{\"vehicle_id\":");
    json::write_str(&mut p, vehicle);
    p.extend_from_slice(b",\"location\":{\"latitude\":");
    json::write_f64(&mut p, lat);
    p.extend_from_slice(b",\"longitude\":");
    json::write_f64(&mut p, lon);
    if let Some(s) = speed {
        p.extend_from_slice(b",\"speed\":");
        json::write_f64(&mut p, s);
    }
    if let Some(h) = heading {
        p.extend_from_slice(b",\"heading\":");
        json::write_f64(&mut p, h);
    }
    p.extend_from_slice(b"}}");
    Ok(PublishRequest {
        channel: Channel::VehicleLocations,
        payload: 0..0,
        synthesized: Some(p),
        keys: EntityKeys {
            vehicle: Some(vehicle.into()),
            trip: None,
            driver: None,
        },
        severity: None,
        category: None,
        status: None,
        canon: Canon {
            location: Some(Location {
                lat,
                lon,
                speed_kmh: speed,
                heading,
                accuracy_m: None,
                altitude_m: None,
            }),
            ..Canon::default()
        },
        timestamp,
        fleet_id: None,
        device_id: None,
        ack: false,
    })
}

/// The update's own `timestamp` (RFC 3339), in `payload` or at the top level: its raw
/// range in the message and UNIX milliseconds. Absent: the broker stamps the event.
fn decode_timestamp(
    raw: &[u8],
    f: &Fields<'_, '_>,
    range_of: &dyn Fn(&str) -> Option<Range<usize>>,
) -> Result<Option<(Range<usize>, i64)>, ProtoError> {
    let Some(t) = f.get("timestamp") else {
        return Ok(None);
    };
    let bad = || ProtoError::field("timestamp", "timestamp must be an RFC 3339 string");
    let ms = t
        .as_str()
        .and_then(native::parse_rfc3339_ms)
        .ok_or_else(bad)?;
    // Where the string sits: in `payload` when it has one, as `Fields::get` reads it.
    let in_payload = f.payload.and_then(|p| p.get("timestamp")).is_some();
    let range = if in_payload {
        let pr = range_of("payload").ok_or_else(bad)?;
        json::object_members(&raw[pr.clone()])
            .and_then(|members| {
                members
                    .into_iter()
                    .find(|m| json::key_is(&raw[pr.start..][m.key.clone()], "timestamp"))
            })
            .map(|m| m.value.start + pr.start..m.value.end + pr.start)
    } else {
        range_of("timestamp")
    };
    let range = range
        .filter(|r| raw.get(r.start) == Some(&b'"'))
        .ok_or_else(bad)?;
    Ok(Some((range, ms)))
}

/// `subscribe {driver_id}` / `{all: true}`, `subscribe_all`, and their `unsubscribe`s: a
/// driver is a vehicle of the `vehicle_locations` channel; no driver is the whole company.
fn decode_subscribe(
    action: SubAction,
    f: &Fields<'_, '_>,
    all_action: bool,
) -> Result<Command, ProtoError> {
    let mut filters = Filters::default();
    let all = match f.get("all") {
        None => false,
        Some(a) => a
            .as_bool()
            .ok_or_else(|| ProtoError::field("all", "all must be true or false"))?,
    };
    if !(all_action || all) {
        let bad = || ProtoError::field("driver_id", "driver_id must be a non-empty string");
        match f.get("driver_id").or_else(|| f.get("driver_ids")) {
            None => {
                return Err(ProtoError::field(
                    "driver_id",
                    "missing driver_id (or all: true, or action subscribe_all)",
                ));
            }
            Some(d) => match d.as_array() {
                Some(list) if list.is_empty() || list.len() > MAX_DRIVERS => {
                    return Err(ProtoError::field(
                        "driver_id",
                        format!("a list of 1 to {MAX_DRIVERS} drivers"),
                    ));
                }
                Some(list) => {
                    for d in list {
                        filters.vehicles.push(native::entity_id(d).ok_or_else(bad)?);
                    }
                }
                None => filters.vehicles.push(native::entity_id(d).ok_or_else(bad)?),
            },
        }
    }
    Ok(Command::Subscribe(SubscribeRequest {
        action,
        channel: Channel::VehicleLocations,
        filters,
        since: None,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::{DeviceScope, Principal};
    use crate::event::Publication;
    use crate::session::ReplyLimits;
    use std::time::Instant;

    fn dec(s: &str, acting_as: Option<&str>) -> Result<Command, ProtoError> {
        Tracking
            .decode(&mut Parser::default(), s.as_bytes(), acting_as)
            .1
    }

    fn field_error(s: &str, acting_as: Option<&str>) -> (u16, Option<&'static str>) {
        let e = dec(s, acting_as).unwrap_err();
        (e.code, e.field)
    }

    /// The JSON text of a reply frame (server frames up to 125 bytes have a 2-byte head).
    fn text(frame: Vec<u8>) -> serde_json::Value {
        let head = if frame[1] == 126 { 4 } else { 2 };
        serde_json::from_slice(&frame[head..]).unwrap()
    }

    fn reply(r: Reply) -> serde_json::Value {
        text(
            Tracking
                .encode_reply(&r, "2024-03-15T14:30:00.000Z")
                .unwrap(),
        )
    }

    #[test]
    fn authenticate_in_payload_or_at_the_top_level() {
        for msg in [
            r#"{"action":"authenticate","payload":{"user_id":"truck-7","role":"driver","token":"a.b.c"}}"#,
            r#"{"action":"authenticate","user_id":"truck-7","role":"driver","token":"a.b.c"}"#,
        ] {
            let Ok(Command::Auth(a)) = dec(msg, None) else {
                panic!("{msg}")
            };
            assert_eq!(a.token.as_deref(), Some("a.b.c"));
            assert_eq!(a.api_key, None);
            assert_eq!(a.acting_as, Some(("truck-7".into(), Role::Device)));
        }
        let Ok(Command::Auth(a)) = dec(
            r#"{"action":"authenticate","payload":{"user_id":"ops","role":"office","token":"key-1"}}"#,
            None,
        ) else {
            panic!()
        };
        assert_eq!(
            (a.api_key.as_deref(), a.acting_as),
            (Some("key-1"), Some(("ops".into(), Role::Viewer)))
        );
        let cases = [
            (
                r#"{"action":"authenticate","payload":{"role":"office","token":"k"}}"#,
                "user_id",
            ),
            (
                r#"{"action":"authenticate","payload":{"user_id":"u","role":"boss","token":"k"}}"#,
                "role",
            ),
            (
                r#"{"action":"authenticate","payload":{"user_id":"u","token":"k"}}"#,
                "role",
            ),
            (
                r#"{"action":"authenticate","payload":{"user_id":"u","role":"office","token":5}}"#,
                "token",
            ),
        ];
        for (msg, field) in cases {
            assert_eq!(field_error(msg, None), (400, Some(field)), "{msg}");
        }
    }

    #[test]
    fn a_location_update_is_a_publish_for_the_drivers_vehicle() {
        let msg = r#"{"action":"location_update","payload":{"lat":40.7128,"lng":-74.006,"speed":36,"bearing":245.5}}"#;
        let Ok(Command::Publish(p)) = dec(msg, Some("truck-7")) else {
            panic!()
        };
        assert_eq!(p.channel, Channel::VehicleLocations);
        assert_eq!(p.keys.vehicle.as_deref(), Some("truck-7"));
        assert_eq!(
            std::str::from_utf8(p.synthesized.as_deref().unwrap()).unwrap(),
            r#"{"vehicle_id":"truck-7","location":{"latitude":40.7128,"longitude":-74.006,"speed":36,"heading":245.5}}"#
        );
        assert_eq!(
            p.canon.location,
            Some(Location {
                lat: 40.7128,
                lon: -74.006,
                speed_kmh: Some(36.0),
                heading: Some(245.5),
                accuracy_m: None,
                altitude_m: None,
            })
        );
        assert!(p.timestamp.is_none());

        // Read exactly (simd-json; serde_json without `float_roundtrip` reads this one a
        // unit in the last place off) and written back in the same shortest form.
        let msg = r#"{"action":"location_update","lat":0.0,"lng":98.36679975519131}"#;
        let Ok(Command::Publish(p)) = dec(msg, Some("a")) else {
            panic!()
        };
        assert_eq!(
            p.canon.location.unwrap().lon,
            "98.36679975519131".parse::<f64>().unwrap()
        );
        assert!(
            std::str::from_utf8(p.synthesized.as_deref().unwrap())
                .unwrap()
                .contains(r#""longitude":98.36679975519131}"#)
        );

        // Before authentication there is no driver: 401.
        assert_eq!(dec(msg, None).unwrap_err().code, 401);

        // A timestamp in the payload or at the top level: its raw range.
        for msg in [
            r#"{"action":"location_update","payload":{"lat":1,"lng":2,"timestamp":"2024-03-15T14:30:00Z"}}"#,
            r#"{"action":"location_update","timestamp":"2024-03-15T14:30:00Z","payload":{"lat":1,"lng":2}}"#,
        ] {
            let Ok(Command::Publish(p)) = dec(msg, Some("v")) else {
                panic!("{msg}")
            };
            let (r, ms) = p.timestamp.unwrap();
            assert_eq!(
                (&msg[r], ms),
                ("\"2024-03-15T14:30:00Z\"", 1_710_513_000_000)
            );
        }
    }

    #[test]
    fn bad_locations_name_the_field() {
        let cases = [
            (r#"{"action":"location_update","payload":{"lng":2}}"#, "lat"),
            (r#"{"action":"location_update","payload":{"lat":1}}"#, "lng"),
            (
                r#"{"action":"location_update","payload":{"lat":90.5,"lng":2}}"#,
                "lat",
            ),
            (
                r#"{"action":"location_update","payload":{"lat":1,"lng":-181}}"#,
                "lng",
            ),
            (
                r#"{"action":"location_update","payload":{"lat":"1","lng":2}}"#,
                "lat",
            ),
            (
                r#"{"action":"location_update","payload":{"lat":1,"lng":2,"speed":"fast"}}"#,
                "speed",
            ),
            (
                r#"{"action":"location_update","payload":{"lat":1,"lng":2,"bearing":[]}}"#,
                "bearing",
            ),
            (
                r#"{"action":"location_update","payload":{"lat":1,"lng":2,"timestamp":1710513000}}"#,
                "timestamp",
            ),
            (r#"{"action":"location_update","payload":7}"#, "payload"),
        ];
        for (msg, field) in cases {
            assert_eq!(field_error(msg, Some("v")), (400, Some(field)), "{msg}");
        }
    }

    #[test]
    fn subscriptions_name_a_driver_or_all() {
        let sub = |msg: &str| match dec(msg, Some("ops")) {
            Ok(Command::Subscribe(s)) => (s.action, s.channel, s.filters.vehicles),
            other => panic!("{msg}: {other:?}"),
        };
        let one = vec![Box::<str>::from("truck-7")];
        assert_eq!(
            sub(r#"{"action":"subscribe","payload":{"driver_id":"truck-7"}}"#),
            (SubAction::Subscribe, Channel::VehicleLocations, one.clone())
        );
        assert_eq!(
            sub(r#"{"action":"subscribe","driver_id":"truck-7"}"#).2,
            one
        );
        assert_eq!(
            sub(r#"{"action":"subscribe","payload":{"driver_id":42}}"#).2,
            vec![Box::<str>::from("42")]
        );
        for msg in [
            r#"{"action":"subscribe_all"}"#,
            r#"{"action":"subscribe","payload":{"all":true}}"#,
        ] {
            assert_eq!(sub(msg).2, Vec::<Box<str>>::new(), "{msg}");
        }
        assert_eq!(
            sub(r#"{"action":"unsubscribe","payload":{"driver_id":"truck-7"}}"#).0,
            SubAction::Unsubscribe
        );
        assert_eq!(
            sub(r#"{"action":"unsubscribe_all"}"#),
            (SubAction::Unsubscribe, Channel::VehicleLocations, vec![])
        );
        for (msg, field) in [
            (r#"{"action":"subscribe","payload":{}}"#, "driver_id"),
            (
                r#"{"action":"subscribe","payload":{"driver_id":""}}"#,
                "driver_id",
            ),
            (r#"{"action":"subscribe","payload":{"all":"yes"}}"#, "all"),
        ] {
            assert_eq!(field_error(msg, Some("ops")), (400, Some(field)), "{msg}");
        }
    }

    #[test]
    fn unknown_and_missing_actions_are_invalid_actions() {
        for msg in [
            r#"{"action":"teleport","payload":{}}"#,
            r#"{"payload":{}}"#,
            r#"{"action":5}"#,
        ] {
            let e = dec(msg, None).unwrap_err();
            assert_eq!(error_name(e.code, e.field), "InvalidAction", "{msg}");
        }
        assert!(matches!(
            dec(r#"{"action":"ping"}"#, None),
            Ok(Command::Ping)
        ));
        assert!(matches!(
            dec(r#"{"action":"pong"}"#, None),
            Ok(Command::Ack)
        ));
        let e = dec("{nope", None).unwrap_err();
        assert_eq!(error_name(e.code, e.field), "BadPayload");
    }

    #[test]
    fn replies_in_the_tracking_shapes() {
        let principal = |role| Principal {
            user_id: "key-user".into(),
            tenant: "acme".into(),
            role,
            scope: DeviceScope::any(),
            expires_at: None,
            credential: Default::default(),
        };
        let ok = |role, acting_as: Option<&str>| Reply::AuthOk {
            id: None,
            connection_id: "c1".into(),
            principal: principal(role),
            acting_as: acting_as.map(Into::into),
            echo: vec![],
            limits: ReplyLimits {
                max_message_bytes: 1024,
                max_subscriptions: 256,
                max_batch: 50,
                heartbeat_interval_ms: 30_000,
            },
        };
        assert_eq!(
            reply(ok(Role::Device, Some("truck-7"))),
            serde_json::json!({"type":"authenticated","payload":{"user_id":"truck-7","role":"driver"}})
        );
        assert_eq!(
            reply(ok(Role::Viewer, None)),
            serde_json::json!({"type":"authenticated","payload":{"user_id":"key-user","role":"office"}})
        );
        assert_eq!(
            reply(Reply::AuthError {
                id: None,
                code: 429,
                message: "too many connections for this fleet (company)".into()
            })["error"],
            "LimitExceeded"
        );
        let err = |code, field, message: &'static str| {
            reply(Reply::Error {
                id: None,
                error: ProtoError {
                    code,
                    message: message.into(),
                    field,
                },
            })
        };
        assert_eq!(
            err(400, Some("lat"), "lat must be a number"),
            serde_json::json!({"type":"error","error":"BadPayload","message":"lat must be a number","code":400,"field":"lat"})
        );
        assert_eq!(err(400, Some("action"), "x")["error"], "InvalidAction");
        assert_eq!(err(401, None, "x")["error"], "Unauthorized");
        assert_eq!(err(403, None, "x")["error"], "Forbidden");
        assert_eq!(err(408, None, "x")["error"], "Unauthorized");
        assert_eq!(
            err(429, None, "over 100 messages per second")["error"],
            "RateLimited"
        );
        let loc = err(
            429,
            None,
            "at most one location update per vehicle per interval",
        );
        assert_eq!(
            (&loc["error"], &loc["limit"]),
            (&"BadPayload".into(), &"location_rate".into())
        );
        assert_eq!(
            reply(Reply::Pong { id: None }),
            serde_json::json!({"action":"pong"})
        );
        let filters = |v: &[&str]| Filters {
            vehicles: v.iter().map(|&s| s.into()).collect(),
            ..Filters::default()
        };
        let subscribed = |f| Reply::Subscribed {
            id: None,
            channel: Channel::VehicleLocations,
            filters: f,
            position: None,
        };
        assert_eq!(
            reply(subscribed(filters(&["truck-7"]))),
            serde_json::json!({"type":"subscribed","payload":{"driver_id":"truck-7"}})
        );
        assert_eq!(
            reply(subscribed(filters(&[]))),
            serde_json::json!({"type":"subscribed","payload":{"all":true}})
        );
        assert_eq!(
            reply(Reply::Unsubscribed {
                id: None,
                channel: Channel::VehicleLocations,
                filters: filters(&["a", "b"]),
            }),
            serde_json::json!({"type":"unsubscribed","payload":{"driver_ids":["a","b"]}})
        );
        let ack = Reply::Ack {
            id: None,
            channel: Channel::VehicleLocations,
            seq: Some(1),
        };
        assert!(Tracking.encode_reply(&ack, "t").is_none());
        assert_eq!(
            Tracking.encode_reply(&Reply::Heartbeat, "t"),
            Some(frame::ping_frame(b""))
        );
    }

    #[test]
    fn location_events_carry_the_published_values() {
        let event = |canon: Canon, channel| {
            let p = Publication {
                channel,
                id: None,
                payload: b"{}".to_vec(),
                keys: EntityKeys {
                    vehicle: Some("truck-7".into()),
                    trip: None,
                    driver: None,
                },
                severity: None,
                category: None,
                status: None,
                canon,
                timestamp: "2024-03-15T14:30:00.123Z".into(),
                ts_ms: 0,
                ack: false,
                publisher: "p".into(),
                bind_check: Default::default(),
            };
            Event::encode("acme".into(), p, 1, 1, b"\"e1\"", Instant::now())
        };
        let located = Canon {
            location: Some(Location {
                lat: 40.7128,
                lon: -74.006,
                speed_kmh: Some(36.0),
                heading: None,
                ..Location::default()
            }),
            ..Canon::default()
        };
        let ev = event(located.clone(), Channel::VehicleLocations);
        assert_eq!(
            std::str::from_utf8(&Tracking.encode_event(&ev).unwrap()).unwrap(),
            r#"{"type":"location_update","payload":{"driver_id":"truck-7","lat":40.7128,"lng":-74.006,"speed":36,"bearing":null,"timestamp":"2024-03-15T14:30:00.123Z"}}"#
        );
        assert!(
            Tracking
                .encode_event(&event(located, Channel::Telemetry))
                .is_none()
        );
        let unlocated = event(Canon::default(), Channel::VehicleLocations);
        assert!(Tracking.encode_event(&unlocated).is_none());
    }

    mod fuzz {
        use super::*;
        use proptest::prelude::*;
        use serde_json::{Value as J, json};

        /// A field value of any JSON kind, biased towards what the fields expect.
        fn arb_value() -> impl Strategy<Value = J> {
            prop_oneof![
                3 => (-200.0f64..200.0).prop_map(|x| json!(x)),
                1 => any::<i64>().prop_map(|n| json!(n)),
                1 => any::<f64>().prop_map(|x| json!(x)),
                2 => "[a-z0-9\\-\"\\\\é.]{0,12}".prop_map(J::String),
                1 => Just(json!("2024-03-15T14:30:00Z")),
                1 => any::<bool>().prop_map(J::Bool),
                1 => Just(J::Null),
                1 => Just(json!([1, "a"])),
                1 => Just(json!({"x": 1})),
            ]
        }

        fn arb_fields() -> impl Strategy<Value = serde_json::Map<String, J>> {
            let names = prop::sample::select(vec![
                "lat",
                "lng",
                "speed",
                "bearing",
                "timestamp",
                "driver_id",
                "driver_ids",
                "all",
                "user_id",
                "role",
                "token",
                "id",
                "other",
            ]);
            prop::collection::vec((names, arb_value()), 0..7)
                .prop_map(|kv| kv.into_iter().map(|(k, v)| (k.to_string(), v)).collect())
        }

        fn arb_message() -> impl Strategy<Value = String> {
            let action = prop_oneof![
                6 => prop::sample::select(vec![
                    "authenticate", "location_update", "subscribe", "subscribe_all",
                    "unsubscribe", "unsubscribe_all", "ping", "pong", "teleport",
                ]).prop_map(|a| json!(a)),
                1 => arb_value(),
            ];
            (
                action,
                any::<bool>(),
                arb_fields(),
                arb_fields(),
                any::<u8>(),
            )
                .prop_map(|(action, has_action, top, payload, style)| {
                    let mut m = top;
                    if has_action {
                        m.insert("action".into(), action);
                    }
                    match style % 4 {
                        0 => {}
                        1 => {
                            m.insert("payload".into(), J::Object(payload));
                        }
                        2 => {
                            m.insert("payload".into(), J::Null);
                        }
                        _ => {
                            m.insert("payload".into(), json!([payload.len()]));
                        }
                    }
                    J::Object(m).to_string()
                })
        }

        /// A location update, mostly well formed: in-range coordinates, optional
        /// numbers, and now and then a value of another kind, in or out of `payload`.
        fn arb_location() -> impl Strategy<Value = String> {
            let coord = |b: f64| {
                prop_oneof![
                    8 => (-b..=b).prop_map(|x| json!(x)),
                    1 => (-90i64..=90).prop_map(|n| json!(n)),
                    1 => arb_value(),
                ]
            };
            let opt = || {
                prop::option::of(
                    prop_oneof![6 => any::<f64>().prop_map(|x| json!(x)), 1 => arb_value()],
                )
            };
            (
                coord(90.0),
                coord(180.0),
                opt(),
                opt(),
                prop::option::of(arb_value()),
                any::<bool>(),
            )
                .prop_map(|(lat, lng, speed, bearing, ts, nested)| {
                    let mut f = serde_json::Map::new();
                    f.insert("lat".into(), lat);
                    f.insert("lng".into(), lng);
                    for (k, v) in [("speed", speed), ("bearing", bearing), ("timestamp", ts)] {
                        if let Some(v) = v {
                            f.insert(k.into(), v);
                        }
                    }
                    let msg = if nested {
                        json!({"action": "location_update", "payload": f})
                    } else {
                        f.insert("action".into(), json!("location_update"));
                        J::Object(f)
                    };
                    msg.to_string()
                })
        }

        /// A JSON number's text, read exactly.
        fn number(raw: &[u8]) -> Option<f64> {
            std::str::from_utf8(raw).ok()?.parse().ok()
        }

        fn json_str(s: &str) -> Vec<u8> {
            let mut o = Vec::new();
            json::write_str(&mut o, s);
            o
        }

        const NAMES: [&str; 9] = [
            "InvalidAction",
            "BadPayload",
            "Unauthorized",
            "Forbidden",
            "NotFound",
            "Conflict",
            "RateLimited",
            "Unavailable",
            "InternalError",
        ];

        /// The JSON text of a frame `Tracking` made: one final text frame whose length
        /// is right.
        fn frame_body(f: &[u8]) -> &[u8] {
            assert_eq!(f[0], 0x81, "one final text frame");
            let (len, head) = match f[1] {
                126 => (u16::from_be_bytes([f[2], f[3]]) as usize, 4),
                n => (n as usize, 2),
            };
            assert_eq!(f.len(), head + len, "frame length");
            &f[head..]
        }

        fn frame_json(f: &[u8]) -> J {
            serde_json::from_slice(frame_body(f)).expect("JSON")
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(2000))]

            /// Any message decodes without panic; a publish is the acting driver's
            /// vehicle with in-range coordinates, a native payload that is JSON and a
            /// Tracking event with the same numbers; a refusal has a name, and encodes.
            #[test]
            fn decoding_any_message(
                msg in prop_oneof![arb_message(), arb_location()],
                acting_as in prop::option::of("[a-z0-9\\-\"]{1,8}"),
            ) {
                let r = dec(&msg, acting_as.as_deref());
                match r {
                    Err(e) => {
                        let name = error_name(e.code, e.field);
                        prop_assert!(NAMES.contains(&name), "{}", name);
                        if e.code == 401 {
                            prop_assert!(acting_as.is_none());
                        }
                        let reply = Reply::Error { id: None, error: e.clone() };
                        let f = Tracking.encode_reply(&reply, "t").unwrap();
                        let v = frame_json(&f);
                        prop_assert_eq!(&v["error"], name);
                    }
                    Ok(Command::Publish(p)) => {
                        // Numbers are compared through their text, read exactly (serde_json
                        // reads some decimals one ulp off without `float_roundtrip`).
                        let vehicle = acting_as.as_deref().unwrap();
                        prop_assert_eq!(p.keys.vehicle.as_deref(), Some(vehicle));
                        let loc = p.canon.location.unwrap();
                        let sent = |k| {
                            let raw = msg.as_bytes();
                            json::member(raw, "payload")
                                .filter(|p| p.first() == Some(&b'{'))
                                .and_then(|p| json::member(p, k))
                                .or_else(|| json::member(raw, k))
                                .and_then(number)
                        };
                        let canon = [Some(loc.lat), Some(loc.lon), loc.speed_kmh, loc.heading];
                        prop_assert_eq!(
                            ["lat", "lng", "speed", "bearing"].map(sent),
                            canon,
                            "the numbers sent"
                        );
                        prop_assert!((-90.0..=90.0).contains(&loc.lat));
                        prop_assert!((-180.0..=180.0).contains(&loc.lon));
                        let native = p.synthesized.clone().unwrap();
                        let _: J = serde_json::from_slice(&native).expect("native payload is JSON");
                        let id = json_str(vehicle);
                        prop_assert_eq!(json::member(&native, "vehicle_id"), Some(&id[..]));
                        let nloc = json::member(&native, "location").unwrap();
                        let shown = ["latitude", "longitude", "speed", "heading"]
                            .map(|k| json::member(nloc, k).and_then(number));
                        prop_assert_eq!(shown, canon, "native payload");
                        let pubn = Publication {
                            channel: p.channel,
                            id: None,
                            payload: native,
                            keys: p.keys,
                            severity: None,
                            category: None,
                            status: None,
                            canon: p.canon,
                            timestamp: "2024-03-15T14:30:00Z".into(),
                            ts_ms: 0,
                            ack: false,
                            publisher: "p".into(),
                            bind_check: Default::default(),
                        };
                        let ev = Event::encode("f".into(), pubn, 1, 1, b"\"e\"", Instant::now());
                        let f = ev.frame_in(TRACKING).unwrap();
                        prop_assert_eq!(&frame_json(f)["payload"]["driver_id"], vehicle);
                        let body = json::member(frame_body(f), "payload").unwrap();
                        let shown = ["lat", "lng", "speed", "bearing"]
                            .map(|k| json::member(body, k).and_then(number));
                        prop_assert_eq!(shown, canon, "tracking event");
                    }
                    Ok(Command::Subscribe(s)) => {
                        prop_assert_eq!(s.channel, Channel::VehicleLocations);
                        let reply = Reply::Subscribed {
                            id: None,
                            channel: s.channel,
                            filters: s.filters,
                            position: None,
                        };
                        let v = frame_json(&Tracking.encode_reply(&reply, "t").unwrap());
                        prop_assert_eq!(&v["type"], "subscribed");
                    }
                    Ok(Command::Auth(a)) => prop_assert!(a.acting_as.is_some()),
                    Ok(Command::Ping | Command::Ack) => {}
                    Ok(Command::Batch(_)) => prop_assert!(false, "no batches"),
                }
            }

            /// Bytes that are not a message at all are refused, without panic.
            #[test]
            fn decoding_any_bytes(raw in prop::collection::vec(any::<u8>(), 0..200)) {
                let (_, r) = Tracking.decode(&mut Parser::default(), &raw, Some("v"));
                if let Err(e) = r {
                    prop_assert!(NAMES.contains(&error_name(e.code, e.field)));
                }
            }
        }
    }

    #[test]
    fn the_dev_hint_names_the_dev_viewer() {
        let hint = Tracking.dev_hint("127.0.0.1:8000", "dev-viewer-00ff", "fleet_001");
        assert!(
            hint.starts_with(
                r#"ws://127.0.0.1:8000/v1/track, then send {"action":"authenticate","payload":{"user_id":"dev-viewer","role":"office","token":"dev-viewer-00ff"}}"#
            ),
            "{hint}"
        );
    }
}
