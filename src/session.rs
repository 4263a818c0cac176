//! One client connection's protocol state, as plain code: no sockets, no clock, no threads.
//!
//! ```text
//!            upgrade (credential in query/header?)
//!                 |                    \
//!                 v                     v
//!          AwaitingAuth --auth ok--> Active --token expiry / heartbeat / close--> Closed
//!                 |  \__ auth timeout (408, close 1008)
//!                 \____ auth error (auth_error, close 1008)
//! ```
//!
//! Call order, in quinn's manner:
//! - input: [`Session::handle_message`] for every complete WebSocket message,
//!   [`Session::handle_tick`] at least every [`Session::tick_interval`];
//!   [`Session::set_fence`] after the shard took the snapshot a `Subscribe` asked for.
//! - output: drain [`Session::poll_action`] after every input, in order.
//! - delivery: [`Session::verdict`] for every event the shard's index routes here.

use crate::auth::{AuthError, Authenticator, Credential, Principal};
use crate::config::Limits;
use crate::dialect::Codec;
use crate::dialect::native::{
    self, AuthRequest, Command, Filters, Parser, ProtoError, PublishRequest, SubAction,
    SubscribeRequest,
};
use crate::dialect::view::{StateRules, TimeView, View};
use crate::event::{Event, Publication};
use crate::json;
use crate::metrics::Limit;
use crate::model::{Channel, Role};
use crate::wire::frame::{Message, close};
use crate::wire::handshake::Scope;
use std::collections::{HashMap, VecDeque};
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The two clocks a session needs: monotonic for deadlines, wall for timestamps.
#[derive(Debug, Clone, Copy)]
pub struct Now {
    pub mono: Instant,
    pub unix_ms: i64,
}

impl Now {
    pub fn unix_secs(&self) -> u64 {
        (self.unix_ms / 1000).max(0) as u64
    }
    fn rfc3339(&self) -> String {
        native::format_rfc3339_ms(self.unix_ms)
    }
}

/// Read-only inputs shared by every session of a shard.
pub struct Ctx<'a> {
    pub limits: &'a Limits,
    pub auth: &'a Authenticator,
    pub parser: &'a mut Parser,
    pub admission: &'a dyn Admission,
}

/// Node-wide admission of an authenticated principal (connection caps per user).
/// On `Ok` the connection counts against its user until the shard releases it.
pub trait Admission {
    fn admit(&self, principal: &Principal, now: Now) -> Result<(), Limit>;

    /// The user's publish bucket, shared by all its connections and HTTP requests
    /// (`None`: publishes are not limited per user).
    fn publish_bucket(&self, _principal: &Principal, _now: Now) -> Option<Arc<PublishBucket>> {
        None
    }
}

/// One user's publish rate: a token bucket shared by every connection and HTTP request of
/// that user, so that neither more connections nor HTTP bypass it. Held by sessions;
/// locked once per publish (per user, never across users).
#[derive(Debug)]
pub struct PublishBucket {
    rate: u32,
    bucket: parking_lot::Mutex<Bucket>,
}

impl PublishBucket {
    pub fn new(rate: u32, now: Instant) -> PublishBucket {
        PublishBucket {
            rate,
            bucket: parking_lot::Mutex::new(Bucket::new(now, rate)),
        }
    }

    pub fn rate(&self) -> u32 {
        self.rate
    }

    pub fn try_take(&self, now: Instant) -> bool {
        self.bucket.lock().try_take(now, self.rate, 1)
    }

    /// Whether the bucket is full at `now` (an idle bucket can be forgotten and made anew).
    pub fn is_full(&self, now: Instant) -> bool {
        let mut b = self.bucket.lock();
        b.try_take(now, self.rate, 0);
        b.tokens >= self.rate as f64
    }
}

/// Admits everyone (unit tests, benches).
pub struct AdmitAll;

impl Admission for AdmitAll {
    fn admit(&self, _: &Principal, _: Now) -> Result<(), Limit> {
        Ok(())
    }
}

/// A token bucket with one second of burst.
#[derive(Debug)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

impl Bucket {
    fn new(now: Instant, rate: u32) -> Bucket {
        Bucket {
            tokens: rate as f64,
            last: now,
        }
    }

    /// Takes `n` tokens if there are that many.
    fn try_take(&mut self, now: Instant, rate: u32, n: u32) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate as f64).min(rate as f64);
        self.last = now;
        if self.tokens >= n as f64 {
            self.tokens -= n as f64;
            true
        } else {
            false
        }
    }

    /// Switches from rate `from` to rate `to`, keeping what was spent: a connection that
    /// authenticates into a role with a higher rate gets that role's burst, less what it
    /// used before.
    fn change_rate(&mut self, now: Instant, from: u32, to: u32) {
        self.try_take(now, from, 0);
        self.tokens = (self.tokens + to as f64 - from as f64).clamp(0.0, to as f64);
    }
}

/// Index keys a subscription change adds or removes. `all` is the channel-wide key.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selection {
    pub all: bool,
    pub vehicles: Vec<Box<str>>,
    pub trips: Vec<Box<str>>,
    pub drivers: Vec<Box<str>>,
}

impl Selection {
    pub fn is_empty(&self) -> bool {
        !self.all && self.vehicles.is_empty() && self.trips.is_empty() && self.drivers.is_empty()
    }
    fn len(&self) -> usize {
        self.all as usize + self.vehicles.len() + self.trips.len() + self.drivers.len()
    }
    /// Whether an event about `keys` falls inside this selection.
    pub fn matches(&self, keys: &crate::model::EntityKeys) -> bool {
        let hit = |list: &[Box<str>], k: &Option<Box<str>>| {
            k.as_ref().is_some_and(|k| list.iter().any(|x| x == k))
        };
        self.all
            || hit(&self.vehicles, &keys.vehicle)
            || hit(&self.trips, &keys.trip)
            || hit(&self.drivers, &keys.driver)
    }
}

/// A reply for the client, typed: the connection's dialect encodes it (SPEC §6, "a
/// dialect is a codec"). `id` is the raw JSON of the id of the message it answers.
#[derive(Debug, Clone)]
pub enum Reply {
    AuthOk {
        id: Option<Vec<u8>>,
        connection_id: Box<str>,
        principal: Principal,
        /// The user the client named besides its credential (a Tracking driver's vehicle).
        acting_as: Option<Box<str>>,
        /// Fields of the auth request the dialect's reply repeats.
        echo: Vec<(&'static str, Box<str>)>,
        limits: ReplyLimits,
    },
    AuthError {
        id: Option<Vec<u8>>,
        code: u16,
        message: Box<str>,
    },
    Error {
        id: Option<Vec<u8>>,
        error: ProtoError,
    },
    /// The answer to a JSON ping.
    Pong { id: Option<Vec<u8>> },
    Subscribed {
        id: Option<Vec<u8>>,
        channel: Channel,
        filters: Filters,
        /// Event channels: the stream position, and `recovered` when `since` was given
        /// (filled in by the shard once the subscription is positioned).
        position: Option<StreamPosition>,
    },
    Unsubscribed {
        id: Option<Vec<u8>>,
        channel: Channel,
        filters: Filters,
    },
    Snapshot {
        id: Option<Vec<u8>>,
        channel: Channel,
        events: Vec<Arc<Event>>,
    },
    /// An accepted publish (`seq`), or a duplicate (`None`).
    Ack {
        id: Option<Vec<u8>>,
        channel: Channel,
        seq: Option<u64>,
    },
    /// The server's heartbeat (a WebSocket ping, or the dialect's own).
    Heartbeat,
    /// The answer to a WebSocket ping frame, with its payload.
    WsPong(Vec<u8>),
}

/// The limits an `auth` reply announces.
#[derive(Debug, Clone, Copy)]
pub struct ReplyLimits {
    pub max_message_bytes: usize,
    pub max_subscriptions: usize,
    pub max_batch: usize,
    pub heartbeat_interval_ms: u64,
}

/// Where a subscription to an event channel starts in its stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamPosition {
    pub epoch: u64,
    pub seq: u64,
    /// `Some` when the client asked to resume with `since`.
    pub recovered: Option<bool>,
}

