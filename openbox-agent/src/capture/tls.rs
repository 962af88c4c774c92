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
/// link (two descriptors); a process with one libssl has eight.
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
    #[error("TLS probes for process {pid} on {path} not attached: {MAX_TLS_PROBES} probes are attached already (a process with one libssl has 8); its TLS plaintext is not captured")]
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

/// The probed libssl functions that `path` defines (not merely imports), with their
/// offsets in the file (what a uprobe is attached at), in `SSL_FUNCTIONS` order.
pub fn ssl_symbols(path: &Path) -> Result<Vec<(&'static str, u64)>, AttachError> {
    let data = std::fs::read(path).map_err(|e| AttachError::NotFound {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    let file = object::File::parse(&*data).map_err(|e| AttachError::NotElf {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    let mut found: HashMap<&'static str, u64> = HashMap::new();
    for sym in file.dynamic_symbols().chain(file.symbols()) {
        if sym.is_undefined() {
            continue;
        }
        let Ok(name) = sym.name() else { continue };
        // Versioned names appear as "SSL_write@@OPENSSL_3.0.0" in some tables.
        let base = name.split('@').next().unwrap_or(name);
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
    Ok(symbols)
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
    symbols: HashMap<FileId, Vec<(&'static str, u64)>>,
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
        let (mut entries, mut returns) = (Vec::new(), Vec::new());
        let mut failure = None;
        for (func, offset) in &symbols {
            let Some((_, entry)) = SSL_FUNCTIONS.iter().find(|(f, _)| f == func) else {
                continue;
            };
            let attached = attach_one(ebpf, SSL_RET_PROGRAM, path, *offset, scope)
                .map_err(|reason| (reason, "return"))
                .and_then(|ret| {
                    returns.push(ret);
                    test_hold_between_probes();
                    attach_one(ebpf, entry, path, *offset, scope)
                        .map_err(|reason| (reason, "entry"))
                });
            match attached {
                Ok(link) => entries.push(link),
                Err((reason, what)) => {
                    // A return probe that failed leaves its entry unattached too.
                    self.stats.not_attached += if what == "return" { 2 } else { 1 };
                    failure.get_or_insert(AttachError::Attach {
                        path: path.clone(),
                        func: format!("{func} ({what})"),
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
