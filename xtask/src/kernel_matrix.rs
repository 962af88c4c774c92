//! `cargo xtask kernel-matrix`: the agent on the kernels users have, beside this one.
//!
//! Debian's 6.1 and 6.12 cloud kernels are booted under qemu with TCG (this machine's
//! KVM cannot run them) from a small initramfs: busybox, the release agent, curl,
//! openssl and their libraries. In each guest, and on the host, the same script
//! (`xtask/kernel-matrix/steps.sh`) records what the kernel offers, runs
//! `openbox-agent check`, then per capture mode one `trace` of an HTTPS request to an
//! `openssl s_server` on loopback and of a file write. The matrix shows per kernel and
//! mode whether the programs loaded and attached and whether the request's plaintext
//! (libssl uprobes) and the write were captured, then what differs from the host:
//! release, BTF, LSMs, `check`'s findings, tracepoint layouts, helpers (with `bpftool`),
//! and every error the agent printed, verifier log included.
//!
//! Kernel packages (`apt-get download`) and the initramfs (named by a hash of its
//! bytes) are kept in `~/.cache/openbox/kernels`, so a second run downloads nothing.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fmt::Write as _,
    fs,
    hash::{Hash, Hasher},
    net::TcpListener,
    os::unix::fs::PermissionsExt,
    path::{Component, Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;

use crate::{env, proc::Proc, run as run_cmd, toolchain};

/// PID 1 of the guest and the steps it runs (the host runs the steps too).
const GUEST_INIT: &str = include_str!("../kernel-matrix/init");
const STEPS: &str = include_str!("../kernel-matrix/steps.sh");

/// What the matrix needs on the host: qemu, a static busybox for the guest, the HTTPS
/// client and server (their dynamic libraries are copied into the guest), bpftool for
/// the helper comparison, objcopy to strip the agent's debug information, the helper
/// names (linux/bpf.h), `flock` for the host row.
const PACKAGES: &[&str] = &[
    "qemu-system-x86",
    "util-linux",
    "busybox-static",
    "curl",
    "openssl",
    "bpftool",
    "binutils",
    "linux-libc-dev",
];

/// The BPF helper functions in id order (`__BPF_FUNC_MAPPER`), to name the helpers the
/// kernel object calls.
const BPF_HEADER: &str = "/usr/include/linux/bpf.h";

/// A Debian kernel, named by the meta-package that depends on its newest build (the
/// signed image); the matrix boots that build's `-unsigned` package, the same kernel
/// without the Secure Boot signature.
struct Kernel {
    label: &'static str,
    meta: &'static str,
    /// Capture modes forced in the quick run besides the default, so that CI exercises
    /// each mode on an older kernel too (this machine's kernel refuses fentry, so its
    /// default is tracepoint; the Debian kernels' is fentry).
    quick_modes: &'static [&'static str],
}

const KERNELS: &[Kernel] = &[
    Kernel {
        label: "6.1",
        meta: "linux-image-cloud-amd64",
        // Its default is fentry: the syscall tracepoints' path on an older kernel.
        quick_modes: &["tracepoint"],
    },
    Kernel {
        label: "6.12",
        meta: "linux-image-6.12-cloud-amd64",
        quick_modes: &["fentry"],
    },
];

/// Where the guest's steps work and the HTTPS server listens.
const GUEST_WORK: &str = "/tmp/kmx";

/// A guest that has not powered off by then has hung: under TCG the boot takes ~4 s and
/// loading the programs ~10 s per mode.
const GUEST_LIMIT: Duration = Duration::from_secs(300);

/// The guest's time for one run of the syscall loops (with an agent start and stop
/// under TCG, on a loaded host): a round is the baseline and two runs per mode.
const GUEST_BENCH_RUN: Duration = Duration::from_secs(150);

/// Findings on a kernel that stand until the agent changes: (kernel, text of the
/// agent's error). A mode that fails with it is reported as known, not as a failure, so
/// CI's quick run keeps checking the rest (the guests boot, `check` runs, the host
/// captures) while the finding is open; once the error is gone the run says so.
///
/// None now. The last one: Debian's 6.1 and 6.12 have no `group_dead` in
/// `sched:sched_process_exit`, which the exit program read; it now reads
/// `current->signal->live` there, at offsets from the kernel's BTF.
const KNOWN: &[(&str, &str)] = &[];

/// The lock the project's kernel tests share, so the host row does not load programs
/// while another run's tests do.
const KERNEL_LOCK: &str = "/tmp/openbox-kernel.lock";

pub struct Options {
    /// The kernel object the agent embeds: its helper calls are checked against what
    /// each kernel offers.
    pub object: PathBuf,
    /// One `trace` per kernel in the agent's default mode (and the kernel's
    /// [`Kernel::quick_modes`]), no bpftool probe.
    pub quick: bool,
    /// Only these kernels (labels: 6.1, 6.12; "host"); all when empty.
    pub kernels: Vec<String>,
    /// Run `cargo xtask bench`'s syscall loops in each guest too, in every capture mode
    /// (the host's own loops are `cargo xtask bench --only syscalls`).
    pub bench: Option<GuestBench>,
}

/// The syscall-loop bench in the guests: `iterations` per loop and run, `rounds`
/// rounds of baseline, then per capture mode unwatched and watched.
#[derive(Clone, Copy)]
pub struct GuestBench {
    pub iterations: u64,
    pub rounds: usize,
}

/// One loop's medians over the rounds in one guest and capture mode, ns per iteration
/// (under TCG: instruction emulation, so compare within a row, not with the host).
pub struct GuestBenchRow {
    pub kernel: String,
    pub mode: String,
    pub label: &'static str,
    pub syscalls: u64,
    pub baseline: f64,
    pub unwatched: f64,
    pub watched: f64,
}

