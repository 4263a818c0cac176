//! The Telematics SDK real-time dialect (SPEC §6, `seeds/telematics-sdk-realtime-api.txt`)
//! on `/realtime/api/v1/ws/realtime`.
//!
//! The client sends `{type:"authenticate", access_token, instance_id, client_id?,
//! device_token?, units, timezone, date_format}`; the server answers `authenticated`, then
//! `welcome`, then `subscribed` (the whole instance, or one device with `device_token`),
//! then a `device_update` per position. The server's heartbeat is `{type:"ping"}`, which
//! the client answers with `{type:"pong"}`. Errors are `{type:"error", code, message}`.
//!
//! Positions go out raw, as the API says: `Speed` in m/s (the core's km/h / 3.6) and
//! `Accuracy` in metres; `Timestamp` as `date_format` says in `timezone` (one frame per
//! distinct pair, shared by the connections that asked for it). `units` is echoed in
//! `welcome` and changes nothing raw. The data is live: a new subscription gets no
//! snapshot of last known positions.

use super::native::{
    self, AuthRequest, Command, Filters, Parser, ProtoError, SubAction, SubscribeRequest,
};
use super::view::{DateFormat, TimeView, View};
use super::{Codec, DialectId, Heartbeat, TELEMATICS};
use crate::event::Event;
use crate::json;
use crate::model::Channel;
use crate::session::Reply;
use crate::wire::frame;
use simd_json::BorrowedValue as Value;
use simd_json::prelude::*;
use std::ops::Range;

pub struct Telematics;

/// The format and zone of a connection that did not choose (the seed's example is unix).
const DEFAULT_DATE_FORMAT: &str = "unix";
const DEFAULT_TIMEZONE: &str = "UTC";

impl Codec for Telematics {
    fn id(&self) -> DialectId {
        TELEMATICS
    }

    fn name(&self) -> &'static str {
        "telematics"
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
        match reply {
            Reply::AuthOk {
                connection_id,
                principal,
                echo,
                limits,
                ..
            } => {
                let echoed = |name: &str| echo.iter().find(|(k, _)| *k == name).map(|(_, v)| v);
                o.extend_from_slice(b"{\"type\":\"authenticated\",\"user_id\":");
                json::write_str(&mut o, &principal.user_id);
                o.extend_from_slice(b",\"instance_id\":");
                json::write_str(&mut o, &principal.tenant);
                o.push(b'}');
                let mut out = frame::text_frame(&o);
                o.clear();
                o.extend_from_slice(b"{\"type\":\"welcome\",\"connection_id\":");
                json::write_str(&mut o, connection_id);
                o.extend_from_slice(b",\"server_time\":");
                json::write_str(&mut o, ts);
                o.extend_from_slice(b",\"instance_id\":");
                json::write_str(&mut o, &principal.tenant);
                for name in ["client_id", "units", "timezone", "date_format"] {
                    if let Some(v) = echoed(name) {
                        o.push(b',');
                        json::write_key(&mut o, name);
                        json::write_str(&mut o, v);
                    }
                }
                o.extend_from_slice(b",\"heartbeat_interval_ms\":");
                json::write_u64(&mut o, limits.heartbeat_interval_ms);
                o.push(b'}');
                out.extend_from_slice(&frame::text_frame(&o));
                return Some(out);
            }
            Reply::AuthError { code, message, .. } => error(&mut o, *code, message),
            Reply::Error { error: e, .. } => error(&mut o, e.code, &e.message),
            Reply::Pong { .. } => {
                o.extend_from_slice(b"{\"type\":\"pong\",\"server_time\":");
                json::write_str(&mut o, ts);
                o.push(b'}');
            }
            Reply::Subscribed { filters, .. } | Reply::Unsubscribed { filters, .. } => {
                o.extend_from_slice(if matches!(reply, Reply::Subscribed { .. }) {
                    b"{\"type\":\"subscribed\",\"topic\":"
                } else {
                    b"{\"type\":\"unsubscribed\",\"topic\":"
                });
                match filters.vehicles.first() {
                    Some(device) => json::write_str(&mut o, &format!("device/{device}")),
                    None => json::write_str(&mut o, "instance"),
                }
                o.push(b'}');
            }
            // The API has no publishes, acks or snapshot requests.
            Reply::Ack { .. } | Reply::Snapshot { .. } => return None,
            Reply::Heartbeat => {
                o.extend_from_slice(b"{\"type\":\"ping\",\"server_time\":");
                json::write_str(&mut o, ts);
                o.push(b'}');
            }
            Reply::WsPong(p) => return Some(frame::pong_frame(p)),
        }
        Some(frame::text_frame(&o))
    }

    fn encode_event(&self, ev: &Event) -> Option<Vec<u8>> {
        device_update(ev, None)
    }

    fn encode_projected(&self, ev: &Event, view: &View) -> Option<Vec<u8>> {
        device_update(ev, view.time.as_deref())
    }

    fn heartbeat(&self) -> Heartbeat {
        Heartbeat::Json
    }

    fn snapshot_on_subscribe(&self) -> bool {
        false
    }

    fn dev_hint(&self, host: &str, key: &str, fleet: &str) -> String {
        format!(
            "ws://{host}/realtime/api/v1/ws/realtime, then send \
             {{\"type\":\"authenticate\",\"access_token\":\"{key}\",\"instance_id\":\"{fleet}\",\
             \"units\":\"metric\",\"timezone\":\"UTC\",\"date_format\":\"iso\"}}"
        )
    }
}

