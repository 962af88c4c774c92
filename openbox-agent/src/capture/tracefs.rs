//! The tracepoint record layouts the kernel programs assume, checked against this
//! kernel's tracefs `format` files before anything is loaded.
//!
//! A tracepoint program reads its record at fixed offsets (`openbox_common::RawField`
//! and the syscall argument slots). The verifier bounds those reads by the largest
//! record, not by this tracepoint's, so a field that moved or does not exist would be
//! read as garbage without any error. So the agent refuses to start on a kernel whose
//! layout differs, naming the tracepoint, the field, and both offsets. The one field
//! allowed to be missing is `sched_process_exit`'s `group_dead`, which only recent
//! kernels have: where it is missing, the exit program reads the count of the group's
//! live threads from the task instead ([`has_group_dead`]).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use openbox_common::{
    RawField, IO_URING_SUBMIT_REQ_OPCODE, SCHED_PROCESS_EXEC_FILENAME, SCHED_PROCESS_EXEC_OLD_PID,
    SCHED_PROCESS_EXIT_GROUP_DEAD, SYSCALL_ARGS_OFFSET, SYSCALL_ARG_SIZE, SYSCALL_RET,
    TASK_NEWTASK_CLONE_FLAGS, TASK_NEWTASK_PID,
};

use crate::preflight::TRACEFS;

/// One field of a tracepoint's `format`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FormatField {
    pub name: String,
    pub offset: usize,
    pub size: usize,
}

/// The fields of a `format` file, in order, the common ones included. Lines that are
/// not field lines (name, ID, print fmt) are skipped.
pub fn parse_format(text: &str) -> Vec<FormatField> {
    text.lines().filter_map(parse_field_line).collect()
}

/// `field:unsigned int fd; offset:16; size:8; signed:0;`
fn parse_field_line(line: &str) -> Option<FormatField> {
    let mut parts = line.trim().split(';').map(str::trim);
    let decl = parts.next()?.strip_prefix("field:")?;
    let mut offset = None;
    let mut size = None;
    for part in parts {
        if let Some(v) = part.strip_prefix("offset:") {
            offset = v.parse().ok();
        } else if let Some(v) = part.strip_prefix("size:") {
            size = v.parse().ok();
        }
    }
    // The name is the declaration's last word, without an array suffix:
    // `char comm[16]`, `__data_loc char[] filename`, `const char * buf`.
    let last = decl.rsplit([' ', '*']).find(|w| !w.is_empty())?;
    let name = last.split('[').next()?.to_string();
    Some(FormatField {
        name,
        offset: offset?,
        size: size?,
    })
}

/// How a kernel program names a field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldRef {
    /// By its name in the format.
    Named(&'static str),
    /// Argument `n` of a `syscalls:sys_enter_*` tracepoint: the n-th field after
    /// `__syscall_nr`, whatever the kernel calls it.
    SyscallArg(usize),
}

/// A field a kernel program reads at a fixed place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assumed {
    pub category: &'static str,
    pub event: String,
    pub field: FieldRef,
    pub at: RawField,
}

/// The `syscalls:sys_enter_*` tracepoints the programs attach to and the arguments
/// each reads (openbox-ebpf `probes/sockets.rs`, `probes/files.rs`).
const SYSCALL_ARGS_READ: &[(&str, &[usize])] = &[
    ("read", &[0, 1, 2]),
    ("write", &[0, 1, 2]),
    ("readv", &[0, 1, 2]),
    ("writev", &[0, 1, 2]),
    ("recvfrom", &[0, 1, 2]),
    ("sendto", &[0, 1, 2]),
    ("recvmsg", &[0, 1, 2]),
    ("sendmsg", &[0, 1, 2]),
    ("connect", &[0, 1]),
    ("accept", &[0, 1]),
    ("accept4", &[0, 1]),
    ("socket", &[0, 1]),
    ("socketpair", &[0, 1, 3]),
    ("close", &[0]),
    ("openat", &[0, 1, 2]),
    ("openat2", &[0, 1, 2]),
    ("pread64", &[0, 1, 2]),
    ("pwrite64", &[0, 1, 2]),
    ("preadv", &[0, 1, 2]),
    ("pwritev", &[0, 1, 2]),
    ("preadv2", &[0, 1, 2]),
    ("pwritev2", &[0, 1, 2]),
    ("sendmmsg", &[0, 1, 2]),
    ("recvmmsg", &[0, 1, 2]),
    ("dup", &[0]),
    ("dup2", &[0, 1]),
    ("dup3", &[0, 1]),
    ("fcntl", &[0, 1]),
    ("sendfile64", &[0, 1]),
    ("splice", &[0, 2]),
    ("copy_file_range", &[0, 2]),
];

