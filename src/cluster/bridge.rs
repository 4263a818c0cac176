//! The bridge thread: the node's NATS connection, on its own single-threaded runtime.
//!
//! Its main loop takes the shards' work in order (so a publisher's events reach NATS in
//! the order they were accepted) and follows (tenant, channel) pairs while the node has
//! subscribers of them: one task per pair, which loads the cluster's view (the bucket's
//! newest values, or the stream's history), marks the channel synced, then takes in what
//! other nodes publish.

use super::wire::{self, Names};
use super::{ClusterLink, Ctl, LinkEnds, Out};
use crate::config::{ClusterConfig, HistoryConfig};
use crate::dialect::native::ProtoError;
use crate::hub::TenantHub;
use crate::model::Channel;
use crate::session::Now;
use crate::shard::shared::{Shared, unix_ms};
use crate::store::{Ingest, Published, Store};
use async_nats::jetstream::{self, consumer, stream};
use futures_util::StreamExt;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tokio::task::JoinHandle as Task;

/// Starts the bridge thread and waits until it is connected (or, with
/// `start_degraded`, until it has started connecting).
pub fn start(shared: Arc<Shared>, ends: LinkEnds) -> anyhow::Result<JoinHandle<()>> {
    let config = shared
        .config
        .cluster
        .clone()
        .ok_or_else(|| anyhow::anyhow!("no [cluster] section"))?;
    let wait = Duration::from_millis(config.connect_timeout_ms) + Duration::from_secs(5);
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let thread = std::thread::Builder::new()
        .name("fleetcast-bridge".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = ready_tx.send(Err(anyhow::anyhow!("bridge runtime: {e}")));
                    return;
                }
            };
            rt.block_on(run(shared, config, ends, ready_tx));
        })?;
    match ready_rx.recv_timeout(wait) {
        Ok(Ok(())) => Ok(thread),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(anyhow::anyhow!(
            "cluster: no answer from NATS within {} ms",
            wait.as_millis()
        )),
    }
}

/// What every task of the bridge shares.
#[derive(Clone)]
struct Ctx {
    shared: Arc<Shared>,
    client: async_nats::Client,
    js: jetstream::Context,
    names: Names,
    /// Counts connections; a task that follows state reloads it after a reconnect.
    connects: tokio::sync::watch::Receiver<u64>,
}

impl Ctx {
    /// Copies NATS keeps of each stream and bucket (`cluster.replicas`).
    fn replicas(&self) -> usize {
        self.shared
            .config
            .cluster
            .as_ref()
            .map_or(1, |c| c.replicas)
    }

    fn link(&self) -> &ClusterLink {
        self.shared.cluster.as_ref().expect("cluster mode")
    }

    fn store(&self) -> Store<'_> {
        let c = &self.shared.config;
        Store::new(&self.shared.hubs, &c.limits, &c.history)
    }

    fn hub(&self, tenant: &str) -> Arc<TenantHub> {
        self.shared.hubs.tenant(tenant)
    }

    /// Takes in one message from another node for (tenant, channel).
    fn take_in(&self, hub: &TenantHub, channel: Channel, bytes: &[u8], how: Ingest) {
        let link = self.link();
        let (p, id) = match wire::decode(bytes) {
            Ok(d) if d.0.channel == channel => d,
            Ok(_) | Err(_) => {
                link.stats.malformed.fetch_add(1, Ordering::Relaxed);
                return;
            }
        };
        let mut wake = 0;
        let shared = &self.shared;
        if self.store().ingest(hub, p, &id, how, now(), |ev, mask| {
            wake = crate::shard::route(shared, usize::MAX, ev, mask)
        }) {
            link.stats.received.fetch_add(1, Ordering::Relaxed);
        }
        wake_shards(shared, wake);
    }

    /// The channel holds the cluster's view: the shards waiting for it go on.
    fn synced(&self, hub: &TenantHub, channel: Channel) {
        let mask = self.store().mark_synced(hub, channel);
        for shard in bits(mask) {
            let _ = self.shared.ctl[shard].send(Ctl::Synced {
                tenant: hub.id.clone(),
                channel,
            });
        }
        wake_shards(&self.shared, mask);
    }
}

