//! Node-wide, per-tenant state that every shard reads: for each (tenant, channel), the set
//! of shards with subscribers, the stream's sequence counter and the last known state.
//!
//! Each (tenant, channel) has its own small lock, held for a hash insert and a few queue
//! pushes; there is no lock over all tenants on the message path (a connection resolves
//! its tenant once, at authentication). Taking the same lock for publish (seq, state,
//! fan-out to shard queues) and for subscribe (mask, snapshot, fence) is what makes the
//! switch from snapshot to live free of gaps and duplicates.

use crate::event::Event;
use crate::model::Channel;
use crate::session::{Fence, Selection};
use parking_lot::{Mutex, RwLock};
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Debug, Default)]
pub struct ChannelHub {
    /// Bit i set: shard i has at least one subscriber.
    pub shard_mask: u64,
    /// Seq of the last accepted event.
    pub seq: u64,
    /// Last known state per entity (state channels only).
    last: HashMap<Box<str>, Arc<Event>>,
    /// The newest events, oldest first (event channels only).
    history: VecDeque<Arc<Event>>,
    /// Alerts per minute by severity (low..critical), the last hour (`alerts` only).
    alert_minutes: VecDeque<(u64, [u32; 4])>,
    /// The last `fleet_metrics` a service published, merged into the derived ones.
    pub published_metrics: Option<Arc<Event>>,
    /// Cluster mode, event channels: the epoch of the JetStream stream this channel's
    /// `seq` and history mirror (the same on every node). `None`: the node's own epoch.
    pub epoch: Option<u64>,
    /// Cluster mode, event channels: the creation time (UNIX ms) of the stream mirrored.
    /// `epoch` is the same unless the stream lost events this node had delivered (a
    /// rewind): the events after that point then carry a new epoch.
    pub stream_created: Option<u64>,
    /// Cluster mode: the node holds the cluster's view of this channel (last known state
    /// loaded from the bucket, history from the stream) and follows it live.
    pub synced: bool,
}

impl ChannelHub {
    /// The last known state of entity `key` (state channels).
    pub fn last_of(&self, key: &str) -> Option<&Arc<Event>> {
        self.last.get(key)
    }

    /// Records `ev` as last known state if it is the newest for its entity by its own
    /// timestamp. An older, late event is still delivered but does not overwrite.
    /// Returns whether it did.
    pub fn record_state(&mut self, ev: &Arc<Event>) -> bool {
        if !ev.channel.is_state() {
            return false;
        }
        let Some(key) = ev.keys.state_key(ev.channel) else {
            return false;
        };
        match self.last.get_mut(key) {
            Some(cur) if cur.ts_ms > ev.ts_ms => false,
            Some(cur) => {
                *cur = ev.clone();
                true
            }
            None => {
                self.last.insert(key.into(), ev.clone());
                true
            }
        }
    }

    /// Whether an event for the entity of `keys` at `ts_ms` would be older than the state
    /// held (a value loaded from the cluster that the node already has newer).
    pub fn is_older(&self, channel: Channel, keys: &crate::model::EntityKeys, ts_ms: i64) -> bool {
        keys.state_key(channel)
            .and_then(|k| self.last.get(k))
            .is_some_and(|cur| cur.ts_ms >= ts_ms)
    }

    /// The last known value of every entity in `sel`, and the fence that keeps events
    /// already in flight from being delivered twice.
    pub fn snapshot(&self, sel: &Selection) -> (Vec<Arc<Event>>, Fence) {
        let mut out = Vec::new();
        let mut fence = Fence {
            max: self.seq,
            ..Fence::default()
        };
        let mut take = |k: &str, ev: &Arc<Event>| {
            fence.seqs.insert(k.into(), ev.seq);
            out.push(ev.clone());
        };
        if !sel.all && sel.trips.is_empty() && sel.drivers.is_empty() {
            for v in &sel.vehicles {
                if let Some(ev) = self.last.get(&**v) {
                    take(v, ev);
                }
            }
        } else {
            for (k, ev) in &self.last {
                if sel.matches(&ev.keys) {
                    take(k, ev);
                }
            }
        }
        out.sort_by_key(|e| e.seq);
        (out, fence)
    }

