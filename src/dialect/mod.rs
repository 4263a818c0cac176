//! Wire dialects: codecs between a client's frames and the broker's one core (SPEC §6).
//!
//! A dialect decodes a client message into a [`Command`] of the one
//! [`crate::session::Session`], and encodes the session's typed [`Reply`]s and the events
//! into its own frames. It never touches sockets, the store or the shard. An event is
//! encoded at most once per dialect ([`crate::event::Event::frame_in`]) and the frame is
//! shared by every subscriber of that dialect.
//!
//! Adding a dialect: one file here implementing [`Codec`], its entry in [`CODECS`], and its
//! paths in [`ENDPOINTS`] (which `crate::wire::handshake::Endpoint::classify` reads).

pub mod itrack;
pub mod native;
pub mod telematics;
pub mod tracking;
pub mod valtronics;
pub mod view;

use crate::event::Event;
use crate::model::{Channel, Role};
use crate::session::Reply;
use native::{Command, Parser, ProtoError};
use std::ops::Range;

/// A dialect's index in [`CODECS`] (and in each event's frame cache).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DialectId(pub u8);

pub const NATIVE: DialectId = DialectId(0);
pub const VALTRONICS: DialectId = DialectId(1);
pub const TELEMATICS: DialectId = DialectId(2);
pub const TRACKING: DialectId = DialectId(3);
pub const ITRACK: DialectId = DialectId(4);
/// Number of dialects.
pub const COUNT: usize = 5;

/// Every dialect, by [`DialectId`].
pub static CODECS: [&(dyn Codec + Sync); COUNT] = [
    &native::Native,
    &valtronics::Valtronics,
    &telematics::Telematics,
    &tracking::Tracking,
    &itrack::Itrack,
];

pub fn codec(d: DialectId) -> &'static dyn Codec {
    CODECS[d.0 as usize]
}

/// The streaming paths of every dialect but the native one (whose paths carry an entity
/// scope, see [`crate::wire::handshake::Endpoint::classify`]), and the channel each
/// subscribes once the connection is authenticated.
pub const ENDPOINTS: &[(&str, DialectId, Option<Channel>)] = &[
    ("/ws", VALTRONICS, None),
    ("/ws/telemetry", VALTRONICS, Some(Channel::Telemetry)),
    ("/ws/alerts", VALTRONICS, Some(Channel::Alerts)),
    ("/ws/devices", VALTRONICS, Some(Channel::DeviceStatus)),
    // `system` means the node for admins and their own fleet for everyone else
    // (`Codec::channel_for_role`).
    ("/ws/system", VALTRONICS, Some(Channel::System)),
    ("/realtime/api/v1/ws/realtime", TELEMATICS, None),
    ("/v1/track", TRACKING, None),
    ("/event/subscription", ITRACK, None),
    ("/v2/event/subscription", ITRACK, None),
];

/// The endpoint of a dialect's streaming path (a trailing `/` is ignored).
pub fn endpoint(path: &str) -> Option<crate::wire::handshake::Endpoint> {
    let path = match path.strip_suffix('/') {
        Some(p) if !p.is_empty() => p,
        _ => path,
    };
    ENDPOINTS
        .iter()
        .find(|(p, _, _)| *p == path)
        .map(|&(_, d, preset)| crate::wire::handshake::Endpoint::Stream(d, preset))
}

/// How the server's heartbeat looks on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Heartbeat {
    /// A WebSocket ping frame; any frame from the client counts as an answer.
    WsPing,
    /// A JSON message (Telematics `{type:"ping"}`), answered with the dialect's pong;
    /// here too any frame from the client counts.
    Json,
}

pub trait Codec: Sync {
    fn id(&self) -> DialectId;

    /// The `dialect` label of this dialect's connection metrics.
    fn name(&self) -> &'static str;

    /// Decodes one client message (a complete text message): the raw range of its id (for
    /// the error that may answer it) and the command, or why it was refused.
    /// `acting_as`: the user the connection authenticated as, when its dialect names one
    /// (a Tracking driver publishes for its own vehicle without naming it).
    fn decode(
        &self,
        parser: &mut Parser,
        raw: &[u8],
        acting_as: Option<&str>,
    ) -> (Option<Range<usize>>, Result<Command, ProtoError>);

    /// A complete frame for `reply` (`None`: this dialect sends nothing for it). `ts` is
    /// the broker's time, RFC 3339.
    fn encode_reply(&self, reply: &Reply, ts: &str) -> Option<Vec<u8>>;

    /// The JSON text of `ev` in this dialect (`None`: it has no shape for the event).
    fn encode_event(&self, ev: &Event) -> Option<Vec<u8>>;

    /// The JSON text of `ev` projected to the telemetry `metrics` (a subscription filter).
    fn encode_projected(&self, ev: &Event, view: &view::View) -> Option<Vec<u8>>;

    /// The channel a subscription of `role` to `channel` means in this dialect.
    fn channel_for_role(&self, channel: Channel, _role: Role) -> Channel {
        channel
    }

    fn heartbeat(&self) -> Heartbeat {
        Heartbeat::WsPing
    }

    /// Whether its events show tracker states judged at encoding time (iTrack): its
    /// subscriptions' views carry the node's `[itrack]` thresholds.
    fn shows_tracker_states(&self) -> bool {
        false
    }

    /// Checks the upgrade request's query before anything else (an Atmosphere transport
    /// other than `websocket`): the HTTP status and message of a refusal.
    /// `query`: the request's query parameters, decoded, in order.
    fn check_handshake(&self, _query: &[(String, String)]) -> Result<(), (u16, String)> {
        Ok(())
    }

    /// Bytes sent right after the upgrade, before anything else (the Atmosphere
    /// handshake frame of iTrack). `heartbeat_ms` is the server's heartbeat interval.
    fn greeting(&self, _heartbeat_ms: u64) -> Option<Vec<u8>> {
        None
    }

    /// A channel a subscription to `channel` also covers, silently (Valtronics shows
    /// positions as telemetry, so its `telemetry` also subscribes `vehicle_locations`).
    fn companion(&self, _channel: Channel) -> Option<Channel> {
        None
    }

    /// Whether a subscription to a state channel starts with the last known value of each
    /// entity (a snapshot). Telematics data is live only, as its API says.
    fn snapshot_on_subscribe(&self) -> bool {
        true
    }

    /// Dev mode's ready-to-paste line for this dialect: where a client of `host` (e.g.
    /// `127.0.0.1:8000`) connects and how it presents the API `key` of fleet `fleet`.
    fn dev_hint(&self, host: &str, key: &str, fleet: &str) -> String;
}
