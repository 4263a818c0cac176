//! A connection's outbound queue: shared event frames and owned replies, flushed with
//! vectored writes. Empty outboxes hold no heap memory.
//!
//! Past the soft bound, a state-channel event replaces the pending (unwritten) value of the
//! same entity instead of queueing behind it (conflation); event channels always queue.

use crate::dialect::{self, DialectId};
use crate::event::Event;
use crate::model::Channel;
use std::collections::{HashMap, VecDeque};
use std::io::{self, IoSlice, Write};
use std::sync::Arc;

#[derive(Debug)]
enum Chunk {
    /// An event frame shared with every other subscriber of the connection's dialect
    /// (its frame in that dialect exists: checked when queued).
    Shared(Arc<Event>),
    /// A frame shared with some other subscribers (a projection for a `metrics` filter).
    Frame(Arc<[u8]>),
    /// A frame for this connection only (replies, control frames).
    Owned(Box<[u8]>),
}

impl Chunk {
    fn bytes(&self, d: DialectId, deflate: Option<u32>) -> &[u8] {
        match self {
            Chunk::Shared(e) => e.wire_frame(d, deflate).unwrap_or_default(),
            Chunk::Frame(f) => f,
            Chunk::Owned(b) => b,
        }
    }
}

/// Frames written per `writev` call.
const MAX_IOVECS: usize = 256;

/// Per state channel: entity -> id of the chunk holding its pending value.
type PendingState = [HashMap<Box<str>, u64>; Channel::COUNT];

#[derive(Debug, Default)]
pub struct Outbox {
    chunks: VecDeque<Chunk>,
    /// Bytes of the front chunk already written.
    written: usize,
    /// Bytes queued and not yet written.
    bytes: usize,
    /// Id of `chunks[0]`; chunk ids increase by one per push.
    front_id: u64,
    /// Past the soft bound: per state channel, the chunk id of each entity's pending value.
    pending: Option<Box<PendingState>>,
    /// The last write found the socket full (until a later write makes progress).
    blocked: bool,
    /// The connection's dialect: which frame of a shared event is written.
    dialect: DialectId,
    /// permessage-deflate was negotiated: events of at least this many bytes are written
    /// compressed (`Event::wire_frame`), stored plus one; 0 (the default): not
    /// negotiated. A plain `u32` fits beside the dialect byte, where an `Option` would
    /// grow every outbox.
    deflate_min: u32,
}

impl Default for DialectId {
    fn default() -> Self {
        dialect::NATIVE
    }
}

impl Outbox {
    pub fn set_dialect(&mut self, d: DialectId) {
        self.dialect = d;
    }

    pub fn dialect(&self) -> DialectId {
        self.dialect
    }

    /// The connection negotiated permessage-deflate: events of at least `min` bytes are
    /// written compressed.
    pub fn set_deflate(&mut self, min: Option<u32>) {
        self.deflate_min = min.map_or(0, |m| m.saturating_add(1));
    }

    /// `Event::wire_frame`'s `deflate_min`.
    fn deflate(&self) -> Option<u32> {
        self.deflate_min.checked_sub(1)
    }

