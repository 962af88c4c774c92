//! `openbox-agent trace`: watch one process tree and print what it does.

use std::{ffi::CString, io::Write, path::PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use base64::Engine;
use serde_json::json;
use tokio::io::unix::AsyncFd;

use crate::{
    capture::{clock::Clock, event, CaptureConfig, Counters},
    conn::{Pid, Record, SkipPaths},
    export::{otlp, CommandExport, OtlpConfig},
    pipeline::{self, Output, Session, Sink},
    procfs,
    span::{Span, SpanConfig},
};

#[derive(Debug, Clone)]
pub struct TraceOpts {
    pub json: bool,
    /// Print the capture records (connections, bytes, files) instead of spans.
    pub raw: bool,
    pub spans: SpanConfig,
    pub pid: Option<u32>,
    pub command: Vec<String>,
    pub capture: CaptureConfig,
    pub tls_libs: Vec<PathBuf>,
    pub skip: SkipPaths,
    /// Most payload bytes shown per data record in the readable output.
    pub show_bytes: usize,
    /// Also export the spans over OTLP, under a root span for the command.
    pub otlp: Option<OtlpConfig>,
}

/// What `trace` writes to: the printer, and the OTLP export when configured.
type Out = (Printer, Option<CommandExport>);

/// Starts `command` stopped, so it can be watched before its first instruction.
fn spawn_stopped(command: &[String]) -> Result<Pid> {
    let args: Vec<CString> = command
        .iter()
        .map(|a| CString::new(a.as_bytes()).map_err(|_| anyhow!("argument {a:?} holds a NUL byte")))
        .collect::<Result<_>>()?;
    let mut argv: Vec<*const libc::c_char> = args.iter().map(|a| a.as_ptr()).collect();
    argv.push(std::ptr::null());
    let msg = format!("openbox-agent: cannot execute {}: ", command[0]);
    // SAFETY: the child only calls async-signal-safe functions (raise, execvp, write,
    // _exit) on memory prepared before the fork.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        bail!("fork failed: {}", std::io::Error::last_os_error());
    }
    if pid == 0 {
        unsafe {
            libc::raise(libc::SIGSTOP);
            libc::execvp(argv[0], argv.as_ptr());
            let err = *libc::__errno_location();
            let text = libc::strerror(err);
            libc::write(2, msg.as_ptr() as *const libc::c_void, msg.len());
            libc::write(2, text as *const libc::c_void, libc::strlen(text));
            libc::write(2, b"\n".as_ptr() as *const libc::c_void, 1);
            libc::_exit(127);
        }
    }
    let mut status = 0;
    // SAFETY: waiting for our own child to stop.
    let r = unsafe { libc::waitpid(pid, &mut status, libc::WUNTRACED) };
    if r != pid || !libc::WIFSTOPPED(status) {
        bail!("the traced command did not start (wait status {status})");
    }
    Ok(pid as Pid)
}

fn wait_exit(pid: Pid) -> i32 {
    let mut status = 0;
    loop {
        // SAFETY: waiting for our own child.
        let r = unsafe { libc::waitpid(pid as i32, &mut status, 0) };
        if r == pid as i32 {
            if libc::WIFEXITED(status) {
                return libc::WEXITSTATUS(status);
            }
            if libc::WIFSIGNALED(status) {
                return 128 + libc::WTERMSIG(status);
            }
        } else if r < 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            return 1;
        }
    }
}

/// A pidfd becomes readable when the process exits (it need not be our child).
fn pidfd(pid: Pid) -> Result<AsyncFd<std::os::fd::OwnedFd>> {
    use std::os::fd::FromRawFd;
    // SAFETY: pidfd_open returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::c_int, 0) };
    if fd < 0 {
        bail!(
            "process {pid} not found ({})",
            std::io::Error::last_os_error()
        );
    }
    // SAFETY: the descriptor is ours, and the AsyncFd owns it.
    let owned = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) };
    unsafe { AsyncFd::register_with_interest(owned, tokio::io::Interest::READABLE) }
        .map_err(|e| anyhow!("polling process {pid}: {e}"))
}