    /// Whether recording `keys` as state would add an entity beyond `max` entities.
    pub fn would_exceed(
        &self,
        channel: Channel,
        keys: &crate::model::EntityKeys,
        max: usize,
    ) -> bool {
        channel.is_state()
            && self.last.len() >= max
            && keys
                .state_key(channel)
                .is_some_and(|k| !self.last.contains_key(k))
    }

    /// Whether the entity of `keys` had an event accepted less than `interval` before `now`.
    pub fn accepted_within(
        &self,
        keys: &crate::model::EntityKeys,
        now: std::time::Instant,
        interval: std::time::Duration,
    ) -> bool {
        keys.vehicle
            .as_deref()
            .and_then(|v| self.last.get(v))
            .is_some_and(|ev| now.saturating_duration_since(ev.accepted_at) < interval)
    }

    /// Appends an event-channel event to the history, dropping what is over `max_events`
    /// or older than `max_age`.
    pub fn record_history(&mut self, ev: &Arc<Event>, max_events: usize, max_age: Duration) {
        if !ev.channel.is_event() || max_events == 0 {
            return;
        }
        self.history.push_back(ev.clone());
        while self.history.len() > max_events
            || self
                .history
                .front()
                .is_some_and(|e| ev.accepted_at.saturating_duration_since(e.accepted_at) > max_age)
        {
            self.history.pop_front();
        }
    }

    /// The events after `seq`, if history still holds all of them (`None`: the gap is
    /// older than the history, or `seq` is not a position of this stream).
    pub fn replay_after(
        &self,
        seq: u64,
        now: Instant,
        max_age: Duration,
    ) -> Option<Vec<Arc<Event>>> {
        if seq > self.seq {
            return None;
        }
        if seq == self.seq {
            return Some(Vec::new());
        }
        let kept = self
            .history
            .iter()
            .skip_while(|e| now.saturating_duration_since(e.accepted_at) > max_age);
        let first = kept.clone().next()?;
        if first.seq > seq + 1 {
            return None;
        }
        Some(kept.filter(|e| e.seq > seq).cloned().collect())
    }

    /// The kept events after `seq` (HTTP polling), whether or not a gap precedes them.
    pub fn history_after(&self, seq: u64, now: Instant, max_age: Duration) -> Vec<Arc<Event>> {
        self.history
            .iter()
            .filter(|e| e.seq > seq && now.saturating_duration_since(e.accepted_at) <= max_age)
            .cloned()
            .collect()
    }

    /// Counts an alert of `severity` in minute `minute` (minutes since the node started).
    pub fn count_alert(&mut self, minute: u64, severity: crate::model::Severity) {
        match self.alert_minutes.back_mut() {
            Some((m, counts)) if *m == minute => counts[severity as usize] += 1,
            _ => {
                let mut counts = [0; 4];
                counts[severity as usize] = 1;
                self.alert_minutes.push_back((minute, counts));
            }
        }
        while self
            .alert_minutes
            .front()
            .is_some_and(|(m, _)| m + 60 <= minute)
        {
            self.alert_minutes.pop_front();
        }
    }

    /// Alerts by severity over the hour before minute `now_minute`.
    pub fn alerts_last_hour(&self, now_minute: u64) -> [u32; 4] {
        let mut sum = [0; 4];
        for (m, counts) in &self.alert_minutes {
            if m + 60 > now_minute {
                for i in 0..4 {
                    sum[i] += counts[i];
                }
            }
        }
        sum
    }

    /// The last known events (for derived metrics).
    pub fn states(&self) -> impl Iterator<Item = &Arc<Event>> {
        self.last.values()
    }