fn error(o: &mut Vec<u8>, code: u16, message: &str) {
    o.extend_from_slice(b"{\"type\":\"error\",\"code\":");
    json::write_u64(o, code as u64);
    o.extend_from_slice(b",\"message\":");
    json::write_str(o, message);
    o.push(b'}');
}

/// `device_update` for a position; nothing for other events (the API streams positions).
fn device_update(ev: &Event, time: Option<&TimeView>) -> Option<Vec<u8>> {
    let loc = ev
        .canon
        .location
        .filter(|_| ev.channel == Channel::VehicleLocations)?;
    let mut o = Vec::with_capacity(256);
    o.extend_from_slice(b"{\"type\":\"device_update\",\"device_token\":");
    match &ev.keys.vehicle {
        Some(v) => json::write_str(&mut o, v),
        None => o.extend_from_slice(b"null"),
    }
    o.extend_from_slice(b",\"track_token\":");
    match &ev.keys.trip {
        Some(t) => json::write_str(&mut o, t),
        None => o.extend_from_slice(b"null"),
    }
    let opt = |o: &mut Vec<u8>, v: Option<f64>| match v {
        Some(v) => json::write_f64(o, v),
        None => o.extend_from_slice(b"null"),
    };
    o.extend_from_slice(b",\"position\":{\"Latitude\":");
    json::write_f64(&mut o, loc.lat);
    o.extend_from_slice(b",\"Longitude\":");
    json::write_f64(&mut o, loc.lon);
    // Raw sensor units, as the API documents: m/s and metres.
    o.extend_from_slice(b",\"Speed\":");
    opt(&mut o, loc.speed_kmh.map(|kmh| kmh / 3.6));
    o.extend_from_slice(b",\"Accuracy\":");
    opt(&mut o, loc.accuracy_m);
    o.extend_from_slice(b",\"Timestamp\":");
    match time {
        Some(t) => t.write(&mut o, ev.ts_ms),
        None => json::write_i64(&mut o, ev.ts_ms.div_euclid(1000)),
    }
    o.extend_from_slice(b",\"Heading\":");
    opt(&mut o, loc.heading);
    o.extend_from_slice(b"}}");
    Some(o)
}

