//! The io_uring driver (`[server] io = "io_uring"`): the same shard, with its plain
//! sockets' IO done through completions instead of readiness. The protocol core does not
//! change: received bytes go to the same `on_bytes`, and writes come from the same
//! outboxes and flush list as with mio.
//!
//! - The plain listener has one multishot accept.
//! - Every plain connection has one multishot receive into the shard's ring of provided
//!   buffers, so an idle connection holds no read buffer. Its bytes are copied into the
//!   shard's scratch buffer, the ring buffer is returned at once, and the scratch is
//!   decoded exactly as a `read` into it would be.
//! - A flush pass queues one `sendmsg` (`MSG_DONTWAIT`) per dirty connection, pointing at
//!   its outbox's frames, and submits them all with one `io_uring_enter`. A socket that
//!   is full answers `EAGAIN`; the connection then waits for a one-shot `POLLOUT`.
//! - Everything else (the waker other shards use, the TLS listener and TLS connections)
//!   stays registered with the shard's mio poll. The ring polls that poll's epoll
//!   descriptor, so one wait covers both.
//!
//! Where the kernel or a sandbox refuses io_uring (`probe` fails), the node logs why and
//! runs its shards on mio.

use super::conn::Conn;
use super::{ACCEPT_RETRY, Shard};
use io_uring::types::{BufRingEntry, Fd};
use io_uring::{IoUring, cqueue, opcode, squeue, types};
use slab::Slab;
use std::alloc::{Layout, alloc_zeroed, dealloc};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

/// Submission queue entries (the completion queue is twice as large; the kernel keeps
/// what overflows it).
const RING_ENTRIES: u32 = 1024;
/// Provided receive buffers per shard, and their size. They are shared by every
/// connection of the shard: a receive takes one only while its bytes are handled.
const BUF_COUNT: u16 = 256;
const BUF_SIZE: usize = 4096;
const BUF_GROUP: u16 = 0;
/// Frames in one connection's `sendmsg` (more wait for the next pass), as mio's `writev`.
const IOVECS_PER_SEND: usize = 256;
/// Completions handled per loop turn (the rest stay queued for the next turn).
const COMPLETIONS_PER_TURN: usize = 4096;

/// What a completion answers: the top four bits of its user data.
const ACCEPT: u64 = 1;
const RECV: u64 = 2;
const POLLOUT: u64 = 3;
const MIO: u64 = 4;
const SEND: u64 = 5;
const CANCEL: u64 = 6;

/// A connection's requests carry its slot and the low 28 bits of its generation, so a
/// completion for a closed connection is not taken for its slot's next one.
fn user_data(tag: u64, slot: usize, generation: u32) -> u64 {
    (tag << 60) | ((u64::from(generation) & 0x0FFF_FFFF) << 32) | (slot as u64 & 0xFFFF_FFFF)
}

fn split(ud: u64) -> (u64, usize, u32) {
    (
        ud >> 60,
        (ud & 0xFFFF_FFFF) as usize,
        ((ud >> 32) & 0x0FFF_FFFF) as u32,
    )
}

fn same_generation(conn: &Conn, generation: u32) -> bool {
    conn.generation & 0x0FFF_FFFF == generation
}

/// Checks that this kernel, in this sandbox, gives fleetcast what the driver needs: a
/// ring, a provided-buffer ring, and the operations it submits. The error says which.
///
/// It runs on a thread of its own, which exits with the ring: a ring's teardown can
/// signal the thread that created it, whose blocking calls would then see `EINTR`.
pub fn probe() -> io::Result<()> {
    std::thread::Builder::new()
        .name("fleetcast-io-probe".into())
        .spawn(probe_here)?
        .join()
        .map_err(|_| io::Error::other("the io_uring probe panicked"))?
}

fn probe_here() -> io::Result<()> {
    let ring = IoUring::new(8)?;
    let mut probe = io_uring::Probe::new();
    ring.submitter().register_probe(&mut probe)?;
    for (code, name) in [
        (opcode::AcceptMulti::CODE, "accept"),
        (opcode::RecvMulti::CODE, "recv"),
        (opcode::SendMsg::CODE, "sendmsg"),
        (opcode::PollAdd::CODE, "poll_add"),
        (opcode::AsyncCancel::CODE, "async_cancel"),
    ] {
        if !probe.is_supported(code) {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!("the kernel does not support io_uring {name}"),
            ));
        }
    }
    // Multishot receive with provided buffers needs Linux 6.0; the buffer ring 5.19.
    let bufs = BufRing::new(&ring)?;
    // The ring first: the kernel lets go of the buffers before they are freed.
    drop(ring);
    drop(bufs);
    Ok(())
}

