//! Per-connection views of an event: what a subscriber asked to see differently from the
//! dialect's shared frame (a `metrics` projection, Telematics `date_format` and
//! `timezone`). A view is a value: equal views see the same bytes, so the shard encodes an
//! event once per dialect and distinct view, and shares that frame among the subscribers
//! that asked for the same (SPEC §1), never per subscriber.

use std::hash::{Hash, Hasher};
use std::sync::Arc;

/// How an event is shown to one subscription.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct View {
    /// Only these telemetry metrics (a subscription's `metrics` filter).
    pub metrics: Option<Arc<[Box<str>]>>,
    /// How timestamps are written (Telematics `date_format` and `timezone`).
    pub time: Option<Arc<TimeView>>,
    /// The thresholds tracker states are judged by (iTrack `connection_status`,
    /// `movement_status`): a frame with them depends on when it is encoded.
    pub states: Option<Arc<StateRules>>,
}

/// When a tracker counts as idle or offline, and moving, stopped or parked (`[itrack]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct StateRules {
    /// Last update older than this: `idle` (else `active`).
    pub idle_after_ms: u64,
    /// Last update older than this: `offline`.
    pub offline_after_ms: u64,
    /// At rest longer than this: `parked` (else `stopped`).
    pub parked_after_ms: u64,
    /// Faster than this (km/h): `moving`.
    pub moving_kmh: u32,
}

impl Default for StateRules {
    fn default() -> Self {
        StateRules {
            idle_after_ms: 120_000,
            offline_after_ms: 600_000,
            parked_after_ms: 300_000,
            moving_kmh: 3,
        }
    }
}

impl StateRules {
    /// `active`, `idle` or `offline`, from the age of the last update at `now_ms`.
    pub fn connection_status(&self, last_update_ms: i64, now_ms: i64) -> &'static str {
        let age = now_ms.saturating_sub(last_update_ms).max(0) as u64;
        if age >= self.offline_after_ms {
            "offline"
        } else if age >= self.idle_after_ms {
            "idle"
        } else {
            "active"
        }
    }

    /// `moving`, `stopped` or `parked`, from the speed and how long it has been at rest.
    pub fn movement_status(
        &self,
        speed_kmh: f64,
        stopped_since_ms: i64,
        now_ms: i64,
    ) -> &'static str {
        if speed_kmh > self.moving_kmh as f64 {
            "moving"
        } else if now_ms.saturating_sub(stopped_since_ms) >= self.parked_after_ms as i64 {
            "parked"
        } else {
            "stopped"
        }
    }
}

impl View {
    /// True when the view changes nothing: the dialect's shared frame is what it sees.
    pub fn is_plain(&self) -> bool {
        self.metrics.is_none() && self.time.is_none() && self.states.is_none()
    }

    /// True when `metric` is shown.
    pub fn wants(&self, metric: &str) -> bool {
        self.metrics
            .as_ref()
            .is_none_or(|l| l.iter().any(|m| &**m == metric))
    }
}

/// Telematics `date_format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DateFormat {
    /// Integer seconds since the UNIX epoch.
    Unix,
    /// RFC 3339 with the offset of the time zone.
    Iso,
    /// A human-readable date and time in the time zone, with its abbreviation.
    Localized,
}

impl DateFormat {
    pub fn parse(s: &str) -> Option<DateFormat> {
        Some(match s {
            "unix" => DateFormat::Unix,
            "iso" => DateFormat::Iso,
            "localized" => DateFormat::Localized,
            _ => return None,
        })
    }
}

/// A date format in an IANA time zone (daylight saving time included).
#[derive(Debug, Clone)]
pub struct TimeView {
    pub format: DateFormat,
    /// The IANA name as the client gave it (`America/New_York`).
    pub zone_name: Box<str>,
    zone: jiff::tz::TimeZone,
}

impl PartialEq for TimeView {
    fn eq(&self, other: &Self) -> bool {
        self.format == other.format && self.zone_name == other.zone_name
    }
}

impl Eq for TimeView {}

impl Hash for TimeView {
    fn hash<H: Hasher>(&self, h: &mut H) {
        self.format.hash(h);
        self.zone_name.hash(h);
    }
}

impl TimeView {
    /// `None`: not an IANA time zone name this build knows.
    pub fn new(format: DateFormat, zone_name: &str) -> Option<TimeView> {
        let zone = jiff::tz::TimeZone::get(zone_name).ok()?;
        Some(TimeView {
            format,
            zone_name: zone_name.into(),
            zone,
        })
    }

    /// Writes the instant `unix_ms` as a JSON value: a number for `unix`, else a string.
    pub fn write(&self, o: &mut Vec<u8>, unix_ms: i64) {
        let secs = unix_ms.div_euclid(1000);
        if self.format == DateFormat::Unix {
            crate::json::write_i64(o, secs);
            return;
        }
        let Ok(ts) = jiff::Timestamp::from_millisecond(unix_ms) else {
            crate::json::write_i64(o, secs);
            return;
        };
        let zoned = ts.to_zoned_datetime(self.zone.clone());
        let text = match self.format {
            DateFormat::Iso => zoned.strftime("%Y-%m-%dT%H:%M:%S%.3f%:z").to_string(),
            _ => zoned
                .strftime("%a, %b %-d, %Y, %-I:%M:%S %p %Z")
                .to_string(),
        };
        crate::json::write_str(o, &text);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shown(format: DateFormat, zone: &str, ms: i64) -> String {
        let mut o = Vec::new();
        TimeView::new(format, zone).unwrap().write(&mut o, ms);
        String::from_utf8(o).unwrap()
    }

    #[test]
    fn formats_follow_the_zone_and_daylight_saving() {
        // 2022-01-01T00:00:00Z and 2022-07-01T00:00:00Z.
        let (winter, summer) = (1_640_995_200_000, 1_656_633_600_000);
        assert_eq!(
            shown(DateFormat::Unix, "America/New_York", winter + 999),
            "1640995200"
        );
        assert_eq!(
            shown(DateFormat::Iso, "America/New_York", winter),
            "\"2021-12-31T19:00:00.000-05:00\""
        );
        assert_eq!(
            shown(DateFormat::Iso, "America/New_York", summer),
            "\"2022-06-30T20:00:00.000-04:00\""
        );
        assert_eq!(
            shown(DateFormat::Localized, "Europe/Berlin", summer),
            "\"Fri, Jul 1, 2022, 2:00:00 AM CEST\""
        );
        assert!(TimeView::new(DateFormat::Iso, "Mars/Olympus_Mons").is_none());
    }
}