fn decode_value(
    _raw: &[u8],
    v: &Value<'_>,
    _range_of: &dyn Fn(&str) -> Option<Range<usize>>,
) -> Result<Command, ProtoError> {
    let ty = native::message_type(v)?;
    match ty {
        "authenticate" => decode_auth(v).map(Command::Auth),
        // The answer to the server's heartbeat: hearing it is all that counts.
        "pong" => Ok(Command::Ack),
        "ping" => Ok(Command::Ping),
        other => Err(ProtoError::field(
            "type",
            format!("unknown message type {other:?} (authenticate, pong, ping)"),
        )),
    }
}

fn decode_auth(v: &Value<'_>) -> Result<AuthRequest, ProtoError> {
    let text = |k: &'static str| native::opt_string(v, k);
    let token = text("access_token")?
        .ok_or_else(|| ProtoError::field("access_token", "authenticate needs an access_token"))?;
    let instance = text("instance_id")?
        .ok_or_else(|| ProtoError::field("instance_id", "authenticate needs an instance_id"))?;
    let units = text("units")?.unwrap_or_else(|| "metric".into());
    if !matches!(units.as_str(), "metric" | "imperial") {
        return Err(ProtoError::field(
            "units",
            format!("units must be \"metric\" or \"imperial\" (not {units:?})"),
        ));
    }
    let format_name = text("date_format")?.unwrap_or_else(|| DEFAULT_DATE_FORMAT.into());
    let format = DateFormat::parse(&format_name).ok_or_else(|| {
        ProtoError::field(
            "date_format",
            format!("date_format must be \"unix\", \"iso\" or \"localized\" (not {format_name:?})"),
        )
    })?;
    let zone = text("timezone")?.unwrap_or_else(|| DEFAULT_TIMEZONE.into());
    let time = TimeView::new(format, &zone).ok_or_else(|| {
        ProtoError::field(
            "timezone",
            format!("unknown time zone {zone:?} (an IANA name such as \"America/New_York\")"),
        )
    })?;
    let device = text("device_token")?;
    if device.as_deref() == Some("") {
        return Err(ProtoError::field(
            "device_token",
            "device_token must name a device (or be null for the whole instance)",
        ));
    }
    let mut filters = Filters::default();
    if let Some(d) = &device {
        filters.vehicles.push(d.as_str().into());
    }
    let mut echo = vec![
        ("units", units.into_boxed_str()),
        ("timezone", zone.into_boxed_str()),
        ("date_format", format_name.into_boxed_str()),
    ];
    if let Some(c) = text("client_id")? {
        echo.push(("client_id", c.into_boxed_str()));
    }
    // A JWT has three dot-separated parts; anything else is an API key.
    let jwt = token.matches('.').count() == 2;
    Ok(AuthRequest {
        api_key: (!jwt).then(|| token.clone()),
        token: jwt.then_some(token),
        fleet_id: Some(instance),
        fleet_must_exist: true,
        then_subscribe: vec![SubscribeRequest {
            action: SubAction::Subscribe,
            channel: Channel::VehicleLocations,
            filters,
            since: None,
        }],
        echo,
        time: Some(time),
        ..AuthRequest::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(text: &str) -> Result<Command, ProtoError> {
        Telematics
            .decode(&mut Parser::default(), text.as_bytes(), None)
            .1
    }

    #[test]
    fn authenticate_subscribes_the_instance_or_one_device() {
        let Ok(Command::Auth(a)) = decode(
            r#"{"type":"authenticate","access_token":"k","instance_id":"fleet_a","device_token":"v9","units":"imperial","timezone":"America/New_York","date_format":"iso"}"#,
        ) else {
            panic!()
        };
        assert_eq!(a.fleet_id.as_deref(), Some("fleet_a"));
        assert!(a.fleet_must_exist);
        assert_eq!(a.api_key.as_deref(), Some("k"));
        assert_eq!(a.then_subscribe[0].filters.vehicles, vec!["v9".into()]);
        assert_eq!(a.time.unwrap().format, DateFormat::Iso);
        let Ok(Command::Auth(a)) = decode(
            r#"{"type":"authenticate","access_token":"a.b.c","instance_id":"fleet_a","device_token":null}"#,
        ) else {
            panic!()
        };
        assert_eq!(a.token.as_deref(), Some("a.b.c"));
        assert!(a.then_subscribe[0].filters.vehicles.is_empty());
    }

    #[test]
    fn bad_preferences_name_their_field() {
        for (text, field) in [
            (
                r#"{"type":"authenticate","access_token":"k","instance_id":"f","timezone":"Mars/Base"}"#,
                "timezone",
            ),
            (
                r#"{"type":"authenticate","access_token":"k","instance_id":"f","date_format":"julian"}"#,
                "date_format",
            ),
            (
                r#"{"type":"authenticate","access_token":"k","instance_id":"f","units":"furlongs"}"#,
                "units",
            ),
            (
                r#"{"type":"authenticate","instance_id":"f"}"#,
                "access_token",
            ),
            (r#"{"type":"subscribe"}"#, "type"),
        ] {
            let e = decode(text).unwrap_err();
            assert_eq!((e.code, e.field), (400, Some(field)), "{text}");
        }
        assert_eq!(decode("{nope").unwrap_err().code, 400);
    }

    mod fuzz {
        use super::*;
        use proptest::prelude::*;
        use serde_json::{Value as J, json};

        fn arb_value() -> impl Strategy<Value = J> {
            prop_oneof![
                3 => prop::sample::select(vec![
                    "unix", "iso", "localized", "metric", "imperial", "UTC",
                    "America/New_York", "Europe/Berlin", "Mars/Base", "k", "a.b.c",
                ]).prop_map(|s| json!(s)),
                2 => "[a-zA-Z0-9/_\\-\"\\\\é.]{0,16}".prop_map(J::String),
                1 => any::<i64>().prop_map(|n| json!(n)),
                1 => any::<bool>().prop_map(J::Bool),
                1 => Just(J::Null),
                1 => Just(json!([1, "a"])),
                1 => Just(json!({"x": 1})),
            ]
        }

        fn arb_message() -> impl Strategy<Value = String> {
            let names = prop::sample::select(vec![
                "type",
                "access_token",
                "instance_id",
                "client_id",
                "device_token",
                "units",
                "timezone",
                "date_format",
                "timestamp",
                "id",
            ]);
            let ty = prop::sample::select(vec!["authenticate", "pong", "ping", "subscribe"]);
            (ty, prop::collection::vec((names, arb_value()), 0..9)).prop_map(|(ty, kv)| {
                let mut m = serde_json::Map::new();
                m.insert("type".into(), json!(ty));
                for (k, v) in kv {
                    m.insert(k.to_string(), v);
                }
                J::Object(m).to_string()
            })
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(2000))]

            /// Any message or bytes decode without panic; a refusal is a 400 that encodes
            /// to one JSON error frame, and an accepted `authenticate` subscribes.
            #[test]
            fn decoding_anything(msg in prop_oneof![
                arb_message(),
                prop::collection::vec(any::<u8>(), 0..120)
                    .prop_map(|b| String::from_utf8_lossy(&b).into_owned()),
            ]) {
                match decode(&msg) {
                    Err(e) => {
                        prop_assert_eq!(e.code, 400);
                        let f = Telematics
                            .encode_reply(&Reply::Error { id: None, error: e }, "t")
                            .unwrap();
                        let hl = if f[1] & 0x7f == 126 { 4 } else { 2 };
                        let v: J = serde_json::from_slice(&f[hl..]).expect("JSON");
                        prop_assert_eq!(&v["type"], "error");
                    }
                    Ok(Command::Auth(a)) => {
                        prop_assert!(a.fleet_id.is_some() && a.time.is_some());
                        prop_assert_eq!(a.then_subscribe.len(), 1);
                    }
                    Ok(Command::Ack | Command::Ping) => {}
                    Ok(other) => prop_assert!(false, "{:?}", other),
                }
            }
        }
    }
}
