//! The Valtronics dialect (SPEC §6, `seeds/valtronics-websocket-api.txt`), on `/ws` and on
//! `/ws/telemetry`, `/ws/alerts`, `/ws/devices`, `/ws/system` (each subscribes its channel
//! once authenticated).
//!
//! Client messages carry their fields at the top level: `{type:"auth", token}`,
//! `{type:"subscribe", channel, device_id?, filters?}` (filters are read both at the top
//! level and under `filters`), `ping`, `batch`, and the publishes `telemetry_update`,
//! `alert` and `device_status_update`. Events go out in the seed's shapes, with a numeric
//! `device_id` when the entity id is a decimal number.
//!
//! Channels: `telemetry`, `alerts`, `devices` (device status) and `system`. `system` is the
//! node's status for admins, and for everyone else their own fleet's figures (the derived
//! `fleet_metrics`), both as `system_status_update`.

use super::native::{
    self, AuthRequest, Command, Filters, Parser, ProtoError, PublishRequest, SubAction,
    SubscribeRequest,
};
use super::{Codec, DialectId, VALTRONICS};
use crate::event::{Alert, Canon, Event, Location, Metric};
use crate::json;
use crate::model::{Channel, EntityKeys, Role};
use crate::session::Reply;
use crate::wire::frame;
use simd_json::BorrowedValue as Value;
use simd_json::prelude::*;
use std::ops::Range;

pub struct Valtronics;

/// The channel a Valtronics channel name means for `role`.
pub fn channel_for(name: &str, role: Option<Role>) -> Option<Channel> {
    Some(match name {
        "telemetry" => Channel::Telemetry,
        "alerts" => Channel::Alerts,
        "devices" => Channel::DeviceStatus,
        // Admins watch the node; everyone else their own fleet.
        "system" if role.is_none_or(|r| r == Role::Admin) => Channel::System,
        "system" => Channel::FleetMetrics,
        _ => return None,
    })
}

/// The Valtronics name of a channel.
fn channel_name(c: Channel) -> &'static str {
    match c {
        Channel::Telemetry => "telemetry",
        Channel::Alerts | Channel::MaintenanceAlerts => "alerts",
        Channel::DeviceStatus => "devices",
        Channel::System | Channel::FleetMetrics => "system",
        other => other.name(),
    }
}

impl Codec for Valtronics {
    fn id(&self) -> DialectId {
        VALTRONICS
    }

