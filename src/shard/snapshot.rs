//! A snapshot waiting to be sent: the last known values a new subscription asked for,
//! fed into the connection's outbox as it drains, so that a fleet of 10 000 vehicles
//! does not trip the slow-consumer guard of the dashboard it is meant for (SPEC §7).
//!
//! A live event for an entity supersedes that entity's pending snapshot value: the live
//! one is newer, and sending the older one after it would move the dashboard backwards.

use crate::event::Event;
use crate::model::Channel;
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

/// One snapshot value: the shared event, or its projection for a `metrics` filter.
pub type Item = (Arc<Event>, Option<Vec<u8>>);

#[derive(Debug)]
pub struct PendingSnapshot {
    pub channel: Channel,
    items: VecDeque<Option<Item>>,
    /// Position of `items[0]` since the snapshot began.
    front: usize,
    by_entity: HashMap<Box<str>, usize>,
}

impl PendingSnapshot {
    pub fn new(channel: Channel, items: Vec<Item>) -> PendingSnapshot {
        let by_entity = items
            .iter()
            .enumerate()
            .filter_map(|(i, (ev, _))| ev.keys.state_key(channel).map(|k| (k.into(), i)))
            .collect();
        PendingSnapshot {
            channel,
            items: items.into_iter().map(Some).collect(),
            front: 0,
            by_entity,
        }
    }

    /// Drops the pending value of `ev`'s entity, if any.
    pub fn supersede(&mut self, ev: &Event) {
        if let Some(pos) = ev
            .keys
            .state_key(self.channel)
            .and_then(|k| self.by_entity.remove(k))
            && let Some(slot) = self.items.get_mut(pos - self.front)
        {
            *slot = None;
        }
    }

    /// The next value still worth sending.
    pub fn pop(&mut self) -> Option<Item> {
        while let Some(item) = self.items.pop_front() {
            self.front += 1;
            if let Some((ev, projected)) = item {
                if let Some(k) = ev.keys.state_key(self.channel) {
                    self.by_entity.remove(k);
                }
                return Some((ev, projected));
            }
        }
        None
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(vehicle: &str, seq: u64) -> Arc<Event> {
        let now = std::time::Instant::now();
        crate::event::test_event(Channel::VehicleLocations, Some(vehicle), seq, b"{}", now)
    }

    #[test]
    fn live_events_supersede_pending_values() {
        let items = ["a", "b", "c"]
            .iter()
            .enumerate()
            .map(|(i, v)| (ev(v, i as u64), None));
        let mut s = PendingSnapshot::new(Channel::VehicleLocations, items.collect());
        assert_eq!(s.pop().unwrap().0.seq, 0);
        s.supersede(&ev("a", 9)); // already sent: nothing to drop
        s.supersede(&ev("b", 10));
        assert_eq!(s.pop().unwrap().0.seq, 2);
        assert!(s.pop().is_none() && s.is_empty());
    }
}