pub fn run(agent: &Path, opts: &Options) -> Result<Vec<GuestBenchRow>> {
    let started = Instant::now();
    env::install_debian_packages(PACKAGES)?;
    let modes = capture_modes(agent, opts.quick)?;
    let bench_modes = match opts.bench {
        Some(_) => capture_modes(agent, false)?
            .into_iter()
            .filter(|m| m != "default")
            .collect(),
        None => Vec::new(),
    };
    if opts.bench.is_some() && bench_modes.is_empty() {
        bail!("the agent has no --capture-mode: the guest bench runs the loops per capture mode");
    }
    let wanted = |label: &str| opts.kernels.is_empty() || opts.kernels.iter().any(|k| k == label);
    for k in &opts.kernels {
        if k != "host" && !KERNELS.iter().any(|kernel| kernel.label == k) {
            bail!(
                "unknown kernel {k:?}: the matrix has host, {}",
                KERNELS
                    .iter()
                    .map(|k| k.label)
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
    }
    let dir = toolchain::cache_dir().join("kernels");
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let tls = ensure_certificate(&dir)?;
    let expect = Expect {
        modes: modes.clone(),
        quick: opts.quick,
        bpftool: !opts.quick,
        helpers: if opts.quick {
            BTreeSet::new()
        } else {
            object_helpers(&opts.object)?
        },
    };

    let mut rows: Vec<Row> = Vec::new();
    if wanted("host") {
        let t = Instant::now();
        let results = run_on_host(agent, &tls, &expect)?;
        rows.push(Row::new(
            "host",
            results,
            &expect,
            GuestOrHost::Host(t.elapsed()),
        ));
    }
    let guest_kernels: Vec<&Kernel> = KERNELS.iter().filter(|k| wanted(k.label)).collect();
    let mut bench_rows = Vec::new();
    if !guest_kernels.is_empty() {
        let loop_bin = match opts.bench {
            Some(_) => Some(crate::bench::build_syscall_loop()?),
            None => None,
        };
        let initramfs = build_initramfs(agent, loop_bin.as_deref(), &tls, &dir)?;
        for kernel in guest_kernels {
            let boot = fetch_kernel(kernel, &dir)?;
            let t = Instant::now();
            let bench = opts.bench.map(|b| (b, bench_modes.as_slice()));
            let outcome = boot_guest(
                &boot,
                &initramfs,
                &expect.modes_on(kernel.label),
                &expect,
                bench,
                &dir.join(kernel.label),
            );
            let elapsed = t.elapsed();
            if let Some(b) = opts.bench {
                // A guest that overran still leaves the runs it finished in its results.
                let partial;
                let results = match &outcome {
                    Ok(results) => results,
                    Err(_) => {
                        partial = Sections::read(&dir.join(kernel.label));
                        &partial
                    }
                };
                bench_rows.extend(guest_bench_rows(kernel.label, results, b, &bench_modes));
            }
            match outcome {
                Ok(results) => rows.push(Row::new(
                    kernel.label,
                    results,
                    &expect,
                    GuestOrHost::Guest(elapsed, boot.package.clone()),
                )),
                Err(e) => rows.push(Row::failed(kernel.label, &boot.package, elapsed, e)),
            }
        }
    }
    print!("{}", report(&rows, &expect));
    if let Some(b) = opts.bench {
        print!("{}", bench_report(&bench_rows, b));
    }
    println!(
        "kernel-matrix: {} kernels, modes {}, {:.0} s in all",
        rows.len(),
        modes.join(", "),
        started.elapsed().as_secs_f64()
    );
    for (kernel, text) in KNOWN {
        let seen = rows
            .iter()
            .filter(|r| r.label == *kernel)
            .flat_map(|r| &r.modes)
            .any(|m| m.known == Some(*text));
        let ran = rows
            .iter()
            .any(|r| r.label == *kernel && !r.modes.is_empty());
        if ran && !seen {
            println!("kernel-matrix: the known finding on {kernel} ({text}) was not seen: if it is fixed, remove it from KNOWN in xtask/src/kernel_matrix.rs");
        }
    }
    let failed: Vec<String> = rows.iter().flat_map(Row::failures).collect();
    if !failed.is_empty() {
        bail!(
            "kernel-matrix: {} failure(s):\n  {}",
            failed.len(),
            failed.join("\n  ")
        );
    }
    Ok(bench_rows)
}

/// What each run is asked to do, and so what its results must hold.
struct Expect {
    /// `default` (no flag) or the values of `--capture-mode`.
    modes: Vec<String>,
    quick: bool,
    bpftool: bool,
    /// `program type: helper` for each helper the kernel object calls.
    helpers: BTreeSet<String>,
}

impl Expect {
    /// The modes run on kernel `label`: [`Expect::modes`], and in the quick run the
    /// kernel's [`Kernel::quick_modes`] too.
    fn modes_on(&self, label: &str) -> Vec<String> {
        let mut modes = self.modes.clone();
        let extra = KERNELS
            .iter()
            .filter(|k| self.quick && k.label == label)
            .flat_map(|k| k.quick_modes);
        for mode in extra {
            if !modes.iter().any(|m| m == mode) {
                modes.push(mode.to_string());
            }
        }
        modes
    }
}

/// The capture modes to run: the values `trace --capture-mode` offers except `auto`
/// (which picks one of them, and `check` says which), or the agent's only mode when it
/// has no such flag. `quick` keeps the default.
fn capture_modes(agent: &Path, quick: bool) -> Result<Vec<String>> {
    let out = Command::new(agent)
        .args(["trace", "--help"])
        .output()
        .with_context(|| format!("running {} trace --help", agent.display()))?;
    let help = String::from_utf8_lossy(&out.stdout);
    let modes = modes_from_help(&help);
    if quick || modes.is_empty() {
        return Ok(vec!["default".into()]);
    }
    Ok(modes)
}

/// The values of `--capture-mode` but `auto`, from `trace --help`: clap lists them
/// inline (`[possible values: auto, fentry, tracepoint]`) or, when each value has a
/// description, one a line (`- fentry: …`) under the option.
fn modes_from_help(help: &str) -> Vec<String> {
    let mut lines = help.lines().skip_while(|l| !l.contains("--capture-mode"));
    let Some(first) = lines.next() else {
        return Vec::new();
    };
    let block: Vec<&str> = std::iter::once(first)
        .chain(lines.take_while(|l| {
            let t = l.trim_start();
            !(t.starts_with("--") || t.starts_with("-h,"))
        }))
        .collect();
    let text = block.join("\n");
    let values: Vec<String> = match text.find("[possible values: ") {
        Some(i) => text[i + "[possible values: ".len()..]
            .split(']')
            .next()
            .unwrap_or("")
            .split(',')
            .map(|v| v.trim().to_string())
            .collect(),
        None => block
            .iter()
            .filter_map(|l| l.trim_start().strip_prefix("- "))
            .map(|v| v.split(':').next().unwrap_or("").trim().to_string())
            .collect(),
    };
    values
        .into_iter()
        .filter(|v| !v.is_empty() && v != "auto")
        .collect()
}

/// A self-signed certificate for the HTTPS server (curl runs with `-k`).
struct Tls {
    dir: PathBuf,
}

fn ensure_certificate(cache: &Path) -> Result<Tls> {
    let dir = cache.join("tls");
    if dir.join("cert.pem").is_file() && dir.join("key.pem").is_file() {
        return Ok(Tls { dir });
    }
    fs::create_dir_all(&dir)?;
    run_cmd(
        Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "36500",
                "-subj",
                "/CN=127.0.0.1",
                "-keyout",
            ])
            .arg(dir.join("key.pem"))
            .arg("-out")
            .arg(dir.join("cert.pem"))
            .stderr(std::process::Stdio::null()),
    )
    .context("making the HTTPS server's certificate")?;
    Ok(Tls { dir })
}

// ---------------------------------------------------------------------------------------
// Kernels

pub(crate) struct Boot {
    pub(crate) package: String,
    pub(crate) vmlinuz: PathBuf,
}

/// The kernel of the matrix labelled `label` (6.1, 6.12), downloaded once into
/// `~/.cache/openbox/kernels` (`cargo xtask guest-test` boots it too).
pub(crate) fn boot_image(label: &str) -> Result<Boot> {
    let kernel = KERNELS.iter().find(|k| k.label == label).ok_or_else(|| {
        anyhow!(
            "unknown kernel {label:?}: there are {}",
            KERNELS
                .iter()
                .map(|k| k.label)
                .collect::<Vec<_>>()
                .join(", ")
        )
    })?;
    let dir = toolchain::cache_dir().join("kernels");
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    fetch_kernel(kernel, &dir)
}

/// The newest `-unsigned` build the meta-package points at, downloaded once and its
/// `/boot` extracted. Every kernel feature the agent uses is built in (BPF, BTF,
/// kprobes, uprobes, syscall tracepoints, BPF LSM, the 8250 serial console), so no
/// module is needed.
fn fetch_kernel(kernel: &Kernel, cache: &Path) -> Result<Boot> {
    let package = resolve_package(kernel)?;
    let deb = match cached_deb(cache, &package)? {
        Some(deb) => deb,
        None => {
            eprintln!("xtask: downloading {package}");
            run_cmd(
                Command::new("apt-get")
                    .current_dir(cache)
                    .args(["download", "-q", &package]),
            )
            .with_context(|| format!("downloading {package} with apt-get"))?;
            cached_deb(cache, &package)?.ok_or_else(|| {
                anyhow!(
                    "apt-get download {package} left no .deb in {}",
                    cache.display()
                )
            })?
        }
    };
    let extracted = cache.join(deb.file_stem().expect("a .deb has a name"));
    let boot = extracted.join("boot");
    if !boot.is_dir() {
        let tmp = cache.join(format!(".extract-{package}"));
        let _ = fs::remove_dir_all(&tmp);
        fs::create_dir_all(&tmp)?;
        // Only /boot: the modules (most of the package) are not needed.
        run_cmd(Command::new("sh").arg("-c").arg(format!(
            "dpkg-deb --fsys-tarfile '{}' | tar -x -C '{}' ./boot",
            deb.display(),
            tmp.display()
        )))
        .with_context(|| format!("extracting /boot from {}", deb.display()))?;
        let _ = fs::remove_dir_all(&extracted);
        fs::rename(&tmp, &extracted)?;
    }
    let vmlinuz = fs::read_dir(&boot)?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
        })
        .ok_or_else(|| anyhow!("{} has no vmlinuz-*", boot.display()))?;
    Ok(Boot { package, vmlinuz })
}

