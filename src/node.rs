//! A node: binds the listeners, starts one shard thread per core, and stops them.
//! No protocol logic lives here.

use crate::admission::NodeAdmission;
use crate::auth::Authenticator;
use crate::config::Config;
use crate::hub::Hubs;
use crate::metrics::ShardStats;
use crate::shard::shared::{Shared, unix_ms};
use crate::shard::{Shard, WAKER};
use mio::{Poll, Waker};
use socket2::{Domain, Protocol, Socket, Type};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::thread::JoinHandle;

fn bind(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    Ok(socket.into())
}

/// The TLS state and one SO_REUSEPORT TLS listener per shard, if configured.
type TlsListeners = (
    Option<(SocketAddr, Arc<crate::tls::TlsState>)>,
    Vec<std::net::TcpListener>,
);

fn bind_tls(config: &Config, n: usize) -> anyhow::Result<TlsListeners> {
    let Some(settings) = &config.server.tls else {
        return Ok((None, Vec::new()));
    };
    let state = crate::tls::TlsState::new(settings.clone()).map_err(anyhow::Error::msg)?;
    let first = bind(settings.listen)
        .map_err(|e| anyhow::anyhow!("cannot listen on {} (TLS): {e}", settings.listen))?;
    let addr = first.local_addr()?;
    let mut listeners = vec![first];
    for _ in 1..n {
        listeners.push(bind(addr)?);
    }
    Ok((Some((addr, Arc::new(state))), listeners))
}

pub struct Node {
    addr: SocketAddr,
    /// The TLS listener's address and live certificate (`[server.tls]`).
    tls: Option<(SocketAddr, Arc<crate::tls::TlsState>)>,
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl Node {
    /// Binds one SO_REUSEPORT listener per shard and starts the shard threads.
    pub fn start(config: Config) -> anyhow::Result<Node> {
        // The same validation as `serve` and `check-config`; it also loads the JWT keys.
        let checked = config.validate()?;
        let n = config.shard_count();
        // iTrack session hashes live in this node's memory (a cluster store may replace it).
        let auth = Authenticator::with_keys(&config.auth, checked.keys)?.with_logins(
            &config.itrack,
            Arc::new(crate::sessions::MemorySessions::new()),
        )?;
        let first = bind(config.server.listen)
            .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", config.server.listen))?;
        let addr = first.local_addr()?;
        let mut listeners = vec![first];
        for _ in 1..n {
            listeners.push(bind(addr)?);
        }
        let (tls, mut tls_listeners) = bind_tls(&config, n)?;
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
            let mut shard = Shard::new(
                id,
                poll,
                mio::net::TcpListener::from_std(listener),
                inbox,
                shared.clone(),
            )?;
            if let (Some((_, state)), Some(l)) = (&tls, tls_listeners.pop()) {
                shard = shard.with_tls(mio::net::TcpListener::from_std(l), state.clone())?;
            }
            threads.push(
                std::thread::Builder::new()
                    .name(format!("fleetcast-shard-{id}"))
                    .spawn(move || shard.run())?,
            );
        }
        Ok(Node {
            addr,
            tls,
            shared,
            threads,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The TLS listener's address, when `[server.tls]` is configured.
    pub fn tls_addr(&self) -> Option<SocketAddr> {
        self.tls.as_ref().map(|(a, _)| *a)
    }

    /// SIGHUP: reloads the TLS certificate and key (no-op without TLS). On error the
    /// current certificate stays in use; the error is logged and returned.
    pub fn reload_tls(&self) -> Result<(), String> {
        match &self.tls {
            Some((_, state)) => state.reload(),
            None => Ok(()),
        }
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