fn bits(mut mask: u64) -> impl Iterator<Item = usize> {
    std::iter::from_fn(move || {
        (mask != 0).then(|| {
            let i = mask.trailing_zeros() as usize;
            mask &= mask - 1;
            i
        })
    })
}

fn wake_shards(shared: &Shared, mask: u64) {
    for shard in bits(mask) {
        let _ = shared.wakers[shard].wake();
    }
}

fn now() -> Now {
    Now {
        mono: Instant::now(),
        unix_ms: unix_ms() as i64,
    }
}

/// Reconnect delay: 100 ms doubling to 5 s, with up to 25 % jitter so that nodes that
/// lost the server together do not come back in step.
fn backoff(attempts: usize) -> Duration {
    let base = 100u64.saturating_mul(1 << attempts.min(6)).min(5_000);
    let mut b = [0u8; 2];
    let _ = getrandom::fill(&mut b);
    let jitter = u64::from(u16::from_le_bytes(b)) % (base / 4 + 1);
    Duration::from_millis(base + jitter)
}

async fn run(
    shared: Arc<Shared>,
    config: ClusterConfig,
    ends: LinkEnds,
    ready: std::sync::mpsc::Sender<anyhow::Result<()>>,
) {
    let (connects_tx, connects) = tokio::sync::watch::channel(0u64);
    let cb_shared = shared.clone();
    let mut options = async_nats::ConnectOptions::new()
        .name(&config.node_name)
        .no_echo()
        .connection_timeout(Duration::from_millis(config.connect_timeout_ms))
        .max_reconnects(None)
        .reconnect_delay_callback(backoff)
        .event_callback(move |event| {
            let shared = cb_shared.clone();
            let connects_tx = connects_tx.clone();
            async move {
                let link = shared.cluster.as_ref().expect("cluster mode");
                match event {
                    async_nats::Event::Connected => {
                        link.connected.store(true, Ordering::Relaxed);
                        link.stats.connects.fetch_add(1, Ordering::Relaxed);
                        connects_tx.send_modify(|n| *n += 1);
                        tracing::info!(node = %link.node_name, "cluster: connected to NATS");
                    }
                    async_nats::Event::Disconnected => {
                        link.connected.store(false, Ordering::Relaxed);
                        tracing::warn!(
                            node = %link.node_name,
                            "cluster: NATS link lost; local traffic goes on, reconnecting"
                        );
                    }
                    other => tracing::info!("cluster: NATS {other}"),
                }
            }
        });
    if config.start_degraded {
        options = options.retry_on_initial_connect();
    }
    let urls: Result<Vec<async_nats::ServerAddr>, _> =
        config.nats_url.iter().map(|u| u.parse()).collect();
    let urls = match urls {
        Ok(u) => u,
        Err(e) => {
            let _ = ready.send(Err(anyhow::anyhow!("cluster.nats_url: {e}")));
            return;
        }
    };
    let client = match options.connect(urls).await {
        Ok(c) => c,
        Err(e) => {
            let _ = ready.send(Err(anyhow::anyhow!(
                "cluster: cannot reach NATS at {}: {e} (set cluster.start_degraded = true to \
                 start alone and keep trying)",
                config.nats_url.join(", ")
            )));
            return;
        }
    };
    let link = shared.cluster.as_ref().expect("cluster mode");
    if client.connection_state() == async_nats::connection::State::Connected {
        link.connected.store(true, Ordering::Relaxed);
    }
    let ctx = Ctx {
        shared: shared.clone(),
        js: jetstream::new(client.clone()),
        client,
        names: Names::new(&config.subject_prefix),
        connects,
    };
    if link.is_connected()
        && let Err(e) = ensure_bucket(&ctx).await
    {
        let _ = ready.send(Err(anyhow::anyhow!(
            "cluster: cannot create the state bucket (is JetStream enabled on the NATS \
             server? run it with -js): {e}"
        )));
        return;
    }
    let _ = ready.send(Ok(()));
    if !shared.config.itrack.users.is_empty() {
        let ctx = ctx.clone();
        tokio::spawn(async move {
            loop {
                if let Err(e) = follow_sessions(&ctx).await {
                    tracing::warn!("cluster: following iTrack sessions stopped: {e}; retrying");
                }
                tokio::time::sleep(backoff(3)).await;
            }
        });
    }
    Bridge {
        ctx,
        following: HashMap::new(),
        streams: HashMap::new(),
    }
    .serve(ends)
    .await;
}

