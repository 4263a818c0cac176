//! Read-mostly state every shard sees, defined beside the shards (the node builds it and
//! starts them; nothing here knows the node).

use crate::admission::NodeAdmission;
use crate::auth::Authenticator;
use crate::config::Config;
use crate::event::Event;
use crate::hub::Hubs;
use crate::metrics::{self, ShardStats};
use crossbeam_channel::Sender;
use mio::Waker;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{SystemTime, UNIX_EPOCH};

/// Read-mostly state every shard sees: config, credentials, tenant hubs, and the way to
/// reach every other shard.
pub struct Shared {
    pub config: Config,
    pub auth: Authenticator,
    pub admission: NodeAdmission,
    pub hubs: Hubs,
    /// Each shard's inbox of routed events.
    pub mesh: Vec<Sender<Arc<Event>>>,
    pub wakers: Vec<Arc<Waker>>,
    pub stats: Vec<ShardStats>,
    /// Set when shutdown begins (read by every shard each loop turn, ahead of its inbox).
    pub stopping: std::sync::atomic::AtomicBool,
    /// Set for a shard when an event could not be queued to it (its inbox was full).
    pub inbox_overflowed: Vec<std::sync::atomic::AtomicBool>,
    /// Cluster mode: the way to the bridge thread (`None`: the node runs alone).
    pub cluster: Option<crate::cluster::ClusterLink>,
    /// Each shard's control inbox (the bridge's answers).
    pub ctl: Vec<Sender<crate::cluster::Ctl>>,
    /// `[server] io = "io_uring"` was asked for and the kernel allows it (`uring::probe`).
    pub io_uring: bool,
}

/// A shard whose loop has not turned for this long makes `/readyz` fail.
const STALL_MS: u64 = 3_000;

/// Admission of an authenticated principal: its tenant must fit on the node, and the
/// user within its connection caps.
impl crate::session::Admission for Shared {
    fn admit(
        &self,
        p: &crate::auth::Principal,
        now: crate::session::Now,
    ) -> Result<(), crate::metrics::Limit> {
        self.hubs
            .try_tenant(&p.tenant, self.config.limits.max_tenants)
            .ok_or(crate::metrics::Limit::Tenants)?;
        self.admission.admit_user(p, now.mono)
    }

    fn publish_bucket(
        &self,
        p: &crate::auth::Principal,
        now: crate::session::Now,
    ) -> Option<Arc<crate::session::PublishBucket>> {
        Some(self.admission.user_publish_bucket(p, now.mono))
    }
}

impl Shared {
    /// `/readyz`: the shards' liveness; in cluster mode the body also says whether the
    /// NATS link is up. A node whose link is down stays ready (200): its local traffic
    /// flows, and taking every node out of a load balancer because NATS is away would
    /// stop all of it (docs/operations.md).
    pub fn readiness(&self) -> (u16, String) {
        let (status, mut body) = readiness(&self.stats, unix_ms());
        if let Some(link) = &self.cluster {
            if link.is_connected() {
                body.push_str("cluster link: up\n");
            } else {
                body.push_str("cluster link: degraded (NATS unreachable, reconnecting)\n");
            }
        }
        (status, body)
    }

    pub fn render_metrics(&self) -> String {
        let mut out = metrics::render(&self.stats);
        self.auth.render_metrics(&mut out);
        if let Some(link) = &self.cluster {
            link.render(&mut out);
        }
        out
    }
}

/// `/readyz`: 200 when every shard's loop turned within `STALL_MS`, else 503 naming the
/// stalled shards.
fn readiness(stats: &[ShardStats], now_ms: u64) -> (u16, String) {
    let stalled: Vec<usize> = stats
        .iter()
        .enumerate()
        .filter(|(_, s)| now_ms.saturating_sub(s.last_turn_ms.load(Ordering::Relaxed)) > STALL_MS)
        .map(|(i, _)| i)
        .collect();
    if stalled.is_empty() {
        (200, "ready\n".into())
    } else {
        (503, format!("stalled shards: {stalled:?}\n"))
    }
}

pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readyz_turns_red_when_a_shard_stops_turning() {
        let stats: Vec<ShardStats> = (0..3).map(|_| ShardStats::default()).collect();
        for s in &stats {
            s.last_turn_ms.store(10_000, Ordering::Relaxed);
        }
        assert_eq!(readiness(&stats, 10_000 + STALL_MS).0, 200);
        stats[1].last_turn_ms.store(5_000, Ordering::Relaxed);
        let (status, body) = readiness(&stats, 10_000 + STALL_MS);
        assert_eq!((status, body.as_str()), (503, "stalled shards: [1]\n"));
    }
}
