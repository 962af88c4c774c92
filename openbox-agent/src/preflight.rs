//! What the agent needs from the kernel and its own privileges, checked before loading,
//! with errors that say what is missing and how to fix it.

use std::path::Path;

use anyhow::{bail, Result};

pub const CAP_KILL: u32 = 5;
pub const CAP_SYS_ADMIN: u32 = 21;
pub const CAP_PERFMON: u32 = 38;
pub const CAP_BPF: u32 = 39;
pub const TRACEFS: &str = "/sys/kernel/tracing";
const DEBUGFS_TRACING: &str = "/sys/kernel/debug/tracing";

/// The capabilities the agent uses, as `setcap` wants them: CAP_KILL resumes processes
/// of other users that the kernel paused while TLS probes are attached.
pub const SETCAP: &str = "setcap cap_bpf,cap_perfmon,cap_dac_read_search,cap_sys_ptrace,cap_kill+ep $(command -v openbox-agent)";

/// Why a kernel file the agent reads is not usable: absent, or there but not readable
/// by us (tracefs is mode 0700: only root or CAP_DAC_READ_SEARCH sees inside).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Access {
    Present,
    Absent,
    Denied,
}

impl Access {
    pub fn of(path: &Path) -> Access {
        match std::fs::metadata(path) {
            Ok(_) => Access::Present,
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => Access::Denied,
            Err(_) => Access::Absent,
        }
    }
}

/// What to tell a user who cannot read a kernel file.
pub fn denied(path: &str) -> String {
    format!("{path}: permission denied (run as root or grant the capabilities: {SETCAP})")
}

/// The tracefs events directory, when one is mounted and readable.
pub fn tracefs_events() -> Result<std::path::PathBuf, Access> {
    let mut denied = false;
    for root in [TRACEFS, DEBUGFS_TRACING] {
        let events = Path::new(root).join("events");
        match Access::of(&events) {
            Access::Present if events.is_dir() => return Ok(events),
            // A 0700 mount point hides even whether `events` exists (EACCES).
            Access::Denied => denied = true,
            _ => {}
        }
    }
    Err(if denied {
        Access::Denied
    } else {
        Access::Absent
    })
}

/// The effective capability set of this process.
pub fn effective_caps() -> u64 {
    ::procfs::process::Process::myself()
        .and_then(|me| me.status())
        .map(|s| s.capeff)
        .unwrap_or(0)
}

pub fn has_cap(caps: u64, cap: u32) -> bool {
    caps & (1u64 << cap) != 0
}

/// Loading programs needs CAP_BPF, and tracing programs CAP_PERFMON (or CAP_SYS_ADMIN
/// on its own, as root has).
pub fn require_privileges() -> Result<()> {
    let caps = effective_caps();
    let bpf = has_cap(caps, CAP_BPF) || has_cap(caps, CAP_SYS_ADMIN);
    let perfmon = has_cap(caps, CAP_PERFMON) || has_cap(caps, CAP_SYS_ADMIN);
    if bpf && perfmon {
        return Ok(());
    }
    let mut missing = Vec::new();
    if !bpf {
        missing.push("CAP_BPF");
    }
    if !perfmon {
        missing.push("CAP_PERFMON");
    }
    bail!(
        "openbox-agent lacks {} (uid {}): it loads eBPF programs, which needs root or CAP_BPF and CAP_PERFMON (and CAP_KILL to resume other users' processes it pauses while attaching TLS probes). Run it as root (sudo openbox-agent …) or grant the capabilities: {SETCAP}",
        missing.join(" and "),
        unsafe { libc::geteuid() }
    );
}

