//! The store: accepting a publication and positioning a subscription, as plain code driven
//! by the caller's clock (no sockets, no threads, no clock reads).
//!
//! Accepting covers the device's trip binding, publish-id dedup, the per-vehicle location
//! interval, the entity bound, then under the (tenant, channel) lock: `seq`, encode once,
//! last known state, history, the alert counts, and the hand-over to the shards that have
//! subscribers (`route`, called under the lock so each shard sees a channel in order).
//! Subscribing takes the same lock to set the shard's interest, read the stream position
//! and copy the snapshot or the history after `since`, with the fence that keeps events in
//! flight from arriving twice.
//!
//! Anything may hand the store a publication: a shard for a WebSocket or HTTP publish,
//! the derived-metrics timer, and later a cluster bridge.

pub mod derived;

use crate::config::{HistoryConfig, Limits};
use crate::dialect::native::ProtoError;
use crate::event::{Event, Publication};
use crate::hub::{ChannelHub, Hubs, TenantHub};
use crate::limit::Limit;
use crate::model::{Channel, Severity};
use crate::session::{Fence, Now, Selection};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

/// Where a publication's id is deduplicated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dedup {
    /// In this node's window (`history.dedup_window_ms`).
    Node,
    /// By the cluster's stream (its duplicate window, keyed by the NATS message id),
    /// which spans nodes and records an id only once the event is stored: a node-local
    /// record would answer a retry of a publication the stream never stored `duplicate`.
    Stream,
}

/// What became of one publication.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Published {
    Accepted {
        seq: u64,
    },
    Duplicate,
    Refused(ProtoError),
    /// Cluster mode, event channels: handed to the stream; the outcome comes back for
    /// this ticket (the shard answers the publisher then).
    Pending {
        ticket: u64,
    },
}

/// A position at or below this speed (km/h) is at rest: GPS speed jitters around zero.
pub const AT_REST_KMH: f64 = 1.0;

/// What the store counted while accepting (the caller adds it to its metrics).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counted {
    pub breach: Option<Limit>,
    pub duplicate: bool,
    pub rate_limited: bool,
    /// Payload bytes of an accepted event.
    pub accepted_bytes: usize,
}

/// A subscription positioned in its stream.
#[derive(Debug, Default)]
pub struct Positioned {
    pub epoch: u64,
    /// `seq` of the last event of the stream when the subscription took effect.
    pub position: u64,
    /// State channels: the last known value of every selected entity, oldest first.
    pub snapshot: Vec<Arc<Event>>,
    /// Event channels with `since`: the events after it (`None`: not recoverable).
    pub replay: Option<Vec<Arc<Event>>>,
    /// Events in flight up to here were sent by the snapshot or the replay.
    pub fence: Fence,
    /// Cluster mode: the channel is not synced from the cluster yet; nothing above is
    /// filled in, and the subscription is positioned again once it is.
    pub waiting: bool,
    /// The node had no subscriber of the channel before (cluster interest begins).
    pub gained: bool,
}

/// How an event from another node is taken in (cluster mode).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ingest {
    /// A live state or metrics update: recorded and routed.
    Live,
    /// A last known value loaded from the cluster's bucket: recorded if newer than the
    /// state held, routed only then and once the channel is synced.
    Load,
    /// An event-channel event at its stream position: mirrored (history), routed once
    /// the channel is synced (the backlog before is history, not news).
    Stream { seq: u64, epoch: u64 },
}

/// The shard a subscription is on, and whether it had no interest in the channel before
/// (it then joins the channel's shard mask).
#[derive(Debug, Clone, Copy)]
pub struct Joining {
    pub shard: usize,
    pub first: bool,
    /// Cluster mode: wait (`Positioned::waiting`) while the channel is not synced.
    pub wait_sync: bool,
}

/// A page of history (HTTP polling).
#[derive(Debug)]
pub struct HistoryPage {
    pub epoch: u64,
    pub seq: u64,
    pub recovered: bool,
    pub events: Vec<Arc<Event>>,
}

/// The store's view of the node: the tenant registry and the limits it applies.
pub struct Store<'a> {
    pub hubs: &'a Hubs,
    pub limits: &'a Limits,
    pub history: &'a HistoryConfig,
    /// Units of metrics published as bare numbers (`telemetry.units`).
    pub units: Option<&'a HashMap<String, String>>,
}