/// `linux-image-6.1.0-57-cloud-amd64-unsigned` from the meta-package's dependency on
/// `linux-image-6.1.0-57-cloud-amd64`. With no package lists yet, they are fetched once.
fn resolve_package(kernel: &Kernel) -> Result<String> {
    let show = || {
        Command::new("apt-cache")
            .args(["show", "--no-all-versions", kernel.meta])
            .output()
    };
    let mut out = show().context("running apt-cache: the kernel matrix needs Debian's apt")?;
    if !out.status.success() {
        run_cmd(Command::new("apt-get").args(["update", "-q"]))
            .context("refreshing the package lists")?;
        out = show()?;
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let depends = text
        .lines()
        .find_map(|l| l.strip_prefix("Depends:"))
        .ok_or_else(|| {
            anyhow!(
                "apt-cache show {} gave no Depends line (status {}): is this a Debian 12 system with bookworm and bookworm-security in its apt sources?",
                kernel.meta,
                out.status
            )
        })?;
    let image = depends
        .split(',')
        .map(|d| d.split_whitespace().next().unwrap_or(""))
        .find(|d| d.starts_with("linux-image-"))
        .ok_or_else(|| anyhow!("{} depends on no linux-image-*: {depends}", kernel.meta))?;
    Ok(format!("{image}-unsigned"))
}

fn cached_deb(cache: &Path, package: &str) -> Result<Option<PathBuf>> {
    let prefix = format!("{package}_");
    Ok(fs::read_dir(cache)?.flatten().map(|e| e.path()).find(|p| {
        p.extension().is_some_and(|e| e == "deb")
            && p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(&prefix))
    }))
}

// ---------------------------------------------------------------------------------------
// The initramfs

/// Builds the guest's root filesystem as an uncompressed newc cpio (no decompression
/// under TCG), reusing the cached one with the same bytes.
fn build_initramfs(
    agent: &Path,
    loop_bin: Option<&Path>,
    tls: &Tls,
    cache: &Path,
) -> Result<PathBuf> {
    let mut fs_ = Cpio::default();
    for dir in ["proc", "sys", "dev", "tmp", "run", "etc", "root", "kmx"] {
        fs_.dir(&format!("/{dir}"));
    }
    fs_.char_device("/dev/console", 5, 1);
    fs_.file("/init", GUEST_INIT.as_bytes().to_vec(), 0o755);
    fs_.file("/kmx/steps.sh", STEPS.as_bytes().to_vec(), 0o644);
    for name in ["cert.pem", "key.pem"] {
        fs_.file(
            &format!("/kmx/{name}"),
            fs::read(tls.dir.join(name))?,
            0o644,
        );
    }
    // The debug information is three quarters of the binary and the guest needs none.
    let stripped = cache.join("openbox-agent.stripped");
    run_cmd(
        Command::new("objcopy")
            .arg("--strip-debug")
            .arg(agent)
            .arg(&stripped),
    )
    .context("stripping the agent's debug information for the guest")?;
    fs_.file("/usr/bin/openbox-agent", fs::read(&stripped)?, 0o755);
    fs_.host_path(Path::new("/bin/busybox"))?;
    // busybox --install -s puts applets in /sbin too.
    fs_.host_path(Path::new("/sbin"))?;
    let mut binaries = vec![
        PathBuf::from("/usr/bin/openssl"),
        PathBuf::from("/usr/bin/curl"),
    ];
    binaries.push(on_path("bpftool")?);
    binaries.push(stripped.clone());
    // The sendmmsg/recvmmsg batches of the capture tests (steps.sh, KMX_MMSG).
    let mmsg = cache.join("mmsg");
    run_cmd(
        Command::new("cc")
            .args(["-O2", "-Wall", "-o"])
            .arg(&mmsg)
            .arg(crate::workspace_root().join("openbox-agent/tests/support/mmsg.c")),
    )
    .context("building tests/support/mmsg.c for the guests with cc")?;
    fs_.file("/usr/bin/mmsg", fs::read(&mmsg)?, 0o755);
    binaries.push(mmsg.clone());
    if let Some(bin) = loop_bin {
        fs_.file("/usr/bin/syscall_loop", fs::read(bin)?, 0o755);
        binaries.push(bin.to_path_buf());
    }
    for bin in &binaries {
        if bin != &stripped && bin != &mmsg && Some(bin.as_path()) != loop_bin {
            fs_.host_path(bin)?;
        }
        for lib in shared_libraries(bin)? {
            fs_.host_path(&lib)?;
        }
    }
    fs_.host_path(Path::new("/usr/lib/ssl/openssl.cnf"))?;
    let bytes = fs_.finish();
    let mut h = std::collections::hash_map::DefaultHasher::new();
    bytes.hash(&mut h);
    let path = cache.join(format!("initramfs-{:016x}.cpio", h.finish()));
    if !path.is_file() {
        // Older builds are superseded; keep the cache from growing with every agent.
        for old in fs::read_dir(cache)?.flatten() {
            let name = old.file_name().to_string_lossy().to_string();
            if name.starts_with("initramfs-") && name.ends_with(".cpio") {
                let _ = fs::remove_file(old.path());
            }
        }
        let tmp = path.with_extension("tmp");
        fs::write(&tmp, &bytes).with_context(|| format!("writing {}", tmp.display()))?;
        fs::rename(&tmp, &path)?;
    }
    let _ = fs::remove_file(&stripped);
    let _ = fs::remove_file(&mmsg);
    eprintln!(
        "xtask: initramfs {} ({} MiB)",
        path.display(),
        bytes.len() >> 20
    );
    Ok(path)
}

fn on_path(binary: &str) -> Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join(binary))
        .find(|p| p.is_file())
        .ok_or_else(|| anyhow!("`{binary}` is not on PATH although its package is installed"))
}

