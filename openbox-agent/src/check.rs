//! `openbox-agent check`: what this kernel offers, what privileges the agent holds, the
//! mode it will use, and what to do about anything missing.

use std::{fmt::Write as _, io::Write, path::Path};

use serde::Serialize;

use crate::{
    capture::{mode::Mode, pause},
    preflight::{self, Access, CAP_BPF, CAP_KILL, CAP_PERFMON, CAP_SYS_ADMIN, TRACEFS},
};

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
    /// What `--capture-mode auto` uses here.
    pub capture_mode: Mode,
    pub ready: bool,
    /// What each fentry/fexit program cost the verifier here, when they all loaded.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub fentry_programs: Vec<crate::capture::load::Cost>,
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
fn ringbuf_supported() -> std::io::Result<()> {
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
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: closing the fd we just got.
    unsafe { libc::close(fd as i32) };
    Ok(())
}

/// Whether this kernel loads BPF LSM programs, probed as `bpftool feature probe` does: a
/// two-instruction LSM program for BTF id 1, which a kernel that knows the program type
/// refuses with EINVAL and "attach_btf_id 1 is not a function" (id 1 is no LSM hook).
fn lsm_programs() -> LsmPrograms {
    #[repr(C)]
    struct ProgLoad {
        prog_type: u32,
        insn_cnt: u32,
        insns: u64,
        license: u64,
        log_level: u32,
        log_size: u32,
        log_buf: u64,
        kern_version: u32,
        prog_flags: u32,
        prog_name: [u8; 16],
        prog_ifindex: u32,
        expected_attach_type: u32,
        _btf: [u8; 36],
        attach_btf_id: u32,
        _rest: [u8; 16],
    }
    const BPF_PROG_LOAD: libc::c_long = 5;
    const BPF_PROG_TYPE_LSM: u32 = 29;
    const BPF_LSM_MAC: u32 = 27;
    // mov r0, 0; exit
    let insns: [u64; 2] = [0x0000_0000_0000_00b7, 0x0000_0000_0000_0095];
    let license = b"GPL\0";
    let mut log = vec![0u8; 4096];
    let attr = ProgLoad {
        prog_type: BPF_PROG_TYPE_LSM,
        insn_cnt: 2,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        log_level: 1,
        log_size: log.len() as u32,
        log_buf: log.as_mut_ptr() as u64,
        kern_version: 0,
        prog_flags: 0,
        prog_name: [0; 16],
        prog_ifindex: 0,
        expected_attach_type: BPF_LSM_MAC,
        _btf: [0; 36],
        attach_btf_id: 1,
        _rest: [0; 16],
    };
    // SAFETY: bpf(2) with a zero-padded attribute of the size we pass; the buffers it
    // points at live until the call returns.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_LOAD,
            &attr as *const ProgLoad,
            std::mem::size_of::<ProgLoad>(),
        )
    };
    if fd >= 0 {
        // SAFETY: closing the fd we just got.
        unsafe { libc::close(fd as i32) };
        return LsmPrograms::Load;
    }
    let err = std::io::Error::last_os_error();
    let text = String::from_utf8_lossy(&log);
    match err.raw_os_error() {
        Some(libc::EINVAL) if text.contains("attach_btf_id") => LsmPrograms::Load,
        Some(libc::EINVAL) => LsmPrograms::Unknown,
        _ => LsmPrograms::Refused(err),
    }
}

enum LsmPrograms {
    /// The kernel knows the program type and would load one for a real hook.
    Load,
    /// The program type is not built in (CONFIG_BPF_LSM).
    Unknown,
    /// Refused (EPERM: lockdown or a kernel that does not allow them; or no privilege).
    Refused(std::io::Error),
}

/// What the agent cannot do without BPF LSM programs, and what it does instead.
const NO_KERNEL_ENFORCEMENT: &str = "no BPF LSM enforcement here; `run --enforce` holds \
    operations with seccomp user notification instead (see the next line); without it, \
    verdicts on hook events are enforced at activity boundaries (the activity fails with \
    GovernanceBlock or GovernanceHalt when it ends; HALT terminates the workflow under 2.0 \
    conventions)";

