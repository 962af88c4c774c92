//! The hook socket: a Unix stream socket the worker hooks talk to, one JSON object per
//! line each way. Replies carry the request's `id` and may come in any order.
//!
//! This module only moves lines: it reads the peer's credentials once (SO_PEERCRED,
//! so a process can only ever speak for itself), frames requests, and hands them to the
//! daemon's loop with a way to answer. What a request may do is decided there.
//!
//! The node is shared, so no peer may grow the agent or starve other workers: replies
//! wait in a bounded queue per connection (a peer that does not read them is dropped),
//! each uid holds a bounded number of connections, and a connection that has not said
//! `hello` in time is closed.

use std::{
    collections::HashMap,
    os::unix::fs::PermissionsExt,
    path::Path,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::{
    net::{UnixListener, UnixStream},
    sync::mpsc::{self, error::TrySendError},
};
use tokio_util::{
    codec::{AnyDelimiterCodec, AnyDelimiterCodecError, FramedRead, FramedWrite},
    sync::CancellationToken,
};

use super::protocol::{self, Answer, BadRequest, Reply, Request};
use crate::conn::Pid;

/// Longest request line accepted (activity inputs can be large).
pub const MAX_LINE: usize = 16 << 20;

/// Default socket path; `--socket` or `OPENBOX_AGENT_SOCKET` override it.
pub const DEFAULT_SOCKET: &str = "/run/openbox/agent.sock";

/// Replies waiting to be written on one connection. A reading peer keeps this near
/// empty; it fills only when the peer stops reading (after the socket's own buffer), and
/// the peer is then dropped. Large enough for a burst of governance answers on an event
/// loop running many activities at once.
pub const REPLY_QUEUE: usize = 1024;

/// Requests read but not yet handled by the daemon, all connections together. A reader
/// waits when it is full, so a flooding peer slows its own reads, not the daemon.
pub const REQUEST_QUEUE: usize = 4096;

/// Default for `--max-connections-per-uid`: a worker holds one connection per event loop
/// plus one, so this is far above any real worker's needs.
pub const DEFAULT_MAX_CONNECTIONS_PER_UID: usize = 256;

/// A connection that has not had a `hello` accepted within this is closed.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// Limits on what one peer may hold.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_connections_per_uid: usize,
    pub hello_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_connections_per_uid: DEFAULT_MAX_CONNECTIONS_PER_UID,
            hello_timeout: HELLO_TIMEOUT,
        }
    }
}

static CONNECTIONS_ACCEPTED: AtomicU64 = AtomicU64::new(0);
static PEERS_DROPPED: AtomicU64 = AtomicU64::new(0);
static CONNECTIONS_REFUSED: AtomicU64 = AtomicU64::new(0);
static CLOSED_WITHOUT_HELLO: AtomicU64 = AtomicU64::new(0);

/// What the socket accepted, refused or cut, for the daemon's summary and `/metrics`.
#[derive(Clone, Copy, Debug, Default)]
pub struct SocketStats {
    pub connections_accepted: u64,
    pub peers_dropped: u64,
    pub connections_refused: u64,
    pub closed_without_hello: u64,
}

pub fn stats() -> SocketStats {
    SocketStats {
        connections_accepted: CONNECTIONS_ACCEPTED.load(Ordering::Relaxed),
        peers_dropped: PEERS_DROPPED.load(Ordering::Relaxed),
        connections_refused: CONNECTIONS_REFUSED.load(Ordering::Relaxed),
        closed_without_hello: CLOSED_WITHOUT_HELLO.load(Ordering::Relaxed),
    }
}

/// At most one log line per second per uid: a peer that trips a limit in a loop must
/// not flood the agent's log.
fn log_allowed(uid: u32) -> bool {
    static LAST: Mutex<Option<HashMap<u32, Instant>>> = Mutex::new(None);
    let mut last = LAST.lock().unwrap_or_else(|e| e.into_inner());
    let last = last.get_or_insert_with(HashMap::new);
    let now = Instant::now();
    match last.get(&uid) {
        Some(t) if now.duration_since(*t) < Duration::from_secs(1) => false,
        _ => {
            if last.len() > 4096 {
                last.retain(|_, t| now.duration_since(*t) < Duration::from_secs(1));
            }
            last.insert(uid, now);
            true
        }
    }
}