/// What the session asks its shard to do.
#[derive(Debug)]
pub enum Action {
    /// Encode this reply in the connection's dialect and queue it.
    Reply(Reply),
    /// The session is now authenticated as [`Session::principal`].
    Authenticated,
    /// Add these keys to the index; then send a snapshot of `snapshot` (state channels)
    /// and call [`Session::set_fence`].
    Subscribe {
        channel: Channel,
        added: Selection,
        snapshot: Selection,
        /// `since: {epoch, seq}`: replay the event channel's history after this point.
        since: Option<(u64, u64)>,
        /// The `subscribed` reply: the shard fills in the stream position, then sends it
        /// first.
        reply: Reply,
    },
    /// Remove these keys from the index.
    Unsubscribe {
        channel: Channel,
        removed: Selection,
    },
    /// Answer a one-off `request`: the current state of `selection` on `channel`.
    SnapshotRequest {
        channel: Channel,
        selection: Selection,
        id: Option<Vec<u8>>,
    },
    Publish(Publication),
    /// Deliver an update a subscription's `frequency` held back, as `view` shows it.
    Deliver {
        event: Arc<Event>,
        view: Option<Arc<View>>,
    },
    /// A limit was breached (counted in `/metrics`).
    Breach(Limit),
    /// Send a close frame with this code, then close the connection.
    Close {
        code: u16,
        reason: &'static str,
    },
}

/// Snapshot fence: the newest seq per entity already sent in a snapshot, so that an event
/// still in flight when the snapshot was taken is not delivered a second time.
#[derive(Debug, Default)]
pub struct Fence {
    pub seqs: HashMap<Box<str>, u64>,
    pub max: u64,
    /// Skip every event up to `max` (a history replay sent them all).
    pub all: bool,
}

/// A subscription's `frequency`: at most one update per entity per interval; the newest
/// value that arrives within the interval waits and replaces any older waiting one.
#[derive(Debug)]
struct Throttle {
    every: Duration,
    /// Per entity: when its last update went out, and the newest one waiting.
    entities: HashMap<Box<str>, (Instant, Option<Arc<Event>>)>,
}

#[derive(Debug, Default)]
struct Subscription {
    throttle: Option<Box<Throttle>>,
    keys: Selection,
    /// Severity, category and status filters: `None` when all three are empty (most
    /// subscriptions), so that the boxed subscription stays small (issue 16).
    lists: Option<Box<ValueFilters>>,
    /// How this subscription sees events, when not as the dialect's shared frame.
    view: Option<Arc<View>>,
    fence: Option<Box<Fence>>,
}

/// A subscription's filters on event values; an empty list accepts all.
#[derive(Debug, Default)]
struct ValueFilters {
    severities: Vec<Box<str>>,
    categories: Vec<Box<str>>,
    status_types: Vec<Box<str>>,
}

/// How one routed event reaches this connection.
#[derive(Debug)]
pub enum Verdict {
    Skip,
    /// The shared frame as is.
    Shared,
    /// The frame as this view shows it (shared by the subscribers with an equal view).
    Projected(Arc<View>),
    /// Held by the subscription's `frequency` until this time (a newer update of the same
    /// entity replaces it): the shard makes sure the connection's timer fires by then.
    Held(Instant),
}

#[derive(Debug, PartialEq, Eq)]
enum State {
    AwaitingAuth { deadline: Instant },
    Active,
    Closed,
}

pub struct Session {
    /// The connection's dialect: decodes its messages (and the shard encodes replies and
    /// events with it): its id, one byte where the `&dyn Codec` was 16 (issue 16).
    dialect: crate::dialect::DialectId,
    conn_id: Box<str>,
    scope: Scope,
    state: State,
    /// Shared with the other connections of the same API key (`Authenticator`).
    principal: Option<Arc<Principal>>,
    subs: [Option<Box<Subscription>>; Channel::COUNT],
    sub_count: usize,
    last_heard: Instant,
    next_ping: Instant,
    /// The heartbeat interval in milliseconds, as configured (`heartbeat()`).
    heartbeat_ms: u64,
    bucket: Bucket,
    /// Rate for the bucket: the default until authenticated, then the role's.
    rate: u32,
    /// Rate for snapshot requests and `since` replays (large replies), per connection;
    /// its bucket is in `rare`, made full on the first such request.
    request_rate: u32,
    /// The user's publish rate, shared with its other connections.
    publish_bucket: Option<Arc<PublishBucket>>,
    actions: VecDeque<Action>,
    /// What only some dialects, throttled subscriptions, heavy requests and rate breaches
    /// use: allocated on first use, so that an idle connection holds none of it (issue 16).
    rare: Option<Box<Rare>>,
}

/// The parts of a [`Session`] that most connections never use (see `Session::rare`).
#[derive(Default)]
struct Rare {
    /// A channel the endpoint subscribes to once authenticated (Valtronics `/ws/alerts`).
    preset: Option<Channel>,
    /// Since when messages have been dropped for rate, with no quiet second between.
    abuse_since: Option<Instant>,
    last_drop: Option<Instant>,
    /// Snapshot requests and `since` replays (large replies), per connection: `None`
    /// until the first one (a bucket made then is as full as one made at the start).
    requests: Option<Bucket>,
    /// The earliest time a throttled subscription has a held update due.
    flush_at: Option<Instant>,
    /// How this connection's dialect writes timestamps (Telematics `date_format`).
    time: Option<Arc<TimeView>>,
    /// The user the client authenticated as, when its dialect names one besides the
    /// credential (a Tracking driver: its vehicle).
    acting_as: Option<Box<str>>,
    /// Fields the dialect's auth reply repeats.
    echo: Vec<(&'static str, Box<str>)>,
    /// The node's thresholds for tracker states (`[itrack]`), for dialects that show them.
    state_rules: Option<Arc<StateRules>>,
}

/// Whether credential `p` may act as the user a dialect names besides it (a Tracking
/// `user_id` and `role`): a device for one of its vehicles (a driver's user_id is its
/// vehicle); any other role for its own user, or a service or admin for any office user
/// of its fleet.
fn acting_for(p: &Principal, user: &str, role: Role) -> Result<(), ProtoError> {
    let ok = match role {
        Role::Device => {
            p.role == Role::Device && (&*p.user_id == user || p.may_act_for_vehicle(user))
        }
        _ => {
            p.role != Role::Device
                && (&*p.user_id == user || matches!(p.role, Role::Service | Role::Admin))
        }
    };
    if ok {
        Ok(())
    } else {
        Err(ProtoError::new(
            401,
            format!(
                "credential of {} {:?} may not act as {} {user:?}",
                p.role.name(),
                p.user_id,
                role.name()
            ),
        ))
    }
}

impl Session {
    /// A session for a freshly upgraded connection; `principal` is set when the handshake
    /// carried a valid credential.
    pub fn new(
        conn_id: Box<str>,
        scope: Scope,
        principal: Option<Arc<Principal>>,
        now: Instant,
        limits: &Limits,
    ) -> Session {
        let state = match principal {
            Some(_) => State::Active,
            None => State::AwaitingAuth {
                deadline: now + limits.auth_timeout(),
            },
        };
        let rate = match &principal {
            Some(p) => limits.for_role(p.role).messages_per_second,
            None => limits.messages_per_second,
        };
        let first_ping = first_ping_after(&conn_id, limits.heartbeat_interval());
        let mut s = Session {
            dialect: crate::dialect::NATIVE,
            conn_id,
            scope,
            state,
            principal,
            subs: Default::default(),
            sub_count: 0,
            last_heard: now,
            next_ping: now + first_ping,
            heartbeat_ms: limits.heartbeat_interval_ms,
            bucket: Bucket::new(now, rate),
            rate,
            request_rate: limits.requests_per_second,
            publish_bucket: None,
            actions: VecDeque::new(),
            rare: None,
        };
        if s.principal.is_some() {
            s.actions.push_back(Action::Authenticated);
        }
        s
    }

    /// Speaks `codec` instead of the native dialect; subscribes `preset` once
    /// authenticated (at once if the handshake carried the credential).
    pub fn with_dialect(
        mut self,
        codec: &'static dyn Codec,
        preset: Option<Channel>,
        limits: &Limits,
        now: Now,
    ) -> Session {
        self.dialect = codec.id();
        if preset.is_some() {
            self.rare_mut().preset = preset;
        }
        // A credential in the handshake: the dialect's auth reply still comes first (its
        // clients wait for it), before anything the endpoint subscribes.
        if self.state == State::Active {
            self.send_auth_success(now, None, limits);
        }
        if self.state == State::Active
            && let Some(channel) = self.rare.as_mut().and_then(|r| r.preset.take())
        {
            let req = SubscribeRequest {
                action: SubAction::Subscribe,
                channel,
                filters: Filters::default(),
                since: None,
            };
            if let Err(e) = self.handle_subscribe(now, None, req, limits) {
                self.send_error(now, None, &e);
            }
        }
        self
    }

    /// The thresholds tracker states are judged by (`[itrack]`), for dialects that show
    /// them (`Codec::shows_tracker_states`).
    pub fn set_state_rules(&mut self, rules: Arc<StateRules>) {
        self.rare_mut().state_rules = Some(rules);
    }