    fn name(&self) -> &'static str {
        "valtronics"
    }

    fn dev_hint(&self, host: &str, key: &str, _fleet: &str) -> String {
        format!(
            "ws://{host}/ws  (also /ws/telemetry, /ws/alerts, /ws/devices, /ws/system), \
             then send {{\"type\":\"auth\",\"token\":\"{key}\"}}"
        )
    }

    fn decode(
        &self,
        parser: &mut Parser,
        raw: &[u8],
        _acting_as: Option<&str>,
    ) -> (Option<Range<usize>>, Result<Command, ProtoError>) {
        parser.decode_with(raw, &decode_value)
    }

    fn encode_reply(&self, reply: &Reply, ts: &str) -> Option<Vec<u8>> {
        let mut o = Vec::with_capacity(128);
        let id = |o: &mut Vec<u8>, id: &Option<Vec<u8>>| {
            if let Some(id) = id {
                o.extend_from_slice(b",\"id\":");
                o.extend_from_slice(id);
            }
        };
        match reply {
            Reply::AuthOk {
                id: rid,
                connection_id,
                principal,
                ..
            } => {
                o.extend_from_slice(b"{\"type\":\"auth_response\",\"success\":true");
                o.extend_from_slice(b",\"message\":\"Authentication successful\",\"user_id\":");
                json::write_str(&mut o, &principal.user_id);
                o.extend_from_slice(b",\"connection_id\":");
                json::write_str(&mut o, connection_id);
                id(&mut o, rid);
            }
            Reply::AuthError {
                id: rid,
                code,
                message,
            } => {
                o.extend_from_slice(b"{\"type\":\"auth_response\",\"success\":false,\"message\":");
                json::write_str(&mut o, message);
                o.extend_from_slice(b",\"error\":");
                json::write_str(
                    &mut o,
                    match code {
                        401 => "invalid_token",
                        403 => "forbidden",
                        429 => "rate_limited",
                        _ => "unavailable",
                    },
                );
                o.extend_from_slice(b",\"code\":");
                json::write_u64(&mut o, *code as u64);
                id(&mut o, rid);
            }
            Reply::Error { id: rid, error } => {
                o.extend_from_slice(b"{\"type\":\"error\",\"code\":");
                json::write_u64(&mut o, error.code as u64);
                o.extend_from_slice(b",\"message\":");
                json::write_str(&mut o, &error.message);
                if let Some(f) = error.field {
                    o.extend_from_slice(b",\"field\":");
                    json::write_str(&mut o, f);
                }
                id(&mut o, rid);
            }
            Reply::Pong { id: rid } => {
                o.extend_from_slice(b"{\"type\":\"pong\"");
                id(&mut o, rid);
            }
            Reply::Subscribed {
                id: rid,
                channel,
                filters,
                ..
            }
            | Reply::Unsubscribed {
                id: rid,
                channel,
                filters,
            } => {
                // Positions ride along with `telemetry` (`Codec::companion`): one answer.
                if *channel == Channel::VehicleLocations {
                    return None;
                }
                o.extend_from_slice(if matches!(reply, Reply::Subscribed { .. }) {
                    b"{\"type\":\"subscribed\",\"channel\":"
                } else {
                    b"{\"type\":\"unsubscribed\",\"channel\":"
                });
                json::write_str(&mut o, channel_name(*channel));
                if !filters.vehicles.is_empty() {
                    o.extend_from_slice(b",\"device_id\":[");
                    for (i, v) in filters.vehicles.iter().enumerate() {
                        if i > 0 {
                            o.push(b',');
                        }
                        write_entity(&mut o, v);
                    }
                    o.push(b']');
                }
                id(&mut o, rid);
            }
            Reply::Ack {
                id: rid,
                channel,
                seq,
            } => {
                o.extend_from_slice(b"{\"type\":\"ack\",\"status\":");
                json::write_str(
                    &mut o,
                    if seq.is_some() {
                        "accepted"
                    } else {
                        "duplicate"
                    },
                );
                o.extend_from_slice(b",\"channel\":");
                json::write_str(&mut o, channel_name(*channel));
                id(&mut o, rid);
            }
            // Valtronics has no one-off snapshot request.
            Reply::Snapshot { .. } => return None,
            Reply::Heartbeat => return Some(frame::ping_frame(b"")),
            Reply::WsPong(p) => return Some(frame::pong_frame(p)),
        }
        o.extend_from_slice(b",\"timestamp\":");
        json::write_str(&mut o, ts);
        o.push(b'}');
        Some(frame::text_frame(&o))
    }

    fn encode_event(&self, ev: &Event) -> Option<Vec<u8>> {
        encode(ev, None)
    }

    fn companion(&self, channel: Channel) -> Option<Channel> {
        (channel == Channel::Telemetry).then_some(Channel::VehicleLocations)
    }

    fn channel_for_role(&self, channel: Channel, role: Role) -> Channel {
        match channel {
            Channel::System => channel_for("system", Some(role)).unwrap_or(channel),
            other => other,
        }
    }

    fn encode_projected(&self, ev: &Event, view: &super::view::View) -> Option<Vec<u8>> {
        encode(ev, view.metrics.as_deref())
    }
}

