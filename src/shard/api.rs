//! The HTTP API on the broker's port (SPEC §4): `POST /v1/publish`, the polling
//! fallbacks `GET /v1/fleets/{id}/vehicles` and `GET /v1/fleets/{id}/events`, and the
//! iTrack session calls `user/auth` and `user/logout` (`crate::sessions`).
//!
//! A publish goes through the same session code as a WebSocket message (validation,
//! roles, tenant checks, errors) and the same `accept_publication` (dedup, per-vehicle
//! rate, encode once, fan-out).

use super::conn::{BodyFor, PendingBody};
use super::{Published, Shard, now};
use crate::auth::{Credential, Principal};
use crate::dialect::native;
use crate::event::Event;
use crate::hub::TenantHub;
use crate::json;
use crate::metrics::Limit;
use crate::model::{Channel, Role};
use crate::session::{Action, AdmitAll, Ctx, Now, Selection, Session};
use crate::sessions::{CallParams, UserApiError, UserCall};
use crate::wire::handshake::{Endpoint, Request, Scope};
use simd_json::prelude::*;
use std::ops::Range;
use std::sync::Arc;

/// One message of a publish request.
struct Outcome {
    id: Option<Vec<u8>>,
    result: Result<(Channel, Published), Vec<u8>>,
}

/// A publish request whose event-channel messages the cluster's streams are storing
/// (cluster mode): answered when the last outcome is in.
pub(super) struct PendingPublish {
    slot: usize,
    generation: u32,
    outcomes: Vec<Outcome>,
    waiting: usize,
}

impl PendingPublish {
    /// (index, ticket) of each message still waiting.
    pub(super) fn tickets(&self) -> Vec<(usize, u64)> {
        self.outcomes
            .iter()
            .enumerate()
            .filter_map(|(i, o)| match &o.result {
                Ok((_, Published::Pending { ticket })) => Some((i, *ticket)),
                _ => None,
            })
            .collect()
    }

    pub(super) fn channel_at(&self, index: usize) -> Channel {
        match &self.outcomes[index].result {
            Ok((c, _)) => *c,
            Err(_) => Channel::System,
        }
    }

    /// Records the outcome of message `index`; true when none is waiting any more.
    pub(super) fn complete(&mut self, index: usize, outcome: Published) -> bool {
        if let Ok((_, p)) = &mut self.outcomes[index].result
            && matches!(p, Published::Pending { .. })
        {
            *p = outcome;
            self.waiting -= 1;
        }
        self.waiting == 0
    }
}

impl Shard {
    pub(super) fn api_request(
        &mut self,
        slot: usize,
        head: usize,
        req: &Request,
        endpoint: &Endpoint,
    ) {
        let now = now();
        let principal = match req.bearer().map(|b| {
            self.shared
                .auth
                .authenticate(Credential::Bearer(b), now.unix_secs())
        }) {
            None => {
                return self.http_error(
                    slot,
                    401,
                    "Authorization: Bearer <api key or token> required",
                );
            }
            Some(Err(e)) => return self.http_error(slot, 401, &e.to_string()),
            Some(Ok(p)) => p,
        };
        match endpoint {
            Endpoint::Publish => self.api_publish(slot, head, req, principal, now),
            Endpoint::FleetVehicles(fleet) | Endpoint::FleetEvents(fleet) => {
                if *principal.tenant != **fleet {
                    return self.http_error(slot, 403, "credential does not belong to this fleet");
                }
                if principal.role == Role::Device {
                    return self.http_error(slot, 403, "devices may not read fleet data");
                }
                if !self.shared.admission.http_read(&principal, now.mono) {
                    self.stats().breach(Limit::RequestRate);
                    let msg = format!(
                        "over {} polling requests per second for this user",
                        self.shared.config.limits.requests_per_second
                    );
                    return self.http_error(slot, 429, &msg);
                }
                let max = self.shared.config.limits.max_tenants;
                let Some(hub) = self.shared.hubs.try_tenant(fleet, max) else {
                    return self.http_error(slot, 503, Limit::Tenants.message());
                };
                if matches!(endpoint, Endpoint::FleetVehicles(_)) {
                    self.api_vehicles(slot, &hub)
                } else {
                    self.api_events(slot, &hub, req, now)
                }
            }
            _ => self.http_error(slot, 404, "not found"),
        }
    }

