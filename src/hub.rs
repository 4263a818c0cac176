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
use std::collections::HashMap;
use std::sync::Arc;

#[derive(Debug, Default)]
pub struct ChannelHub {
    /// Bit i set: shard i has at least one subscriber.
    pub shard_mask: u64,
    /// Seq of the last accepted event.
    pub seq: u64,
    /// Last known state per entity (state channels only).
    last: HashMap<Box<str>, Arc<Event>>,
}

impl ChannelHub {
    /// Records `ev` as last known state if it is the newest for its entity by its own
    /// timestamp. An older, late event is still delivered but does not overwrite.
    pub fn record_state(&mut self, ev: &Arc<Event>) {
        if !ev.channel.is_state() {
            return;
        }
        let Some(key) = ev.keys.state_key(ev.channel) else {
            return;
        };
        match self.last.get_mut(key) {
            Some(cur) if cur.ts_ms > ev.ts_ms => {}
            Some(cur) => *cur = ev.clone(),
            None => {
                self.last.insert(key.into(), ev.clone());
            }
        }
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

    pub fn state_len(&self) -> usize {
        self.last.len()
    }
}

#[derive(Debug)]
pub struct TenantHub {
    pub id: Arc<str>,
    channels: [Mutex<ChannelHub>; Channel::COUNT],
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
}

impl Hubs {
    pub fn new(epoch: u64) -> Hubs {
        Hubs {
            tenants: RwLock::new(HashMap::new()),
            epoch,
        }
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
                })
            })
            .clone()
    }
}
