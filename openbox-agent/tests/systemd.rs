//! deploy/systemd/openbox-agent.service, checked by systemd's own parser
//! (`systemd-analyze verify`, installed by `cargo xtask test`) and against the agent's
//! defaults. No kernel programs are loaded here.

use std::{fs, path::Path, process::Command};

use openbox_agent::{daemon::hook::DEFAULT_SOCKET, governance::config::DEFAULT_SPOOL_DIR};
use openbox_testkit::{workspace_root, TempDir};

fn unit_text() -> String {
    fs::read_to_string(workspace_root().join("deploy/systemd/openbox-agent.service"))
        .expect("deploy/systemd/openbox-agent.service")
}

/// `systemd-analyze verify` on `text` (as openbox-agent.service, its ExecStart pointed at
/// the built agent: verify checks that the binary exists): its complaints, if any.
fn verify(text: &str) -> String {
    let agent = std::env::var_os("OPENBOX_AGENT_BIN")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target/release/openbox-agent"));
    assert!(
        agent.is_file(),
        "{} not found: run `cargo xtask test`, which builds it",
        agent.display()
    );
    let dir = TempDir::new("systemd-unit");
    let unit = dir.join("openbox-agent.service");
    fs::write(
        &unit,
        text.replace("/usr/local/bin/openbox-agent", &agent.display().to_string()),
    )
    .unwrap();
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&unit)
        .output()
        .expect("systemd-analyze (Debian package systemd; `cargo xtask test` installs it)");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        said
    } else {
        format!("exit {}: {said}", out.status)
    }
}

#[test]
fn the_systemd_unit_verifies_without_a_complaint_and_a_misspelled_key_is_caught() {
    let text = unit_text();
    let said = verify(&text);
    assert!(said.trim().is_empty(), "systemd-analyze verify: {said}");
    // The check has teeth: systemd only warns about an unknown key, so any output fails.
    let said = verify(&text.replace("Type=notify", "Typ=notify"));
    assert!(said.contains("Unknown key"), "{said:?}");
}

#[test]
fn the_systemd_unit_waits_for_ready_and_owns_the_agents_default_directories() {
    let text = unit_text();
    let value = |key: &str| -> String {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{key}=")))
            .unwrap_or_else(|| panic!("{key}= missing from the unit"))
            .to_string()
    };
    // The agent sends READY=1 (daemon::notify) only once it serves.
    assert_eq!(value("Type"), "notify");
    // RuntimeDirectory=X is /run/X, StateDirectory=X is /var/lib/X.
    let socket_dir = Path::new(DEFAULT_SOCKET).parent().unwrap();
    assert_eq!(
        Path::new("/run").join(value("RuntimeDirectory")),
        socket_dir
    );
    let state = Path::new("/var/lib").join(value("StateDirectory"));
    assert!(
        Path::new(DEFAULT_SPOOL_DIR).starts_with(&state),
        "{DEFAULT_SPOOL_DIR} is outside {}",
        state.display()
    );
    for cap in [
        "CAP_BPF",
        "CAP_PERFMON",
        "CAP_SYS_PTRACE",
        "CAP_DAC_READ_SEARCH",
        "CAP_KILL",
    ] {
        assert!(value("CapabilityBoundingSet").split(' ').any(|c| c == cap));
        assert!(value("AmbientCapabilities").split(' ').any(|c| c == cap));
    }
    assert!(value("EnvironmentFile").contains("/etc/openbox-agent/"));
}
