//! Every map of the kernel programs, the load-time settings, and the values the
//! programs keep for themselves (never read by the agent).

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray, ProgramArray, RingBuf},
};
use openbox_common::*;

use crate::emit::{DataCall, LoopState};

// ---- load-time settings (EbpfLoader::set_global) ----
#[no_mangle]
pub static CAPTURE_LIMIT: u32 = DEFAULT_CAPTURE_LIMIT;
#[no_mangle]
pub static PAUSE_ON_TLS_LIB: u32 = 0;
#[no_mangle]
pub static EXIT_TASK_SIGNAL: u32 = 0;
#[no_mangle]
pub static EXIT_SIGNAL_LIVE: u32 = 0;

/// Watched processes: tgid → flags. Filled by the agent and by fork of a watched process.
#[map]
pub static WATCHED: HashMap<u32, u32> = HashMap::with_max_entries(8192, 0);
/// Descriptors of watched processes: fd_key(tgid, fd) → FdState.
#[map]
pub static FDS: HashMap<u64, FdState> = HashMap::with_max_entries(131072, 0);
/// Arguments of a syscall in flight, by pid_tgid (a thread is in one syscall at a time).
/// Tracepoint mode only: an fexit program sees the arguments and the result together.
#[map]
pub static ARGS: HashMap<u64, SyscallArgs> = HashMap::with_max_entries(16384, 0);
/// Arguments of a libssl call in flight, by pid_tgid. Its presence also means "a TLS
/// call is active on this thread": socket bytes moved meanwhile are ciphertext.
#[map]
pub static SSL_ARGS: HashMap<u64, SslArgs> = HashMap::with_max_entries(16384, 0);
/// What memory-BIO SSL objects of registered worker threads encrypted and their socket
/// has not sent yet (see `UnsentWrite`), by process and SSL object: under `--enforce`
/// the agent names a held ciphertext send of the event loop by it. LRU: entries nobody
/// takes (no `--enforce`, a thread without the hook's filter) give way to new ones.
#[map]
pub static TLS_UNSENT: LruHashMap<UnsentKey, UnsentWrite> = LruHashMap::with_max_entries(1024, 0);
/// One zeroed `UnsentWrite`, never written: a new `TLS_UNSENT` entry is inserted from it
/// (the stack cannot hold one), then filled in place.
#[map]
pub static UNSENT_ZERO: Array<UnsentWrite> = Array::with_max_entries(1, 0);
/// Scratch space of the tracepoint and fentry/fexit programs for data records (the
/// stack is 512 bytes). Per CPU: a tracepoint program runs with preemption disabled, so
/// it has its CPU's slot to itself until it returns; an fexit program may be preempted
/// and claims the slot first (`emit::claim_scratch`).
#[map]
pub static SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);
/// Scratch space of the uprobe programs (and of an fexit program that found this CPU's
/// slot taken), by pid_tgid, for as long as one runs. Not per CPU: a uprobe program can
/// be preempted, and a program that runs on the same CPU meanwhile would overwrite a
/// per-CPU slot (see `probes::tls`). An entry lives only
/// while a program runs, so this bounds the preempted TLS returns at one time.
#[map]
pub static TLS_SCRATCH: HashMap<u64, Scratch> = HashMap::with_max_entries(256, 0);
/// Flags the agent sets on one incarnation of a descriptor (see FdFlagKey).
#[map]
pub static FD_FLAGS: HashMap<FdFlagKey, u32> = HashMap::with_max_entries(65536, 0);
/// Threads of registered workers (key: host tid) and where their activity slot is.
/// Written by the agent once the hook's registration passed the peer-credential check.
#[map]
pub static THREADS: HashMap<u32, ThreadSlot> = HashMap::with_max_entries(65536, 0);
/// Processes started while an activity ran (key: host tgid): the activity they serve.
/// Written here at fork, from the parent's attribution; never by user space.
#[map]
pub static INHERIT: HashMap<u32, Inherited> = HashMap::with_max_entries(16384, 0);
/// Processes stopped while their TLS probes attach (key: host tgid). Written here
/// before the SIGSTOP, removed by the agent once it sent SIGCONT, or here at the
/// process's exit. The agent pins it in bpffs (/sys/fs/bpf/openbox/): after a crash of
/// the agent, the next one resumes whoever is still stopped.
#[map]
pub static PAUSED: HashMap<u32, PausedProc> = HashMap::with_max_entries(4096, 0);
/// Per-CPU counters, indexed by `openbox_common::CNT_*`.
#[map]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(NUM_COUNTERS, 0);
#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(16 * 1024 * 1024, 0);

