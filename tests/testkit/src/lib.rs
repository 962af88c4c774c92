//! Test support shared by `openbox-agent/tests` and `tests/e2e`: the workspace's paths and
//! the environment `cargo xtask test` exports, temporary directories, free ports, guards
//! that stop a test's processes when they drop (also on panic), the command lines of
//! the fixture servers in `openbox-agent/tests/support`, and test keys.
//!
//! Only what both test crates need lives here; each crate keeps its own view of the test
//! environment and its own assertions.

mod dir;
pub mod fixtures;
mod process;

use std::{
    net::TcpListener,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

pub use dir::{unique, TempDir};
pub use process::{tail, Background, Proc};

/// What a test tells its reader when the environment is missing.
pub const FIX: &str = "run `cargo xtask test` (it builds the agent, sets up the test environment and exports the OPENBOX_* variables)";

/// The root of the cargo workspace (this crate lives in `tests/testkit`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .expect("tests/testkit lives two levels below the workspace root")
        .to_path_buf()
}

/// A path `cargo xtask test` exports (see xtask/src/env.rs); fails the test, never skips
/// it, when the variable is unset or names nothing.
pub fn env_path(name: &str) -> PathBuf {
    let p = std::env::var_os(name)
        .map(PathBuf::from)
        .unwrap_or_else(|| panic!("{name} is not set: {FIX}"));
    assert!(p.exists(), "{name}={} does not exist: {FIX}", p.display());
    p
}

/// A TCP port on 127.0.0.1 that was free when asked. Another process may take it before
/// the caller binds it: callers that can retry do.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("binding a free port on 127.0.0.1")
}

/// A fresh 2048-bit RSA key (PKCS8 PEM) made by openssl for this test run (none is
/// committed), written to `dir/name.pem` readable by its owner only: the file and its
/// text. Err says what failed.
pub fn rsa_key(dir: &Path, name: &str) -> Result<(PathBuf, String), String> {
    let path = dir.join(format!("{name}.pem"));
    let status = Command::new("openssl")
        .args([
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
        ])
        .arg(&path)
        .stderr(Stdio::null())
        .status()
        .map_err(|e| format!("running openssl to make a test key: {e}"))?;
    if !status.success() {
        return Err(format!("openssl genpkey failed: {status}"));
    }
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| format!("chmod the key file {}: {e}", path.display()))?;
    let pem = std::fs::read_to_string(&path)
        .map_err(|e| format!("reading the key file {}: {e}", path.display()))?;
    Ok((path, pem))
}
