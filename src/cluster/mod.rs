//! Cluster mode: nodes that share a NATS server with JetStream act as one broker.
//!
//! One bridge thread per node, with its own single-threaded async runtime, holds the NATS
//! connection. Shards never wait for it: they hand it work through bounded queues
//! ([`ClusterLink`]) and it answers through each shard's control inbox ([`Ctl`]) and
//! waker, and hands events from other nodes to the store, which routes them to the
//! shards' event inboxes exactly as a local publication is routed.
//!
//! - State channels (positions, telemetry, statuses): accepted and delivered locally at
//!   once, then sent on the channel's subject, which is the entity's key in a JetStream
//!   key-value bucket: one publish both reaches the nodes following the channel and keeps
//!   the newest value for a node that starts following it later (its snapshot).
//! - Event channels (trip events, alerts, maintenance alerts): stored in a stream per
//!   (tenant, channel) first; the stream's sequence is `seq` and its creation time the
//!   `epoch` on every node, and every node (the accepting one too) delivers them from
//!   the stream, in stream order. A publisher's `ack` waits for the stream.
//! - Interest: a node follows (tenant, channel) only while it has subscribers of it.
//!
//! docs/operations.md ("Running a cluster") says what is per node and what is shared.

mod bridge;
pub mod sessions;
pub mod wire;

use crate::event::{Event, Publication};
use crate::model::Channel;
use crate::store::Published;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

pub use bridge::start;

/// Work a shard hands the bridge.
#[derive(Debug)]
pub enum Out {
    /// A state or metrics event this node accepted and delivered: tell the other nodes.
    Forward(Arc<Event>),
    /// An event-channel publication that passed the node's checks: store it in its
    /// stream, then answer `ticket` on `shard` with the outcome.
    Store {
        tenant: Arc<str>,
        publication: Box<Publication>,
        /// The event id (the publisher's, or a fresh one), raw JSON.
        id: Vec<u8>,
        shard: usize,
        ticket: u64,
    },
}

/// What the bridge tells a shard.
#[derive(Debug)]
pub enum Ctl {
    /// The outcome of [`Out::Store`].
    Stored { ticket: u64, outcome: Published },
    /// (tenant, channel) is synced: position the subscriptions waiting for it.
    Synced { tenant: Arc<str>, channel: Channel },
}

/// Counters of the bridge (`/metrics`: `fleetcast_cluster_*`).
#[derive(Debug, Default)]
pub struct BridgeStats {
    /// Events sent to NATS (forwards and stored publications).
    pub sent: AtomicU64,
    /// Events received from other nodes and taken in.
    pub received: AtomicU64,
    /// Messages from NATS that were not valid events.
    pub malformed: AtomicU64,
    /// Work refused because the link's queue was full.
    pub overflow: AtomicU64,
    /// Stored publications that failed (refused to their publisher with 503).
    pub store_failed: AtomicU64,
    /// (tenant, channel) pairs followed right now.
    pub following: AtomicU64,
    /// Times the NATS connection was (re)established.
    pub connects: AtomicU64,
    /// Times an event stream was found to have lost events this node had delivered (NATS
    /// restored from an older copy, or a crash of a server that had not written them).
    pub stream_rewinds: AtomicU64,
}

/// The shards' side of the bridge: where to hand it work, and the link's state.
pub struct ClusterLink {
    pub node_name: String,
    out: tokio::sync::mpsc::Sender<Out>,
    interest: tokio::sync::mpsc::UnboundedSender<(Arc<str>, Channel)>,
    pub connected: AtomicBool,
    pub stats: BridgeStats,
    pub sync_timeout: std::time::Duration,
    /// iTrack sessions held on this node (its own and the other nodes').
    pub(crate) sessions: Arc<crate::sessions::MemorySessions>,
    session_ops: tokio::sync::mpsc::UnboundedSender<sessions::SessionOp>,
}