    fn api_vehicles(&mut self, slot: usize, hub: &TenantHub) {
        let all = Selection {
            all: true,
            ..Default::default()
        };
        let events = self.store().snapshot(hub, Channel::VehicleLocations, &all);
        let mut body = Vec::with_capacity(64 + events.len() * 256);
        body.extend_from_slice(b"{\"fleet_id\":");
        json::write_str(&mut body, &hub.id);
        body.extend_from_slice(b",\"count\":");
        json::write_u64(&mut body, events.len() as u64);
        body.extend_from_slice(b",\"vehicles\":");
        write_events(&mut body, &events);
        body.push(b'}');
        self.http_reply(slot, 200, "application/json", &body);
    }

    fn api_events(&mut self, slot: usize, hub: &TenantHub, req: &Request, now: Now) {
        let channel = match req.query_param("channel").map(|c| (c, Channel::parse(c))) {
            Some((_, Some(c))) if c.is_event() => c,
            Some((name, _)) => {
                let msg = format!(
                    "{name:?} keeps no history (trip_events, alerts, maintenance_alerts do)"
                );
                return self.http_error(slot, 400, &msg);
            }
            None => return self.http_error(slot, 400, "channel query parameter required"),
        };
        let num = |k| req.query_param(k).map(|v| v.parse::<u64>());
        let (since, epoch) = match (num("since"), num("epoch")) {
            (Some(Err(_)), _) | (_, Some(Err(_))) => {
                return self.http_error(slot, 400, "since and epoch must be integers");
            }
            (s, e) => (s.map(Result::unwrap).unwrap_or(0), e.map(Result::unwrap)),
        };
        let crate::store::HistoryPage {
            epoch: our_epoch,
            seq,
            recovered,
            events,
        } = self.store().history(hub, channel, since, epoch, now);
        let mut body = Vec::with_capacity(128 + events.len() * 256);
        body.extend_from_slice(b"{\"fleet_id\":");
        json::write_str(&mut body, &hub.id);
        body.extend_from_slice(b",\"channel\":");
        json::write_str(&mut body, channel.name());
        body.extend_from_slice(b",\"epoch\":");
        json::write_u64(&mut body, our_epoch);
        body.extend_from_slice(b",\"seq\":");
        json::write_u64(&mut body, seq);
        body.extend_from_slice(if recovered {
            b",\"recovered\":true"
        } else {
            b",\"recovered\":false"
        });
        body.extend_from_slice(b",\"events\":");
        write_events(&mut body, &events);
        body.push(b'}');
        self.http_reply(slot, 200, "application/json", &body);
    }

    fn api_publish(
        &mut self,
        slot: usize,
        head: usize,
        req: &Request,
        principal: Arc<Principal>,
        now: Now,
    ) {
        let limits = &self.shared.config.limits;
        if !matches!(principal.role, Role::Service | Role::Device) {
            return self.http_error(slot, 403, "only service and device credentials may publish");
        }
        if req.chunked {
            return self.http_error(slot, 411, "send a Content-Length body, not chunked");
        }
        let Some(len) = req.content_length else {
            return self.http_error(slot, 411, "Content-Length required");
        };
        if len > limits.max_http_body_bytes {
            return self.http_error(
                slot,
                413,
                &format!("body over {} bytes", limits.max_http_body_bytes),
            );
        }
        if self.conns[slot].rbuf.len() < head + len {
            // The rest of the body is still on its way: keep what was decided (the head
            // is not parsed, nor the credential verified, again on every read).
            self.conns[slot].http_mut().body = Some(PendingBody {
                head,
                len,
                then: BodyFor::Publish(principal),
            });
            return;
        }
        self.api_publish_body(slot, head, len, principal, now);
    }

    /// Continues a request whose body arrives in pieces: runs once the body is complete.
    pub(super) fn api_body_bytes(&mut self, slot: usize) {
        let conn = &mut self.conns[slot];
        let Some(p) = conn.http.as_ref().and_then(|h| h.body.as_ref()) else {
            return;
        };
        if conn.rbuf.len() < p.head + p.len {
            return;
        }
        let p = conn
            .http
            .as_mut()
            .and_then(|h| h.body.take())
            .expect("checked");
        match p.then {
            BodyFor::Publish(principal) => {
                self.api_publish_body(slot, p.head, p.len, principal, now())
            }
            BodyFor::User(call, query) => {
                let body = self.conns[slot].rbuf[p.head..p.head + p.len].to_vec();
                self.user_call(slot, call, &query, &body)
            }
        }
    }