/// The libraries `ldd` resolves for `bin`, the dynamic loader included.
fn shared_libraries(bin: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd")
        .arg(bin)
        .output()
        .with_context(|| format!("running ldd {}", bin.display()))?;
    if !out.status.success() {
        bail!(
            "ldd {} failed: {}",
            bin.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let mut libs = Vec::new();
    for line in text.lines() {
        // `libssl.so.3 => /lib/x86_64-linux-gnu/libssl.so.3 (0x…)` or
        // `/lib64/ld-linux-x86-64.so.2 (0x…)`; the vDSO has no file.
        let path = match line.split_once("=>") {
            Some((_, right)) => right.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(p) = path.filter(|p| p.starts_with('/')) {
            libs.push(PathBuf::from(p));
        }
    }
    Ok(libs)
}

/// An initramfs being assembled: guest path → entry. Sorted by path, so a directory
/// comes before what it holds, as the kernel's unpacker needs.
#[derive(Default)]
pub(crate) struct Cpio {
    entries: BTreeMap<String, Entry>,
}

enum Entry {
    Dir,
    File(Vec<u8>, u32),
    Symlink(String),
    CharDevice(u32, u32),
}

impl Cpio {
    fn parents(&mut self, path: &str) {
        let mut at = 0;
        while let Some(i) = path[at + 1..].find('/') {
            at += 1 + i;
            self.entries
                .entry(path[..at].to_string())
                .or_insert(Entry::Dir);
        }
    }

    pub(crate) fn dir(&mut self, path: &str) {
        self.parents(path);
        self.entries.insert(path.to_string(), Entry::Dir);
    }

    pub(crate) fn file(&mut self, path: &str, data: Vec<u8>, mode: u32) {
        self.parents(path);
        self.entries
            .insert(path.to_string(), Entry::File(data, mode));
    }

    pub(crate) fn char_device(&mut self, path: &str, major: u32, minor: u32) {
        self.parents(path);
        self.entries
            .insert(path.to_string(), Entry::CharDevice(major, minor));
    }

    /// Copies a host file or directory entry to the same path, recreating every
    /// symbolic link on the way (`/lib64` → `usr/lib64`, …) so the guest resolves the
    /// path as the host does: the loader's path in each binary, and the library paths
    /// the agent sees in /proc/PID/maps.
    pub(crate) fn host_path(&mut self, path: &Path) -> Result<()> {
        let mut at = PathBuf::from("/");
        let mut components = path.components().skip_while(|c| *c == Component::RootDir);
        while let Some(c) = components.next() {
            at.push(c);
            let meta = fs::symlink_metadata(&at)
                .with_context(|| format!("reading {} for the guest", at.display()))?;
            if meta.file_type().is_symlink() {
                let target = fs::read_link(&at)?;
                let shown = at.display().to_string();
                self.parents(&shown);
                self.entries
                    .insert(shown, Entry::Symlink(target.display().to_string()));
                let mut resolved = normalize(&at.parent().expect("below /").join(&target));
                resolved.extend(components);
                return self.host_path(&resolved);
            }
            if meta.is_dir() {
                self.entries
                    .entry(at.display().to_string())
                    .or_insert(Entry::Dir);
            } else {
                let data = fs::read(&at)?;
                let mode = meta.permissions().mode() & 0o7777;
                self.file(&at.display().to_string(), data, mode);
            }
        }
        Ok(())
    }

    /// The newc archive.
    pub(crate) fn finish(self) -> Vec<u8> {
        let mut out = Vec::new();
        // Inode numbers from 1: the unpacker links entries that share one.
        for (ino, (path, entry)) in (1..).zip(self.entries) {
            let (mode, data, rdev): (u32, Vec<u8>, (u32, u32)) = match entry {
                Entry::Dir => (0o040755, Vec::new(), (0, 0)),
                Entry::File(data, mode) => (0o100000 | mode, data, (0, 0)),
                Entry::Symlink(target) => (0o120777, target.into_bytes(), (0, 0)),
                Entry::CharDevice(major, minor) => (0o020600, Vec::new(), (major, minor)),
            };
            newc_entry(&mut out, ino, &path[1..], mode, &data, rdev);
        }
        newc_entry(&mut out, 0, "TRAILER!!!", 0, &[], (0, 0));
        out
    }
}

fn newc_entry(out: &mut Vec<u8>, ino: u32, name: &str, mode: u32, data: &[u8], rdev: (u32, u32)) {
    let nlink = if mode & 0o170000 == 0o040000 { 2 } else { 1 };
    let fields = [
        ino,
        mode,
        0,
        0,
        nlink,
        0,
        data.len() as u32,
        0,
        0,
        rdev.0,
        rdev.1,
        name.len() as u32 + 1,
        0,
    ];
    out.extend_from_slice(b"070701");
    for f in fields {
        out.extend_from_slice(format!("{f:08x}").as_bytes());
    }
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    pad4(out);
    out.extend_from_slice(data);
    pad4(out);
}

fn pad4(out: &mut Vec<u8>) {
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
}

/// `/usr/lib64/../lib/x` → `/usr/lib/x`, without touching the filesystem.
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::from("/");
    for c in path.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::Normal(n) => out.push(n),
            _ => {}
        }
    }
    out
}

// ---------------------------------------------------------------------------------------
// Running the steps

fn run_on_host(agent: &Path, tls: &Tls, expect: &Expect) -> Result<Sections> {
    let tmp = std::env::temp_dir().join(format!("openbox-kmatrix-{}", std::process::id()));
    let _ = fs::remove_dir_all(&tmp);
    fs::create_dir_all(&tmp)?;
    let steps = tmp.join("steps.sh");
    fs::write(&steps, STEPS)?;
    let out = tmp.join("results");
    // A free port: the host may run other servers.
    let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let status = Command::new("flock")
        .arg(KERNEL_LOCK)
        .arg("sh")
        .arg(&steps)
        .env("KMX_OUT", &out)
        .env("KMX_AGENT", agent)
        .env("KMX_CERT_DIR", &tls.dir)
        .env("KMX_WORK", tmp.join("work"))
        .env("KMX_PORT", port.to_string())
        .env("KMX_MODES", expect.modes_on("host").join(","))
        .env("KMX_BPFTOOL", if expect.bpftool { "1" } else { "0" })
        .status()
        .context("running the kernel-matrix steps on the host")?;
    let text = fs::read_to_string(&out).unwrap_or_default();
    let sections = Sections::parse(&text, tmp.join("work"));
    let _ = fs::remove_dir_all(&tmp);
    if !sections.done {
        bail!(
            "the steps on the host stopped ({status}) in {}",
            sections.last_begun().unwrap_or("the first step")
        );
    }
    Ok(sections)
}

fn boot_guest(
    boot: &Boot,
    initramfs: &Path,
    modes: &[String],
    expect: &Expect,
    bench: Option<(GuestBench, &[String])>,
    dir: &Path,
) -> Result<Sections> {
    fs::create_dir_all(dir)?;
    let console = dir.join("console.log");
    let results = dir.join("results.log");
    let _ = fs::remove_file(&console);
    let _ = fs::remove_file(&results);
    let mut append = format!(
        "console=ttyS0 panic=-1 quiet kmx_modes={} kmx_bpftool={}",
        modes.join(","),
        u8::from(expect.bpftool)
    );
    let mut limit = GUEST_LIMIT;
    if let Some((b, bench_modes)) = bench {
        let _ = write!(
            append,
            " kmx_bench={} kmx_bench_rounds={} kmx_bench_modes={}",
            b.iterations,
            b.rounds,
            bench_modes.join(",")
        );
        // Per round: the baseline loops, then per mode the unwatched and the watched
        // runs, each with an agent start and stop under TCG.
        limit += GUEST_BENCH_RUN * (b.rounds * (1 + 2 * bench_modes.len())) as u32;
    }
    let mut cmd = Command::new("qemu-system-x86_64");
    // One vCPU: with two, TCG sometimes runs a stale `int3` left by the guest's
    // cross-CPU code patching (a static key flipped by perf_event_open while the agent
    // attaches), and the 6.12 guest panics with "Oops: int3" in __schedule (seen in
    // a full suite run); no real CPU does that. The agent's parallel loading is
    // exercised on the host.
    cmd.args(["-accel", "tcg", "-cpu", "max", "-smp", "1", "-m", "1024"])
        .args(["-nodefaults", "-no-reboot", "-display", "none"])
        .arg("-kernel")
        .arg(&boot.vmlinuz)
        .arg("-initrd")
        .arg(initramfs)
        .args(["-append", &append])
        .arg("-serial")
        .arg(format!("file:{}", console.display()))
        .arg("-serial")
        .arg(format!("file:{}", results.display()))
        .stdin(std::process::Stdio::null());
    eprintln!("xtask: booting {} under qemu (TCG)", boot.package);
    let mut qemu = Proc::service("qemu", &mut cmd)?;
    let status = qemu.wait(limit);
    let sections = Sections::read(dir);
    let failure = match status {
        Ok(_) if sections.done => return Ok(sections),
        Ok(status) => format!("qemu exited ({status}) before the steps ended"),
        Err(_) => format!("the guest did not power off within {limit:?}"),
    };
    drop(qemu);
    let console_text = fs::read_to_string(&console).unwrap_or_default();
    let tail: Vec<&str> = console_text.lines().rev().take(30).collect();
    bail!(
        "{failure}; last step begun: {}\nserial console ({}), last lines:\n    {}",
        sections
            .last_begun()
            .unwrap_or("none (the guest never ran steps.sh)"),
        console.display(),
        tail.into_iter().rev().collect::<Vec<_>>().join("\n    ")
    )
}

/// The `@@kmx begin/end` sections of one run.
struct Sections {
    list: Vec<(String, String, Option<i32>)>,
    done: bool,
    work: PathBuf,
}

