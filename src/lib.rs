//! fleetcast: a sharded WebSocket broker for real-time fleet telematics.
//!
//! Layers, from the bottom:
//! - pure core, no IO and no clock: [`wire`] (HTTP upgrade, RFC 6455 frames), [`dialect`]
//!   (message codecs), [`session`] (one connection's protocol state), [`route`] (the
//!   subscriber index), [`auth`] and [`sessions`] (iTrack logins), [`config`], [`json`],
//!   [`event`];
//! - [`hub`]: per-tenant state shared by shards (stream seq, last known state, interest);
//! - [`shard`]: one thread per core driving sockets with mio;
//! - [`node`]: starts and stops the shards.
//!
//! See `docs/architecture.md` for the path of one message.

pub mod admission;
pub mod auth;
pub mod cluster;
pub mod config;
pub mod config_errors;
pub mod dashboard;
pub mod demo;
pub mod dialect;
pub mod event;
pub mod hub;
pub mod json;
pub mod jwks;
pub mod limit;
pub mod metrics;
pub mod model;
pub mod node;
pub mod origin;
pub mod revocation;
pub mod route;
pub mod session;
pub mod sessions;
pub mod shard;
pub mod store;
pub mod tls;
pub mod wire;
