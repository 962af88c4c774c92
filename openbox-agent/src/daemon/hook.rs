//! The hook socket: a Unix stream socket the worker hooks talk to, one JSON object per
//! line each way. Replies carry the request's `id` and may come in any order.
//!
//! This module only moves lines: it reads the peer's credentials once (SO_PEERCRED,
//! so a process can only ever speak for itself), frames requests, and hands them to the
//! daemon's loop with a way to answer. What a request may do is decided there.

use std::{os::unix::fs::PermissionsExt, path::Path};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
    sync::mpsc,
};

use crate::conn::Pid;

/// Longest request line accepted (activity inputs can be large).
pub const MAX_LINE: usize = 16 << 20;

/// Default socket path; `--socket` or `OPENBOX_AGENT_SOCKET` override it.
pub const DEFAULT_SOCKET: &str = "/run/openbox/agent.sock";

/// Where a reply goes: the writer of the connection the request came on.
pub type ReplyTx = mpsc::UnboundedSender<String>;

#[derive(Debug)]
pub enum HookMsg {
    Request {
        conn: u64,
        /// Host pid of the peer, from the kernel (SO_PEERCRED), never from the peer.
        peer: Pid,
        req: Value,
        reply: ReplyTx,
    },
    Closed {
        conn: u64,
    },
}

/// Sends `{"id": id, "ok": true, ...fields}` or an error reply.
pub fn reply(tx: &ReplyTx, id: &Value, result: Result<Value, String>) {
    let msg = match result {
        Ok(Value::Object(mut fields)) => {
            fields.insert("id".into(), id.clone());
            fields.insert("ok".into(), true.into());
            Value::Object(fields)
        }
        Ok(_) => json!({"id": id, "ok": true}),
        Err(error) => json!({"id": id, "ok": false, "error": error}),
    };
    let _ = tx.send(msg.to_string());
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
                tracing::warn!("refused a hook connection: the kernel did not say which process it is");
                continue;
            }
        };
        next_conn += 1;
        tokio::spawn(connection(next_conn, peer, stream, tx.clone()));
    }
}

async fn connection(conn: u64, peer: Pid, stream: UnixStream, tx: mpsc::UnboundedSender<HookMsg>) {
    let (read, mut write) = stream.into_split();
    let (reply_tx, mut reply_rx) = mpsc::unbounded_channel::<String>();
    let writer = tokio::spawn(async move {
        while let Some(mut line) = reply_rx.recv().await {
            line.push('\n');
            if write.write_all(line.as_bytes()).await.is_err() {
                break;
            }
        }
    });
    let mut reader = BufReader::new(read);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match read_line(&mut reader, &mut buf).await {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) => {
                reply(&reply_tx, &Value::Null, Err(e));
                break;
            }
        }
        let req: Value = match serde_json::from_slice(&buf) {
            Ok(v @ Value::Object(_)) => v,
            _ => {
                reply(
                    &reply_tx,
                    &Value::Null,
                    Err("a request is one JSON object per line".into()),
                );
                continue;
            }
        };
        let msg = HookMsg::Request {
            conn,
            peer,
            req,
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

/// Reads one line without its newline, refusing lines over [`MAX_LINE`].
async fn read_line<R: AsyncBufReadExt + Unpin>(r: &mut R, buf: &mut Vec<u8>) -> Result<usize, String> {
    loop {
        let chunk = r.fill_buf().await.map_err(|e| e.to_string())?;
        if chunk.is_empty() {
            return Ok(buf.len());
        }
        match chunk.iter().position(|&b| b == b'\n') {
            Some(i) => {
                buf.extend_from_slice(&chunk[..i]);
                r.consume(i + 1);
                // An empty line is not the end of the stream.
                if buf.is_empty() {
                    continue;
                }
                return Ok(buf.len());
            }
            None => {
                let n = chunk.len();
                buf.extend_from_slice(chunk);
                r.consume(n);
            }
        }
        if buf.len() > MAX_LINE {
            return Err(format!("request longer than {MAX_LINE} bytes"));
        }
    }
}
