//! The iTrack dialect (being written).

use super::native::{Command, Parser, ProtoError};
use super::{Codec, DialectId, ITRACK};
use crate::event::Event;
use crate::session::Reply;
use std::ops::Range;

pub struct Itrack;

impl Codec for Itrack {
    fn id(&self) -> DialectId {
        ITRACK
    }

    fn name(&self) -> &'static str {
        "itrack"
    }

    fn decode(
        &self,
        _parser: &mut Parser,
        _raw: &[u8],
        _acting_as: Option<&str>,
    ) -> (Option<Range<usize>>, Result<Command, ProtoError>) {
        (None, Err(ProtoError::new(501, "not yet")))
    }

    fn encode_reply(&self, _reply: &Reply, _ts: &str) -> Option<Vec<u8>> {
        None
    }

    fn encode_event(&self, _ev: &Event) -> Option<Vec<u8>> {
        None
    }

    fn encode_projected(&self, _ev: &Event, _view: &super::view::View) -> Option<Vec<u8>> {
        None
    }

    fn dev_hint(&self, host: &str, _key: &str, _fleet: &str) -> String {
        format!("ws://{host}/event/subscription")
    }
}