/// The state bucket: one value (the newest) per tenant, channel and entity, on disk. It
/// is a JetStream key-value bucket (stream `KV_<bucket>`, subjects `$KV.<bucket>.>`, one
/// message per subject), created here as its stream: the client's bucket helper asks for
/// account details that NATS servers before 2.10 (Debian's 2.9) do not send.
async fn ensure_bucket(ctx: &Ctx) -> anyhow::Result<()> {
    let bucket = ctx.names.bucket();
    ctx.js
        .get_or_create_stream(stream::Config {
            name: format!("KV_{bucket}"),
            description: Some("fleetcast: last known state per tenant, channel, entity".into()),
            subjects: vec![format!("$KV.{bucket}.>")],
            max_messages_per_subject: 1,
            discard: stream::DiscardPolicy::New,
            allow_rollup: true,
            deny_delete: true,
            allow_direct: true,
            storage: stream::StorageType::File,
            num_replicas: ctx.replicas(),
            ..Default::default()
        })
        .await?;
    Ok(())
}

/// The stream of (tenant, event channel), created with the history limits if missing.
/// Returns it with its epoch (creation time, UNIX ms).
async fn event_stream(
    ctx: &Ctx,
    tenant: &str,
    channel: Channel,
) -> anyhow::Result<(stream::Stream, u64)> {
    let h: &HistoryConfig = &ctx.shared.config.history;
    let max_age = h.max_age();
    let mut window = Duration::from_millis(h.dedup_window_ms.max(1));
    if !max_age.is_zero() {
        window = window.min(max_age);
    }
    let mut s = ctx
        .js
        .get_or_create_stream(stream::Config {
            name: ctx.names.stream(tenant, channel),
            subjects: vec![ctx.names.event(tenant, channel)],
            max_messages: h.max_events.max(1) as i64,
            max_age,
            duplicate_window: window,
            storage: stream::StorageType::File,
            num_replicas: ctx.replicas(),
            discard: stream::DiscardPolicy::Old,
            ..Default::default()
        })
        .await?;
    let created = s.info().await?.created;
    let epoch = (created.unix_timestamp_nanos() / 1_000_000).max(0) as u64;
    Ok((s, epoch))
}

type Key = (Arc<str>, Channel);

struct Bridge {
    ctx: Ctx,
    /// The (tenant, channel) pairs followed, each by its task.
    following: HashMap<Key, Task<()>>,
    /// Streams known to exist (publications go straight to them).
    streams: HashMap<Key, ()>,
}

impl Bridge {
    async fn serve(mut self, mut ends: LinkEnds) {
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        loop {
            tokio::select! {
                o = ends.out.recv() => match o {
                    Some(o) => self.handle(o).await,
                    None => break,
                },
                Some((tenant, channel)) = ends.interest.recv() => self.reconcile(tenant, channel),
                Some(op) = ends.session_ops.recv() => self.replicate_session(op).await,
                _ = tick.tick() => {
                    if self.ctx.shared.stopping.load(Ordering::Acquire) {
                        break;
                    }
                    self.restart_failed();
                }
            }
        }
        let _ = tokio::time::timeout(Duration::from_secs(2), self.ctx.client.flush()).await;
    }