    /// The rarely used parts, allocated now if they were not.
    fn rare_mut(&mut self) -> &mut Rare {
        self.rare.get_or_insert_with(Default::default)
    }

    fn heartbeat(&self) -> Duration {
        Duration::from_millis(self.heartbeat_ms)
    }

    fn flush_at(&self) -> Option<Instant> {
        self.rare.as_ref().and_then(|r| r.flush_at)
    }

    pub fn codec(&self) -> &'static dyn Codec {
        crate::dialect::codec(self.dialect)
    }

    /// The user's publish bucket (for a principal given at the handshake or over HTTP;
    /// an `auth` message sets it through [`Admission::publish_bucket`]).
    pub fn set_publish_bucket(&mut self, bucket: Option<Arc<PublishBucket>>) {
        self.publish_bucket = bucket;
    }

    // ------------------------------------------------------------------ getters

    pub fn principal(&self) -> Option<&Principal> {
        self.principal.as_deref()
    }

    pub fn is_closed(&self) -> bool {
        self.state == State::Closed
    }

    pub fn subscription_count(&self) -> usize {
        self.sub_count
    }

    /// Every index key this session holds, for cleanup when the connection goes away.
    pub fn subscriptions(&self) -> impl Iterator<Item = (Channel, &Selection)> {
        Channel::ALL
            .into_iter()
            .filter_map(|c| self.subs[c.index()].as_ref().map(|s| (c, &s.keys)))
    }

    /// How often [`Session::handle_tick`] must be called for deadlines to hold (the shard's
    /// tick also drives the handshake deadline).
    pub fn tick_interval(limits: &Limits) -> Duration {
        let fine = limits
            .heartbeat_interval()
            .min(limits.auth_timeout())
            .min(limits.handshake_timeout())
            / 4;
        fine.clamp(Duration::from_millis(5), Duration::from_secs(1))
    }

    // ------------------------------------------------------------------ output

    pub fn poll_action(&mut self) -> Option<Action> {
        let next = self.actions.pop_front();
        if next.is_none() && self.actions.capacity() > 0 {
            // Idle sessions hold no queue (actions are large: a publication each).
            self.actions = VecDeque::new();
        }
        next
    }

    // ------------------------------------------------------------------ input

    pub fn handle_message(&mut self, now: Now, msg: Message<'_>, ctx: &mut Ctx<'_>) {
        if self.is_closed() {
            return;
        }
        self.last_heard = now.mono;
        if matches!(
            msg,
            Message::Text(_) | Message::Binary(_) | Message::Ping(_)
        ) && !self.bucket.try_take(now.mono, self.rate, 1)
        {
            return self.rate_limited(now, &msg, ctx.limits);
        }
        match msg {
            Message::Text(raw) => self.handle_text(now, raw, ctx, true),
            Message::Binary(_) => {
                self.close(close::UNSUPPORTED_DATA, "binary frames are not supported")
            }
            Message::Ping(p) => self.reply(Reply::WsPong(p.to_vec())),
            Message::Pong => {}
            Message::Close(_) => self.close(close::NORMAL, ""),
        }
    }

    /// One message of an HTTP publish request: handled as an item of a batch (a batch
    /// inside it is refused), charged to the user's publish bucket, not to a connection's.
    pub fn handle_item(&mut self, now: Now, raw: &[u8], ctx: &mut Ctx<'_>) {
        if !self.is_closed() {
            self.handle_text(now, raw, ctx, false);
        }
    }

    /// A message over the rate is dropped with `error` 429; dropping for longer than
    /// `abuse_close_after` without a quiet second closes the connection (1008).
    fn rate_limited(&mut self, now: Now, msg: &Message<'_>, limits: &Limits) {
        self.actions.push_back(Action::Breach(Limit::MessageRate));
        let rare = self.rare_mut();
        let quiet = rare
            .last_drop
            .is_none_or(|t| now.mono.saturating_duration_since(t) >= Duration::from_secs(1));
        if quiet {
            rare.abuse_since = Some(now.mono);
        }
        rare.last_drop = Some(now.mono);
        let since = rare.abuse_since.unwrap_or(now.mono);
        if now.mono.saturating_duration_since(since) >= limits.abuse_close_after() {
            self.actions.push_back(Action::Breach(Limit::RateAbuse));
            return self.close(close::POLICY_VIOLATION, "message rate exceeded");
        }
        let id = match msg {
            Message::Text(raw) => json::member(raw, "id")
                .filter(|v| matches!(v.first(), Some(b'"' | b'-' | b'0'..=b'9'))),
            _ => None,
        };
        self.send_error(
            now,
            id,
            &ProtoError::new(429, format!("over {} messages per second", self.rate)),
        );
    }

    /// When [`Session::handle_tick`] next has something to do (`None`: closed). Deadlines
    /// only move later on input, except that an `auth` message can bring them forward:
    /// ask again after input.
    pub fn next_deadline(&self, now: Now) -> Option<Instant> {
        let mut at = match self.state {
            State::Closed => return None,
            State::AwaitingAuth { deadline } => deadline,
            State::Active => self.next_ping,
        };
        at = at
            .min(self.next_ping)
            .min(self.last_heard + self.heartbeat() * 2);
        if let Some(f) = self.flush_at() {
            at = at.min(f);
        }
        if let Some(exp) = self.principal.as_ref().and_then(|p| p.expires_at) {
            let left_ms = (exp as i64 * 1000).saturating_sub(now.unix_ms).max(0);
            at = at.min(now.mono + Duration::from_millis(left_ms as u64));
        }
        Some(at)
    }

    /// The credential this session authenticated with was revoked (the shard asks the
    /// authenticator after a reload): error 401, then close 4001, as for an expired token.
    pub fn handle_revoked(&mut self, now: Now) {
        if self.is_closed() {
            return;
        }
        self.send_error(now, None, &ProtoError::new(401, "credential revoked"));
        self.close(close::CREDENTIAL_REVOKED, "credential revoked");
    }

    pub fn handle_tick(&mut self, now: Now) {
        match self.state {
            State::Closed => return,
            State::AwaitingAuth { deadline } if now.mono >= deadline => {
                self.actions.push_back(Action::Breach(Limit::AuthTimeout));
                self.send_error(now, None, &ProtoError::new(408, "authentication timed out"));
                self.close(close::POLICY_VIOLATION, "auth timeout");
                return;
            }
            _ => {}
        }
        if let Some(exp) = self.principal.as_ref().and_then(|p| p.expires_at)
            && now.unix_secs() >= exp
        {
            self.send_error(now, None, &ProtoError::new(401, "token expired"));
            self.close(close::TOKEN_EXPIRED, "token expired");
            return;
        }
        if now.mono.saturating_duration_since(self.last_heard) >= self.heartbeat() * 2 {
            self.close(close::HEARTBEAT_TIMEOUT, "heartbeat timeout");
            return;
        }
        if now.mono >= self.next_ping {
            self.reply(Reply::Heartbeat);
            self.next_ping = now.mono + self.heartbeat();
        }
        if self.flush_at().is_some_and(|f| now.mono >= f) {
            self.flush_throttled(now.mono);
        }
    }

    /// Sends the held updates whose interval has passed, forgets entities quiet for a whole
    /// interval, and finds the next due time.
    fn flush_throttled(&mut self, now: Instant) {
        let mut next: Option<Instant> = None;
        for sub in self.subs.iter_mut().flatten() {
            let Some(t) = sub.throttle.as_mut() else {
                continue;
            };
            let every = t.every;
            t.entities.retain(|_, (last, held)| {
                let due = *last + every;
                if now < due {
                    if held.is_some() {
                        next = Some(next.map_or(due, |n| n.min(due)));
                    }
                    return true;
                }
                match held.take() {
                    Some(event) => {
                        *last = now;
                        next = Some(next.map_or(now + every, |n| n.min(now + every)));
                        self.actions.push_back(Action::Deliver {
                            event,
                            view: sub.view.clone(),
                        });
                        true
                    }
                    None => false,
                }
            });
        }
        if let Some(r) = self.rare.as_mut() {
            r.flush_at = next;
        } else if next.is_some() {
            self.rare_mut().flush_at = next;
        }
    }

    /// Records the snapshot fence for `channel` (after the shard sent the snapshot).
    pub fn set_fence(&mut self, channel: Channel, fence: Fence) {
        if let Some(sub) = self.subs[channel.index()].as_mut() {
            sub.fence = (fence.all || !fence.seqs.is_empty()).then(|| Box::new(fence));
        }
    }

