//! Configuration: the TOML file, its defaults, and validation into typed settings.
//!
//! Every option is documented in `docs/configuration.md`; a default here has a reason there.

use crate::auth::JwtKeys;
use crate::model::Role;
use jsonwebtoken::DecodingKey;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: ServerConfig,
    pub limits: Limits,
    pub auth: AuthConfig,
    pub history: HistoryConfig,
    pub telemetry: TelemetryConfig,
    pub itrack: ItrackConfig,
    pub testing: TestingConfig,
    /// Cluster mode on NATS JetStream; absent: the node runs alone.
    pub cluster: Option<ClusterConfig>,
    pub dashboard: crate::dashboard::DashboardConfig,
    /// Lines of the `[[auth.api_keys]]` entries when parsed from text (`Config::parse`).
    #[serde(skip)]
    api_key_lines: Vec<KeyLine>,
}

/// Event history (resume with `since`) and publish-id deduplication.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HistoryConfig {
    /// Events kept per tenant and event channel (trip_events, alerts, maintenance_alerts).
    pub max_events: usize,
    /// Age beyond which an event is no longer replayed.
    pub max_age_ms: u64,
    /// A publish id seen again within this window (per tenant) is a duplicate.
    pub dedup_window_ms: u64,
    /// Publish ids remembered per tenant (the oldest are forgotten first).
    pub dedup_max_ids: usize,
    /// Interval of the derived `fleet_metrics` and of `system` status events.
    pub metrics_interval_ms: u64,
}

/// Cluster mode (docs/operations.md, "Running a cluster"): the nodes that share a NATS
/// server (or cluster) with JetStream and a subject prefix act as one broker.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// NATS server URLs (one string or a list), e.g. `nats://127.0.0.1:4222`.
    #[serde(deserialize_with = "one_or_many")]
    pub nats_url: Vec<String>,
    /// This node's name (NATS connection name, logs, `/metrics`). Default: `fleetcast-<pid>`.
    pub node_name: String,
    /// First token of every subject, and the prefix of the stream and bucket names: nodes
    /// with different prefixes on one NATS server are different brokers.
    pub subject_prefix: String,
    /// When NATS cannot be reached at start: false (the default) refuses to start with a
    /// clear error; true starts alone and keeps connecting in the background.
    pub start_degraded: bool,
    /// Publications waiting for the NATS link (bounded; what does not fit is refused with
    /// 503 and counted).
    pub outbox_capacity: usize,
    /// A subscription waits at most this long for its (tenant, channel) to be synced from
    /// the cluster (snapshot from the key-value bucket, history from the stream) before it
    /// is answered with what the node holds.
    pub sync_timeout_ms: u64,
    /// Time to establish the NATS connection at start.
    pub connect_timeout_ms: u64,
    /// Copies NATS keeps of each stream and bucket fleetcast creates (1 to 5). More than
    /// 1 needs a NATS cluster with JetStream on at least that many servers; 3 keeps every
    /// acknowledged event through the loss of any one of them.
    pub replicas: usize,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            nats_url: vec!["nats://127.0.0.1:4222".into()],
            node_name: format!("fleetcast-{}", std::process::id()),
            subject_prefix: "fleetcast".into(),
            start_degraded: false,
            outbox_capacity: 65_536,
            sync_timeout_ms: 5_000,
            connect_timeout_ms: 5_000,
            replicas: 1,
        }
    }
}

fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(s) => vec![s],
        OneOrMany::Many(v) => v,
    })
}

/// The iTrack dialect: login users, their session hashes, and how tracker states are
/// judged.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ItrackConfig {
    /// Users that log in with `user/auth` (login and password) and follow trackers.
    pub users: Vec<LoginUser>,
    /// How long a session hash from `user/auth` stays valid.
    pub session_ttl_ms: u64,
    /// Last update older than this: `connection_status` `idle`.
    pub idle_after_ms: u64,
    /// Last update older than this: `connection_status` `offline`.
    pub offline_after_ms: u64,
    /// At rest longer than this: `movement_status` `parked` (else `stopped`).
    pub parked_after_ms: u64,
    /// Faster than this (km/h): `movement_status` `moving`.
    pub moving_kmh: u32,
}

impl Default for ItrackConfig {
    fn default() -> Self {
        let rules = crate::dialect::view::StateRules::default();
        ItrackConfig {
            users: Vec::new(),
            session_ttl_ms: 86_400_000,
            idle_after_ms: rules.idle_after_ms,
            offline_after_ms: rules.offline_after_ms,
            parked_after_ms: rules.parked_after_ms,
            moving_kmh: rules.moving_kmh,
        }
    }
}

impl ItrackConfig {
    pub fn state_rules(&self) -> crate::dialect::view::StateRules {
        crate::dialect::view::StateRules {
            idle_after_ms: self.idle_after_ms,
            offline_after_ms: self.offline_after_ms,
            parked_after_ms: self.parked_after_ms,
            moving_kmh: self.moving_kmh,
        }
    }
}

/// A user that logs in with a password (`[[itrack.users]]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoginUser {
    pub login: String,
    /// An argon2 PHC string (`fleetcast hash-password` prints one); never the password.
    pub password_hash: String,
    pub tenant: String,
    /// The trackers (vehicles) the user may follow; `["*"]` (the default): all of the
    /// tenant's.
    #[serde(default = "all_trackers")]
    pub trackers: Vec<String>,
}

fn all_trackers() -> Vec<String> {
    vec!["*".into()]
}

/// How telemetry is described to dialects that show units (Valtronics).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// The unit of a metric published as a bare number (a metric published as
    /// `{value, unit}` keeps its own unit; a metric not listed gets `""`). Entries given in
    /// the file are added to the defaults or replace them; `""` removes one.
    #[serde(deserialize_with = "units_over_defaults")]
    pub units: HashMap<String, String>,
}

/// The units of common fleet metrics.
pub const DEFAULT_UNITS: [(&str, &str); 10] = [
    ("temperature", "°C"),
    ("humidity", "%"),
    ("fuel_level", "%"),
    ("engine_rpm", "rpm"),
    ("speed", "km/h"),
    ("battery_voltage", "V"),
    ("engine_temp", "°C"),
    ("coolant_temp", "°C"),
    ("odometer", "km"),
    ("tire_pressure", "kPa"),
];

impl Default for TelemetryConfig {
    fn default() -> Self {
        TelemetryConfig {
            units: DEFAULT_UNITS
                .iter()
                .map(|(m, u)| (m.to_string(), u.to_string()))
                .collect(),
        }
    }
}

fn units_over_defaults<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<HashMap<String, String>, D::Error> {
    let given = HashMap::<String, String>::deserialize(d)?;
    let mut units = TelemetryConfig::default().units;
    for (metric, unit) in given {
        if unit.is_empty() {
            units.remove(&metric);
        } else {
            units.insert(metric, unit);
        }
    }
    Ok(units)
}

impl Default for HistoryConfig {
    fn default() -> Self {
        HistoryConfig {
            max_events: 1_000,
            max_age_ms: 600_000,
            dedup_window_ms: 60_000,
            dedup_max_ids: 100_000,
            metrics_interval_ms: 5_000,
        }
    }
}