/// Tracepoints are attached through tracefs: mount it when it is not mounted.
pub fn ensure_tracefs() -> Result<()> {
    match tracefs_events() {
        Ok(_) => return Ok(()),
        Err(Access::Denied) => bail!("tracefs at {}", denied(TRACEFS)),
        Err(_) => {}
    }
    let mounted = mount("tracefs", TRACEFS);
    if mounted.is_err() || !Path::new(TRACEFS).join("events").is_dir() {
        let err = mounted.err().unwrap_or_else(std::io::Error::last_os_error);
        bail!(
            "tracefs is not mounted at {TRACEFS} and mounting it failed ({err}). Mount it with `mount -t tracefs nodev {TRACEFS}` (in a container, mount the host's /sys/kernel/tracing), then try again."
        );
    }
    Ok(())
}

/// mount(2) of a pseudo filesystem of type `fstype` (also its source name) at `target`.
fn mount(fstype: &str, target: &str) -> std::io::Result<()> {
    let target = std::ffi::CString::new(target)?;
    let fstype = std::ffi::CString::new(fstype)?;
    // SAFETY: plain mount(2) with NUL-terminated strings that outlive the call.
    let rc = unsafe {
        libc::mount(
            fstype.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

pub const BPFFS: &str = "/sys/fs/bpf";
/// statfs(2) f_type of a bpffs mount.
const BPF_FS_MAGIC: i64 = 0xcafe4a11;

/// Whether a bpffs is mounted at [`BPFFS`].
pub fn bpffs_mounted() -> bool {
    let path = std::ffi::CString::new(BPFFS).unwrap();
    // SAFETY: statfs(2) writes into the zeroed struct we pass.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statfs(path.as_ptr(), &mut st) };
    rc == 0 && st.f_type as i64 == BPF_FS_MAGIC
}

/// The paused processes' records are pinned in bpffs, so they outlive a crashed agent:
/// mount it when it is not mounted.
pub fn ensure_bpffs() -> Result<()> {
    if bpffs_mounted() {
        return Ok(());
    }
    let mounted = mount("bpf", BPFFS);
    if mounted.is_err() || !bpffs_mounted() {
        let err = mounted.err().unwrap_or_else(std::io::Error::last_os_error);
        bail!(
            "bpffs is not mounted at {BPFFS} and mounting it failed ({err}). Mount it with `mount -t bpf bpf {BPFFS}` (in a container, mount the host's {BPFFS}, so that what an agent leaves there outlives the container)"
        );
    }
    tracing::info!("mounted bpffs at {BPFFS}");
    Ok(())
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK.
pub fn raise_memlock() {
    let rlim = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit with a valid struct.
    unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &rlim) };
}

pub const BTF: &str = "/sys/kernel/btf/vmlinux";

pub fn btf() -> Access {
    Access::of(Path::new(BTF))
}

/// Raises the soft limit on open files to the hard limit: the daemon holds a socket per
/// hook connection and the kernel objects besides, and the usual soft limit (1024) is
/// reached by a thousand idle connections, after which a real worker cannot register.
/// A failure is logged, not fatal: the agent still works up to the old limit.
pub fn raise_nofile_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        let e = std::io::Error::last_os_error();
        tracing::warn!("reading the open-files limit (RLIMIT_NOFILE) failed: {e}");
        return;
    }
    let old = lim.rlim_cur;
    if old >= lim.rlim_max {
        tracing::debug!(
            soft = old,
            hard = lim.rlim_max,
            "open-files limit already at its hard limit"
        );
        return;
    }
    lim.rlim_cur = lim.rlim_max;
    // SAFETY: setrlimit reads the struct we pass.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
        let e = std::io::Error::last_os_error();
        tracing::warn!(
            "raising the open-files limit from {old} to {} failed: {e}; the agent may run out of file descriptors with many hook connections (raise it with `ulimit -n`)",
            lim.rlim_max
        );
        return;
    }
    tracing::info!(
        old,
        new = lim.rlim_max,
        "raised the open-files limit (RLIMIT_NOFILE)"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capability_bits_are_read_by_number() {
        let caps = (1u64 << CAP_BPF) | (1u64 << CAP_PERFMON);
        assert!(has_cap(caps, CAP_BPF));
        assert!(has_cap(caps, CAP_PERFMON));
        assert!(!has_cap(caps, CAP_SYS_ADMIN));
    }
}