    /// Decides whether and how an event routed to this connection is delivered.
    /// Cheap: integer and short-list comparisons, no JSON.
    pub fn verdict(&mut self, ev: &Arc<Event>, now: Instant) -> Verdict {
        let Some(sub) = self.subs[ev.channel.index()].as_mut() else {
            return Verdict::Skip;
        };
        if let Some(f) = &sub.fence {
            if ev.seq > f.max {
                sub.fence = None;
            } else if f.all {
                return Verdict::Skip;
            } else if let Some(k) = ev.keys.state_key(ev.channel)
                && f.seqs.get(k).is_some_and(|&s| ev.seq <= s)
            {
                return Verdict::Skip;
            }
        }
        let listed = |list: &[Box<str>], v: &Option<Box<str>>| {
            list.is_empty() || v.as_ref().is_some_and(|v| list.contains(v))
        };
        if let Some(l) = &sub.lists
            && (!listed(&l.severities, &ev.severity)
                || !listed(&l.categories, &ev.category)
                || !listed(&l.status_types, &ev.status))
        {
            return Verdict::Skip;
        }
        if let Some(t) = sub.throttle.as_mut() {
            // Per entity; the figures of `system` and `fleet_metrics` are one stream.
            let key = ev.keys.state_key(ev.channel).unwrap_or("");
            match t.entities.get_mut(key) {
                Some((last, held)) if now < *last + t.every => {
                    let due = *last + t.every;
                    *held = Some(ev.clone());
                    let rare = self.rare.get_or_insert_with(Default::default);
                    rare.flush_at = Some(rare.flush_at.map_or(due, |f| f.min(due)));
                    return Verdict::Held(due);
                }
                Some((last, held)) => {
                    *last = now;
                    *held = None;
                }
                None => {
                    t.entities.insert(key.into(), (now, None));
                    // Quiet entities are forgotten at the next flush.
                    let due = now + t.every;
                    let rare = self.rare.get_or_insert_with(Default::default);
                    rare.flush_at = Some(rare.flush_at.map_or(due, |f| f.min(due)));
                }
            }
        }
        match &sub.view {
            Some(v) => Verdict::Projected(v.clone()),
            None => Verdict::Shared,
        }
    }

    // ------------------------------------------------------------------ internals

    fn reply(&mut self, reply: Reply) {
        self.actions.push_back(Action::Reply(reply));
    }

    fn send_error(&mut self, _now: Now, id: Option<&[u8]>, e: &ProtoError) {
        self.reply(Reply::Error {
            id: id.map(<[u8]>::to_vec),
            error: e.clone(),
        });
    }

    fn close(&mut self, code: u16, reason: &'static str) {
        if self.state != State::Closed {
            self.state = State::Closed;
            self.actions.push_back(Action::Close { code, reason });
        }
    }

    fn handle_text(&mut self, now: Now, raw: &[u8], ctx: &mut Ctx<'_>, top_level: bool) {
        let (id_range, cmd) = self.codec().decode(
            ctx.parser,
            raw,
            self.rare.as_ref().and_then(|r| r.acting_as.as_deref()),
        );
        let id = id_range.map(|r| &raw[r]);
        let cmd = match cmd {
            Ok(c) => c,
            Err(e) => return self.send_error(now, id, &e),
        };
        let authed = self.state == State::Active;
        let result = match cmd {
            Command::Auth(a) => self.handle_auth(now, id, a, ctx),
            Command::Ping => {
                self.reply(Reply::Pong {
                    id: id.map(<[u8]>::to_vec),
                });
                Ok(())
            }
            Command::Ack => Ok(()),
            _ if !authed => Err(ProtoError::new(401, "authenticate first")),
            Command::Subscribe(s) => self.handle_subscribe(now, id, s, ctx.limits),
            Command::Publish(p) => self.handle_publish(now, id, raw, p, ctx.limits),
            Command::Batch(_) if !top_level => {
                Err(ProtoError::field("messages", "batches do not nest"))
            }
            Command::Batch(items) => self.handle_batch(now, raw, items, ctx),
        };
        if let Err(e) = result {
            self.send_error(now, id, &e);
        }
    }

    fn handle_batch(
        &mut self,
        now: Now,
        raw: &[u8],
        items: Vec<Range<usize>>,
        ctx: &mut Ctx<'_>,
    ) -> Result<(), ProtoError> {
        if items.len() > ctx.limits.max_batch {
            self.actions.push_back(Action::Breach(Limit::BatchSize));
            return Err(ProtoError::field(
                "messages",
                format!("a batch holds at most {} messages", ctx.limits.max_batch),
            ));
        }
        // A batch costs one message per item, so batching does not bypass the rate.
        let extra = items.len().saturating_sub(1) as u32;
        if extra > 0 && !self.bucket.try_take(now.mono, self.rate, extra) {
            self.actions.push_back(Action::Breach(Limit::MessageRate));
            return Err(ProtoError::new(
                429,
                format!(
                    "batch of {} is over {} messages per second",
                    items.len(),
                    self.rate
                ),
            ));
        }
        for item in items {
            if self.is_closed() {
                break;
            }
            self.handle_text(now, &raw[item], ctx, false);
        }
        Ok(())
    }

    fn handle_auth(
        &mut self,
        now: Now,
        id: Option<&[u8]>,
        a: AuthRequest,
        ctx: &mut Ctx<'_>,
    ) -> Result<(), ProtoError> {
        let cred = match (&a.token, &a.api_key, &a.session_hash) {
            (Some(t), _, _) => Some(Credential::Token(t)),
            (None, Some(k), _) => Some(Credential::ApiKey(k)),
            (None, None, Some(h)) => Some(Credential::SessionHash(h)),
            (None, None, None) => None,
        };
        let verified = match cred {
            Some(c) => ctx
                .auth
                .authenticate(c, now.unix_secs())
                .map_err(|e| auth_error(&e)),
            // A repeat without a credential on an authenticated connection is fine.
            None => self
                .principal
                .clone()
                .ok_or_else(|| ProtoError::new(401, "auth needs api_key or token")),
        };
        let principal = verified.and_then(|p| {
            let tenant_ok = a.fleet_id.as_deref().is_none_or(|f| f == &*p.tenant)
                && match &self.scope {
                    Scope::Fleet(f) => **f == *p.tenant,
                    _ => true,
                };
            if tenant_ok {
                Ok(p)
            } else if a.fleet_must_exist
                && a.fleet_id
                    .as_deref()
                    .is_some_and(|f| !ctx.auth.knows_tenant(f))
            {
                Err(ProtoError::new(404, "instance not found"))
            } else {
                Err(ProtoError::new(
                    403,
                    "credential does not belong to this fleet",
                ))
            }
        });
        let principal = match (principal, &a.acting_as) {
            (Ok(p), Some((user, role))) => acting_for(&p, user, *role).map(|()| p),
            (other, _) => other,
        };
        match (&self.state, principal) {
            (State::Active, Ok(p)) => {
                let current = self.principal.as_ref().expect("active has a principal");
                if !current.same_identity(&p) {
                    return Err(ProtoError::new(
                        409,
                        "connection is authenticated as another principal",
                    ));
                }
                // Same identity: take the new credential's expiry (a refreshed token).
                self.principal = Some(p);
            }
            (State::Active, Err(e)) => return Err(e),
            (_, Ok(p)) => {
                if let Err(limit) = ctx.admission.admit(&p, now) {
                    self.actions.push_back(Action::Breach(limit));
                    self.reply(Reply::AuthError {
                        id: id.map(<[u8]>::to_vec),
                        code: limit.code(),
                        message: limit.message().into(),
                    });
                    self.close(close::POLICY_VIOLATION, "too many connections");
                    return Ok(());
                }
                let rate = ctx.limits.for_role(p.role).messages_per_second;
                self.bucket.change_rate(now.mono, self.rate, rate);
                self.rate = rate;
                self.publish_bucket = ctx.admission.publish_bucket(&p, now);
                self.principal = Some(p);
                self.state = State::Active;
                self.actions.push_back(Action::Authenticated);
            }
            (_, Err(e)) => {
                self.reply(Reply::AuthError {
                    id: id.map(<[u8]>::to_vec),
                    code: e.code,
                    message: e.message.as_ref().into(),
                });
                self.close(close::POLICY_VIOLATION, "authentication failed");
                return Ok(());
            }
        }
        if let Some((user, _)) = a.acting_as {
            self.rare_mut().acting_as = Some(user.into());
        }
        if !a.echo.is_empty() {
            self.rare_mut().echo = a.echo;
        }
        if let Some(t) = a.time {
            self.rare_mut().time = Some(Arc::new(t));
        }
        self.send_auth_success(now, id, ctx.limits);
        for req in a.then_subscribe {
            if let Err(e) = self.handle_subscribe(now, None, req, ctx.limits) {
                self.send_error(now, id, &e);
            }
        }
        let preset = self.rare.as_mut().and_then(|r| r.preset.take());
        for c in a.subscriptions.into_iter().chain(preset) {
            let req = SubscribeRequest {
                action: SubAction::Subscribe,
                channel: c,
                filters: Filters::default(),
                since: None,
            };
            if let Err(e) = self.handle_subscribe(now, None, req, ctx.limits) {
                self.send_error(now, id, &e);
            }
        }
        Ok(())
    }