    /// Starts mirroring the stream of `epoch` afresh (a new stream: positions restart).
    pub fn reset_stream(&mut self, epoch: u64) {
        self.epoch = Some(epoch);
        self.seq = 0;
        self.history.clear();
    }

    /// The newest `n` events of the history, newest first: (seq, raw JSON id, own time),
    /// what the cluster bridge compares with the stream's messages at those positions.
    pub fn newest_ids(&self, n: usize) -> Vec<(u64, Vec<u8>, i64)> {
        self.history
            .iter()
            .rev()
            .take(n)
            .map(|e| {
                let id = crate::json::member(e.json(), "id").unwrap_or(b"null");
                (e.seq, id.to_vec(), e.ts_ms)
            })
            .collect()
    }

    /// Forgets the history: the events before the next one are not all known.
    pub fn clear_history(&mut self) {
        self.history.clear();
    }

    pub fn history_len(&self) -> usize {
        self.history.len()
    }

    pub fn state_len(&self) -> usize {
        self.last.len()
    }
}

#[derive(Debug)]
pub struct TenantHub {
    pub id: Arc<str>,
    channels: [Mutex<ChannelHub>; Channel::COUNT],
    /// Publish ids seen recently (per tenant, keyed by publisher, channel and id).
    pub dedup: Mutex<Dedup>,
    /// Each vehicle's current trip and driver, from the services' `trip_event`s.
    pub bindings: Mutex<Bindings>,
}

/// A vehicle's current (or last) trip and driver, as the fleet's backend announced them
/// in a `trip_event` naming the vehicle. A device may name these in what it publishes
/// without its credential listing them (docs/operations.md, "Device scope").
#[derive(Debug, Default)]
pub struct Bindings {
    by_vehicle: HashMap<Box<str>, TripBinding>,
}

/// (trip, driver) of one vehicle.
type TripBinding = (Option<Box<str>>, Option<Box<str>>);

impl Bindings {
    /// Binds `trip` (and `driver`, if named) to `vehicle`, for at most `max` vehicles.
    pub fn bind(&mut self, vehicle: &str, trip: &str, driver: Option<&str>, max: usize) {
        if let Some(b) = self.by_vehicle.get_mut(vehicle) {
            *b = (Some(trip.into()), driver.map(Into::into));
        } else if self.by_vehicle.len() < max {
            self.by_vehicle
                .insert(vehicle.into(), (Some(trip.into()), driver.map(Into::into)));
        }
    }

    pub fn trip_of(&self, vehicle: &str) -> Option<&str> {
        self.by_vehicle.get(vehicle).and_then(|b| b.0.as_deref())
    }

    pub fn driver_of(&self, vehicle: &str) -> Option<&str> {
        self.by_vehicle.get(vehicle).and_then(|b| b.1.as_deref())
    }
}

/// Publish ids seen within a window, so a publisher's retry is not delivered twice.
///
/// Ids are kept as 64-bit keyed hashes (SipHash with a per-process random key: a
/// false "duplicate" needs a collision among ~10^5 ids, about 1 in 10^9) in two
/// generations. New ids go into `current`; when it holds `max_ids` ids or is a window
/// old, it becomes `previous` (replacing the old one, whose table is cleared and
/// reused), and `previous` is emptied two windows after it was started. So an id is
/// remembered for at least the window (and at most two), and at least while fewer than
/// `max_ids` newer ids arrived (at most twice as many are kept). No allocation per id,
/// and after warm-up no allocation or rehash at all, which keeps the publish path free
/// of latency spikes (the map of boxed ids it replaced showed up as page faults and
/// rehashes of 10-15 ms at 10 000 publishes/s).
#[derive(Debug, Default)]
pub struct Dedup {
    keys: std::hash::RandomState,
    current: IdSet,
    previous: IdSet,
    current_since: Option<Instant>,
    previous_since: Option<Instant>,
}

type IdSet = std::collections::HashSet<u64, std::hash::BuildHasherDefault<PrehashedId>>;