    /// `user/auth` and `user/logout` (GET, or POST with a JSON or form body): answered
    /// in Navixy's shape, `{"success":true,...}` or `{"success":false,"status":{code,
    /// description}}`, never with the broker's own error body.
    pub(super) fn user_request(&mut self, slot: usize, head: usize, req: &Request, call: UserCall) {
        let max = self.shared.config.limits.max_http_body_bytes;
        let len = req.content_length.unwrap_or(0);
        if req.chunked {
            return self.user_error(slot, &UserApiError::Chunked);
        }
        if len > max {
            return self.user_error(slot, &UserApiError::TooLarge(max));
        }
        if self.conns[slot].rbuf.len() < head + len {
            self.conns[slot].http_mut().body = Some(PendingBody {
                head,
                len,
                then: BodyFor::User(call, req.query.clone()),
            });
            return;
        }
        let body = self.conns[slot].rbuf[head..head + len].to_vec();
        self.user_call(slot, call, &req.query, &body);
    }

    fn user_call(&mut self, slot: usize, call: UserCall, query: &[(String, String)], body: &[u8]) {
        let params = match CallParams::new(query, body) {
            Ok(p) => p,
            Err(e) => return self.user_error(slot, &e),
        };
        let now = now();
        let unix_ms = now.unix_ms.max(0) as u64;
        let answer = match call {
            UserCall::Auth => self.user_login(slot, &params, now),
            UserCall::Logout => params.required("hash").and_then(|hash| {
                if self.shared.auth.logout(hash, unix_ms) {
                    Ok(crate::sessions::success_body(None))
                } else {
                    Err(UserApiError::SessionEnded)
                }
            }),
        };
        match answer {
            Ok(body) => self.http_reply(slot, 200, "application/json", &body),
            Err(e) => self.user_error(slot, &e),
        }
    }

    /// Rate limits first (a limited login is refused without looking at the password),
    /// then one argon2 verification on this thread (docs/operations.md: its cost).
    fn user_login(
        &mut self,
        slot: usize,
        params: &CallParams<'_>,
        now: Now,
    ) -> Result<Vec<u8>, UserApiError> {
        let login = params.required("login")?;
        let password = params.required("password")?;
        let ip = self.conns[slot].peer.ip();
        let admission = &self.shared.admission;
        if let Err((limit, wait)) = admission.check_login(login, ip, now.mono) {
            self.stats().breach(limit);
            return Err(UserApiError::TooManyFailures {
                per_address: limit == Limit::LoginRatePerIp,
                retry_after_secs: wait.as_millis().div_ceil(1000) as u64,
            });
        }
        let unix_ms = now.unix_ms.max(0) as u64;
        match self.shared.auth.login(login, password, unix_ms) {
            Ok(hash) => Ok(crate::sessions::success_body(Some(&hash))),
            Err(_) => {
                // The verification took a while: the failure is counted at its end.
                admission.login_failed(login, ip, std::time::Instant::now());
                Err(UserApiError::WrongLogin)
            }
        }
    }

    fn user_error(&mut self, slot: usize, e: &UserApiError) {
        let status = e.code().1;
        // A login over its failure limit knows when an attempt may succeed again.
        let retry = match e {
            UserApiError::TooManyFailures {
                retry_after_secs, ..
            } => *retry_after_secs,
            _ => 1,
        };
        let response =
            crate::wire::handshake::response_retry(status, "application/json", &e.body(), retry);
        self.http_send(slot, status, response);
    }

