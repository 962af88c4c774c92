//! What the agent needs from the kernel and its own privileges, checked before loading,
//! with errors that say what is missing and how to fix it.

use std::path::Path;

use anyhow::{bail, Result};

pub const CAP_SYS_ADMIN: u32 = 21;
pub const CAP_PERFMON: u32 = 38;
pub const CAP_BPF: u32 = 39;
pub const TRACEFS: &str = "/sys/kernel/tracing";

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
        "openbox-agent lacks {} (uid {}): it loads eBPF programs, which needs root or CAP_BPF and CAP_PERFMON. Run it as root (sudo openbox-agent …) or grant the capabilities: setcap cap_bpf,cap_perfmon,cap_dac_read_search,cap_sys_ptrace+ep $(command -v openbox-agent)",
        missing.join(" and "),
        unsafe { libc::geteuid() }
    );
}

/// Tracepoints are attached through tracefs: mount it when it is not mounted.
pub fn ensure_tracefs() -> Result<()> {
    if Path::new(TRACEFS).join("events").is_dir() {
        return Ok(());
    }
    if Path::new("/sys/kernel/debug/tracing/events").is_dir() {
        return Ok(());
    }
    let target = std::ffi::CString::new(TRACEFS).unwrap();
    let fstype = std::ffi::CString::new("tracefs").unwrap();
    // SAFETY: plain mount(2) with static C strings.
    let rc = unsafe {
        libc::mount(
            fstype.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 || !Path::new(TRACEFS).join("events").is_dir() {
        let err = std::io::Error::last_os_error();
        bail!(
            "tracefs is not mounted at {TRACEFS} and mounting it failed ({err}). Mount it with `mount -t tracefs nodev {TRACEFS}` (in a container, mount the host's /sys/kernel/tracing), then try again."
        );
    }
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

pub fn btf_present() -> bool {
    Path::new("/sys/kernel/btf/vmlinux").exists()
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