impl HistoryConfig {
    pub fn max_age(&self) -> Duration {
        Duration::from_millis(self.max_age_ms)
    }
    pub fn dedup_window(&self) -> Duration {
        Duration::from_millis(self.dedup_window_ms)
    }
}

/// Testing aids, all off by default.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TestingConfig {
    /// Serve `/echo`: an unauthenticated WebSocket that echoes every message, through the
    /// same frame reader and writer as the broker, for conformance suites (Autobahn).
    pub echo_endpoint: bool,
    /// Largest message the echo endpoint accepts.
    pub echo_max_message_bytes: usize,
}

impl Default for TestingConfig {
    fn default() -> Self {
        TestingConfig {
            echo_endpoint: false,
            echo_max_message_bytes: 16 * 1024 * 1024,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address of the single listening port (WebSocket and HTTP).
    pub listen: SocketAddr,
    /// Number of shard threads; 0 means one per available core.
    pub shards: usize,
    /// How long shutdown waits for clients to receive their close frame.
    pub shutdown_grace_ms: u64,
    /// When set, `GET /metrics` requires `Authorization: Bearer <metrics_token>`.
    pub metrics_token: Option<String>,
    /// Web origins allowed to open a WebSocket (and to call the HTTP API, CORS); empty:
    /// any (see `crate::origin`).
    pub allowed_origins: crate::origin::AllowedOrigins,
    /// `[server.tls]`: a TLS listener beside `listen` (see `crate::tls`).
    pub tls: Option<crate::tls::TlsConfig>,
    /// permessage-deflate (RFC 7692) for clients that offer it (`crate::wire::deflate`).
    pub compression: Compression,
    /// Event messages shorter than this are sent uncompressed even when compression was
    /// negotiated (the saving does not pay for the client's inflate).
    pub compression_min_bytes: u32,
    /// The shards' IO driver: `mio` (epoll readiness, the default) or `io_uring`
    /// (completions; falls back to mio where the kernel or a sandbox refuses it).
    pub io: IoDriver,
}

/// `[server] io`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum IoDriver {
    /// epoll readiness through mio, one `read`/`writev` per connection.
    #[default]
    Mio,
    /// io_uring: multishot accept and receive, one `io_uring_enter` per flush pass.
    IoUring,
}

impl std::str::FromStr for IoDriver {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "mio" => Ok(IoDriver::Mio),
            "io_uring" => Ok(IoDriver::IoUring),
            other => Err(format!("unknown IO driver {other:?} (mio or io_uring)")),
        }
    }
}

impl std::fmt::Display for IoDriver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            IoDriver::Mio => "mio",
            IoDriver::IoUring => "io_uring",
        })
    }
}

/// `[server] compression`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// Never negotiated: the extension offer is ignored.
    Off,
    /// Negotiated with every client that offers it.
    #[default]
    On,
}

impl ServerConfig {
    /// The smallest event message compressed on a connection that negotiated
    /// permessage-deflate (`None`: compression is off).
    pub fn deflate_min(&self) -> Option<u32> {
        (self.compression == Compression::On).then_some(self.compression_min_bytes)
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: "127.0.0.1:8000".parse().expect("static address"),
            shards: 0,
            shutdown_grace_ms: 5_000,
            metrics_token: None,
            allowed_origins: Default::default(),
            tls: None,
            compression: Compression::Off,
            compression_min_bytes: 128,
            io: IoDriver::Mio,
        }
    }
}

/// Every per-connection limit, with the defaults of SPEC §8.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest inbound message after reassembly (close 1009 beyond it).
    pub max_message_bytes: usize,
    /// Largest HTTP upgrade request head (slowloris and header bombs).
    pub max_handshake_bytes: usize,
    /// Time allowed to send a complete HTTP request head.
    pub handshake_timeout_ms: u64,
    /// Time allowed between the upgrade and a successful `auth` message.
    pub auth_timeout_ms: u64,
    /// Server ping interval; a connection silent for two intervals is closed.
    pub heartbeat_interval_ms: u64,
    /// Subscriptions (channel x entity) per connection.
    pub max_subscriptions: usize,
    /// Items in one `batch` message.
    pub max_batch: usize,
    /// Bytes queued for one connection before it is closed as a slow consumer (1013).
    pub max_outbound_bytes: usize,
    /// Bytes queued for one connection past which state channels are conflated to the
    /// newest pending value per entity.
    pub soft_outbound_bytes: usize,
    /// A shard whose connections wait longer than this for their turn to be written is
    /// overloaded: it then delivers in batches, each keeping only the newest state value
    /// per entity (events are never skipped), until the wait falls under half of it.
    pub overload_lag_ms: u64,
    /// Inbound messages per second per connection (token bucket, one second of burst).
    pub messages_per_second: u32,
    /// A connection over its message rate for this long is closed (1008).
    pub abuse_close_after_ms: u64,
    /// Open connections per user (principal).
    pub max_connections_per_user: usize,
    /// Open WebSocket connections per node.
    pub max_connections: usize,
    /// Open authenticated connections per tenant (fleet, company, instance).
    pub max_connections_per_tenant: usize,
    /// New connections per minute per user.
    pub new_connections_per_minute_per_user: u32,
    /// New connections per minute per client IP address.
    pub new_connections_per_minute_per_ip: u32,
    /// Minimum time between two accepted location updates of one vehicle; 0 disables.
    pub location_update_interval_ms: u64,
    /// Largest body of an HTTP request (`POST /v1/publish`); 413 beyond it.
    pub max_http_body_bytes: usize,
    /// Tenants with state on this node (bounds memory).
    pub max_tenants: usize,
    /// Entities (vehicles, drivers) with last known state per tenant and state channel.
    pub max_vehicles_per_tenant: usize,
    /// Snapshot `request`s and `subscribe`s with `since` per second per connection (and
    /// polling HTTP reads per second per user): replies that can be large get their own
    /// token bucket (one second of burst).
    pub requests_per_second: u32,
    /// A publisher's `timestamp` may be at most this far ahead of the broker's clock
    /// (400 beyond it): one update stamped in the future would freeze last known state.
    pub max_future_skew_ms: u64,
    /// TCP connections accepted but not yet upgraded (or answered) per node; new ones
    /// are closed at once beyond it.
    pub max_pending_connections: usize,
    /// The same per client address (IPv6 grouped by /64).
    pub max_pending_connections_per_ip: usize,
    /// Failed `user/auth` logins per minute per login (iTrack); past it every attempt
    /// for that login, right password included, is refused (429) until the oldest
    /// failure is a minute old.
    pub login_failures_per_minute_per_login: u32,
    /// The same per client address (IPv6 grouped by /64), whatever the login.
    pub login_failures_per_minute_per_ip: u32,
    /// Per-role overrides of the per-connection and per-user limits above.
    pub roles: RoleOverrides,
}

/// Overrides by role; a missing value falls back to the `[limits]` value.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct RoleOverrides {
    pub device: RoleLimits,
    pub viewer: RoleLimits,
    pub service: RoleLimits,
    pub admin: RoleLimits,
}

