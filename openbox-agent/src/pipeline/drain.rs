//! The ring buffer's drain thread: it only copies records out of the kernel's ring into
//! a bounded queue in the agent's memory, and the session parses them on its own thread.
//!
//! Why a thread of its own: under load the session's thread is CPU-bound (≈ 5 µs per
//! span), and on a busy node it waits for a CPU as long as it runs. While it waits, the
//! kernel's ring fills (16 MiB hold under a second at 100 000 events/s) and the kernel
//! drops records. Copying a record takes a small fraction of parsing it, so this thread
//! runs briefly and often; the scheduler gives such a thread a CPU soon after it wakes,
//! and the backlog moves into the queue, whose memory is taken only while there is a
//! backlog (a larger kernel ring is allocated, pinned and mapped at start whatever the
//! load).
//!
//! The queue is bounded ([`QUEUE_BYTES`]): when it is full the thread stops copying, the
//! kernel's ring fills behind it, and what no longer fits there is dropped and counted by
//! the kernel programs (`ringbuf_drops`), as before. The times the queue was full and its
//! peak size are counted ([`QueueStats`]).
//!
//! The daemon's proof that the ring was read past a mark (`position`) must hold for
//! records *handled*, not merely copied: each batch carries the consumer position after
//! its last record, and the session's side publishes it once the batch is handled.

use std::{
    collections::VecDeque,
    os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Condvar, Mutex, MutexGuard,
    },
    thread::JoinHandle,
    time::Duration,
};

use anyhow::{anyhow, Context, Result};
use aya::maps::{MapData, RingBuf};
use serde::Serialize;

use super::position::Positions;

/// Most bytes of records held in the queue (the records' own bytes and 8 bytes each for
/// their length, rounded up to 8). At 100 000 events/s of HTTP keep-alive traffic (about
/// 200 bytes a record), 64 MiB hold about three seconds of backlog behind the 16 MiB
/// kernel ring's one.
pub const QUEUE_BYTES: usize = 64 << 20;

/// Records are copied in batches of about this many bytes: a batch is handed to the
/// session when full, or when the ring is empty.
const BATCH_BYTES: usize = 256 << 10;

/// Room left in a batch's buffer past [`BATCH_BYTES`] for the record that fills it (the
/// largest records, payload chunks, are `MAX_CHUNK` (4 KiB) and a header).
const MAX_RECORD: usize = 16 << 10;

/// Emptied batches kept for reuse (a batch's buffer is allocated once at this rate).
const SPARE_BATCHES: usize = 4;

/// How long the thread sleeps without a wake-up from the kernel while records come: the
/// kernel wakes the reader only once 64 KiB are waiting (or a process is paused for the
/// agent), so this bounds how late a record is read.
const TICK: Duration = Duration::from_millis(10);

/// How long it sleeps once [`IDLE_POLLS`] polls in a row (a second) found nothing: an
/// idle agent then wakes 10 times a second instead of 100, and the first record it finds
/// brings [`TICK`] back. So a lone record after a quiet second is read up to this late;
/// an `activity_end` is not (the daemon copies the ring at once, [`Drain::copy_now`]),
/// nor a process the kernel paused for the agent (it forces a wake-up).
const IDLE_TICK: Duration = Duration::from_millis(100);

/// Empty polls in a row after which the thread sleeps [`IDLE_TICK`].
const IDLE_POLLS: u32 = 100;

/// The drain thread's pace: [`TICK`] while records come, [`IDLE_TICK`] once it has been
/// idle a while.
#[derive(Debug, Default)]
struct Pace {
    /// Polls in a row that found nothing.
    empty: u32,
}

impl Pace {
    /// How long the next poll may sleep.
    fn timeout(&self) -> Duration {
        if self.empty >= IDLE_POLLS {
            IDLE_TICK
        } else {
            TICK
        }
    }

    /// A poll returned; `found` whether it copied anything (or the consumer moved).
    fn polled(&mut self, found: bool) {
        self.empty = if found {
            0
        } else {
            self.empty.saturating_add(1)
        };
    }
}

/// The queue's own counts.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct QueueStats {
    /// Most bytes the queue held at once.
    pub peak_bytes: u64,
    /// Times the drain thread found the queue full and stopped copying until the
    /// session had handled some of it (the kernel's ring then filled behind it).
    pub full: u64,
}

