//! TLS probes: finding the libssl copies a process uses, and attaching the uprobes on
//! their SSL_read/SSL_write functions for that process alone.
//!
//! Each probe is a perf event bound to one process: the kernel installs its breakpoint
//! only in that process's memory, so a process that is not watched never traps on it,
//! even when it runs the same libssl (a trap costs 1–3 µs before any program runs).
//! The price is a set of links per watched process: they are attached when it becomes
//! watched, forks or execs, or opens a libssl, and released when it exits or execs.

use std::{
    collections::{HashMap, HashSet},
    num::NonZeroU32,
    path::{Path, PathBuf},
    sync::mpsc,
};

use aya::{
    programs::{
        uprobe::{UProbeAttachLocation, UProbeLink, UProbeScope},
        UProbe,
    },
    Ebpf,
};
use object::{Object, ObjectSection, ObjectSymbol};

use super::{background::Programs, SSL_FUNCTIONS, SSL_RET_PROGRAM};

/// Probes attached at one time, over every process. Each is a perf event and a BPF
/// link (two descriptors); a process with one libssl has up to eight (four when the
/// internal functions are probed, see [`probe_points`]).
pub const MAX_TLS_PROBES: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error("uprobe target {path} not found ({reason}): check the path, or that the library still exists")]
    NotFound { path: PathBuf, reason: String },
    #[error("uprobe target {path} is not an ELF object ({reason}): it must be a libssl shared library, or a binary that exports SSL_write/SSL_read")]
    NotElf { path: PathBuf, reason: String },
    #[error("uprobe target {path} defines none of SSL_write, SSL_write_ex, SSL_read, SSL_read_ex: it is not a libssl (give the libssl.so the program maps, see /proc/PID/maps)")]
    NoSymbols { path: PathBuf },
    #[error("uprobe on {path} {func} failed: {reason} — run as root or grant the capabilities ({}); on kernels whose uprobe perf events refuse CAP_PERFMON (Linux 6.18 measured) also CAP_SYS_ADMIN; and check that the file is still there", crate::preflight::SETCAP)]
    Attach {
        path: PathBuf,
        func: String,
        reason: String,
    },
    #[error("TLS probes for process {pid} on {path} not attached: {MAX_TLS_PROBES} probes are attached already (a process with one libssl has up to 8); its TLS plaintext is not captured")]
    TooMany { pid: u32, path: PathBuf },
    #[error("{0}")]
    Internal(String),
}

/// A file's identity: (device, inode). One file reached through different paths (the
/// host's view, a container's /proc/PID/root) is one file, and two files at the same
/// path in different roots are two.
pub type FileId = (u64, u64);

/// (device, inode) of the file `path` leads to.
pub fn file_id(path: &Path) -> std::io::Result<FileId> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path)?;
    Ok((m.dev(), m.ino()))
}

/// One probe point: an entry program and the return program, attached at one file
/// offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProbePoint {
    /// The libssl function whose calls it captures (for messages).
    pub func: &'static str,
    /// The entry program (one of `SSL_FUNCTIONS`').
    pub program: &'static str,
    /// Where in the file: the function's entry, or the internal function it calls
    /// (see [`probe_points`]).
    pub offset: u64,
    /// Where a probe is placed instead of the exported entry, why.
    pub moved: Option<&'static str>,
}