impl Default for RoleOverrides {
    fn default() -> Self {
        RoleOverrides {
            device: RoleLimits::default(),
            viewer: RoleLimits::default(),
            // A backend publishing for a whole fleet sends far more than a dashboard.
            service: RoleLimits {
                messages_per_second: Some(5_000),
                ..RoleLimits::default()
            },
            admin: RoleLimits::default(),
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct RoleLimits {
    pub messages_per_second: Option<u32>,
    pub max_connections_per_user: Option<usize>,
    pub new_connections_per_minute_per_user: Option<u32>,
    /// Publishes per second per user, over every connection and HTTP request of that
    /// user together (token bucket, one second of burst); default: messages_per_second.
    pub publishes_per_second: Option<u32>,
}

/// The limits that apply to one role, overrides resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EffectiveLimits {
    pub messages_per_second: u32,
    pub max_connections_per_user: usize,
    pub new_connections_per_minute_per_user: u32,
    pub publishes_per_second: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_message_bytes: 1024,
            max_handshake_bytes: 8 * 1024,
            handshake_timeout_ms: 10_000,
            auth_timeout_ms: 10_000,
            heartbeat_interval_ms: 30_000,
            max_subscriptions: 256,
            max_batch: 50,
            max_outbound_bytes: 4 * 1024 * 1024,
            soft_outbound_bytes: 1024 * 1024,
            overload_lag_ms: 250,
            messages_per_second: 100,
            abuse_close_after_ms: 3_000,
            max_connections_per_user: 100,
            max_connections: 1_000,
            max_connections_per_tenant: 100_000,
            new_connections_per_minute_per_user: 10,
            new_connections_per_minute_per_ip: 10,
            location_update_interval_ms: 1_000,
            max_http_body_bytes: 64 * 1024,
            max_tenants: 10_000,
            max_vehicles_per_tenant: 100_000,
            requests_per_second: 5,
            max_future_skew_ms: 5 * 60 * 1000,
            max_pending_connections: 1024,
            max_pending_connections_per_ip: 64,
            login_failures_per_minute_per_login: 5,
            login_failures_per_minute_per_ip: 20,
            roles: RoleOverrides::default(),
        }
    }
}

