//! Configuration: the TOML file, its defaults, and validation into typed settings.
//!
//! Every option is documented in `docs/configuration.md`; a default here has a reason there.

use crate::model::Role;
use serde::Deserialize;
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
    pub testing: TestingConfig,
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
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: "127.0.0.1:8000".parse().expect("static address"),
            shards: 0,
            shutdown_grace_ms: 5_000,
            metrics_token: None,
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

#[derive(Debug, Clone, Default, Deserialize)]
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
    /// Refuse tokens without an `exp` claim (recommended in production).
    pub require_exp: bool,
    pub api_keys: Vec<ApiKeyConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKeyConfig {
    pub key: String,
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

impl Config {
    pub fn from_toml(text: &str) -> anyhow::Result<Config> {
        let cfg: Config = toml::from_str(text)?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn load(path: &Path) -> anyhow::Result<Config> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
        Config::from_toml(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        let l = &self.limits;
        anyhow::ensure!(
            l.max_message_bytes >= 64,
            "limits.max_message_bytes must be at least 64"
        );
        anyhow::ensure!(l.max_batch >= 1, "limits.max_batch must be at least 1");
        anyhow::ensure!(
            l.heartbeat_interval_ms >= 10,
            "limits.heartbeat_interval_ms must be at least 10"
        );
        anyhow::ensure!(
            l.max_outbound_bytes >= 4096,
            "limits.max_outbound_bytes must be at least 4096"
        );
        anyhow::ensure!(
            l.overload_lag_ms >= 1,
            "limits.overload_lag_ms must be at least 1"
        );
        anyhow::ensure!(
            l.soft_outbound_bytes <= l.max_outbound_bytes,
            "limits.soft_outbound_bytes must not exceed limits.max_outbound_bytes"
        );
        for role in [Role::Device, Role::Viewer, Role::Service, Role::Admin] {
            anyhow::ensure!(
                l.for_role(role).messages_per_second >= 1,
                "messages_per_second for {} must be at least 1",
                role.name()
            );
        }
        anyhow::ensure!(
            l.requests_per_second >= 1,
            "limits.requests_per_second must be at least 1"
        );
        anyhow::ensure!(
            l.max_pending_connections >= 1 && l.max_pending_connections_per_ip >= 1,
            "limits.max_pending_connections and max_pending_connections_per_ip must be at least 1"
        );
        for role in [Role::Device, Role::Viewer, Role::Service, Role::Admin] {
            anyhow::ensure!(
                l.for_role(role).publishes_per_second >= 1,
                "publishes_per_second for {} must be at least 1",
                role.name()
            );
        }
        if let Some(s) = &self.auth.jwt_hs256_secret {
            anyhow::ensure!(
                s.len() >= 32,
                "auth.jwt_hs256_secret must be at least 32 bytes (it is {}): a short HS256 \
                 secret can be brute-forced from any token",
                s.len()
            );
        }
        if let Some(t) = &self.server.metrics_token {
            anyhow::ensure!(
                t.len() >= 16,
                "server.metrics_token must be at least 16 characters"
            );
        }
        anyhow::ensure!(self.server.shards <= 64, "server.shards must be at most 64");
        for k in &self.auth.api_keys {
            anyhow::ensure!(
                k.key.len() >= 16,
                "api key for user {:?} is shorter than 16 characters",
                k.user_id
            );
            anyhow::ensure!(
                !k.tenant.is_empty(),
                "api key for user {:?} has no tenant",
                k.user_id
            );
        }
        Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
