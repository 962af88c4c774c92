//! The hook socket: a Unix stream socket the worker hooks talk to, one JSON object per
//! line each way. Replies carry the request's `id` and may come in any order.
//!
//! This module only moves lines: it reads the peer's credentials once (SO_PEERCRED,
//! so a process can only ever speak for itself), frames requests, and hands them to the
//! daemon's loop with a way to answer. What a request may do is decided there.

use std::{
    os::unix::fs::PermissionsExt,
    path::Path,
    sync::atomic::{AtomicU64, Ordering},
};

use anyhow::{bail, Context, Result};
use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::{
    net::{UnixListener, UnixStream},
    sync::mpsc,
};
use tokio_util::codec::{AnyDelimiterCodec, AnyDelimiterCodecError, FramedRead, FramedWrite};

use super::protocol::{self, Answer, BadRequest, Reply, Request};
use crate::conn::Pid;

/// Longest request line accepted (activity inputs can be large).
pub const MAX_LINE: usize = 16 << 20;

/// Default socket path; `--socket` or `OPENBOX_AGENT_SOCKET` override it.
pub const DEFAULT_SOCKET: &str = "/run/openbox/agent.sock";

static CONNECTIONS_ACCEPTED: AtomicU64 = AtomicU64::new(0);

/// Hook connections accepted since the start (for the summary and `/metrics`).
pub fn connections_accepted() -> u64 {
    CONNECTIONS_ACCEPTED.load(Ordering::Relaxed)
}

/// Where a reply goes: the writer of the connection the request came on.
pub type ReplyTx = mpsc::UnboundedSender<Reply>;

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
    let _ = tx.send(Reply::new(id.clone(), result));
}

/// Newline-framed lines of at most [`MAX_LINE`] bytes. Bytes rather than text: a line
/// that is not UTF-8 is a malformed request (answered, the connection goes on), not a
/// broken stream.
fn codec() -> AnyDelimiterCodec {
    AnyDelimiterCodec::new_with_max_length(b"\n".to_vec(), b"\n".to_vec(), MAX_LINE)
}

/// Binds the socket: creates its directory, replaces a stale socket file, refuses to
/// take over from a live agent, and lets any local user connect (who they are is read
/// from the kernel on every connection).
pub async fn bind(path: &Path) -> Result<UnixListener> {
    if let Some(dir) = path.parent() {
        if !dir.as_os_str().is_empty() && !dir.exists() {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("creating the socket directory {}", dir.display()))?;
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
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))
        .with_context(|| format!("making {} reachable by workers", path.display()))?;
    Ok(listener)
}

/// Accepts hook connections until the listener fails.
pub async fn serve(listener: UnixListener, tx: mpsc::UnboundedSender<HookMsg>) {
    let mut next_conn = 0u64;
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::warn!("accepting a hook connection failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let peer = match stream.peer_cred().ok().and_then(|c| c.pid()) {
            Some(pid) if pid > 0 => pid as Pid,
            _ => {
                tracing::warn!(
                    "refused a hook connection: the kernel did not say which process it is"
                );
                continue;
            }
        };
        next_conn += 1;
        CONNECTIONS_ACCEPTED.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(connection(next_conn, peer, stream, tx.clone()));
    }
}

async fn connection(conn: u64, peer: Pid, stream: UnixStream, tx: mpsc::UnboundedSender<HookMsg>) {
    let (read, write) = stream.into_split();
    let (reply_tx, mut reply_rx) = mpsc::unbounded_channel::<Reply>();
    let writer = tokio::spawn(async move {
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
    while let Some(line) = lines.next().await {
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
        if tx.send(msg).is_err() {
            break;
        }
    }
    let _ = tx.send(HookMsg::Closed { conn });
    drop(reply_tx);
    let _ = writer.await;
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

    use super::*;

    /// A connection served as the daemon serves it, and the requests it hands over.
    fn serve_pair() -> (UnixStream, mpsc::UnboundedReceiver<HookMsg>) {
        let (client, server) = UnixStream::pair().unwrap();
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(connection(1, 1234, server, tx));
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
            reply
                .send(Reply::new(id.clone(), Ok(Answer::Accepted {})))
                .unwrap();
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