    /// Queues an event, conflating state channels when more than `soft` bytes are queued.
    /// Returns true if the event replaced a pending value instead of being queued.
    pub fn push_event(&mut self, ev: Arc<Event>, soft: usize) -> bool {
        let key = ev
            .keys
            .state_key(ev.channel)
            .filter(|_| ev.channel.is_state());
        let Some(key) = key else {
            self.push_shared(ev);
            return false;
        };
        let next_id = self.front_id + self.chunks.len() as u64;
        if self.bytes <= soft {
            // Under the bound again: queued behind the entity's pending value. If that
            // value is tracked, track this one instead, or a later value past the bound
            // would replace the older chunk, and this one would follow it (newer, then
            // older).
            if let Some(id) = self
                .pending
                .as_mut()
                .and_then(|p| p[ev.channel.index()].get_mut(key))
            {
                *id = next_id;
            }
            self.push_shared(ev);
            return false;
        }
        let front_id = self.front_id;
        let partially_written = self.written > 0;
        let (d, z) = (self.dialect, self.deflate());
        let pending = self.pending.get_or_insert_with(Default::default);
        let map = &mut pending[ev.channel.index()];
        if let Some(&id) = map.get(key)
            && id >= front_id
            && !(id == front_id && partially_written)
            && let Some(Chunk::Shared(old)) = self.chunks.get_mut((id - front_id) as usize)
            && old.channel == ev.channel
            && old.keys.state_key(old.channel) == Some(key)
        {
            self.bytes = self.bytes - old.wire_frame(d, z).map_or(0, <[u8]>::len)
                + ev.wire_frame(d, z).map_or(0, <[u8]>::len);
            *old = ev;
            return true;
        }
        map.insert(key.into(), next_id);
        self.push_shared(ev);
        false
    }

    /// Queues a shared event; nothing if the connection's dialect has no frame for it.
    pub fn push_shared(&mut self, ev: Arc<Event>) {
        let Some(len) = ev.wire_frame(self.dialect, self.deflate()).map(<[u8]>::len) else {
            return;
        };
        self.bytes += len;
        self.chunks.push_back(Chunk::Shared(ev));
    }

    /// Queues a frame shared with other connections (a projection).
    pub fn push_frame(&mut self, frame: Arc<[u8]>) {
        self.bytes += frame.len();
        self.chunks.push_back(Chunk::Frame(frame));
    }

    pub fn push_owned(&mut self, frame: Vec<u8>) {
        self.bytes += frame.len();
        self.chunks
            .push_back(Chunk::Owned(frame.into_boxed_slice()));
    }

    pub fn is_empty(&self) -> bool {
        self.chunks.is_empty()
    }