/// The `trace` sink: spans (or, with `--raw`, capture records) on stdout, readable or
/// one JSON object per line.
struct Printer {
    json: bool,
    raw: bool,
    show_bytes: usize,
    out: std::io::BufWriter<std::io::Stdout>,
    /// One span's JSON line (`--json`), reused.
    line: Vec<u8>,
}

impl Sink for Printer {
    fn span(&mut self, span: Span) {
        if self.json {
            // Written by hand into a line buffer kept across spans (no allocation).
            self.line.clear();
            span.write_json(&mut self.line);
            self.line.push(b'\n');
            let _ = self.out.write_all(&self.line);
        } else {
            let _ = writeln!(self.out, "{}", span_text(&span, self.show_bytes));
        }
    }

    fn record(&mut self, r: &Record, clock: &Clock) {
        let line = if self.raw {
            if self.json {
                record_json(r, clock).map(|v| v.to_string())
            } else {
                record_text(r, clock, self.show_bytes)
            }
        } else if !self.json
            && matches!(
                r,
                Record::Exec { .. } | Record::Exit { .. } | Record::Fork { .. }
            )
        {
            // Process lifecycle stays visible in readable span output.
            record_text(r, clock, self.show_bytes)
        } else {
            None
        };
        if let Some(line) = line {
            let _ = writeln!(self.out, "{line}");
        }
    }

    fn flush(&mut self) {
        let _ = self.out.flush();
    }
}