/// The `syscalls:sys_exit_*` tracepoints whose programs read `ret`.
const SYSCALL_RETS_READ: &[&str] = &[
    "read",
    "write",
    "readv",
    "writev",
    "recvfrom",
    "sendto",
    "recvmsg",
    "sendmsg",
    "connect",
    "accept",
    "accept4",
    "socket",
    "socketpair",
    "openat",
    "openat2",
    "pread64",
    "pwrite64",
    "preadv",
    "pwritev",
    "preadv2",
    "pwritev2",
    "sendmmsg",
    "recvmmsg",
    "dup",
    "dup2",
    "dup3",
    "fcntl",
    "sendfile64",
    "splice",
    "copy_file_range",
];

/// `sched:sched_process_exit`'s `group_dead`, read by the exit program where the kernel
/// has it; older kernels (Debian's 6.1 and 6.12) do not, and the program reads
/// `current->signal->live` instead ([`super::btf::LiveThreads`]).
fn group_dead() -> Assumed {
    Assumed {
        category: "sched",
        event: "sched_process_exit".into(),
        field: FieldRef::Named("group_dead"),
        at: SCHED_PROCESS_EXIT_GROUP_DEAD,
    }
}

/// Whether the `sched_process_exit` record described by `format` has `group_dead`
/// where the exit program reads it; an error when it is somewhere else.
pub fn has_group_dead(format: &str) -> Result<bool, LayoutError> {
    match check_field(&group_dead(), &parse_format(format)) {
        Ok(()) => Ok(true),
        Err(LayoutError::Missing { .. }) => Ok(false),
        Err(e) => Err(e),
    }
}

/// [`has_group_dead`] on this kernel.
pub fn exit_has_group_dead() -> Result<bool> {
    let text = read_format(&events_dir(), "sched", "sched_process_exit")?;
    Ok(has_group_dead(&text)?)
}

/// Every field the kernel programs read at a fixed offset, but `group_dead`
/// ([`has_group_dead`]).
pub fn assumed() -> Vec<Assumed> {
    let mut out = vec![
        Assumed {
            category: "task",
            event: "task_newtask".into(),
            field: FieldRef::Named("pid"),
            at: TASK_NEWTASK_PID,
        },
        Assumed {
            category: "task",
            event: "task_newtask".into(),
            field: FieldRef::Named("clone_flags"),
            at: TASK_NEWTASK_CLONE_FLAGS,
        },
        Assumed {
            category: "sched",
            event: "sched_process_exec".into(),
            field: FieldRef::Named("filename"),
            at: SCHED_PROCESS_EXEC_FILENAME,
        },
        Assumed {
            category: "sched",
            event: "sched_process_exec".into(),
            field: FieldRef::Named("old_pid"),
            at: SCHED_PROCESS_EXEC_OLD_PID,
        },
    ];
    for (syscall, args) in SYSCALL_ARGS_READ {
        for &n in *args {
            out.push(Assumed {
                category: "syscalls",
                event: format!("sys_enter_{syscall}"),
                field: FieldRef::SyscallArg(n),
                at: RawField {
                    offset: SYSCALL_ARGS_OFFSET + SYSCALL_ARG_SIZE * n,
                    size: SYSCALL_ARG_SIZE,
                },
            });
        }
    }
    for syscall in SYSCALL_RETS_READ {
        out.push(Assumed {
            category: "syscalls",
            event: format!("sys_exit_{syscall}"),
            field: FieldRef::Named("ret"),
            at: SYSCALL_RET,
        });
    }
    out
}

