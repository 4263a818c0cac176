//! The per-shard subscriber index: tenant -> channel -> entity key -> bit set of slots.
//!
//! Owned by one shard thread; no locks. Lookups borrow `&str` keys (no allocation per
//! event). An event about vehicle V, trip T and driver D reaches the union of the channel's
//! `all` set and the sets for V, T and D; each slot appears once.

use super::bitset::{BitSet, for_each_in_union};
use crate::model::{Channel, EntityKeys};
use crate::session::Selection;
use std::collections::HashMap;
use std::sync::Arc;

#[derive(Debug, Default)]
struct ChannelSubs {
    all: BitSet,
    by_vehicle: HashMap<Box<str>, BitSet>,
    by_trip: HashMap<Box<str>, BitSet>,
    by_driver: HashMap<Box<str>, BitSet>,
    /// Number of (slot, key) entries; zero means this shard has no interest.
    entries: usize,
}

#[derive(Debug, Default)]
struct TenantSubs {
    channels: [ChannelSubs; Channel::COUNT],
}

#[derive(Debug, Default)]
pub struct SubscriberIndex {
    tenants: HashMap<Arc<str>, TenantSubs>,
}

fn add_keys(map: &mut HashMap<Box<str>, BitSet>, keys: &[Box<str>], slot: usize) -> usize {
    keys.iter()
        .filter(|k| map.entry((*k).clone()).or_default().insert(slot))
        .count()
}

fn remove_keys(map: &mut HashMap<Box<str>, BitSet>, keys: &[Box<str>], slot: usize) -> usize {
    let mut n = 0;
    for k in keys {
        if let Some(set) = map.get_mut(&**k) {
            n += set.remove(slot) as usize;
            if set.is_empty() {
                map.remove(&**k);
            }
        }
    }
    n
}

impl SubscriberIndex {
    /// Adds `slot` under the keys of `sel`. Returns true if this shard had no interest in
    /// (tenant, channel) before (the node-wide mask must gain this shard).
    pub fn add(
        &mut self,
        tenant: &Arc<str>,
        channel: Channel,
        sel: &Selection,
        slot: usize,
    ) -> bool {
        let t = self.tenants.entry(tenant.clone()).or_default();
        let c = &mut t.channels[channel.index()];
        let before = c.entries;
        if sel.all && c.all.insert(slot) {
            c.entries += 1;
        }
        c.entries += add_keys(&mut c.by_vehicle, &sel.vehicles, slot);
        c.entries += add_keys(&mut c.by_trip, &sel.trips, slot);
        c.entries += add_keys(&mut c.by_driver, &sel.drivers, slot);
        before == 0 && c.entries > 0
    }

    /// Removes `slot` from the keys of `sel`. Returns true if this shard lost its last
    /// interest in (tenant, channel).
    pub fn remove(&mut self, tenant: &str, channel: Channel, sel: &Selection, slot: usize) -> bool {
        let Some(t) = self.tenants.get_mut(tenant) else {
            return false;
        };
        let c = &mut t.channels[channel.index()];
        let before = c.entries;
        if sel.all && c.all.remove(slot) {
            c.entries -= 1;
        }
        c.entries -= remove_keys(&mut c.by_vehicle, &sel.vehicles, slot);
        c.entries -= remove_keys(&mut c.by_trip, &sel.trips, slot);
        c.entries -= remove_keys(&mut c.by_driver, &sel.drivers, slot);
        let lost = before > 0 && c.entries == 0;
        if t.channels.iter().all(|c| c.entries == 0) {
            self.tenants.remove(tenant);
        }
        lost
    }

    /// Calls `f` once per slot subscribed to an event of `tenant`/`channel` about `keys`.
    pub fn for_each(
        &self,
        tenant: &str,
        channel: Channel,
        keys: &EntityKeys,
        f: impl FnMut(usize),
    ) {
        let Some(t) = self.tenants.get(tenant) else {
            return;
        };
        let c = &t.channels[channel.index()];
        let mut sets: [&BitSet; 4] = [&c.all; 4];
        let mut n = 1;
        let lookups = [
            (&c.by_vehicle, &keys.vehicle),
            (&c.by_trip, &keys.trip),
            (&c.by_driver, &keys.driver),
        ];
        for (map, key) in lookups {
            if let Some(set) = key.as_deref().and_then(|k| map.get(k)) {
                sets[n] = set;
                n += 1;
            }
        }
        for_each_in_union(&sets[..n], f);
    }

