//! A connection's outbound queue: shared event frames and owned replies, flushed with
//! vectored writes. Empty outboxes hold no heap memory.

use crate::event::Event;
use std::collections::VecDeque;
use std::io::{self, IoSlice, Write};
use std::sync::Arc;

#[derive(Debug)]
enum Chunk {
    /// An event frame shared with every other subscriber.
    Shared(Arc<Event>),
    /// A frame for this connection only (replies, projections, control frames).
    Owned(Box<[u8]>),
}

impl Chunk {
    fn bytes(&self) -> &[u8] {
        match self {
            Chunk::Shared(e) => &e.frame,
            Chunk::Owned(b) => b,
        }
    }
}

/// Frames written per `writev` call.
const MAX_IOVECS: usize = 64;

#[derive(Debug, Default)]
pub struct Outbox {
    chunks: VecDeque<Chunk>,
    /// Bytes of the front chunk already written.
    written: usize,
    /// Bytes queued and not yet written.
    bytes: usize,
}

impl Outbox {
    pub fn push_shared(&mut self, ev: Arc<Event>) {
        self.bytes += ev.frame.len();
        self.chunks.push_back(Chunk::Shared(ev));
    }

    pub fn push_owned(&mut self, frame: Vec<u8>) {
        self.bytes += frame.len();
        self.chunks
            .push_back(Chunk::Owned(frame.into_boxed_slice()));
    }

    pub fn is_empty(&self) -> bool {
        self.chunks.is_empty()
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn clear(&mut self) {
        *self = Outbox::default();
    }

    /// Writes as much as the socket takes. Returns Ok(true) when everything was written.
    pub fn flush(&mut self, w: &mut impl Write) -> io::Result<bool> {
        while !self.chunks.is_empty() {
            let mut slices: [IoSlice<'_>; MAX_IOVECS] = [IoSlice::new(&[]); MAX_IOVECS];
            let mut n = 0;
            for (i, c) in self.chunks.iter().take(MAX_IOVECS).enumerate() {
                let b = c.bytes();
                slices[n] = IoSlice::new(if i == 0 { &b[self.written..] } else { b });
                n += 1;
            }
            let written = match w.write_vectored(&slices[..n]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(k) => k,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            self.consume(written);
        }
        if self.chunks.capacity() > 16 {
            self.chunks = VecDeque::new();
        }
        Ok(true)
    }

    fn consume(&mut self, mut n: usize) {
        self.bytes -= n;
        while n > 0 {
            let front = self
                .chunks
                .front()
                .expect("wrote more than queued")
                .bytes()
                .len();
            let left = front - self.written;
            if n >= left {
                n -= left;
                self.written = 0;
                self.chunks.pop_front();
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
        while !o.flush(&mut w).unwrap() {
            rounds += 1;
            assert!(rounds < 10_000);
        }
        assert_eq!(w.out, expect);
        assert_eq!(o.bytes(), 0);
        assert!(o.is_empty());
    }
}
