//! `cargo xtask guest-test`: the capture tests in a capture mode this machine's kernel
//! cannot run (fentry: it refuses BPF tracing programs), on a Debian kernel that can.
//!
//! The kernel of `cargo xtask kernel-matrix` boots under qemu (TCG) with this machine's
//! root filesystem shared read-write by qemu's virtiofsd, so the guest runs the very
//! test binaries `cargo test` built, with the same test environment (virtualenvs,
//! database servers, the agent binary) at the same paths; only `/tmp`, `/run`, `/dev`,
//! `/proc` and `/sys` are the guest's own. The tests' agents inherit
//! `OPENBOX_CAPTURE_MODE` as on the host. The guest's output is printed as it comes.
//!
//! One vCPU, as in the kernel matrix (see `kernel_matrix::boot_guest`): TCG emulates
//! every instruction, so a test runs several times slower than on the host.

use std::{
    fmt::Write as _,
    fs,
    io::{Read, Seek, SeekFrom},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context, Result};

use crate::{env, kernel_matrix, proc::Proc, toolchain};

/// PID 1 of the guest: mounts the shared root and runs the host's script in it.
const GUEST_INIT: &str = include_str!("../guest-suite/init");

/// qemu, its virtiofsd (in qemu-system-common on Debian 12; a package of its own
/// later) and the guest's static busybox.
const PACKAGES: &[&str] = &["qemu-system-x86", "busybox-static"];

/// Where Debian's packages put virtiofsd: qemu's C daemon (Debian 12), then the Rust
/// one (its own package from Debian 13).
const VIRTIOFSD: &[&str] = &["/usr/lib/qemu/virtiofsd", "/usr/libexec/virtiofsd"];

/// Guest memory, shared with virtiofsd (vhost-user needs the guest's RAM in a shared
/// memory object). The tests start servers and Python clients.
const GUEST_MIB: u32 = 4096;

/// A test binary's time in the guest before the run is given up (under TCG a test
/// that takes a second on the host takes about a minute here).
const PER_BINARY: Duration = Duration::from_secs(45 * 60);

pub struct Options {
    /// The kernel-matrix kernel to boot (6.1, 6.12).
    pub kernel: String,
    /// `OPENBOX_CAPTURE_MODE` in the guest.
    pub mode: String,
    /// Test binaries of the openbox-agent package, by target name (capture, spans, …).
    pub tests: Vec<String>,
    /// Arguments to each test binary after `--test-threads=1` (a name filter).
    pub args: Vec<String>,
}