    pub fn has_interest(&self, tenant: &str, channel: Channel) -> bool {
        self.tenants
            .get(tenant)
            .is_some_and(|t| t.channels[channel.index()].entries > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sel(all: bool, vehicles: &[&str]) -> Selection {
        Selection {
            all,
            vehicles: vehicles.iter().map(|v| (*v).into()).collect(),
            ..Default::default()
        }
    }

    fn keys(v: &str, trip: Option<&str>) -> EntityKeys {
        EntityKeys {
            vehicle: Some(v.into()),
            trip: trip.map(Into::into),
            driver: None,
        }
    }

    #[test]
    fn routes_by_tenant_channel_and_entity_without_duplicates() {
        let mut ix = SubscriberIndex::default();
        let a: Arc<str> = "fleet_a".into();
        let b: Arc<str> = "fleet_b".into();
        assert!(ix.add(&a, Channel::VehicleLocations, &sel(true, &[]), 1));
        assert!(!ix.add(&a, Channel::VehicleLocations, &sel(false, &["v1"]), 2));
        ix.add(&a, Channel::VehicleLocations, &sel(false, &["v1"]), 1);
        ix.add(
            &a,
            Channel::VehicleLocations,
            &Selection {
                trips: vec!["t1".into()],
                ..Default::default()
            },
            3,
        );
        ix.add(&b, Channel::VehicleLocations, &sel(true, &[]), 4);
        let collect = |t: &str, k: &EntityKeys| {
            let mut v = Vec::new();
            ix.for_each(t, Channel::VehicleLocations, k, |s| v.push(s));
            v
        };
        assert_eq!(collect("fleet_a", &keys("v1", Some("t1"))), vec![1, 2, 3]);
        assert_eq!(collect("fleet_a", &keys("v2", None)), vec![1]);
        assert_eq!(collect("fleet_b", &keys("v1", None)), vec![4]);
        assert_eq!(collect("fleet_c", &keys("v1", None)), Vec::<usize>::new());
        let mut none = Vec::new();
        ix.for_each("fleet_a", Channel::Alerts, &keys("v1", None), |s| {
            none.push(s)
        });
        assert!(none.is_empty());
        assert!(!ix.remove("fleet_a", Channel::VehicleLocations, &sel(true, &["v1"]), 1));
        assert!(!ix.remove(
            "fleet_a",
            Channel::VehicleLocations,
            &sel(false, &["v1"]),
            2
        ));
        assert!(ix.remove(
            "fleet_a",
            Channel::VehicleLocations,
            &Selection {
                trips: vec!["t1".into()],
                ..Default::default()
            },
            3
        ));
        assert!(!ix.has_interest("fleet_a", Channel::VehicleLocations));
    }
}

#[cfg(test)]
mod size_profile {
    //! Idle-memory profile (issue 16): the index's per-tenant and per-key structures,
    //! printed with `cargo test size_profile -- --nocapture`.
    use super::*;
    use std::mem::size_of;

    #[test]
    fn index_parts() {
        let rows = [
            ("BitSet", size_of::<BitSet>()),
            ("ChannelSubs", size_of::<ChannelSubs>()),
            ("TenantSubs", size_of::<TenantSubs>()),
        ];
        for (name, bytes) in rows {
            println!("size_of {name}: {bytes}");
        }
        // Upper bounds: the sizes measured on 2026-12-05 (docs/performance.md).
        assert!(
            rows.iter().any(|&(n, b)| n == "BitSet" && b <= 32),
            "BitSet grew past 32 bytes"
        );
        assert!(
            rows.iter().any(|&(n, b)| n == "TenantSubs" && b <= 1840),
            "TenantSubs grew past 1840 bytes"
        );
    }
}