/// Writes an entity id: a JSON number when it is a plain decimal (`"15"` -> `15`), as the
/// seed numbers its devices; otherwise a string.
fn write_entity(o: &mut Vec<u8>, id: &str) {
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

/// `"name":{"value":..,"unit":..,"timestamp":..}`.
fn write_metric(o: &mut Vec<u8>, m: &Metric, timestamp: &str) {
    json::write_key(o, &m.name);
    o.extend_from_slice(b"{\"value\":");
    o.extend_from_slice(m.value.as_bytes());
    o.extend_from_slice(b",\"unit\":");
    // The publisher's unit, or `telemetry.units`' (filled in by the store).
    json::write_str(o, m.unit.as_deref().unwrap_or(""));
    o.extend_from_slice(b",\"timestamp\":");
    json::write_str(o, timestamp);
    o.push(b'}');
}

fn encode(ev: &Event, only: Option<&[Box<str>]>) -> Option<Vec<u8>> {
    let wanted = |name: &str| only.is_none_or(|l| l.iter().any(|m| &**m == name));
    let mut o = Vec::with_capacity(ev.frame.len() + 64);
    let device = ev.keys.vehicle.as_deref();
    let write_device = |o: &mut Vec<u8>| {
        if let Some(d) = device {
            o.extend_from_slice(b",\"device_id\":");
            write_entity(o, d);
        }
    };
    match ev.channel {
        // A position is telemetry to Valtronics: its coordinates, speed and heading as
        // metrics, then any other telemetry it carried.
        Channel::VehicleLocations => {
            let loc = ev.canon.location?;
            o.extend_from_slice(b"{\"type\":\"telemetry_update\",\"channel\":\"telemetry\"");
            write_device(&mut o);
            o.extend_from_slice(b",\"telemetry\":{");
            let values = [
                Some(loc.lat),
                Some(loc.lon),
                loc.speed_kmh,
                loc.heading,
                loc.accuracy_m,
                loc.altitude_m,
            ];
            let mut first = true;
            for ((name, unit), v) in LOCATION_METRICS.iter().zip(values) {
                let Some(v) = v.filter(|_| wanted(name)) else {
                    continue;
                };
                if !first {
                    o.push(b',');
                }
                first = false;
                json::write_key(&mut o, name);
                o.extend_from_slice(b"{\"value\":");
                json::write_f64(&mut o, v);
                o.extend_from_slice(b",\"unit\":");
                json::write_str(&mut o, unit);
                o.extend_from_slice(b",\"timestamp\":");
                json::write_str(&mut o, &ev.timestamp);
                o.push(b'}');
            }
            let others = ev.canon.metrics.iter().filter(|m| {
                wanted(&m.name) && !LOCATION_METRICS.iter().any(|(n, _)| *n == &*m.name)
            });
            for m in others {
                if !first {
                    o.push(b',');
                }
                first = false;
                write_metric(&mut o, m, &ev.timestamp);
            }
            o.push(b'}');
        }
        Channel::Telemetry if !ev.canon.metrics.is_empty() => {
            o.extend_from_slice(b"{\"type\":\"telemetry_update\",\"channel\":\"telemetry\"");
            write_device(&mut o);
            o.extend_from_slice(b",\"telemetry\":{");
            let mut first = true;
            for m in ev.canon.metrics.iter().filter(|m| wanted(&m.name)) {
                if !first {
                    o.push(b',');
                }
                first = false;
                write_metric(&mut o, m, &ev.timestamp);
            }
            o.push(b'}');
        }
        Channel::Telemetry => return None,
        Channel::Alerts | Channel::MaintenanceAlerts => {
            let a = ev.canon.alert.clone().unwrap_or_default();
            o.extend_from_slice(b"{\"type\":\"alert\",\"channel\":\"alerts\",\"alert_id\":");
            match &a.id {
                Some(raw) => o.extend_from_slice(raw.as_bytes()),
                None => o.extend_from_slice(b"null"),
            }
            write_device(&mut o);
            o.extend_from_slice(b",\"severity\":");
            json::write_str(&mut o, ev.severity.as_deref().unwrap_or("info"));
            if let Some(c) = &ev.category {
                o.extend_from_slice(b",\"alert_type\":");
                json::write_str(&mut o, c);
            }
            o.extend_from_slice(b",\"title\":");
            let title = a
                .title
                .as_deref()
                .or(ev.category.as_deref())
                .unwrap_or("alert");
            json::write_str(&mut o, title);
            o.extend_from_slice(b",\"message\":");
            json::write_str(&mut o, a.message.as_deref().unwrap_or(""));
        }
        Channel::DeviceStatus => {
            o.extend_from_slice(b"{\"type\":\"device_status_update\",\"channel\":\"devices\"");
            write_device(&mut o);
            o.extend_from_slice(b",\"old_status\":");
            match &ev.prev_status {
                Some(s) => json::write_str(&mut o, s),
                None => o.extend_from_slice(b"null"),
            }
            o.extend_from_slice(b",\"new_status\":");
            match &ev.status {
                Some(s) => json::write_str(&mut o, s),
                None => o.extend_from_slice(b"null"),
            }
            o.extend_from_slice(b",\"reason\":");
            match &ev.canon.reason {
                Some(s) => json::write_str(&mut o, s),
                None => o.extend_from_slice(b"null"),
            }
        }
        Channel::System | Channel::FleetMetrics => {
            // The node's figures (admins), or the fleet's (`metrics` of fleet_metrics).
            let payload = ev.payload_bytes();
            let figures = if ev.channel == Channel::System {
                payload
            } else {
                json::member(payload, "metrics")?
            };
            o.extend_from_slice(b"{\"type\":\"system_status_update\",\"channel\":\"system\"");
            o.extend_from_slice(if ev.channel == Channel::System {
                b",\"scope\":\"node\",\"metrics\":{"
            } else {
                b",\"scope\":\"fleet\",\"metrics\":{"
            });
            let mut first = true;
            let mut member = |o: &mut Vec<u8>, name: &str, value: &[u8]| {
                if wanted(name) {
                    if !first {
                        o.push(b',');
                    }
                    first = false;
                    json::write_key(o, name);
                    o.extend_from_slice(value);
                }
            };
            if let Some(cpu) = json::member(figures, "cpu_percent") {
                member(&mut o, "cpu_usage", cpu);
            }
            for m in json::object_members(figures).unwrap_or_default() {
                let name = json::unescape(&figures[m.key.clone()]);
                member(&mut o, &name, &figures[m.value.clone()]);
            }
            o.push(b'}');
        }
        _ => return None,
    }
    o.extend_from_slice(b",\"timestamp\":");
    json::write_str(&mut o, &ev.timestamp);
    if let Some(m) = &ev.canon.metadata {
        o.extend_from_slice(b",\"metadata\":");
        o.extend_from_slice(m.as_bytes());
    } else if matches!(
        ev.channel,
        Channel::Alerts | Channel::MaintenanceAlerts | Channel::DeviceStatus
    ) {
        o.extend_from_slice(b",\"metadata\":{}");
    }
    o.push(b'}');
    Some(o)
}

// ---------------------------------------------------------------------- decoding

fn decode_value(
    raw: &[u8],
    v: &Value<'_>,
    range_of: &dyn Fn(&str) -> Option<Range<usize>>,
) -> Result<Command, ProtoError> {
    let ty = native::message_type(v)?;
    match ty {
        "auth" => {
            let token = native::opt_string(v, "token")?
                .ok_or_else(|| ProtoError::field("token", "auth needs a token"))?;
            // A JWT has three dot-separated parts; anything else is an API key.
            let jwt = token.matches('.').count() == 2;
            Ok(Command::Auth(AuthRequest {
                api_key: (!jwt).then(|| token.clone()),
                token: jwt.then_some(token),
                ..AuthRequest::default()
            }))
        }
        "subscribe" | "unsubscribe" => {
            let name = native::opt_string(v, "channel")?
                .ok_or_else(|| ProtoError::field("channel", "missing channel"))?;
            // The role decides what `system` means; the session asks the codec again.
            let channel = channel_for(&name, None).ok_or_else(|| {
                ProtoError::field(
                    "channel",
                    format!("unknown channel {name:?} (telemetry, alerts, devices, system)"),
                )
            })?;
            let mut filters = native::decode_filters(v)?;
            if let Some(nested) = v.get("filters").filter(|f| f.is_object()) {
                merge(&mut filters, native::decode_filters(nested)?);
            }
            Ok(Command::Subscribe(SubscribeRequest {
                action: if ty == "subscribe" {
                    SubAction::Subscribe
                } else {
                    SubAction::Unsubscribe
                },
                channel,
                filters,
                since: None,
            }))
        }
        "ping" => Ok(Command::Ping),
        "batch" => native::decode_batch(raw, range_of),
        "telemetry_update" => decode_publish(raw, Channel::Telemetry, v, range_of),
        "alert" => decode_publish(raw, Channel::Alerts, v, range_of),
        "device_status_update" => decode_publish(raw, Channel::DeviceStatus, v, range_of),
        other => Err(ProtoError::field(
            "type",
            format!("unknown message type {other:?}"),
        )),
    }
}

/// The metrics Valtronics shows for a position, with their units, in this order.
const LOCATION_METRICS: [(&str, &str); 6] = [
    ("latitude", "°"),
    ("longitude", "°"),
    ("speed", "km/h"),
    ("heading", "°"),
    ("accuracy", "m"),
    ("altitude", "m"),
];

/// A position among telemetry metrics: `latitude` and `longitude` (in range), with
/// `speed` (km/h), `heading`, `accuracy` and `altitude` when given.
fn location_of(metrics: &[Metric]) -> Result<Option<Location>, ProtoError> {
    let num = |name: &'static str| -> Result<Option<f64>, ProtoError> {
        match metrics.iter().find(|m| &*m.name == name) {
            None => Ok(None),
            Some(m) => m
                .value
                .parse::<f64>()
                .ok()
                .filter(|v| v.is_finite())
                .map(Some)
                .ok_or_else(|| ProtoError::field(name, format!("{name} must be a number"))),
        }
    };
    let (Some(lat), Some(lon)) = (num("latitude")?, num("longitude")?) else {
        return Ok(None);
    };
    if !(-90.0..=90.0).contains(&lat) {
        return Err(ProtoError::field(
            "latitude",
            "latitude must be within -90..90",
        ));
    }
    if !(-180.0..=180.0).contains(&lon) {
        return Err(ProtoError::field(
            "longitude",
            "longitude must be within -180..180",
        ));
    }
    Ok(Some(Location {
        lat,
        lon,
        speed_kmh: num("speed")?,
        heading: num("heading")?,
        accuracy_m: num("accuracy")?,
        altitude_m: num("altitude")?,
    }))
}

