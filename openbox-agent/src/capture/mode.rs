//! How socket and file I/O is captured: fentry/fexit programs on the syscall functions,
//! or syscall tracepoints.
//!
//! Enabling any `syscalls:*` tracepoint sets a flag on every task of the node, which
//! sends every syscall of every process through the kernel's slow path (measured: +424
//! to +492 ns per syscall on unwatched processes). An fentry/fexit program is reached
//! through a BPF trampoline patched into the one function it is attached to, so only
//! calls of that function pay, and far less. The programs of both modes report the same
//! records; the process lifecycle tracepoints (`task`, `sched`) are used in both, as
//! they do not touch the syscall path.
//!
//! fentry mode needs the kernel's BTF (to find each function and type its arguments),
//! BPF trampolines (x86_64 with `CONFIG_DYNAMIC_FTRACE_WITH_DIRECT_CALLS`), and the
//! `__x64_sys_*` functions; `auto` uses it when the programs load and attach, and the
//! tracepoints otherwise.

use std::fmt;

use anyhow::{bail, Context, Result};
use aya::{
    maps::ProgramArray,
    programs::{FEntry, FExit},
    Btf, Ebpf,
};

use super::load::{self, How};

/// `--capture-mode` / `capture_mode`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModeChoice {
    /// fentry/fexit where this kernel has them, else syscall tracepoints.
    #[default]
    Auto,
    /// fentry/fexit programs on the syscall functions; fail if they cannot be used.
    Fentry,
    /// Syscall tracepoints (every process on the node pays the syscall slow path).
    Tracepoint,
}

/// The mode in use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Fentry,
    Tracepoint,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Fentry => "fentry",
            Mode::Tracepoint => "tracepoint",
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The mode in use and why it was chosen, for the start-up log, the summaries and
/// `check`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chosen {
    pub mode: Mode,
    pub reason: String,
}

/// Whether a program runs at a function's entry (no result needed) or its exit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    Entry,
    Exit,
}

/// The fentry/fexit programs: (program, kernel function, hook). One per syscall.
pub const FENTRY_PROGRAMS: &[(&str, &str, Hook)] = &[
    ("fexit_read", "__x64_sys_read", Hook::Exit),
    ("fexit_write", "__x64_sys_write", Hook::Exit),
    ("fexit_readv", "__x64_sys_readv", Hook::Exit),
    ("fexit_writev", "__x64_sys_writev", Hook::Exit),
    ("fexit_recvfrom", "__x64_sys_recvfrom", Hook::Exit),
    ("fexit_sendto", "__x64_sys_sendto", Hook::Exit),
    ("fexit_recvmsg", "__x64_sys_recvmsg", Hook::Exit),
    ("fexit_sendmsg", "__x64_sys_sendmsg", Hook::Exit),
    ("fexit_connect", "__x64_sys_connect", Hook::Exit),
    ("fexit_accept", "__x64_sys_accept", Hook::Exit),
    ("fexit_accept4", "__x64_sys_accept4", Hook::Exit),
    ("fexit_socket", "__x64_sys_socket", Hook::Exit),
    ("fexit_socketpair", "__x64_sys_socketpair", Hook::Exit),
    ("fentry_close", "__x64_sys_close", Hook::Entry),
    ("fexit_openat", "__x64_sys_openat", Hook::Exit),
    ("fexit_openat2", "__x64_sys_openat2", Hook::Exit),
    ("fexit_pread64", "__x64_sys_pread64", Hook::Exit),
    ("fexit_pwrite64", "__x64_sys_pwrite64", Hook::Exit),
    ("fexit_preadv", "__x64_sys_preadv", Hook::Exit),
    ("fexit_pwritev", "__x64_sys_pwritev", Hook::Exit),
    ("fexit_preadv2", "__x64_sys_preadv2", Hook::Exit),
    ("fexit_pwritev2", "__x64_sys_pwritev2", Hook::Exit),
    ("fexit_sendmmsg", "__x64_sys_sendmmsg", Hook::Exit),
    ("fexit_recvmmsg", "__x64_sys_recvmmsg", Hook::Exit),
    ("fexit_dup", "__x64_sys_dup", Hook::Exit),
    ("fexit_dup2", "__x64_sys_dup2", Hook::Exit),
    ("fexit_dup3", "__x64_sys_dup3", Hook::Exit),
    ("fexit_fcntl", "__x64_sys_fcntl", Hook::Exit),
    ("fexit_sendfile64", "__x64_sys_sendfile64", Hook::Exit),
    ("fexit_splice", "__x64_sys_splice", Hook::Exit),
    (
        "fexit_copy_file_range",
        "__x64_sys_copy_file_range",
        Hook::Exit,
    ),
];