/// The kernel's and the pipeline's counters, at the end of tracing: on stderr in span
/// JSON mode (stdout holds only spans), else after the output.
fn summary(session: &mut Session<Out>, otlp: Option<otlp::OtlpStats>) -> Counters {
    let c = session.counters();
    let st = session.stats();
    let mode = session.capture().mode().mode.as_str();
    let spans = session.spans_enabled();
    let io_uring = session.capture().io_uring().clone();
    let p = &mut session.sink_mut().0;
    if p.json && spans {
        let mut line = json!({
                "type": "summary", "capture_mode": mode, "events": c.events,
                "records_received": st.records_received,
                "ringbuf_drops": c.ringbuf_drops, "truncated_calls": c.truncated_calls,
                "truncated_bytes": c.truncated_bytes, "unparsed_records": st.unparsed_records,
                "unparsed_messages": st.unparsed_messages,
                "parser_losses": st.parser_losses,
                "unrecognised_connections": st.unrecognised_connections,
                "paused": c.paused, "resumed": st.resumed,
                "resume_failures": st.resume_failures,
                "resumed_at_start": st.resumed_at_start,
                "tls_watched_hits": c.tls_watched_hits,
                "tls_unwatched_hits": c.tls_unwatched_hits,
                "tls_probes": st.tls_probes,
                "io_uring_ops_not_captured": c.io_uring_ops,
                "io_uring_data_ops_not_captured": c.io_uring_data_ops,
                "io_uring": io_uring,
        });
        line["tls_links"] = json!(st.tls_links);
        line["ring_queue"] = json!(st.ring_queue);
        if let Some(o) = otlp {
            line["otlp"] = json!(o);
        }
        eprintln!("{line}");
    } else if p.json {
        let line = json!({
            "type": "summary",
            "capture_mode": mode,
            "events": c.events,
            "records_received": st.records_received,
            "ringbuf_drops": c.ringbuf_drops,
            "truncated_calls": c.truncated_calls,
            "truncated_bytes": c.truncated_bytes,
            "unwatched_hits": c.unwatched_hits,
            "watched_hits": c.watched_hits,
            "read_failures": c.read_failures,
            "scratch_failures": c.scratch_failures,
            "kernel_read_failures": c.kernel_read_failures,
            "pause_failures": c.pause_failures,
            "map_full": c.map_full,
            "captured_bytes": c.captured_bytes,
            "unparsed_records": st.unparsed_records,
            "paused": c.paused,
            "resumed": st.resumed,
            "resume_failures": st.resume_failures,
            "resumed_at_start": st.resumed_at_start,
            "tls_watched_hits": c.tls_watched_hits,
            "tls_unwatched_hits": c.tls_unwatched_hits,
            "tls_probes": st.tls_probes,
            "io_uring_ops_not_captured": c.io_uring_ops,
            "io_uring_data_ops_not_captured": c.io_uring_data_ops,
            "io_uring": io_uring,
            "ring_queue": st.ring_queue,
        });
        let _ = writeln!(p.out, "{line}");
        if let Some(o) = otlp {
            let _ = writeln!(p.out, "{}", json!({"type": "otlp", "otlp": o}));
        }
    } else {
        let _ = writeln!(
            p.out,
            "-- summary: {} events ({} received), {} payload bytes captured; lost: {} ring-buffer drops, {} map-full; {} calls truncated ({} bytes not captured); {} undecodable records; probe hits: {} watched, {} unwatched; capture mode: {mode}",
            c.events,
            st.records_received,
            c.captured_bytes,
            c.ringbuf_drops,
            c.map_full,
            c.truncated_calls,
            c.truncated_bytes,
            st.unparsed_records,
            c.watched_hits,
            c.unwatched_hits
        );
        if c.paused > 0 {
            let _ = writeln!(
                p.out,
                "-- {} processes paused while TLS probes attached, {} resumed",
                c.paused, st.resumed
            );
        }
        let t = st.tls_probes;
        if t.attached + t.not_attached > 0 {
            let _ = writeln!(
                p.out,
                "-- TLS probes: {} attached for watched processes ({} released), {} not attached; libssl calls probed: {} watched, {} unwatched",
                t.attached, t.released, t.not_attached, c.tls_watched_hits, c.tls_unwatched_hits
            );
        }
        if c.io_uring_ops > 0 {
            let _ = writeln!(
                p.out,
                "-- io_uring: {} requests submitted by watched processes were not captured ({} of them move bytes: read, write, send, recv)",
                c.io_uring_ops, c.io_uring_data_ops
            );
        } else if let Some(why) = &io_uring.reason {
            let _ = writeln!(p.out, "-- io_uring requests are not counted: {why}");
        }
        if st.resumed_at_start > 0 {
            let _ = writeln!(
                p.out,
                "-- {} processes an earlier agent left stopped were resumed at start",
                st.resumed_at_start
            );
        }
        if st.resume_failures > 0 {
            let _ = writeln!(
                p.out,
                "-- {} paused processes could not be resumed (see the errors above)",
                st.resume_failures
            );
        }
        if spans {
            let _ = writeln!(
                p.out,
                "-- protocols: {} messages not understood, {} connections of no known protocol",
                st.unparsed_messages, st.unrecognised_connections
            );
            for (protocol, reasons) in &st.parser_losses {
                let by: Vec<String> = reasons
                    .iter()
                    .map(|(why, n)| format!("{n} {why}"))
                    .collect();
                let _ = writeln!(p.out, "-- {protocol} messages lost: {}", by.join(", "));
            }
        }
        if let Some(o) = otlp {
            let _ = writeln!(
                p.out,
                "-- OTLP: {} spans exported, {} dropped ({} queue full, {} export failed)",
                o.spans_exported,
                o.spans_dropped(),
                o.spans_dropped_queue_full,
                o.spans_dropped_export_failed
            );
        }
    }
    p.flush();
    c
}