impl Sections {
    /// The sections a guest booted in `dir` wrote to its results serial port.
    fn read(dir: &Path) -> Sections {
        let text = fs::read_to_string(dir.join("results.log")).unwrap_or_default();
        Sections::parse(&text, PathBuf::from(GUEST_WORK))
    }

    fn parse(text: &str, work: PathBuf) -> Sections {
        let mut list = Vec::new();
        let mut open: Option<(String, String)> = None;
        let mut done = false;
        for line in text.lines() {
            let line = line.trim_end_matches('\r');
            if let Some(name) = line.strip_prefix("@@kmx begin ") {
                open = Some((name.to_string(), String::new()));
            } else if let Some(rest) = line.strip_prefix("@@kmx end ") {
                let rc = rest.rsplit_once(" rc=").and_then(|(_, rc)| rc.parse().ok());
                if let Some((name, body)) = open.take() {
                    list.push((name, body.trim_end().to_string(), rc));
                }
            } else if line == "@@kmx done" {
                done = true;
            } else if let Some((_, body)) = open.as_mut() {
                body.push_str(line);
                body.push('\n');
            }
        }
        if let Some((name, body)) = open {
            list.push((name, body, None));
        }
        Sections { list, done, work }
    }

    fn get(&self, name: &str) -> Option<(&str, Option<i32>)> {
        self.list
            .iter()
            .find(|(n, _, _)| n == name)
            .map(|(_, body, rc)| (body.as_str(), *rc))
    }

    fn text(&self, name: &str) -> &str {
        self.get(name).map(|(t, _)| t).unwrap_or("")
    }

    fn last_begun(&self) -> Option<&str> {
        self.list.last().map(|(n, _, _)| n.as_str())
    }
}

// ---------------------------------------------------------------------------------------
// Results

enum GuestOrHost {
    Host(Duration),
    Guest(Duration, String),
}

struct Row {
    label: String,
    source: GuestOrHost,
    outcome: Result<Sections, String>,
    modes: Vec<ModeResult>,
}

struct ModeResult {
    mode: String,
    /// Loaded: the programs passed the verifier. Attached: the agent ran the command
    /// under capture. `None`: not reached.
    loaded: Option<bool>,
    attached: Option<bool>,
    https: bool,
    file: bool,
    /// The agent's error, verifier log included, and its warnings.
    errors: Vec<String>,
    /// The agent refused to start (the kernel lacks something it checks first).
    refused: bool,
    /// The entry of [`KNOWN`] the error matches.
    known: Option<&'static str>,
    summary: Option<Value>,
    /// The sendmmsg/recvmmsg batches ([`mmsg_captured`]); `None` where not run (the
    /// host, whose own tests check them).
    mmsg: Option<Result<(), String>>,
}

impl Row {
    fn new(label: &str, sections: Sections, expect: &Expect, source: GuestOrHost) -> Row {
        let modes = expect
            .modes_on(label)
            .iter()
            .map(|m| ModeResult::read(&sections, m, label))
            .collect();
        Row {
            label: label.into(),
            source,
            outcome: Ok(sections),
            modes,
        }
    }

    fn failed(label: &str, package: &str, elapsed: Duration, e: anyhow::Error) -> Row {
        Row {
            label: label.into(),
            source: GuestOrHost::Guest(elapsed, package.into()),
            outcome: Err(format!("{e:#}")),
            modes: Vec::new(),
        }
    }

    fn failures(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Err(e) = &self.outcome {
            out.push(format!(
                "{}: {}",
                self.label,
                e.lines().next().unwrap_or("")
            ));
        }
        for m in &self.modes {
            if m.known.is_some() {
                continue;
            }
            let missing: Vec<String> = [
                (m.loaded != Some(true), "programs not loaded"),
                (m.attached != Some(true), "not attached"),
                (!m.https, "HTTPS request not captured"),
                (!m.file, "file write not captured"),
            ]
            .into_iter()
            .filter(|(bad, _)| *bad)
            .map(|(_, what)| what.to_string())
            .chain(
                m.mmsg
                    .clone()
                    .and_then(Result::err)
                    .map(|e| format!("sendmmsg/recvmmsg batches not captured as sent: {e}")),
            )
            .collect();
            if !missing.is_empty() {
                out.push(format!(
                    "{} mode {}: {}",
                    self.label,
                    m.mode,
                    missing.join(", ")
                ));
            }
        }
        out
    }
}

impl ModeResult {
    fn read(s: &Sections, mode: &str, kernel: &str) -> ModeResult {
        let stderr = s.text(&format!("stderr {mode}"));
        let rc: Option<i32> = s.text(&format!("trace {mode}")).trim().parse().ok();
        let spans: Vec<Value> = s
            .text(&format!("spans {mode}"))
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        let summary = stderr
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .find(|v| v["type"] == "summary");
        let error = stderr
            .find("openbox-agent: error:")
            .map(|i| stderr[i..].trim().to_string());
        let (loaded, attached) = match (&error, &summary) {
            (None, Some(_)) => (Some(true), Some(true)),
            (Some(e), _) if e.contains("refuses to start") => (None, None),
            (Some(e), _)
                if e.contains("rejected program")
                    || e.contains("loading the kernel programs failed") =>
            {
                (Some(false), None)
            }
            (Some(e), _) if e.contains("attach") => (Some(true), Some(false)),
            _ => (None, None),
        };
        let target = format!("/kmatrix-{mode}");
        let https = spans.iter().any(|sp| {
            let a = &sp["attributes"];
            a["http.scheme"] == "https"
                && a["http.target"] == target.as_str()
                && a["http.status_code"] == 200
        });
        let path = s
            .work
            .join(format!("file-{mode}.txt"))
            .display()
            .to_string();
        let file = spans.iter().any(|sp| {
            let a = &sp["attributes"];
            a["file.path"] == path.as_str()
                && (sp["name"] == "file.write"
                    || a["file.total_bytes_written"].as_u64().unwrap_or(0) > 0)
        });
        let refused = error
            .as_deref()
            .is_some_and(|e| e.contains("refuses to start"));
        let known = KNOWN
            .iter()
            .find(|(k, text)| *k == kernel && error.as_deref().is_some_and(|e| e.contains(text)))
            .map(|(_, text)| *text);
        let mut errors: Vec<String> = error.into_iter().collect();
        errors.extend(
            stderr
                .lines()
                .filter(|l| l.contains(" WARN ") || l.contains("\"level\":\"WARN\""))
                .map(String::from),
        );
        if rc != Some(0) && errors.is_empty() {
            errors.push(format!("trace exited with {rc:?}: {}", stderr.trim()));
        }
        ModeResult {
            mode: mode.into(),
            loaded,
            attached,
            https,
            file,
            errors,
            refused,
            known,
            summary,
            mmsg: s
                .get(&format!("mmsg sent {mode}"))
                .map(|(sent, _)| mmsg_captured(sent, s.text(&format!("mmsg records {mode}")))),
        }
    }
}