    /// Sends one piece of the shards' work to NATS.
    async fn handle(&mut self, o: Out) {
        let link = self.ctx.link();
        match o {
            Out::Forward(ev) => {
                let subject = self.ctx.names.for_event(&ev);
                let body = wire::encode_event(&ev);
                if self.ctx.client.publish(subject, body.into()).await.is_ok() {
                    link.stats.sent.fetch_add(1, Ordering::Relaxed);
                }
            }
            Out::Store {
                tenant,
                publication,
                id,
                shard,
                ticket,
            } => {
                let channel = publication.channel;
                let reply = move |shared: &Shared, outcome: Published| {
                    let _ = shared.ctl[shard].send(Ctl::Stored { ticket, outcome });
                    let _ = shared.wakers[shard].wake();
                };
                let key = (tenant.clone(), channel);
                if !self.streams.contains_key(&key) {
                    match event_stream(&self.ctx, &tenant, channel).await {
                        Ok(_) => {
                            self.streams.insert(key, ());
                        }
                        Err(e) => {
                            link.stats.store_failed.fetch_add(1, Ordering::Relaxed);
                            return reply(&self.ctx.shared, not_stored(&e.to_string()));
                        }
                    }
                }
                let mut m = jetstream::message::PublishMessage::build()
                    .payload(wire::encode_publication(&publication, &id).into());
                if let Some(given) = &publication.id {
                    m = m.message_id(wire::msg_id(&publication.publisher, channel, given));
                }
                let subject = self.ctx.names.event(&tenant, channel);
                match self.ctx.js.send_publish(subject, m).await {
                    Ok(ack) => {
                        link.stats.sent.fetch_add(1, Ordering::Relaxed);
                        let shared = self.ctx.shared.clone();
                        tokio::spawn(async move {
                            let outcome = match ack.await {
                                Ok(a) if a.duplicate => Published::Duplicate,
                                Ok(a) => Published::Accepted { seq: a.sequence },
                                Err(e) => {
                                    let link = shared.cluster.as_ref().expect("cluster");
                                    link.stats.store_failed.fetch_add(1, Ordering::Relaxed);
                                    not_stored(&e.to_string())
                                }
                            };
                            reply(&shared, outcome);
                        });
                    }
                    Err(e) => {
                        link.stats.store_failed.fetch_add(1, Ordering::Relaxed);
                        reply(&self.ctx.shared, not_stored(&e.to_string()));
                    }
                }
            }
        }
    }

    /// Writes an iTrack session's creation or end to the sessions bucket.
    async fn replicate_session(&mut self, op: super::sessions::SessionOp) {
        use super::sessions::{SessionOp, SessionValue, key_of};
        let bucket = self.ctx.names.sessions_bucket();
        let r = match op {
            SessionOp::Put {
                digest,
                login,
                expires_at_ms,
            } => {
                let v = SessionValue {
                    login: login.to_string(),
                    exp: expires_at_ms,
                };
                let body = serde_json::to_vec(&v).expect("plain data");
                let subject = format!("$KV.{bucket}.{}", key_of(&digest));
                self.ctx.client.publish(subject, body.into()).await
            }
            SessionOp::Del(digest) => {
                let mut headers = async_nats::HeaderMap::new();
                headers.insert("KV-Operation", "DEL");
                let subject = format!("$KV.{bucket}.{}", key_of(&digest));
                self.ctx
                    .client
                    .publish_with_headers(subject, headers, Vec::new().into())
                    .await
            }
        };
        if let Err(e) = r {
            tracing::warn!("cluster: an iTrack session change was not replicated: {e}");
        }
    }

    /// Whether the node needs to follow (tenant, channel): it has subscribers of it, or
    /// of `fleet_metrics`, whose derived figures (vehicles, speeds, trips, alerts) are
    /// then computed from the whole cluster's positions and alerts, the same on every
    /// node (one set of figures per tenant, not one per node).
    fn wants(&self, hub: &TenantHub, channel: Channel) -> bool {
        let store = self.ctx.store();
        store.interested(hub, channel)
            || (matches!(channel, Channel::VehicleLocations | Channel::Alerts)
                && store.interested(hub, Channel::FleetMetrics))
    }

    /// Follows (tenant, channel) while the node needs it, and only then.
    fn reconcile(&mut self, tenant: Arc<str>, channel: Channel) {
        if channel == Channel::FleetMetrics {
            self.reconcile_one(tenant.clone(), Channel::VehicleLocations);
            self.reconcile_one(tenant.clone(), Channel::Alerts);
        }
        self.reconcile_one(tenant, channel);
    }