/// The set's hasher: its keys are already keyed hashes.
#[derive(Debug, Default)]
pub struct PrehashedId(u64);

impl std::hash::Hasher for PrehashedId {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        // Only u64 keys are hashed; fold anything else so the hasher stays total.
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = v;
    }
}

impl Dedup {
    /// Records the id made of `parts` (publisher, channel, id: one publisher can never
    /// suppress another's events); returns true if it was already seen (see the type's
    /// bounds). The store uses [`Dedup::record`], which also gives the key to forget.
    #[cfg(test)]
    pub fn check(
        &mut self,
        parts: &[&[u8]],
        now: Instant,
        window: Duration,
        max_ids: usize,
    ) -> bool {
        self.record(parts, now, window, max_ids).is_none()
    }

    /// Records the id made of `parts` (publisher, channel, id: one publisher can never
    /// suppress another's events) unless already seen (see the type's bounds): returns
    /// its key (for [`Dedup::forget`]), or `None` for a duplicate.
    pub fn record(
        &mut self,
        parts: &[&[u8]],
        now: Instant,
        window: Duration,
        max_ids: usize,
    ) -> Option<u64> {
        use std::hash::{BuildHasher, Hasher};
        let age = |since: Option<Instant>| since.map(|t| now.saturating_duration_since(t));
        if age(self.current_since).is_some_and(|a| a >= window) {
            self.rotate(now);
        }
        if age(self.previous_since).is_some_and(|a| a >= window.saturating_mul(2)) {
            self.previous.clear();
            self.previous_since = None;
        }
        let mut hasher = self.keys.build_hasher();
        for part in parts {
            // Length-prefixed, so that ("ab", "c") and ("a", "bc") differ.
            hasher.write_usize(part.len());
            hasher.write(part);
        }
        let h = hasher.finish();
        if self.current.contains(&h) || self.previous.contains(&h) {
            return None;
        }
        if self.current.len() >= max_ids.max(1) {
            self.rotate(now);
        }
        self.current.insert(h);
        self.current_since.get_or_insert(now);
        Some(h)
    }

    /// Forgets an id recorded by [`Dedup::record`] whose publication was then refused:
    /// the publisher's retry must be taken, not answered `duplicate`.
    pub fn forget(&mut self, key: u64) {
        if !self.current.remove(&key) {
            self.previous.remove(&key);
        }
    }

    fn rotate(&mut self, now: Instant) {
        std::mem::swap(&mut self.current, &mut self.previous);
        self.current.clear();
        self.previous_since = self.current_since.replace(now);
    }
}

impl TenantHub {
    pub fn channel(&self, c: Channel) -> &Mutex<ChannelHub> {
        &self.channels[c.index()]
    }
}

/// The registry of tenants, read once per connection at authentication.
#[derive(Debug)]
pub struct Hubs {
    tenants: RwLock<HashMap<Arc<str>, Arc<TenantHub>>>,
    /// Identifies this run of the broker's event streams (`epoch` on events).
    pub epoch: u64,
    pub started: Instant,
}

impl Hubs {
    pub fn new(epoch: u64) -> Hubs {
        Hubs {
            tenants: RwLock::new(HashMap::new()),
            epoch,
            started: Instant::now(),
        }
    }

    /// The hub of tenant `id`, created if there are fewer than `max` tenants.
    pub fn try_tenant(&self, id: &str, max: usize) -> Option<Arc<TenantHub>> {
        if let Some(t) = self.tenants.read().get(id) {
            return Some(t.clone());
        }
        if self.tenants.read().len() >= max {
            return None;
        }
        Some(self.tenant(id))
    }

    /// Every tenant hub (a snapshot of the registry).
    pub fn all(&self) -> Vec<Arc<TenantHub>> {
        self.tenants.read().values().cloned().collect()
    }

