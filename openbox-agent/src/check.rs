//! `openbox-agent check`: what this kernel offers, what privileges the agent holds, the
//! mode it will use, and what to do about anything missing.

use std::path::Path;

use serde::Serialize;

use crate::preflight::{self, CAP_BPF, CAP_PERFMON, CAP_SYS_ADMIN, TRACEFS};

#[derive(Debug, Serialize)]
pub struct Item {
    pub name: &'static str,
    pub ok: bool,
    pub detail: String,
    /// What to do when it is missing; empty when nothing is needed.
    pub fix: String,
    /// Whether the agent cannot run without it.
    pub required: bool,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub kernel: String,
    pub items: Vec<Item>,
    pub mode: String,
    pub ready: bool,
}

fn exists(p: &str) -> bool {
    Path::new(p).exists()
}

/// A kernel build option from /proc/config.gz (read with zcat), when the kernel has it.
fn kernel_config(name: &str) -> Option<bool> {
    let o = std::process::Command::new("zcat")
        .arg("/proc/config.gz")
        .output()
        .ok()?;
    if !o.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&o.stdout);
    Some(
        text.lines()
            .any(|l| l == format!("{name}=y") || l == format!("{name}=m")),
    )
}

/// Creates (and closes) a BPF ring buffer map: the definitive test that the kernel has
/// them and that we may create maps.
fn ringbuf_supported() -> Result<(), String> {
    #[repr(C)]
    struct MapCreate {
        map_type: u32,
        key_size: u32,
        value_size: u32,
        max_entries: u32,
        map_flags: u32,
        _rest: [u8; 108],
    }
    const BPF_MAP_CREATE: libc::c_long = 0;
    const BPF_MAP_TYPE_RINGBUF: u32 = 27;
    let attr = MapCreate {
        map_type: BPF_MAP_TYPE_RINGBUF,
        key_size: 0,
        value_size: 0,
        max_entries: 4096,
        map_flags: 0,
        _rest: [0; 108],
    };
    // SAFETY: bpf(2) with a zero-padded attribute of the size we pass.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_CREATE,
            &attr as *const MapCreate,
            std::mem::size_of::<MapCreate>(),
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error().to_string());
    }
    // SAFETY: closing the fd we just got.
    unsafe { libc::close(fd as i32) };
    Ok(())
}

fn lsm_list() -> Option<String> {
    if !exists("/sys/kernel/security/lsm") {
        let t = std::ffi::CString::new("/sys/kernel/security").unwrap();
        let f = std::ffi::CString::new("securityfs").unwrap();
        // SAFETY: mount(2) with C strings; failure is reported below.
        unsafe { libc::mount(f.as_ptr(), t.as_ptr(), f.as_ptr(), 0, std::ptr::null()) };
    }
    std::fs::read_to_string("/sys/kernel/security/lsm")
        .ok()
        .map(|s| s.trim().to_string())
}