    fn reconcile_one(&mut self, tenant: Arc<str>, channel: Channel) {
        let hub = self.ctx.hub(&tenant);
        let want = self.wants(&hub, channel);
        let key = (tenant, channel);
        let running = self.following.get(&key).is_some_and(|t| !t.is_finished());
        if want && !running {
            self.follow(key);
        } else if !want && let Some(task) = self.following.remove(&key) {
            task.abort();
            if !self.ctx.store().mark_unsynced(&hub, channel) || self.wants(&hub, channel) {
                // Interest came back meanwhile.
                self.follow(key);
            }
        }
        let link = self.ctx.link();
        link.stats
            .following
            .store(self.following.len() as u64, Ordering::Relaxed);
    }

    fn follow(&mut self, key: Key) {
        let ctx = self.ctx.clone();
        let (tenant, channel) = key.clone();
        let task = tokio::spawn(async move {
            let r = if channel.is_event() {
                follow_events(&ctx, &tenant, channel).await
            } else {
                follow_live(&ctx, &tenant, channel).await
            };
            if let Err(e) = r {
                tracing::warn!(%tenant, %channel, "cluster: following stopped: {e}; retrying");
                tokio::time::sleep(backoff(3)).await;
            }
        });
        self.following.insert(key, task);
    }

    /// A task that stopped (the link failed under it) starts again while interest lasts.
    fn restart_failed(&mut self) {
        let done: Vec<Key> = self
            .following
            .iter()
            .filter(|(_, t)| t.is_finished())
            .map(|(k, _)| k.clone())
            .collect();
        for key in done {
            self.following.remove(&key);
            self.reconcile_one(key.0, key.1);
        }
    }
}

fn not_stored(why: &str) -> Published {
    Published::Refused(ProtoError::new(
        503,
        format!("not stored: the cluster link failed ({why}); retry"),
    ))
}

/// State and metrics channels: subscribe to the live subject first, then load the
/// bucket's newest values (state channels), then take in what arrives. After a
/// reconnect the values are loaded again (what is newer was missed meanwhile).
async fn follow_live(ctx: &Ctx, tenant: &Arc<str>, channel: Channel) -> anyhow::Result<()> {
    let hub = ctx.hub(tenant);
    let subject = if channel.is_state() {
        ctx.names.state_all(tenant, channel)
    } else {
        ctx.names.message(tenant, channel)
    };
    let mut sub = ctx.client.subscribe(subject).await?;
    ctx.client.flush().await?;
    let mut connects = ctx.connects.clone();
    connects.borrow_and_update();
    if channel.is_state() {
        load_state(ctx, &hub, channel).await?;
        take_in_loaded(ctx, &hub, channel, &mut sub);
    }
    ctx.synced(&hub, channel);
    loop {
        tokio::select! {
            m = sub.next() => match m {
                Some(m) => ctx.take_in(&hub, channel, &m.payload, Ingest::Live),
                None => anyhow::bail!("subscription closed"),
            },
            changed = connects.changed() => {
                changed?;
                if channel.is_state() {
                    load_state(ctx, &hub, channel).await?;
                    take_in_loaded(ctx, &hub, channel, &mut sub);
                }
            }
        }
    }
}

/// Takes in the live updates that arrived while the bucket was loading as loaded values
/// (recorded, and routed, only if newer than the state held). The server sends a value's
/// live copy before the load's copy of it on the same connection, so every value the
/// load included that was also published live is here: taken in as live, it would reach
/// a dashboard a second time right after its snapshot.
fn take_in_loaded(ctx: &Ctx, hub: &TenantHub, channel: Channel, sub: &mut async_nats::Subscriber) {
    use futures_util::FutureExt;
    while let Some(Some(m)) = sub.next().now_or_never() {
        ctx.take_in(hub, channel, &m.payload, Ingest::Load);
    }
}