    fn api_publish_body(
        &mut self,
        slot: usize,
        head: usize,
        len: usize,
        principal: Arc<Principal>,
        now: Now,
    ) {
        let limits = &self.shared.config.limits;
        let body = self.conns[slot].rbuf[head..head + len].to_vec();
        let Some(items) = split_messages(&body) else {
            return self.http_error(
                slot,
                400,
                "body must be a JSON message, {\"messages\": [...]}, or NDJSON",
            );
        };
        if items.len() > limits.max_batch {
            self.stats().breach(Limit::BatchSize);
            let msg = format!("at most {} messages per request", limits.max_batch);
            return self.http_error(slot, 400, &msg);
        }
        let bucket = self
            .shared
            .admission
            .user_publish_bucket(&principal, now.mono);
        let max = limits.max_tenants;
        let Some(hub) = self.shared.hubs.try_tenant(&principal.tenant, max) else {
            return self.http_error(slot, 503, Limit::Tenants.message());
        };
        let mut session = Session::new(
            "http".into(),
            Scope::None,
            Some(principal),
            now.mono,
            limits,
        );
        session.set_publish_bucket(Some(bucket));
        while session.poll_action().is_some() {}
        let max_message = limits.max_message_bytes;
        let mut outcomes = Vec::with_capacity(items.len());
        for item in items {
            let raw = &body[item];
            if raw.len() > max_message {
                // The same size limit as a WebSocket message (closed there with 1009).
                self.stats().breach(Limit::MessageSize);
                let mut err = Vec::with_capacity(64);
                err.extend_from_slice(b"{\"code\":413,\"message\":");
                json::write_str(&mut err, &format!("message over {max_message} bytes"));
                err.push(b'}');
                outcomes.push(Outcome {
                    id: valid_id_of(raw),
                    result: Err(err),
                });
                continue;
            }
            outcomes.push(self.api_publish_one(&mut session, &hub, raw, now));
        }
        let waiting = outcomes
            .iter()
            .filter(|o| matches!(o.result, Ok((_, Published::Pending { .. }))))
            .count();
        let pending = PendingPublish {
            slot,
            generation: self.conns[slot].generation,
            outcomes,
            waiting,
        };
        if waiting > 0 {
            return self.await_request(pending);
        }
        self.finish_publish_request(pending);
    }

    /// Answers a publish request with every message's outcome.
    pub(super) fn finish_publish_request(&mut self, req: PendingPublish) {
        let PendingPublish {
            slot,
            generation,
            outcomes,
            ..
        } = req;
        if self
            .conns
            .get(slot)
            .is_none_or(|c| c.generation != generation)
        {
            return;
        }
        let mut out = Vec::with_capacity(64 + outcomes.len() * 96);
        out.extend_from_slice(b"{\"results\":[");
        for (i, o) in outcomes.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            write_outcome(&mut out, i, o);
        }
        out.extend_from_slice(b"]}");
        self.http_reply(slot, 202, "application/json", &out);
    }

    fn api_publish_one(
        &mut self,
        session: &mut Session,
        hub: &TenantHub,
        raw: &[u8],
        now: Now,
    ) -> Outcome {
        let shared = self.shared.clone();
        let mut ctx = Ctx {
            limits: &shared.config.limits,
            auth: &shared.auth,
            parser: &mut self.parser,
            admission: &AdmitAll,
        };
        session.handle_item(now, raw, &mut ctx);
        let mut outcome = Outcome {
            id: valid_id_of(raw),
            result: Err(Vec::new()),
        };
        while let Some(action) = session.poll_action() {
            match action {
                Action::Publish(p) => {
                    outcome.id = p.id.clone();
                    let channel = p.channel;
                    outcome.result = Ok((channel, self.accept_publication(hub, p, now)));
                }
                Action::Reply(crate::session::Reply::Error { error, .. }) => {
                    // An error reply: keep its payload (code, message, field).
                    let mut p = Vec::new();
                    native::write_error_payload(&mut p, &error);
                    outcome.result = Err(p);
                }
                Action::Breach(limit) => self.stats().breach(limit),
                _ => {}
            }
        }
        if matches!(&outcome.result, Err(e) if e.is_empty()) {
            outcome.result = Err(br#"{"code":400,"message":"not a publish"}"#.to_vec());
        }
        outcome
    }
}

/// The message's `id`, if it is one JSON string or number (never raw bytes of a
/// message that did not parse: they would make the response invalid JSON).
fn valid_id_of(raw: &[u8]) -> Option<Vec<u8>> {
    json::member(raw, "id")
        .filter(|id| json::valid_id(id))
        .map(<[u8]>::to_vec)
}