impl<'a> Store<'a> {
    pub fn new(hubs: &'a Hubs, limits: &'a Limits, history: &'a HistoryConfig) -> Store<'a> {
        Store {
            hubs,
            limits,
            history,
            units: None,
        }
    }

    /// Gives metrics published as bare numbers their unit from this table.
    pub fn with_units(mut self, units: &'a HashMap<String, String>) -> Store<'a> {
        self.units = Some(units);
        self
    }

    /// Accepts one validated publication for `hub` at `now`. `fresh_id` is the event id
    /// used when the publisher gave none. `route(event, shard_mask)` is called under the
    /// channel's lock with every shard that has subscribers.
    pub fn accept(
        &self,
        hub: &TenantHub,
        p: Publication,
        fresh_id: &[u8],
        now: Now,
        counted: &mut Counted,
        route: impl FnOnce(&Arc<Event>, u64),
    ) -> Published {
        let mut p = p;
        let recorded = match self.admit(hub, &mut p, now, counted, Dedup::Node) {
            Ok(recorded) => recorded,
            Err(out) => return out,
        };
        let out = self.commit(hub, p, fresh_id, now, counted, route);
        if let (Published::Refused(_), Some(key)) = (&out, recorded) {
            // Refused after its id was recorded (a limit): the retry is a new attempt.
            hub.dedup.lock().forget(key);
        }
        out
    }

    /// The checks before a publication takes a position: units of bare metrics, the
    /// device's trip binding, publish-id dedup (`dedup`), and a trip event binding its
    /// vehicle. In cluster mode an event-channel publication that passes them goes to the
    /// stream, which gives it its position. Returns the key of the id recorded in the
    /// node's window, if one was ([`crate::hub::Dedup::forget`] it if the publication is
    /// then refused).
    pub fn admit(
        &self,
        hub: &TenantHub,
        p: &mut Publication,
        now: Now,
        counted: &mut Counted,
        dedup: Dedup,
    ) -> Result<Option<u64>, Published> {
        if let Some(units) = self.units {
            for m in p.canon.metrics.iter_mut().filter(|m| m.unit.is_none()) {
                m.unit = units.get(&*m.name).map(|u| u.as_str().into());
            }
        }
        let channel = p.channel;
        if p.bind_check != Default::default() {
            let bindings = hub.bindings.lock();
            let vehicle = p.keys.vehicle.as_deref().unwrap_or("");
            if p.bind_check.trip && p.keys.trip.as_deref() != bindings.trip_of(vehicle) {
                return Err(Published::Refused(ProtoError::forbidden(
                    "trip_id",
                    "trip is neither in the device's credential nor its vehicle's current trip",
                )));
            }
            if p.bind_check.driver && p.keys.driver.as_deref() != bindings.driver_of(vehicle) {
                return Err(Published::Refused(ProtoError::forbidden(
                    "driver_id",
                    "driver is neither in the device's credential nor on its vehicle's \
                     current trip",
                )));
            }
        }
        let mut recorded = None;
        if let (Some(id), Dedup::Node) = (&p.id, dedup) {
            recorded = hub.dedup.lock().record(
                &[p.publisher.as_bytes(), &[channel as u8], id],
                now.mono,
                self.history.dedup_window(),
                self.history.dedup_max_ids,
            );
            if recorded.is_none() {
                counted.duplicate = true;
                return Err(Published::Duplicate);
            }
        }
        self.bind_trip(hub, p);
        Ok(recorded)
    }

    /// A trip event naming a vehicle, a trip (and a driver) binds them.
    fn bind_trip(&self, hub: &TenantHub, p: &Publication) {
        if p.channel == Channel::TripEvents
            && let (Some(v), Some(t)) = (p.keys.vehicle.as_deref(), p.keys.trip.as_deref())
        {
            hub.bindings.lock().bind(
                v,
                t,
                p.keys.driver.as_deref(),
                self.limits.max_vehicles_per_tenant,
            );
        }
    }

    /// Under the channel's lock: the entity bound, the location interval, then the
    /// position, state, history and hand-over.
    fn commit(
        &self,
        hub: &TenantHub,
        p: Publication,
        fresh_id: &[u8],
        now: Now,
        counted: &mut Counted,
        route: impl FnOnce(&Arc<Event>, u64),
    ) -> Published {
        let channel = p.channel;
        let interval = self.limits.location_update_interval();
        let mut ch = hub.channel(channel).lock();
        if ch.would_exceed(channel, &p.keys, self.limits.max_vehicles_per_tenant) {
            drop(ch);
            let l = Limit::VehiclesPerTenant;
            counted.breach = Some(l);
            return Published::Refused(ProtoError::new(l.code(), l.message()));
        }
        if channel == Channel::VehicleLocations
            && !interval.is_zero()
            && ch.accepted_within(&p.keys, now.mono, interval)
        {
            drop(ch);
            counted.breach = Some(Limit::LocationRate);
            counted.rate_limited = true;
            return Published::Refused(ProtoError::new(
                429,
                "at most one location update per vehicle per interval",
            ));
        }
        let ev = self.next_event(&mut ch, &hub.id, p, fresh_id, now);
        ch.record_state(&ev);
        ch.record_history(&ev, self.history.max_events, self.history.max_age());
        if channel == Channel::FleetMetrics {
            ch.published_metrics = Some(ev.clone());
        }
        if channel == Channel::Alerts
            && let Some(severity) = ev.severity.as_deref().and_then(Severity::parse)
        {
            ch.count_alert(self.hubs.minute(now.mono), severity);
        }
        route(&ev, ch.shard_mask);
        drop(ch);
        counted.accepted_bytes = ev.payload.len();
        Published::Accepted { seq: ev.seq }
    }

    /// Publishes an event the broker made itself (derived metrics, system status): seq,
    /// encode once, hand-over. No state, history or dedup: it is recomputed every interval.
    pub fn broadcast(
        &self,
        hub: &TenantHub,
        p: Publication,
        fresh_id: &[u8],
        now: Now,
        route: impl FnOnce(&Arc<Event>, u64),
    ) {
        let mut ch = hub.channel(p.channel).lock();
        let ev = self.next_event(&mut ch, &hub.id, p, fresh_id, now);
        route(&ev, ch.shard_mask);
    }

    /// Takes in an event another node accepted (cluster mode), as `how` says, and hands it
    /// to this node's shards with subscribers. Returns whether it was taken (an event the
    /// stream mirror already holds, or a loaded value older than the state held, is not).
    pub fn ingest(
        &self,
        hub: &TenantHub,
        p: Publication,
        id: &[u8],
        how: Ingest,
        now: Now,
        route: impl FnOnce(&Arc<Event>, u64),
    ) -> bool {
        let channel = p.channel;
        self.bind_trip(hub, &p);
        let mut ch = hub.channel(channel).lock();
        let live = match how {
            Ingest::Live => true,
            Ingest::Load => {
                if ch.is_older(channel, &p.keys, p.ts_ms) {
                    return false;
                }
                // Newer than what the node held: an update it missed, for subscribers
                // already following the channel (after a reconnect).
                ch.synced
            }
            Ingest::Stream { seq, epoch } => {
                if ch.epoch != Some(epoch) {
                    ch.reset_stream(epoch);
                }
                if seq <= ch.seq {
                    return false;
                }
                if seq != ch.seq + 1 {
                    ch.clear_history();
                }
                ch.seq = seq - 1;
                ch.synced
            }
        };
        let ev = self.next_event(&mut ch, &hub.id, p, id, now);
        ch.record_state(&ev);
        ch.record_history(&ev, self.history.max_events, self.history.max_age());
        if channel == Channel::FleetMetrics {
            ch.published_metrics = Some(ev.clone());
        }
        if channel == Channel::Alerts
            && let Some(severity) = ev.severity.as_deref().and_then(Severity::parse)
        {
            // A backlog event counts in the minute it happened (by its own time), if
            // within the hour the summary covers.
            let age_min = (now.unix_ms.saturating_sub(ev.ts_ms).max(0) / 60_000) as u64;
            if age_min < 60 {
                ch.count_alert(self.hubs.minute(now.mono).saturating_sub(age_min), severity);
            }
        }
        if live {
            route(&ev, ch.shard_mask);
        }
        true
    }

    /// Cluster mode: the channel now holds the cluster's view and follows it live; returns
    /// the shards whose subscriptions wait for that.
    pub fn mark_synced(&self, hub: &TenantHub, channel: Channel) -> u64 {
        let mut ch = hub.channel(channel).lock();
        ch.synced = true;
        ch.shard_mask
    }

    /// Cluster mode: the node stops following the channel, unless interest came back.
    /// Returns whether it stopped.
    pub fn mark_unsynced(&self, hub: &TenantHub, channel: Channel) -> bool {
        let mut ch = hub.channel(channel).lock();
        if ch.shard_mask == 0 {
            ch.synced = false;
        }
        !ch.synced
    }

    /// Whether any shard of this node has subscribers of the channel.
    pub fn interested(&self, hub: &TenantHub, channel: Channel) -> bool {
        hub.channel(channel).lock().shard_mask != 0
    }

    /// The stream's next position, and the publication encoded once at it.
    fn next_event(
        &self,
        ch: &mut ChannelHub,
        tenant: &Arc<str>,
        p: Publication,
        fresh_id: &[u8],
        now: Now,
    ) -> Arc<Event> {
        ch.seq += 1;
        // A status change names the status it replaces (Valtronics `old_status`).
        let prev_status = p
            .status
            .as_ref()
            .and_then(|_| p.keys.state_key(p.channel))
            .and_then(|k| ch.last_of(k))
            .and_then(|prev| prev.status.clone());
        // A position at rest says since when the vehicle has been at rest (iTrack
        // `movement_status`): its previous position's, if that was at rest too.
        let stopped_since_ms = p.canon.location.and_then(|loc| {
            if loc.speed_kmh.unwrap_or(0.0) > AT_REST_KMH {
                return None;
            }
            let prev = p.keys.state_key(p.channel).and_then(|k| ch.last_of(k));
            Some(
                prev.and_then(|e| e.stopped_since_ms)
                    .unwrap_or(p.ts_ms)
                    .min(p.ts_ms),
            )
        });
        let epoch = ch.epoch.unwrap_or(self.hubs.epoch);
        let mut ev = Event::encode(tenant.clone(), p, ch.seq, epoch, fresh_id, now.mono);
        ev.prev_status = prev_status;
        ev.stopped_since_ms = stopped_since_ms;
        Arc::new(ev)
    }

    /// Positions a subscription of shard `shard` on `channel`: when `first` (the shard had
    /// no interest in it before) the shard joins the channel's mask; then the snapshot of
    /// `selection` (state channels) or the replay after `since` (event channels), all under
    /// the channel's lock.
    pub fn subscribe(
        &self,
        hub: &TenantHub,
        channel: Channel,
        shard: Joining,
        selection: &Selection,
        since: Option<(u64, u64)>,
        now: Now,
    ) -> Positioned {
        let Joining {
            shard,
            first,
            wait_sync,
        } = shard;
        let mut ch = hub.channel(channel).lock();
        let gained = first && ch.shard_mask == 0;
        if first {
            ch.shard_mask |= 1 << shard;
        }
        if wait_sync && !ch.synced && (channel.is_state() || channel.is_event()) {
            return Positioned {
                waiting: true,
                gained,
                ..Default::default()
            };
        }
        let epoch = ch.epoch.unwrap_or(self.hubs.epoch);
        let position = ch.seq;
        let (snapshot, mut fence) = if channel.is_state() {
            ch.snapshot(selection)
        } else {
            Default::default()
        };
        // Cluster mode: a mirror that is not synced (its sync timed out) may lack events
        // of the stream; a replay from it is not a recovery.
        let complete = ch.epoch.is_none() || ch.synced;
        let replay = match since {
            Some((e, seq)) if channel.is_event() && e == epoch && complete => {
                ch.replay_after(seq, now.mono, self.history.max_age())
            }
            _ => None,
        };
        drop(ch);
        // Events still in flight up to `position` were replayed: skip them.
        if replay.is_some() {
            fence = Fence {
                max: position,
                all: true,
                ..Default::default()
            };
        }
        Positioned {
            epoch,
            position,
            snapshot,
            replay,
            fence,
            waiting: false,
            gained,
        }
    }

    /// Shard `shard` lost its last subscriber of `channel` if `still_interested` says so
    /// (asked under the channel's lock, so no subscribe of that shard races it). Returns
    /// true when no shard of the node is interested any more.
    pub fn leave(
        &self,
        hub: &TenantHub,
        channel: Channel,
        shard: usize,
        still_interested: impl FnOnce() -> bool,
    ) -> bool {
        let mut ch = hub.channel(channel).lock();
        if !still_interested() {
            let had = ch.shard_mask != 0;
            ch.shard_mask &= !(1 << shard);
            return had && ch.shard_mask == 0;
        }
        false
    }

    /// The last known value of every entity in `selection`.
    pub fn snapshot(
        &self,
        hub: &TenantHub,
        channel: Channel,
        selection: &Selection,
    ) -> Vec<Arc<Event>> {
        hub.channel(channel).lock().snapshot(selection).0
    }

    /// The kept events after `since` (of epoch `epoch`, when given), and whether they
    /// follow `since` without a gap.
    pub fn history(
        &self,
        hub: &TenantHub,
        channel: Channel,
        since: u64,
        epoch: Option<u64>,
        now: Now,
    ) -> HistoryPage {
        let our_epoch = self.hubs.epoch;
        let max_age: Duration = self.history.max_age();
        let ch = hub.channel(channel).lock();
        let same_epoch = epoch.is_none_or(|e| e == our_epoch);
        let recovered = same_epoch && ch.replay_after(since, now.mono, max_age).is_some();
        let events = ch.history_after(if same_epoch { since } else { 0 }, now.mono, max_age);
        HistoryPage {
            epoch: our_epoch,
            seq: ch.seq,
            recovered,
            events,
        }
    }
}

#[cfg(test)]
mod tests {
    //! The store driven by a fake clock: no sockets, no sleeps.
    use super::*;
    use crate::event::BindCheck;
    use crate::model::EntityKeys;
    use std::time::Instant;

    struct Fixture {
        hubs: Hubs,
        limits: Limits,
        history: HistoryConfig,
        t0: Instant,
    }

    impl Fixture {
        fn new() -> Fixture {
            Fixture {
                hubs: Hubs::new(7),
                limits: Limits::default(),
                history: HistoryConfig::default(),
                t0: Instant::now(),
            }
        }
        fn store(&self) -> Store<'_> {
            Store::new(&self.hubs, &self.limits, &self.history)
        }
        fn at(&self, ms: u64) -> Now {
            Now {
                mono: self.t0 + Duration::from_millis(ms),
                unix_ms: 1_800_000_000_000 + ms as i64,
            }
        }
        /// Accepts `p` at `ms`; returns the outcome and the shard mask it was routed to.
        fn accept(&self, p: Publication, ms: u64) -> (Published, Option<u64>) {
            let hub = self.hubs.tenant("fleet_a");
            let mut routed = None;
            let mut counted = Counted::default();
            let out =
                self.store()
                    .accept(&hub, p, b"\"fresh\"", self.at(ms), &mut counted, |_, m| {
                        routed = Some(m)
                    });
            (out, routed)
        }
    }

    fn join(shard: usize) -> Joining {
        Joining {
            shard,
            first: true,
            wait_sync: false,
        }
    }

    fn publication(channel: Channel, vehicle: &str, id: Option<&str>, ts_ms: i64) -> Publication {
        Publication {
            channel,
            id: id.map(|i| format!("\"{i}\"").into_bytes()),
            payload: b"{}".to_vec(),
            keys: EntityKeys {
                vehicle: Some(vehicle.into()),
                trip: None,
                driver: None,
            },
            severity: (channel == Channel::Alerts).then(|| "high".into()),
            canon: Default::default(),
            category: None,
            status: None,
            timestamp: "t".into(),
            ts_ms,
            ack: false,
            publisher: "svc".into(),
            bind_check: BindCheck::default(),
        }
    }

    #[test]
    fn dedup_window_per_publisher_and_channel() {
        let f = Fixture::new();
        let alert = |id, ms| {
            f.accept(publication(Channel::Alerts, "v1", Some(id), 0), ms)
                .0
        };
        assert_eq!(alert("a", 0), Published::Accepted { seq: 1 });
        assert_eq!(alert("a", 59_000), Published::Duplicate);
        // Another channel, or another publisher, may use the same id.
        let mut t = publication(Channel::Telemetry, "v1", Some("a"), 0);
        assert!(matches!(f.accept(t, 1).0, Published::Accepted { .. }));
        let mut other = publication(Channel::Alerts, "v1", Some("a"), 0);
        other.publisher = "device-9".into();
        assert!(matches!(f.accept(other, 2).0, Published::Accepted { .. }));
        // Forgotten after two windows.
        assert!(matches!(alert("a", 121_000), Published::Accepted { .. }));
        t = publication(Channel::Telemetry, "v1", None, 0);
        assert!(matches!(f.accept(t, 3).0, Published::Accepted { .. }));
    }

    #[test]
    fn a_refused_publication_leaves_no_id_behind() {
        let f = Fixture::new();
        let loc = |id, ms| {
            f.accept(
                publication(Channel::VehicleLocations, "v1", Some(id), 0),
                ms,
            )
            .0
        };
        assert!(matches!(loc("p1", 0), Published::Accepted { .. }));
        // Refused by the location interval: its id is not taken, so the retry is stored
        // (not answered `duplicate` and lost).
        assert!(matches!(loc("p2", 500), Published::Refused(e) if e.code == 429));
        assert!(matches!(loc("p2", 1_000), Published::Accepted { .. }));
        assert_eq!(loc("p2", 1_500), Published::Duplicate);
        assert_eq!(loc("p1", 2_500), Published::Duplicate, "p1 still seen");
    }

    #[test]
    fn an_unsynced_cluster_mirror_recovers_nothing() {
        let f = Fixture::new();
        let hub = f.hubs.tenant("fleet_a");
        hub.channel(Channel::Alerts).lock().reset_stream(5);
        let sub = |f: &Fixture| {
            f.store().subscribe(
                &hub,
                Channel::Alerts,
                join(0),
                &Selection::default(),
                Some((5, 0)),
                f.at(0),
            )
        };
        // The stream's epoch, position 0, nothing mirrored yet: not "recovered".
        let p = sub(&f);
        assert_eq!((p.epoch, p.position), (5, 0));
        assert!(p.replay.is_none());
        f.store().mark_synced(&hub, Channel::Alerts);
        assert_eq!(
            sub(&f).replay.map(|r| r.len()),
            Some(0),
            "synced: up to date"
        );
    }

    #[test]
    fn one_location_per_vehicle_per_interval() {
        let f = Fixture::new();
        let loc = |v: &str, ms| {
            f.accept(publication(Channel::VehicleLocations, v, None, 0), ms)
                .0
        };
        assert!(matches!(loc("v1", 0), Published::Accepted { .. }));
        assert!(matches!(loc("v1", 999), Published::Refused(e) if e.code == 429));
        assert!(matches!(loc("v2", 999), Published::Accepted { .. }));
        assert!(matches!(loc("v1", 1_000), Published::Accepted { .. }));
    }

    #[test]
    fn history_age_and_replay_with_fence() {
        let mut f = Fixture::new();
        f.history.max_events = 5;
        let hub = f.hubs.tenant("fleet_a");
        for i in 0..8u64 {
            let (out, _) = f.accept(publication(Channel::Alerts, "v1", None, 0), i * 1000);
            assert_eq!(out, Published::Accepted { seq: i + 1 });
        }
        let store = f.store();
        let sub = |since, ms| {
            store.subscribe(
                &hub,
                Channel::Alerts,
                join(0),
                &Selection::default(),
                since,
                f.at(ms),
            )
        };
        // Held: seq 4..8; a gap after 5 is replayed, fenced up to the position.
        let p = sub(Some((7, 5)), 8_000);
        let seqs: Vec<u64> = p.replay.unwrap().iter().map(|e| e.seq).collect();
        assert_eq!((seqs, p.position), (vec![6, 7, 8], 8));
        assert!(p.fence.all && p.fence.max == 8);
        // Seq 3 is gone; another epoch is not this stream.
        assert!(sub(Some((7, 2)), 8_000).replay.is_none());
        assert!(sub(Some((6, 7)), 8_000).replay.is_none());
        // Past max_age (10 min) nothing is replayed.
        assert!(sub(Some((7, 5)), 8_000 + 601_000).replay.is_none());
        // Polling sees the same, with `recovered`.
        let page = store.history(&hub, Channel::Alerts, 5, Some(7), f.at(8_000));
        assert!(page.recovered && page.events.len() == 3 && page.seq == 8);
        let page = store.history(&hub, Channel::Alerts, 1, None, f.at(8_000));
        assert!(!page.recovered && page.events.len() == 5);
    }

    #[test]
    fn snapshot_keeps_the_newest_state_and_fences_it() {
        let f = Fixture::new();
        let hub = f.hubs.tenant("fleet_a");
        f.store().subscribe(
            &hub,
            Channel::VehicleLocations,
            join(1),
            &Selection::default(),
            None,
            f.at(0),
        );
        let loc =
            |v: &str, ts, ms| f.accept(publication(Channel::VehicleLocations, v, None, ts), ms);
        assert_eq!(
            loc("v1", 100, 0),
            (Published::Accepted { seq: 1 }, Some(0b10))
        );
        loc("v2", 100, 1_000);
        // A late, older update is routed but does not replace the state.
        loc("v1", 50, 2_000);
        let all = Selection {
            all: true,
            ..Default::default()
        };
        let p = f.store().subscribe(
            &hub,
            Channel::VehicleLocations,
            join(0),
            &all,
            None,
            f.at(3_000),
        );
        let got: Vec<(u64, i64)> = p.snapshot.iter().map(|e| (e.seq, e.ts_ms)).collect();
        assert_eq!(got, vec![(1, 100), (2, 100)]);
        assert_eq!((p.fence.max, p.fence.seqs.get("v1")), (3, Some(&1)));
        // Shard 0 joined the mask: the next event goes to both shards.
        assert_eq!(loc("v3", 100, 4_000).1, Some(0b11));
        f.store()
            .leave(&hub, Channel::VehicleLocations, 1, || false);
        assert_eq!(loc("v4", 100, 5_000).1, Some(0b01));
    }

    #[test]
    fn trips_bind_drivers_and_trips_to_vehicles() {
        let f = Fixture::new();
        let loc = |trip: &str| {
            let mut p = publication(Channel::VehicleLocations, "v1", None, 0);
            p.keys.trip = Some(trip.into());
            p.bind_check.trip = true;
            p
        };
        let refused = |p: Publication, ms| matches!(f.accept(p, ms).0, Published::Refused(e) if e.code == 403);
        assert!(refused(loc("t9"), 0));
        let mut trip = publication(Channel::TripEvents, "v1", None, 0);
        trip.keys.trip = Some("t9".into());
        trip.keys.driver = Some("d7".into());
        assert!(matches!(f.accept(trip, 1).0, Published::Accepted { .. }));
        assert!(!refused(loc("t9"), 2_000));
        assert!(refused(loc("t8"), 4_000));
        let mut driver = publication(Channel::DriverStatus, "v1", None, 0);
        driver.keys.driver = Some("d7".into());
        driver.bind_check.driver = true;
        assert!(matches!(
            f.accept(driver, 5_000).0,
            Published::Accepted { .. }
        ));
    }

    #[test]
    fn bare_metrics_get_the_configured_unit_and_status_changes_name_the_old_status() {
        use crate::event::Metric;
        let f = Fixture::new();
        let units = crate::config::TelemetryConfig::default().units;
        let hub = f.hubs.tenant("fleet_a");
        let seen = std::cell::RefCell::new(Vec::new());
        let accept = |p: Publication, ms: u64| {
            let mut counted = Counted::default();
            f.store().with_units(&units).accept(
                &hub,
                p,
                b"\"fresh\"",
                f.at(ms),
                &mut counted,
                |ev, _| seen.borrow_mut().push(ev.clone()),
            )
        };
        let mut t = publication(Channel::Telemetry, "v1", None, 0);
        let metric = |name: &str, unit: Option<&str>| Metric {
            name: name.into(),
            value: "1".into(),
            unit: unit.map(Into::into),
        };
        t.canon.metrics = vec![
            metric("temperature", None),
            metric("fuel_level", Some("l")),
            metric("flux", None),
        ];
        assert!(matches!(accept(t, 0), Published::Accepted { .. }));
        let units_seen: Vec<Option<Box<str>>> = seen.borrow()[0]
            .canon
            .metrics
            .iter()
            .map(|m| m.unit.clone())
            .collect();
        assert_eq!(units_seen, vec![Some("°C".into()), Some("l".into()), None]);
        for (ms, status) in [(1, "online"), (2, "offline")] {
            let mut s = publication(Channel::DeviceStatus, "v1", None, ms as i64);
            s.status = Some(status.into());
            assert!(matches!(accept(s, ms), Published::Accepted { .. }));
        }
        let olds: Vec<Option<Box<str>>> = seen.borrow()[1..]
            .iter()
            .map(|e| e.prev_status.clone())
            .collect();
        assert_eq!(olds, vec![None, Some("online".into())]);
    }
}