/// Builds the test binaries (`cargo test --no-run`, as `cargo xtask test` builds them)
/// and runs them in the guest; fails unless every one passes.
pub fn run(agent: &Path, test_env: &[(String, String)], opts: &Options) -> Result<()> {
    if opts.tests.is_empty() {
        bail!("no test binary to run in the guest: name one with --test (capture, spans, …)");
    }
    env::install_debian_packages(PACKAGES)?;
    let virtiofsd = virtiofsd()?;
    let binaries = test_binaries(&opts.tests)?;
    let boot = kernel_matrix::boot_image(&opts.kernel)?;
    let dir = toolchain::cache_dir().join("guest-suite");
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let initramfs = dir.join("initramfs.cpio");
    let mut cpio = kernel_matrix::Cpio::default();
    for d in ["/proc", "/sys", "/dev", "/host"] {
        cpio.dir(d);
    }
    cpio.char_device("/dev/console", 5, 1);
    cpio.file("/init", GUEST_INIT.as_bytes().to_vec(), 0o755);
    cpio.host_path(Path::new("/bin/busybox"))?;
    fs::write(&initramfs, cpio.finish())
        .with_context(|| format!("writing {}", initramfs.display()))?;

    // The script runs chrooted in the shared root: every path it names is this
    // machine's. Not under /tmp, which is the guest's own.
    let script = dir.join("run.sh");
    fs::write(&script, script_text(agent, test_env, &binaries, opts)?)
        .with_context(|| format!("writing {}", script.display()))?;
    let results = dir.join("results.log");
    let console = dir.join("console.log");
    let socket = dir.join("virtiofs.sock");
    for f in [&results, &console, &socket] {
        let _ = fs::remove_file(f);
    }

    let mut daemon = Command::new(&virtiofsd);
    daemon
        .arg(format!("--socket-path={}", socket.display()))
        .args(["-o", "source=/", "-o", "cache=auto", "-o", "sandbox=chroot"])
        .stdout(Stdio::null())
        .stderr(Stdio::from(
            fs::File::create(dir.join("virtiofsd.log")).context("virtiofsd's log")?,
        ));
    let virtiofs = Proc::service("virtiofsd", &mut daemon)?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        if virtiofs.has_exited() || Instant::now() > deadline {
            bail!(
                "{} did not open {} (its log: {})",
                virtiofsd.display(),
                socket.display(),
                dir.join("virtiofsd.log").display()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }

    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(["-accel", "tcg", "-cpu", "max", "-smp", "1"])
        .args(["-m", &GUEST_MIB.to_string()])
        .args([
            "-object",
            &format!("memory-backend-memfd,id=mem,size={GUEST_MIB}M,share=on"),
            "-machine",
            "memory-backend=mem",
        ])
        .args(["-nodefaults", "-no-reboot", "-display", "none"])
        .arg("-kernel")
        .arg(&boot.vmlinuz)
        .arg("-initrd")
        .arg(&initramfs)
        .args([
            "-append",
            &format!(
                "console=ttyS0 panic=-1 quiet gs_script={}",
                script.display()
            ),
        ])
        .args([
            "-chardev",
            &format!("socket,id=vfs,path={}", socket.display()),
            "-device",
            "vhost-user-fs-pci,chardev=vfs,tag=hostroot",
        ])
        .arg("-serial")
        .arg(format!("file:{}", console.display()))
        .arg("-serial")
        .arg(format!("file:{}", results.display()))
        .stdin(Stdio::null());
    println!(
        "xtask: {} in {} mode on {} under qemu (TCG), this machine's root shared over virtiofs; output in {}",
        opts.tests.join(", "),
        opts.mode,
        boot.package,
        results.display()
    );
    let started = Instant::now();
    let limit = PER_BINARY * binaries.len() as u32 + Duration::from_secs(120);
    let mut qemu = Proc::service("qemu", &mut cmd)?;
    let mut shown = 0u64;
    let outcome = loop {
        shown = echo_new(&results, shown);
        if let Some(status) = qemu.try_wait()? {
            echo_new(&results, shown);
            break Ok(status);
        }
        if started.elapsed() > limit {
            break Err(anyhow!("the guest did not power off within {limit:?}"));
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    drop(qemu);
    drop(virtiofs);
    let text = fs::read_to_string(&results).unwrap_or_default();
    let verdict = Verdict::read(&text, &opts.tests);
    println!(
        "xtask: guest {} mode on {}: {} in {:.0?}",
        opts.mode,
        opts.kernel,
        verdict.summary(),
        started.elapsed()
    );
    let failure = match (outcome, verdict.passed()) {
        (Ok(_), true) => return Ok(()),
        (Ok(status), false) => format!("{} (qemu {status})", verdict.summary()),
        (Err(e), _) => format!("{e}; {}", verdict.summary()),
    };
    let console_text = fs::read_to_string(&console).unwrap_or_default();
    let tail: Vec<&str> = console_text.lines().rev().take(20).collect();
    bail!(
        "the capture tests in {} mode on {} failed: {failure}\nserial console ({}), last lines:\n    {}",
        opts.mode,
        opts.kernel,
        console.display(),
        tail.into_iter().rev().collect::<Vec<_>>().join("\n    ")
    )
}

/// The first virtiofsd found (they ship with qemu's packages).
fn virtiofsd() -> Result<PathBuf> {
    VIRTIOFSD
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .ok_or_else(|| {
            anyhow!(
                "no virtiofsd at {}: on Debian 12 it comes with qemu-system-common, later in the package virtiofsd (apt-get install virtiofsd)",
                VIRTIOFSD.join(" or ")
            )
        })
}

/// The executables of openbox-agent's test targets `tests`, built as `cargo xtask
/// test` builds them (release, the whole workspace's features), so nothing rebuilds.
fn test_binaries(tests: &[String]) -> Result<Vec<(String, PathBuf)>> {
    let manifest = crate::workspace_root().join("openbox-agent/Cargo.toml");
    let mut cmd = Command::new("cargo");
    cmd.current_dir(crate::workspace_root())
        .args(["test", "--release", "--workspace", "--no-run"])
        .args(["--message-format", "json"]);
    for t in tests {
        cmd.args(["--test", t]);
    }
    let out = cmd
        .stderr(Stdio::inherit())
        .output()
        .context("running cargo test --no-run")?;
    if !out.status.success() {
        bail!("building the test binaries failed ({})", out.status);
    }
    let mut found = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let (Some(exe), Some(name)) = (msg["executable"].as_str(), msg["target"]["name"].as_str())
        else {
            continue;
        };
        // Only openbox-agent's: tests/e2e has binaries of the same names (llm).
        let ours = msg["manifest_path"].as_str().map(Path::new) == Some(manifest.as_path());
        if ours && msg["target"]["kind"][0] == "test" && tests.iter().any(|t| t == name) {
            found.push((name.to_string(), PathBuf::from(exe)));
        }
    }
    for t in tests {
        if !found.iter().any(|(name, _)| name == t) {
            bail!("cargo built no test binary named {t:?}");
        }
    }
    Ok(found)
}

/// The guest's script: the test environment, then each binary from the package's
/// directory (as `cargo test` runs it), one test at a time, between markers.
fn script_text(
    agent: &Path,
    test_env: &[(String, String)],
    binaries: &[(String, PathBuf)],
    opts: &Options,
) -> Result<String> {
    let mut s = String::from("# Written by `cargo xtask guest-test`; run in the guest.\n");
    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
    let path = std::env::var("PATH").unwrap_or_default();
    let mut vars: Vec<(String, String)> = test_env.to_vec();
    vars.push(("OPENBOX_AGENT_BIN".into(), agent.display().to_string()));
    vars.push(("OPENBOX_CAPTURE_MODE".into(), opts.mode.clone()));
    vars.push(("HOME".into(), home));
    vars.push(("PATH".into(), path));
    for (k, v) in &vars {
        writeln!(s, "export {k}={}", quote(v))?;
    }
    let package = crate::workspace_root().join("openbox-agent");
    writeln!(s, "cd {} || exit 1", quote(&package.display().to_string()))?;
    writeln!(s, "echo \"@@guest-suite kernel $(uname -r)\"")?;
    writeln!(s, "status=0")?;
    let args: Vec<String> = opts.args.iter().map(|a| quote(a)).collect();
    for (name, exe) in binaries {
        writeln!(s, "echo '@@guest-suite begin {name}'")?;
        writeln!(
            s,
            "{} --test-threads=1 {}",
            quote(&exe.display().to_string()),
            args.join(" ")
        )?;
        writeln!(s, "rc=$?\necho \"@@guest-suite end {name} $rc\"")?;
        writeln!(s, "[ $rc -eq 0 ] || status=1")?;
    }
    writeln!(s, "exit $status")?;
    Ok(s)
}

/// Single-quoted for sh.
fn quote(v: &str) -> String {
    format!("'{}'", v.replace('\'', r"'\''"))
}

/// Prints what the guest wrote to `path` past byte `from`, complete lines only;
/// returns the new position.
fn echo_new(path: &Path, from: u64) -> u64 {
    let Ok(mut f) = fs::File::open(path) else {
        return from;
    };
    let mut buf = Vec::new();
    if f.seek(SeekFrom::Start(from)).is_err() || f.read_to_end(&mut buf).is_err() {
        return from;
    }
    let Some(last) = buf.iter().rposition(|&b| b == b'\n') else {
        return from;
    };
    for line in String::from_utf8_lossy(&buf[..=last]).lines() {
        println!("guest| {line}");
    }
    from + last as u64 + 1
}

/// What the markers say: each binary's exit status, and the script's.
#[derive(Debug, PartialEq)]
struct Verdict {
    binaries: Vec<(String, Option<i32>)>,
    exit: Option<i32>,
    error: Option<String>,
}

impl Verdict {
    fn read(text: &str, tests: &[String]) -> Verdict {
        let mut binaries: Vec<(String, Option<i32>)> =
            tests.iter().map(|t| (t.clone(), None)).collect();
        let mut exit = None;
        let mut error = None;
        for line in text.lines() {
            let Some(rest) = line.trim_end().strip_prefix("@@guest-suite ") else {
                continue;
            };
            if let Some(end) = rest.strip_prefix("end ") {
                let mut words = end.split_whitespace();
                if let (Some(name), Some(rc)) = (words.next(), words.next()) {
                    if let Some(b) = binaries.iter_mut().find(|(n, _)| n == name) {
                        b.1 = rc.parse().ok();
                    }
                }
            } else if let Some(rc) = rest.strip_prefix("exit ") {
                exit = rc.parse().ok();
            } else if let Some(e) = rest.strip_prefix("error: ") {
                error = Some(e.to_string());
            }
        }
        Verdict {
            binaries,
            exit,
            error,
        }
    }

    fn passed(&self) -> bool {
        self.exit == Some(0) && self.binaries.iter().all(|(_, rc)| *rc == Some(0))
    }

    fn summary(&self) -> String {
        if let Some(e) = &self.error {
            return e.clone();
        }
        self.binaries
            .iter()
            .map(|(name, rc)| match rc {
                Some(0) => format!("{name} passed"),
                Some(rc) => format!("{name} failed (exit {rc})"),
                None => format!("{name} did not finish"),
            })
            .collect::<Vec<_>>()
            .join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn the_markers_say_which_binary_failed_and_which_never_finished() {
        let text = "@@guest-suite kernel 6.12\n@@guest-suite begin capture\ntest a ... ok\n\
                    @@guest-suite end capture 0\n@@guest-suite begin spans\n\
                    @@guest-suite end spans 101\n@@guest-suite exit 1\n";
        let v = Verdict::read(text, &names(&["capture", "spans", "syscalls"]));
        assert!(!v.passed());
        assert_eq!(
            v.summary(),
            "capture passed, spans failed (exit 101), syscalls did not finish"
        );
        let ok = "@@guest-suite end capture 0\n@@guest-suite exit 0\n";
        assert!(Verdict::read(ok, &names(&["capture"])).passed());
        // Powered off before the script said how it ended: not a pass.
        assert!(!Verdict::read("@@guest-suite end capture 0\n", &names(&["capture"])).passed());
    }

    #[test]
    fn a_guest_that_could_not_mount_the_host_says_so() {
        let text = "@@guest-suite error: mounting the host's root (virtiofs tag hostroot) failed\n";
        let v = Verdict::read(text, &names(&["capture"]));
        assert!(!v.passed());
        assert!(v.summary().contains("virtiofs"), "{}", v.summary());
    }

    #[test]
    fn values_are_single_quoted_for_sh() {
        assert_eq!(quote("a b"), "'a b'");
        assert_eq!(quote("it's"), r"'it'\''s'");
    }
}
