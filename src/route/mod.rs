//! Routing: which connections of a shard an event goes to.

pub mod bitset;
pub mod index;
