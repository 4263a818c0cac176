//! Bytes on the wire: the HTTP upgrade and the WebSocket frame codec (RFC 6455).

pub mod deflate;
pub mod frame;
pub mod handshake;