/// A field whose place on this kernel is not the one the programs read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    #[error("tracepoint {category}:{event} has no field {field} on this kernel, but the kernel programs read it at offset {expected_offset} (size {expected_size}). This kernel's tracepoint layout is not the one openbox-agent was built for, and reading it would misreport events; openbox-agent refuses to start. Use a kernel whose {category}:{event} tracepoint has that field (see /sys/kernel/tracing/events/{category}/{event}/format).")]
    Missing {
        category: &'static str,
        event: String,
        field: String,
        expected_offset: usize,
        expected_size: usize,
    },
    #[error("tracepoint {category}:{event}: field {field} is at offset {actual_offset} (size {actual_size}) on this kernel, but the kernel programs read it at offset {expected_offset} (size {expected_size}). This kernel's tracepoint layout is not the one openbox-agent was built for, and reading it would misreport events; openbox-agent refuses to start.")]
    Moved {
        category: &'static str,
        event: String,
        field: String,
        expected_offset: usize,
        expected_size: usize,
        actual_offset: usize,
        actual_size: usize,
    },
}

/// Checks one assumption against the parsed format of its tracepoint.
pub fn check_field(assumed: &Assumed, fields: &[FormatField]) -> Result<(), LayoutError> {
    let found = match assumed.field {
        FieldRef::Named(name) => fields.iter().find(|f| f.name == name),
        FieldRef::SyscallArg(n) => fields
            .iter()
            .skip_while(|f| f.name != "__syscall_nr")
            .nth(n + 1),
    };
    let shown = match (assumed.field, found) {
        (FieldRef::Named(name), _) => format!("`{name}`"),
        (FieldRef::SyscallArg(n), Some(f)) => format!("`{}` (argument {n})", f.name),
        (FieldRef::SyscallArg(n), None) => format!("argument {n}"),
    };
    let Some(found) = found else {
        return Err(LayoutError::Missing {
            category: assumed.category,
            event: assumed.event.clone(),
            field: shown,
            expected_offset: assumed.at.offset,
            expected_size: assumed.at.size,
        });
    };
    if found.offset != assumed.at.offset || found.size != assumed.at.size {
        return Err(LayoutError::Moved {
            category: assumed.category,
            event: assumed.event.clone(),
            field: shown,
            expected_offset: assumed.at.offset,
            expected_size: assumed.at.size,
            actual_offset: found.offset,
            actual_size: found.size,
        });
    }
    Ok(())
}

/// Checks every assumption, reading each tracepoint's format with `format_of`
/// (category, event). Stops at the first difference.
pub fn check_all(
    assumed: &[Assumed],
    mut format_of: impl FnMut(&str, &str) -> Result<String>,
) -> Result<()> {
    let mut cache: Vec<(&str, &str, Vec<FormatField>)> = Vec::new();
    for a in assumed {
        let idx = match cache
            .iter()
            .position(|(c, e, _)| *c == a.category && *e == a.event)
        {
            Some(i) => i,
            None => {
                let text = format_of(a.category, &a.event)?;
                cache.push((a.category, &a.event, parse_format(&text)));
                cache.len() - 1
            }
        };
        check_field(a, &cache[idx].2)?;
    }
    Ok(())
}

/// Where tracefs keeps the events: its own mount, or the older debugfs path.
fn events_dir() -> PathBuf {
    let own = Path::new(TRACEFS).join("events");
    if own.is_dir() {
        return own;
    }
    PathBuf::from("/sys/kernel/debug/tracing/events")
}

/// Checks this kernel's tracepoint layouts against what the kernel programs read: the
/// process lifecycle tracepoints, and with `syscalls` the syscall tracepoints too (not
/// read in fentry mode). Call after tracefs is mounted, before loading.
pub fn check_kernel(syscalls: bool) -> Result<()> {
    check_in(&events_dir(), syscalls)
}