/// One readable line per span.
pub fn span_text(s: &Span, max: usize) -> String {
    let when = hms_epoch(s.start_time);
    let a = |k: &str| {
        s.attributes.get(k).map(|v| {
            v.as_str()
                .map(str::to_string)
                .unwrap_or_else(|| v.to_string())
        })
    };
    let ms = s.duration_ns.unwrap_or(0) as f64 / 1e6;
    let status = match (&s.status.code, &s.status.description) {
        (crate::protocol::StatusCode::Error, Some(d)) => format!(" ERROR: {d}"),
        (crate::protocol::StatusCode::Error, None) => " ERROR".to_string(),
        _ => String::new(),
    };
    let what = if let Some(url) = a("http.url") {
        let code = a("http.status_code").unwrap_or_else(|| "-".into());
        let mut w = format!("{} {url} → {code}", s.name);
        if let Some(b) = &s.request_body {
            w.push_str(&format!(" request_body=\"{}\"", escape(b.as_bytes(), max)));
        }
        if let Some(b) = &s.response_body {
            w.push_str(&format!(" response_body=\"{}\"", escape(b.as_bytes(), max)));
        }
        w
    } else if let Some(system) = a("db.system") {
        let mut w = format!("{system} {}", s.name);
        for k in ["db.name", "db.user", "db.mongodb.collection", "db.rowcount"] {
            if let Some(v) = a(k) {
                w.push_str(&format!(" {}={v}", k.trim_start_matches("db.")));
            }
        }
        if let Some(st) = a("db.statement") {
            w.push_str(&format!(" \"{}\"", escape(st.as_bytes(), max)));
        }
        w
    } else if let Some(path) = a("file.path") {
        match s.name.as_str() {
            "file.open" => format!(
                "file.open {path} ({}) read {} B, wrote {} B",
                a("file.mode").unwrap_or_default(),
                a("file.total_bytes_read").unwrap_or_default(),
                a("file.total_bytes_written").unwrap_or_default()
            ),
            _ => format!("  {} {} B", s.name, a("file.bytes").unwrap_or_default()),
        }
    } else {
        s.name.clone()
    };
    format!("{when} [{}] {} {what} ({ms:.3} ms){status}", s.pid, s.kind)
}

pub fn record_json(r: &Record, clock: &Clock) -> Option<serde_json::Value> {
    let s = |a: &Option<event::Addr>| a.as_ref().map(|a| a.to_string());
    Some(match r {
        Record::FileIo { .. } => return None,
        Record::Exec {
            ts,
            pid,
            path,
            comm,
        } => {
            json!({"type":"process","event":"exec","ts":clock.epoch_ns(*ts),"pid":pid,"path":path,"comm":comm})
        }
        Record::Fork { ts, pid, child } => {
            json!({"type":"process","event":"fork","ts":clock.epoch_ns(*ts),"pid":pid,"child":child})
        }
        Record::Exit { ts, pid, comm } => {
            json!({"type":"process","event":"exit","ts":clock.epoch_ns(*ts),"pid":pid,"comm":comm})
        }
        Record::Connect {
            ts,
            accept,
            pid,
            tid,
            fd,
            conn,
            peer,
            local,
            ..
        } => json!({
            "type": if *accept { "accept" } else { "connect" },
            "ts": clock.epoch_ns(*ts), "pid": pid, "tid": tid, "fd": fd, "conn": conn,
            "peer": s(peer), "local": s(local),
            "family": peer.as_ref().map(|p| p.family()).unwrap_or("unknown"),
        }),
        Record::Data {
            ts,
            pid,
            tid,
            fd,
            conn,
            peer,
            tls,
            direction,
            via,
            seq,
            truncated,
            data,
            attr,
            from_file,
            midstream,
        } => {
            let mut line = json!({
                "type": "data", "ts": clock.epoch_ns(*ts), "pid": pid, "tid": tid, "fd": fd, "conn": conn,
                "peer": s(peer), "tls": tls, "direction": direction, "via": via, "seq": seq, "len": data.len(),
                "truncated": truncated, "worker": attr.owner, "activity": attr.activity,
                "data_b64": base64::engine::general_purpose::STANDARD.encode(data),
            });
            if let Some(path) = from_file {
                line["from_file"] = path.as_str().into();
            }
            if *midstream {
                line["midstream"] = true.into();
            }
            line
        }
        Record::Close {
            ts,
            pid,
            fd,
            conn,
            peer,
            bytes_sent,
            bytes_received,
            tls,
        } => json!({
            "type": "close", "ts": clock.epoch_ns(*ts), "pid": pid, "fd": fd, "conn": conn, "peer": s(peer),
            "bytes_sent": bytes_sent, "bytes_received": bytes_received, "tls": tls,
        }),
        Record::FileOpen {
            ts,
            pid,
            fd,
            path,
            mode,
            ..
        } => json!({
            "type": "file", "event": "open", "ts": clock.epoch_ns(*ts), "pid": pid, "fd": fd, "path": path, "mode": mode,
        }),
        Record::FileClose {
            ts,
            pid,
            fd,
            path,
            mode,
            bytes_read,
            bytes_written,
            reads,
            writes,
        } => json!({
            "type": "file", "event": "close", "ts": clock.epoch_ns(*ts), "pid": pid, "fd": fd, "path": path, "mode": mode,
            "bytes_read": bytes_read, "bytes_written": bytes_written, "reads": reads, "writes": writes,
        }),
    })
}

