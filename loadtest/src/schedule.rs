//! Pacing and synthetic motion, all deterministic (a run is reproducible from its
//! scenario): when each message is due, where each vehicle is, which severity an alert
//! has.

/// splitmix64: a good 64-bit mix for seeding and per-item hashes.
pub fn mix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// A small xorshift generator (mask keys, WebSocket keys).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(mix64(seed) | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// A periodic sender: the k-th message (k = 0, 1, ...) is due at
/// `start + phase + k * interval + jitter(k)`, jitter uniform in [-jitter, +jitter] and
/// never before `start`. Jitter is below half the interval (checked by the scenario),
/// so a sender's messages stay in order and at least `interval - 2 * jitter` apart.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Periodic {
    pub start_ns: u64,
    pub phase_ns: u64,
    pub interval_ns: u64,
    pub jitter_ns: u64,
    pub seed: u64,
}

impl Periodic {
    pub fn due(&self, k: u64) -> u64 {
        let base = self.start_ns + self.phase_ns + k * self.interval_ns;
        if self.jitter_ns == 0 {
            return base;
        }
        let r = mix64(self.seed ^ k.wrapping_mul(0xA24B_AED4_963E_E407));
        let off = (r % (2 * self.jitter_ns + 1)) as i64 - self.jitter_ns as i64;
        (base as i64 + off).max(self.start_ns as i64) as u64
    }

    /// How many messages fall before `end_ns` (the schedule is increasing).
    pub fn count_before(&self, end_ns: u64) -> u64 {
        let mut k = 0;
        while self.due(k) < end_ns {
            k += 1;
        }
        k
    }
}

/// Evenly spread phases: sender `i` of `count` starts `i / count` of an interval late,
/// so a fleet of 1 000 vehicles at 1/s sends one update per millisecond.
pub fn spread_phase(i: u64, count: u64, interval_ns: u64) -> u64 {
    if count == 0 {
        return 0;
    }
    ((i as u128 * interval_ns as u128) / count as u128) as u64
}

/// The synthetic city: vehicles drive circles around points near the center.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Route {
    pub center_lat: f64,
    pub center_lon: f64,
    /// Circle centers lie within this distance of the city center.
    pub radius_km: f64,
    /// Average speed; each vehicle drives at 70 % to 130 % of it.
    pub speed_kmh: f64,
}

impl Default for Route {
    fn default() -> Self {
        Route {
            center_lat: 40.7128,
            center_lon: -74.0060,
            radius_km: 8.0,
            speed_kmh: 40.0,
        }
    }
}

/// Where a vehicle is, `t_s` seconds into its route.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Position {
    pub latitude: f64,
    pub longitude: f64,
    pub speed_kmh: f64,
    pub heading_deg: f64,
}

const KM_PER_DEG_LAT: f64 = 111.32;

impl Route {
    pub fn position(&self, vehicle: u64, t_s: f64) -> Position {
        let h = mix64(vehicle ^ 0x5EED);
        let unit = |shift: u32| ((h >> shift) & 0xFFFF) as f64 / 65_536.0;
        let center_r = self.radius_km * unit(0).sqrt();
        let center_a = unit(16) * std::f64::consts::TAU;
        let loop_r = 0.5 + 1.5 * unit(32); // km
        let speed = self.speed_kmh * (0.7 + 0.6 * unit(48));
        let omega = speed / 3600.0 / loop_r; // rad per second
        let theta = unit(8) * std::f64::consts::TAU + omega * t_s;
        let x = center_r * center_a.cos() + loop_r * theta.cos(); // km east
        let y = center_r * center_a.sin() + loop_r * theta.sin(); // km north
        let latitude = (self.center_lat + y / KM_PER_DEG_LAT).clamp(-89.9, 89.9);
        let km_per_deg_lon = (KM_PER_DEG_LAT * latitude.to_radians().cos()).max(1e-3);
        let longitude = wrap_lon(self.center_lon + x / km_per_deg_lon);
        // Counter-clockwise motion: the velocity is (-sin, cos); heading from north.
        let heading = (-theta.sin())
            .atan2(theta.cos())
            .to_degrees()
            .rem_euclid(360.0);
        Position {
            latitude,
            longitude,
            speed_kmh: speed,
            heading_deg: heading,
        }
    }
}

fn wrap_lon(lon: f64) -> f64 {
    (lon + 180.0).rem_euclid(360.0) - 180.0
}