/// The field the io_uring program reads (`probes/io_uring.rs`).
pub fn io_uring_assumed() -> Assumed {
    Assumed {
        category: "io_uring",
        event: "io_uring_submit_req".into(),
        field: FieldRef::Named("opcode"),
        at: IO_URING_SUBMIT_REQ_OPCODE,
    }
}

/// Whether io_uring requests can be counted here: `Ok(false)` when the kernel has no
/// `io_uring:io_uring_submit_req` (built without io_uring, or older than 5.19, where
/// it was `io_uring_submit_sqe`), an error when its layout differs from the one the
/// program reads. Neither stops the agent: io_uring is then not counted, and says so.
pub fn check_io_uring() -> Result<bool> {
    let a = io_uring_assumed();
    let path = events_dir().join(a.category).join(&a.event).join("format");
    let Ok(text) = std::fs::read_to_string(&path) else {
        return Ok(false);
    };
    check_field(&a, &parse_format(&text))?;
    Ok(true)
}

/// Checks the layouts of the tracepoints under `events` (tracefs's `events/`).
fn check_in(events: &Path, syscalls: bool) -> Result<()> {
    let assumed: Vec<Assumed> = assumed()
        .into_iter()
        .filter(|a| syscalls || a.category != "syscalls")
        .collect();
    check_all(&assumed, |category, event| {
        read_format(events, category, event)
    })
}