/// `,"location":{...}` of the native payload made from a Valtronics position.
fn write_native_location(p: &mut Vec<u8>, loc: &Location) {
    p.extend_from_slice(b",\"location\":{\"latitude\":");
    json::write_f64(p, loc.lat);
    p.extend_from_slice(b",\"longitude\":");
    json::write_f64(p, loc.lon);
    for (name, v) in [
        ("speed", loc.speed_kmh),
        ("heading", loc.heading),
        ("accuracy", loc.accuracy_m),
        ("altitude", loc.altitude_m),
    ] {
        if let Some(v) = v {
            p.push(b',');
            json::write_key(p, name);
            json::write_f64(p, v);
        }
    }
    p.push(b'}');
}

fn merge(into: &mut Filters, more: Filters) {
    into.vehicles.extend(more.vehicles);
    into.trips.extend(more.trips);
    into.drivers.extend(more.drivers);
    into.severities.extend(more.severities);
    into.categories.extend(more.categories);
    into.metrics.extend(more.metrics);
    into.status_types.extend(more.status_types);
    into.frequency_ms = more.frequency_ms.or(into.frequency_ms);
}

/// A Valtronics publish: validated into canonical parts, with a native payload made from
/// them (native subscribers get the native shape of the same event).
fn decode_publish(
    raw: &[u8],
    mut channel: Channel,
    v: &Value<'_>,
    range_of: &dyn Fn(&str) -> Option<Range<usize>>,
) -> Result<Command, ProtoError> {
    let device = v
        .get("device_id")
        .and_then(native::entity_id)
        .ok_or_else(|| ProtoError::field("device_id", "missing device_id"))?;
    let text = |k: &'static str| native::opt_string(v, k);
    let member = |k: &str| range_of(k).map(|r| &raw[r]);
    let metadata = member("metadata").filter(|m| m.first() == Some(&b'{'));
    let mut canon = Canon {
        metadata: metadata
            .and_then(|m| std::str::from_utf8(m).ok())
            .map(Into::into),
        ..Canon::default()
    };
    let mut p = Vec::with_capacity(raw.len() + 32);
    p.extend_from_slice(b"{\"vehicle_id\":");
    json::write_str(&mut p, &device);
    p.extend_from_slice(b",\"device_id\":");
    write_entity(&mut p, &device);
    let (mut severity, mut category, mut status) = (None, None, None);
    match channel {
        Channel::Telemetry => {
            let t = member("telemetry")
                .filter(|t| t.first() == Some(&b'{'))
                .ok_or_else(|| ProtoError::field("telemetry", "telemetry must be an object"))?;
            canon.metrics = native::metrics_of(t, &[]);
            if canon.metrics.is_empty() {
                return Err(ProtoError::field("telemetry", "no metric in telemetry"));
            }
            // Telemetry with a position is a position (and reaches every dialect as one).
            if let Some(loc) = location_of(&canon.metrics)? {
                canon.location = Some(loc);
                channel = Channel::VehicleLocations;
                write_native_location(&mut p, &loc);
            }
            p.extend_from_slice(b",\"telemetry\":{");
            for (i, m) in canon.metrics.iter().enumerate() {
                if i > 0 {
                    p.push(b',');
                }
                json::write_key(&mut p, &m.name);
                match &m.unit {
                    Some(u) => {
                        p.extend_from_slice(b"{\"value\":");
                        p.extend_from_slice(m.value.as_bytes());
                        p.extend_from_slice(b",\"unit\":");
                        json::write_str(&mut p, u);
                        p.push(b'}');
                    }
                    None => p.extend_from_slice(m.value.as_bytes()),
                }
            }
            p.push(b'}');
        }
        Channel::Alerts => {
            let id = member("alert_id")
                .filter(|r| json::valid_id(r))
                .ok_or_else(|| ProtoError::field("alert_id", "missing alert_id"))?;
            let sev = text("severity")?
                .ok_or_else(|| ProtoError::field("severity", "missing severity"))?;
            let sev = crate::model::severity_word(&sev).ok_or_else(|| {
                ProtoError::field(
                    "severity",
                    "severity must be one of info, low, medium, warning, high, critical",
                )
            })?;
            let title = text("title")?;
            let kind = text("alert_type")?
                .or_else(|| title.clone())
                .unwrap_or("alert".into());
            canon.alert = Some(Alert {
                id: std::str::from_utf8(id).ok().map(Into::into),
                title: title.clone().map(Into::into),
                message: text("message")?.map(Into::into),
            });
            p.extend_from_slice(b",\"alert_id\":");
            p.extend_from_slice(id);
            p.extend_from_slice(b",\"severity\":");
            json::write_str(&mut p, sev);
            p.extend_from_slice(b",\"category\":");
            json::write_str(&mut p, &kind);
            if let Some(t) = &title {
                p.extend_from_slice(b",\"title\":");
                json::write_str(&mut p, t);
            }
            if let Some(m) = &canon.alert.as_ref().and_then(|a| a.message.clone()) {
                p.extend_from_slice(b",\"message\":");
                json::write_str(&mut p, m);
            }
            severity = Some(sev.into());
            category = Some(kind.into());
        }
        Channel::DeviceStatus => {
            let new = text("new_status")?
                .or(text("status")?)
                .ok_or_else(|| ProtoError::field("new_status", "missing new_status"))?;
            canon.reason = text("reason")?.map(Into::into);
            p.extend_from_slice(b",\"status\":");
            json::write_str(&mut p, &new);
            if let Some(r) = &canon.reason {
                p.extend_from_slice(b",\"reason\":");
                json::write_str(&mut p, r);
            }
            status = Some(new.into());
        }
        _ => unreachable!("only the three publish types"),
    }
    if let Some(m) = metadata {
        p.extend_from_slice(b",\"metadata\":");
        p.extend_from_slice(m);
    }
    p.push(b'}');
    let timestamp = native::decode_timestamp(v, range_of)?;
    Ok(Command::Publish(PublishRequest {
        channel,
        payload: 0..0,
        synthesized: Some(p),
        keys: EntityKeys {
            vehicle: Some(device.clone()),
            trip: None,
            driver: None,
        },
        severity,
        category,
        status,
        canon,
        timestamp,
        fleet_id: None,
        device_id: Some(device),
        ack: v.get("ack").and_then(|a| a.as_bool()).unwrap_or(false),
    }))
}