/// The provided-buffer ring the kernel picks receive buffers from.
struct BufRing {
    entries: *mut BufRingEntry,
    memory: *mut u8,
    tail: u16,
}

impl BufRing {
    fn ring_layout() -> Layout {
        Layout::from_size_align(usize::from(BUF_COUNT) * size_of::<BufRingEntry>(), 4096)
            .expect("static layout")
    }

    fn memory_layout() -> Layout {
        Layout::from_size_align(usize::from(BUF_COUNT) * BUF_SIZE, 4096).expect("static layout")
    }

    fn new(ring: &IoUring) -> io::Result<BufRing> {
        // SAFETY: both layouts have a non-zero size.
        let entries = unsafe { alloc_zeroed(Self::ring_layout()) } as *mut BufRingEntry;
        let memory = unsafe { alloc_zeroed(Self::memory_layout()) };
        if entries.is_null() || memory.is_null() {
            return Err(io::ErrorKind::OutOfMemory.into());
        }
        let mut bufs = BufRing {
            entries,
            memory,
            tail: 0,
        };
        // SAFETY: the entries stay allocated until `Drop`, which runs after the ring is
        // closed (`Uring` declares its ring first) or, in `probe`, after it is dropped.
        unsafe {
            ring.submitter().register_buf_ring_with_flags(
                entries as u64,
                BUF_COUNT,
                BUF_GROUP,
                0,
            )?;
        }
        for bid in 0..BUF_COUNT {
            bufs.give(bid);
        }
        bufs.publish();
        Ok(bufs)
    }

    /// Hands buffer `bid` (back) to the kernel; seen by it after `publish`.
    fn give(&mut self, bid: u16) {
        let index = usize::from(self.tail & (BUF_COUNT - 1));
        // SAFETY: `index` < BUF_COUNT; the entry is not in the kernel's part of the ring
        // (at most BUF_COUNT buffers exist, and `bid` was taken out of it).
        let entry = unsafe { &mut *self.entries.add(index) };
        // SAFETY: `bid` < BUF_COUNT, inside `memory`.
        entry.set_addr(unsafe { self.memory.add(usize::from(bid) * BUF_SIZE) } as u64);
        entry.set_len(BUF_SIZE as u32);
        entry.set_bid(bid);
        self.tail = self.tail.wrapping_add(1);
    }

    fn publish(&self) {
        // SAFETY: the tail field lives in the first entry; the kernel reads it atomically.
        unsafe {
            let tail = BufRingEntry::tail(self.entries) as *const AtomicU16;
            (*tail).store(self.tail, Ordering::Release);
        }
    }

    /// The first `len` bytes the kernel received into buffer `bid`.
    fn bytes(&self, bid: u16, len: usize) -> &[u8] {
        let bid = usize::from(bid) % usize::from(BUF_COUNT);
        // SAFETY: inside `memory`; the kernel is done with the buffer (its completion was
        // read) until it is given back.
        unsafe { std::slice::from_raw_parts(self.memory.add(bid * BUF_SIZE), len.min(BUF_SIZE)) }
    }
}

impl Drop for BufRing {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with these layouts.
        unsafe {
            dealloc(self.entries as *mut u8, Self::ring_layout());
            dealloc(self.memory, Self::memory_layout());
        }
    }
}

/// One shard's ring and what it tracks.
pub(super) struct Uring {
    /// Declared first: dropped (closed, which ends every request) before the buffers.
    ring: IoUring,
    bufs: BufRing,
    /// The shard's mio poll (waker, TLS), polled through the ring.
    epoll_fd: RawFd,
    mio_armed: bool,
    /// The poll's descriptor fired: run mio's events this turn.
    pub mio_ready: bool,
    accept_armed: bool,
    /// Connections whose receive ended for lack of buffers: re-armed once this turn's
    /// completions have given theirs back.
    starved: Vec<(usize, u32)>,
    /// Completions met while collecting a flush pass's sends, handled next turn.
    deferred: Vec<(u64, i32, u32)>,
    completions: Vec<(u64, i32, u32)>,
    // A flush pass: its connections, their frames, messages and results.
    targets: Vec<usize>,
    iovecs: Vec<libc::iovec>,
    msgs: Vec<libc::msghdr>,
    offered: Vec<usize>,
    /// Where each connection's slices start in `iovecs`.
    starts: Vec<usize>,
    results: Vec<Option<i32>>,
    /// Results of the current pass not yet taken, in flush-list order.
    cursor: usize,
}