/// Records copied out of the ring: each is its length (`u64`), then its bytes, padded to
/// 8 bytes so every record starts aligned as in the ring.
pub struct Batch {
    buf: Vec<u8>,
    /// The ring's consumer position after this batch's last record.
    pub end: usize,
}

impl Batch {
    fn push(&mut self, record: &[u8]) {
        self.buf
            .extend_from_slice(&(record.len() as u64).to_ne_bytes());
        self.buf.extend_from_slice(record);
        let pad = record.len().next_multiple_of(8) - record.len();
        self.buf.extend_from_slice(&[0u8; 8][..pad]);
    }

    /// The batch's records, in ring order.
    pub fn records(&self) -> impl Iterator<Item = &[u8]> {
        let mut rest = &self.buf[..];
        std::iter::from_fn(move || {
            let (len, tail) = rest.split_first_chunk::<8>()?;
            let len = u64::from_ne_bytes(*len) as usize;
            let record = tail.get(..len)?;
            rest = tail.get(len.next_multiple_of(8)..).unwrap_or_default();
            Some(record)
        })
    }
}

#[derive(Default)]
struct Queue {
    batches: VecDeque<Batch>,
    bytes: usize,
    spare: Vec<Vec<u8>>,
    stats: QueueStats,
}

struct Shared {
    queue: Mutex<Queue>,
    /// The session handled a batch: room again for the drain thread.
    room: Condvar,
    /// The drain thread queued a batch.
    ready: tokio::sync::Notify,
    stop: AtomicBool,
    /// Most bytes queued.
    bound: usize,
}

impl Shared {
    fn queue(&self) -> MutexGuard<'_, Queue> {
        // A panic while holding the lock leaves plain data behind: go on with it.
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The ring and the consumer position last handed over with a batch: held by whichever
/// of the two threads is copying.
struct Reader {
    ring: RingBuf<MapData>,
    handed: usize,
}

/// The session's side: batches to handle, and the thread that fills them.
pub struct Drain {
    shared: Arc<Shared>,
    reader: Arc<Mutex<Reader>>,
    positions: Arc<Positions>,
    /// An eventfd: written to wake the thread when it is to stop.
    kick: Arc<OwnedFd>,
    thread: Option<JoinHandle<()>>,
}

impl Drain {
    /// Starts the drain thread on `ring`, with at most `bound` bytes queued.
    pub fn start(ring: RingBuf<MapData>, positions: Arc<Positions>, bound: usize) -> Result<Drain> {
        // SAFETY: eventfd returns a new descriptor or -1.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(anyhow!(
                "creating the ring buffer's wake-up eventfd: {}",
                std::io::Error::last_os_error()
            ));
        }
        // SAFETY: the descriptor is new and ours.
        let kick = Arc::new(unsafe { OwnedFd::from_raw_fd(fd) });
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue::default()),
            room: Condvar::new(),
            ready: tokio::sync::Notify::new(),
            stop: AtomicBool::new(false),
            bound,
        });
        let ring_fd = ring.as_fd().as_raw_fd();
        let reader = Arc::new(Mutex::new(Reader {
            ring,
            handed: positions.consumer(),
        }));
        let thread = std::thread::Builder::new()
            .name("ring-drain".into())
            .spawn({
                let (shared, kick, reader, positions) = (
                    shared.clone(),
                    kick.clone(),
                    reader.clone(),
                    positions.clone(),
                );
                move || run(ring_fd, &reader, &shared, &kick, &positions)
            })
            .context("starting the ring buffer's drain thread")?;
        Ok(Drain {
            shared,
            reader,
            positions,
            kick,
            thread: Some(thread),
        })
    }

    /// Waits until a batch is queued (cancel-safe).
    pub async fn ready(&self) {
        self.shared.ready.notified().await
    }

    /// Copies what the ring holds now into the queue on the caller's thread, unless the
    /// drain thread is copying already (it then hands over as soon as it is done) or the
    /// queue is full. Used where the caller needs the records reserved so far soon (an
    /// activity's end).
    pub fn copy_now(&self) {
        if let Ok(mut r) = self.reader.try_lock() {
            copy(&mut r, &self.shared, &self.positions, false);
        }
    }

    /// The oldest queued batch.
    pub fn pop(&self) -> Option<Batch> {
        let mut q = self.shared.queue();
        let batch = q.batches.pop_front()?;
        q.bytes -= batch.buf.len();
        Some(batch)
    }

    /// Gives a handled batch's buffer back, and tells the thread there is room.
    pub fn recycle(&self, mut batch: Batch) {
        let mut q = self.shared.queue();
        if q.spare.len() < SPARE_BATCHES {
            batch.buf.clear();
            q.spare.push(batch.buf);
        }
        drop(q);
        self.shared.room.notify_one();
    }

    pub fn stats(&self) -> QueueStats {
        self.shared.queue().stats
    }

    /// Stops the thread. What it queued stays queued; what is still in the ring is read
    /// with [`Drain::rest`].
    pub fn stop(&mut self) {
        if let Some(thread) = self.thread.take() {
            self.shared.stop.store(true, Ordering::Release);
            let one = 1u64.to_ne_bytes();
            // SAFETY: an 8-byte write to our eventfd (it fails only when a wake-up is
            // pending anyway).
            unsafe { libc::write(self.kick.as_raw_fd(), one.as_ptr().cast(), one.len()) };
            self.shared.room.notify_all();
            if thread.join().is_err() {
                tracing::error!("the ring buffer's drain thread panicked");
            }
        }
    }

    /// Once stopped: passes each record still in the ring to `f`, then returns the
    /// consumer position.
    pub fn rest(&mut self, mut f: impl FnMut(&[u8])) -> usize {
        self.stop();
        let mut r = self.reader.lock().unwrap_or_else(|e| e.into_inner());
        while let Some(item) = r.ring.next() {
            f(&item);
        }
        self.positions.consumer()
    }
}

