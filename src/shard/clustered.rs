//! The shard's side of cluster mode: event-channel publications handed to the stream
//! and answered when it has stored them, and subscriptions that wait until their
//! (tenant, channel) is synced from the cluster. Nothing here blocks: the bridge answers
//! through the shard's control inbox (`Ctl`).

use super::{Shard, now};
use crate::cluster::{Ctl, Out};
use crate::dialect::native::ProtoError;
use crate::event::Publication;
use crate::hub::TenantHub;
use crate::metrics::Drop as StatDrop;
use crate::model::Channel;
use crate::session::{Fence, Now, Reply, Selection};
use crate::store::{Counted, Dedup, Published};
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

/// Control messages handled per loop turn.
const CTL_PER_TURN: usize = 4096;

/// What a shard waits for from the bridge.
#[derive(Default)]
pub(super) struct Waiting {
    next_ticket: u64,
    /// Publications handed to the stream, by ticket.
    tickets: HashMap<u64, Ticket>,
    /// Subscriptions waiting for their channel to be synced.
    parked: Vec<Parked>,
    /// HTTP publish requests waiting for some of their messages to be stored.
    requests: HashMap<u64, super::api::PendingPublish>,
    next_request: u64,
}

/// Who gets the outcome of a stored publication.
pub(super) enum Ticket {
    Ws {
        slot: usize,
        generation: u32,
        id: Option<Vec<u8>>,
        channel: Channel,
        ack: bool,
    },
    Http {
        request: u64,
        index: usize,
    },
}

struct Parked {
    slot: usize,
    generation: u32,
    hub: Arc<TenantHub>,
    channel: Channel,
    snapshot: Selection,
    since: Option<(u64, u64)>,
    reply: Reply,
    until: Instant,
}

impl Shard {
    /// An event-channel publication in cluster mode: the node's checks, then the stream.
    pub(super) fn store_in_cluster(
        &mut self,
        hub: &TenantHub,
        p: Publication,
        fresh: Vec<u8>,
        now: Now,
    ) -> Published {
        let link = self.shared.cluster.as_ref().expect("cluster mode");
        if !link.is_connected() {
            link.stats.store_failed.fetch_add(1, Ordering::Relaxed);
            return Published::Refused(ProtoError::new(
                503,
                "cluster link down: events are stored before they are delivered; retry",
            ));
        }
        let mut p = p;
        let mut counted = Counted::default();
        if let Err(out) = self
            .store()
            .admit(hub, &mut p, now, &mut counted, Dedup::Stream)
        {
            return out;
        }
        let id = p.id.clone().unwrap_or(fresh);
        self.cluster.next_ticket += 1;
        let ticket = self.cluster.next_ticket;
        let out = Out::Store {
            tenant: hub.id.clone(),
            publication: Box::new(p),
            id,
            shard: self.id,
            ticket,
        };
        let link = self.shared.cluster.as_ref().expect("cluster mode");
        if link.send(out).is_err() {
            return Published::Refused(ProtoError::new(503, "cluster link backlog full; retry"));
        }
        Published::Pending { ticket }
    }

    /// A WebSocket publisher waits for `ticket`.
    pub(super) fn await_stored(
        &mut self,
        ticket: u64,
        slot: usize,
        id: Option<Vec<u8>>,
        channel: Channel,
        ack: bool,
    ) {
        let generation = self.conns[slot].generation;
        self.cluster.tickets.insert(
            ticket,
            Ticket::Ws {
                slot,
                generation,
                id,
                channel,
                ack,
            },
        );
    }

    /// An HTTP publish request waits for `tickets` (its messages at these indexes).
    pub(super) fn await_request(&mut self, pending: super::api::PendingPublish) {
        self.cluster.next_request += 1;
        let request = self.cluster.next_request;
        for (index, ticket) in pending.tickets() {
            self.cluster
                .tickets
                .insert(ticket, Ticket::Http { request, index });
        }
        self.cluster.requests.insert(request, pending);
    }