    fn send_auth_success(&mut self, _now: Now, id: Option<&[u8]>, limits: &Limits) {
        let p = self.principal.as_ref().expect("authenticated");
        let reply = Reply::AuthOk {
            id: id.map(<[u8]>::to_vec),
            connection_id: self.conn_id.clone(),
            principal: Principal::clone(p),
            acting_as: self.rare.as_ref().and_then(|r| r.acting_as.clone()),
            echo: self
                .rare
                .as_ref()
                .map(|r| r.echo.clone())
                .unwrap_or_default(),
            limits: ReplyLimits {
                max_message_bytes: limits.max_message_bytes,
                max_subscriptions: limits.max_subscriptions,
                max_batch: limits.max_batch,
                heartbeat_interval_ms: limits.heartbeat_interval_ms,
            },
        };
        self.reply(reply);
    }

    /// Applies the endpoint scope (`/vehicle/{id}`, `/trip/{id}`) to requested filters.
    fn scoped(&self, mut f: Filters) -> Result<Filters, ProtoError> {
        let outside = || ProtoError::new(403, "filter outside this endpoint's scope");
        match &self.scope {
            Scope::Vehicle(v) => {
                if f.vehicles.iter().any(|x| x != v) || !f.trips.is_empty() || !f.drivers.is_empty()
                {
                    return Err(outside());
                }
                f.vehicles = vec![v.clone()];
            }
            Scope::Trip(t) => {
                if f.trips.iter().any(|x| x != t) || !f.vehicles.is_empty() || !f.drivers.is_empty()
                {
                    return Err(outside());
                }
                f.trips = vec![t.clone()];
            }
            Scope::None | Scope::Fleet(_) => {}
        }
        Ok(f)
    }

    fn handle_subscribe(
        &mut self,
        now: Now,
        id: Option<&[u8]>,
        req: SubscribeRequest,
        limits: &Limits,
    ) -> Result<(), ProtoError> {
        // A channel the dialect shows as part of this one is (un)subscribed alongside.
        let twin = match req.action {
            SubAction::Request => None,
            action => self
                .codec()
                .companion(req.channel)
                .map(|channel| SubscribeRequest {
                    action,
                    channel,
                    filters: req.filters.clone(),
                    since: None,
                }),
        };
        self.handle_subscribe_one(now, id, req, limits)?;
        match twin {
            Some(t) => self.handle_subscribe_one(now, id, t, limits),
            None => Ok(()),
        }
    }

    fn handle_subscribe_one(
        &mut self,
        now: Now,
        id: Option<&[u8]>,
        req: SubscribeRequest,
        limits: &Limits,
    ) -> Result<(), ProtoError> {
        let role = self.principal.as_ref().expect("authenticated").role;
        let channel = self.codec().channel_for_role(req.channel, role);
        if req.action != SubAction::Unsubscribe && !role.may_subscribe(channel) {
            return Err(ProtoError::new(
                403,
                format!("role {} may not subscribe to {channel}", role.name()),
            ));
        }
        let f = self.scoped(req.filters)?;
        let requested = Selection {
            all: !f.has_entities(),
            vehicles: f.vehicles.clone(),
            trips: f.trips.clone(),
            drivers: f.drivers.clone(),
        };
        // A viewer that follows only its listed vehicles (an iTrack login user).
        if req.action != SubAction::Unsubscribe
            && let Some(why) = self.principal.as_ref().and_then(|p| {
                let others = !requested.trips.is_empty() || !requested.drivers.is_empty();
                p.refusal_to_follow(requested.all, &requested.vehicles, others)
            })
        {
            return Err(ProtoError::new(403, why));
        }
        let heavy = req.action == SubAction::Request
            || (req.action == SubAction::Subscribe && req.since.is_some());
        let request_rate = self.request_rate;
        if heavy
            && !self
                .rare_mut()
                .requests
                .get_or_insert_with(|| Bucket::new(now.mono, request_rate))
                .try_take(now.mono, request_rate, 1)
        {
            self.actions.push_back(Action::Breach(Limit::RequestRate));
            return Err(ProtoError::new(
                429,
                format!(
                    "over {} snapshot and history requests per second",
                    self.request_rate
                ),
            ));
        }
        match req.action {
            SubAction::Request => {
                if !channel.is_state() {
                    return Err(ProtoError::new(
                        400,
                        format!(
                            "{channel} keeps no state to request; subscribe with since for history"
                        ),
                    ));
                }
                self.actions.push_back(Action::SnapshotRequest {
                    channel,
                    selection: requested,
                    id: id.map(<[u8]>::to_vec),
                });
            }
            SubAction::Subscribe => {
                let sub = self.subs[channel.index()].get_or_insert_with(Default::default);
                let added = Selection {
                    all: requested.all && !sub.keys.all,
                    vehicles: new_keys(&requested.vehicles, &sub.keys.vehicles),
                    trips: new_keys(&requested.trips, &sub.keys.trips),
                    drivers: new_keys(&requested.drivers, &sub.keys.drivers),
                };
                if self.sub_count + added.len() > limits.max_subscriptions {
                    self.actions.push_back(Action::Breach(Limit::Subscriptions));
                    if sub.keys.is_empty() {
                        self.subs[channel.index()] = None;
                    }
                    return Err(ProtoError::new(
                        400,
                        format!(
                            "at most {} subscriptions per connection",
                            limits.max_subscriptions
                        ),
                    ));
                }
                self.sub_count += added.len();
                sub.keys.all |= added.all;
                sub.keys.vehicles.extend(added.vehicles.iter().cloned());
                sub.keys.trips.extend(added.trips.iter().cloned());
                sub.keys.drivers.extend(added.drivers.iter().cloned());
                sub.lists = (!f.severities.is_empty()
                    || !f.categories.is_empty()
                    || !f.status_types.is_empty())
                .then(|| {
                    Box::new(ValueFilters {
                        severities: f.severities.clone(),
                        categories: f.categories.clone(),
                        status_types: f.status_types.clone(),
                    })
                });
                let view = View {
                    metrics: (!f.metrics.is_empty()).then(|| f.metrics.clone().into()),
                    time: self.rare.as_ref().and_then(|r| r.time.clone()),
                    states: crate::dialect::codec(self.dialect)
                        .shows_tracker_states()
                        .then(|| self.rare.as_ref().and_then(|r| r.state_rules.clone()))
                        .flatten(),
                };
                sub.view = (!view.is_plain()).then(|| Arc::new(view));
                // `frequency` thins state channels and the periodic figures (system,
                // fleet_metrics); events (alerts) are never thinned.
                let every = f
                    .frequency_ms
                    .filter(|&ms| ms > 0 && !channel.is_event())
                    .map(Duration::from_millis);
                if sub.throttle.as_ref().map(|t| t.every) != every {
                    sub.throttle = every.map(|every| {
                        Box::new(Throttle {
                            every,
                            entities: HashMap::new(),
                        })
                    });
                }
                // The shard completes the reply: stream position and `recovered`.
                let reply = Reply::Subscribed {
                    id: id.map(<[u8]>::to_vec),
                    channel,
                    filters: f.clone(),
                    position: None,
                };
                self.actions.push_back(Action::Subscribe {
                    channel,
                    added,
                    snapshot: if self.codec().snapshot_on_subscribe() {
                        requested
                    } else {
                        Selection::default()
                    },
                    since: req.since,
                    reply,
                });
            }
            SubAction::Unsubscribe => {
                let removed = match self.subs[channel.index()].as_mut() {
                    None => Selection::default(),
                    Some(sub) if requested.all => {
                        let keys = std::mem::take(&mut sub.keys);
                        self.subs[channel.index()] = None;
                        keys
                    }
                    Some(sub) => {
                        let removed = Selection {
                            all: false,
                            vehicles: take_keys(&mut sub.keys.vehicles, &requested.vehicles),
                            trips: take_keys(&mut sub.keys.trips, &requested.trips),
                            drivers: take_keys(&mut sub.keys.drivers, &requested.drivers),
                        };
                        if sub.keys.is_empty() {
                            self.subs[channel.index()] = None;
                        }
                        removed
                    }
                };
                self.sub_count -= removed.len();
                self.reply(Reply::Unsubscribed {
                    id: id.map(<[u8]>::to_vec),
                    channel,
                    filters: f.clone(),
                });
                if !removed.is_empty() {
                    self.actions
                        .push_back(Action::Unsubscribe { channel, removed });
                }
            }
        }
        Ok(())
    }