/// Where a reply goes: the writer of the connection the request came on.
#[derive(Debug, Clone)]
pub struct ReplyTx {
    tx: mpsc::Sender<Reply>,
    peer: Arc<PeerCtl>,
}

#[derive(Debug)]
struct PeerCtl {
    uid: u32,
    pid: Pid,
    /// Cancelled when the peer's reply queue overflowed: the connection is closed.
    dropped: CancellationToken,
    /// Cancelled when a `hello` on this connection was accepted: no more hello timeout.
    welcomed: CancellationToken,
}

impl ReplyTx {
    /// Queues a reply without ever waiting: the daemon's loop calls this. A peer whose
    /// queue is full has stopped reading; it is dropped rather than buffered for.
    pub fn send(&self, reply: Reply) {
        match self.tx.try_send(reply) {
            Ok(()) | Err(TrySendError::Closed(_)) => {}
            Err(TrySendError::Full(_)) => {
                if !self.peer.dropped.is_cancelled() {
                    self.peer.dropped.cancel();
                    PEERS_DROPPED.fetch_add(1, Ordering::Relaxed);
                    if log_allowed(self.peer.uid) {
                        tracing::warn!(
                            pid = self.peer.pid,
                            uid = self.peer.uid,
                            "dropped a hook connection: its peer left {REPLY_QUEUE} replies unread"
                        );
                    }
                }
            }
        }
    }

    /// The connection's `hello` was accepted: it is a worker's, and may stay idle.
    pub fn welcomed(&self) {
        self.peer.welcomed.cancel();
    }
}

#[derive(Debug)]
pub enum HookMsg {
    Request {
        conn: u64,
        /// Host pid of the peer, from the kernel (SO_PEERCRED), never from the peer.
        peer: Pid,
        /// The request's `id`, echoed in its reply.
        id: Value,
        /// Boxed: a request is large beside `Closed`, and moves through a channel.
        req: Box<Result<Request, BadRequest>>,
        reply: ReplyTx,
    },
    Closed {
        conn: u64,
    },
}

/// Sends `{"id": id, "ok": true, ...answer}` or an error reply.
pub fn reply(tx: &ReplyTx, id: &Value, result: Result<Answer, String>) {
    tx.send(Reply::new(id.clone(), result));
}

/// Newline-framed lines of at most [`MAX_LINE`] bytes. Bytes rather than text: a line
/// that is not UTF-8 is a malformed request (answered, the connection goes on), not a
/// broken stream.
fn codec() -> AnyDelimiterCodec {
    AnyDelimiterCodec::new_with_max_length(b"\n".to_vec(), b"\n".to_vec(), MAX_LINE)
}

/// Binds the socket: creates its directory, replaces a stale socket file, refuses to
/// take over from a live agent. The socket is 0660 and a directory the agent creates
/// 0750, both of group `group` (default: the agent's own group), so only that group's
/// workers reach it; who they are is read from the kernel on every connection.
pub async fn bind(path: &Path, group: Option<u32>) -> Result<UnixListener> {
    // SAFETY: getegid(2) cannot fail.
    let gid = group.unwrap_or_else(|| unsafe { libc::getegid() });
    if let Some(dir) = path.parent() {
        // Only a directory of our own making (or the default one) is restricted: a
        // --socket in a shared directory such as /tmp must not change that directory.
        let ours = dir == Path::new(DEFAULT_SOCKET).parent().unwrap_or(dir);
        if !dir.as_os_str().is_empty() && !dir.exists() {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("creating the socket directory {}", dir.display()))?;
            restrict(dir, 0o750, gid)?;
        } else if ours && dir.is_dir() {
            restrict(dir, 0o750, gid)?;
        }
    }
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        use std::os::unix::fs::FileTypeExt;
        if !meta.file_type().is_socket() {
            bail!(
                "{} exists and is not a socket: remove it or choose another path with --socket",
                path.display()
            );
        }
        if UnixStream::connect(path).await.is_ok() {
            bail!(
                "another openbox-agent is already serving {}: stop it, or use --socket for a second one",
                path.display()
            );
        }
        std::fs::remove_file(path)
            .with_context(|| format!("removing the stale socket {}", path.display()))?;
    }
    let listener = UnixListener::bind(path)
        .with_context(|| format!("listening on the hook socket {}", path.display()))?;
    restrict(path, 0o660, gid)?;
    Ok(listener)
}

