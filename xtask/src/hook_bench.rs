//! `cargo xtask bench --only hook`: what the worker hook costs, per coroutine step, per
//! activity, and end to end on a real Temporal dev server with the agent daemon running
//! (hooks/python/bench/bench_hook.py prints the figures; this starts what it needs).

use std::{
    net::{TcpListener, TcpStream},
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use crate::{env::TestEnv, proc::Proc};

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn wait_until(what: &str, timeout: Duration, mut ready: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while !ready() {
        if Instant::now() > deadline {
            bail!("{what} was not ready within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

pub fn run(agent: &Path, env: &TestEnv, runs: u32) -> Result<()> {
    let vars: std::collections::HashMap<String, String> = env.vars().into_iter().collect();
    let var = |k: &str| {
        vars.get(k)
            .cloned()
            .with_context(|| format!("the test environment did not provide {k}"))
    };
    let (temporal, python) = (var("OPENBOX_TEMPORAL_BIN")?, var("OPENBOX_TEST_PYTHON")?);
    let dir = std::env::temp_dir().join(format!("openbox-hook-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let port = free_port()?;
    let server = Proc::service(
        "the Temporal dev server",
        Command::new(&temporal)
            .args([
                "server",
                "start-dev",
                "--headless",
                "--ip",
                "127.0.0.1",
                "--port",
            ])
            .arg(port.to_string())
            .arg("--db-filename")
            .arg(dir.join("temporal.db"))
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    )?;
    let socket = dir.join("agent.sock");
    let mut daemon = Proc::service(
        "openbox-agent run",
        Command::new(agent)
            .arg("run")
            .arg("--socket")
            .arg(&socket)
            .arg("--events")
            .arg(dir.join("events.jsonl"))
            .stdout(Stdio::null()),
    )?;
    daemon.wait_for_socket(&socket, Duration::from_secs(30))?;
    wait_until("the Temporal dev server", Duration::from_secs(90), || {
        TcpStream::connect(("127.0.0.1", port)).is_ok()
    })?;
    println!("\nworker hook cost (Temporal dev server on 127.0.0.1:{port}, agent daemon running):");
    let script = crate::workspace_root().join("hooks/python/bench/bench_hook.py");
    let result = crate::run(
        Command::new(&python)
            .arg(script)
            .arg("--temporal")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--agent-socket")
            .arg(&socket)
            .arg("--runs")
            .arg(runs.to_string()),
    );
    drop(daemon);
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
    result
}
