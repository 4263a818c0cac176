//! Domain vocabulary shared by every layer: channels, roles, severities, entity keys.

use std::fmt;

/// A stream a client subscribes to. The union of the seeds' channels (SPEC §3).
#[derive(Copy, Clone, Debug, Eq, PartialEq, Hash)]
#[repr(u8)]
pub enum Channel {
    VehicleLocations = 0,
    TripEvents,
    Alerts,
    Telemetry,
    FleetMetrics,
    DriverStatus,
    RouteProgress,
    MaintenanceAlerts,
    DeviceStatus,
    System,
}

impl Channel {
    pub const COUNT: usize = 10;
    pub const ALL: [Channel; Channel::COUNT] = [
        Channel::VehicleLocations,
        Channel::TripEvents,
        Channel::Alerts,
        Channel::Telemetry,
        Channel::FleetMetrics,
        Channel::DriverStatus,
        Channel::RouteProgress,
        Channel::MaintenanceAlerts,
        Channel::DeviceStatus,
        Channel::System,
    ];

    pub fn index(self) -> usize {
        self as usize
    }

    pub fn name(self) -> &'static str {
        match self {
            Channel::VehicleLocations => "vehicle_locations",
            Channel::TripEvents => "trip_events",
            Channel::Alerts => "alerts",
            Channel::Telemetry => "telemetry",
            Channel::FleetMetrics => "fleet_metrics",
            Channel::DriverStatus => "driver_status",
            Channel::RouteProgress => "route_progress",
            Channel::MaintenanceAlerts => "maintenance_alerts",
            Channel::DeviceStatus => "device_status",
            Channel::System => "system",
        }
    }

    pub fn parse(s: &str) -> Option<Channel> {
        Channel::ALL.into_iter().find(|c| c.name() == s)
    }

    /// The native `type` of a data event on this channel.
    pub fn event_type(self) -> &'static str {
        match self {
            Channel::VehicleLocations => "location_update",
            Channel::TripEvents => "trip_event",
            Channel::Alerts => "safety_alert",
            Channel::Telemetry => "telemetry_update",
            Channel::FleetMetrics => "fleet_metrics",
            Channel::DriverStatus => "driver_status",
            Channel::RouteProgress => "route_progress",
            Channel::MaintenanceAlerts => "maintenance_alert",
            Channel::DeviceStatus => "device_status",
            Channel::System => "system_status",
        }
    }

    /// The channel a native publish `type` goes to (`publish` names its channel itself).
    pub fn from_publish_type(t: &str) -> Option<Channel> {
        Channel::ALL
            .into_iter()
            .find(|c| *c != Channel::System && c.event_type() == t)
    }

    /// State channels keep the last value per entity and send a snapshot on subscribe.
    pub fn is_state(self) -> bool {
        matches!(
            self,
            Channel::VehicleLocations
                | Channel::DriverStatus
                | Channel::DeviceStatus
                | Channel::RouteProgress
                | Channel::Telemetry
        )
    }

    /// Event channels carry `seq`/`epoch` and keep a bounded history.
    pub fn is_event(self) -> bool {
        matches!(
            self,
            Channel::TripEvents | Channel::Alerts | Channel::MaintenanceAlerts
        )
    }
}

impl fmt::Display for Channel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What a principal may do (SPEC §2).
#[derive(Copy, Clone, Debug, Eq, PartialEq, Hash, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Device,
    Viewer,
    Service,
    Admin,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Device => "device",
            Role::Viewer => "viewer",
            Role::Service => "service",
            Role::Admin => "admin",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "device" => Some(Role::Device),
            "viewer" => Some(Role::Viewer),
            "service" => Some(Role::Service),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }

    pub fn may_subscribe(self, channel: Channel) -> bool {
        match self {
            Role::Device => false,
            Role::Viewer | Role::Service => channel != Channel::System,
            Role::Admin => true,
        }
    }

    pub fn may_publish(self, channel: Channel) -> bool {
        match self {
            // A unit reports its position, telemetry, driver and own status, and the
            // alerts it detects itself (harsh braking...), all within its scope.
            Role::Device => matches!(
                channel,
                Channel::VehicleLocations
                    | Channel::Telemetry
                    | Channel::DriverStatus
                    | Channel::DeviceStatus
                    | Channel::Alerts
            ),
            Role::Service => channel != Channel::System,
            Role::Viewer | Role::Admin => false,
        }
    }
}

/// The severities clients may publish and filter on: one open set, the union of the
/// seeds' words, passed through unchanged (a filter matches the string).
pub const SEVERITIES: [&str; 6] = ["info", "low", "medium", "warning", "high", "critical"];

/// The canonical spelling of a known severity word (`None`: not one of [`SEVERITIES`]).
pub fn severity_word(s: &str) -> Option<&'static str> {
    SEVERITIES.iter().copied().find(|w| *w == s)
}

/// Alert severity buckets of the derived alert summary, from least to most urgent.
#[derive(Copy, Clone, Debug, Eq, PartialEq, Hash, PartialOrd, Ord)]
pub enum Severity {
    Low,
    Medium,
    High,
    Critical,
}

impl Severity {
    pub fn parse(s: &str) -> Option<Severity> {
        match s {
            "low" | "info" => Some(Severity::Low),
            "medium" | "warning" => Some(Severity::Medium),
            "high" | "error" => Some(Severity::High),
            "critical" => Some(Severity::Critical),
            _ => None,
        }
    }

    pub fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

/// The entities an event concerns; the routing index is keyed by them.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct EntityKeys {
    pub vehicle: Option<Box<str>>,
    pub trip: Option<Box<str>>,
    pub driver: Option<Box<str>>,
}

impl EntityKeys {
    /// The key under which last known state is stored for a state channel.
    pub fn state_key(&self, channel: Channel) -> Option<&str> {
        match channel {
            Channel::DriverStatus => self.driver.as_deref().or(self.vehicle.as_deref()),
            _ => self.vehicle.as_deref(),
        }
    }
}