// SAFETY: the raw pointers are the ring's own buffers and a flush pass's scratch; the
// whole value belongs to one shard thread (it is moved there before first use).
unsafe impl Send for Uring {}

impl Uring {
    pub fn new(epoll_fd: RawFd) -> io::Result<Uring> {
        let ring = IoUring::builder()
            .setup_cqsize(RING_ENTRIES * 2)
            .setup_coop_taskrun()
            .setup_taskrun_flag()
            .build(RING_ENTRIES)?;
        let bufs = BufRing::new(&ring)?;
        Ok(Uring {
            ring,
            bufs,
            epoll_fd,
            mio_armed: false,
            mio_ready: false,
            accept_armed: false,
            starved: Vec::new(),
            deferred: Vec::new(),
            completions: Vec::new(),
            targets: Vec::new(),
            iovecs: Vec::new(),
            msgs: Vec::new(),
            offered: Vec::new(),
            starts: Vec::new(),
            results: Vec::new(),
            cursor: 0,
        })
    }

    /// Queues an entry, handing the queue to the kernel first when it is full.
    ///
    /// # Safety
    /// Whatever the entry points at must stay valid until its completion is read.
    unsafe fn push(&mut self, entry: squeue::Entry) {
        for _ in 0..64 {
            // SAFETY: the caller's promise.
            if unsafe { self.ring.submission().push(&entry) }.is_ok() {
                return;
            }
            if let Err(e) = self.ring.submit()
                && e.raw_os_error() != Some(libc::EBUSY)
            {
                tracing::error!("io_uring submit failed: {e}");
            }
        }
        tracing::error!("io_uring submission queue stays full; a request was not queued");
    }

    fn arm_accept(&mut self, listener: RawFd) {
        let e = opcode::AcceptMulti::new(Fd(listener))
            .flags(libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC)
            .build()
            .user_data(user_data(ACCEPT, 0, 0));
        // SAFETY: no memory is referenced.
        unsafe { self.push(e) };
        self.accept_armed = true;
    }

    fn arm_recv(&mut self, fd: RawFd, slot: usize, generation: u32) {
        let e = opcode::RecvMulti::new(Fd(fd), BUF_GROUP)
            .build()
            .user_data(user_data(RECV, slot, generation));
        // SAFETY: buffers come from the registered ring, which outlives the ring.
        unsafe { self.push(e) };
    }

    fn arm_pollout(&mut self, fd: RawFd, slot: usize, generation: u32) {
        let e = opcode::PollAdd::new(Fd(fd), libc::POLLOUT as u32)
            .build()
            .user_data(user_data(POLLOUT, slot, generation));
        // SAFETY: no memory is referenced.
        unsafe { self.push(e) };
    }

    fn cancel(&mut self, target: u64) {
        let e = opcode::AsyncCancel::new(target)
            .build()
            .user_data(user_data(CANCEL, 0, 0));
        // SAFETY: no memory is referenced.
        unsafe { self.push(e) };
    }

