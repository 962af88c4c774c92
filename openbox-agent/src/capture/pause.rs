//! Processes the kernel stops when they open a libssl, until their TLS probes are
//! attached (`openbox-ebpf` `probes/files.rs`), and how no process stays stopped.
//!
//! The kernel records each stop in the `PAUSED` map before it sends SIGSTOP. The agent
//! pins that map in bpffs as `/sys/fs/bpf/openbox/paused-<pid>-<start>` (its own pid
//! and start time), and resumes a process:
//! - once its probes are attached, whatever became of the attach (`Session::act`);
//! - when the agent ends by any path that unwinds (return, error, Ctrl-C, SIGTERM,
//!   SIGHUP, panic): [`Pauses`] is dropped after the programs are detached or no
//!   longer watch anyone (`Capture::hand_off_detach`), so no new stop can follow, and
//!   resumes every process still recorded;
//! - after a crash (SIGKILL, abort): the next agent to start finds the pinned map of an
//!   agent that is no longer running ([`recover`]) and resumes every process recorded
//!   there that still exists, is stopped and started before the stop (a reused pid is
//!   never touched).

use std::{
    io,
    path::{Path, PathBuf},
};

use aya::maps::{HashMap as BpfHashMap, Map, MapData};
use openbox_common::PausedProc;

use crate::conn::Pid;

/// Where the agents pin their `PAUSED` maps (a directory of the bpffs mount).
pub const PIN_DIR: &str = "/sys/fs/bpf/openbox";
const PIN_PREFIX: &str = "paused-";

/// Test-only: when set (to anything), a process paused for its TLS probes is not
/// resumed once they are attached, only when the agent exits or, after a crash, starts
/// again. `tests/pause.rs` uses it to kill the agent while a process is stopped; never
/// set it in production.
pub const HOLD_ENV: &str = "OPENBOX_TEST_HOLD_PAUSED";

/// The map name in the kernel object.
pub const MAP: &str = "PAUSED";

/// This agent's pin: its pid and start time (clock ticks since boot, /proc/PID/stat),
/// so that another agent can tell whether the owner still runs.
pub fn own_pin() -> io::Result<PathBuf> {
    let pid = std::process::id();
    let start = start_ticks(pid)
        .ok_or_else(|| io::Error::other("cannot read this process's start time"))?;
    Ok(Path::new(PIN_DIR).join(format!("{PIN_PREFIX}{pid}-{start}")))
}

/// Creates the pin directory (root only: the map names processes of every user).
pub fn create_pin_dir() -> io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    match std::fs::DirBuilder::new().mode(0o700).create(PIN_DIR) {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => Err(e),
        _ => Ok(()),
    }
}

fn stat(pid: Pid) -> Option<::procfs::process::Stat> {
    ::procfs::process::Process::new(pid as i32)
        .and_then(|p| p.stat())
        .ok()
}

fn start_ticks(pid: Pid) -> Option<u64> {
    stat(pid).map(|s| s.starttime)
}

/// The owner of a pin named `paused-<pid>-<start>`; `None` for another name.
fn owner(name: &str) -> Option<(Pid, u64)> {
    let (pid, start) = name.strip_prefix(PIN_PREFIX)?.split_once('-')?;
    Some((pid.parse().ok()?, start.parse().ok()?))
}

/// Whether the agent that pinned `name` still runs (same pid, same start time).
fn owner_alive(name: &str) -> bool {
    match owner(name) {
        Some((pid, start)) => start_ticks(pid) == Some(start),
        // Not ours to judge: leave it alone.
        None => true,
    }
}

/// Sends SIGCONT. `Ok(false)` when the process is gone (nothing is left stopped).
pub fn send_cont(pid: Pid) -> io::Result<bool> {
    // SAFETY: kill(2) with a pid and a signal number; no memory is passed.
    if unsafe { libc::kill(pid as i32, libc::SIGCONT) } == 0 {
        return Ok(true);
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::ESRCH) {
        return Ok(false);
    }
    Err(err)
}

