//! fleetcast-load: a load generator for brokers that speak fleetcast's native dialect.
//!
//! Scenario files (TOML) describe tenants, vehicles that publish `location_update`s along
//! synthetic routes, services that publish alerts and trip events, and dashboards that
//! subscribe per fleet, per vehicle or with severity filters. A run opens every
//! connection, publishes on a schedule for the scenario's duration and measures
//! end-to-end latency from each message's *scheduled* send time (free of coordinated
//! omission), expected vs delivered counts per subscriber, errors, and the broker's
//! CPU and memory. See `loadtest/README.md`.
//!
//! Module map: [`scenario`] (files, overrides, the plan of connections),
//! [`schedule`] (pacing, routes, deterministic randomness), [`ws`] (a minimal
//! WebSocket client codec), [`scan`] (field scanning on the receive path), [`engine`]
//! (the I/O threads), [`run`] (one run, start to finish), [`report`] (JSON, table,
//! HTML), [`svg`] (plots), [`capacity`] (ramps and SLOs), [`sys`] (/proc, rlimits).

pub mod capacity;
pub mod clock;
pub mod engine;
pub mod report;
pub mod run;
pub mod scan;
pub mod scenario;
pub mod schedule;
pub mod svg;
pub mod sys;
pub mod tls;
pub mod ws;
