//! The command lines of the fixture servers in `openbox-agent/tests/support`, which both
//! test crates start. Each server prints its port as its first stdout line (0 asks for a
//! free one) and stops cleanly on SIGTERM.

use std::{path::Path, process::Command};

/// tls_server.py on 127.0.0.1:`port`: HTTPS with a self-signed certificate, or plain
/// HTTP with `tls` false; answers `echo:<METHOD> <path> <body length>`. With `record`,
/// it saves each connection's plaintext as `record/conn-<k>.{in,out}`.
pub fn tls_server(
    python: &Path,
    support: &Path,
    tls: bool,
    record: Option<&Path>,
    port: u16,
) -> Command {
    let mut cmd = Command::new(python);
    cmd.arg(support.join("tls_server.py"));
    if let Some(dir) = record {
        cmd.arg("--record").arg(dir);
    }
    if !tls {
        cmd.arg("--plain");
    }
    cmd.arg(port.to_string());
    cmd
}

/// pg_server.py on 127.0.0.1:`port`: a throwaway PostgreSQL cluster (user `openbox`,
/// database `shop`) run with the binaries in `pg_bin`; TLS only unless `allow_plain`.
pub fn pg_server(
    python: &Path,
    support: &Path,
    pg_bin: &Path,
    allow_plain: bool,
    port: u16,
) -> Command {
    let mut cmd = Command::new(python);
    cmd.arg(support.join("pg_server.py"))
        .arg("--pg-bin")
        .arg(pg_bin);
    if allow_plain {
        cmd.arg("--allow-plain");
    }
    cmd.arg(port.to_string());
    cmd
}