/// Why a recorded process is not resumed after a crash, or `None` when it should be:
/// it exists, is stopped, and started before it was paused (else the pid was reused).
fn not_resumable(pid: Pid, rec: &PausedProc) -> Option<&'static str> {
    let Some(st) = stat(pid) else {
        return Some("gone");
    };
    if st.state != 'T' {
        return Some("no longer stopped");
    }
    // Start times have clock-tick granularity: rounded down, the start of the process
    // that was paused is never after the pause.
    let start_ns = st
        .starttime
        .saturating_mul(1_000_000_000 / ::procfs::ticks_per_second().max(1));
    if start_ns > rec.paused_at_ns {
        return Some("its pid now belongs to a process started after the pause");
    }
    None
}

fn open(pin: &Path) -> Result<BpfHashMap<MapData, u32, PausedProc>, String> {
    let data = MapData::from_pin(pin).map_err(|e| e.to_string())?;
    let map = Map::from_map_data(data).map_err(|e| e.to_string())?;
    BpfHashMap::try_from(map).map_err(|e| e.to_string())
}

/// Pins in [`PIN_DIR`] whose agent no longer runs.
fn orphan_pins() -> Vec<PathBuf> {
    let Ok(dir) = std::fs::read_dir(PIN_DIR) else {
        return Vec::new();
    };
    dir.flatten()
        .filter(|e| {
            let name = e.file_name();
            let name = name.to_string_lossy();
            name.starts_with(PIN_PREFIX) && !owner_alive(&name)
        })
        .map(|e| e.path())
        .collect()
}

/// What [`recover`] did.
#[derive(Debug, Default, Clone, Copy)]
pub struct Recovery {
    /// Processes resumed.
    pub resumed: u64,
    /// Processes that could not be resumed (each logged; their record is kept).
    pub failures: u64,
}

/// Resumes the processes that agents which are no longer running left stopped, clears
/// their records, and removes their pins (a pin is kept while a resume failed, so the
/// next start tries again).
pub fn recover() -> Recovery {
    let mut out = Recovery::default();
    for pin in orphan_pins() {
        let owner = pin
            .file_name()
            .and_then(|n| owner(&n.to_string_lossy()))
            .map(|(pid, _)| pid)
            .unwrap_or(0);
        let mut map = match open(&pin) {
            Ok(map) => map,
            Err(e) => {
                tracing::warn!(pin = %pin.display(), "cannot read the paused processes an agent that exited left in {}: {e}; remove the file once they run (`kill -CONT PID` for a process in state T)", pin.display());
                continue;
            }
        };
        let records: Vec<(u32, PausedProc)> = map.iter().flatten().collect();
        let mut kept = false;
        for (pid, rec) in records {
            let outcome = match not_resumable(pid, &rec) {
                Some(why) => {
                    tracing::info!(
                        pid,
                        agent = owner,
                        "a process paused by an agent that exited is not resumed: {why}"
                    );
                    Ok(false)
                }
                None => send_cont(pid),
            };
            match outcome {
                Ok(resumed) => {
                    if resumed {
                        out.resumed += 1;
                        tracing::warn!(pid, agent = owner, "resumed process {pid}, which the kernel stopped while agent {owner} attached TLS probes and which stayed stopped when that agent ended without resuming it");
                    }
                    let _ = map.remove(&pid);
                }
                Err(e) => {
                    out.failures += 1;
                    kept = true;
                    tracing::error!(pid, agent = owner, "could not resume process {pid}, stopped since agent {owner} ended while attaching its TLS probes: {e}. Run `kill -CONT {pid}`");
                }
            }
        }
        drop(map);
        if !kept {
            if let Err(e) = std::fs::remove_file(&pin) {
                tracing::warn!(pin = %pin.display(), "cannot remove the pin of an agent that exited: {e}");
            }
        }
    }
    out
}

/// Processes that agents no longer running left stopped, for `check` (read only):
/// (pin, stopped pids that the next start resumes). Fails with the reason when the
/// directory or a pin cannot be read.
pub fn orphans() -> Result<Vec<(PathBuf, Vec<Pid>)>, String> {
    match std::fs::read_dir(PIN_DIR) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(format!("{PIN_DIR}: {e}")),
        Ok(_) => {}
    }
    let mut out = Vec::new();
    for pin in orphan_pins() {
        let map = open(&pin).map_err(|e| format!("{}: {e}", pin.display()))?;
        let pids = map
            .iter()
            .flatten()
            .filter(|(pid, rec)| not_resumable(*pid, rec).is_none())
            .map(|(pid, _)| pid)
            .collect();
        out.push((pin, pids));
    }
    Ok(out)
}