/// The bridge's ends of the link's queues (given to [`start`]).
pub struct LinkEnds {
    out: tokio::sync::mpsc::Receiver<Out>,
    interest: tokio::sync::mpsc::UnboundedReceiver<(Arc<str>, Channel)>,
    session_ops: tokio::sync::mpsc::UnboundedReceiver<sessions::SessionOp>,
}

impl ClusterLink {
    pub fn new(config: &crate::config::ClusterConfig) -> (ClusterLink, LinkEnds) {
        let (out_tx, out_rx) = tokio::sync::mpsc::channel(config.outbox_capacity.max(1));
        let (int_tx, int_rx) = tokio::sync::mpsc::unbounded_channel();
        let (ses_tx, ses_rx) = tokio::sync::mpsc::unbounded_channel();
        (
            ClusterLink {
                node_name: config.node_name.clone(),
                out: out_tx,
                interest: int_tx,
                connected: AtomicBool::new(false),
                stats: BridgeStats::default(),
                sync_timeout: std::time::Duration::from_millis(config.sync_timeout_ms),
                sessions: Arc::new(crate::sessions::MemorySessions::new()),
                session_ops: ses_tx,
            },
            LinkEnds {
                out: out_rx,
                interest: int_rx,
                session_ops: ses_rx,
            },
        )
    }

    /// The iTrack session store of a node in this cluster.
    pub fn session_store(&self) -> sessions::ClusterSessions {
        sessions::ClusterSessions {
            local: self.sessions.clone(),
            ops: self.session_ops.clone(),
        }
    }

    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    /// Hands work to the bridge without waiting; `Err` gives it back when the queue is
    /// full (counted).
    pub fn send(&self, o: Out) -> Result<(), Box<Out>> {
        self.out.try_send(o).map_err(|e| {
            self.stats.overflow.fetch_add(1, Ordering::Relaxed);
            Box::new(match e {
                tokio::sync::mpsc::error::TrySendError::Full(o)
                | tokio::sync::mpsc::error::TrySendError::Closed(o) => o,
            })
        })
    }

    /// The node's interest in (tenant, channel) may have changed: the bridge compares
    /// the channel's shard mask with what it follows.
    pub fn interest_changed(&self, tenant: &Arc<str>, channel: Channel) {
        if channel != Channel::System {
            let _ = self.interest.send((tenant.clone(), channel));
        }
    }

    /// `/metrics` lines.
    pub fn render(&self, out: &mut String) {
        use std::fmt::Write;
        let s = &self.stats;
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let _ = write!(
            out,
            "# HELP fleetcast_cluster_connected Whether the NATS link is up.\n\
             # TYPE fleetcast_cluster_connected gauge\n\
             fleetcast_cluster_connected {}\n\
             # TYPE fleetcast_cluster_sent_total counter\n\
             fleetcast_cluster_sent_total {}\n\
             # TYPE fleetcast_cluster_received_total counter\n\
             fleetcast_cluster_received_total {}\n\
             # TYPE fleetcast_cluster_malformed_total counter\n\
             fleetcast_cluster_malformed_total {}\n\
             # TYPE fleetcast_cluster_overflow_total counter\n\
             fleetcast_cluster_overflow_total {}\n\
             # TYPE fleetcast_cluster_store_failed_total counter\n\
             fleetcast_cluster_store_failed_total {}\n\
             # TYPE fleetcast_cluster_following gauge\n\
             fleetcast_cluster_following {}\n\
             # TYPE fleetcast_cluster_connects_total counter\n\
             fleetcast_cluster_connects_total {}\n\
             # HELP fleetcast_cluster_stream_rewinds_total Event streams found to have lost events this node had delivered.\n\
             # TYPE fleetcast_cluster_stream_rewinds_total counter\n\
             fleetcast_cluster_stream_rewinds_total {}\n",
            u8::from(self.is_connected()),
            g(&s.sent),
            g(&s.received),
            g(&s.malformed),
            g(&s.overflow),
            g(&s.store_failed),
            g(&s.following),
            g(&s.connects),
            g(&s.stream_rewinds),
        );
    }
}