/// Whether tests/support/mmsg.c's batches (5 then 20 messages, `sent`: one a line) were
/// captured as the host's capture tests check them, from its data and close `records`:
/// per call one socket, the first 5 + 16 messages copied in order with no gap, and every
/// byte counted in its close, the uncopied messages' too.
fn mmsg_captured(sent: &str, records: &str) -> Result<(), String> {
    use base64::{engine::general_purpose::STANDARD, Engine as _};
    let messages: Vec<String> = sent.lines().map(|l| format!("{l}\n")).collect();
    if messages.len() != 25 {
        return Err(format!(
            "mmsg sent {} messages, not 5 + 20 (see its output)",
            messages.len()
        ));
    }
    let want = messages[..5 + 16].concat();
    let total: u64 = messages.iter().map(|m| m.len() as u64).sum();
    let records: Vec<Value> = records
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    for (via, counter) in [("sendmmsg", "bytes_sent"), ("recvmmsg", "bytes_received")] {
        let mut of: Vec<&Value> = records.iter().filter(|r| r["via"] == via).collect();
        of.sort_by_key(|r| r["seq"].as_u64());
        let conns: BTreeSet<&str> = of.iter().filter_map(|r| r["conn"].as_str()).collect();
        let [conn] = conns.into_iter().collect::<Vec<_>>()[..] else {
            return Err(format!("{via}: records on other than one socket"));
        };
        let mut copied = Vec::new();
        for r in of {
            let data = STANDARD
                .decode(r["data_b64"].as_str().unwrap_or_default())
                .map_err(|e| format!("{via}: data_b64 is not base64 ({e})"))?;
            if r["seq"].as_u64() != Some(copied.len() as u64) {
                return Err(format!("{via}: a gap before seq {}", r["seq"]));
            }
            copied.extend(data);
        }
        if copied != want.as_bytes() {
            return Err(format!(
                "{via}: the copied bytes ({}) are not the first 21 messages ({})",
                copied.len(),
                want.len()
            ));
        }
        let counted = records
            .iter()
            .find(|r| r["type"] == "close" && r["conn"] == conn)
            .and_then(|r| r[counter].as_u64());
        if counted != Some(total) {
            return Err(format!(
                "{via}: {counter} {counted:?} in the socket's close, {total} sent"
            ));
        }
    }
    Ok(())
}

fn mark(v: Option<bool>) -> &'static str {
    match v {
        Some(true) => "yes",
        Some(false) => "NO",
        None => "-",
    }
}

fn report(rows: &[Row], expect: &Expect) -> String {
    let modes = &expect.modes;
    let mut o = String::new();
    let host = rows
        .iter()
        .find(|r| r.label == "host")
        .and_then(|r| r.outcome.as_ref().ok());
    let _ = writeln!(o, "\nkernel matrix (capture modes: {})", modes.join(", "));
    for row in rows {
        let _ = writeln!(o);
        match &row.source {
            GuestOrHost::Host(t) => {
                let _ = writeln!(
                    o,
                    "== host, {:.1} s (waiting for {KERNEL_LOCK} included)",
                    t.as_secs_f64()
                );
            }
            GuestOrHost::Guest(t, package) => {
                let _ = writeln!(
                    o,
                    "== {}: {package} under qemu TCG, {:.1} s (boot included)",
                    row.label,
                    t.as_secs_f64()
                );
            }
        }
        let s = match &row.outcome {
            Ok(s) => s,
            Err(e) => {
                let _ = writeln!(o, "   FAILED: {}", e.replace('\n', "\n   "));
                continue;
            }
        };
        let _ = writeln!(o, "   kernel {}", s.text("uname").trim());
        let _ = writeln!(
            o,
            "   {:<12} {:>7} {:>9} {:>15} {:>14}",
            "mode", "loaded", "attached", "HTTPS captured", "file captured"
        );
        for m in &row.modes {
            let _ = writeln!(
                o,
                "   {:<12} {:>7} {:>9} {:>15} {:>14}",
                m.mode,
                if m.refused { "refused" } else { mark(m.loaded) },
                mark(m.attached),
                mark(Some(m.https).filter(|_| !m.refused)),
                mark(Some(m.file).filter(|_| !m.refused))
            );
        }
        for m in &row.modes {
            if let Some(r) = &m.mmsg {
                let _ = writeln!(
                    o,
                    "   mode {}: sendmmsg/recvmmsg batches {}",
                    m.mode,
                    match r {
                        Ok(()) => "captured as sent".to_string(),
                        Err(e) => format!("NOT captured as sent: {e}"),
                    }
                );
            }
        }
        describe(&mut o, s, host, row.label == "host", &expect.helpers);
        for m in &row.modes {
            if let Some(sum) = &m.summary {
                let failures: Vec<String> = sum
                    .as_object()
                    .into_iter()
                    .flatten()
                    .filter(|(k, v)| {
                        (k.ends_with("failures") || k.ends_with("drops"))
                            && v.as_u64().unwrap_or(0) > 0
                    })
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect();
                if !failures.is_empty() {
                    let _ = writeln!(
                        o,
                        "   mode {}: summary counts {}",
                        m.mode,
                        failures.join(" ")
                    );
                }
            }
            if let Some(text) = m.known {
                let _ = writeln!(
                    o,
                    "   mode {}: known finding ({text}), see KNOWN in xtask/src/kernel_matrix.rs",
                    m.mode
                );
            }
            for e in &m.errors {
                let _ = writeln!(
                    o,
                    "   mode {} printed:\n      {}",
                    m.mode,
                    tail(e, 40).replace('\n', "\n      ")
                );
            }
        }
    }
    o
}

/// The guest's syscall-loop results: per capture mode and loop, the medians over the
/// rounds of each run's ns per iteration (a round whose run left no result is skipped).
fn guest_bench_rows(
    kernel: &str,
    s: &Sections,
    b: GuestBench,
    modes: &[String],
) -> Vec<GuestBenchRow> {
    let ns = |section: String, kind: &str| -> Option<f64> {
        s.text(&section)
            .lines()
            .find(|l| l.contains(&format!("\"loop\":\"{kind}\"")))
            .and_then(|l| crate::bench::json_num(l, "ns_per_iter"))
    };
    let over_rounds = |name: &dyn Fn(usize) -> String, kind: &str| {
        crate::bench::median((1..=b.rounds).filter_map(|r| ns(name(r), kind)).collect())
    };
    let mut rows = Vec::new();
    for mode in modes {
        for (kind, label, syscalls) in crate::bench::LOOPS {
            rows.push(GuestBenchRow {
                kernel: kernel.to_string(),
                mode: mode.clone(),
                label,
                syscalls,
                baseline: over_rounds(&|r| format!("bench {r} baseline"), kind),
                unwatched: over_rounds(&|r| format!("bench {r} unwatched {mode}"), kind),
                watched: over_rounds(&|r| format!("bench {r} watched {mode}"), kind),
            });
        }
    }
    rows
}

fn bench_report(rows: &[GuestBenchRow], b: GuestBench) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "\nsyscall loops in the guests (qemu TCG, one vCPU; {} iterations per run, medians over {} rounds; \
         TCG emulates every instruction, so compare within a row, not with the host):",
        b.iterations, b.rounds
    );
    let _ = writeln!(
        o,
        "{:<6} {:<11} {:<30} {:>9} | {:>30} | {:>30}",
        "kernel",
        "mode",
        "loop (syscalls/iter)",
        "baseline",
        "unwatched (+ns/syscall, ×)",
        "watched (+ns/syscall, ×)"
    );
    for r in rows {
        let cell = |v: f64| {
            if v.is_nan() || r.baseline.is_nan() {
                // A run the guest did not finish (it overran its time limit).
                return format!("{v:.0} (no ratio: run missing)");
            }
            format!(
                "{v:.0} ({:+.0}, ×{:.3})",
                (v - r.baseline) / r.syscalls as f64,
                v / r.baseline
            )
        };
        let _ = writeln!(
            o,
            "{:<6} {:<11} {:<30} {:>9.0} | {:>30} | {:>30}",
            r.kernel,
            r.mode,
            format!("{} ({})", r.label, r.syscalls),
            r.baseline,
            cell(r.unwatched),
            cell(r.watched)
        );
    }
    o
}

/// The last `n` lines of a long message (a verifier log ends with the rejected
/// instruction and the reason), with its first line kept.
fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    if lines.len() <= n {
        return text.to_string();
    }
    format!(
        "{}\n[… {} lines …]\n{}",
        lines[0],
        lines.len() - n,
        lines[lines.len() - n + 1..].join("\n")
    )
}

