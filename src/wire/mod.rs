//! Bytes on the wire: the HTTP upgrade and the WebSocket frame codec (RFC 6455).

pub mod frame;
pub mod handshake;
