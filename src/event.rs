//! A published event, encoded once and shared by every subscriber (SPEC §1 "encode once").

use crate::dialect::native::{self, EventHead};
use crate::dialect::view::View;
use crate::dialect::{self, DialectId};
use crate::model::{Channel, EntityKeys};
use crate::wire::{deflate, frame};
use std::ops::Range;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

/// The typed parts of a publication (SPEC §6, "one canonical event model"), read once when
/// it is accepted, from which every dialect encodes its own shape. Fields the model does
/// not know stay in the native payload, which native subscribers receive byte for byte.
#[derive(Debug, Default, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Canon {
    pub location: Option<Location>,
    /// Telemetry, in the publisher's order.
    pub metrics: Vec<Metric>,
    pub alert: Option<Alert>,
    /// A status change (device or driver status): the new status is [`Event::status`].
    pub reason: Option<Box<str>>,
    /// Raw JSON of the publisher's `metadata` object.
    pub metadata: Option<Box<str>>,
    /// A trip event's `event` name.
    pub trip_event: Option<Box<str>>,
}

/// A position: speed in km/h, heading in degrees, accuracy and altitude in metres.
#[derive(Debug, Default, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Location {
    pub lat: f64,
    pub lon: f64,
    pub speed_kmh: Option<f64>,
    pub heading: Option<f64>,
    pub accuracy_m: Option<f64>,
    pub altitude_m: Option<f64>,
}

/// One telemetry reading: its raw JSON value (usually a number) and unit, if known.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Metric {
    pub name: Box<str>,
    pub value: Box<str>,
    pub unit: Option<Box<str>>,
}

#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Alert {
    /// Raw JSON of the alert id (a string, or a number as the Valtronics seed has it).
    pub id: Option<Box<str>>,
    pub title: Option<Box<str>>,
    pub message: Option<Box<str>>,
}

/// What a session hands the shard for one accepted publish.
#[derive(Debug)]
pub struct Publication {
    pub channel: Channel,
    /// Raw JSON of the publisher's id, if it gave one.
    pub id: Option<Vec<u8>>,
    /// The payload exactly as published.
    pub payload: Vec<u8>,
    pub keys: EntityKeys,
    /// One of [`crate::model::SEVERITIES`], as published.
    pub severity: Option<Box<str>>,
    pub category: Option<Box<str>>,
    pub status: Option<Box<str>>,
    pub canon: Canon,
    /// The event's own time (the publisher's, or the broker's when it gave none).
    pub timestamp: String,
    pub ts_ms: i64,
    /// The publisher asked for an `ack` once the event is accepted.
    pub ack: bool,
    /// Who published it (user id): publish ids are deduplicated per publisher and channel.
    pub publisher: Arc<str>,
    /// A device named a trip or driver its credential does not list: accepted only if it
    /// is bound to the device's vehicle (that vehicle's current trip).
    pub bind_check: BindCheck,
}

/// What the store must check against a vehicle's current trip before accepting.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BindCheck {
    pub trip: bool,
    pub driver: bool,
}

/// Per dialect: the compressed frame, once built (see `Event::wire_frame`).
type Deflated = [OnceLock<Option<Box<[u8]>>>; dialect::COUNT];

/// An event ready for delivery: routing facts plus its native frame.
#[derive(Debug)]
pub struct Event {
    pub tenant: Arc<str>,
    pub channel: Channel,
    /// Position in its (tenant, channel) stream; increases by one per accepted publish.
    pub seq: u64,
    pub keys: EntityKeys,
    pub severity: Option<Box<str>>,
    pub category: Option<Box<str>>,
    pub status: Option<Box<str>>,
    /// A status channel's previous status of this entity (from last known state).
    pub prev_status: Option<Box<str>>,
    /// A position at rest: since when (UNIX ms) the vehicle has been at rest.
    pub stopped_since_ms: Option<i64>,
    pub canon: Canon,
    pub timestamp: Box<str>,
    pub ts_ms: i64,
    /// The complete WebSocket text frame, identical for every native subscriber.
    pub frame: Box<[u8]>,
    /// The frame of each other dialect, encoded the first time a subscriber of that
    /// dialect needs it and then shared by all of them (`None`: the dialect has no shape
    /// for this event).
    others: [OnceLock<Option<Box<[u8]>>>; dialect::COUNT - 1],
    /// The permessage-deflate form of each dialect's frame, compressed the first time a
    /// connection that negotiated it needs it, then shared like the plain frame (`None`:
    /// compression would not shrink it; the plain frame is sent). Allocated on first use:
    /// an event no compressing subscriber receives carries one empty pointer.
    deflated: OnceLock<Box<Deflated>>,
    /// Where the JSON payload sits inside `frame`.
    pub payload: Range<usize>,
    /// Length of the frame header (the JSON text starts here).
    header_len: usize,
    pub accepted_at: Instant,
}