/// Loads the newest value of every entity of (tenant, channel) from the bucket.
async fn load_state(ctx: &Ctx, hub: &TenantHub, channel: Channel) -> anyhow::Result<()> {
    ensure_bucket(ctx).await?;
    let stream = ctx
        .js
        .get_stream(format!("KV_{}", ctx.names.bucket()))
        .await?;
    let consumer = stream
        .create_consumer(consumer::push::OrderedConfig {
            deliver_subject: ctx.client.new_inbox(),
            filter_subject: ctx.names.state_all(&hub.id, channel),
            deliver_policy: consumer::DeliverPolicy::LastPerSubject,
            ..Default::default()
        })
        .await?;
    if consumer.cached_info().num_pending == 0 {
        return Ok(());
    }
    let mut messages = consumer.messages().await?;
    let timeout = ctx.link().sync_timeout;
    loop {
        let Some(m) = tokio::time::timeout(timeout, messages.next()).await? else {
            anyhow::bail!("state load ended early");
        };
        let m = m?;
        let pending = m.info().map_err(|e| anyhow::anyhow!("{e}"))?.pending;
        ctx.take_in(hub, channel, &m.payload, Ingest::Load);
        if pending == 0 {
            return Ok(());
        }
    }
}

/// Takes in every live iTrack session of the cluster, then each creation and end.
async fn follow_sessions(ctx: &Ctx) -> anyhow::Result<()> {
    use super::sessions::{SessionValue, digest_of};
    let bucket = ctx.names.sessions_bucket();
    let ttl = Duration::from_millis(ctx.shared.config.itrack.session_ttl_ms.max(1_000));
    let stream = ctx
        .js
        .get_or_create_stream(stream::Config {
            name: format!("KV_{bucket}"),
            description: Some("fleetcast: iTrack sessions by hash digest".into()),
            subjects: vec![format!("$KV.{bucket}.>")],
            max_messages_per_subject: 1,
            max_age: ttl,
            allow_rollup: true,
            allow_direct: true,
            storage: stream::StorageType::File,
            num_replicas: ctx.replicas(),
            ..Default::default()
        })
        .await?;
    let consumer = stream
        .create_consumer(consumer::push::OrderedConfig {
            deliver_subject: ctx.client.new_inbox(),
            filter_subject: format!("$KV.{bucket}.>"),
            deliver_policy: consumer::DeliverPolicy::LastPerSubject,
            ..Default::default()
        })
        .await?;
    let prefix = format!("$KV.{bucket}.");
    let local = &ctx.link().sessions;
    let mut messages = consumer.messages().await?;
    while let Some(m) = messages.next().await {
        let m = m?;
        let Some(d) = m.subject.strip_prefix(&prefix).and_then(digest_of) else {
            continue;
        };
        let deleted = m
            .headers
            .as_ref()
            .and_then(|h| h.get("KV-Operation"))
            .is_some();
        if deleted || m.payload.is_empty() {
            local.remove_digest(&d);
        } else if let Ok(v) = serde_json::from_slice::<SessionValue>(&m.payload) {
            local.insert_digest(d, &v.login, v.exp, unix_ms());
        }
    }
    anyhow::bail!("sessions consumer ended")
}

/// How many of the mirror's newest events are compared with the stream, newest first,
/// when checking that the stream still holds what this node delivered.
const REWIND_PROBES: usize = 32;