impl Drop for Drain {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The thread: waits for the kernel's wake-up or the tick ([`Pace`]), then copies every
/// record waiting into batches.
fn run(
    ring_fd: std::os::fd::RawFd,
    reader: &Mutex<Reader>,
    shared: &Shared,
    kick: &OwnedFd,
    positions: &Positions,
) {
    let mut pace = Pace::default();
    while !shared.stop.load(Ordering::Acquire) {
        wait(ring_fd, kick, pace.timeout());
        if shared.stop.load(Ordering::Acquire) {
            break;
        }
        let mut r = reader.lock().unwrap_or_else(|e| e.into_inner());
        pace.polled(copy(&mut r, shared, positions, true));
    }
}

/// Waits up to `timeout` for the ring or the eventfd.
fn wait(ring_fd: std::os::fd::RawFd, kick: &OwnedFd, timeout: Duration) {
    let mut fds = [
        libc::pollfd {
            fd: ring_fd,
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: kick.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    // SAFETY: two valid pollfds.
    let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, timeout.as_millis() as libc::c_int) };
    if n > 0 && fds[1].revents & libc::POLLIN != 0 {
        let mut count = [0u8; 8];
        // SAFETY: an 8-byte read from our non-blocking eventfd resets it.
        unsafe { libc::read(kick.as_raw_fd(), count.as_mut_ptr().cast(), count.len()) };
    }
}

/// Copies the records waiting in the ring into the queue; when it is full, waits for
/// room (`block`) or stops. A batch is queued whenever the consumer position moved
/// (discarded records move it too, so a batch may be empty); returns whether one was.
fn copy(r: &mut Reader, shared: &Shared, positions: &Positions, block: bool) -> bool {
    let start = r.handed;
    let mut batch = Batch {
        buf: spare(shared),
        end: r.handed,
    };
    loop {
        // Room for a whole batch, checked as each batch begins (a batch is at most
        // BATCH_BYTES and one record: the bound limits memory, it is not an exact count).
        if batch.buf.is_empty() && !room(shared, BATCH_BYTES, block) {
            break;
        }
        let Some(item) = r.ring.next() else { break };
        batch.push(&item);
        drop(item);
        if batch.buf.len() >= BATCH_BYTES {
            batch.end = positions.consumer();
            r.handed = batch.end;
            let next = spare(shared);
            queue(
                shared,
                std::mem::replace(&mut batch, Batch { buf: next, end: 0 }),
            );
        }
    }
    let end = positions.consumer();
    if !batch.buf.is_empty() || end != r.handed {
        batch.end = end;
        r.handed = end;
        queue(shared, batch);
        true
    } else {
        shared.queue().spare.push(batch.buf);
        // Batches queued above, when the ring held more than one.
        end != start
    }
}

/// An emptied batch's buffer, or a new one of a batch's size (grown as records are
/// copied, a buffer would be copied again at each doubling).
fn spare(shared: &Shared) -> Vec<u8> {
    shared
        .queue()
        .spare
        .pop()
        .unwrap_or_else(|| Vec::with_capacity(BATCH_BYTES + MAX_RECORD))
}

fn queue(shared: &Shared, batch: Batch) {
    let mut q = shared.queue();
    q.bytes += batch.buf.len();
    q.stats.peak_bytes = q.stats.peak_bytes.max(q.bytes as u64);
    q.batches.push_back(batch);
    drop(q);
    shared.ready.notify_one();
}

/// Whether `more` bytes fit in the queue, waiting for the session to make room when
/// `block`; false when they do not (or the thread is to stop).
fn room(shared: &Shared, more: usize, block: bool) -> bool {
    let fits = |q: &Queue| q.bytes == 0 || q.bytes + more <= shared.bound;
    let mut q = shared.queue();
    if fits(&q) {
        return true;
    }
    if !block {
        return false;
    }
    q.stats.full += 1;
    tracing::debug!(
        queued = q.bytes,
        "the ring buffer's queue is full: copying stops until the session catches up"
    );
    while !fits(&q) {
        if shared.stop.load(Ordering::Acquire) {
            return false;
        }
        q = shared
            .room
            .wait_timeout(q, TICK)
            .unwrap_or_else(|e| e.into_inner())
            .0;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The drain thread copies whatever the ring holds each time its poll returns, so a
    /// record is read at the latest when the sleep it arrived in ends: the timeout in
    /// force after `quiet` empty polls.
    fn longest_wait_for_a_lone_record(quiet: u32) -> Duration {
        let mut pace = Pace::default();
        for _ in 0..quiet {
            pace.polled(false);
        }
        pace.timeout()
    }

    #[test]
    fn a_lone_record_is_read_within_the_idle_tick_however_long_the_agent_was_idle() {
        for quiet in [0, 1, IDLE_POLLS - 1, IDLE_POLLS, 10 * IDLE_POLLS, u32::MAX] {
            let waited = longest_wait_for_a_lone_record(quiet);
            assert!(waited <= IDLE_TICK, "after {quiet} empty polls: {waited:?}");
        }
        // Busy or briefly quiet: the short tick, as before.
        assert_eq!(longest_wait_for_a_lone_record(0), TICK);
        assert_eq!(longest_wait_for_a_lone_record(IDLE_POLLS - 1), TICK);
        assert!(IDLE_TICK <= Duration::from_millis(100));
    }

    #[test]
    fn any_record_brings_the_short_tick_back_and_only_a_quiet_second_lengthens_it() {
        let mut pace = Pace::default();
        for i in 0..IDLE_POLLS {
            assert_eq!(pace.timeout(), TICK, "after {i} empty polls");
            pace.polled(false);
        }
        assert_eq!(pace.timeout(), IDLE_TICK);
        pace.polled(false);
        assert_eq!(pace.timeout(), IDLE_TICK);
        pace.polled(true);
        assert_eq!(pace.timeout(), TICK);
        // A record every so often keeps it short.
        for _ in 0..1000 {
            for _ in 0..IDLE_POLLS - 1 {
                pace.polled(false);
            }
            pace.polled(true);
            assert_eq!(pace.timeout(), TICK);
        }
    }

    #[test]
    fn a_batch_gives_back_its_records_in_order_whatever_their_lengths() {
        let mut b = Batch {
            buf: Vec::new(),
            end: 0,
        };
        let records: Vec<Vec<u8>> = (0..20).map(|n| vec![n as u8; n * 3]).collect();
        for r in &records {
            b.push(r);
        }
        let back: Vec<&[u8]> = b.records().collect();
        assert_eq!(back.len(), records.len());
        for (got, want) in back.iter().zip(&records) {
            assert_eq!(*got, &want[..]);
            assert_eq!(got.as_ptr() as usize % 8, b.buf.as_ptr() as usize % 8);
        }
    }
}