    /// Minutes since the node started (alert summaries).
    pub fn minute(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.started).as_secs() / 60
    }

    pub fn tenant(&self, id: &str) -> Arc<TenantHub> {
        if let Some(t) = self.tenants.read().get(id) {
            return t.clone();
        }
        let mut w = self.tenants.write();
        w.entry(id.into())
            .or_insert_with(|| {
                Arc::new(TenantHub {
                    id: id.into(),
                    channels: Default::default(),
                    dedup: Mutex::new(Dedup::default()),
                    bindings: Mutex::new(Bindings::default()),
                })
            })
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alert(seq: u64, at: Instant) -> Arc<Event> {
        crate::event::test_event(Channel::Alerts, None, seq, b"{}", at)
    }

    #[test]
    fn history_replays_a_gap_it_still_holds() {
        let t0 = Instant::now();
        let age = Duration::from_secs(600);
        let mut ch = ChannelHub::default();
        for seq in 1..=10 {
            ch.seq = seq;
            ch.record_history(&alert(seq, t0), 5, age);
        }
        assert_eq!(ch.history_len(), 5);
        let seqs =
            |v: Option<Vec<Arc<Event>>>| v.map(|v| v.iter().map(|e| e.seq).collect::<Vec<_>>());
        assert_eq!(seqs(ch.replay_after(7, t0, age)), Some(vec![8, 9, 10]));
        assert_eq!(
            seqs(ch.replay_after(5, t0, age)),
            Some(vec![6, 7, 8, 9, 10])
        );
        assert_eq!(seqs(ch.replay_after(10, t0, age)), Some(vec![]));
        assert_eq!(seqs(ch.replay_after(4, t0, age)), None, "seq 5 is gone");
        assert_eq!(
            seqs(ch.replay_after(11, t0, age)),
            None,
            "not a position yet"
        );
        // Too old to replay.
        assert_eq!(
            seqs(ch.replay_after(7, t0 + Duration::from_secs(601), age)),
            None
        );
    }

    #[test]
    fn dedup_window_and_capacity() {
        let t0 = Instant::now();
        let w = Duration::from_secs(60);
        let s = Duration::from_secs;
        let mut d = Dedup::default();
        assert!(!d.check(&[b"\"a\""], t0, w, 3));
        assert!(d.check(&[b"\"a\""], t0 + s(59), w, 3));
        // Remembered for at least the window, forgotten after twice the window.
        assert!(d.check(&[b"\"a\""], t0 + s(61), w, 3));
        assert!(!d.check(&[b"\"b\""], t0 + s(119), w, 3));
        assert!(
            !d.check(&[b"\"a\""], t0 + s(121), w, 3),
            "forgotten after 2 windows"
        );
        assert!(
            d.check(&[b"\"b\""], t0 + s(121), w, 3),
            "b is one window old"
        );
        assert!(
            !d.check(&[b"\"b\""], t0 + s(400), w, 3),
            "everything forgotten"
        );

        // Capacity: at least the last `max_ids` ids, at most twice as many.
        let t1 = t0 + s(1000);
        let mut d = Dedup::default();
        for id in [b"1", b"2", b"3", b"4", b"5", b"6"] {
            assert!(!d.check(&[id], t1, w, 3));
        }
        for id in [b"4", b"5", b"6"] {
            assert!(d.check(&[id], t1, w, 3), "within the last 3 ids");
        }
        assert!(!d.check(&[b"7"], t1, w, 3));
        assert!(!d.check(&[b"1"], t1, w, 3), "forgotten: 6 newer ids");

        // A refused publication's id is forgotten: its retry is new, others stay seen.
        let mut d = Dedup::default();
        let key = d.record(&[b"r"], t1, w, 3).unwrap();
        assert!(!d.check(&[b"s"], t1, w, 3));
        d.forget(key);
        assert!(d.record(&[b"r"], t1, w, 3).is_some(), "the retry is taken");
        assert!(d.check(&[b"s"], t1, w, 3), "s is still a duplicate");
    }
}