pub const SEVERITIES: [&str; 4] = ["low", "medium", "high", "critical"];
pub const CATEGORIES: [&str; 4] = [
    "harsh_braking",
    "speeding",
    "harsh_acceleration",
    "distracted_driving",
];
pub const TRIP_EVENTS: [&str; 3] = ["trip_started", "waypoint_reached", "trip_completed"];

/// The severity (index into [`SEVERITIES`]) of alert `n` of service connection `svc`:
/// 40 % low, 30 % medium, 20 % high, 10 % critical. A pure function, so a rejected
/// alert's severity is known from its id alone.
pub fn alert_severity(svc: u64, n: u64) -> usize {
    match mix64(svc.wrapping_mul(0x1_0000_0001) ^ n) % 10 {
        0..=3 => 0,
        4..=6 => 1,
        7..=8 => 2,
        _ => 3,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(jitter_ms: u64) -> Periodic {
        Periodic {
            start_ns: 1_000_000_000,
            phase_ns: 250_000_000,
            interval_ns: 1_000_000_000,
            jitter_ns: jitter_ms * 1_000_000,
            seed: 7,
        }
    }

    #[test]
    fn periodic_without_jitter_is_exact() {
        let s = p(0);
        assert_eq!(s.due(0), 1_250_000_000);
        assert_eq!(s.due(3), 4_250_000_000);
        // Due before start + 10 s: k = 0..=9.
        assert_eq!(s.count_before(11_000_000_000), 10);
        assert_eq!(s.count_before(1_250_000_000), 0);
        assert_eq!(s.count_before(1_250_000_001), 1);
    }

    #[test]
    fn jitter_stays_in_bounds_ordered_and_spread() {
        let s = p(200);
        let mut prev = 0;
        let mut offsets = Vec::new();
        for k in 0..2_000 {
            let d = s.due(k);
            let base = s.start_ns + s.phase_ns + k * s.interval_ns;
            assert!(d.abs_diff(base) <= 200_000_000);
            assert!(d >= s.start_ns);
            if k > 0 {
                assert!(d - prev >= 600_000_000, "k={k}");
            }
            prev = d;
            offsets.push(d as i64 - base as i64);
        }
        let mean = offsets.iter().sum::<i64>() as f64 / offsets.len() as f64;
        assert!(mean.abs() < 15_000_000.0, "mean offset {mean}");
        assert!(offsets.iter().any(|&o| o > 150_000_000));
        assert!(offsets.iter().any(|&o| o < -150_000_000));
        // Deterministic.
        assert_eq!(s.due(17), p(200).due(17));
    }

    #[test]
    fn jitter_never_schedules_before_start() {
        let s = Periodic {
            phase_ns: 0,
            ..p(400)
        };
        assert!((0..100).all(|k| s.due(k) >= s.start_ns));
    }

    #[test]
    fn phases_spread_evenly() {
        let ph: Vec<u64> = (0..4).map(|i| spread_phase(i, 4, 1_000)).collect();
        assert_eq!(ph, vec![0, 250, 500, 750]);
        assert_eq!(spread_phase(0, 0, 1_000), 0);
    }

    #[test]
    fn routes_are_plausible_and_continuous() {
        let r = Route::default();
        for v in 0..200 {
            let a = r.position(v, 0.0);
            let b = r.position(v, 1.0);
            assert!((-90.0..=90.0).contains(&a.latitude));
            assert!((-180.0..=180.0).contains(&a.longitude));
            assert!((a.latitude - r.center_lat).abs() < 0.2);
            assert!((0.0..360.0).contains(&a.heading_deg));
            assert!(a.speed_kmh >= 28.0 - 1e-9 && a.speed_kmh <= 52.0 + 1e-9);
            // One second at <= 52 km/h moves < 15 m (~0.00014 degrees).
            assert!((a.latitude - b.latitude).abs() < 0.0002);
        }
    }

    #[test]
    fn severities_follow_the_weights() {
        let mut counts = [0u32; 4];
        for n in 0..10_000 {
            counts[alert_severity(3, n)] += 1;
        }
        assert!(counts[0] > 3_600 && counts[0] < 4_400, "{counts:?}");
        assert!(counts[3] > 700 && counts[3] < 1_300, "{counts:?}");
        assert_eq!(alert_severity(3, 42), alert_severity(3, 42));
    }
}