fn restrict(path: &Path, mode: u32, gid: u32) -> Result<()> {
    std::os::unix::fs::chown(path, None, Some(gid)).with_context(|| {
        format!(
            "giving {} to group {gid} (check --socket-group; changing the group needs root or CAP_CHOWN)",
            path.display()
        )
    })?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("setting mode {mode:o} on {}", path.display()))
}

/// `--socket-group`: a group name or a numeric gid.
pub fn parse_group(group: &str) -> Result<u32> {
    if let Ok(gid) = group.parse::<u32>() {
        return Ok(gid);
    }
    let name = std::ffi::CString::new(group)
        .with_context(|| format!("--socket-group {group:?}: not a group name"))?;
    // SAFETY: getgrnam(3) with a NUL-terminated name; the result is read at once, before
    // any other call could reuse its static buffer.
    let entry = unsafe { libc::getgrnam(name.as_ptr()) };
    if entry.is_null() {
        bail!(
            "--socket-group {group}: no such group (give a name from /etc/group or a numeric gid)"
        );
    }
    // SAFETY: non-null, points to a valid group entry.
    Ok(unsafe { (*entry).gr_gid })
}

/// Connections held per uid; a [`UidSlot`] gives its place back when dropped.
type UidCounts = Arc<Mutex<HashMap<u32, usize>>>;

struct UidSlot {
    uid: u32,
    counts: UidCounts,
}

impl Drop for UidSlot {
    fn drop(&mut self) {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = counts.get_mut(&self.uid) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&self.uid);
            }
        }
    }
}

/// Takes a connection slot for `uid`, or `None` when it holds its limit already.
fn take_slot(counts: &UidCounts, uid: u32, max: usize) -> Option<UidSlot> {
    let mut c = counts.lock().unwrap_or_else(|e| e.into_inner());
    let n = c.entry(uid).or_insert(0);
    if *n >= max {
        return None;
    }
    *n += 1;
    Some(UidSlot {
        uid,
        counts: counts.clone(),
    })
}

/// Accepts hook connections until the listener fails.
pub async fn serve(listener: UnixListener, tx: mpsc::Sender<HookMsg>, limits: Limits) {
    let mut next_conn = 0u64;
    let counts = UidCounts::default();
    let me = std::process::id();
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::warn!("accepting a hook connection failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let (peer, uid) = match stream
            .peer_cred()
            .ok()
            .and_then(|c| Some((c.pid()?, c.uid())))
        {
            Some((pid, uid)) if pid > 0 => (pid as Pid, uid),
            _ => {
                tracing::warn!(
                    "refused a hook connection: the kernel did not say which process it is"
                );
                continue;
            }
        };
        // Root is capped too: only the agent itself is above the limit.
        let slot = if peer == me {
            None
        } else {
            match take_slot(&counts, uid, limits.max_connections_per_uid) {
                Some(slot) => Some(slot),
                None => {
                    CONNECTIONS_REFUSED.fetch_add(1, Ordering::Relaxed);
                    if log_allowed(uid) {
                        tracing::warn!(
                            pid = peer,
                            uid,
                            "refused a hook connection: uid {uid} already holds {} (raise --max-connections-per-uid if its workers need more)",
                            limits.max_connections_per_uid
                        );
                    }
                    continue;
                }
            }
        };
        next_conn += 1;
        CONNECTIONS_ACCEPTED.fetch_add(1, Ordering::Relaxed);
        let ctl = Arc::new(PeerCtl {
            uid,
            pid: peer,
            dropped: CancellationToken::new(),
            welcomed: CancellationToken::new(),
        });
        tokio::spawn(connection(
            next_conn,
            ctl,
            stream,
            tx.clone(),
            limits.hello_timeout,
            slot,
        ));
    }
}

