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
        let (cluster, link_ends) = match &config.cluster {
            Some(c) => {
                let (link, ends) = crate::cluster::ClusterLink::new(c);
                (Some(link), Some(ends))
            }
            None => (None, None),
        };
        // iTrack session hashes: this node's memory, replicated to every node in a cluster.
        let sessions: Arc<dyn crate::sessions::SessionStore> = match &cluster {
            Some(link) => Arc::new(link.session_store()),
            None => Arc::new(crate::sessions::MemorySessions::new()),
        };
        let auth = Authenticator::with_keys(&config.auth, checked.keys)?
            .with_logins(&config.itrack, sessions)?;
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
        let (mut ctl, mut ctl_rx) = (Vec::new(), Vec::new());
        for _ in 0..n {
            let (tx, rx) = crossbeam_channel::unbounded();
            ctl.push(tx);
            ctl_rx.push(rx);
            let poll = Poll::new()?;
            wakers.push(Arc::new(Waker::new(poll.registry(), WAKER)?));
            polls.push(poll);
            let (tx, rx) = crossbeam_channel::bounded(crate::shard::INBOX_CAPACITY);
            mesh.push(tx);
            inboxes.push(rx);
        }
        let io_uring = match config.server.io {
            crate::config::IoDriver::Mio => false,
            crate::config::IoDriver::IoUring => match crate::shard::uring_probe() {
                Ok(()) => true,
                Err(e) => {
                    tracing::warn!(
                        "io_uring refused ({e}): falling back to mio (`[server] io = \"io_uring\"`)"
                    );
                    false
                }
            },
        };
        let shared = Arc::new(Shared {
            io_uring,
            cluster,
            ctl,
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
        // Before the shards accept: a URL's set is fetched first.
        start_jwks(&shared.auth, &shared.config.auth)?;
        let mut threads = Vec::new();
        // Cluster mode: connected (or, if allowed, connecting) before the first client.
        if let Some(ends) = link_ends {
            threads.push(crate::cluster::start(shared.clone(), ends)?);
        }
        let (started_tx, started_rx) = std::sync::mpsc::channel();
        for (id, (((poll, listener), inbox), ctl)) in polls
            .into_iter()
            .zip(listeners)
            .zip(inboxes)
            .zip(ctl_rx)
            .enumerate()
        {
            let mut shard = Shard::new(
                id,
                poll,
                mio::net::TcpListener::from_std(listener),
                inbox,
                ctl,
                shared.clone(),
            )?;
            if let (Some((_, state)), Some(l)) = (&tls, tls_listeners.pop()) {
                shard = shard.with_tls(mio::net::TcpListener::from_std(l), state.clone())?;
            }
            let started = started_tx.clone();
            threads.push(
                std::thread::Builder::new()
                    .name(format!("fleetcast-shard-{id}"))
                    .spawn(move || {
                        // Its IO driver is set up on its own thread (an io_uring belongs
                        // to the thread that submits to it) before the node reports it.
                        shard.start_io();
                        let _ = started.send(());
                        shard.run()
                    })?,
            );
        }
        // Every shard has its IO driver before the node says it listens (the banner and
        // `fleetcast_io_driver` tell the driver in use from the start).
        drop(started_tx);
        for _ in 0..n {
            if started_rx
                .recv_timeout(std::time::Duration::from_secs(10))
                .is_err()
            {
                anyhow::bail!("a shard did not start within 10 s");
            }
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

    /// The IO driver the shards run on: `io_uring` when `[server] io` asked for it and
    /// the kernel allowed it, else `mio`.
    pub fn io_driver(&self) -> crate::config::IoDriver {
        if self.shared.io_uring {
            crate::config::IoDriver::IoUring
        } else {
            crate::config::IoDriver::Mio
        }
    }

    /// Replaces the API keys and revocation lists with those of `config` (already
    /// validated: SIGHUP) and wakes the shards, which close the connections of revoked
    /// credentials (4001).
    pub fn reload_credentials(&self, config: &Config) -> anyhow::Result<()> {
        self.shared.auth.reload_credentials(&config.auth)?;
        for waker in &self.shared.wakers {
            let _ = waker.wake();
        }
        Ok(())
    }

    /// Stops accepting, closes every client with 1001 and waits for the shards to finish
    /// (at most the configured grace period).
    pub fn shutdown(self) {
        if let Some(jwks) = self.shared.auth.jwks() {
            jwks.stop();
        }
        self.shared.stopping.store(true, Ordering::Release);
        for waker in &self.shared.wakers {
            let _ = waker.wake();
        }
        for t in self.threads {
            let _ = t.join();
        }
    }
}

/// Starts the JWKS refresher when `[auth]` names a set. A URL is fetched once before the
/// node listens (so that it accepts tokens from its first connection; a failure is logged
/// and retried in the background); a file was read by validation.
fn start_jwks(auth: &Authenticator, cfg: &crate::config::AuthConfig) -> anyhow::Result<()> {
    use crate::jwks::refresher::{self, Settings, Source};
    use std::time::{Duration, Instant};
    let Some(jwks) = auth.jwks() else {
        return Ok(());
    };
    let source = match (&cfg.jwks_url, &cfg.jwks_file) {
        (Some(url), _) => Source::Url(url.clone()),
        (None, Some(path)) => Source::File(path.into()),
        (None, None) => return Ok(()),
    };
    let settings = Settings {
        source,
        every: Duration::from_millis(cfg.jwks_refresh_interval_ms),
        min_gap: Duration::from_millis(cfg.jwks_min_refresh_interval_ms),
        timeout: Duration::from_millis(cfg.jwks_timeout_ms),
    };
    let ok = match settings.source {
        Source::Url(_) => refresher::fetch_at_start(jwks, &settings),
        Source::File(_) => true,
    };
    refresher::spawn(jwks.clone(), settings, Some((Instant::now(), ok)))?;
    Ok(())
}