/// What a syscall's entry program keeps for its exit program, by call.
#[repr(C, u32)]
#[derive(Clone, Copy)]
pub enum SyscallArgs {
    /// read/write/readv/writev/recvfrom/sendto/recvmsg/sendmsg, their positional
    /// forms and sendmmsg/recvmmsg, on a tracked descriptor.
    Data {
        /// `SRC_*`.
        source: u32,
        fd: i32,
        /// FD kind at entry.
        fd_kind: u32,
        fd_flags: u32,
        /// Buffer, iovec array or msghdr pointer, by source.
        buf: u64,
        /// Requested byte count or iovec count.
        count: u64,
    },
    Connect {
        fd: i32,
        /// The peer, read at entry (the address may be gone at exit).
        peer: SockAddr,
    },
    /// accept and accept4.
    Accept {
        /// The listening socket.
        listener: i32,
        /// Where the kernel writes the peer's sockaddr (0 when not asked).
        peer_addr: u64,
    },
    Socket {
        family: u16,
        /// The type argument, with SOCK_NONBLOCK/SOCK_CLOEXEC.
        sock_type: u64,
    },
    SocketPair {
        family: u16,
        sock_type: u64,
        /// The int[2] the kernel writes the two descriptors into.
        fds: u64,
    },
    /// dup/dup2/dup3/fcntl(F_DUPFD*): the descriptor copied (the copy's number is the
    /// call's result).
    Dup { oldfd: i32 },
    /// sendfile/splice/copy_file_range between two descriptors, one of them tracked.
    Transfer {
        source: u32,
        in_fd: i32,
        in_kind: u32,
        out_fd: i32,
        out_kind: u32,
    },
    /// openat and openat2.
    Open {
        dirfd: i32,
        /// The path pointer.
        path: u64,
        /// Open flags (openat2: `open_how.flags`).
        flags: u64,
    },
}

/// Room to build a data record and the state of the loop that fills it.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Scratch {
    pub event: DataEvent,
    pub state: LoopState,
    /// Non-zero while an fentry/fexit program uses this CPU's slot (see
    /// `emit::claim_scratch`).
    pub busy: u64,
    /// The sendmmsg/recvmmsg batch being reported (`probes::sockets`).
    pub batch: Batch,
}

/// A sendmmsg/recvmmsg batch being reported, one message after the other: in map
/// memory, so the message index is not a constant the verifier walks each value of,
/// and so it outlives the tail calls between messages.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Batch {
    /// What each message's records carry (its `len` set per message).
    pub call: DataCall,
    /// The `struct mmsghdr` array and the number of messages the call moved.
    pub array: u64,
    pub messages: u64,
    /// Records without payload (ciphertext, or a descriptor marked FD_NO_PAYLOAD).
    pub no_payload: u64,
    /// The message to report next.
    pub next: u64,
}

/// The program that reports one message of a batch (`sys_mmsg_message`) at index 0,
/// set by the agent once loaded: the tracepoint exits of sendmmsg/recvmmsg tail-call
/// it, and it itself for each next message. Verified as one message's work instead of
/// every message's (a loop over MAX_MMSG messages each looping over MAX_RECORDS_PER_CALL
/// records was walked 16 × 64 times: 293 000 instructions, 110–250 ms of start-up).
#[map]
pub static MMSG_MESSAGE: ProgramArray = ProgramArray::with_max_entries(1, 0);

/// The same for fentry mode, tail-called by the fexit programs of sendmmsg/recvmmsg and
/// by themselves: `fexit_mmsg_message` at index 0 (the batch in this CPU's scratch
/// slot), `fexit_mmsg_message_own` at 1 (in the thread's own entry, `TLS_SCRATCH`). A
/// program array of its own: one holds programs of one type, and tracing programs of
/// one attach prototype.
#[map]
pub static FEXIT_MMSG_MESSAGE: ProgramArray = ProgramArray::with_max_entries(2, 0);

/// A new process whose parent's descriptors are being copied to it
/// (`probes::process`), across the tail calls of `task_newtask_fds`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct ForkCopy {
    pub parent: u32,
    pub child: u32,
    /// The first descriptor number the next `task_newtask_fds` copies.
    pub next_fd: i32,
    pub _pad: u32,
}

/// This CPU's fork being copied: `task_newtask` and its tail calls are not preempted.
#[map]
pub static FORK_COPY: PerCpuArray<ForkCopy> = PerCpuArray::with_max_entries(1, 0);

/// The program that copies the next `FDS_PER_COPY` descriptors of a fork
/// (`task_newtask_fds`) at index 0, set by the agent once loaded: `task_newtask`
/// tail-calls it, and it itself until `INHERITED_FDS_COPIED`. The loop over all 1024
/// numbers in `task_newtask` was walked for each by the verifier (152 000 instructions,
/// 40–100 ms: the longest program once the sendmmsg/recvmmsg ones were cut).
#[map]
pub static FORK_FDS: ProgramArray = ProgramArray::with_max_entries(1, 0);
