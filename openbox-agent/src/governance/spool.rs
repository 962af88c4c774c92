//! A durable, bounded, ordered on-disk queue of governance events waiting for Core.
//!
//! Layout of the spool directory:
//! - `seg-<20-digit id>.jsonl`: append-only segment files, one event per line (the exact
//!   request body, compact JSON, which never holds a raw newline). A new segment starts
//!   when the current one reaches `segment_bytes`.
//! - `cursor`: `<segment id> <byte offset>` of the first event not yet delivered, replaced
//!   atomically (write temp, fsync, rename, fsync directory) after each delivery.
//! - `lock`: held with `flock` while a spool is open, so two agents never share one.
//!
//! Every append is fsync'd before [`Spool::append`] (or [`Spool::append_batch`], one fsync
//! for many events) returns, and a new segment's directory entry before it is written to.
//! Delivery is in append order:
//! [`Spool::peek`] gives the oldest event, [`Spool::ack`] moves the cursor past it once Core
//! answered. Fully delivered segments are deleted.
//!
//! **Guarantee: at-least-once, in order.** An event leaves the spool only after Core
//! accepted it, and the cursor is durable before the next event is sent. If the agent dies
//! after Core's answer and before the cursor write, that one event is sent again on
//! restart (Core has no idempotency key in API v1, so the agent cannot do better): apart
//! from that window, delivery is exactly-once. A partial line left by a crash mid-append
//! (the event was never acknowledged to its producer) is cut off at open with a warning;
//! a line that is not JSON is skipped with a warning.
//!
//! **Bounds:** `max_events` and `max_bytes` of undelivered events. When an append would
//! pass either, the new event is dropped, counted ([`Spool::dropped`]) and logged at error
//! level — never silently.

use std::{
    collections::VecDeque,
    fs::{self, File, OpenOptions},
    io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
};

/// Limits of one spool.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SpoolLimits {
    pub max_bytes: u64,
    pub max_events: u64,
    /// Size at which a new segment file is started.
    pub segment_bytes: u64,
}