    /// Handles the bridge's answers.
    pub(super) fn drain_ctl(&mut self) {
        for _ in 0..CTL_PER_TURN {
            let Ok(msg) = self.ctl.try_recv() else {
                return;
            };
            match msg {
                Ctl::Stored { ticket, outcome } => self.stored(ticket, outcome),
                Ctl::Synced { tenant, channel } => {
                    self.resume_parked(|p| p.channel == channel && p.hub.id == tenant)
                }
            }
        }
    }

    fn stored(&mut self, ticket: u64, outcome: Published) {
        let Some(t) = self.cluster.tickets.remove(&ticket) else {
            return;
        };
        if outcome == Published::Duplicate {
            // The stream's duplicate window (publish ids are deduplicated there).
            self.stats().drop(StatDrop::Duplicate, 1);
        }
        if let Published::Accepted { .. } = outcome {
            // Counted where it is stored, like a local publish where it is accepted.
            let channel = match &t {
                Ticket::Ws { channel, .. } => Some(*channel),
                Ticket::Http { .. } => None,
            };
            if let Some(c) = channel {
                self.stats().publishes[c.index()].fetch_add(1, Ordering::Relaxed);
            }
        }
        match t {
            Ticket::Ws {
                slot,
                generation,
                id,
                channel,
                ack,
            } => {
                let open = self
                    .conns
                    .get(slot)
                    .is_some_and(|c| c.generation == generation && c.is_open());
                if open {
                    self.answer_publish(slot, outcome, id, channel, ack, now());
                }
            }
            Ticket::Http { request, index } => {
                let Some(req) = self.cluster.requests.get_mut(&request) else {
                    return;
                };
                if let Published::Accepted { .. } = outcome {
                    let c = req.channel_at(index);
                    self.stats().publishes[c.index()].fetch_add(1, Ordering::Relaxed);
                }
                let req = self.cluster.requests.get_mut(&request).expect("present");
                if req.complete(index, outcome) {
                    let req = self.cluster.requests.remove(&request).expect("present");
                    self.finish_publish_request(req);
                }
            }
        }
    }

    /// Parks a subscription until its channel is synced: every event is fenced off
    /// meanwhile (the snapshot or replay it gets then covers them).
    pub(super) fn park(
        &mut self,
        slot: usize,
        channel: Channel,
        snapshot: &Selection,
        since: Option<(u64, u64)>,
        reply: Reply,
    ) {
        let conn = &mut self.conns[slot];
        let Some(hub) = conn.hub.clone() else {
            return;
        };
        if let Some(session) = conn.session.as_mut() {
            session.set_fence(
                channel,
                Fence {
                    max: u64::MAX,
                    all: true,
                    ..Default::default()
                },
            );
        }
        let link = self.shared.cluster.as_ref().expect("cluster mode");
        self.cluster.parked.push(Parked {
            slot,
            generation: conn.generation,
            hub,
            channel,
            snapshot: snapshot.clone(),
            since,
            reply,
            until: Instant::now() + link.sync_timeout,
        });
    }

    /// Positions the parked subscriptions `which` selects (still open, same connection).
    fn resume_parked(&mut self, which: impl Fn(&Parked) -> bool) {
        let (go, stay): (Vec<Parked>, Vec<Parked>) = std::mem::take(&mut self.cluster.parked)
            .into_iter()
            .partition(|p| which(p));
        self.cluster.parked = stay;
        for p in go {
            let same = self
                .conns
                .get(p.slot)
                .is_some_and(|c| c.generation == p.generation && c.is_open());
            if same {
                // The synced channel, or one whose sync timed out: positioned with what
                // the node holds (no second wait).
                self.position(
                    p.slot,
                    &p.hub,
                    p.channel,
                    false,
                    &p.snapshot,
                    p.since,
                    p.reply,
                    false,
                );
            }
        }
    }

    /// Parked subscriptions past `cluster.sync_timeout_ms` go on with what the node has.
    pub(super) fn resume_overdue(&mut self) {
        if self.cluster.parked.is_empty() {
            return;
        }
        let now = Instant::now();
        let overdue = self.cluster.parked.iter().any(|p| p.until <= now);
        if overdue {
            tracing::warn!(
                shard = self.id,
                "cluster: a channel was not synced in time; subscriptions go on with this \
                 node's view"
            );
            self.resume_parked(|p| p.until <= now);
        }
    }
}
