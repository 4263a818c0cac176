//! Wire dialects: codecs between client frames and the broker's commands and events.
//! The native (Bookovia-style) dialect is the reference; the compatibility dialects of
//! SPEC §6 will sit beside it.

pub mod native;
