//! The limits the broker enforces, as the core names them: each breach is counted in
//! `fleetcast_limit_breaches_total{kind}` and answered with its code and message.

/// A limit that was breached; each kind is counted in `fleetcast_limit_breaches_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    MessageSize,
    MessageRate,
    RateAbuse,
    BatchSize,
    Subscriptions,
    LocationRate,
    AuthTimeout,
    HandshakeTimeout,
    HandshakeSize,
    ConnectionsPerUser,
    ConnectionsPerNode,
    NewConnectionsPerUser,
    NewConnectionsPerIp,
    SlowConsumer,
    ProtocolError,
    Tenants,
    VehiclesPerTenant,
    RequestRate,
    PublishRate,
    FutureTimestamp,
    PendingConnections,
    PendingConnectionsPerIp,
    ConnectionsPerTenant,
    /// Failed `user/auth` logins per minute for one login.
    LoginRatePerLogin,
    /// Failed `user/auth` logins per minute from one client address.
    LoginRatePerIp,
}

impl Limit {
    pub const ALL: [Limit; 25] = [
        Limit::ConnectionsPerTenant,
        Limit::RequestRate,
        Limit::PublishRate,
        Limit::FutureTimestamp,
        Limit::PendingConnections,
        Limit::PendingConnectionsPerIp,
        Limit::Tenants,
        Limit::VehiclesPerTenant,
        Limit::MessageSize,
        Limit::MessageRate,
        Limit::RateAbuse,
        Limit::BatchSize,
        Limit::Subscriptions,
        Limit::LocationRate,
        Limit::AuthTimeout,
        Limit::HandshakeTimeout,
        Limit::HandshakeSize,
        Limit::ConnectionsPerUser,
        Limit::ConnectionsPerNode,
        Limit::NewConnectionsPerUser,
        Limit::NewConnectionsPerIp,
        Limit::SlowConsumer,
        Limit::ProtocolError,
        Limit::LoginRatePerLogin,
        Limit::LoginRatePerIp,
    ];

    /// The `kind` label.
    pub fn name(self) -> &'static str {
        match self {
            Limit::MessageSize => "message_size",
            Limit::MessageRate => "message_rate",
            Limit::RateAbuse => "message_rate_abuse",
            Limit::BatchSize => "batch_size",
            Limit::Subscriptions => "subscriptions",
            Limit::LocationRate => "location_rate",
            Limit::AuthTimeout => "auth_timeout",
            Limit::HandshakeTimeout => "handshake_timeout",
            Limit::HandshakeSize => "handshake_size",
            Limit::ConnectionsPerUser => "connections_per_user",
            Limit::ConnectionsPerTenant => "connections_per_tenant",
            Limit::ConnectionsPerNode => "connections_per_node",
            Limit::NewConnectionsPerUser => "new_connections_per_user",
            Limit::NewConnectionsPerIp => "new_connections_per_ip",
            Limit::SlowConsumer => "slow_consumer",
            Limit::ProtocolError => "protocol_error",
            Limit::Tenants => "tenants",
            Limit::VehiclesPerTenant => "vehicles_per_tenant",
            Limit::RequestRate => "request_rate",
            Limit::PublishRate => "publish_rate",
            Limit::FutureTimestamp => "future_timestamp",
            Limit::PendingConnections => "pending_connections",
            Limit::PendingConnectionsPerIp => "pending_connections_per_ip",
            Limit::LoginRatePerLogin => "login_rate_per_login",
            Limit::LoginRatePerIp => "login_rate_per_ip",
        }
    }

    /// The error or HTTP status: node capacity is 503, a client's own excess 429.
    pub fn code(self) -> u16 {
        match self {
            Limit::ConnectionsPerNode
            | Limit::Tenants
            | Limit::VehiclesPerTenant
            | Limit::PendingConnections => 503,
            Limit::FutureTimestamp => 400,
            _ => 429,
        }
    }

    /// What the client is told.
    pub fn message(self) -> &'static str {
        match self {
            Limit::ConnectionsPerUser => "too many connections for this user",
            Limit::ConnectionsPerTenant => "too many connections for this fleet (company)",
            Limit::ConnectionsPerNode => "too many connections on this node",
            Limit::NewConnectionsPerUser => "too many new connections for this user, retry later",
            Limit::NewConnectionsPerIp => "too many new connections from this address, retry later",
            Limit::Tenants => "this node serves its maximum number of fleets",
            Limit::VehiclesPerTenant => "this fleet has its maximum number of vehicles with state",
            Limit::PublishRate => "over the publish rate of this user",
            Limit::RequestRate => "over the snapshot and history request rate",
            Limit::PendingConnections => "too many connections in their handshake on this node",
            Limit::PendingConnectionsPerIp => {
                "too many connections in their handshake from this address"
            }
            Limit::LoginRatePerLogin => "too many failed logins for this login, retry later",
            Limit::LoginRatePerIp => "too many failed logins from this address, retry later",
            _ => self.name(),
        }
    }
}