/// Report one message of a sendmmsg/recvmmsg batch, then tail-call themselves for the
/// next: (program, index in [`MMSG_ARRAY`]), for a batch kept in the CPU's scratch slot
/// and for one in the thread's own scratch entry. Loaded as fexit programs of
/// [`MMSG_FUNCTION`] (a tail call stays between tracing programs of one attach
/// prototype, and every `__x64_sys_*` function has the same) but never attached: set in
/// their program array before the fexit programs of sendmmsg and recvmmsg, which
/// tail-call them, are attached. Verified as one message's work where a loop over the
/// batch's 16 messages in each of those two programs was walked for each message.
pub const MMSG_PROGRAMS: [(&str, u32); 2] =
    [("fexit_mmsg_message", 0), ("fexit_mmsg_message_own", 1)];
pub const MMSG_ARRAY: &str = "FEXIT_MMSG_MESSAGE";
pub const MMSG_FUNCTION: &str = "__x64_sys_sendmmsg";

/// Whether `program` is one of fentry mode's (a refusal then means fentry mode cannot
/// be used, not that the agent cannot run).
pub fn is_fentry_program(program: &str) -> bool {
    MMSG_PROGRAMS.iter().any(|(p, _)| *p == program)
        || FENTRY_PROGRAMS.iter().any(|(p, _, _)| *p == program)
}

/// Why fentry mode cannot be used here, before anything is loaded: the architecture
/// (the programs read x86_64's `pt_regs`) and the kernel's BTF. Returns the parsed BTF
/// for loading; a function missing from it is found when its program is loaded.
pub fn fentry_prerequisites() -> Result<Btf> {
    if !cfg!(target_arch = "x86_64") {
        bail!(
            "fentry mode reads the syscall arguments of x86_64's __x64_sys_* functions; this agent is built for {}",
            std::env::consts::ARCH
        );
    }
    Btf::from_sys_fs().with_context(|| {
        format!(
            "reading the kernel's BTF ({}) failed; fentry needs a kernel built with CONFIG_DEBUG_INFO_BTF=y",
            crate::preflight::BTF
        )
    })
}

/// The fentry/fexit programs as [`load::load_all`] jobs: [`MMSG_PROGRAMS`] first (among
/// the longest to verify; `load_all` starts the jobs in order), then
/// [`FENTRY_PROGRAMS`].
pub fn fentry_jobs(btf: &Btf) -> Vec<(&'static str, How<'_>)> {
    MMSG_PROGRAMS
        .iter()
        .map(|&(prog, _)| (prog, How::Fexit(MMSG_FUNCTION, btf)))
        .chain(FENTRY_PROGRAMS.iter().map(|&(prog, func, hook)| {
            let how = match hook {
                Hook::Entry => How::Fentry(func, btf),
                Hook::Exit => How::Fexit(func, btf),
            };
            (prog, how)
        }))
        .collect()
}

