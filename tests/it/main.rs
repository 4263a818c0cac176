//! Integration tests: a real node on loopback, real WebSocket clients (tungstenite).
//! One file per behaviour; shared scaffolding in `support`.

mod support;

mod auth;
mod batch;
mod fanout;
mod http;
mod isolation;
mod lifecycle;
mod smoke;
mod snapshot;
mod subscribe;