/// Event channels: mirror the stream from where this node's mirror ends (or from its
/// start), mark the channel synced once the backlog is in, then deliver in stream order.
///
/// Before following, and again after every reconnect, the mirror is checked against the
/// stream: a NATS server restored from an older copy of its store, or one that crashed
/// before writing what it had acknowledged, has lost the stream's newest events, and
/// gives their positions to new ones. Following on from the mirror's end would skip
/// those new events (their `seq` was already taken). The node follows from the last
/// position both agree on instead, and the events after it carry a new epoch (the time
/// the first of them was stored, the same on every node that had the lost ones), so that
/// no client is handed two events with one (epoch, seq).
async fn follow_events(ctx: &Ctx, tenant: &Arc<str>, channel: Channel) -> anyhow::Result<()> {
    let hub = ctx.hub(tenant);
    let mut connects = ctx.connects.clone();
    loop {
        connects.borrow_and_update();
        let (stream, created) = event_stream(ctx, tenant, channel).await?;
        let (last, newest, mut epoch) = {
            let mut ch = hub.channel(channel).lock();
            if ch.stream_created != Some(created) {
                // A new stream (or the first follow): positions restart.
                ch.reset_stream(created);
                ch.stream_created = Some(created);
            }
            (
                ch.seq,
                ch.newest_ids(REWIND_PROBES),
                ch.epoch.unwrap_or(created),
            )
        };
        let kept = kept_until(&stream, last, &newest).await?;
        let mut rebase_at = None;
        if kept < last {
            let link = ctx.link();
            link.stats.stream_rewinds.fetch_add(1, Ordering::Relaxed);
            tracing::error!(
                node = %link.node_name,
                stream = %stream.cached_info().config.name,
                "cluster: the stream no longer holds events {}..={last} that this node \
                 delivered (NATS restored from an older copy, or it crashed before writing \
                 them: see docs/operations.md); following from {}, with a new epoch",
                kept + 1,
                kept + 1
            );
            rebase_at = Some(kept + 1);
        }
        let deliver_policy = if kept > 0 {
            consumer::DeliverPolicy::ByStartSequence {
                start_sequence: kept + 1,
            }
        } else {
            consumer::DeliverPolicy::All
        };
        let consumer = stream
            .create_consumer(consumer::push::OrderedConfig {
                deliver_subject: ctx.client.new_inbox(),
                deliver_policy,
                ..Default::default()
            })
            .await?;
        let mut synced = consumer.cached_info().num_pending == 0;
        if synced {
            ctx.synced(&hub, channel);
        }
        let mut messages = consumer.messages().await?;
        loop {
            tokio::select! {
                biased;
                changed = connects.changed() => {
                    // Reconnected: check the stream again before following on.
                    changed?;
                    break;
                }
                m = messages.next() => {
                    let Some(m) = m else {
                        anyhow::bail!("stream consumer ended");
                    };
                    let m = m?;
                    let info = m.info().map_err(|e| anyhow::anyhow!("{e}"))?;
                    let (seq, pending) = (info.stream_sequence, info.pending);
                    if rebase_at.is_some_and(|at| seq >= at) {
                        let stored = (info.published.unix_timestamp_nanos() / 1_000_000).max(0);
                        epoch = (stored as u64).max(epoch + 1);
                        rebase_at = None;
                    }
                    ctx.take_in(&hub, channel, &m.payload, Ingest::Stream { seq, epoch });
                    if !synced && pending == 0 {
                        synced = true;
                        ctx.synced(&hub, channel);
                    }
                }
            }
        }
    }
}

/// The last position up to which the stream holds the same events as this node's mirror,
/// which ends at `last` with `newest` (seq, id, own time; newest first): `last` when the
/// stream holds everything the node delivered. A position the stream's limits removed
/// counts as held.
async fn kept_until(
    stream: &stream::Stream,
    last: u64,
    newest: &[(u64, Vec<u8>, i64)],
) -> anyhow::Result<u64> {
    let state = &stream.cached_info().state;
    let top = last.min(state.last_sequence);
    let mut oldest_differing = None;
    for (seq, id, ts_ms) in newest.iter().filter(|e| e.0 <= top) {
        if *seq < state.first_sequence {
            return Ok(*seq);
        }
        match stream.get_raw_message(*seq).await {
            Ok(m) => {
                if let Ok((p, stored_id)) = wire::decode(&m.payload)
                    && stored_id == *id
                    && p.ts_ms == *ts_ms
                {
                    return Ok(*seq);
                }
                oldest_differing = Some(*seq);
            }
            Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => {
                return Ok(*seq);
            }
            Err(e) => return Err(e.into()),
        }
    }
    // Nothing more to compare (the history or the probes ran out): trust the rest.
    Ok(oldest_differing.map_or(top, |s| s - 1))
}
