//! A node: binds the listeners, starts one shard thread per core, and stops them.
//! No protocol logic lives here.

use crate::admission::NodeAdmission;
use crate::auth::Authenticator;
use crate::config::Config;
use crate::event::Event;
use crate::hub::Hubs;
use crate::metrics::{self, ShardStats};
use crate::shard::{Shard, WAKER};
use crossbeam_channel::Sender;
use mio::{Poll, Waker};
use socket2::{Domain, Protocol, Socket, Type};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::thread::JoinHandle;
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
    pub fn readiness(&self) -> (u16, String) {
        readiness(&self.stats, unix_ms())
    }

    pub fn render_metrics(&self) -> String {
        metrics::render(&self.stats)
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

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn bind(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    Ok(socket.into())
}

pub struct Node {
    addr: SocketAddr,
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl Node {
    /// Binds one SO_REUSEPORT listener per shard and starts the shard threads.
    pub fn start(config: Config) -> anyhow::Result<Node> {
        config.validate()?;
        let n = config.shard_count();
        let auth = Authenticator::new(&config.auth)?;
        let first = bind(config.server.listen)
            .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", config.server.listen))?;
        let addr = first.local_addr()?;
        let mut listeners = vec![first];
        for _ in 1..n {
            listeners.push(bind(addr)?);
        }
        let mut polls = Vec::new();
        let mut wakers = Vec::new();
        let mut mesh = Vec::new();
        let mut inboxes = Vec::new();
        for _ in 0..n {
            let poll = Poll::new()?;
            wakers.push(Arc::new(Waker::new(poll.registry(), WAKER)?));
            polls.push(poll);
            let (tx, rx) = crossbeam_channel::bounded(crate::shard::INBOX_CAPACITY);
            mesh.push(tx);
            inboxes.push(rx);
        }
        let shared = Arc::new(Shared {
            admission: NodeAdmission::new(config.limits.clone()),
            config,
            auth,
            hubs: Hubs::new(unix_ms()),
            mesh,
            wakers,
            stopping: Default::default(),
            inbox_overflowed: (0..n).map(|_| Default::default()).collect(),
            // A shard that has not turned yet is starting, not stalled: its clock
            // starts now, so `/readyz` is green from the start and red after STALL_MS.
            stats: (0..n)
                .map(|_| {
                    let s = ShardStats::default();
                    s.last_turn_ms.store(unix_ms(), Ordering::Relaxed);
                    s
                })
                .collect(),
        });
        let mut threads = Vec::new();
        for (id, ((poll, listener), inbox)) in
            polls.into_iter().zip(listeners).zip(inboxes).enumerate()
        {
            let shard = Shard::new(
                id,
                poll,
                mio::net::TcpListener::from_std(listener),
                inbox,
                shared.clone(),
            )?;
            threads.push(
                std::thread::Builder::new()
                    .name(format!("fleetcast-shard-{id}"))
                    .spawn(move || shard.run())?,
            );
        }
        Ok(Node {
            addr,
            shared,
            threads,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn shard_count(&self) -> usize {
        self.shared.mesh.len()
    }

    /// Stops accepting, closes every client with 1001 and waits for the shards to finish
    /// (at most the configured grace period).
    pub fn shutdown(self) {
        self.shared.stopping.store(true, Ordering::Release);
        for waker in &self.shared.wakers {
            let _ = waker.wake();
        }
        for t in self.threads {
            let _ = t.join();
        }
    }
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