/// An fentry/fexit program's load or attach failure, named with its function.
pub fn fentry_error(prog: &str, e: &dyn std::error::Error) -> anyhow::Error {
    let (func, what) = FENTRY_PROGRAMS.iter().find(|(p, _, _)| *p == prog).map_or(
        if MMSG_PROGRAMS.iter().any(|(p, _)| *p == prog) {
            (MMSG_FUNCTION, "fexit")
        } else {
            ("?", "fentry")
        },
        |(_, func, hook)| {
            (
                *func,
                match hook {
                    Hook::Entry => "fentry",
                    Hook::Exit => "fexit",
                },
            )
        },
    );
    let text = super::tls::with_causes(e);
    // EPERM with CAP_BPF and CAP_PERFMON held, before the verifier ran (its log
    // is empty): the kernel refuses the program type itself, as this project's
    // Firecracker development VM (6.18) does for every BPF_PROG_TYPE_TRACING.
    let hint = if text.contains("os error 1)") {
        " (this kernel refuses BPF tracing programs, the fentry/fexit type, although the agent holds CAP_BPF and CAP_PERFMON: `bpftool feature probe kernel` shows `program_type tracing is NOT available`)"
    } else {
        ""
    };
    anyhow::anyhow!("{what} program {prog} on {func}: {text}{hint}")
}

/// The program [`load_first`] loads.
pub const FIRST: &str = "fentry_close";

/// Whether this kernel loads fentry programs at all, from one small program: a kernel
/// that refuses the type (EPERM before the verifier runs) says so at once, before the
/// agent spends the verifier's time on the others.
pub fn load_first(ebpf: &mut Ebpf, btf: &Btf) -> Result<()> {
    let jobs = fentry_jobs(btf);
    let first = jobs
        .iter()
        .find(|(p, _)| *p == FIRST)
        .copied()
        .context("program fentry_close missing")?;
    load::load_or_fail(ebpf, &[first], |p, e| fentry_error(p, &e))
}

/// Attaches the fentry/fexit programs, loaded already, once [`MMSG_PROGRAMS`] are where
/// they tail-call them. On an error the programs already attached stay so until `ebpf`
/// drops them or the caller unloads them ([`unload`]).
pub fn attach_loaded(ebpf: &mut Ebpf) -> Result<()> {
    for (prog, index) in MMSG_PROGRAMS {
        super::set_tail_call_at(ebpf, MMSG_ARRAY, index, prog)
            .map_err(|e| anyhow::anyhow!("fexit program {prog}: {e:#}"))?;
    }
    for (prog, _, hook) in FENTRY_PROGRAMS {
        let program = ebpf
            .program_mut(prog)
            .with_context(|| format!("program {prog} missing from the kernel object"))?;
        let attached = match hook {
            Hook::Entry => <&mut FEntry>::try_from(program).and_then(|p| p.attach().map(drop)),
            Hook::Exit => <&mut FExit>::try_from(program).and_then(|p| p.attach().map(drop)),
        };
        attached.map_err(|e| fentry_error(prog, &e))?;
    }
    Ok(())
}

/// Loads (in parallel) and attaches every fentry/fexit program, and says what each
/// cost the verifier; see [`attach_loaded`] for what an error leaves.
pub fn attach_fentry(ebpf: &mut Ebpf, btf: &Btf) -> Result<Vec<load::Cost>> {
    let mut costs = Vec::new();
    for o in load::load_all(ebpf, &fentry_jobs(btf))? {
        o.result.map_err(|e| fentry_error(o.program, &e))?;
        costs.push(load::Cost {
            program: o.program.to_string(),
            ms: o.took.as_secs_f64() * 1e3,
            verified_insns: o.verified,
        });
    }
    attach_loaded(ebpf)?;
    Ok(costs)
}

/// Detaches and unloads the fentry/fexit programs (after a failed [`attach_fentry`],
/// before falling back to tracepoints).
pub fn unload(ebpf: &mut Ebpf) {
    for (prog, _, hook) in FENTRY_PROGRAMS {
        let Some(program) = ebpf.program_mut(prog) else {
            continue;
        };
        let _ = match hook {
            Hook::Entry => <&mut FEntry>::try_from(program).map(|p| p.unload()),
            Hook::Exit => <&mut FExit>::try_from(program).map(|p| p.unload()),
        };
    }
    // The program array holds the message programs too: emptied, so they go.
    for (prog, index) in MMSG_PROGRAMS {
        if let Some(Ok(mut array)) = ebpf.map_mut(MMSG_ARRAY).map(ProgramArray::try_from) {
            let _ = array.clear_index(&index);
        }
        if let Some(Ok(p)) = ebpf.program_mut(prog).map(<&mut FExit>::try_from) {
            let _ = p.unload();
        }
    }
}