    fn handle_publish(
        &mut self,
        now: Now,
        id: Option<&[u8]>,
        raw: &[u8],
        p: PublishRequest,
        limits: &Limits,
    ) -> Result<(), ProtoError> {
        let principal = self.principal.as_ref().expect("authenticated");
        let channel = p.channel;
        if !principal.role.may_publish(channel) {
            return Err(ProtoError::new(
                403,
                format!(
                    "role {} may not publish to {channel}",
                    principal.role.name()
                ),
            ));
        }
        if p.fleet_id
            .as_deref()
            .is_some_and(|f| f != &*principal.tenant)
        {
            return Err(ProtoError::new(403, "cannot publish for another fleet"));
        }
        let vehicle = p.keys.vehicle.as_deref();
        let mut bind_check = crate::event::BindCheck::default();
        if principal.role == Role::Device {
            // Every id the store or routing uses must be within the device's scope: its
            // vehicles, or itself when its user id is the vehicle it acts as (a Tracking
            // driver whose token names only its user).
            let own = |v: &str| {
                principal.may_act_for_vehicle(v)
                    || (self.rare.as_ref().and_then(|r| r.acting_as.as_deref()) == Some(v)
                        && &*principal.user_id == v)
            };
            // A dialect whose id is `device_id` hears its own field name.
            if p.device_id.as_deref().is_some_and(|d| !own(d)) {
                return Err(ProtoError::forbidden(
                    "device_id",
                    "device may only publish for its own vehicle",
                ));
            }
            if !vehicle.is_some_and(own) {
                return Err(ProtoError::forbidden(
                    "vehicle_id",
                    "device may only publish for its own vehicle",
                ));
            }
            // Trips and drivers the credential does not list must be bound to the
            // vehicle (its current trip); the store checks that under its lock.
            bind_check.trip = p
                .keys
                .trip
                .as_deref()
                .is_some_and(|t| !principal.lists_trip(t));
            bind_check.driver = p
                .keys
                .driver
                .as_deref()
                .is_some_and(|d| !principal.lists_driver(d));
        }
        if let Scope::Vehicle(v) = &self.scope
            && vehicle.is_some_and(|x| x != &**v)
        {
            return Err(ProtoError::new(
                403,
                "vehicle outside this endpoint's scope",
            ));
        }
        let (timestamp, ts_ms) = match &p.timestamp {
            Some((r, ms)) => {
                let s = json::unescape(&raw[r.start + 1..r.end - 1]);
                (s.into_owned(), *ms)
            }
            None => (now.rfc3339(), now.unix_ms),
        };
        if ts_ms > now.unix_ms.saturating_add(limits.max_future_skew_ms as i64) {
            self.actions
                .push_back(Action::Breach(Limit::FutureTimestamp));
            return Err(ProtoError::field(
                "timestamp",
                format!(
                    "timestamp is more than {} s ahead of the broker's clock",
                    limits.max_future_skew_ms / 1000
                ),
            ));
        }
        if let Some(b) = &self.publish_bucket
            && !b.try_take(now.mono)
        {
            self.actions.push_back(Action::Breach(Limit::PublishRate));
            return Err(ProtoError::new(
                429,
                format!("over {} publishes per second for this user", b.rate()),
            ));
        }
        let publisher = principal.user_id.clone();
        self.actions.push_back(Action::Publish(Publication {
            channel,
            id: id.map(<[u8]>::to_vec),
            payload: p.synthesized.unwrap_or_else(|| raw[p.payload].to_vec()),
            canon: p.canon,
            ack: p.ack,
            keys: p.keys,
            severity: p.severity,
            category: p.category,
            status: p.status,
            timestamp,
            ts_ms,
            publisher,
            bind_check,
        }));
        Ok(())
    }
}

/// The first heartbeat ping comes after 0.5 to 1.5 intervals, by a hash of the connection
/// id: connections opened together (a reconnect storm, a load test) are then pinged, and
/// answer, spread over the interval instead of all in the same loop turn.
fn first_ping_after(conn_id: &str, heartbeat: Duration) -> Duration {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    conn_id.hash(&mut h);
    let phase = (h.finish() >> 11) as f64 / (1u64 << 53) as f64;
    heartbeat.mul_f64(0.5 + phase)
}

fn new_keys(requested: &[Box<str>], existing: &[Box<str>]) -> Vec<Box<str>> {
    let mut out: Vec<Box<str>> = Vec::new();
    for k in requested {
        if !existing.contains(k) && !out.contains(k) {
            out.push(k.clone());
        }
    }
    out
}

fn take_keys(existing: &mut Vec<Box<str>>, requested: &[Box<str>]) -> Vec<Box<str>> {
    let mut removed = Vec::new();
    existing.retain(|k| {
        let drop = requested.contains(k);
        if drop {
            removed.push(k.clone());
        }
        !drop
    });
    removed
}

fn auth_error(e: &AuthError) -> ProtoError {
    ProtoError::new(401, e.to_string())
}

#[cfg(test)]
mod tests {
    //! The session driven with a fake clock: no sockets, no sleeps.
    use super::*;
    use crate::config::{ApiKeyConfig, AuthConfig};
    use crate::model::{EntityKeys, Role};
    use serde_json::Value;

    struct Fixture {
        limits: Limits,
        auth: Authenticator,
        parser: Parser,
        t0: Instant,
    }

    const VIEWER: &str = "viewer-key-0123456789";
    const DEVICE: &str = "device-key-0123456789";
    const SECRET: &str = "session-test-secret-0123456789";

    impl Fixture {
        fn new() -> Fixture {
            let key = |k: &str, role| ApiKeyConfig {
                key: k.into(),
                key_sha256: None,
                user_id: format!("u-{k}"),
                tenant: "fleet_a".into(),
                role,
                vehicles: if role == Role::Device {
                    vec!["v1".into()]
                } else {
                    vec![]
                },
                drivers: vec![],
                trips: vec![],
            };
            let auth = Authenticator::new(&AuthConfig {
                api_keys: vec![key(VIEWER, Role::Viewer), key(DEVICE, Role::Device)],
                jwt_hs256_secret: Some(SECRET.into()),
                // Expiry to the second (the leeway is tested in auth.rs).
                jwt_leeway_s: 0,
                ..Default::default()
            })
            .unwrap();
            Fixture {
                limits: Limits::default(),
                auth,
                parser: Parser::default(),
                t0: Instant::now(),
            }
        }

        fn at(&self, ms: u64) -> Now {
            Now {
                mono: self.t0 + Duration::from_millis(ms),
                unix_ms: 1_700_000_000_000 + ms as i64,
            }
        }

        fn session(&self, scope: Scope) -> Session {
            Session::new("c0-1-1".into(), scope, None, self.t0, &self.limits)
        }

        fn send(&mut self, s: &mut Session, ms: u64, text: &str) -> Vec<Action> {
            let now = self.at(ms);
            let mut ctx = Ctx {
                limits: &self.limits,
                auth: &self.auth,
                parser: &mut self.parser,
                admission: &AdmitAll,
            };
            s.handle_message(now, Message::Text(text.as_bytes()), &mut ctx);
            std::iter::from_fn(|| s.poll_action()).collect()
        }
    }