/// A JSON array of the events' texts (snapshot replies, polling endpoints).
pub(super) fn write_events(out: &mut Vec<u8>, events: &[Arc<Event>]) {
    out.push(b'[');
    for (i, ev) in events.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(ev.json());
    }
    out.push(b']');
}

fn write_outcome(out: &mut Vec<u8>, index: usize, o: &Outcome) {
    out.extend_from_slice(b"{\"index\":");
    json::write_u64(out, index as u64);
    out.extend_from_slice(b",\"id\":");
    out.extend_from_slice(o.id.as_deref().unwrap_or(b"null"));
    match &o.result {
        Ok((channel, published)) => {
            let status: &[u8] = match published {
                Published::Accepted { .. } => b"accepted",
                Published::Duplicate => b"duplicate",
                Published::Refused(_) | Published::Pending { .. } => b"rejected",
            };
            out.extend_from_slice(b",\"status\":\"");
            out.extend_from_slice(status);
            out.extend_from_slice(b"\",\"channel\":");
            json::write_str(out, channel.name());
            match published {
                Published::Accepted { seq } => {
                    out.extend_from_slice(b",\"seq\":");
                    json::write_u64(out, *seq);
                }
                Published::Refused(e) => {
                    out.extend_from_slice(b",\"error\":{\"code\":");
                    json::write_u64(out, e.code as u64);
                    out.extend_from_slice(b",\"message\":");
                    json::write_str(out, &e.message);
                    out.push(b'}');
                }
                Published::Duplicate | Published::Pending { .. } => {}
            }
        }
        Err(error) => {
            out.extend_from_slice(b",\"status\":\"rejected\",\"error\":");
            out.extend_from_slice(error);
        }
    }
    out.push(b'}');
}

/// The messages of a publish body: one JSON object, `{"messages": [...]}`, or NDJSON
/// (one object per line). `None` when the body is none of these.
fn split_messages(body: &[u8]) -> Option<Vec<Range<usize>>> {
    let mut copy = body.to_vec();
    if let Ok(v) = simd_json::to_borrowed_value(&mut copy) {
        if !v.is_object() {
            return None;
        }
        if v.get("messages").is_some_and(|m| m.is_array()) && v.get("type").is_none() {
            let (start, end) = {
                let r = json::object_members(body)?
                    .into_iter()
                    .find(|m| json::key_is(&body[m.key.clone()], "messages"))?
                    .value;
                (r.start, r.end)
            };
            let items = json::array_elements(&body[start..end])?;
            return Some(
                items
                    .into_iter()
                    .map(|r| r.start + start..r.end + start)
                    .collect(),
            );
        }
        let start = body
            .iter()
            .position(|b| !b.is_ascii_whitespace())
            .unwrap_or(0);
        let end = body.len()
            - body
                .iter()
                .rev()
                .position(|b| !b.is_ascii_whitespace())
                .unwrap_or(0);
        #[allow(clippy::single_range_in_vec_init)] // a list of one message, not a range of items
        return Some(vec![start..end]);
    }
    let mut items = Vec::new();
    let mut start = 0;
    for (i, &b) in body
        .iter()
        .enumerate()
        .chain(std::iter::once((body.len(), &b'\n')))
    {
        if b == b'\n' {
            let line = &body[start..i];
            if line.iter().any(|c| !c.is_ascii_whitespace()) {
                items.push(start..i);
            }
            start = i + 1;
        }
    }
    (!items.is_empty()).then_some(items)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_single_wrapped_and_ndjson_bodies() {
        let one = br#" {"type":"ping"} "#;
        assert_eq!(split_messages(one).unwrap().len(), 1);
        let wrapped = br#"{"messages":[{"type":"a"},{"type":"b"}]}"#;
        let r = split_messages(wrapped).unwrap();
        assert_eq!(&wrapped[r[1].clone()], br#"{"type":"b"}"#);
        let nd = b"{\"type\":\"a\"}\n\n{\"type\":\"b\"}\n";
        assert_eq!(split_messages(nd).unwrap().len(), 2);
        assert!(split_messages(b"[1,2]").is_none());
        assert!(split_messages(b"   ").is_none());
    }
}