    /// Frames queued.
    pub fn len(&self) -> usize {
        self.chunks.len()
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Whether the last flush stopped on a full socket, with no writable event since and
    /// no write that made progress.
    pub fn is_blocked(&self) -> bool {
        self.blocked
    }

    /// The socket was found full by a writer in front of it (TLS records).
    pub fn set_blocked(&mut self) {
        self.blocked = true;
    }

    /// The socket reported writable again.
    pub fn set_writable(&mut self) {
        self.blocked = false;
    }

    /// Discards every queued frame, except the unwritten rest of a frame partly written
    /// already: cutting it would corrupt the stream (a close frame queued next would be
    /// read as its payload). Returns the frames discarded.
    pub fn clear(&mut self) -> usize {
        let partial = (self.written > 0)
            .then(|| self.chunks.pop_front())
            .flatten();
        let discarded = self.chunks.len();
        let written = self.written;
        let (dialect, deflate_min) = (self.dialect, self.deflate_min);
        *self = Outbox::default();
        self.dialect = dialect;
        self.deflate_min = deflate_min;
        let deflate = self.deflate();
        if let Some(front) = partial {
            self.bytes = front.bytes(dialect, deflate).len() - written;
            self.written = written;
            self.chunks.push_back(front);
        }
        discarded
    }

    /// Writes as much as the socket takes, calling `on_written` for each shared event
    /// written completely. Returns Ok(true) when everything was written.
    pub fn flush(
        &mut self,
        w: &mut impl Write,
        mut on_written: impl FnMut(&Event),
    ) -> io::Result<bool> {
        while !self.chunks.is_empty() {
            // Most flushes carry one or a few frames: a plain write, or a small vector
            // (filling all MAX_IOVECS slices each time costs more than the frames).
            let result = match self.chunks.len() {
                1 => w.write(&self.chunks[0].bytes(self.dialect, self.deflate())[self.written..]),
                2..=16 => self.write_vectored::<16>(w),
                _ => self.write_vectored::<MAX_IOVECS>(w),
            };
            let written = match result {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(k) => k,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.blocked = true;
                    return Ok(false);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            self.blocked = false;
            self.consume(written, &mut on_written);
        }
        if self.chunks.capacity() > 16 {
            self.chunks = VecDeque::new();
        }
        self.pending = None;
        Ok(true)
    }

    /// The io_uring driver's write: appends up to `max` slices of the queued frames (the
    /// front one from its unwritten rest) to `out` and returns their total length. The
    /// slices point into this outbox's frames: the caller must not change the outbox until
    /// the send that uses them has completed (`sent`).
    pub fn iovecs(&self, out: &mut Vec<libc::iovec>, max: usize) -> usize {
        let mut total = 0;
        for (i, c) in self.chunks.iter().take(max).enumerate() {
            let b = c.bytes(self.dialect, self.deflate());
            let b = if i == 0 { &b[self.written..] } else { b };
            out.push(libc::iovec {
                iov_base: b.as_ptr() as *mut libc::c_void,
                iov_len: b.len(),
            });
            total += b.len();
        }
        total
    }

    /// The io_uring driver's send of `n` bytes (from `iovecs`) completed: as `flush` after
    /// a write of `n`. Returns true when everything queued is written.
    pub fn sent(&mut self, n: usize, mut on_written: impl FnMut(&Event)) -> bool {
        if n > 0 {
            self.blocked = false;
            self.consume(n, &mut on_written);
        }
        if !self.chunks.is_empty() {
            return false;
        }
        if self.chunks.capacity() > 16 {
            self.chunks = VecDeque::new();
        }
        self.pending = None;
        true
    }

    /// Writes up to `N` queued frames in one call.
    fn write_vectored<const N: usize>(&self, w: &mut impl Write) -> io::Result<usize> {
        let mut slices: [IoSlice<'_>; N] = [IoSlice::new(&[]); N];
        let mut n = 0;
        for (i, c) in self.chunks.iter().take(N).enumerate() {
            let b = c.bytes(self.dialect, self.deflate());
            slices[n] = IoSlice::new(if i == 0 { &b[self.written..] } else { b });
            n += 1;
        }
        w.write_vectored(&slices[..n])
    }

    fn consume(&mut self, mut n: usize, on_written: &mut impl FnMut(&Event)) {
        self.bytes -= n;
        while n > 0 {
            let front = self
                .chunks
                .front()
                .expect("wrote more than queued")
                .bytes(self.dialect, self.deflate())
                .len();
            let left = front - self.written;
            if n >= left {
                n -= left;
                self.written = 0;
                self.front_id += 1;
                if let Some(Chunk::Shared(ev)) = self.chunks.pop_front() {
                    on_written(&ev);
                }
            } else {
                self.written += n;
                n = 0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer that takes at most `cap` bytes per call, then blocks.
    struct Trickle {
        out: Vec<u8>,
        cap: usize,
        calls: usize,
    }

    impl Write for Trickle {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.write_vectored(&[IoSlice::new(b)])
        }
        fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
            self.calls += 1;
            if self.calls.is_multiple_of(2) {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let mut left = self.cap;
            let mut n = 0;
            for b in bufs {
                let k = b.len().min(left);
                self.out.extend_from_slice(&b[..k]);
                left -= k;
                n += k;
            }
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn partial_writes_keep_order_and_count() {
        let mut o = Outbox::default();
        let mut expect = Vec::new();
        for i in 0..100u8 {
            let f = vec![i; (i as usize % 7) + 1];
            expect.extend_from_slice(&f);
            o.push_owned(f);
        }
        assert_eq!(o.bytes(), expect.len());
        let mut w = Trickle {
            out: Vec::new(),
            cap: 5,
            calls: 0,
        };
        let mut rounds = 0;
        while !o.flush(&mut w, |_| {}).unwrap() {
            rounds += 1;
            assert!(rounds < 10_000);
        }
        assert_eq!(w.out, expect);
        assert_eq!(o.bytes(), 0);
        assert!(o.is_empty());
    }

    #[test]
    fn clear_keeps_the_rest_of_a_partly_written_frame() {
        let mut o = Outbox::default();
        for i in 0..4u8 {
            o.push_owned(vec![i; 10]);
        }
        let mut w = Trickle {
            out: Vec::new(),
            cap: 14,
            calls: 0,
        };
        assert!(!o.flush(&mut w, |_| {}).unwrap());
        assert_eq!(o.clear(), 2);
        o.push_owned(vec![9; 3]);
        while !o.flush(&mut w, |_| {}).unwrap() {}
        let mut want = vec![0; 10];
        want.extend_from_slice(&[1; 10]);
        want.extend_from_slice(&[9; 3]);
        assert_eq!(w.out, want);
        assert_eq!(o.bytes(), 0);
        // Nothing partly written: everything goes.
        o.push_owned(vec![1; 5]);
        assert_eq!(o.clear(), 1);
        assert!(o.is_empty() && o.bytes() == 0);
    }

    fn state_event(vehicle: &str, seq: u64, channel: Channel) -> Arc<Event> {
        let payload = format!("{{\"n\":{seq}}}");
        crate::event::test_event(
            channel,
            Some(vehicle),
            seq,
            payload.as_bytes(),
            std::time::Instant::now(),
        )
    }

    #[test]
    fn conflates_state_past_the_soft_bound_and_never_events() {
        let mut o = Outbox::default();
        let soft = 10;
        assert!(!o.push_event(state_event("v1", 1, Channel::VehicleLocations), soft));
        // Over the soft bound now: v1 is conflated, v2 queued, alerts always queued.
        assert!(!o.push_event(state_event("v1", 2, Channel::VehicleLocations), soft));
        assert!(o.push_event(state_event("v1", 3, Channel::VehicleLocations), soft));
        assert!(!o.push_event(state_event("v2", 4, Channel::VehicleLocations), soft));
        assert!(!o.push_event(state_event("v1", 5, Channel::Alerts), soft));
        assert!(!o.push_event(state_event("v1", 6, Channel::Alerts), soft));
        assert!(o.push_event(state_event("v2", 7, Channel::VehicleLocations), soft));
        let mut seqs = Vec::new();
        let mut sink = Vec::new();
        assert!(o.flush(&mut sink, |e| seqs.push(e.seq)).unwrap());
        assert_eq!(seqs, vec![1, 3, 7, 5, 6]);
        let (loc, alert) = (Channel::VehicleLocations, Channel::Alerts);
        let total: usize = [(1, loc), (3, loc), (7, loc), (5, alert), (6, alert)]
            .into_iter()
            .map(|(seq, c)| state_event("v", seq, c).frame.len())
            .sum();
        assert_eq!(sink.len(), total);
    }

    #[test]
    fn a_value_queued_under_the_bound_is_not_overtaken_by_an_older_one() {
        // Past the bound v1=1 is tracked; the socket takes some bytes, v1=2 queues under
        // the bound; past it again v1=3 must replace 2, not 1 (CI once saw 599 then 547).
        let mut o = Outbox::default();
        let loc = Channel::VehicleLocations;
        let frame = state_event("v1", 1, loc).frame.len();
        o.push_owned(vec![0; 2 * frame]);
        let soft = frame;
        assert!(!o.push_event(state_event("v1", 1, loc), soft));
        let mut w = Trickle {
            out: Vec::new(),
            cap: 2 * frame,
            calls: 0,
        };
        assert!(!o.flush(&mut w, |_| {}).unwrap());
        assert!(o.bytes() <= soft);
        assert!(!o.push_event(state_event("v1", 2, loc), soft));
        assert!(o.push_event(state_event("v1", 3, loc), soft));
        let mut seqs = Vec::new();
        while !o.flush(&mut w, |e| seqs.push(e.seq)).unwrap() {}
        assert_eq!(seqs, [1, 3]);
    }

    proptest::proptest! {
        /// Any interleaving of state values, events and partial writes: per entity the
        /// values written only go forward and end with the newest; events all arrive, in
        /// order; the bytes written are the frames counted.
        #[test]
        fn conflation_never_reorders_and_keeps_the_newest(
            ops in proptest::collection::vec((0u8..6, 1usize..400), 1..300),
            soft in 0usize..600,
        ) {
            let mut o = Outbox::default();
            let mut w = Trickle { out: Vec::new(), cap: 0, calls: 0 };
            let mut n = 0u64;
            let mut newest = [0u64; 3];
            let mut alerts = Vec::new();
            let mut written: Vec<(Channel, String, u64)> = Vec::new();
            let mut record = |e: &Event| {
                let v = e.keys.vehicle.as_deref().unwrap_or("").to_string();
                written.push((e.channel, v, e.seq));
            };
            for (op, cap) in ops {
                n += 1;
                match op {
                    0..=2 => {
                        let v = format!("v{op}");
                        o.push_event(state_event(&v, n, Channel::VehicleLocations), soft);
                        newest[op as usize] = n;
                    }
                    3 => {
                        o.push_event(state_event("v0", n, Channel::Alerts), soft);
                        alerts.push(n);
                    }
                    _ => {
                        w.cap = cap;
                        w.calls = 0;
                        let _ = o.flush(&mut w, &mut record).unwrap();
                    }
                }
            }
            w.cap = usize::MAX;
            loop {
                w.calls = 0;
                if o.flush(&mut w, &mut record).unwrap() {
                    break;
                }
            }
            let mut last = [0u64; 3];
            let mut got_alerts = Vec::new();
            for (c, v, seq) in &written {
                if *c == Channel::Alerts {
                    got_alerts.push(*seq);
                    continue;
                }
                let i: usize = v[1..].parse().unwrap();
                proptest::prop_assert!(*seq > last[i], "{v}: {seq} after {}", last[i]);
                last[i] = *seq;
            }
            proptest::prop_assert_eq!(last, newest);
            proptest::prop_assert_eq!(got_alerts, alerts);
            proptest::prop_assert_eq!(o.bytes(), 0);
        }
    }
}

#[cfg(test)]
mod deflate_tests {
    use super::*;
    use crate::event::test_event;
    use crate::model::Channel;
    use std::time::Instant;

    /// A writer that takes everything.
    struct Sink(Vec<u8>);
    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn deflate_outbox_writes_the_shared_compressed_frame_only_when_negotiated() {
        let payload =
            br#"{"vehicle_id":"v1","note":"again and again and again and again and again"}"#;
        let ev = test_event(
            Channel::VehicleLocations,
            Some("v1"),
            1,
            payload,
            Instant::now(),
        );
        let plain = ev.frame.to_vec();
        let mut off = Outbox::default();
        let mut on = Outbox::default();
        on.set_deflate(Some(16));
        let mut high = Outbox::default();
        high.set_deflate(Some(10_000));
        for o in [&mut off, &mut on, &mut high] {
            o.push_shared(ev.clone());
        }
        let written = |o: &mut Outbox| {
            let mut s = Sink(Vec::new());
            assert!(o.flush(&mut s, |_| {}).unwrap());
            assert_eq!(o.bytes(), 0);
            s.0
        };
        assert_eq!(written(&mut off), plain, "not negotiated: the plain frame");
        assert_eq!(
            written(&mut high),
            plain,
            "under the minimum: the plain frame"
        );
        let z = written(&mut on);
        assert_eq!(z[0], 0xC1, "FIN, RSV1, text");
        assert!(z.len() < plain.len());
        // The same allocation for every compressing outbox: deflated once.
        let a = ev.wire_frame(dialect::NATIVE, Some(16)).unwrap().as_ptr();
        let b = ev.wire_frame(dialect::NATIVE, Some(1)).unwrap().as_ptr();
        assert_eq!(a, b);
        // `clear` keeps the setting.
        on.push_shared(ev.clone());
        on.clear();
        on.push_shared(ev.clone());
        assert_eq!(written(&mut on), z);
    }
}
