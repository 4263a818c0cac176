//! What nodes put on NATS: subject names and the canonical event, as plain functions.
//!
//! A node sends an accepted event once; every node with interest decodes it once and
//! encodes its own frames from it, exactly as for a local publication. Nothing here
//! touches a socket or a clock.

use crate::event::{Canon, Event, Publication};
use crate::json;
use crate::model::{Channel, EntityKeys};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::borrow::Cow;
use std::sync::Arc;

/// One event as it crosses between nodes: the publication's typed parts and its native
/// payload, byte for byte.
#[derive(Debug, Serialize, Deserialize)]
struct WireEvent<'a> {
    /// Channel name.
    c: Cow<'a, str>,
    /// Raw JSON of the event id.
    id: Cow<'a, str>,
    /// Raw JSON of the payload, as published.
    p: Cow<'a, str>,
    k: EntityKeys,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    severity: Option<Box<str>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    category: Option<Box<str>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    status: Option<Box<str>>,
    #[serde(default)]
    canon: Canon,
    ts: Cow<'a, str>,
    ts_ms: i64,
    #[serde(default)]
    by: Cow<'a, str>,
}

/// The publication `p` with event id `id` (raw JSON), for the stream.
pub fn encode_publication(p: &Publication, id: &[u8]) -> Vec<u8> {
    let w = WireEvent {
        c: p.channel.name().into(),
        id: String::from_utf8_lossy(id),
        p: String::from_utf8_lossy(&p.payload),
        k: p.keys.clone(),
        severity: p.severity.clone(),
        category: p.category.clone(),
        status: p.status.clone(),
        canon: p.canon.clone(),
        ts: p.timestamp.as_str().into(),
        ts_ms: p.ts_ms,
        by: (*p.publisher).into(),
    };
    serde_json::to_vec(&w).expect("plain data serializes")
}

/// An event this node accepted, for the other nodes (state and metrics channels).
pub fn encode_event(ev: &Event) -> Vec<u8> {
    let id = json::member(ev.json(), "id").unwrap_or(b"null");
    let w = WireEvent {
        c: ev.channel.name().into(),
        id: String::from_utf8_lossy(id),
        p: String::from_utf8_lossy(ev.payload_bytes()),
        k: ev.keys.clone(),
        severity: ev.severity.clone(),
        category: ev.category.clone(),
        status: ev.status.clone(),
        canon: ev.canon.clone(),
        ts: (*ev.timestamp).into(),
        ts_ms: ev.ts_ms,
        by: "".into(),
    };
    serde_json::to_vec(&w).expect("plain data serializes")
}

/// Why a message from NATS was not taken (counted, never trusted).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    #[error("not an event: {0}")]
    Malformed(String),
    #[error("unknown channel {0:?}")]
    Channel(String),
    #[error("id or payload is not JSON")]
    Json,
}

/// A publication decoded from another node, and its event id (raw JSON).
pub fn decode(bytes: &[u8]) -> Result<(Publication, Vec<u8>), WireError> {
    let w: WireEvent =
        serde_json::from_slice(bytes).map_err(|e| WireError::Malformed(e.to_string()))?;
    let channel = Channel::parse(&w.c).ok_or_else(|| WireError::Channel(w.c.to_string()))?;
    // The payload is copied into frames verbatim: it must be one JSON value.
    if serde_json::from_str::<serde::de::IgnoredAny>(&w.p).is_err()
        || serde_json::from_str::<serde::de::IgnoredAny>(&w.id).is_err()
    {
        return Err(WireError::Json);
    }
    let p = Publication {
        channel,
        id: Some(w.id.as_bytes().to_vec()),
        payload: w.p.into_owned().into_bytes(),
        keys: w.k,
        severity: w.severity,
        category: w.category,
        status: w.status,
        canon: w.canon,
        timestamp: w.ts.into_owned(),
        ts_ms: w.ts_ms,
        ack: false,
        publisher: Arc::from(&*w.by),
        bind_check: Default::default(),
    };
    Ok((p, w.id.into_owned().into_bytes()))
}

/// The JetStream message id of a publication the publisher gave `id`: the same publisher,
/// channel and id through any node is the same message, and the stream's duplicate window
/// drops the retry.
pub fn msg_id(publisher: &str, channel: Channel, id: &[u8]) -> String {
    let mut h = Sha256::new();
    for part in [publisher.as_bytes(), channel.name().as_bytes(), id] {
        h.update((part.len() as u64).to_be_bytes());
        h.update(part);
    }
    h.finalize()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A name as one subject token (and part of a stream name or a bucket key): kept as is
/// when it is letters, digits, `_` and `-` (and does not start with `hex-`), else
/// `hex-` and its bytes in hex. Injective, so two tenants never share a subject.
pub fn token(name: &str) -> Cow<'_, str> {
    let plain = !name.is_empty()
        && !name.starts_with("hex-")
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if plain {
        Cow::Borrowed(name)
    } else {
        let mut s = String::with_capacity(4 + 2 * name.len());
        s.push_str("hex-");
        for b in name.bytes() {
            s.push_str(&format!("{b:02x}"));
        }
        Cow::Owned(s)
    }
}

/// The names a cluster uses on NATS, all under one prefix.
#[derive(Debug, Clone)]
pub struct Names {
    prefix: String,
}

impl Names {
    pub fn new(prefix: &str) -> Names {
        Names {
            prefix: prefix.into(),
        }
    }

    /// The key-value bucket of last known state (one value per tenant, channel, entity).
    pub fn bucket(&self) -> String {
        format!("{}_state", self.prefix)
    }