fn lsm_list() -> std::io::Result<String> {
    if !exists("/sys/kernel/security/lsm") {
        let t = std::ffi::CString::new("/sys/kernel/security").unwrap();
        let f = std::ffi::CString::new("securityfs").unwrap();
        // SAFETY: mount(2) with C strings; failure is reported below.
        unsafe { libc::mount(f.as_ptr(), t.as_ptr(), f.as_ptr(), 0, std::ptr::null()) };
    }
    std::fs::read_to_string(LSM).map(|s| s.trim().to_string())
}

const LSM: &str = "/sys/kernel/security/lsm";

/// What the agent gives up without CAP_KILL or bpffs.
const NOT_PAUSED: &str = "processes that load a libssl after watching began are not paused while its TLS probes attach, so their first TLS calls may not be captured";

pub fn report() -> Report {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into());
    let mut items = Vec::new();
    // Mounts tracefs when it is missing and we may; then looks again.
    let tracefs_err = preflight::ensure_tracefs().err();
    let tracefs = preflight::tracefs_events();
    let tracefs_denied = tracefs == Err(Access::Denied);
    items.push(Item {
        name: "tracefs",
        ok: tracefs.is_ok(),
        detail: match (&tracefs, &tracefs_err) {
            (Ok(events), _) => format!("mounted ({})", events.display()),
            (Err(Access::Denied), _) => preflight::denied(TRACEFS),
            (Err(_), Some(e)) => format!("{e:#}"),
            (Err(_), None) => "not mounted".into(),
        },
        fix: match &tracefs {
            Ok(_) => String::new(),
            Err(Access::Denied) => "run `openbox-agent check` as root to see the rest".into(),
            Err(_) => format!("mount -t tracefs nodev {TRACEFS}"),
        },
        required: true,
    });
    let syscalls = tracefs
        .as_ref()
        .map(|events| events.join("syscalls/sys_enter_write").exists());
    items.push(Item {
        name: "syscall tracepoints",
        ok: syscalls == Ok(true),
        detail: match &syscalls {
            Ok(true) => {
                let n = tracefs
                    .as_ref()
                    .ok()
                    .and_then(|e| std::fs::read_dir(e.join("syscalls")).ok())
                    .map(|d| d.count())
                    .unwrap_or(0);
                format!("{n} syscalls:* events")
            }
            Ok(false) => "absent".into(),
            Err(_) if tracefs_denied => {
                "unknown: tracefs is not readable (permission denied)".into()
            }
            Err(_) => "unknown: tracefs is not mounted".into(),
        },
        fix: match &syscalls {
            Ok(true) => String::new(),
            Ok(false) => "a kernel built with CONFIG_FTRACE_SYSCALLS=y".into(),
            Err(_) => String::new(),
        },
        required: true,
    });
    // The mode `auto` picks: fentry when its programs load and attach.
    let fentry = if preflight::require_privileges().is_ok() {
        crate::capture::probe_fentry().map_err(|e| format!("{e:#}"))
    } else {
        Err("unknown: loading programs needs CAP_BPF and CAP_PERFMON (run as root)".into())
    };
    if tracefs.is_ok() {
        let layouts = crate::capture::tracefs::check_kernel(fentry.is_err());
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
        let live = crate::capture::live_threads();
        items.push(Item {
            name: "process exit",
            ok: live.is_ok(),
            detail: match &live {
                Ok(l) if l.task_signal == 0 => "sched_process_exit's group_dead".into(),
                Ok(l) => format!(
                    "task->signal->live (no group_dead in sched_process_exit; BTF offsets: task_struct.signal {}, signal_struct.live {})",
                    l.task_signal, l.signal_live
                ),
                Err(e) => format!("{e:#}"),
            },
            fix: if live.is_ok() {
                String::new()
            } else {
                "a kernel built with CONFIG_DEBUG_INFO_BTF=y".into()
            },
            required: true,
        });
    }
    // Syscall tracepoints are the data path only when fentry cannot be.
    if fentry.is_ok() {
        if let Some(item) = items.iter_mut().find(|i| i.name == "syscall tracepoints") {
            item.required = false;
            if !item.ok {
                item.fix.clear();
            }
        }
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
    let btf_access = preflight::btf();
    let btf = btf_access == Access::Present;
    items.push(Item {
        name: "BTF",
        ok: btf,
        detail: match btf_access {
            Access::Present => preflight::BTF.into(),
            Access::Denied => preflight::denied(preflight::BTF),
            Access::Absent => "absent".into(),
        },
        fix: if btf_access == Access::Absent { "a kernel built with CONFIG_DEBUG_INFO_BTF=y (needed for fentry and LSM, not for the tracepoint data path)".into() } else { String::new() },
        required: false,
    });
    items.push(Item {
        name: "fentry/fexit",
        ok: fentry.is_ok(),
        detail: match &fentry {
            Ok(costs) => {
                let mut d = format!(
                    "the {} fentry/fexit programs load and attach (__x64_sys_* functions in BTF, trampolines)",
                    crate::capture::mode::FENTRY_PROGRAMS.len()
                );
                let longest = costs.iter().max_by(|a, b| a.ms.total_cmp(&b.ms));
                if let Some(c) = longest {
                    let insns = c
                        .verified_insns
                        .map_or(String::new(), |n| format!("{n} instructions, "));
                    let _ = write!(d, "; longest to verify: {} ({insns}{:.1} ms)", c.program, c.ms);
                }
                d
            }
            Err(e) => e.clone(),
        },
        fix: if fentry.is_ok() || !btf {
            String::new()
        } else {
            "sockets and files are captured with syscall tracepoints instead, which slow every syscall of every process on the node; fentry needs x86_64, BTF and a kernel that allows BPF tracing programs (trampolines, CONFIG_DYNAMIC_FTRACE_WITH_DIRECT_CALLS)".into()
        },
        required: false,
    });
    let lsm = lsm_list();
    let bpf_lsm = lsm
        .as_deref()
        .map(|l| l.split(',').any(|m| m == "bpf"))
        .unwrap_or(false);
    let lsm_denied = matches!(&lsm, Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied);
    items.push(Item {
        name: "BPF LSM",
        ok: bpf_lsm,
        detail: match &lsm {
            Ok(l) => format!("active LSMs: {l}"),
            Err(_) if lsm_denied => preflight::denied(LSM),
            Err(e) => format!("cannot read {LSM}: {e}"),
        },
        fix: if bpf_lsm || lsm_denied {
            String::new()
        } else {
            "boot with lsm=...,bpf (needed only for enforcement in the kernel)".into()
        },
        required: false,
    });
    let programs = lsm_programs();
    let loads = matches!(programs, LsmPrograms::Load);
    items.push(Item {
        name: "BPF LSM programs",
        ok: loads && bpf_lsm,
        detail: match (&programs, bpf_lsm) {
            (LsmPrograms::Load, true) => "LSM programs load and `bpf` is an active LSM; \
                the agent does not use them yet: `run --enforce` holds operations with \
                seccomp user notification (see the next line)"
                .into(),
            (LsmPrograms::Load, false) => {
                format!("LSM programs load, but `bpf` is not an active LSM, so they would never run; {NO_KERNEL_ENFORCEMENT}")
            }
            (LsmPrograms::Unknown, _) => {
                format!("this kernel has no BPF LSM program type (CONFIG_BPF_LSM); {NO_KERNEL_ENFORCEMENT}")
            }
            (LsmPrograms::Refused(e), _) => {
                format!("the kernel refuses to load LSM programs ({e}; `bpftool feature probe kernel` shows `program_type lsm is NOT available`); {NO_KERNEL_ENFORCEMENT}")
            }
        },
        fix: if loads && bpf_lsm {
            String::new()
        } else {
            "a kernel with CONFIG_BPF_LSM=y that allows BPF LSM programs, booted with `bpf` in its LSM list (lsm=...,bpf); needed only for enforcement in the kernel".into()
        },
        required: false,
    });
    let notif = crate::daemon::enforce::user_notification_available();
    items.push(Item {
        name: "seccomp user notification",
        ok: notif,
        detail: if notif {
            "available: `run --enforce` holds each plain-HTTP request, open for writing \
             and (after a HALT) every connect/send/write/open-for-write of a governed \
             activity's executor threads and the processes they start, until Core answers \
             its started hook event"
                .into()
        } else {
            "SECCOMP_RET_USER_NOTIF is not available: `run --enforce` refuses to start; verdicts on hook events are enforced at activity boundaries".into()
        },
        fix: if notif {
            String::new()
        } else {
            "a kernel with CONFIG_SECCOMP_FILTER (Linux 5.0+); needed only for `run --enforce`".into()
        },
        required: false,
    });
    let ring = ringbuf_supported();
    items.push(Item {
        name: "ring buffer",
        ok: ring.is_ok(),
        detail: match &ring {
            Ok(()) => "BPF_MAP_TYPE_RINGBUF created".into(),
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                format!("creating one failed: permission denied ({e})")
            }
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
            fix: if ok {
                String::new()
            } else {
                format!("run as root, or {}", preflight::SETCAP)
            },
            required: true,
        });
    }
    let kill = preflight::has_cap(caps, CAP_KILL);
    items.push(Item {
        name: "CAP_KILL",
        ok: kill,
        detail: if kill {
            "held".into()
        } else {
            format!("not held: {NOT_PAUSED}, as the agent could not resume another user's process")
        },
        fix: if kill {
            String::new()
        } else {
            format!("run as root, or {}", preflight::SETCAP)
        },
        required: false,
    });
    // Mounts bpffs when it is missing and we may; then looks again.
    let bpffs = preflight::ensure_bpffs();
    items.push(Item {
        name: "bpffs",
        ok: bpffs.is_ok(),
        detail: match &bpffs {
            Ok(()) => format!(
                "mounted at {}: paused processes are recorded in {}/, so those a crashed agent left stopped are resumed at the next start",
                preflight::BPFFS,
                pause::PIN_DIR
            ),
            Err(e) => format!("{e:#}: {NOT_PAUSED}"),
        },
        fix: if bpffs.is_ok() {
            String::new()
        } else {
            format!("mount -t bpf bpf {}", preflight::BPFFS)
        },
        required: false,
    });
    if bpffs.is_ok() {
        let orphans = pause::orphans();
        let pids: Vec<String> = orphans
            .iter()
            .flatten()
            .flat_map(|(_, pids)| pids.iter().map(|p| p.to_string()))
            .collect();
        // EACCES on the 0700 directory, EPERM from bpf(2) without CAP_BPF.
        let denied =
            matches!(&orphans, Err(e) if e.contains("os error 13") || e.contains("os error 1)"));
        items.push(Item {
            name: "left stopped",
            ok: orphans.is_ok() && pids.is_empty(),
            detail: match &orphans {
                Ok(_) if pids.is_empty() => "no process stopped by an agent that ended".into(),
                Ok(_) => format!(
                    "processes stopped while an agent that has ended attached TLS probes: {}",
                    pids.join(", ")
                ),
                Err(e) if denied => format!("{e} (permission denied)"),
                Err(e) => format!("cannot read the records of paused processes: {e}"),
            },
            fix: match &orphans {
                Ok(_) if pids.is_empty() => String::new(),
                Ok(_) => "start the agent (`run` or `trace`): it resumes them; or `kill -CONT PID`"
                    .into(),
                Err(_) if denied => "run `openbox-agent check` as root".into(),
                Err(_) => format!(
                    "resume stopped processes with `kill -CONT PID`, then remove the files in {}",
                    pause::PIN_DIR
                ),
            },
            required: false,
        });
    }
    let ready = items.iter().all(|i| i.ok || !i.required);
    let mode = if !ready {
        "cannot run: see the required items above".to_string()
    } else {
        // What `--capture-mode auto` (the default) uses.
        let mut m = match &fentry {
            Ok(_) => "fentry/fexit on the syscall functions for sockets and files".to_string(),
            Err(_) => {
                "syscall tracepoints for sockets and files (fentry/fexit unavailable, see above)"
                    .to_string()
            }
        };
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
        capture_mode: if fentry.is_ok() {
            Mode::Fentry
        } else {
            Mode::Tracepoint
        },
        ready,
        fentry_programs: fentry.unwrap_or_default(),
    }
}

/// Writes the report to stdout. A reader that went away (`check --json | head`) shows as
/// a `BrokenPipe` error, which the caller treats as the end of the output.
pub fn print(report: &Report, json: bool) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    if json {
        let text = serde_json::to_string_pretty(report).unwrap_or_default();
        writeln!(out, "{text}")?;
        return out.flush();
    }
    writeln!(out, "kernel {}", report.kernel)?;
    for i in &report.items {
        let mark = if i.ok {
            "ok  "
        } else if i.required {
            "MISSING"
        } else {
            "no  "
        };
        writeln!(out, "  [{mark}] {:<20} {}", i.name, i.detail)?;
        if !i.fix.is_empty() {
            writeln!(out, "           fix: {}", i.fix)?;
        }
    }
    writeln!(out, "mode: {}", report.mode)?;
    out.flush()
}
