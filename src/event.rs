//! A published event, encoded once and shared by every subscriber (SPEC §1 "encode once").

use crate::dialect::native::{self, EventHead};
use crate::model::{Channel, EntityKeys, Severity};
use crate::wire::frame;
use std::ops::Range;
use std::sync::Arc;
use std::time::Instant;

/// What a session hands the shard for one accepted publish.
#[derive(Debug)]
pub struct Publication {
    pub channel: Channel,
    /// Raw JSON of the publisher's id, if it gave one.
    pub id: Option<Vec<u8>>,
    /// The payload exactly as published.
    pub payload: Vec<u8>,
    pub keys: EntityKeys,
    pub severity: Option<Severity>,
    pub category: Option<Box<str>>,
    pub status: Option<Box<str>>,
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

/// An event ready for delivery: routing facts plus its native frame.
#[derive(Debug)]
pub struct Event {
    pub tenant: Arc<str>,
    pub channel: Channel,
    /// Position in its (tenant, channel) stream; increases by one per accepted publish.
    pub seq: u64,
    pub keys: EntityKeys,
    pub severity: Option<Severity>,
    pub category: Option<Box<str>>,
    pub status: Option<Box<str>>,
    pub ts_ms: i64,
    /// The complete WebSocket text frame, identical for every native subscriber.
    pub frame: Box<[u8]>,
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
            ts_ms: p.ts_ms,
            frame,
            payload: range.start + hl..range.end + hl,
            header_len: hl,
            accepted_at,
        }
    }

    /// The event's JSON text (the frame without its header).
    pub fn json(&self) -> &[u8] {
        &self.frame[self.header_len..]
    }

    pub fn payload_bytes(&self) -> &[u8] {
        &self.frame[self.payload.clone()]
    }

    /// A frame for a subscriber that asked for only some telemetry metrics.
    pub fn projected_frame(&self, metrics: &[Box<str>]) -> Vec<u8> {
        let json = self.json();
        let (ps, pe) = (
            self.payload.start - self.header_len,
            self.payload.end - self.header_len,
        );
        let mut out = Vec::with_capacity(json.len());
        out.extend_from_slice(&json[..ps]);
        out.extend_from_slice(&native::project_metrics(&json[ps..pe], metrics));
        out.extend_from_slice(&json[pe..]);
        frame::text_frame(&out)
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
        timestamp: "t".into(),
        ts_ms: 0,
        ack: false,
        publisher: "test".into(),
        bind_check: Default::default(),
    };
    Arc::new(Event::encode("f".into(), p, seq, 1, b"1", accepted_at))
}