/// What this kernel offers, and what differs from the host.
fn describe(
    o: &mut String,
    s: &Sections,
    host: Option<&Sections>,
    is_host: bool,
    helpers: &BTreeSet<String>,
) {
    let btf = match s.get("btf") {
        Some((_, Some(0))) => "present",
        _ => "ABSENT",
    };
    let kprobes = match s.get("kprobes") {
        Some((_, Some(0))) => "present",
        _ => "absent",
    };
    let _ = writeln!(
        o,
        "   BTF {btf}, kprobes {kprobes}, LSMs {}",
        s.text("lsm").trim()
    );
    let check: Value = serde_json::from_str(s.text("check")).unwrap_or(Value::Null);
    if check.is_null() {
        let _ = writeln!(
            o,
            "   check printed no JSON:\n      {}",
            s.text("check").replace('\n', "\n      ")
        );
    } else {
        let _ = writeln!(
            o,
            "   check: ready={} mode: {}",
            check["ready"],
            check["mode"].as_str().unwrap_or("?")
        );
    }
    let offered = bpftool_helpers(s.text("bpftool"));
    if !offered.is_empty() && !helpers.is_empty() {
        let missing: Vec<&String> = helpers.difference(&offered).collect();
        if missing.is_empty() {
            let _ = writeln!(
                o,
                "   helpers: the {} (program type, helper) pairs the kernel object calls are all offered",
                helpers.len()
            );
        } else {
            let _ = writeln!(
                o,
                "   MISSING helpers the kernel object calls: {}",
                join(&missing)
            );
        }
    }
    let Some(host) = host.filter(|_| !is_host) else {
        return;
    };
    let host_check: Value = serde_json::from_str(host.text("check")).unwrap_or(Value::Null);
    let items = |v: &Value| -> BTreeMap<String, (bool, String)> {
        v["items"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|i| {
                (
                    i["name"].as_str().unwrap_or("").to_string(),
                    (
                        i["ok"].as_bool().unwrap_or(false),
                        i["detail"].as_str().unwrap_or("").to_string(),
                    ),
                )
            })
            .collect()
    };
    let (mine, theirs) = (items(&check), items(&host_check));
    for (name, (ok, detail)) in &mine {
        match theirs.get(name) {
            Some((hok, hdetail)) if hok == ok && hdetail == detail => {}
            Some((hok, hdetail)) => {
                let _ = writeln!(
                    o,
                    "   differs: check {name}: {} {detail} (host: {} {hdetail})",
                    if *ok { "ok" } else { "no" },
                    if *hok { "ok" } else { "no" }
                );
            }
            None => {
                let _ = writeln!(o, "   differs: check {name} only here: {detail}");
            }
        }
    }
    for (name, _, _) in &s.list {
        let Some(tp) = name.strip_prefix("format ") else {
            continue;
        };
        let here = format_fields(s.text(name));
        let there = format_fields(host.text(name));
        if here.is_empty() {
            let _ = writeln!(o, "   differs: tracepoint {tp} absent");
            continue;
        }
        for (field, at) in &there {
            match here.get(field) {
                None => {
                    let _ = writeln!(
                        o,
                        "   differs: tracepoint {tp}: no field {field} (host: offset {} size {})",
                        at.0, at.1
                    );
                }
                Some(h) if h != at => {
                    let _ = writeln!(o, "   differs: tracepoint {tp}: {field} at offset {} size {} (host: offset {} size {})", h.0, h.1, at.0, at.1);
                }
                Some(_) => {}
            }
        }
        for (field, at) in &here {
            if !there.contains_key(field) {
                let _ = writeln!(
                    o,
                    "   differs: tracepoint {tp}: field {field} at offset {} only here",
                    at.0
                );
            }
        }
    }
}

fn join(v: &[&String]) -> String {
    v.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
}

/// name → (offset, size) of a tracepoint `format`.
fn format_fields(text: &str) -> HashMap<String, (usize, usize)> {
    text.lines()
        .filter_map(|l| {
            let mut parts = l.trim().split(';').map(str::trim);
            let decl = parts.next()?.strip_prefix("field:")?;
            let name = decl
                .rsplit([' ', '*'])
                .find(|w| !w.is_empty())?
                .split('[')
                .next()?
                .to_string();
            let mut at = (None, None);
            for p in parts {
                if let Some(v) = p.strip_prefix("offset:") {
                    at.0 = v.parse().ok();
                } else if let Some(v) = p.strip_prefix("size:") {
                    at.1 = v.parse().ok();
                }
            }
            Some((name, (at.0?, at.1?)))
        })
        .collect()
}

/// The helpers `bpftool feature probe kernel` finds for each program type, as
/// `tracepoint: bpf_probe_read_user`. (Its program-type probes are not used: the
/// bookworm bpftool finds no `tracing` or `lsm` on 6.18, where `check` proves both.)
fn bpftool_helpers(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut helpers_of: Option<&str> = None;
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("eBPF helpers supported for program type ") {
            helpers_of = Some(rest.trim_end_matches(':').trim());
        } else if let (Some(t), Some(h)) = (helpers_of, line.trim_start().strip_prefix("- ")) {
            out.insert(format!("{t}: {}", h.trim()));
        } else if !line.trim().is_empty() {
            helpers_of = None;
        }
    }
    out
}

/// `program type: helper` for every helper call in the kernel object: BPF_CALL
/// instructions (opcode 0x85) with source register 0 (1 is a call to a subprogram),
/// whose immediate is the helper's id, in the executable sections, each named for its
/// program type (`tracepoint`, `uprobe`, `fentry/…`); `.text` (subprograms) counts for
/// every type in the object.
fn object_helpers(object: &Path) -> Result<BTreeSet<String>> {
    let names = helper_names()?;
    let data = fs::read(object)
        .with_context(|| format!("reading the kernel object {}", object.display()))?;
    let sections = elf_code_sections(&data).with_context(|| {
        format!(
            "{} is not a 64-bit little-endian ELF object",
            object.display()
        )
    })?;
    let program_type = |section: &str| -> Option<&'static str> {
        let kind = section.split('/').next().unwrap_or("");
        Some(match kind {
            "tracepoint" => "tracepoint",
            "uprobe" | "uretprobe" | "kprobe" | "kretprobe" => "kprobe",
            "fentry" | "fexit" | "tp_btf" | "fmod_ret" => "tracing",
            "raw_tracepoint" | "raw_tp" => "raw_tracepoint",
            "lsm" => "lsm",
            _ => return None,
        })
    };
    let types: BTreeSet<&str> = sections
        .iter()
        .filter_map(|(n, _)| program_type(n))
        .collect();
    let mut out = BTreeSet::new();
    for (section, code) in &sections {
        let of: Vec<&str> = match program_type(section) {
            Some(t) => vec![t],
            None if section == ".text" => types.iter().copied().collect(),
            None => continue,
        };
        for insn in code.chunks_exact(8) {
            if insn[0] == 0x85 && insn[1] >> 4 == 0 {
                let id = i32::from_le_bytes([insn[4], insn[5], insn[6], insn[7]]);
                let name = usize::try_from(id)
                    .ok()
                    .and_then(|i| names.get(i))
                    .map(|n| format!("bpf_{n}"))
                    .unwrap_or_else(|| format!("helper #{id}"));
                for t in &of {
                    out.insert(format!("{t}: {name}"));
                }
            }
        }
    }
    Ok(out)
}

/// Helper names by id, from `FN(name)` (ids in order) or `FN(name, id, …)` lines.
fn helper_names() -> Result<Vec<String>> {
    let text = fs::read_to_string(BPF_HEADER)
        .with_context(|| format!("reading {BPF_HEADER} (package linux-libc-dev)"))?;
    let mapper = text
        .find("__BPF_FUNC_MAPPER(FN")
        .map(|i| &text[i..])
        .ok_or_else(|| anyhow!("{BPF_HEADER} has no __BPF_FUNC_MAPPER"))?;
    let mut names: Vec<String> = Vec::new();
    for line in mapper.lines().skip(1) {
        let Some(inner) = line.trim().strip_prefix("FN(") else {
            if names.is_empty() {
                continue;
            }
            break;
        };
        let mut args = inner.split([',', ')']).map(str::trim);
        let name = args.next().unwrap_or("").to_string();
        let id = args
            .next()
            .and_then(|a| a.parse::<usize>().ok())
            .unwrap_or(names.len());
        if names.len() <= id {
            names.resize(id + 1, String::new());
        }
        names[id] = name;
    }
    Ok(names)
}