impl SpoolLimits {
    /// Segments of at most 8 MiB, and at least 4 per spool.
    pub fn new(max_bytes: u64, max_events: u64) -> SpoolLimits {
        SpoolLimits {
            max_bytes,
            max_events,
            segment_bytes: (max_bytes / 4).clamp(4096, 8 << 20),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Position {
    segment: u64,
    offset: u64,
}

/// The oldest undelivered event, as returned by [`Spool::peek`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Spooled {
    /// The event's bytes (the request body), without the newline.
    pub body: Vec<u8>,
    at: Position,
    next: Position,
}

/// What [`Spool::append`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Appended {
    Stored,
    /// The spool is full; the event was dropped (and counted).
    Dropped,
}

pub struct Spool {
    dir: PathBuf,
    limits: SpoolLimits,
    _lock: File,
    /// Segment ids on disk, ascending; the first is the one being read.
    segments: VecDeque<u64>,
    read: Position,
    writer: Option<(u64, File, u64)>,
    pending_events: u64,
    pending_bytes: u64,
    dropped: u64,
    skipped_corrupt: u64,
}

fn segment_name(id: u64) -> String {
    format!("seg-{id:020}.jsonl")
}

fn ctx(e: io::Error, what: impl std::fmt::Display) -> io::Error {
    io::Error::new(e.kind(), format!("{what}: {e}"))
}

impl Spool {
    /// Opens (creating if needed) the spool in `dir` and picks up where the last run left.
    pub fn open(dir: &Path, limits: SpoolLimits) -> io::Result<Spool> {
        super::private::dir(dir).map_err(|e| {
            ctx(
                e,
                format_args!(
                    "cannot create spool directory {} (set spool_dir to a writable directory)",
                    dir.display()
                ),
            )
        })?;
        // The directory's own entry must survive a crash too, or so would nothing in it.
        if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            File::open(parent)?.sync_all()?;
        }
        let lock = super::private::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join("lock"))
            .map_err(|e| {
                ctx(
                    e,
                    format_args!("cannot open {}", dir.join("lock").display()),
                )
            })?;
        // SAFETY: flock on a descriptor we own; no memory is passed.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            return Err(io::Error::new(
                io::ErrorKind::WouldBlock,
                format!("spool directory {} is in use by another openbox-agent (give each agent its own spool_dir)", dir.display()),
            ));
        }
        let mut ids: Vec<u64> = fs::read_dir(dir)?
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                name.strip_prefix("seg-")?
                    .strip_suffix(".jsonl")?
                    .parse()
                    .ok()
            })
            .collect();
        ids.sort_unstable();
        let mut spool = Spool {
            dir: dir.to_owned(),
            limits,
            _lock: lock,
            segments: ids.into_iter().collect(),
            read: Position {
                segment: 0,
                offset: 0,
            },
            writer: None,
            pending_events: 0,
            pending_bytes: 0,
            dropped: 0,
            skipped_corrupt: 0,
        };
        spool.read = spool.load_cursor();
        // Segments before the cursor were delivered before a crash: remove them.
        while spool
            .segments
            .front()
            .is_some_and(|id| *id < spool.read.segment)
        {
            let id = spool.segments.pop_front().unwrap_or_default();
            let _ = fs::remove_file(spool.path(id));
        }
        match spool.segments.front() {
            Some(&first) if first > spool.read.segment => {
                spool.read = Position {
                    segment: first,
                    offset: 0,
                }
            }
            None => {}
            _ => {}
        }
        spool.repair_tail()?;
        spool.count_pending()?;
        if spool.pending_events > 0 {
            tracing::info!(
                dir = %dir.display(), events = spool.pending_events, bytes = spool.pending_bytes,
                "governance spool holds undelivered events from an earlier run; delivering them first"
            );
        }
        Ok(spool)
    }

    fn path(&self, id: u64) -> PathBuf {
        self.dir.join(segment_name(id))
    }

    fn load_cursor(&self) -> Position {
        let first = Position {
            segment: self.segments.front().copied().unwrap_or(1),
            offset: 0,
        };
        let text = match fs::read_to_string(self.dir.join("cursor")) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return first,
            Err(e) => {
                tracing::warn!(dir = %self.dir.display(), error = %e, "cannot read the spool cursor; redelivering from the oldest segment");
                return first;
            }
        };
        let mut parts = text.split_whitespace().map(str::parse::<u64>);
        match (parts.next(), parts.next()) {
            (Some(Ok(segment)), Some(Ok(offset))) => Position { segment, offset },
            _ => {
                tracing::warn!(dir = %self.dir.display(), cursor = %text.trim(), "corrupt spool cursor; redelivering from the oldest segment");
                first
            }
        }
    }

    fn store_cursor(&self) -> io::Result<()> {
        let tmp = self.dir.join("cursor.tmp");
        let mut f = super::private::options()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)?;
        writeln!(f, "{} {}", self.read.segment, self.read.offset)?;
        f.sync_all()?;
        fs::rename(&tmp, self.dir.join("cursor"))?;
        File::open(&self.dir)?.sync_all()
    }

    /// Cuts a partial last line (a crash in the middle of an append) off the newest segment.
    fn repair_tail(&mut self) -> io::Result<()> {
        let Some(&last) = self.segments.back() else {
            return Ok(());
        };
        let path = self.path(last);
        let mut f = OpenOptions::new().read(true).write(true).open(&path)?;
        let len = f.metadata()?.len();
        if len == 0 {
            return Ok(());
        }
        // Find the last newline, reading backwards in blocks.
        let mut end = len;
        let mut keep = 0u64;
        let mut block = vec![0u8; 64 * 1024];
        'scan: while end > 0 {
            let start = end.saturating_sub(block.len() as u64);
            let n = (end - start) as usize;
            f.seek(SeekFrom::Start(start))?;
            f.read_exact(&mut block[..n])?;
            if let Some(i) = block[..n].iter().rposition(|b| *b == b'\n') {
                keep = start + i as u64 + 1;
                break 'scan;
            }
            end = start;
        }
        if keep < len {
            tracing::warn!(
                segment = %path.display(), bytes = len - keep,
                "discarding a partial event at the end of the spool (the agent stopped in the middle of writing it)"
            );
            f.set_len(keep)?;
            f.sync_all()?;
        }
        Ok(())
    }

    fn count_pending(&mut self) -> io::Result<()> {
        let (mut events, mut bytes) = (0u64, 0u64);
        for &id in &self.segments {
            if id < self.read.segment {
                continue;
            }
            let f = File::open(self.path(id))?;
            let len = f.metadata()?.len();
            let mut reader = BufReader::new(f);
            if id == self.read.segment {
                if self.read.offset > len {
                    tracing::warn!(
                        segment = id,
                        offset = self.read.offset,
                        len,
                        "spool cursor past the end of its segment; resuming at the end"
                    );
                    self.read.offset = len;
                }
                reader.seek(SeekFrom::Start(self.read.offset))?;
                bytes += len - self.read.offset;
            } else {
                bytes += len;
            }
            let mut line = Vec::new();
            loop {
                line.clear();
                if reader.read_until(b'\n', &mut line)? == 0 {
                    break;
                }
                events += 1;
            }
        }
        self.pending_events = events;
        self.pending_bytes = bytes;
        Ok(())
    }

    /// Undelivered events.
    pub fn len(&self) -> u64 {
        self.pending_events
    }

    pub fn is_empty(&self) -> bool {
        self.pending_events == 0
    }

    /// Bytes of undelivered events.
    pub fn bytes(&self) -> u64 {
        self.pending_bytes
    }

    /// Events dropped because the spool was full, since it was opened.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Lines skipped because they were not JSON, since it was opened.
    pub fn skipped_corrupt(&self) -> u64 {
        self.skipped_corrupt
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn limits(&self) -> SpoolLimits {
        self.limits
    }

    /// Appends one event (its encoded body) and fsyncs it. When the spool is full the event
    /// is dropped, counted and logged at error level.
    pub fn append(&mut self, body: &[u8]) -> io::Result<Appended> {
        let appended = self.append_batch(&[body])?;
        Ok(appended[0])
    }

    /// Appends events in order with one write and one fsync for all of them (group commit:
    /// the events that arrived while the previous batch was being synced). When this
    /// returns `Ok`, every `Stored` event is on disk; events that would pass a limit are
    /// `Dropped`, counted and logged. An error means none of the batch was stored.
    pub fn append_batch(&mut self, bodies: &[&[u8]]) -> io::Result<Vec<Appended>> {
        let mut outcome = Vec::with_capacity(bodies.len());
        let mut lines = Vec::new();
        let (mut events, mut bytes) = (0u64, 0u64);
        for body in bodies {
            let size = body.len() as u64 + 1;
            if self.pending_events + events + 1 > self.limits.max_events
                || self.pending_bytes + bytes + size > self.limits.max_bytes
            {
                self.note_dropped();
                outcome.push(Appended::Dropped);
                continue;
            }
            lines.extend_from_slice(body);
            lines.push(b'\n');
            events += 1;
            bytes += size;
            outcome.push(Appended::Stored);
        }
        if events == 0 {
            return Ok(outcome);
        }
        // A batch goes whole into one segment: segments are cut between batches, so one
        // may pass `segment_bytes` by a batch.
        let (_, f, len) = self.writer_for_append()?;
        if let Err(e) = f.write_all(&lines).and_then(|()| f.sync_data()) {
            // Leave no partial line behind for the next event to be glued to.
            let _ = f.set_len(*len);
            return Err(ctx(
                e,
                format_args!(
                    "cannot write to the governance spool in {}",
                    self.dir.display()
                ),
            ));
        }
        *len += bytes;
        self.pending_events += events;
        self.pending_bytes += bytes;
        Ok(outcome)
    }

    fn note_dropped(&mut self) {
        self.dropped += 1;
        // Every drop is counted; the log says so on the first and then every 100th.
        if self.dropped == 1 || self.dropped.is_multiple_of(100) {
            tracing::error!(
                dir = %self.dir.display(), pending_events = self.pending_events, pending_bytes = self.pending_bytes,
                max_events = self.limits.max_events, max_bytes = self.limits.max_bytes, dropped_total = self.dropped,
                "GOVERNANCE SPOOL FULL: OpenBox Core has been unreachable long enough to fill the spool; \
                 governance events are being DROPPED (raise spool_max_bytes/spool_max_events or restore Core)"
            );
        }
    }

    /// The segment to append to: the current one, or a new one once it is full. A new
    /// segment's directory entry is fsync'd before anything is written to it, so an event
    /// whose append returned cannot vanish with its file after a crash.
    fn writer_for_append(&mut self) -> io::Result<&mut (u64, File, u64)> {
        let rotate = match &self.writer {
            Some((_, _, len)) => *len >= self.limits.segment_bytes,
            None => true,
        };
        if rotate {
            let id = match self.segments.back() {
                // Keep appending to an existing newest segment after a restart, unless full.
                Some(&last)
                    if self.writer.is_none()
                        && fs::metadata(self.path(last))?.len() < self.limits.segment_bytes =>
                {
                    last
                }
                Some(&last) => last + 1,
                None => self.read.segment.max(1),
            };
            let path = self.path(id);
            let f = super::private::options()
                .create(true)
                .append(true)
                .open(&path)
                .map_err(|e| {
                    ctx(
                        e,
                        format_args!("cannot open spool segment {}", path.display()),
                    )
                })?;
            let len = f.metadata()?.len();
            if self.segments.back() != Some(&id) {
                self.segments.push_back(id);
                File::open(&self.dir)?.sync_all()?;
            }
            if self.pending_events == 0 {
                self.read = Position {
                    segment: id,
                    offset: len,
                };
            }
            self.writer = Some((id, f, len));
        }
        Ok(self.writer.as_mut().expect("writer set above"))
    }

    /// The oldest undelivered event, or `None` when there is none. Lines that are not JSON
    /// are skipped (with a warning) on the way.
    pub fn peek(&mut self) -> io::Result<Option<Spooled>> {
        loop {
            if self.pending_events == 0 {
                return Ok(None);
            }
            let path = self.path(self.read.segment);
            let mut line = Vec::new();
            match File::open(&path) {
                Ok(f) => {
                    let mut reader = BufReader::new(f);
                    reader.seek(SeekFrom::Start(self.read.offset))?;
                    reader.read_until(b'\n', &mut line)?;
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(ctx(
                        e,
                        format_args!("cannot read spool segment {}", path.display()),
                    ))
                }
            }
            if line.is_empty() {
                // End of this segment: go on to the next one, if any.
                let Some(next) = self
                    .segments
                    .iter()
                    .copied()
                    .find(|id| *id > self.read.segment)
                else {
                    tracing::warn!(dir = %self.dir.display(), "spool counters said events were pending but none were found");
                    self.pending_events = 0;
                    self.pending_bytes = 0;
                    return Ok(None);
                };
                self.read = Position {
                    segment: next,
                    offset: 0,
                };
                self.store_cursor()?;
                self.drop_delivered_segments();
                continue;
            }
            let size = line.len() as u64;
            let next = Position {
                segment: self.read.segment,
                offset: self.read.offset + size,
            };
            if line.last() != Some(&b'\n') {
                // Only the newest segment can end without a newline, and open() cut that.
                return Ok(None);
            }
            line.pop();
            if serde_json::from_slice::<serde::de::IgnoredAny>(&line).is_err() {
                tracing::warn!(
                    segment = %path.display(), offset = self.read.offset, bytes = size,
                    "skipping a spooled governance event that is not valid JSON"
                );
                self.skipped_corrupt += 1;
                self.advance(next, size)?;
                continue;
            }
            return Ok(Some(Spooled {
                body: line,
                at: self.read,
                next,
            }));
        }
    }

    /// Marks `event` (the one [`Spool::peek`] returned) delivered: the cursor moves past it
    /// and is made durable before this returns.
    pub fn ack(&mut self, event: &Spooled) -> io::Result<()> {
        if event.at != self.read {
            return Ok(()); // already acknowledged
        }
        self.advance(event.next, event.next.offset - event.at.offset)
    }

    fn advance(&mut self, next: Position, size: u64) -> io::Result<()> {
        self.read = next;
        self.pending_events = self.pending_events.saturating_sub(1);
        self.pending_bytes = self.pending_bytes.saturating_sub(size);
        if self.pending_events == 0 {
            // Empty: start the next event in a fresh segment and delete all old ones.
            let next_id = self.segments.back().copied().unwrap_or(self.read.segment) + 1;
            self.writer = None;
            self.read = Position {
                segment: next_id,
                offset: 0,
            };
            self.store_cursor()?;
            self.drop_delivered_segments();
            return Ok(());
        }
        self.store_cursor()
    }

    fn drop_delivered_segments(&mut self) {
        while self
            .segments
            .front()
            .is_some_and(|id| *id < self.read.segment)
        {
            let id = self.segments.pop_front().unwrap_or_default();
            if let Err(e) = fs::remove_file(self.path(id)) {
                tracing::warn!(segment = %self.path(id).display(), error = %e, "cannot remove a delivered spool segment");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::governance::testutil::TempDir;

    fn limits(events: u64, bytes: u64) -> SpoolLimits {
        SpoolLimits {
            max_bytes: bytes,
            max_events: events,
            segment_bytes: 64,
        }
    }

    fn ev(n: u32) -> Vec<u8> {
        format!(r#"{{"event_type":"WorkflowStarted","n":{n}}}"#).into_bytes()
    }

    fn drain(s: &mut Spool) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        while let Some(e) = s.peek().unwrap() {
            out.push(e.body.clone());
            s.ack(&e).unwrap();
        }
        out
    }

    fn segments(dir: &Path) -> usize {
        fs::read_dir(dir)
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .starts_with("seg-")
            })
            .count()
    }

    #[test]
    fn the_spool_directory_and_every_file_in_it_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = TempDir::new("spool-modes");
        let spool_dir = dir.path().join("spool");
        // SAFETY: umask only changes this process's file creation mask.
        let old = unsafe { libc::umask(0o022) };
        let mut s = Spool::open(&spool_dir, limits(100, 1 << 20)).unwrap();
        for n in 0..5 {
            s.append(&ev(n)).unwrap();
        }
        let e = s.peek().unwrap().unwrap();
        s.ack(&e).unwrap();
        unsafe { libc::umask(old) };
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&spool_dir), 0o700);
        let mut files = 0;
        for entry in fs::read_dir(&spool_dir).unwrap().flatten() {
            assert_eq!(mode(&entry.path()), 0o600, "{}", entry.path().display());
            files += 1;
        }
        assert!(files >= 3, "lock, cursor and segments: {files}");
    }

    #[test]
    fn events_come_out_in_order_and_delivered_segments_are_removed() {
        let dir = TempDir::new("spool-order");
        let mut s = Spool::open(dir.path(), limits(100, 1 << 20)).unwrap();
        for n in 0..10 {
            assert_eq!(s.append(&ev(n)).unwrap(), Appended::Stored);
        }
        assert_eq!(s.len(), 10);
        assert!(segments(dir.path()) > 1, "64-byte segments rotate");
        // peek without ack gives the same event again.
        assert_eq!(s.peek().unwrap().unwrap().body, ev(0));
        assert_eq!(s.peek().unwrap().unwrap().body, ev(0));
        assert_eq!(drain(&mut s), (0..10).map(ev).collect::<Vec<_>>());
        assert!(s.is_empty());
        assert_eq!(s.bytes(), 0);
        assert_eq!(segments(dir.path()), 0);
        s.append(&ev(99)).unwrap();
        assert_eq!(drain(&mut s), vec![ev(99)]);
    }

    #[test]
    fn a_reopened_spool_continues_after_the_last_acknowledged_event() {
        let dir = TempDir::new("spool-restart");
        {
            let mut s = Spool::open(dir.path(), limits(100, 1 << 20)).unwrap();
            for n in 0..6 {
                s.append(&ev(n)).unwrap();
            }
            for _ in 0..4 {
                let e = s.peek().unwrap().unwrap();
                s.ack(&e).unwrap();
            }
            // Peeked but not acknowledged: must come again after restart.
            s.peek().unwrap().unwrap();
        }
        let mut s = Spool::open(dir.path(), limits(100, 1 << 20)).unwrap();
        assert_eq!(s.len(), 2);
        assert_eq!(s.bytes(), (ev(4).len() + ev(5).len() + 2) as u64);
        s.append(&ev(6)).unwrap();
        drop(s);
        let mut s = Spool::open(dir.path(), limits(100, 1 << 20)).unwrap();
        assert_eq!(drain(&mut s), vec![ev(4), ev(5), ev(6)]);
        drop(s);
        let mut s = Spool::open(dir.path(), limits(100, 1 << 20)).unwrap();
        assert!(s.is_empty());
        assert_eq!(s.peek().unwrap(), None);
    }

    #[test]
    fn a_full_spool_drops_and_counts_new_events() {
        let dir = TempDir::new("spool-full");
        let mut s = Spool::open(dir.path(), limits(3, 1 << 20)).unwrap();
        for n in 0..3 {
            assert_eq!(s.append(&ev(n)).unwrap(), Appended::Stored);
        }
        assert_eq!(s.append(&ev(3)).unwrap(), Appended::Dropped);
        assert_eq!(s.append(&ev(4)).unwrap(), Appended::Dropped);
        assert_eq!(s.dropped(), 2);
        assert_eq!(s.len(), 3);
        let e = s.peek().unwrap().unwrap();
        s.ack(&e).unwrap();
        assert_eq!(s.append(&ev(5)).unwrap(), Appended::Stored);
        assert_eq!(drain(&mut s), vec![ev(1), ev(2), ev(5)]);

        let dir = TempDir::new("spool-full-bytes");
        let one = ev(0).len() as u64 + 1;
        let mut s = Spool::open(dir.path(), limits(100, 2 * one)).unwrap();
        assert_eq!(s.append(&ev(0)).unwrap(), Appended::Stored);
        assert_eq!(s.append(&ev(1)).unwrap(), Appended::Stored);
        assert_eq!(s.append(&ev(2)).unwrap(), Appended::Dropped);
        assert_eq!(s.dropped(), 1);
    }

    #[test]
    fn a_batch_is_stored_in_order_up_to_the_limits_and_survives_a_reopen() {
        let dir = TempDir::new("spool-batch");
        {
            let mut s = Spool::open(dir.path(), limits(4, 1 << 20)).unwrap();
            s.append(&ev(0)).unwrap();
            let batch: Vec<Vec<u8>> = (1..6).map(ev).collect();
            let refs: Vec<&[u8]> = batch.iter().map(Vec::as_slice).collect();
            assert_eq!(
                s.append_batch(&refs).unwrap(),
                [
                    Appended::Stored,
                    Appended::Stored,
                    Appended::Stored,
                    Appended::Dropped,
                    Appended::Dropped
                ]
            );
            assert_eq!((s.len(), s.dropped()), (4, 2));
            assert_eq!(s.append_batch(&[]).unwrap(), []);
        }
        let mut s = Spool::open(dir.path(), limits(4, 1 << 20)).unwrap();
        assert_eq!(drain(&mut s), (0..4).map(ev).collect::<Vec<_>>());
    }

    #[test]
    fn a_partial_line_left_by_a_crash_is_cut_with_a_warning() {
        let dir = TempDir::new("spool-tail");
        {
            let mut s = Spool::open(dir.path(), limits(100, 1 << 20)).unwrap();
            s.append(&ev(0)).unwrap();
            s.append(&ev(1)).unwrap();
        }
        let last = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with("seg-"))
            .max()
            .unwrap();
        OpenOptions::new()
            .append(true)
            .open(&last)
            .unwrap()
            .write_all(br#"{"event_type":"Workfl"#)
            .unwrap();
        let mut s = Spool::open(dir.path(), limits(100, 1 << 20)).unwrap();
        assert_eq!(s.len(), 2);
        s.append(&ev(2)).unwrap();
        assert_eq!(drain(&mut s), vec![ev(0), ev(1), ev(2)]);
    }

    #[test]
    fn a_line_that_is_not_json_is_skipped() {
        let dir = TempDir::new("spool-corrupt");
        let mut s = Spool::open(dir.path(), SpoolLimits::new(1 << 20, 100)).unwrap();
        s.append(&ev(0)).unwrap();
        s.append(b"\x00\x01garbage").unwrap();
        s.append(&ev(2)).unwrap();
        assert_eq!(drain(&mut s), vec![ev(0), ev(2)]);
        assert_eq!(s.skipped_corrupt(), 1);
        assert!(s.is_empty());
    }

    #[test]
    fn a_corrupt_cursor_means_redelivery_from_the_oldest_segment_not_loss() {
        let dir = TempDir::new("spool-cursor");
        {
            let mut s = Spool::open(dir.path(), SpoolLimits::new(1 << 20, 100)).unwrap();
            for n in 0..3 {
                s.append(&ev(n)).unwrap();
            }
            let e = s.peek().unwrap().unwrap();
            s.ack(&e).unwrap();
        }
        fs::write(dir.path().join("cursor"), "garbage").unwrap();
        let mut s = Spool::open(dir.path(), SpoolLimits::new(1 << 20, 100)).unwrap();
        assert_eq!(drain(&mut s), vec![ev(0), ev(1), ev(2)]);
    }

    #[test]
    fn two_agents_cannot_share_a_spool_directory() {
        let dir = TempDir::new("spool-lock");
        let _first = Spool::open(dir.path(), SpoolLimits::new(1 << 20, 100)).unwrap();
        let err = Spool::open(dir.path(), SpoolLimits::new(1 << 20, 100))
            .err()
            .unwrap();
        assert!(
            err.to_string().contains("in use by another openbox-agent"),
            "{err}"
        );
    }

    #[test]
    fn an_uncreatable_spool_directory_is_an_error_saying_what_to_set() {
        let err = Spool::open(Path::new("/proc/obx-spool"), SpoolLimits::new(1 << 20, 100))
            .err()
            .unwrap();
        assert!(
            err.to_string()
                .contains("set spool_dir to a writable directory"),
            "{err}"
        );
    }
}