    /// Submits what is queued and waits up to `timeout` for a completion.
    pub fn wait(&mut self, timeout: Duration) -> io::Result<()> {
        if !self.mio_armed {
            let e = opcode::PollAdd::new(Fd(self.epoll_fd), libc::POLLIN as u32)
                .build()
                .user_data(user_data(MIO, 0, 0));
            // SAFETY: no memory is referenced.
            unsafe { self.push(e) };
            self.mio_armed = true;
        }
        let result = if timeout.is_zero() || !self.deferred.is_empty() {
            self.ring.submit()
        } else {
            let ts = types::Timespec::from(timeout);
            let args = types::SubmitArgs::new().timespec(&ts);
            self.ring.submitter().submit_with_args(1, &args)
        };
        match result {
            Ok(_) => Ok(()),
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ETIME) | Some(libc::EINTR) | Some(libc::EBUSY)
                ) =>
            {
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Completions are waiting (the loop must not block).
    pub fn busy(&mut self) -> bool {
        !self.deferred.is_empty() || !self.ring.completion().is_empty()
    }

    /// Queues one `sendmsg` per connection of `slots` that has frames to write and is not
    /// waiting for `POLLOUT`, submits them with one `io_uring_enter` and collects their
    /// results (taken in the same order with `take_result`).
    fn send_pass(&mut self, conns: &Slab<Conn>, slots: impl Iterator<Item = usize>) {
        self.targets.clear();
        self.iovecs.clear();
        self.msgs.clear();
        self.offered.clear();
        self.starts.clear();
        self.results.clear();
        self.cursor = 0;
        for slot in slots {
            if let Some(c) = conns.get(slot)
                && c.tls.is_none()
                && !c.pollout_armed
                && c.out.bytes() > 0
            {
                self.targets.push(slot);
            }
        }
        if self.targets.is_empty() {
            return;
        }
        // Sized before any pointer is taken: no reallocation moves what the kernel reads.
        self.iovecs.reserve(self.targets.len() * IOVECS_PER_SEND);
        for &slot in &self.targets {
            self.starts.push(self.iovecs.len());
            let offered = conns[slot].out.iovecs(&mut self.iovecs, IOVECS_PER_SEND);
            self.offered.push(offered);
        }
        self.msgs.reserve(self.targets.len());
        for (i, &start) in self.starts.iter().enumerate() {
            let end = self.starts.get(i + 1).copied().unwrap_or(self.iovecs.len());
            // SAFETY: an all-zero msghdr is a valid empty message.
            let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
            msg.msg_iov = self.iovecs[start..end].as_mut_ptr();
            msg.msg_iovlen = (end - start) as _;
            self.msgs.push(msg);
        }
        self.results.resize(self.targets.len(), None);
        for i in 0..self.targets.len() {
            let fd = conns[self.targets[i]].stream.as_raw_fd();
            let e = opcode::SendMsg::new(Fd(fd), &self.msgs[i])
                .flags((libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) as u32)
                .build()
                .user_data(user_data(SEND, i, 0));
            // SAFETY: the message, its slices and the frames they point at are not
            // touched until every result of this pass is read, below.
            unsafe { self.push(e) };
        }
        let mut missing = self.targets.len();
        let mut submitted = false;
        while missing > 0 {
            // MSG_DONTWAIT: each send completes in the submitting call (a full socket
            // answers EAGAIN), so this normally enters the kernel once.
            let r = if submitted {
                self.ring.submit_and_wait(1)
            } else {
                self.ring.submit()
            };
            submitted = true;
            if let Err(e) = r
                && !matches!(e.raw_os_error(), Some(libc::EINTR) | Some(libc::EBUSY))
            {
                tracing::error!("io_uring submit failed: {e}");
            }
            for cqe in self.ring.completion() {
                let (tag, index, _) = split(cqe.user_data());
                if tag == SEND && index < self.results.len() && self.results[index].is_none() {
                    self.results[index] = Some(cqe.result());
                    missing -= 1;
                } else {
                    self.deferred
                        .push((cqe.user_data(), cqe.result(), cqe.flags()));
                }
            }
        }
    }

    /// The result of `slot`'s send in the current pass (bytes written or `-errno`) and
    /// the bytes offered, if it had one.
    fn take_result(&mut self, slot: usize) -> Option<(i32, usize)> {
        let i = self.cursor;
        if self.targets.get(i) != Some(&slot) {
            return None;
        }
        self.cursor += 1;
        Some((self.results[i].unwrap_or(-libc::EIO), self.offered[i]))
    }
}

/// What a flush of one connection came to (the io_uring pass's result).
pub(super) enum Sent {
    /// Not in this pass (nothing queued, or waiting for `POLLOUT`): done if nothing is queued.
    NotSent,
    Result(io::Result<bool>),
}

impl Shard {
    /// Switches this shard to io_uring, if `[server] io` asks and the kernel allows; a
    /// shard whose ring cannot be created stays on mio (and says so).
    pub(super) fn start_uring(&mut self) {
        if !self.shared.io_uring {
            return;
        }
        let mut u = match Uring::new(self.poll.as_raw_fd()) {
            Ok(u) => u,
            Err(e) => {
                tracing::warn!(
                    shard = self.id,
                    "io_uring ring not created ({e}); this shard uses mio"
                );
                return;
            }
        };
        if let Some(l) = &mut self.listener {
            let _ = self.poll.registry().deregister(l);
            u.arm_accept(l.as_raw_fd());
        }
        self.uring = Some(Box::new(u));
        self.stats()
            .io_uring
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    pub(super) fn uring_busy(&mut self) -> bool {
        self.uring.as_mut().is_some_and(|u| u.busy())
    }

    /// Re-arms the multishot accept (after an error ended it), unless shutting down.
    pub(super) fn uring_rearm_accept(&mut self) -> bool {
        let Some(u) = &mut self.uring else {
            return false;
        };
        if let Some(l) = &self.listener
            && !u.accept_armed
        {
            u.arm_accept(l.as_raw_fd());
        }
        true
    }

    /// Shutdown: ends the multishot accept (the listener closes when it is done).
    pub(super) fn uring_stop_accept(&mut self) {
        if let Some(u) = &mut self.uring
            && u.accept_armed
        {
            u.cancel(user_data(ACCEPT, 0, 0));
            u.accept_armed = false;
        }
    }

    /// A connection accepted through the ring starts receiving.
    pub(super) fn uring_attach(&mut self, slot: usize) -> bool {
        let Some(u) = &mut self.uring else {
            return false;
        };
        let conn = &self.conns[slot];
        u.arm_recv(conn.stream.as_raw_fd(), slot, conn.generation);
        true
    }

    /// A plain connection is going away: its requests are cancelled (each holds the
    /// socket open until it ends).
    pub(super) fn uring_detach(&mut self, conn: &Conn, slot: usize) -> bool {
        let Some(u) = &mut self.uring else {
            return false;
        };
        if conn.tls.is_some() {
            return false;
        }
        u.cancel(user_data(RECV, slot, conn.generation));
        if conn.pollout_armed {
            u.cancel(user_data(POLLOUT, slot, conn.generation));
        }
        true
    }

    /// Handles this turn's completions.
    pub(super) fn uring_turn(&mut self) {
        let Some(u) = &mut self.uring else {
            return;
        };
        let mut batch = std::mem::take(&mut u.completions);
        batch.append(&mut u.deferred);
        let room = COMPLETIONS_PER_TURN.saturating_sub(batch.len());
        batch.extend(
            u.ring
                .completion()
                .take(room)
                .map(|c| (c.user_data(), c.result(), c.flags())),
        );
        for &(ud, res, flags) in &batch {
            self.on_completion(ud, res, flags);
        }
        batch.clear();
        let Some(u) = &mut self.uring else {
            return;
        };
        u.completions = batch;
        u.bufs.publish();
        for (slot, generation) in std::mem::take(&mut u.starved) {
            if let Some(c) = self.conns.get(slot)
                && c.generation == generation
            {
                u.arm_recv(c.stream.as_raw_fd(), slot, generation);
            }
        }
    }

    fn on_completion(&mut self, ud: u64, res: i32, flags: u32) {
        let (tag, slot, generation) = split(ud);
        match tag {
            MIO => {
                if let Some(u) = &mut self.uring {
                    u.mio_armed = false;
                    u.mio_ready = true;
                }
            }
            ACCEPT => self.uring_accepted(res, flags),
            RECV => self.uring_received(slot, generation, res, flags),
            POLLOUT => {
                if let Some(conn) = self.conns.get_mut(slot)
                    && same_generation(conn, generation)
                    && conn.pollout_armed
                {
                    conn.pollout_armed = false;
                    conn.out.set_writable();
                    if conn.wants_write() || conn.snapshots.is_some() || !conn.is_open() {
                        self.mark_dirty(slot);
                    }
                }
            }
            _ => {}
        }
    }

    fn uring_accepted(&mut self, res: i32, flags: u32) {
        if res >= 0 {
            // SAFETY: the kernel just created this descriptor for us.
            let std = unsafe { std::net::TcpStream::from_raw_fd(res) };
            if let Ok(peer) = std.peer_addr() {
                self.add_conn(mio::net::TcpStream::from_std(std), peer, true);
            }
        } else if res != -libc::ECANCELED {
            let e = io::Error::from_raw_os_error(-res);
            tracing::warn!(shard = self.id, "accept failed: {e}; retrying in 50 ms");
            self.accept_retry_at = Some(Instant::now() + ACCEPT_RETRY);
        }
        if !cqueue::more(flags)
            && let Some(u) = &mut self.uring
        {
            u.accept_armed = false;
            if res >= 0 {
                self.uring_rearm_accept();
            }
        }
    }

    fn uring_received(&mut self, slot: usize, generation: u32, res: i32, flags: u32) {
        let live = self
            .conns
            .get(slot)
            .is_some_and(|c| same_generation(c, generation));
        if res > 0 {
            let n = res as usize;
            let mut scratch = std::mem::take(&mut self.scratch);
            if let Some(u) = &mut self.uring
                && let Some(bid) = cqueue::buffer_select(flags)
            {
                if live {
                    scratch[..n].copy_from_slice(u.bufs.bytes(bid, n));
                }
                u.bufs.give(bid);
            }
            if live {
                self.stats()
                    .bytes_in
                    .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
                self.on_bytes(slot, &mut scratch[..n]);
            }
            self.scratch = scratch;
            if !cqueue::more(flags)
                && let Some(c) = self.conns.get(slot)
                && same_generation(c, generation)
                && let Some(u) = &mut self.uring
            {
                u.arm_recv(c.stream.as_raw_fd(), slot, c.generation);
            }
            return;
        }
        if !live {
            return;
        }
        match -res {
            // End of stream.
            0 => self.drop_conn(slot),
            libc::ENOBUFS | libc::EAGAIN | libc::EINTR => {
                if let Some(u) = &mut self.uring {
                    u.starved.push((slot, self.conns[slot].generation));
                }
            }
            libc::ECANCELED => {}
            _ => self.drop_conn(slot),
        }
    }

    /// The io_uring flush pass: sends for the first `count` connections of the flush
    /// list, in one submission.
    pub(super) fn uring_send_pass(&mut self, count: usize) {
        if let Some(u) = &mut self.uring {
            u.send_pass(&self.conns, self.dirty.iter().take(count).copied());
        }
    }

    /// `slot`'s part of the pass: its outbox is advanced by what was written. A full socket
    /// waits for `POLLOUT`; frames beyond one send's slices go in the next pass.
    pub(super) fn uring_sent(
        &mut self,
        slot: usize,
        on_written: impl FnMut(&crate::event::Event),
    ) -> Option<Sent> {
        let u = self.uring.as_mut()?;
        let conn = self.conns.get_mut(slot)?;
        if conn.tls.is_some() {
            return None;
        }
        let Some((res, offered)) = u.take_result(slot) else {
            return Some(Sent::NotSent);
        };
        if res < 0 {
            return Some(match -res {
                libc::EAGAIN | libc::EINTR => {
                    if !conn.pollout_armed {
                        conn.pollout_armed = true;
                        conn.out.set_blocked();
                        u.arm_pollout(conn.stream.as_raw_fd(), slot, conn.generation);
                    }
                    Sent::Result(Ok(false))
                }
                e => Sent::Result(Err(io::Error::from_raw_os_error(e))),
            });
        }
        let n = res as usize;
        if n == 0 {
            return Some(Sent::Result(Err(io::ErrorKind::WriteZero.into())));
        }
        if conn.out.sent(n, on_written) {
            return Some(Sent::Result(Ok(true)));
        }
        if n < offered {
            // The socket took part: it is full now.
            conn.pollout_armed = true;
            conn.out.set_blocked();
            u.arm_pollout(conn.stream.as_raw_fd(), slot, conn.generation);
        } else {
            self.mark_dirty(slot);
        }
        Some(Sent::Result(Ok(false)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_data_round_trips_slot_generation_and_tag() {
        let ud = user_data(RECV, 123_456, 0xABCD_1234);
        assert_eq!(split(ud), (RECV, 123_456, 0x0BCD_1234));
        assert_eq!(split(user_data(POLLOUT, 0, 0)), (POLLOUT, 0, 0));
        assert_ne!(user_data(RECV, 1, 1), user_data(RECV, 1, 2));
        assert_ne!(user_data(RECV, 1, 1), user_data(POLLOUT, 1, 1));
    }
}