/// (name, bytes) of the executable sections of an ELF64 little-endian object.
fn elf_code_sections(data: &[u8]) -> Option<Vec<(String, &[u8])>> {
    let u16_at = |o: usize| Some(u16::from_le_bytes(data.get(o..o + 2)?.try_into().ok()?));
    let u32_at = |o: usize| Some(u32::from_le_bytes(data.get(o..o + 4)?.try_into().ok()?));
    let u64_at = |o: usize| Some(u64::from_le_bytes(data.get(o..o + 8)?.try_into().ok()?));
    if data.get(..6)? != b"\x7fELF\x02\x01" {
        return None;
    }
    let shoff = u64_at(0x28)? as usize;
    let (entsize, count, strndx) = (
        u16_at(0x3a)? as usize,
        u16_at(0x3c)? as usize,
        u16_at(0x3e)? as usize,
    );
    let header = |i: usize| shoff + i * entsize;
    let strtab = u64_at(header(strndx) + 0x18)? as usize;
    let mut out = Vec::new();
    for i in 0..count {
        let h = header(i);
        const SHF_EXECINSTR: u64 = 0x4;
        if u64_at(h + 0x08)? & SHF_EXECINSTR == 0 {
            continue;
        }
        let name_at = strtab + u32_at(h)? as usize;
        let name_len = data.get(name_at..)?.iter().position(|&b| b == 0)?;
        let name = String::from_utf8_lossy(&data[name_at..name_at + name_len]).into_owned();
        let (offset, size) = (u64_at(h + 0x18)? as usize, u64_at(h + 0x20)? as usize);
        out.push((name, data.get(offset..offset + size)?));
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_quick_run_forces_a_mode_on_each_debian_kernel_beside_the_default() {
        let expect = |quick| Expect {
            modes: vec!["default".into()],
            quick,
            bpftool: false,
            helpers: BTreeSet::new(),
        };
        assert_eq!(expect(true).modes_on("host"), ["default"]);
        assert_eq!(expect(true).modes_on("6.1"), ["default", "tracepoint"]);
        assert_eq!(expect(true).modes_on("6.12"), ["default", "fentry"]);
        assert_eq!(expect(false).modes_on("6.12"), ["default"]);
        // The full run has every mode already: none twice.
        let full = Expect {
            modes: vec!["fentry".into(), "tracepoint".into()],
            ..expect(true)
        };
        assert_eq!(full.modes_on("6.12"), ["fentry", "tracepoint"]);
    }

    #[test]
    fn capture_modes_are_read_from_the_help_without_auto() {
        let help = "      --capture-mode <MODE>  How sockets and files are captured [default: auto] [possible values: auto, fentry, tracepoint]\n      --json  x";
        assert_eq!(modes_from_help(help), ["fentry", "tracepoint"]);
        let long = "      --capture-mode <CAPTURE_MODE>\n          How sockets and files are captured\n\n          Possible values:\n          - auto:       fentry/fexit where this kernel has them\n          - fentry:     fentry/fexit programs\n          - tracepoint: Syscall tracepoints\n\n          [env: OPENBOX_CAPTURE_MODE=]\n\n  -h, --help\n          Print help\n          - not: a value";
        assert_eq!(modes_from_help(long), ["fentry", "tracepoint"]);
        assert!(modes_from_help("--json  One JSON object").is_empty());
    }

    #[test]
    fn sections_keep_their_status_and_an_unfinished_one_is_the_last_begun() {
        let text = "@@kmx begin uname\n6.1.0-57-cloud-amd64\n\n@@kmx end uname rc=0\n@@kmx begin check\n{\"a\":1}\n";
        let s = Sections::parse(text, PathBuf::from("/tmp/kmx"));
        assert_eq!(s.get("uname"), Some(("6.1.0-57-cloud-amd64", Some(0))));
        assert!(!s.done);
        assert_eq!(s.last_begun(), Some("check"));
    }

    #[test]
    fn the_newc_archive_lists_parents_first_and_pads_to_four_bytes() {
        let mut c = Cpio::default();
        c.file("/usr/bin/x", b"abc".to_vec(), 0o755);
        let out = c.finish();
        let text = String::from_utf8_lossy(&out);
        let usr = text.find("usr\0").unwrap();
        let bin = text.find("usr/bin\0").unwrap();
        let x = text.find("usr/bin/x\0").unwrap();
        assert!(usr < bin && bin < x);
        assert!(text.ends_with('\0') && out.len() % 4 == 0);
        assert!(text.contains("TRAILER!!!"));
    }

    #[test]
    fn bpftool_helpers_are_listed_per_program_type() {
        let text = "eBPF helpers supported for program type kprobe:\n\t- bpf_map_lookup_elem\n\t- bpf_probe_read_user\n\neBPF helpers supported for program type tracepoint:\n\t- bpf_ringbuf_reserve\nScanning miscellaneous eBPF features...\n";
        let h = bpftool_helpers(text);
        assert!(h.contains("kprobe: bpf_probe_read_user"));
        assert!(h.contains("tracepoint: bpf_ringbuf_reserve"));
        assert_eq!(h.len(), 3);
    }

    #[test]
    fn the_kernel_objects_helper_calls_are_named() {
        let names = helper_names().unwrap();
        assert_eq!(names[1], "map_lookup_elem");
        assert_eq!(names[131], "ringbuf_reserve");
        let object = crate::workspace_root().join("target/bpf/openbox-ebpf.o");
        if object.is_file() {
            let used = object_helpers(&object).unwrap();
            assert!(
                used.contains("tracepoint: bpf_get_current_pid_tgid"),
                "{used:?}"
            );
            assert!(used.contains("kprobe: bpf_probe_read_user"), "{used:?}");
        }
    }

    #[test]
    fn tracepoint_fields_are_read_with_offset_and_size() {
        let f = format_fields("\tfield:pid_t pid;\toffset:24;\tsize:4;\tsigned:1;\n\tfield:char comm[16];\toffset:8;\tsize:16;\tsigned:0;");
        assert_eq!(f["pid"], (24, 4));
        assert_eq!(f["comm"], (8, 16));
    }

    #[test]
    fn mmsg_batches_pass_only_when_every_copied_message_and_every_byte_is_there() {
        use base64::{engine::general_purpose::STANDARD, Engine as _};
        let messages: Vec<String> = (0..25).map(|i| format!("message-{i:02}\n")).collect();
        let sent = messages.concat();
        // Each copied message a record of its own; the last 4 of each call only in
        // the close's count.
        let records = |skip: Option<usize>| {
            let mut out = String::new();
            for (via, conn) in [("sendmmsg", "a"), ("recvmmsg", "b")] {
                let mut seq = 0;
                for (i, m) in messages[..21].iter().enumerate() {
                    if skip != Some(i) {
                        let data = STANDARD.encode(m);
                        out += &format!("{{\"type\":\"data\",\"via\":\"{via}\",\"conn\":\"{conn}\",\"seq\":{seq},\"data_b64\":\"{data}\"}}\n");
                    }
                    seq += m.len();
                }
            }
            let total = sent.len();
            out += &format!("{{\"type\":\"close\",\"conn\":\"a\",\"bytes_sent\":{total}}}\n");
            out += &format!("{{\"type\":\"close\",\"conn\":\"b\",\"bytes_received\":{total}}}\n");
            out
        };
        assert_eq!(mmsg_captured(&sent, &records(None)), Ok(()));
        let missing = mmsg_captured(&sent, &records(Some(7))).unwrap_err();
        assert!(missing.contains("sendmmsg: a gap"), "{missing}");
        let last = mmsg_captured(&sent, &records(Some(20))).unwrap_err();
        assert!(last.contains("not the first 21 messages"), "{last}");
    }
}