/// The probe points for the libssl functions that `path` defines (not merely imports),
/// in `SSL_FUNCTIONS` order (see [`probe_points`] for where each goes).
pub fn ssl_symbols(path: &Path) -> Result<Vec<ProbePoint>, AttachError> {
    let data = std::fs::read(path).map_err(|e| AttachError::NotFound {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    let file = object::File::parse(&*data).map_err(|e| AttachError::NotElf {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    let mut found: HashMap<&'static str, u64> = HashMap::new();
    let mut write_ex2 = false;
    for sym in file.dynamic_symbols().chain(file.symbols()) {
        if sym.is_undefined() {
            continue;
        }
        let Ok(name) = sym.name() else { continue };
        // Versioned names appear as "SSL_write@@OPENSSL_3.0.0" in some tables.
        let base = name.split('@').next().unwrap_or(name);
        write_ex2 |= base == "SSL_write_ex2";
        let Some((func, _)) = SSL_FUNCTIONS.iter().find(|(f, _)| *f == base) else {
            continue;
        };
        if found.contains_key(func) {
            continue;
        }
        // A uprobe is placed at a file offset: the symbol's address translated through
        // the section that holds it (shared objects and executables are linked at
        // addresses that are not file offsets).
        let Some(section) = sym
            .section_index()
            .and_then(|i| file.section_by_index(i).ok())
        else {
            continue;
        };
        let Some((section_offset, _)) = section.file_range() else {
            continue;
        };
        let Ok(location) = UProbeAttachLocation::from_virtual_address(
            sym.address(),
            section.address(),
            section_offset,
        ) else {
            continue;
        };
        if let UProbeAttachLocation::AbsoluteOffset(offset) = location {
            found.insert(func, offset);
        }
    }
    let symbols: Vec<(&'static str, u64)> = SSL_FUNCTIONS
        .iter()
        .filter_map(|(f, _)| found.get(f).map(|o| (*f, *o)))
        .collect();
    if symbols.is_empty() {
        return Err(AttachError::NoSymbols {
            path: path.to_path_buf(),
        });
    }
    // OpenSSL 3.2 added a flags argument to its internal write function (the byte count
    // moved to the fifth argument): its internal functions are left alone there.
    Ok(probe_points(&data, &symbols, !write_ex2))
}

/// The instruction a uprobe traps on is either emulated by the kernel or executed
/// out of line under single-step, and the single-step's debug exception is what costs:
/// KVM intercepts every #DB of a guest, so on a virtual machine each one is a VM exit
/// (measured on the 2-core development VM, a uprobe on a function: 18.3 µs per call
/// when it starts with `sub $8,%rsp`, 0.4 µs when it starts with `push %r14` or a
/// `call`, which x86 uprobes emulate). OpenSSL's `SSL_write_ex` and `SSL_read_ex` (all
/// CPython calls) start with `sub $8,%rsp; call ssl_*_internal`, whose first instruction
/// is a push: so when `inner` is true and the code has that shape, the probe goes on the
/// internal function (entry and return: the return address is still on top of the
/// stack there). `ssl_write_internal(s, buf, num, written)` and
/// `ssl_read_internal(s, buf, num, readbytes)` take the `_ex` functions' arguments and
/// return 1 on success, so the `_ex` entry program reads them as before. `SSL_write`
/// and `SSL_read` call the same internal functions (the byte count through the fourth
/// argument): when their code calls it, they get no probe of their own (a call is
/// captured once, as an `_ex` call). Any other shape keeps the exported entry.
pub fn probe_points(data: &[u8], symbols: &[(&'static str, u64)], inner: bool) -> Vec<ProbePoint> {
    let code = |offset: u64| {
        usize::try_from(offset)
            .ok()
            .and_then(|o| data.get(o..))
            .unwrap_or(&[])
    };
    // The internal function each `_ex` function calls, when it is one to probe.
    let mut internal: HashMap<&'static str, u64> = HashMap::new();
    if inner {
        for (func, offset) in symbols {
            if matches!(*func, "SSL_write_ex" | "SSL_read_ex") {
                if let Some(target) = wrapper_call(code(*offset), *offset) {
                    if emulated_entry(code(target)).is_some() {
                        internal.insert(func, target);
                    }
                }
            }
        }
    }
    let mut points = Vec::new();
    for &(func, offset) in symbols {
        let Some((_, program)) = SSL_FUNCTIONS.iter().find(|(f, _)| *f == func) else {
            continue;
        };
        let ex = match func {
            "SSL_write" => "SSL_write_ex",
            "SSL_read" => "SSL_read_ex",
            _ => func,
        };
        if let Some(&target) = internal.get(ex) {
            if ex != func {
                if calls(code(offset), offset, target) {
                    // Covered by the internal function's probe.
                    continue;
                }
            } else {
                points.push(ProbePoint {
                    func,
                    program,
                    offset: target + emulated_entry(code(target)).unwrap_or(0),
                    moved: Some("the internal function it calls"),
                });
                continue;
            }
        }
        points.push(ProbePoint {
            func,
            program,
            offset: offset + emulated_entry(code(offset)).unwrap_or(0),
            moved: None,
        });
    }
    points
}

const ENDBR64: [u8; 4] = [0xf3, 0x0f, 0x1e, 0xfa];

/// Where the first instruction the kernel emulates (a push of a register) begins in a
/// function's code: 0, or 4 after an `endbr64` (which changes nothing, so a probe after
/// it still sees the return address on top of the stack). None: the first instruction
/// would be single-stepped.
fn emulated_entry(code: &[u8]) -> Option<u64> {
    let skip = if code.starts_with(&ENDBR64) { 4 } else { 0 };
    // push %reg, or push %r8..%r15 (REX.B 0x41): what x86 uprobes emulate.
    let push = matches!(
        code.get(skip..),
        Some([0x50..=0x57, ..] | [0x41, 0x50..=0x57, ..])
    );
    push.then_some(skip as u64)
}

/// The file offset of the function a wrapper starts by calling: code (at file offset
/// `offset`) of the shape `[endbr64] sub $imm8,%rsp; call rel32`.
fn wrapper_call(code: &[u8], offset: u64) -> Option<u64> {
    let skip = if code.starts_with(&ENDBR64) { 4 } else { 0 };
    match code.get(skip..)? {
        [0x48, 0x83, 0xec, _, 0xe8, r0, r1, r2, r3, ..] => {
            let rel = i32::from_le_bytes([*r0, *r1, *r2, *r3]);
            offset.checked_add_signed(skip as i64 + 9 + i64::from(rel))
        }
        _ => None,
    }
}

/// Whether the first 256 bytes of code (at file offset `offset`) hold a `call rel32`
/// to file offset `target` (a byte-wise scan: a stray match needs four exact bytes).
fn calls(code: &[u8], offset: u64, target: u64) -> bool {
    let code = &code[..code.len().min(256)];
    code.windows(5).enumerate().any(|(i, w)| {
        w[0] == 0xe8
            && offset.checked_add_signed(
                i as i64 + 5 + i64::from(i32::from_le_bytes([w[1], w[2], w[3], w[4]])),
            ) == Some(target)
    })
}

/// What the TLS probes amount to, for the summary and the daemon's status.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct TlsProbeStats {
    /// Processes with TLS probes now.
    pub processes: u64,
    /// Probes (entry and return, each a uprobe link) attached now.
    pub probes: u64,
    /// Probes attached since the start.
    pub attached: u64,
    /// Probes released since the start (their process exited or replaced its image).
    pub released: u64,
    /// Probes that could not be attached (each failure also logged): the functions of
    /// those processes and libraries whose plaintext is not captured.
    pub not_attached: u64,
}

/// The TLS probes of every watched process.
pub struct TlsProbes {
    /// Function offsets, by file: each libssl is parsed once.
    symbols: HashMap<FileId, Vec<ProbePoint>>,
    /// Files that define none of the functions (a process's executable, mostly): not
    /// parsed again at each fork or exec of a watched process.
    not_ssl: HashSet<FileId>,
    /// Links by process and by library.
    by_pid: HashMap<u32, HashMap<FileId, Vec<UProbeLink>>>,
    /// Libraries named with `--tls-lib`: probed in a watched process that maps them,
    /// whatever their name.
    named: HashSet<FileId>,
    count: usize,
    stats: TlsProbeStats,
    /// Closing a uprobe's perf event waits for the kernel to unregister it (an RCU
    /// grace period): done on a thread of its own so the pipeline never waits.
    release: Option<mpsc::Sender<Vec<UProbeLink>>>,
}

impl Default for TlsProbes {
    fn default() -> Self {
        let (tx, rx) = mpsc::channel::<Vec<UProbeLink>>();
        let release = std::thread::Builder::new()
            .name("tls-release".into())
            .spawn(move || {
                for links in rx {
                    drop(links);
                }
            })
            .ok()
            .map(|_| tx);
        TlsProbes {
            symbols: HashMap::new(),
            not_ssl: HashSet::new(),
            by_pid: HashMap::new(),
            named: HashSet::new(),
            count: 0,
            stats: TlsProbeStats::default(),
            release,
        }
    }
}

impl TlsProbes {
    /// Checks a library given with `--tls-lib` and remembers it as one to probe.
    pub fn name(&mut self, path: &Path) -> Result<(), AttachError> {
        let id = file_id(path).map_err(|e| AttachError::NotFound {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        let symbols = ssl_symbols(path)?;
        self.symbols.insert(id, symbols);
        self.named.insert(id);
        Ok(())
    }

    pub fn is_named(&self, id: FileId) -> bool {
        self.named.contains(&id)
    }

    pub fn has(&self, pid: u32, id: FileId) -> bool {
        self.by_pid
            .get(&pid)
            .is_some_and(|libs| libs.contains_key(&id))
    }

    pub fn has_any(&self, pid: u32) -> bool {
        self.by_pid.get(&pid).is_some_and(|libs| !libs.is_empty())
    }

    pub fn stats(&self) -> TlsProbeStats {
        TlsProbeStats {
            processes: self.by_pid.values().filter(|l| !l.is_empty()).count() as u64,
            probes: self.count as u64,
            ..self.stats
        }
    }

    /// Attaches entry and return probes to the libssl functions of `path` for process
    /// `pid` alone. `path` is opened as given: for a process in another root, pass its
    /// path under /proc/PID/root ([`crate::procfs::in_root`]); the kernel resolves it
    /// the same way and probes that file. Returns the number of probes attached (0:
    /// they were already).
    ///
    /// The libssl programs may still be loading (see [`super::background`]): they are
    /// waited for only once `path` is known to be a libssl.
    pub fn attach(
        &mut self,
        programs: &mut Programs,
        pid: u32,
        path: &Path,
    ) -> Result<usize, AttachError> {
        let id = file_id(path).map_err(|e| AttachError::NotFound {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        if self.has(pid, id) {
            return Ok(0);
        }
        let scope = NonZeroU32::new(pid)
            .map(UProbeScope::OneProcess)
            .ok_or_else(|| AttachError::Internal("process id 0".into()))?;
        // Absolute, but with links unresolved: resolving /proc/PID/root would lead back
        // into the agent's own root.
        let path = &std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
        if self.not_ssl.contains(&id) {
            return Err(AttachError::NoSymbols { path: path.clone() });
        }
        let symbols = match self.symbols.get(&id) {
            Some(s) => s.clone(),
            None => match ssl_symbols(path) {
                Ok(s) => {
                    for point in &s {
                        tracing::debug!(
                            path = %path.display(),
                            func = point.func,
                            offset = point.offset,
                            moved = point.moved.unwrap_or("no"),
                            "libssl probe point"
                        );
                    }
                    self.symbols.insert(id, s.clone());
                    s
                }
                Err(e) => {
                    if matches!(
                        e,
                        AttachError::NoSymbols { .. } | AttachError::NotElf { .. }
                    ) {
                        self.not_ssl.insert(id);
                    }
                    return Err(e);
                }
            },
        };
        let wanted = 2 * symbols.len();
        if self.count + wanted > MAX_TLS_PROBES {
            self.forget_gone();
        }
        if self.count + wanted > MAX_TLS_PROBES {
            self.stats.not_attached += wanted as u64;
            return Err(AttachError::TooMany {
                pid,
                path: path.clone(),
            });
        }
        let ebpf = programs
            .get()
            .ok_or_else(|| AttachError::Internal("capture has ended".into()))?;
        // The entry program keeps the call's arguments for this thread until the return
        // program takes them, and while they are kept every socket call of the thread is
        // taken for this TLS call's ciphertext (`FLAG_IN_SSL`): an entry that runs without
        // its return marks the thread's next plain connection TLS for good, and links
        // this SSL object to it. So each function's return probe is attached first (a
        // call entered after it returns through it; one entered before is not seen at
        // all), its entry probe only when that worked, and the entries are released
        // first (`links`: entries, then returns; a Vec drops in order). A restarted
        // agent attaches while the last one's detach holds the kernel's trace-event lock,
        // which can stretch the gap between two attaches to seconds.
        //
        // Reads before writes: between a write probe and a read probe, a request would be
        // captured and its response not, and the parser, in step with one request too
        // many, would pair each later response of the connection with an earlier request
        // (seen after an agent restart: every HTTPS span of a pooled connection on the
        // wrong request). A response whose request was missed is an orphan instead, which
        // the parser counts and drops.
        let mut points: Vec<&ProbePoint> = symbols.iter().collect();
        points.sort_by_key(|p| !matches!(p.program, "ssl_read" | "ssl_read_ex"));
        let (mut entries, mut returns) = (Vec::new(), Vec::new());
        let mut failure = None;
        for point in points {
            let attached = attach_one(ebpf, SSL_RET_PROGRAM, path, point.offset, scope)
                .map_err(|reason| (reason, "return"))
                .and_then(|ret| {
                    returns.push(ret);
                    test_hold_between_probes();
                    attach_one(ebpf, point.program, path, point.offset, scope)
                        .map_err(|reason| (reason, "entry"))
                });
            match attached {
                Ok(link) => entries.push(link),
                Err((reason, what)) => {
                    // A return probe that failed leaves its entry unattached too.
                    self.stats.not_attached += if what == "return" { 2 } else { 1 };
                    failure.get_or_insert(AttachError::Attach {
                        path: path.clone(),
                        func: format!("{} ({what})", point.func),
                        reason,
                    });
                }
            }
        }
        let mut links = entries;
        links.append(&mut returns);
        let attached = links.len();
        if attached > 0 {
            self.count += attached;
            self.stats.attached += attached as u64;
            self.by_pid.entry(pid).or_default().insert(id, links);
        }
        match failure {
            Some(e) => Err(e),
            None => Ok(attached),
        }
    }

    /// Releases every probe of a process (it exited).
    pub fn release(&mut self, pid: u32) {
        if let Some(libs) = self.by_pid.remove(&pid) {
            for (_, links) in libs {
                self.drop_links(links);
            }
        }
    }

    /// Releases the probes of a process on libraries it no longer maps (it replaced
    /// its image): the new image's are attached as it maps them.
    pub fn retain(&mut self, pid: u32, mapped: &HashSet<FileId>) {
        let Some(libs) = self.by_pid.get_mut(&pid) else {
            return;
        };
        let gone: Vec<FileId> = libs
            .keys()
            .filter(|id| !mapped.contains(id))
            .copied()
            .collect();
        let dropped: Vec<Vec<UProbeLink>> = gone.iter().filter_map(|id| libs.remove(id)).collect();
        if libs.is_empty() {
            self.by_pid.remove(&pid);
        }
        for links in dropped {
            self.drop_links(links);
        }
    }

    /// Releases the probes of processes that are gone without the agent seeing their
    /// exit (a lost record).
    fn forget_gone(&mut self) {
        let gone: Vec<u32> = self
            .by_pid
            .keys()
            .filter(|pid| !Path::new(&format!("/proc/{pid}")).exists())
            .copied()
            .collect();
        for pid in gone {
            self.release(pid);
        }
    }

    fn drop_links(&mut self, links: Vec<UProbeLink>) {
        self.count -= links.len();
        self.stats.released += links.len() as u64;
        match &self.release {
            Some(tx) => {
                // The thread is gone only if it panicked: close them here then.
                if let Err(mpsc::SendError(links)) = tx.send(links) {
                    drop(links);
                }
            }
            None => drop(links),
        }
    }
}

/// Tests only: `OPENBOX_TEST_TLS_PROBE_GAP_MS` milliseconds between a function's
/// return and entry probes, to widen the window a loaded kernel opens there (see
/// [`TlsProbes::attach`]).
fn test_hold_between_probes() {
    if let Some(ms) = std::env::var("OPENBOX_TEST_TLS_PROBE_GAP_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        std::thread::sleep(std::time::Duration::from_millis(ms));
    }
}

/// One uprobe for one process, owned by the caller (dropping it detaches it).
fn attach_one(
    ebpf: &mut Ebpf,
    program: &str,
    path: &Path,
    offset: u64,
    scope: UProbeScope,
) -> Result<UProbeLink, String> {
    let p: &mut UProbe = ebpf
        .program_mut(program)
        .and_then(|p| p.try_into().ok())
        .ok_or_else(|| format!("program {program} missing from the kernel object"))?;
    let id = p
        .attach(UProbeAttachLocation::AbsoluteOffset(offset), path, scope)
        .map_err(|e| with_causes(&e))?;
    p.take_link(id).map_err(|e| with_causes(&e))
}

/// An error with its causes: aya's "`perf_event_open` failed" alone hides the errno that
/// says which privilege is missing.
pub(super) fn with_causes(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}

/// Whether a mapped file is worth checking for libssl symbols: named like libssl, or
/// the process's executable (node and others link OpenSSL in statically).
pub fn may_hold_libssl(path: &str, exe: Option<&str>) -> bool {
    let base = path.rsplit('/').next().unwrap_or(path);
    base.contains("libssl") || Some(path) == exe
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libssl_copies_and_executables_are_worth_checking() {
        assert!(may_hold_libssl(
            "/usr/lib/x86_64-linux-gnu/libssl.so.3",
            None
        ));
        assert!(may_hold_libssl(
            "/opt/venv/lib/python3.11/site-packages/psycopg2_binary.libs/libssl-81ffa89e.so.3",
            None
        ));
        assert!(!may_hold_libssl("/usr/lib/libcrypto.so.3", None));
        assert!(may_hold_libssl("/usr/bin/node", Some("/usr/bin/node")));
        assert!(!may_hold_libssl(
            "/usr/bin/python3.11",
            Some("/usr/bin/node")
        ));
    }

    /// Code laid out as Debian's OpenSSL 3.0 builds it: each `_ex` function a wrapper
    /// (`sub $8,%rsp; call internal`), the internal functions starting with pushes.
    fn wrapped_library() -> Vec<u8> {
        let mut data = vec![0xccu8; 0x500];
        let mut put = |at: usize, bytes: &[u8]| data[at..at + bytes.len()].copy_from_slice(bytes);
        let call = |from: usize, to: usize| {
            let rel = (to as i64 - (from as i64 + 5)) as i32;
            let mut b = vec![0xe8];
            b.extend_from_slice(&rel.to_le_bytes());
            b
        };
        // SSL_write_ex at 0x100 → 0x200; SSL_write at 0x150 calls 0x200 further in.
        put(0x100, &[0x48, 0x83, 0xec, 0x08]);
        put(0x104, &call(0x104, 0x200));
        put(0x150, &[0x48, 0x83, 0xec, 0x18, 0x31, 0xc0]);
        put(0x170, &call(0x170, 0x200));
        put(0x200, &[0x41, 0x56, 0x41, 0x55]);
        // SSL_read_ex at 0x300 (after endbr64) → 0x400 (endbr64, push); SSL_read at
        // 0x350 calls something else.
        put(0x300, &[0xf3, 0x0f, 0x1e, 0xfa, 0x48, 0x83, 0xec, 0x08]);
        put(0x308, &call(0x308, 0x400));
        put(0x350, &[0x48, 0x83, 0xec, 0x18]);
        put(0x360, &call(0x360, 0x480));
        put(0x400, &[0xf3, 0x0f, 0x1e, 0xfa, 0x55]);
        data
    }

    const WRAPPED: [(&str, u64); 4] = [
        ("SSL_write", 0x150),
        ("SSL_write_ex", 0x100),
        ("SSL_read", 0x350),
        ("SSL_read_ex", 0x300),
    ];

    #[test]
    fn wrapper_functions_are_probed_at_the_internal_function_they_call() {
        let points = probe_points(&wrapped_library(), &WRAPPED, true);
        let at: Vec<(&str, &str, u64)> = points
            .iter()
            .map(|p| (p.func, p.program, p.offset))
            .collect();
        assert_eq!(
            at,
            [
                // SSL_write calls the internal function: its calls are captured there.
                ("SSL_write_ex", "ssl_write_ex", 0x200),
                // SSL_read calls another function: it keeps its own probe.
                ("SSL_read", "ssl_read", 0x350),
                // After the internal function's endbr64, on its push.
                ("SSL_read_ex", "ssl_read_ex", 0x404),
            ]
        );
    }

    #[test]
    fn without_internal_functions_every_function_is_probed_at_its_entry() {
        let points = probe_points(&wrapped_library(), &WRAPPED, false);
        let at: Vec<(&str, u64)> = points.iter().map(|p| (p.func, p.offset)).collect();
        assert_eq!(
            at,
            [
                ("SSL_write", 0x150),
                ("SSL_write_ex", 0x100),
                ("SSL_read", 0x350),
                ("SSL_read_ex", 0x300),
            ]
        );
        // A function of another shape keeps its entry too.
        let mut data = wrapped_library();
        data[0x104] = 0x90;
        let points = probe_points(&data, &WRAPPED, true);
        assert!(points
            .iter()
            .any(|p| p.func == "SSL_write_ex" && p.offset == 0x100));
        assert!(points
            .iter()
            .any(|p| p.func == "SSL_write" && p.offset == 0x150));
    }

    #[test]
    fn a_file_without_libssl_symbols_is_refused_with_its_path() {
        let err = ssl_symbols(Path::new("/etc/hostname"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("/etc/hostname"), "{err}");
        let err = ssl_symbols(Path::new("/nonexistent/libssl.so.3"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("not found"), "{err}");
    }
}