    /// The key-value bucket of iTrack sessions (by the digest of their hash).
    pub fn sessions_bucket(&self) -> String {
        format!("{}_sessions", self.prefix)
    }

    /// A state event's subject: its key in the bucket, so one publish both stores the
    /// newest value and reaches the nodes following the channel.
    pub fn state(&self, tenant: &str, channel: Channel, entity: &str) -> String {
        format!(
            "$KV.{}.{}.{}.{}",
            self.bucket(),
            token(tenant),
            channel.name(),
            token(entity)
        )
    }

    /// Every state subject of (tenant, channel).
    pub fn state_all(&self, tenant: &str, channel: Channel) -> String {
        format!(
            "$KV.{}.{}.{}.>",
            self.bucket(),
            token(tenant),
            channel.name()
        )
    }

    /// The subject of an event channel, kept by its stream.
    pub fn event(&self, tenant: &str, channel: Channel) -> String {
        format!("{}.ev.{}.{}", self.prefix, token(tenant), channel.name())
    }

    /// The stream of (tenant, event channel): its sequence is the channel's `seq` on
    /// every node, its creation time the `epoch`.
    pub fn stream(&self, tenant: &str, channel: Channel) -> String {
        format!("{}_ev_{}_{}", self.prefix, token(tenant), channel.name())
    }

    /// Other channels (service-published `fleet_metrics`): live only.
    pub fn message(&self, tenant: &str, channel: Channel) -> String {
        format!("{}.msg.{}.{}", self.prefix, token(tenant), channel.name())
    }

    /// Where an event this node accepted is sent (not event channels: they go to their
    /// stream first).
    pub fn for_event(&self, ev: &Event) -> String {
        if ev.channel.is_state() {
            let entity = ev.keys.state_key(ev.channel).unwrap_or("_");
            self.state(&ev.tenant, ev.channel, entity)
        } else {
            self.message(&ev.tenant, ev.channel)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Location, Metric};

    fn publication() -> Publication {
        Publication {
            channel: Channel::VehicleLocations,
            id: Some(b"\"p1\"".to_vec()),
            payload: br#"{"vehicle_id":"v 1","location":{"latitude":1.5,"longitude":2}}"#.to_vec(),
            keys: EntityKeys {
                vehicle: Some("v 1".into()),
                trip: Some("t".into()),
                driver: None,
            },
            severity: None,
            category: None,
            status: None,
            canon: Canon {
                location: Some(Location {
                    lat: 1.5,
                    lon: 2.0,
                    ..Default::default()
                }),
                metrics: vec![Metric {
                    name: "rpm".into(),
                    value: "900".into(),
                    unit: None,
                }],
                ..Default::default()
            },
            timestamp: "2026-12-05T10:00:00.000Z".into(),
            ts_ms: 1_796_464_800_000,
            ack: true,
            publisher: "dev\"ice".into(),
            bind_check: Default::default(),
        }
    }

    #[test]
    fn a_publication_crosses_unchanged() {
        let p = publication();
        let bytes = encode_publication(&p, b"\"p1\"");
        let (q, id) = decode(&bytes).unwrap();
        assert_eq!(id, b"\"p1\"");
        assert_eq!(
            (
                q.channel,
                &q.payload,
                &q.keys,
                &q.canon,
                &q.timestamp,
                q.ts_ms
            ),
            (
                p.channel,
                &p.payload,
                &p.keys,
                &p.canon,
                &p.timestamp,
                p.ts_ms
            )
        );
        assert_eq!(&*q.publisher, "dev\"ice");
        assert!(!q.ack, "acks are the accepting node's business");
    }

    #[test]
    fn hostile_messages_are_refused() {
        assert!(matches!(decode(b"not json"), Err(WireError::Malformed(_))));
        let bad_channel = br#"{"c":"nope","id":"1","p":"{}","k":{},"ts":"t","ts_ms":0}"#;
        assert_eq!(
            decode(bad_channel).unwrap_err(),
            WireError::Channel("nope".into())
        );
        let bad_payload = br#"{"c":"alerts","id":"1","p":"{","k":{},"ts":"t","ts_ms":0}"#;
        assert_eq!(decode(bad_payload).unwrap_err(), WireError::Json);
    }

    #[test]
    fn names_are_tokens_and_injective() {
        assert_eq!(token("fleet_001"), "fleet_001");
        assert_eq!(token("a.b"), "hex-612e62");
        assert_eq!(token("hex-61"), "hex-6865782d3631");
        assert_eq!(token(""), "hex-");
        assert_ne!(token("a b"), token("a_b"));
        let n = Names::new("fc");
        assert_eq!(
            n.state("t.1", Channel::VehicleLocations, "v1"),
            "$KV.fc_state.hex-742e31.vehicle_locations.v1"
        );
        assert_eq!(n.event("t", Channel::Alerts), "fc.ev.t.alerts");
        assert_eq!(n.stream("t", Channel::Alerts), "fc_ev_t_alerts");
    }

    #[test]
    fn message_ids_separate_publishers_and_channels() {
        let a = msg_id("svc", Channel::Alerts, b"\"1\"");
        assert_eq!(a, msg_id("svc", Channel::Alerts, b"\"1\""));
        assert_ne!(a, msg_id("svc2", Channel::Alerts, b"\"1\""));
        assert_ne!(a, msg_id("svc", Channel::TripEvents, b"\"1\""));
        assert_eq!(a.len(), 32);
    }
}