/// This agent's `PAUSED` map. Dropped after the kernel programs are detached (it is the
/// last field of `Capture`), it resumes every process still recorded, then removes the
/// pin.
pub struct Pauses {
    map: BpfHashMap<MapData, u32, PausedProc>,
    /// Where the map is pinned; `None` when this agent does not pause.
    pin: Option<PathBuf>,
    /// Processes resumed after a crash of an earlier agent, at this one's start.
    pub recovered: Recovery,
}

impl Pauses {
    pub fn new(
        map: BpfHashMap<MapData, u32, PausedProc>,
        pin: Option<PathBuf>,
        recovered: Recovery,
    ) -> Pauses {
        Pauses {
            map,
            pin,
            recovered,
        }
    }

    /// Resumes `pid` and forgets its record. `Ok(false)`: the process is gone.
    pub fn resume(&mut self, pid: Pid) -> io::Result<bool> {
        let before = self.map.get(&pid, 0).ok();
        let resumed = send_cont(pid)?;
        // Forget only the record of the stop just undone: the process may have run on
        // and been stopped again meanwhile.
        if before.is_some() && self.map.get(&pid, 0).ok() == before {
            let _ = self.map.remove(&pid);
        }
        Ok(resumed)
    }
}

impl Drop for Pauses {
    fn drop(&mut self) {
        let Some(pin) = self.pin.take() else {
            return;
        };
        let mut kept = false;
        let pids: Vec<u32> = self.map.keys().flatten().collect();
        for pid in pids {
            match self.resume(pid) {
                Ok(true) => {
                    tracing::info!(pid, "resumed process {pid} at exit: the kernel had stopped it while its TLS probes were attached")
                }
                Ok(false) => {}
                Err(e) => {
                    kept = true;
                    tracing::error!(pid, "could not resume process {pid} at exit, which the kernel stopped while its TLS probes were attached: {e}. The next start of the agent tries again; or run `kill -CONT {pid}`");
                }
            }
        }
        if !kept {
            let _ = std::fs::remove_file(&pin);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pin_names_its_agent() {
        assert_eq!(owner("paused-1234-98765"), Some((1234, 98765)));
        assert_eq!(owner("paused-x-1"), None);
        assert_eq!(owner("other"), None);
        // Unknown names are never treated as an exited agent's.
        assert!(owner_alive("other"));
    }

    #[test]
    fn this_process_owns_its_pin_and_a_dead_pid_owns_nothing() {
        let pin = own_pin().unwrap();
        let name = pin.file_name().unwrap().to_string_lossy().to_string();
        assert!(owner_alive(&name), "{name}");
        let (pid, start) = owner(&name).unwrap();
        assert!(!owner_alive(&format!("paused-{pid}-{}", start + 1)));
    }

    #[test]
    fn a_running_process_or_a_later_one_is_never_resumed_for_a_record() {
        let me = std::process::id();
        // Running, not stopped.
        let rec = PausedProc {
            paused_at_ns: u64::MAX,
        };
        assert_eq!(not_resumable(me, &rec), Some("no longer stopped"));
        assert_eq!(not_resumable(u32::MAX - 1, &rec), Some("gone"));
    }

    #[test]
    fn a_stopped_process_is_resumed_only_for_a_stop_after_its_start() {
        let mut child = std::process::Command::new("sleep")
            .arg("60")
            .spawn()
            .unwrap();
        let pid = child.id();
        // SAFETY: signalling our own child.
        unsafe { libc::kill(pid as i32, libc::SIGSTOP) };
        while stat(pid).map(|s| s.state) != Some('T') {
            std::thread::yield_now();
        }
        let later = PausedProc {
            paused_at_ns: u64::MAX,
        };
        let before_its_start = PausedProc { paused_at_ns: 0 };
        let verdicts = (
            not_resumable(pid, &later),
            not_resumable(pid, &before_its_start),
        );
        let _ = child.kill();
        let _ = child.wait();
        assert_eq!(verdicts.0, None);
        assert_eq!(
            verdicts.1,
            Some("its pid now belongs to a process started after the pause")
        );
    }
}