fn read_format(events: &Path, category: &str, event: &str) -> Result<String> {
    let path = events.join(category).join(event).join("format");
    std::fs::read_to_string(&path).with_context(|| {
        format!(
            "reading the layout of tracepoint {category}:{event} from {} failed. The kernel needs this tracepoint (syscall tracepoints need CONFIG_FTRACE_SYSCALLS) and tracefs mounted at {TRACEFS}.",
            path.display()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    // Pasted from /sys/kernel/tracing/events/*/format on Linux 6.18.
    const SCHED_PROCESS_EXIT: &str = "name: sched_process_exit
ID: 369
format:
	field:unsigned short common_type;	offset:0;	size:2;	signed:0;
	field:unsigned char common_flags;	offset:2;	size:1;	signed:0;
	field:unsigned char common_preempt_count;	offset:3;	size:1;	signed:0;
	field:int common_pid;	offset:4;	size:4;	signed:1;

	field:char comm[16];	offset:8;	size:16;	signed:0;
	field:pid_t pid;	offset:24;	size:4;	signed:1;
	field:int prio;	offset:28;	size:4;	signed:1;
	field:bool group_dead;	offset:32;	size:1;	signed:0;

print fmt: \"comm=%s pid=%d prio=%d group_dead=%s\", REC->comm, REC->pid, REC->prio, REC->group_dead ? \"true\" : \"false\"
";

    const TASK_NEWTASK: &str = "name: task_newtask
ID: 205
format:
	field:unsigned short common_type;	offset:0;	size:2;	signed:0;
	field:unsigned char common_flags;	offset:2;	size:1;	signed:0;
	field:unsigned char common_preempt_count;	offset:3;	size:1;	signed:0;
	field:int common_pid;	offset:4;	size:4;	signed:1;

	field:pid_t pid;	offset:8;	size:4;	signed:1;
	field:char comm[16];	offset:12;	size:16;	signed:0;
	field:u64 clone_flags;	offset:32;	size:8;	signed:0;
	field:short oom_score_adj;	offset:40;	size:2;	signed:1;

print fmt: \"pid=%d comm=%s clone_flags=%llx oom_score_adj=%hd\", REC->pid, REC->comm, REC->clone_flags, REC->oom_score_adj
";

    const SCHED_PROCESS_EXEC: &str = "name: sched_process_exec
ID: 365
format:
	field:unsigned short common_type;	offset:0;	size:2;	signed:0;
	field:unsigned char common_flags;	offset:2;	size:1;	signed:0;
	field:unsigned char common_preempt_count;	offset:3;	size:1;	signed:0;
	field:int common_pid;	offset:4;	size:4;	signed:1;

	field:__data_loc char[] filename;	offset:8;	size:4;	signed:0;
	field:pid_t pid;	offset:12;	size:4;	signed:1;
	field:pid_t old_pid;	offset:16;	size:4;	signed:1;

print fmt: \"filename=%s pid=%d old_pid=%d\", __get_str(filename), REC->pid, REC->old_pid
";

    const SYS_ENTER_SOCKETPAIR: &str = "name: sys_enter_socketpair
ID: 2240
format:
	field:unsigned short common_type;	offset:0;	size:2;	signed:0;
	field:unsigned char common_flags;	offset:2;	size:1;	signed:0;
	field:unsigned char common_preempt_count;	offset:3;	size:1;	signed:0;
	field:int common_pid;	offset:4;	size:4;	signed:1;

	field:int __syscall_nr;	offset:8;	size:4;	signed:1;
	field:int family;	offset:16;	size:8;	signed:0;
	field:int type;	offset:24;	size:8;	signed:0;
	field:int protocol;	offset:32;	size:8;	signed:0;
	field:int * usockvec;	offset:40;	size:8;	signed:0;

print fmt: \"family: 0x%08lx, type: 0x%08lx, protocol: 0x%08lx, usockvec: 0x%08lx\", ((unsigned long)(REC->family)), ((unsigned long)(REC->type)), ((unsigned long)(REC->protocol)), ((unsigned long)(REC->usockvec))
";

    const SYS_EXIT_READ: &str = "name: sys_exit_read
ID: 841
format:
	field:unsigned short common_type;	offset:0;	size:2;	signed:0;
	field:unsigned char common_flags;	offset:2;	size:1;	signed:0;
	field:unsigned char common_preempt_count;	offset:3;	size:1;	signed:0;
	field:int common_pid;	offset:4;	size:4;	signed:1;

	field:int __syscall_nr;	offset:8;	size:4;	signed:1;
	field:long ret;	offset:16;	size:8;	signed:1;

print fmt: \"0x%lx\", REC->ret
";

    fn field(name: &str, offset: usize, size: usize) -> FormatField {
        FormatField {
            name: name.into(),
            offset,
            size,
        }
    }

    fn find(assumed: &[Assumed], event: &str, field: FieldRef) -> Assumed {
        assumed
            .iter()
            .find(|a| a.event == event && a.field == field)
            .unwrap_or_else(|| panic!("no assumption for {event} {field:?}"))
            .clone()
    }

    #[test]
    fn parses_every_field_with_its_name_offset_and_size() {
        let fields = parse_format(SCHED_PROCESS_EXIT);
        assert_eq!(
            fields,
            vec![
                field("common_type", 0, 2),
                field("common_flags", 2, 1),
                field("common_preempt_count", 3, 1),
                field("common_pid", 4, 4),
                field("comm", 8, 16),
                field("pid", 24, 4),
                field("prio", 28, 4),
                field("group_dead", 32, 1),
            ]
        );
        let exec = parse_format(SCHED_PROCESS_EXEC);
        assert_eq!(exec[4], field("filename", 8, 4));
        let pair = parse_format(SYS_ENTER_SOCKETPAIR);
        assert_eq!(pair.last(), Some(&field("usockvec", 40, 8)));
    }

    #[test]
    fn every_assumption_holds_on_the_pasted_formats() {
        let all = assumed();
        for (text, event) in [
            (TASK_NEWTASK, "task_newtask"),
            (SCHED_PROCESS_EXEC, "sched_process_exec"),
            (SYS_ENTER_SOCKETPAIR, "sys_enter_socketpair"),
            (SYS_EXIT_READ, "sys_exit_read"),
        ] {
            let fields = parse_format(text);
            let mine: Vec<_> = all.iter().filter(|a| a.event == event).collect();
            assert!(!mine.is_empty(), "{event} has no assumptions");
            for a in mine {
                assert_eq!(check_field(a, &fields), Ok(()), "{a:?}");
            }
        }
    }

    #[test]
    fn group_dead_may_be_missing_but_not_elsewhere() {
        assert_eq!(has_group_dead(SCHED_PROCESS_EXIT), Ok(true));
        // sched_process_exit as Debian's 6.1 and 6.12 have it: no group_dead.
        let old = SCHED_PROCESS_EXIT.replace(
            "\tfield:bool group_dead;\toffset:32;\tsize:1;\tsigned:0;\n",
            "",
        );
        assert_eq!(has_group_dead(&old), Ok(false));
        let moved =
            SCHED_PROCESS_EXIT.replace("group_dead;\toffset:32;", "group_dead;\toffset:36;");
        let err = has_group_dead(&moved).unwrap_err();
        assert!(matches!(err, LayoutError::Moved { .. }), "{err:?}");
        assert!(
            err.to_string()
                .contains("sched:sched_process_exit: field `group_dead` is at offset 36"),
            "{err}"
        );
        // The other checks do not look at it.
        assert!(assumed().iter().all(|a| a.event != "sched_process_exit"));
    }

    #[test]
    fn a_moved_field_is_refused_with_both_offsets() {
        let moved = TASK_NEWTASK.replace(
            "field:u64 clone_flags;\toffset:32;",
            "field:u64 clone_flags;\toffset:40;",
        );
        let a = find(&assumed(), "task_newtask", FieldRef::Named("clone_flags"));
        let err = check_field(&a, &parse_format(&moved)).unwrap_err();
        assert_eq!(
            err,
            LayoutError::Moved {
                category: "task",
                event: "task_newtask".into(),
                field: "`clone_flags`".into(),
                expected_offset: 32,
                expected_size: 8,
                actual_offset: 40,
                actual_size: 8,
            }
        );
        let msg = err.to_string();
        assert!(
            msg.contains("task:task_newtask: field `clone_flags` is at offset 40 (size 8)")
                && msg.contains("read it at offset 32 (size 8)"),
            "{msg}"
        );
    }

    #[test]
    fn syscall_arguments_are_checked_by_position_whatever_their_names() {
        let all = assumed();
        let fourth = find(&all, "sys_enter_socketpair", FieldRef::SyscallArg(3));
        assert_eq!(
            check_field(&fourth, &parse_format(SYS_ENTER_SOCKETPAIR)),
            Ok(())
        );
        // A kernel with 4-byte slots: argument 3 would be at 28.
        let narrow = SYS_ENTER_SOCKETPAIR.replace("offset:40;\tsize:8;", "offset:28;\tsize:4;");
        let err = check_field(&fourth, &parse_format(&narrow)).unwrap_err();
        assert!(
            err.to_string()
                .contains("field `usockvec` (argument 3) is at offset 28 (size 4)"),
            "{err}"
        );
        // Fewer arguments than the program reads.
        let short = SYS_ENTER_SOCKETPAIR.replace(
            "\tfield:int * usockvec;\toffset:40;\tsize:8;\tsigned:0;\n",
            "",
        );
        let err = check_field(&fourth, &parse_format(&short)).unwrap_err();
        assert!(matches!(err, LayoutError::Missing { .. }), "{err:?}");
        assert!(err.to_string().contains("no field argument 3"), "{err}");
    }

    #[test]
    fn check_all_reads_each_format_once_and_stops_at_the_first_difference() {
        let all = assumed();
        let mut reads = Vec::new();
        let old_exec = SCHED_PROCESS_EXEC.replace("old_pid", "something_else");
        let err = check_all(&all, |category, event| {
            reads.push(format!("{category}:{event}"));
            Ok(match event {
                "task_newtask" => TASK_NEWTASK.into(),
                "sched_process_exec" => old_exec.clone(),
                _ => unreachable!("syscalls come after the process tracepoints"),
            })
        })
        .unwrap_err();
        assert!(err.to_string().contains("old_pid"), "{err}");
        assert_eq!(reads, ["task:task_newtask", "sched:sched_process_exec"]);
    }

    #[test]
    fn an_unreadable_format_says_which_tracepoint() {
        let err = check_in(Path::new("/nonexistent/events"), true).unwrap_err();
        let msg = format!("{err:#}");
        assert!(
            msg.contains("tracepoint task:task_newtask")
                && msg.contains("/nonexistent/events/task/task_newtask/format"),
            "{msg}"
        );
    }
}