fn escape(data: &[u8], max: usize) -> String {
    let mut s = String::new();
    for &b in data.iter().take(max) {
        match b {
            b'\r' => s.push_str("\\r"),
            b'\n' => s.push_str("\\n"),
            b'\t' => s.push_str("\\t"),
            b'"' => s.push_str("\\\""),
            b'\\' => s.push_str("\\\\"),
            0x20..=0x7e => s.push(b as char),
            _ => s.push_str(&format!("\\x{b:02x}")),
        }
    }
    if data.len() > max {
        s.push_str(&format!("… (+{} bytes)", data.len() - max));
    }
    s
}

fn hms(clock: &Clock, ts: u64) -> String {
    hms_epoch(clock.epoch_ns(ts))
}

/// HH:MM:SS.micro (UTC) of a Unix-epoch nanosecond time.
fn hms_epoch(ns: u64) -> String {
    let secs = ns / 1_000_000_000;
    format!(
        "{:02}:{:02}:{:02}.{:06}",
        (secs / 3600) % 24,
        (secs / 60) % 60,
        secs % 60,
        (ns % 1_000_000_000) / 1000
    )
}

pub fn record_text(r: &Record, clock: &Clock, max: usize) -> Option<String> {
    let opt = |a: &Option<event::Addr>| {
        a.as_ref()
            .map(|a| a.to_string())
            .unwrap_or_else(|| "?".into())
    };
    Some(match r {
        Record::FileIo { .. } => return None,
        Record::Exec { ts, pid, path, .. } => format!("{} [{pid}] exec {path}", hms(clock, *ts)),
        Record::Fork { ts, pid, child } => format!("{} [{pid}] fork → child {child}", hms(clock, *ts)),
        Record::Exit { ts, pid, comm } => format!("{} [{pid}] exit ({comm})", hms(clock, *ts)),
        Record::Connect { ts, accept, pid, fd, peer, local, .. } => format!(
            "{} [{pid}] {} fd {fd}: {} ↔ {}",
            hms(clock, *ts),
            if *accept { "accept" } else { "connect" },
            opt(local),
            opt(peer)
        ),
        Record::Data { ts, pid, fd, peer, tls, direction, data, truncated, .. } => format!(
            "{} [{pid}] {} fd {fd} {} {} {} bytes{}: \"{}\"",
            hms(clock, *ts),
            if *tls { "tls " } else { "sock" },
            if matches!(direction, crate::conn::Direction::Egress) { "→" } else { "←" },
            opt(peer),
            data.len(),
            if *truncated > 0 { format!(" (+{truncated} not captured)") } else { String::new() },
            escape(data, max)
        ),
        Record::Close { ts, pid, fd, peer, bytes_sent, bytes_received, tls, .. } => format!(
            "{} [{pid}] close fd {fd} {}{}: sent {bytes_sent} B, received {bytes_received} B",
            hms(clock, *ts),
            opt(peer),
            if *tls { " (TLS)" } else { "" }
        ),
        Record::FileOpen { ts, pid, fd, path, mode, .. } => {
            format!("{} [{pid}] open fd {fd} {path} ({mode})", hms(clock, *ts))
        }
        Record::FileClose { ts, pid, fd, path, mode, bytes_read, bytes_written, reads, writes } => format!(
            "{} [{pid}] close fd {fd} {path} ({mode}): read {bytes_read} B in {reads} calls, wrote {bytes_written} B in {writes} calls",
            hms(clock, *ts)
        ),
    })
}