impl Event {
    /// Encodes a publication once. `fresh_id` is used when the publisher gave no id.
    pub fn encode(
        tenant: Arc<str>,
        p: Publication,
        seq: u64,
        epoch: u64,
        fresh_id: &[u8],
        accepted_at: Instant,
    ) -> Event {
        let head = EventHead {
            channel: p.channel,
            id: p.id.as_deref().unwrap_or(fresh_id),
            timestamp: &p.timestamp,
            seq: p.channel.is_event().then_some((seq, epoch)),
        };
        let (json, range) = native::event(&head, &p.payload);
        let hl = frame::header_len(json.len());
        let frame = frame::text_frame(&json).into_boxed_slice();
        Event {
            tenant,
            channel: p.channel,
            seq,
            keys: p.keys,
            severity: p.severity,
            category: p.category,
            status: p.status,
            prev_status: None,
            stopped_since_ms: None,
            canon: p.canon,
            timestamp: p.timestamp.into_boxed_str(),
            ts_ms: p.ts_ms,
            frame,
            others: Default::default(),
            deflated: Default::default(),
            payload: range.start + hl..range.end + hl,
            header_len: hl,
            accepted_at,
        }
    }

    /// This event's frame in dialect `d`, encoded at most once per event and dialect
    /// (`None`: that dialect has no shape for it, and its subscribers do not get it).
    pub fn frame_in(&self, d: DialectId) -> Option<&[u8]> {
        if d == dialect::NATIVE {
            return Some(&self.frame);
        }
        self.others[d.0 as usize - 1]
            .get_or_init(|| {
                dialect::codec(d)
                    .encode_event(self)
                    .map(|json| frame::text_frame(&json).into_boxed_slice())
            })
            .as_deref()
    }

    /// The frame a connection of dialect `d` is written: the permessage-deflate one when
    /// it negotiated compression (`deflate_min`: the smallest message compressed) and the
    /// message is long enough, compressed once per event and dialect
    /// (`crate::wire::deflate`); otherwise [`Event::frame_in`]. A connection without
    /// compression pays one branch.
    pub fn wire_frame(&self, d: DialectId, deflate_min: Option<u32>) -> Option<&[u8]> {
        let plain = self.frame_in(d)?;
        let Some(min) = deflate_min else {
            return Some(plain);
        };
        if deflate::payload_of(plain).len() < min as usize {
            return Some(plain);
        }
        let z = self.deflated.get_or_init(Default::default)[d.0 as usize]
            .get_or_init(|| deflate::compress_frame(plain));
        Some(z.as_deref().unwrap_or(plain))
    }

    /// The event's JSON text (the frame without its header).
    pub fn json(&self) -> &[u8] {
        &self.frame[self.header_len..]
    }

    pub fn payload_bytes(&self) -> &[u8] {
        &self.frame[self.payload.clone()]
    }

    /// Where the payload sits in [`Event::json`].
    pub fn payload_range_in_json(&self) -> (usize, usize) {
        (
            self.payload.start - self.header_len,
            self.payload.end - self.header_len,
        )
    }

    /// A frame in dialect `d` for a subscriber that asked for only some telemetry metrics
    /// (the shard builds it once per event and distinct metric list).
    pub fn projected_frame(&self, d: DialectId, metrics: &[Box<str>]) -> Option<Vec<u8>> {
        self.view_frame(
            d,
            &View {
                metrics: Some(metrics.into()),
                ..View::default()
            },
        )
    }

    /// A frame in dialect `d` as `view` shows it (the shard builds it once per event and
    /// distinct view, and shares it).
    pub fn view_frame(&self, d: DialectId, view: &View) -> Option<Vec<u8>> {
        dialect::codec(d)
            .encode_projected(self, view)
            .map(|json| frame::text_frame(&json))
    }
}

/// An event for unit tests: `payload` on `channel`, about `vehicle`, at position `seq`.
#[cfg(test)]
pub(crate) fn test_event(
    channel: Channel,
    vehicle: Option<&str>,
    seq: u64,
    payload: &[u8],
    accepted_at: Instant,
) -> Arc<Event> {
    let p = Publication {
        channel,
        id: None,
        payload: payload.to_vec(),
        keys: EntityKeys {
            vehicle: vehicle.map(Into::into),
            trip: None,
            driver: None,
        },
        severity: None,
        category: None,
        status: None,
        canon: Canon::default(),
        timestamp: "t".into(),
        ts_ms: 0,
        ack: false,
        publisher: "test".into(),
        bind_check: Default::default(),
    };
    Arc::new(Event::encode("f".into(), p, seq, 1, b"1", accepted_at))
}
