//! Integration tests: a real node on loopback, real WebSocket clients (tungstenite).
//! One file per behaviour; shared scaffolding in `support`.

mod raw;
mod resume;
mod support;

mod auth;
mod batch;
mod browser;
mod cluster;
mod compression;
mod config;
mod demo;
mod derived;
mod dialects;
mod echo;
mod fanout;
mod hostile;
mod http;
mod http_api;
mod io_driver;
mod isolation;
mod itrack;
mod itrack_auth;
mod jwks;
mod lifecycle;
mod limits;
mod matrix;
mod origin;
mod overload;
mod revocation;
mod security;
mod seeds;
mod slow_consumer;
mod smoke;
mod snapshot;
mod subscribe;
mod telematics;
mod tls;
mod tracking;