    /// The JSON of every reply that the native dialect sends as a text frame.
    fn texts(actions: &[Action]) -> Vec<Value> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Reply(r) => {
                    let f = crate::dialect::native::Native.encode_reply(r, "t")?;
                    if f[0] != 0x81 {
                        return None;
                    }
                    let hl = match f[1] & 0x7f {
                        126 => 4,
                        127 => 10,
                        _ => 2,
                    };
                    serde_json::from_slice(&f[hl..]).ok()
                }
                _ => None,
            })
            .collect()
    }

    fn closes(actions: &[Action]) -> Vec<u16> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Close { code, .. } => Some(*code),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn auth_message_then_subscribe_emits_index_and_snapshot_actions() {
        let mut f = Fixture::new();
        let mut s = f.session(Scope::None);
        let a = f.send(
            &mut s,
            1,
            &format!(r#"{{"type":"auth","id":"a","payload":{{"api_key":"{VIEWER}"}}}}"#),
        );
        assert!(matches!(a[0], Action::Authenticated));
        let t = texts(&a);
        assert_eq!(
            (t[0]["type"].as_str(), t[0]["id"].as_str()),
            (Some("auth_success"), Some("a"))
        );
        assert_eq!(t[0]["payload"]["fleet_id"], "fleet_a");
        let a = f.send(&mut s, 2, r#"{"type":"subscribe","id":7,"payload":{"action":"subscribe","channel":"vehicle_locations","filters":{"vehicle_ids":["v1","v2"]}}}"#);
        let Action::Subscribe {
            channel,
            added,
            snapshot,
            since: None,
            reply,
        } = &a[0]
        else {
            panic!("{a:?}")
        };
        let reply = &texts(&[Action::Reply(reply.clone())])[0];
        assert_eq!(
            (reply["type"].as_str(), reply["id"].as_u64()),
            (Some("subscribed"), Some(7))
        );
        assert_eq!(*channel, Channel::VehicleLocations);
        assert_eq!(added.vehicles, vec!["v1".into(), "v2".into()]);
        assert_eq!(snapshot, added);
        // Subscribing v2 and v3 adds only v3 to the index.
        let a = f.send(&mut s, 3, r#"{"type":"subscribe","payload":{"channel":"vehicle_locations","filters":{"vehicle_id":["v2","v3"]}}}"#);
        let Action::Subscribe { added, .. } = &a[0] else {
            panic!()
        };
        assert_eq!(added.vehicles, vec!["v3".into()]);
        assert_eq!(s.subscription_count(), 3);
        let a = f.send(
            &mut s,
            4,
            r#"{"type":"unsubscribe","payload":{"channel":"vehicle_locations"}}"#,
        );
        let Action::Unsubscribe { removed, .. } = &a[1] else {
            panic!()
        };
        assert_eq!(removed.vehicles.len(), 3);
        assert_eq!(s.subscription_count(), 0);
    }

    #[test]
    fn auth_failure_and_timeout_close() {
        let mut f = Fixture::new();
        let mut s = f.session(Scope::None);
        let a = f.send(
            &mut s,
            1,
            r#"{"type":"auth","id":"x","payload":{"api_key":"nope-nope-nope-nope"}}"#,
        );
        assert_eq!(texts(&a)[0]["type"], "auth_error");
        assert_eq!(texts(&a)[0]["payload"]["code"], 401);
        assert_eq!(closes(&a), vec![close::POLICY_VIOLATION]);

        let mut s = f.session(Scope::None);
        s.handle_tick(f.at(9_999));
        assert!(s.poll_action().is_none());
        s.handle_tick(f.at(10_000));
        let a: Vec<Action> = std::iter::from_fn(|| s.poll_action()).collect();
        assert_eq!(texts(&a)[0]["payload"]["code"], 408);
        assert_eq!(closes(&a), vec![close::POLICY_VIOLATION]);
    }

    #[test]
    fn auth_message_switches_to_the_roles_rate_and_burst() {
        let mut f = Fixture::new();
        f.limits.messages_per_second = 10;
        f.limits.roles.device.messages_per_second = Some(1_000);
        let mut s = f.session(Scope::None);
        let ping = r#"{"type":"ping"}"#;
        for _ in 0..5 {
            f.send(&mut s, 0, ping);
        }
        f.send(
            &mut s,
            0,
            &format!(r#"{{"type":"auth","payload":{{"api_key":"{DEVICE}"}}}}"#),
        );
        // 1000 of burst, 6 of them spent before and with the auth message.
        let refused = |a: &[Action]| texts(a).iter().any(|m| m["payload"]["code"] == 429);
        for i in 0..994 {
            assert!(!refused(&f.send(&mut s, 0, ping)), "ping {i} refused");
        }
        assert!(refused(&f.send(&mut s, 0, ping)));
    }

    #[test]
    fn heartbeat_pings_then_times_out() {
        let mut f = Fixture::new();
        let mut s = f.session(Scope::None);
        f.send(
            &mut s,
            0,
            &format!(r#"{{"type":"auth","payload":{{"api_key":"{VIEWER}"}}}}"#),
        );
        // The first ping comes 0.5 to 1.5 intervals in (a phase per connection).
        let first = s.next_deadline(f.at(0)).unwrap() - f.t0;
        assert!(
            (Duration::from_secs(15)..Duration::from_secs(45)).contains(&first),
            "{first:?}"
        );
        let first_ms = first.as_millis() as u64;
        s.handle_tick(f.at(first_ms - 1));
        assert!(s.poll_action().is_none());
        s.handle_tick(f.at(first_ms + 1));
        let a: Vec<Action> = std::iter::from_fn(|| s.poll_action()).collect();
        assert!(matches!(&a[..], [Action::Reply(Reply::Heartbeat)]), "{a:?}");
        // Silent since 0: closed after two intervals.
        assert_eq!(
            s.next_deadline(f.at(first_ms + 1)),
            Some(f.t0 + Duration::from_secs(60))
        );
        s.handle_tick(f.at(59_999));
        assert!(closes(&std::iter::from_fn(|| s.poll_action()).collect::<Vec<_>>()).is_empty());
        s.handle_tick(f.at(60_000));
        let a: Vec<Action> = std::iter::from_fn(|| s.poll_action()).collect();
        assert_eq!(closes(&a), vec![close::HEARTBEAT_TIMEOUT]);
    }

    #[test]
    fn device_publishes_only_for_its_vehicle_and_vehicle_scope_applies() {
        let mut f = Fixture::new();
        let mut s = f.session(Scope::None);
        f.send(
            &mut s,
            0,
            &format!(r#"{{"type":"auth","payload":{{"api_key":"{DEVICE}"}}}}"#),
        );
        let ok = r#"{"type":"location_update","id":"m","ack":true,"payload":{"vehicle_id":"v1","location":{"latitude":1,"longitude":2}}}"#;
        let a = f.send(&mut s, 1, ok);
        let Action::Publish(p) = &a[0] else {
            panic!("{a:?}")
        };
        assert_eq!(p.keys.vehicle.as_deref(), Some("v1"));
        assert_eq!(p.id.as_deref(), Some(&b"\"m\""[..]));
        let a = f.send(&mut s, 2, &ok.replace("\"v1\"", "\"v2\""));
        assert_eq!(texts(&a)[0]["payload"]["code"], 403);
        assert_eq!(a.len(), 1);
        let a = f.send(
            &mut s,
            3,
            r#"{"type":"subscribe","id":"s","payload":{"channel":"alerts"}}"#,
        );
        assert_eq!(texts(&a)[0]["payload"]["code"], 403);

        let mut s = f.session(Scope::Vehicle("v9".into()));
        f.send(
            &mut s,
            0,
            &format!(r#"{{"type":"auth","payload":{{"api_key":"{VIEWER}"}}}}"#),
        );
        let a = f.send(
            &mut s,
            1,
            r#"{"type":"subscribe","payload":{"channel":"telemetry"}}"#,
        );
        let Action::Subscribe { added, .. } = &a[0] else {
            panic!()
        };
        assert_eq!(
            (added.all, added.vehicles.clone()),
            (false, vec!["v9".into()])
        );
        let a = f.send(&mut s, 2, r#"{"type":"subscribe","id":"z","payload":{"channel":"telemetry","filters":{"vehicle_id":"v1"}}}"#);
        assert_eq!(texts(&a)[0]["payload"]["code"], 403);
        assert_eq!(texts(&a)[0]["id"], "z");
    }

    #[test]
    fn first_pings_are_spread_over_the_interval() {
        let h = Duration::from_secs(30);
        let mut buckets = [0u32; 10];
        for i in 0..10_000 {
            let d = first_ping_after(&format!("c0-{i}-{i}"), h);
            assert!(d >= h / 2 && d < h * 3 / 2, "{d:?}");
            buckets[((d - h / 2).as_secs_f64() / 3.0) as usize] += 1;
        }
        // Uniform: each tenth of the interval gets about 1 000 of 10 000 connections.
        assert!(
            buckets.iter().all(|&n| (800..1200).contains(&n)),
            "{buckets:?}"
        );
    }

    #[test]
    fn refreshed_token_extends_the_connection() {
        let mut f = Fixture::new();
        let mut s = f.session(Scope::None);
        // f.at(ms) is UNIX 1_700_000_000 s + ms.
        let exp1 = 1_700_000_010;
        let t1 = crate::auth::mint_hs256(SECRET, "d", "fleet_a", Role::Viewer, exp1, None).unwrap();
        let t2 =
            crate::auth::mint_hs256(SECRET, "d", "fleet_a", Role::Viewer, exp1 + 60, None).unwrap();
        f.send(
            &mut s,
            0,
            &format!(r#"{{"type":"auth","payload":{{"token":"{t1}"}}}}"#),
        );
        let a = f.send(
            &mut s,
            5_000,
            &format!(r#"{{"type":"auth","payload":{{"token":"{t2}"}}}}"#),
        );
        assert_eq!(texts(&a)[0]["type"], "auth_success");
        s.handle_tick(f.at(10_000));
        let a: Vec<Action> = std::iter::from_fn(|| s.poll_action()).collect();
        assert!(closes(&a).is_empty(), "{a:?}");
        s.handle_tick(f.at(70_000));
        let a: Vec<Action> = std::iter::from_fn(|| s.poll_action()).collect();
        assert_eq!(closes(&a), vec![close::TOKEN_EXPIRED]);
    }

    #[test]
    fn verdict_applies_value_filters_and_fence() {
        let mut f = Fixture::new();
        let mut s = f.session(Scope::None);
        f.send(
            &mut s,
            0,
            &format!(r#"{{"type":"auth","payload":{{"api_key":"{VIEWER}"}}}}"#),
        );
        f.send(&mut s, 1, r#"{"type":"subscribe","payload":{"channel":"alerts","filters":{"severity":["high"]}}}"#);
        f.send(
            &mut s,
            1,
            r#"{"type":"subscribe","payload":{"channel":"vehicle_locations"}}"#,
        );
        let ev = |channel, seq, vehicle: &str, severity: Option<&str>| {
            let p = Publication {
                channel,
                id: None,
                payload: b"{}".to_vec(),
                keys: EntityKeys {
                    vehicle: Some(vehicle.into()),
                    trip: None,
                    driver: None,
                },
                severity: severity.map(|s: &str| s.into()),
                category: None,
                status: None,
                canon: Default::default(),
                timestamp: "t".into(),
                ts_ms: 0,
                ack: false,
                publisher: "broker".into(),
                bind_check: Default::default(),
            };
            Event::encode("fleet_a".into(), p, seq, 1, b"\"e\"", f.t0)
        };
        assert!(matches!(
            s.verdict(&Arc::new(ev(Channel::Alerts, 1, "v1", Some("high"))), f.t0),
            Verdict::Shared
        ));
        assert!(matches!(
            s.verdict(&Arc::new(ev(Channel::Alerts, 2, "v1", Some("low"))), f.t0),
            Verdict::Skip
        ));
        assert!(matches!(
            s.verdict(&Arc::new(ev(Channel::Telemetry, 1, "v1", None)), f.t0),
            Verdict::Skip
        ));
        // A snapshot sent v1 at seq 5: in-flight v1 events up to 5 are skipped, v2 is not.
        let mut fence = Fence {
            max: 6,
            ..Fence::default()
        };
        fence.seqs.insert("v1".into(), 5);
        s.set_fence(Channel::VehicleLocations, fence);
        assert!(matches!(
            s.verdict(
                &Arc::new(ev(Channel::VehicleLocations, 4, "v1", None)),
                f.t0
            ),
            Verdict::Skip
        ));
        assert!(matches!(
            s.verdict(
                &Arc::new(ev(Channel::VehicleLocations, 5, "v1", None)),
                f.t0
            ),
            Verdict::Skip
        ));
        assert!(matches!(
            s.verdict(
                &Arc::new(ev(Channel::VehicleLocations, 6, "v2", None)),
                f.t0
            ),
            Verdict::Shared
        ));
        // Past the fence's max it is dropped; later events of v1 flow.
        assert!(matches!(
            s.verdict(
                &Arc::new(ev(Channel::VehicleLocations, 7, "v1", None)),
                f.t0
            ),
            Verdict::Shared
        ));
    }

    #[test]
    fn frequency_holds_the_newest_update_per_entity_and_never_thins_alerts() {
        let mut f = Fixture::new();
        let mut s = f.session(Scope::None);
        f.send(
            &mut s,
            0,
            &format!(r#"{{"type":"auth","payload":{{"api_key":"{VIEWER}"}}}}"#),
        );
        f.send(&mut s, 0, r#"{"type":"subscribe","payload":{"channel":"telemetry","filters":{"frequency":"1s"}}}"#);
        f.send(
            &mut s,
            0,
            r#"{"type":"subscribe","payload":{"channel":"alerts","filters":{"frequency":"1s"}}}"#,
        );
        let t0 = f.t0;
        let ev = |channel, seq, vehicle: &str| {
            let p = Publication {
                channel,
                id: None,
                payload: b"{}".to_vec(),
                keys: EntityKeys {
                    vehicle: Some(vehicle.into()),
                    trip: None,
                    driver: None,
                },
                severity: None,
                category: None,
                status: None,
                canon: Default::default(),
                timestamp: "t".into(),
                ts_ms: 0,
                ack: false,
                publisher: "broker".into(),
                bind_check: Default::default(),
            };
            Arc::new(Event::encode("fleet_a".into(), p, seq, 1, b"\"e\"", t0))
        };
        let at = |ms| t0 + Duration::from_millis(ms);
        let t = Channel::Telemetry;
        assert!(matches!(s.verdict(&ev(t, 1, "v1"), at(0)), Verdict::Shared));
        assert!(matches!(
            s.verdict(&ev(t, 2, "v2"), at(10)),
            Verdict::Shared
        ));
        // Within v1's interval: held until it ends, a newer value replaces the held one.
        assert!(matches!(s.verdict(&ev(t, 3, "v1"), at(100)), Verdict::Held(d) if d == at(1000)));
        assert!(matches!(s.verdict(&ev(t, 4, "v1"), at(200)), Verdict::Held(d) if d == at(1000)));
        // Alerts are events: never thinned.
        for seq in 1..=3 {
            assert!(matches!(
                s.verdict(&ev(Channel::Alerts, seq, "v1"), at(300)),
                Verdict::Shared
            ));
        }
        while s.poll_action().is_some() {}
        assert_eq!(s.next_deadline(f.at(300)), Some(at(1000)));
        s.handle_tick(f.at(999));
        assert!(s.poll_action().is_none());
        s.handle_tick(f.at(1000));
        let delivered: Vec<u64> = std::iter::from_fn(|| s.poll_action())
            .filter_map(|a| match a {
                Action::Deliver { event, .. } => Some(event.seq),
                _ => None,
            })
            .collect();
        assert_eq!(delivered, vec![4], "only the newest held value, once");
        // v1's next interval started at the flush: held until 2000.
        assert!(matches!(s.verdict(&ev(t, 5, "v1"), at(1500)), Verdict::Held(d) if d == at(2000)));
        // v2 has been quiet for a whole interval: its next update goes out at once.
        assert!(matches!(
            s.verdict(&ev(t, 6, "v2"), at(1500)),
            Verdict::Shared
        ));
        // "real-time" lifts the throttle.
        f.send(&mut s, 1600, r#"{"type":"subscribe","payload":{"channel":"telemetry","filters":{"frequency":"real-time"}}}"#);
        assert!(matches!(
            s.verdict(&ev(t, 7, "v1"), at(1700)),
            Verdict::Shared
        ));
    }
}

#[cfg(test)]
mod size_profile {
    //! Idle-memory profile (issue 16): the session's parts, printed with
    //! `cargo test size_profile -- --nocapture`.
    use super::*;
    use std::mem::size_of;

    #[test]
    fn session_parts() {
        let rows = [
            ("Session", size_of::<Session>()),
            (
                "Subscription (boxed, per subscribed channel)",
                size_of::<Subscription>(),
            ),
            ("Selection", size_of::<Selection>()),
            ("Bucket", size_of::<Bucket>()),
            ("State", size_of::<State>()),
            ("VecDeque<Action>", size_of::<VecDeque<Action>>()),
            ("Option<Instant>", size_of::<Option<Instant>>()),
            ("Rare (boxed, allocated on first use)", size_of::<Rare>()),
            (
                "ValueFilters (boxed, only with filters)",
                size_of::<ValueFilters>(),
            ),
        ];
        for (name, bytes) in rows {
            println!("size_of {name}: {bytes}");
        }
        // Upper bounds: the sizes after issue 16's shrinking (2026-12-06; before: Session
        // 520, Subscription 176), see docs/performance.md.
        assert!(
            rows.iter().any(|&(n, b)| n == "Session" && b <= 280),
            "Session grew past 280 bytes"
        );
        assert!(
            rows.iter()
                .any(|&(n, b)| n == "Subscription (boxed, per subscribed channel)" && b <= 112),
            "Subscription (boxed, per subscribed channel) grew past 112 bytes"
        );
    }
}