pub async fn run(opts: TraceOpts) -> Result<i32> {
    if opts.pid.is_none() && opts.command.is_empty() {
        bail!("say what to trace: --pid PID, or -- COMMAND [ARGS...]");
    }
    let printer = Printer {
        json: opts.json,
        raw: opts.raw,
        show_bytes: opts.show_bytes,
        // Spans come in bursts of a whole drain (flushed at its end): a larger buffer
        // means fewer writes to the pipe.
        out: std::io::BufWriter::with_capacity(64 * 1024, std::io::stdout()),
        line: Vec::new(),
    };
    let output = if opts.raw {
        Output::Records
    } else {
        Output::Spans(opts.spans.clone())
    };
    // Records mode makes no spans: nothing to export.
    let (export, done) = match opts.otlp.as_ref().filter(|_| !opts.raw) {
        Some(cfg) => {
            let (exporter, done) = otlp::Exporter::start(cfg)?;
            let what = match opts.pid {
                Some(pid) => format!("pid {pid}"),
                None => opts.command.join(" "),
            };
            (Some(CommandExport::new(exporter, what)), Some(done))
        }
        None => (None, None),
    };
    let (mut session, mut ring) = pipeline::start(
        &opts.capture,
        &opts.tls_libs,
        opts.skip.clone(),
        output,
        (printer, export),
    )?;

    let (exit_tx, mut exit_rx) = tokio::sync::oneshot::channel::<i32>();
    let mut pid_watch = None;
    if let Some(pid) = opts.pid {
        let fd = pidfd(pid)?;
        session
            .watch(pid)
            .with_context(|| format!("watching process {pid}"))?;
        for child in procfs::descendants(pid) {
            let _ = session.watch(child);
        }
        tracing::info!(pid, "watching process {pid} and its children");
        if let Some(e) = session.sink_mut().1.as_mut() {
            e.set_pid(pid);
        }
        pid_watch = Some(fd);
        drop(exit_tx);
    } else {
        let pid = spawn_stopped(&opts.command)?;
        if let Some(e) = session.sink_mut().1.as_mut() {
            e.set_pid(pid);
        }
        if let Err(e) = session.watch_before_exec(pid) {
            // The command never ran: it must not stay stopped behind us.
            // SAFETY: killing and reaping our own stopped child.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            wait_exit(pid);
            return Err(e.context(format!("watching {}", opts.command[0])));
        }
        // SAFETY: resuming our stopped child.
        if unsafe { libc::kill(pid as i32, libc::SIGCONT) } != 0 {
            bail!(
                "could not start the traced command (process {pid}): {}",
                std::io::Error::last_os_error()
            );
        }
        std::thread::spawn(move || {
            let _ = exit_tx.send(wait_exit(pid));
        });
    }

    let mut sigint = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    // A closed terminal ends the agent like Ctrl-C: through the exit path that resumes
    // paused processes (the default action would kill it on the spot).
    let mut sighup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    let pid_exit = async {
        match &pid_watch {
            Some(fd) => {
                let _ = fd.readable().await;
            }
            None => std::future::pending::<()>().await,
        }
    };
    tokio::pin!(pid_exit);
    let code = loop {
        tokio::select! {
            ready = ring.ready() => {
                ready?;
                ring.drain(&mut session);
            }
            code = &mut exit_rx, if opts.pid.is_none() => break code.unwrap_or(1),
            _ = &mut pid_exit => break 0,
            _ = sigint.recv() => break 130,
            _ = sigterm.recv() => break 143,
            _ = sighup.recv() => break 129,
        }
    };
    // Everything the traced processes did is already in the ring: drain it.
    ring.drain_all(&mut session);
    session.finish();
    let code = if opts.pid.is_some() { 0 } else { code };
    let otlp = match (session.sink_mut().1.take(), done) {
        (Some(mut export), Some(done)) => {
            export.end(opts.pid.is_none().then_some(code));
            drop(export);
            Some(done.finish().await)
        }
        _ => None,
    };
    summary(&mut session, otlp);
    session.capture_mut().hand_off_detach();
    Ok(code)
}