async fn connection(
    conn: u64,
    ctl: Arc<PeerCtl>,
    stream: UnixStream,
    tx: mpsc::Sender<HookMsg>,
    hello_timeout: Duration,
    _slot: Option<UidSlot>,
) {
    let peer = ctl.pid;
    let (read, write) = stream.into_split();
    let (reply_tx, mut reply_rx) = mpsc::channel::<Reply>(REPLY_QUEUE);
    let reply_tx = ReplyTx {
        tx: reply_tx,
        peer: ctl.clone(),
    };
    let mut writer = tokio::spawn(async move {
        let mut lines = FramedWrite::new(write, codec());
        while let Some(reply) = reply_rx.recv().await {
            // A Reply holds only strings, numbers and JSON values: it always serializes.
            let line = serde_json::to_string(&reply).unwrap_or_default();
            if lines.send(line).await.is_err() {
                break;
            }
        }
    });
    let mut lines = FramedRead::new(read, codec());
    let hello_deadline = tokio::time::sleep(hello_timeout);
    tokio::pin!(hello_deadline);
    // Whether the hello deadline still applies. The branch's condition is checked only
    // when `select!` starts waiting, and a hello accepted meanwhile does not wake it: the
    // deadline may fire for a welcomed connection, which then only disarms it.
    let mut deadline_armed = true;
    let mut cut = false;
    loop {
        let line = tokio::select! {
            line = lines.next() => match line {
                Some(line) => line,
                None => break,
            },
            _ = ctl.dropped.cancelled() => {
                cut = true;
                break;
            }
            _ = &mut hello_deadline, if deadline_armed => {
                deadline_armed = false;
                if ctl.welcomed.is_cancelled() {
                    continue;
                }
                CLOSED_WITHOUT_HELLO.fetch_add(1, Ordering::Relaxed);
                if log_allowed(ctl.uid) {
                    tracing::info!(
                        pid = peer,
                        uid = ctl.uid,
                        "closed a hook connection that sent no accepted hello within {hello_timeout:?}"
                    );
                }
                cut = true;
                break;
            }
        };
        let line = match line {
            Ok(line) => line,
            Err(e) => {
                let why = match e {
                    AnyDelimiterCodecError::MaxChunkLengthExceeded => {
                        format!("request longer than {MAX_LINE} bytes")
                    }
                    AnyDelimiterCodecError::Io(e) => e.to_string(),
                };
                reply(&reply_tx, &Value::Null, Err(why));
                break;
            }
        };
        // An empty line is not a request, nor the end of the stream.
        if line.is_empty() {
            continue;
        }
        let (id, req) = protocol::parse(&line);
        let msg = HookMsg::Request {
            conn,
            peer,
            id,
            req: Box::new(req),
            reply: reply_tx.clone(),
        };
        if tx.send(msg).await.is_err() {
            break;
        }
    }
    let _ = tx.send(HookMsg::Closed { conn }).await;
    drop(reply_tx);
    if cut {
        writer.abort();
        return;
    }
    // Replies still due are written, unless the peer stops reading them meanwhile.
    tokio::select! {
        _ = &mut writer => {}
        _ = ctl.dropped.cancelled() => writer.abort(),
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

    use super::*;

    /// A connection served as the daemon serves it, and the requests it hands over.
    fn serve_pair() -> (UnixStream, mpsc::Receiver<HookMsg>) {
        serve_pair_within(HELLO_TIMEOUT)
    }

    fn serve_pair_within(hello_timeout: Duration) -> (UnixStream, mpsc::Receiver<HookMsg>) {
        let (client, server) = UnixStream::pair().unwrap();
        let (tx, rx) = mpsc::channel(REQUEST_QUEUE);
        let ctl = Arc::new(PeerCtl {
            uid: 0,
            pid: 1234,
            dropped: CancellationToken::new(),
            welcomed: CancellationToken::new(),
        });
        tokio::spawn(connection(1, ctl, server, tx, hello_timeout, None));
        (client, rx)
    }

    async fn next_line(r: &mut BufReader<tokio::net::unix::OwnedReadHalf>) -> Option<Value> {
        let mut line = String::new();
        match r.read_line(&mut line).await.unwrap() {
            0 => None,
            _ => Some(serde_json::from_str(&line).unwrap()),
        }
    }

    #[tokio::test]
    async fn malformed_lines_are_handed_on_as_errors_and_the_connection_goes_on() {
        let (client, mut rx) = serve_pair();
        let (read, mut write) = client.into_split();
        write
            .write_all(b"not json\n\n\xff\xfe\n{\"id\":4,\"op\":\"thread\",\"tid\":1,\"slot\":0}\n")
            .await
            .unwrap();
        let mut got = Vec::new();
        for _ in 0..3 {
            let Some(HookMsg::Request { id, req, reply, .. }) = rx.recv().await else {
                panic!("connection ended early")
            };
            reply.send(Reply::new(id.clone(), Ok(Answer::Accepted {})));
            got.push((id, *req));
        }
        assert!(got[0]
            .1
            .as_ref()
            .unwrap_err()
            .error
            .contains("one JSON object"));
        assert!(got[1].1.as_ref().unwrap_err().before_hello);
        assert_eq!(got[2].0, 4);
        assert_eq!(
            got[2].1,
            Ok(Request::Thread(protocol::Thread { tid: 1, slot: 0 }))
        );
        let mut r = BufReader::new(read);
        for want in [Value::Null, Value::Null, 4.into()] {
            let reply = next_line(&mut r).await.unwrap();
            assert_eq!(
                (reply["id"].clone(), reply["ok"].clone()),
                (want, true.into())
            );
        }
        drop(write);
        assert!(matches!(rx.recv().await, Some(HookMsg::Closed { conn: 1 })));
    }

    /// The deadline is armed when the connection waits for its next line; a hello
    /// accepted meanwhile must still count (a worker's connection waits idle for long).
    #[tokio::test]
    async fn a_welcomed_connection_outlives_the_hello_deadline_an_idle_one_does_not() {
        let timeout = Duration::from_millis(200);
        let (client, mut rx) = serve_pair_within(timeout);
        let (read, mut write) = client.into_split();
        write
            .write_all(b"{\"id\":1,\"op\":\"hello\"}\n")
            .await
            .unwrap();
        let Some(HookMsg::Request { reply, .. }) = rx.recv().await else {
            panic!("no request")
        };
        reply.welcomed();
        tokio::time::sleep(timeout * 2).await;
        write
            .write_all(b"{\"id\":2,\"op\":\"thread\",\"tid\":1,\"slot\":0}\n")
            .await
            .unwrap();
        let Some(HookMsg::Request { id, .. }) = rx.recv().await else {
            panic!("the welcomed connection was closed at the hello deadline")
        };
        assert_eq!(id, 2);
        drop((read, write));

        let (idle, mut rx) = serve_pair_within(timeout);
        tokio::time::sleep(timeout * 2).await;
        assert!(matches!(rx.recv().await, Some(HookMsg::Closed { conn: 1 })));
        drop(idle);
    }

    #[tokio::test]
    async fn an_over_long_line_is_answered_and_the_connection_closed() {
        let (client, mut rx) = serve_pair();
        let (read, mut write) = client.into_split();
        let writer = tokio::spawn(async move {
            let mut long = vec![b'x'; MAX_LINE + 2];
            long.push(b'\n');
            // The agent stops reading part-way: the write may fail, which is fine.
            let _ = write.write_all(&long).await;
            write
        });
        let mut r = BufReader::new(read);
        let reply = next_line(&mut r).await.unwrap();
        assert_eq!(reply["id"], Value::Null);
        assert_eq!(reply["ok"], false);
        assert!(
            reply["error"].as_str().unwrap().contains("longer than"),
            "{reply}"
        );
        assert!(
            next_line(&mut r).await.is_none(),
            "the connection is closed"
        );
        assert!(matches!(rx.recv().await, Some(HookMsg::Closed { conn: 1 })));
        drop(writer.await);
    }
}