pub fn report() -> Report {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into());
    let mut items = Vec::new();
    let tracefs_ok = preflight::ensure_tracefs().is_ok();
    let events = if exists(&format!("{TRACEFS}/events")) {
        format!("{TRACEFS}/events")
    } else {
        "/sys/kernel/debug/tracing/events".to_string()
    };
    items.push(Item {
        name: "tracefs",
        ok: tracefs_ok,
        detail: if tracefs_ok {
            format!("mounted ({events})")
        } else {
            "not mounted".into()
        },
        fix: if tracefs_ok {
            String::new()
        } else {
            format!("mount -t tracefs nodev {TRACEFS}")
        },
        required: true,
    });
    let syscalls = Path::new(&events).join("syscalls/sys_enter_write").exists();
    items.push(Item {
        name: "syscall tracepoints",
        ok: syscalls,
        detail: if syscalls {
            let n = std::fs::read_dir(Path::new(&events).join("syscalls"))
                .map(|d| d.count())
                .unwrap_or(0);
            format!("{n} syscalls:* events")
        } else {
            "absent".into()
        },
        fix: if syscalls {
            String::new()
        } else {
            "a kernel built with CONFIG_FTRACE_SYSCALLS=y".into()
        },
        required: true,
    });
    if tracefs_ok {
        let layouts = crate::capture::tracefs::check_kernel();
        items.push(Item {
            name: "tracepoint layouts",
            ok: layouts.is_ok(),
            detail: match &layouts {
                Ok(()) => "every field the kernel programs read is where they read it".into(),
                Err(e) => format!("{e:#}"),
            },
            fix: if layouts.is_ok() {
                String::new()
            } else {
                "a kernel whose tracepoint layout matches (see the detail)".into()
            },
            required: true,
        });
    }
    let uprobes = exists("/sys/bus/event_source/devices/uprobe");
    items.push(Item {
        name: "uprobes",
        ok: uprobes,
        detail: if uprobes {
            "uprobe PMU present".into()
        } else {
            "absent".into()
        },
        fix: if uprobes {
            String::new()
        } else {
            "a kernel built with CONFIG_UPROBE_EVENTS=y; without it TLS plaintext is not captured"
                .into()
        },
        required: false,
    });
    let kprobes = exists("/sys/bus/event_source/devices/kprobe")
        || kernel_config("CONFIG_KPROBES") == Some(true);
    items.push(Item {
        name: "kprobes",
        ok: kprobes,
        detail: if kprobes {
            "present".into()
        } else {
            "absent (CONFIG_KPROBES not set)".into()
        },
        fix: String::new(),
        required: false,
    });
    let btf = preflight::btf_present();
    items.push(Item {
        name: "BTF",
        ok: btf,
        detail: if btf { "/sys/kernel/btf/vmlinux".into() } else { "absent".into() },
        fix: if btf { String::new() } else { "a kernel built with CONFIG_DEBUG_INFO_BTF=y (needed for fentry and LSM, not for the tracepoint data path)".into() },
        required: false,
    });
    items.push(Item {
        name: "fentry/fexit",
        ok: btf,
        detail: if btf {
            "BTF trampolines available".into()
        } else {
            "needs BTF".into()
        },
        fix: String::new(),
        required: false,
    });
    let lsm = lsm_list();
    let bpf_lsm = lsm
        .as_deref()
        .map(|l| l.split(',').any(|m| m == "bpf"))
        .unwrap_or(false);
    items.push(Item {
        name: "BPF LSM",
        ok: bpf_lsm,
        detail: match &lsm {
            Some(l) => format!("active LSMs: {l}"),
            None => "cannot read /sys/kernel/security/lsm".into(),
        },
        fix: if bpf_lsm {
            String::new()
        } else {
            "boot with lsm=...,bpf (needed only for enforcement in the kernel)".into()
        },
        required: false,
    });
    let ring = ringbuf_supported();
    items.push(Item {
        name: "ring buffer",
        ok: ring.is_ok(),
        detail: match &ring {
            Ok(()) => "BPF_MAP_TYPE_RINGBUF created".into(),
            Err(e) => format!("creating one failed: {e}"),
        },
        fix: if ring.is_ok() {
            String::new()
        } else {
            "Linux 5.8 or newer, and root or CAP_BPF".into()
        },
        required: true,
    });
    let caps = preflight::effective_caps();
    let admin = preflight::has_cap(caps, CAP_SYS_ADMIN);
    for (name, cap) in [("CAP_BPF", CAP_BPF), ("CAP_PERFMON", CAP_PERFMON)] {
        let ok = preflight::has_cap(caps, cap) || admin;
        items.push(Item {
            name,
            ok,
            detail: if preflight::has_cap(caps, cap) {
                "held".into()
            } else if admin {
                "covered by CAP_SYS_ADMIN".into()
            } else {
                "not held".into()
            },
            fix: if ok { String::new() } else { "run as root, or setcap cap_bpf,cap_perfmon,cap_dac_read_search,cap_sys_ptrace+ep on the binary".into() },
            required: true,
        });
    }
    let ready = items.iter().all(|i| i.ok || !i.required);
    let mode = if !ready {
        "cannot run: see the required items above".to_string()
    } else {
        let mut m = "syscall tracepoints for sockets and files".to_string();
        if uprobes {
            m.push_str(", libssl uprobes for TLS plaintext");
        } else {
            m.push_str(" (no TLS plaintext: uprobes missing)");
        }
        if !kprobes {
            m.push_str("; kprobes absent, not needed");
        }
        m
    };
    Report {
        kernel,
        items,
        mode,
        ready,
    }
}

pub fn print(report: &Report, json: bool) {
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(report).unwrap_or_default()
        );
        return;
    }
    println!("kernel {}", report.kernel);
    for i in &report.items {
        let mark = if i.ok {
            "ok  "
        } else if i.required {
            "MISSING"
        } else {
            "no  "
        };
        println!("  [{mark}] {:<20} {}", i.name, i.detail);
        if !i.fix.is_empty() {
            println!("           fix: {}", i.fix);
        }
    }
    println!("mode: {}", report.mode);
}