impl Limits {
    pub fn for_role(&self, role: Role) -> EffectiveLimits {
        let o = match role {
            Role::Device => &self.roles.device,
            Role::Viewer => &self.roles.viewer,
            Role::Service => &self.roles.service,
            Role::Admin => &self.roles.admin,
        };
        let messages_per_second = o.messages_per_second.unwrap_or(self.messages_per_second);
        EffectiveLimits {
            messages_per_second,
            publishes_per_second: o.publishes_per_second.unwrap_or(messages_per_second),
            max_connections_per_user: o
                .max_connections_per_user
                .unwrap_or(self.max_connections_per_user),
            new_connections_per_minute_per_user: o
                .new_connections_per_minute_per_user
                .unwrap_or(self.new_connections_per_minute_per_user),
        }
    }
    pub fn abuse_close_after(&self) -> Duration {
        Duration::from_millis(self.abuse_close_after_ms)
    }
    pub fn location_update_interval(&self) -> Duration {
        Duration::from_millis(self.location_update_interval_ms)
    }
    pub fn auth_timeout(&self) -> Duration {
        Duration::from_millis(self.auth_timeout_ms)
    }
    pub fn heartbeat_interval(&self) -> Duration {
        Duration::from_millis(self.heartbeat_interval_ms)
    }
    pub fn handshake_timeout(&self) -> Duration {
        Duration::from_millis(self.handshake_timeout_ms)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Shared secret for HS256 tokens.
    pub jwt_hs256_secret: Option<String>,
    /// PEM file with the RSA public key for RS256 tokens.
    pub jwt_rs256_public_key_file: Option<String>,
    /// PEM file with the EC public key for ES256 tokens.
    pub jwt_es256_public_key_file: Option<String>,
    /// Expected `iss` claim, when set.
    pub jwt_issuer: Option<String>,
    /// Accepted `aud` values (a string or a list); when set, a token must name one.
    #[serde(deserialize_with = "one_or_many")]
    pub jwt_audience: Vec<String>,
    /// Clock skew allowed between the token issuer and this node for `exp` and `nbf`.
    pub jwt_leeway_s: u64,
    /// Refuse tokens without an `exp` claim (recommended in production).
    pub require_exp: bool,
    /// A JWK Set file (RFC 7517) with the issuer's public keys, chosen by `kid`.
    pub jwks_file: Option<String>,
    /// The issuer's JWK Set URL (`http` or `https`).
    pub jwks_url: Option<String>,
    /// Interval of the periodic JWKS refresh.
    pub jwks_refresh_interval_ms: u64,
    /// At most one JWKS fetch per this interval, whatever asks for it (a token with an
    /// unknown `kid`, the periodic refresh, a failed fetch's retry).
    pub jwks_min_refresh_interval_ms: u64,
    /// Time allowed for one JWKS fetch (connect and read).
    pub jwks_timeout_ms: u64,
    /// Token ids (`jti`) refused, and whose connections are closed (4001) on SIGHUP.
    pub revoked_token_ids: Vec<String>,
    /// API keys refused, by `user_id` or by the key's SHA-256 (hex); their connections
    /// are closed (4001) on SIGHUP.
    pub revoked_keys: Vec<String>,
    pub api_keys: Vec<ApiKeyConfig>,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            jwt_hs256_secret: None,
            jwt_rs256_public_key_file: None,
            jwt_es256_public_key_file: None,
            jwt_issuer: None,
            jwt_audience: Vec::new(),
            jwt_leeway_s: 30,
            require_exp: false,
            jwks_file: None,
            jwks_url: None,
            jwks_refresh_interval_ms: 300_000,
            jwks_min_refresh_interval_ms: 10_000,
            jwks_timeout_ms: 5_000,
            revoked_token_ids: Vec::new(),
            revoked_keys: Vec::new(),
            api_keys: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKeyConfig {
    /// The key in clear; empty when `key_sha256` is given instead.
    #[serde(default)]
    pub key: String,
    /// The key's SHA-256 in hex (`fleetcast hash-key` prints it), instead of `key`.
    #[serde(default)]
    pub key_sha256: Option<String>,
    pub user_id: String,
    pub tenant: String,
    pub role: Role,
    /// For devices: the vehicles this key may publish for. Empty: none; `["*"]`: any
    /// vehicle of the tenant.
    #[serde(default)]
    pub vehicles: Vec<String>,
    /// For devices: drivers it may name besides those bound to its vehicles' current trip.
    #[serde(default)]
    pub drivers: Vec<String>,
    /// For devices: trips it may name besides its vehicles' current trip.
    #[serde(default)]
    pub trips: Vec<String>,
}

/// Where an `[[auth.api_keys]]` entry was in the text a config was parsed from, to name
/// its line in errors. Matched to `auth.api_keys[i]` by the key's digest, so an entry
/// replaced or moved after parsing is named by its index instead.
#[derive(Debug, Clone, PartialEq, Eq)]
struct KeyLine {
    line: usize,
    digest: Option<[u8; 32]>,
}

fn digest(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

/// 1-based line of byte `offset` in `text`.
fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// The line of each `[[auth.api_keys]] key` value, in order (the text is already known
/// to parse as a `Config`; only the spans are read here).
fn api_key_lines(text: &str) -> Vec<KeyLine> {
    #[derive(Deserialize, Default)]
    struct File {
        #[serde(default)]
        auth: Auth,
    }
    #[derive(Deserialize, Default)]
    struct Auth {
        #[serde(default)]
        api_keys: Vec<Key>,
    }
    #[derive(Deserialize)]
    struct Key {
        key: Option<toml::Spanned<String>>,
        key_sha256: Option<toml::Spanned<String>>,
    }
    let Ok(file) = toml::from_str::<File>(text) else {
        return Vec::new();
    };
    file.auth
        .api_keys
        .iter()
        .map(|k| {
            let (start, digest) = match (&k.key, &k.key_sha256) {
                (Some(key), _) if !key.get_ref().is_empty() => {
                    (key.span().start, Some(digest(key.get_ref())))
                }
                (_, Some(hex)) => (hex.span().start, parse_sha256_hex(hex.get_ref())),
                (Some(key), None) => (key.span().start, None),
                (None, None) => (0, None),
            };
            KeyLine {
                line: line_of(text, start),
                digest,
            }
        })
        .collect()
}

/// A SHA-256 digest written as 64 hex digits (either case).
pub fn parse_sha256_hex(hex: &str) -> Option<[u8; 32]> {
    let hex = hex.trim().as_bytes();
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in hex.chunks(2).enumerate() {
        let s = std::str::from_utf8(pair).ok()?;
        out[i] = u8::from_str_radix(s, 16).ok()?;
    }
    Some(out)
}

impl ApiKeyConfig {
    /// The SHA-256 the key is looked up by: of `key`, or `key_sha256` decoded. `None`
    /// when neither is usable (validation says why).
    pub fn digest(&self) -> Option<[u8; 32]> {
        if !self.key.is_empty() {
            Some(digest(&self.key))
        } else {
            self.key_sha256.as_deref().and_then(parse_sha256_hex)
        }
    }
}

/// Every semantic problem found in a config, one message per problem, each naming the
/// key at fault. (TOML syntax, type and unknown-key errors come from `Config::parse`,
/// which stops at the first.)
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<String>);

impl std::fmt::Display for ConfigErrors {
    /// One problem per line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            f.write_str(e)?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// What validation produced besides its verdict: the key material the config names,
/// read and parsed (so the authenticator does no file IO), and warnings about settings
/// that are legal but probably not meant.
#[derive(Debug, Clone, Default)]
pub struct Validated {
    pub keys: JwtKeys,
    pub warnings: Vec<String>,
}

/// Largest `history.max_events`: per tenant and event channel, so memory grows with it
/// times the tenants.
pub const MAX_HISTORY_EVENTS: usize = 10_000_000;
/// Longest `server.shutdown_grace_ms` (one hour).
pub const MAX_SHUTDOWN_GRACE_MS: u64 = 3_600_000;

/// Collects problems, so that one pass reports all of them.
#[derive(Default)]
struct Problems {
    errors: Vec<String>,
    warnings: Vec<String>,
}

impl Problems {
    fn ensure(&mut self, ok: bool, msg: impl FnOnce() -> String) {
        if !ok {
            self.errors.push(msg());
        }
    }

    fn at_least(&mut self, key: &str, value: u64, min: u64) {
        self.ensure(value >= min, || {
            format!("{key} must be at least {min} (it is {value})")
        });
    }

    fn at_most(&mut self, key: &str, value: u64, max: u64) {
        self.ensure(value <= max, || {
            format!("{key} must be at most {max} (it is {value})")
        });
    }
}

impl Config {
    /// Parses TOML into a raw config: syntax, types and unknown keys (serde stops at the
    /// first error, whose message names its line). No semantic checks: see `validate`.
    pub fn parse(text: &str) -> anyhow::Result<Config> {
        let mut cfg: Config = toml::from_str(text)?;
        cfg.api_key_lines = api_key_lines(text);
        Ok(cfg)
    }

    /// Reads and parses a file into a raw config (no semantic checks: see `validate`).
    pub fn read(path: &Path) -> anyhow::Result<Config> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
        Config::parse(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
    }

    /// Parses and validates.
    pub fn from_toml(text: &str) -> anyhow::Result<Config> {
        let cfg = Config::parse(text)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Reads, parses and validates a file.
    pub fn load(path: &Path) -> anyhow::Result<Config> {
        let cfg = Config::read(path)?;
        cfg.validate()
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        Ok(cfg)
    }

    /// The one semantic validation, run by `serve`, `check-config` and `Node::start`:
    /// checks every value, reads and parses the JWT public key files, and returns every
    /// problem found (not only the first). A config it accepts starts, as far as the
    /// config is concerned.
    pub fn validate(&self) -> Result<Validated, ConfigErrors> {
        let mut p = Problems::default();
        self.check_server(&mut p);
        self.check_limits(&mut p);
        self.check_history(&mut p);
        self.check_itrack(&mut p);
        self.check_cluster(&mut p);
        for (metric, unit) in &self.telemetry.units {
            p.ensure(!metric.is_empty() && unit.len() <= 32, || {
                format!(
                    "telemetry.units: {metric:?} = {unit:?}: a metric needs a name and a unit of at most 32 bytes"
                )
            });
        }
        p.errors.extend(self.dashboard.problems());
        let keys = self.check_auth(&mut p);
        if p.errors.is_empty() {
            Ok(Validated {
                keys,
                warnings: p.warnings,
            })
        } else {
            Err(ConfigErrors(p.errors))
        }
    }

    fn check_server(&self, p: &mut Problems) {
        let s = &self.server;
        if let Some(tls) = &s.tls {
            p.at_least(
                "server.tls.handshakes_per_turn",
                tls.handshakes_per_turn as u64,
                1,
            );
            if let Err(e) = crate::tls::load(tls) {
                p.errors.push(e);
            }
        }
        p.at_most("server.shards", s.shards as u64, 64);
        p.ensure(s.shutdown_grace_ms <= MAX_SHUTDOWN_GRACE_MS, || {
            format!(
                "server.shutdown_grace_ms must be at most {MAX_SHUTDOWN_GRACE_MS} (one hour; it \
                 is {})",
                s.shutdown_grace_ms
            )
        });
        if let Some(t) = &s.metrics_token {
            p.ensure(t.len() >= 16, || {
                format!(
                    "server.metrics_token must be at least 16 characters (it is {})",
                    t.len()
                )
            });
        }
    }

    fn check_limits(&self, p: &mut Problems) {
        let l = &self.limits;
        let n = |v: usize| v as u64;
        p.at_least("limits.max_message_bytes", n(l.max_message_bytes), 64);
        p.at_least("limits.handshake_timeout_ms", l.handshake_timeout_ms, 1);
        p.at_least("limits.auth_timeout_ms", l.auth_timeout_ms, 1);
        p.at_least("limits.heartbeat_interval_ms", l.heartbeat_interval_ms, 10);
        p.at_least("limits.max_subscriptions", n(l.max_subscriptions), 1);
        p.at_least("limits.max_batch", n(l.max_batch), 1);
        p.at_least("limits.max_outbound_bytes", n(l.max_outbound_bytes), 4096);
        p.at_least("limits.soft_outbound_bytes", n(l.soft_outbound_bytes), 1);
        p.ensure(l.soft_outbound_bytes <= l.max_outbound_bytes, || {
            format!(
                "limits.soft_outbound_bytes ({}) must not exceed limits.max_outbound_bytes ({})",
                l.soft_outbound_bytes, l.max_outbound_bytes
            )
        });
        p.at_least("limits.overload_lag_ms", l.overload_lag_ms, 1);
        p.at_least(
            "limits.messages_per_second",
            l.messages_per_second.into(),
            1,
        );
        p.at_least(
            "limits.max_connections_per_user",
            n(l.max_connections_per_user),
            1,
        );
        p.at_least("limits.max_connections", n(l.max_connections), 1);
        p.at_least(
            "limits.max_connections_per_tenant",
            n(l.max_connections_per_tenant),
            1,
        );
        p.at_least(
            "limits.new_connections_per_minute_per_user",
            l.new_connections_per_minute_per_user.into(),
            1,
        );
        p.at_least(
            "limits.new_connections_per_minute_per_ip",
            l.new_connections_per_minute_per_ip.into(),
            1,
        );
        p.ensure(l.max_http_body_bytes >= l.max_message_bytes, || {
            format!(
                "limits.max_http_body_bytes ({}) must be at least limits.max_message_bytes ({}): \
                 a body must hold one message",
                l.max_http_body_bytes, l.max_message_bytes
            )
        });
        p.at_least("limits.max_tenants", n(l.max_tenants), 1);
        p.at_least(
            "limits.max_vehicles_per_tenant",
            n(l.max_vehicles_per_tenant),
            1,
        );
        p.at_least(
            "limits.requests_per_second",
            l.requests_per_second.into(),
            1,
        );
        p.at_least(
            "limits.max_pending_connections",
            n(l.max_pending_connections),
            1,
        );
        p.at_least(
            "limits.max_pending_connections_per_ip",
            n(l.max_pending_connections_per_ip),
            1,
        );
        p.at_least(
            "limits.login_failures_per_minute_per_login",
            l.login_failures_per_minute_per_login.into(),
            1,
        );
        p.at_least(
            "limits.login_failures_per_minute_per_ip",
            l.login_failures_per_minute_per_ip.into(),
            1,
        );
        let r = &l.roles;
        for (role, o) in [
            ("device", &r.device),
            ("viewer", &r.viewer),
            ("service", &r.service),
            ("admin", &r.admin),
        ] {
            let overrides = [
                ("messages_per_second", o.messages_per_second.map(u64::from)),
                (
                    "max_connections_per_user",
                    o.max_connections_per_user.map(n),
                ),
                (
                    "new_connections_per_minute_per_user",
                    o.new_connections_per_minute_per_user.map(u64::from),
                ),
                (
                    "publishes_per_second",
                    o.publishes_per_second.map(u64::from),
                ),
            ];
            for (key, value) in overrides {
                if let Some(v) = value {
                    p.at_least(&format!("limits.roles.{role}.{key}"), v, 1);
                }
            }
        }
    }

    fn check_itrack(&self, p: &mut Problems) {
        let i = &self.itrack;
        p.at_least("itrack.session_ttl_ms", i.session_ttl_ms, 1_000);
        p.at_least("itrack.idle_after_ms", i.idle_after_ms, 1);
        p.ensure(i.offline_after_ms > i.idle_after_ms, || {
            format!(
                "itrack.offline_after_ms ({}) must be above itrack.idle_after_ms ({})",
                i.offline_after_ms, i.idle_after_ms
            )
        });
        let mut seen = HashMap::new();
        for (n, u) in i.users.iter().enumerate() {
            p.ensure(!u.login.is_empty() && !u.tenant.is_empty(), || {
                format!("itrack.users[{n}]: login and tenant must not be empty")
            });
            let unusable = crate::sessions::check_password_hash(&u.password_hash).err();
            p.ensure(unusable.is_none(), || {
                format!(
                    "itrack.users[{n}] ({}): password_hash must be an argon2 hash (run \
                     `fleetcast hash-password`), never a password: {}",
                    u.login,
                    unusable.unwrap_or_default()
                )
            });
            if let Some(first) = seen.insert(u.login.as_str(), n) {
                p.ensure(false, || {
                    format!(
                        "itrack.users[{n}]: login {:?} is also itrack.users[{first}]",
                        u.login
                    )
                });
            }
        }
    }

    fn check_history(&self, p: &mut Problems) {
        let h = &self.history;
        p.ensure(h.max_events <= MAX_HISTORY_EVENTS, || {
            format!(
                "history.max_events must be at most {MAX_HISTORY_EVENTS} (it is {}): it is kept \
                 per tenant and event channel",
                h.max_events
            )
        });
        p.ensure(h.dedup_window_ms == 0 || h.dedup_max_ids >= 1, || {
            format!(
                "history.dedup_max_ids must be at least 1 when history.dedup_window_ms is set \
                 (it is {} ms)",
                h.dedup_window_ms
            )
        });
    }

    fn check_cluster(&self, p: &mut Problems) {
        let Some(c) = &self.cluster else {
            return;
        };
        p.ensure(!c.nats_url.is_empty(), || {
            "cluster.nats_url needs at least one URL".to_string()
        });
        let token_ok = |s: &str| {
            !s.is_empty()
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        };
        p.ensure(token_ok(&c.subject_prefix), || {
            format!(
                "cluster.subject_prefix {:?} must be letters, digits, '_' or '-' (it names \
                 subjects, streams and a bucket)",
                c.subject_prefix
            )
        });
        p.ensure(!c.node_name.is_empty(), || {
            "cluster.node_name must not be empty".to_string()
        });
        p.at_least("cluster.outbox_capacity", c.outbox_capacity as u64, 1);
        // NATS keeps at most 5 copies of a stream.
        p.at_least("cluster.replicas", c.replicas as u64, 1);
        p.at_most("cluster.replicas", c.replicas as u64, 5);
    }

    /// Where `auth.api_keys[i]` came from: its line when the config was parsed from text
    /// and the entry is still the one parsed there, else its index.
    fn api_key_origin(&self, i: usize) -> Origin {
        match (self.api_key_lines.get(i), self.auth.api_keys.get(i)) {
            (Some(at), Some(k)) if at.digest.is_some() && at.digest == k.digest() => {
                Origin::Line(at.line)
            }
            _ => Origin::Index(i),
        }
    }

    fn describe_api_key(&self, i: usize) -> String {
        let user = &self.auth.api_keys[i].user_id;
        match self.api_key_origin(i) {
            Origin::Line(line) => format!("api key at line {line} (user {user:?})"),
            Origin::Index(i) => format!("auth.api_keys[{i}] (user {user:?})"),
        }
    }

    fn check_auth(&self, p: &mut Problems) -> JwtKeys {
        let a = &self.auth;
        if let Some(s) = &a.jwt_hs256_secret {
            p.ensure(s.len() >= 32, || {
                format!(
                    "auth.jwt_hs256_secret must be at least 32 bytes (it is {}): a short HS256 \
                     secret can be brute-forced from any token",
                    s.len()
                )
            });
        }
        let keys = JwtKeys {
            rs256: load_pem(
                p,
                "auth.jwt_rs256_public_key_file",
                a.jwt_rs256_public_key_file.as_deref(),
                "an RSA public key",
                DecodingKey::from_rsa_pem,
            ),
            es256: load_pem(
                p,
                "auth.jwt_es256_public_key_file",
                a.jwt_es256_public_key_file.as_deref(),
                "an EC public key",
                DecodingKey::from_ec_pem,
            ),
            jwks: None,
        };
        let keys = JwtKeys {
            jwks: self.check_jwt_claims_and_jwks(p),
            ..keys
        };
        let mut first_at: HashMap<[u8; 32], usize> = HashMap::new();
        for (i, k) in a.api_keys.iter().enumerate() {
            match (&k.key, &k.key_sha256) {
                (key, None) => p.ensure(key.len() >= 16, || {
                    format!(
                        "{}: key must be at least 16 characters (it is {})",
                        self.describe_api_key(i),
                        key.len()
                    )
                }),
                (key, Some(_)) if !key.is_empty() => p.errors.push(format!(
                    "{}: give key or key_sha256, not both",
                    self.describe_api_key(i)
                )),
                (_, Some(hex)) => p.ensure(parse_sha256_hex(hex).is_some(), || {
                    format!(
                        "{}: key_sha256 must be 64 hex digits (`fleetcast hash-key` prints \
                         them)",
                        self.describe_api_key(i)
                    )
                }),
            }
            p.ensure(!k.tenant.is_empty(), || {
                format!("{}: tenant is empty", self.describe_api_key(i))
            });
            let Some(d) = k.digest() else { continue };
            if let Some(&first) = first_at.get(&d) {
                let users = (&a.api_keys[first].user_id, &k.user_id);
                p.errors
                    .push(match (self.api_key_origin(first), self.api_key_origin(i)) {
                        (Origin::Line(x), Origin::Line(y)) => format!(
                            "api key listed twice: lines {x} and {y} (users {:?} and {:?})",
                            users.0, users.1
                        ),
                        (x, y) => format!(
                            "api key listed twice: {x} and {y} (users {:?} and {:?})",
                            users.0, users.1
                        ),
                    });
            } else {
                first_at.insert(d, i);
            }
            if k.role == Role::Device && k.vehicles.is_empty() {
                p.warnings.push(format!(
                    "{} is a device key with no vehicles: it may publish for none (list them, \
                     or [\"*\"] for any vehicle of its tenant)",
                    self.describe_api_key(i)
                ));
            }
        }
        keys
    }

    /// The JWT claim settings, the JWKS source (a file is read and parsed here, like the
    /// PEM keys) and the revocation lists.
    fn check_jwt_claims_and_jwks(&self, p: &mut Problems) -> Option<crate::jwks::KeySet> {
        let a = &self.auth;
        p.at_most("auth.jwt_leeway_s", a.jwt_leeway_s, 600);
        p.ensure(a.jwt_audience.iter().all(|x| !x.is_empty()), || {
            "auth.jwt_audience: an audience must not be empty".into()
        });
        for (i, r) in a.revoked_token_ids.iter().enumerate() {
            p.ensure(!r.is_empty(), || {
                format!("auth.revoked_token_ids[{i}] is empty")
            });
        }
        for (i, r) in a.revoked_keys.iter().enumerate() {
            p.ensure(!r.is_empty(), || format!("auth.revoked_keys[{i}] is empty"));
        }
        p.at_least(
            "auth.jwks_min_refresh_interval_ms",
            a.jwks_min_refresh_interval_ms,
            100,
        );
        p.ensure(
            a.jwks_refresh_interval_ms >= a.jwks_min_refresh_interval_ms,
            || {
                format!(
                    "auth.jwks_refresh_interval_ms ({}) must be at least \
                     auth.jwks_min_refresh_interval_ms ({})",
                    a.jwks_refresh_interval_ms, a.jwks_min_refresh_interval_ms
                )
            },
        );
        p.at_least("auth.jwks_timeout_ms", a.jwks_timeout_ms, 1);
        if let Some(url) = &a.jwks_url {
            p.ensure(a.jwks_file.is_none(), || {
                "auth.jwks_file and auth.jwks_url are both set: give one".into()
            });
            p.ensure(
                url.starts_with("http://") || url.starts_with("https://"),
                || format!("auth.jwks_url {url:?} must be an http:// or https:// URL"),
            );
            return None;
        }
        let path = a.jwks_file.as_deref()?;
        match crate::jwks::KeySet::read(std::path::Path::new(path)) {
            Ok(set) => Some(set),
            Err(e) => {
                p.errors.push(format!("auth.jwks_file: {e}"));
                None
            }
        }
    }

    pub fn shard_count(&self) -> usize {
        if self.server.shards > 0 {
            self.server.shards
        } else {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
                .min(64)
        }
    }
}

/// Where an entry of a list came from, for messages.
#[derive(Debug, Clone, Copy)]
enum Origin {
    Line(usize),
    Index(usize),
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Origin::Line(l) => write!(f, "line {l}"),
            Origin::Index(i) => write!(f, "auth.api_keys[{i}]"),
        }
    }
}

/// Reads and parses the PEM file `key` names, if set; a problem is recorded, not
/// returned, so that validation goes on.
fn load_pem(
    p: &mut Problems,
    key: &str,
    path: Option<&str>,
    what: &str,
    parse: fn(&[u8]) -> jsonwebtoken::errors::Result<DecodingKey>,
) -> Option<DecodingKey> {
    let path = path?;
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) => {
            p.errors.push(format!("{key}: cannot read {path}: {e}"));
            return None;
        }
    };
    match parse(&bytes) {
        Ok(k) => Some(k),
        Err(e) => {
            p.errors
                .push(format!("{key}: {path} is not {what} in PEM format: {e}"));
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn telemetry_units_are_added_to_the_defaults_replace_them_or_remove_them() {
        let c = Config::from_toml(
            "[telemetry.units]\ntemperature = \"°F\"\nflux = \"Wb\"\nhumidity = \"\"\n",
        )
        .unwrap();
        let u = &c.telemetry.units;
        assert_eq!(u.get("temperature").map(String::as_str), Some("°F"));
        assert_eq!(u.get("flux").map(String::as_str), Some("Wb"));
        assert_eq!(u.get("humidity"), None);
        assert_eq!(u.get("fuel_level").map(String::as_str), Some("%"));
        let long = format!("[telemetry.units]\nx = \"{}\"\n", "u".repeat(33));
        let e = Config::from_toml(&long).unwrap_err();
        assert!(e.to_string().contains("telemetry.units"), "{e}");
    }

    #[test]
    fn empty_file_gives_spec_defaults() {
        let c = Config::from_toml("").unwrap();
        assert_eq!(c.limits.max_message_bytes, 1024);
        assert_eq!(c.limits.max_batch, 50);
        assert_eq!(c.limits.max_subscriptions, 256);
        assert_eq!(c.limits.auth_timeout_ms, 10_000);
        assert_eq!(c.limits.heartbeat_interval_ms, 30_000);
        assert_eq!(c.server.listen.to_string(), "127.0.0.1:8000");
    }

    #[test]
    fn rejects_unknown_keys_and_bad_values() {
        assert!(Config::from_toml("[limits]\nmax_frame = 3").is_err());
        assert!(Config::from_toml("[limits]\nmax_batch = 0").is_err());
        let ok = r#"
[[auth.api_keys]]
key = "0123456789abcdef"
user_id = "u1"
tenant = "fleet_001"
role = "viewer"
"#;
        assert_eq!(Config::from_toml(ok).unwrap().auth.api_keys.len(), 1);
        assert!(Config::from_toml(&ok.replace("viewer", "boss")).is_err());
    }

    fn fixture(name: &str) -> String {
        format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"))
    }

    /// The errors `validate` reports for `text` (which must parse).
    fn errors(text: &str) -> Vec<String> {
        Config::parse(text)
            .expect("parses")
            .validate()
            .err()
            .map(|e| e.0)
            .unwrap_or_default()
    }

    /// `text` is refused with exactly one error, which names `key`.
    #[track_caller]
    fn refused(text: &str, key: &str) {
        let e = errors(text);
        assert_eq!(e.len(), 1, "{text}: {e:?}");
        assert!(e[0].contains(key), "{text}: {e:?} does not name {key}");
    }

    #[test]
    fn impossible_limits_are_refused_naming_the_key() {
        for key in [
            "max_connections_per_user",
            "max_connections",
            "messages_per_second",
            "new_connections_per_minute_per_user",
            "new_connections_per_minute_per_ip",
            "max_subscriptions",
            "handshake_timeout_ms",
            "auth_timeout_ms",
            "soft_outbound_bytes",
            "max_tenants",
            "max_vehicles_per_tenant",
            "requests_per_second",
            "max_pending_connections",
            "max_pending_connections_per_ip",
            "overload_lag_ms",
            "max_batch",
        ] {
            refused(&format!("[limits]\n{key} = 0"), &format!("limits.{key} "));
        }
        refused(
            "[limits]\nmax_message_bytes = 63",
            "limits.max_message_bytes",
        );
        refused(
            "[limits]\nheartbeat_interval_ms = 9",
            "limits.heartbeat_interval_ms",
        );
        refused(
            "[limits]\nmax_outbound_bytes = 4095\nsoft_outbound_bytes = 1024",
            "limits.max_outbound_bytes",
        );
        refused(
            "[limits]\nsoft_outbound_bytes = 8388608",
            "limits.soft_outbound_bytes",
        );
    }

    #[test]
    fn http_body_must_hold_one_message() {
        refused(
            "[limits]\nmax_message_bytes = 4096\nmax_http_body_bytes = 4095",
            "limits.max_http_body_bytes",
        );
        assert!(
            errors("[limits]\nmax_message_bytes = 4096\nmax_http_body_bytes = 4096").is_empty()
        );
    }

    #[test]
    fn zero_role_overrides_are_refused() {
        for role in ["device", "viewer", "service", "admin"] {
            for key in [
                "messages_per_second",
                "max_connections_per_user",
                "new_connections_per_minute_per_user",
                "publishes_per_second",
            ] {
                refused(
                    &format!("[limits.roles.{role}]\n{key} = 0"),
                    &format!("limits.roles.{role}.{key}"),
                );
            }
        }
        assert!(errors("[limits.roles.viewer]\nmax_connections_per_user = 1").is_empty());
    }

    #[test]
    fn history_bounds() {
        refused("[history]\nmax_events = 10000001", "history.max_events");
        assert!(errors("[history]\nmax_events = 10000000").is_empty());
        // 0 turns history off: allowed.
        assert!(errors("[history]\nmax_events = 0").is_empty());
        refused("[history]\ndedup_max_ids = 0", "history.dedup_max_ids");
        // Without a dedup window no ids are remembered.
        assert!(errors("[history]\ndedup_max_ids = 0\ndedup_window_ms = 0").is_empty());
    }

    #[test]
    fn server_bounds() {
        refused(
            "[server]\nshutdown_grace_ms = 3600001",
            "server.shutdown_grace_ms",
        );
        assert!(errors("[server]\nshutdown_grace_ms = 3600000").is_empty());
        refused("[server]\nshards = 65", "server.shards");
        refused(
            "[server]\nmetrics_token = \"short\"",
            "server.metrics_token",
        );
        refused(
            "[auth]\njwt_hs256_secret = \"0123456789012345678901234567890\"",
            "auth.jwt_hs256_secret",
        );
    }

    #[test]
    fn cluster_replicas_bounds() {
        refused("[cluster]\nreplicas = 0", "cluster.replicas");
        refused("[cluster]\nreplicas = 6", "cluster.replicas");
        assert!(errors("[cluster]\nreplicas = 3").is_empty());
        assert_eq!(
            Config::parse("[cluster]")
                .unwrap()
                .cluster
                .unwrap()
                .replicas,
            1
        );
    }

    #[test]
    fn listen_address_is_parsed_by_serde() {
        assert!(Config::parse("[server]\nlisten = \"127.0.0.1:99999\"").is_err());
        assert!(Config::parse("[server]\nlisten = \"nowhere\"").is_err());
    }

    #[test]
    fn every_problem_is_reported_not_only_the_first() {
        let e = errors(
            "[server]\nshutdown_grace_ms = 7200000\n\
             [limits]\nmax_connections = 0\nmax_subscriptions = 0\n\
             [history]\nmax_events = 20000000\n",
        );
        assert_eq!(e.len(), 4, "{e:?}");
        for key in [
            "server.shutdown_grace_ms",
            "limits.max_connections ",
            "limits.max_subscriptions",
            "history.max_events",
        ] {
            assert!(
                e.iter().any(|m| m.contains(key)),
                "{key} missing from {e:?}"
            );
        }
        // The Display form puts each on its own line.
        let shown = Config::parse("[limits]\nmax_connections = 0\nmax_tenants = 0")
            .unwrap()
            .validate()
            .unwrap_err()
            .to_string();
        assert_eq!(shown.lines().count(), 2, "{shown}");
    }

    const TWO_TENANTS: &str = r#"
[[auth.api_keys]]
key = "tenant-a-viewer-key-01"
user_id = "a-viewer"
tenant = "fleet_a"
role = "viewer"

[[auth.api_keys]]
key = "tenant-b-other-key-001"
user_id = "b-other"
tenant = "fleet_b"
role = "viewer"

[[auth.api_keys]]
key = "tenant-a-viewer-key-01"
user_id = "b-service"
tenant = "fleet_b"
role = "service"
"#;

    #[test]
    fn a_key_listed_twice_is_refused_with_both_lines() {
        let e = errors(TWO_TENANTS);
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(
            e[0].contains("api key listed twice: lines 3 and 15"),
            "{e:?}"
        );
        assert!(
            e[0].contains("a-viewer") && e[0].contains("b-service"),
            "{e:?}"
        );
        // The secret itself is not printed.
        assert!(!e[0].contains("tenant-a-viewer-key-01"), "{e:?}");
    }

    #[test]
    fn a_key_listed_twice_in_code_is_refused_with_indices() {
        let mut c = Config::default();
        let k = |key: &str, user: &str| ApiKeyConfig {
            key: key.into(),
            key_sha256: None,
            user_id: user.into(),
            tenant: "fleet_a".into(),
            role: Role::Viewer,
            vehicles: vec![],
            drivers: vec![],
            trips: vec![],
        };
        c.auth.api_keys = vec![
            k("key-number-one-0001", "u0"),
            k("key-number-two-0002", "u1"),
            k("key-number-one-0001", "u2"),
        ];
        let e = c.validate().unwrap_err().0;
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(
            e[0].contains("api key listed twice: auth.api_keys[0] and auth.api_keys[2]"),
            "{e:?}"
        );
        // Lines of parsed entries stay attached to them; an entry changed in code is
        // named by its index.
        let mut c = Config::parse(TWO_TENANTS).unwrap();
        c.auth.api_keys[2].key = "tenant-b-other-key-001".into();
        let e = c.validate().unwrap_err().0;
        assert!(
            e[0].contains("api key listed twice: line 9 and auth.api_keys[2]"),
            "{e:?}"
        );
    }

    #[test]
    fn api_key_entries_are_checked_with_their_line() {
        let e = errors(
            "[[auth.api_keys]]\nkey = \"short\"\nuser_id = \"u\"\ntenant = \"\"\nrole = \"viewer\"\n",
        );
        assert_eq!(e.len(), 2, "{e:?}");
        assert!(
            e.iter()
                .all(|m| m.starts_with("api key at line 2 (user \"u\")")),
            "{e:?}"
        );
    }

    #[test]
    fn device_key_without_vehicles_is_a_warning_not_an_error() {
        let text = "[[auth.api_keys]]\nkey = \"device-key-0123456789\"\nuser_id = \"d\"\n\
                    tenant = \"fleet_a\"\nrole = \"device\"\n";
        let v = Config::parse(text).unwrap().validate().expect("accepted");
        assert_eq!(v.warnings.len(), 1, "{:?}", v.warnings);
        assert!(
            v.warnings[0].contains("line 2") && v.warnings[0].contains("no vehicles"),
            "{:?}",
            v.warnings
        );
        let scoped = text.replace(
            "role = \"device\"",
            "role = \"device\"\nvehicles = [\"v1\"]",
        );
        assert!(
            Config::parse(&scoped)
                .unwrap()
                .validate()
                .unwrap()
                .warnings
                .is_empty()
        );
        // Other roles have no vehicle scope.
        let viewer = text.replace("device\"\n", "viewer\"\n");
        assert!(
            Config::parse(&viewer)
                .unwrap()
                .validate()
                .unwrap()
                .warnings
                .is_empty()
        );
    }

    #[test]
    fn jwt_key_files_are_loaded_by_validation() {
        let text = format!(
            "[auth]\njwt_rs256_public_key_file = {:?}\njwt_es256_public_key_file = {:?}\n",
            fixture("rs256-public.pem"),
            fixture("es256-public.pem")
        );
        let v = Config::parse(&text)
            .unwrap()
            .validate()
            .expect("valid keys");
        assert!(v.keys.rs256.is_some() && v.keys.es256.is_some());
        // A config without key files loads none.
        let v = Config::default().validate().unwrap();
        assert!(v.keys.rs256.is_none() && v.keys.es256.is_none());
    }

    #[test]
    fn missing_or_invalid_key_files_are_refused_naming_the_file() {
        let missing = "/nonexistent/fleetcast/rs256.pem";
        let e = errors(&format!("[auth]\njwt_rs256_public_key_file = {missing:?}"));
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(
            e[0].contains("auth.jwt_rs256_public_key_file") && e[0].contains(missing),
            "{e:?}"
        );
        // Not PEM at all, and a PEM key of the other kind: both refused, both reported.
        let e = errors(&format!(
            "[auth]\njwt_rs256_public_key_file = {:?}\njwt_es256_public_key_file = {:?}",
            format!("{}/Cargo.toml", env!("CARGO_MANIFEST_DIR")),
            fixture("rs256-public.pem"),
        ));
        assert_eq!(e.len(), 2, "{e:?}");
        assert!(
            e[0].contains("Cargo.toml") && e[0].contains("not an RSA public key"),
            "{e:?}"
        );
        assert!(
            e[1].contains("rs256-public.pem") && e[1].contains("not an EC public key"),
            "{e:?}"
        );
    }

    #[test]
    fn hashed_keys_are_checked_and_duplicates_found_across_clear_and_hashed() {
        let hex = crate::auth::sha256_hex("shared-key-0123456789");
        let entry = |body: &str, user: &str| {
            format!(
                "[[auth.api_keys]]\n{body}\nuser_id = \"{user}\"\ntenant = \"fleet_a\"\nrole = \"viewer\"\n"
            )
        };
        let text = entry("key = \"shared-key-0123456789\"", "a")
            + &entry(&format!("key_sha256 = \"{}\"", hex.to_uppercase()), "b");
        let e = errors(&text);
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(
            e[0].contains("api key listed twice: lines 2 and 7"),
            "{e:?}"
        );
        refused(
            &entry("key_sha256 = \"abc\"", "c"),
            "key_sha256 must be 64 hex digits",
        );
        refused(
            &entry(
                &format!("key = \"shared-key-0123456789\"\nkey_sha256 = \"{hex}\""),
                "d",
            ),
            "not both",
        );
        refused(&entry("", "e"), "key must be at least 16");
        let ok = Config::parse(&entry(&format!("key_sha256 = \"{hex}\""), "f")).unwrap();
        assert!(ok.validate().is_ok());
        assert_eq!(
            ok.auth.api_keys[0].digest(),
            Some(digest("shared-key-0123456789"))
        );
    }

    #[test]
    fn jwks_claims_and_revocation_settings_are_checked() {
        refused(
            "[auth]\njwks_url = \"http://x/j\"\njwks_file = \"/x\"",
            "both set",
        );
        refused("[auth]\njwks_url = \"ftp://x/j\"", "auth.jwks_url");
        refused(
            "[auth]\njwks_file = \"/nonexistent/fleetcast/jwks.json\"",
            "auth.jwks_file: cannot read /nonexistent/fleetcast/jwks.json",
        );
        refused(
            &format!("[auth]\njwks_file = {:?}", fixture("rs256-public.pem")),
            "not a JWK Set",
        );
        refused("[auth]\njwt_leeway_s = 601", "auth.jwt_leeway_s");
        refused(
            "[auth]\nrevoked_token_ids = [\"\"]",
            "auth.revoked_token_ids[0]",
        );
        refused("[auth]\nrevoked_keys = [\"\"]", "auth.revoked_keys[0]");
        refused(
            "[auth]\njwks_refresh_interval_ms = 1000\njwks_min_refresh_interval_ms = 2000",
            "auth.jwks_refresh_interval_ms",
        );
        // An origin pattern is parsed with the file: the error names the line and entry.
        let e = Config::parse("[server]\nallowed_origins = [\"https://a.example/x\"]")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("line 2") && e.contains("server.allowed_origins[0]"),
            "{e}"
        );
        let c = Config::from_toml(
            "[auth]\njwt_audience = \"fleetcast\"\n[server]\nallowed_origins = [\"https://*.a.example\"]",
        )
        .unwrap();
        assert_eq!(c.auth.jwt_audience, vec!["fleetcast".to_string()]);
        assert!(
            c.server
                .allowed_origins
                .allows_upgrade(Some("https://x.a.example"))
        );
        let c = Config::from_toml("[auth]\njwt_audience = [\"a\", \"b\"]").unwrap();
        assert_eq!(c.auth.jwt_audience.len(), 2);
    }
}
