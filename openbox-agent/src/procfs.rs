//! What the agent reads from /proc: descriptors opened before watching began, socket
//! addresses, working directories, descendants.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    path::Path,
};

use ::procfs::{
    process::{FDTarget, MMPermissions, MMapPath, Process},
    FromRead,
};

use crate::{
    capture::event::Addr,
    conn::{Pid, ProcEnv},
};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FdTarget {
    Socket(u64),
    File(String),
    Other,
}

fn process(pid: Pid) -> Option<Process> {
    Process::new(i32::try_from(pid).ok()?).ok()
}

/// The descriptors of a process.
pub fn fds(pid: Pid) -> Vec<(i32, FdTarget)> {
    let Some(fds) = process(pid).and_then(|p| p.fd().ok()) else {
        return Vec::new();
    };
    let mut out: Vec<(i32, FdTarget)> = fds
        .flatten()
        .map(|info| (info.fd, classify(info.target)))
        .collect();
    out.sort_by_key(|(fd, _)| *fd);
    out
}

/// The descriptors of a process that its next exec keeps: those without close-on-exec
/// (`flags` in /proc/PID/fdinfo/FD). For a child between fork and exec, whose
/// close-on-exec descriptors are the agent's own.
pub fn fds_kept_across_exec(pid: Pid) -> Vec<(i32, FdTarget)> {
    let mut fds = fds(pid);
    // Other descriptors (the agent's BPF objects among them) are not seeded anyway.
    fds.retain(|(fd, target)| {
        *target != FdTarget::Other && !close_on_exec(pid, *fd).unwrap_or(false)
    });
    fds
}

/// Whether descriptor `fd` of `pid` is close-on-exec; `None`: unknown (gone).
fn close_on_exec(pid: Pid, fd: i32) -> Option<bool> {
    let info = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")).ok()?;
    let flags = info
        .lines()
        .find_map(|l| l.strip_prefix("flags:"))
        .and_then(|v| u32::from_str_radix(v.trim(), 8).ok())?;
    Some(flags & libc::O_CLOEXEC as u32 != 0)
}

fn classify(target: FDTarget) -> FdTarget {
    match target {
        FDTarget::Socket(inode) => FdTarget::Socket(inode),
        FDTarget::Path(path) => {
            let path = path.to_string_lossy();
            // A deleted file's name is no longer the file: nothing to report it as.
            if path.starts_with('/') && !path.ends_with(" (deleted)") {
                FdTarget::File(path.into_owned())
            } else {
                FdTarget::Other
            }
        }
        _ => FdTarget::Other,
    }
}

fn socket_inode(pid: Pid, fd: i32) -> Option<u64> {
    match process(pid)?.fd_from_fd(fd).ok()?.target {
        FDTarget::Socket(inode) => Some(inode),
        _ => None,
    }
}

/// IPv4 peers of dual-stack sockets appear in the tcp6/udp6 tables as v4-mapped
/// addresses: report them as the IPv4 addresses they are, as the kernel records do.
fn unmapped(a: SocketAddr) -> SocketAddr {
    match a.ip() {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), a.port()),
            None => a,
        },
        IpAddr::V4(_) => a,
    }
}

/// inode → (local, remote) for the TCP and UDP sockets of a process's network namespace.
fn inet_sockets(pid: Pid) -> HashMap<u64, (SocketAddr, SocketAddr)> {
    let mut out = HashMap::new();
    let Some(p) = process(pid) else {
        return out;
    };
    let tcp = [p.tcp(), p.tcp6()].into_iter().flatten().flatten();
    for e in tcp {
        out.insert(
            e.inode,
            (unmapped(e.local_address), unmapped(e.remote_address)),
        );
    }
    let udp = [p.udp(), p.udp6()].into_iter().flatten().flatten();
    for e in udp {
        out.insert(
            e.inode,
            (unmapped(e.local_address), unmapped(e.remote_address)),
        );
    }
    out
}

/// Every descendant of a process (children, grandchildren …), from /proc/*/stat.
pub fn descendants(root: Pid) -> Vec<Pid> {
    let parent_of: Vec<(Pid, Pid)> = ::procfs::process::all_processes()
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|p| {
            let stat = p.stat().ok()?;
            Some((
                Pid::try_from(stat.pid).ok()?,
                Pid::try_from(stat.ppid).ok()?,
            ))
        })
        .collect();
    let mut out = Vec::new();
    let mut frontier = vec![root];
    while let Some(p) = frontier.pop() {
        for (child, parent) in &parent_of {
            if *parent == p && !out.contains(child) {
                out.push(*child);
                frontier.push(*child);
            }
        }
    }
    out
}

/// The ancestors of a process, nearest first (its parent, then the parent's parent …,
/// up to but not including pid 1 or the first that is gone), from /proc/PID/stat.
pub fn ancestors(pid: Pid) -> Vec<Pid> {
    let mut out = Vec::new();
    let mut at = pid;
    // A bound, not a depth anyone reaches: pid reuse cannot make the walk loop forever.
    while out.len() < 4096 {
        let Some(parent) = process(at)
            .and_then(|p| p.stat().ok())
            .and_then(|s| Pid::try_from(s.ppid).ok())
        else {
            break;
        };
        if parent <= 1 {
            break;
        }
        out.push(parent);
        at = parent;
    }
    out
}

pub fn exe(pid: Pid) -> Option<String> {
    process(pid)?
        .exe()
        .ok()
        .map(|p| p.to_string_lossy().into_owned())
}

/// A file a process maps executable, as /proc/PID/maps names it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct MappedFile {
    /// The path in the process's own mount namespace (spaces kept).
    pub path: String,
    /// Replaced or removed since it was mapped (`(deleted)` in maps): the path now
    /// names another file, or none.
    pub deleted: bool,
}

/// Executable file mappings of a process, from /proc/PID/maps.
pub fn mapped_files(pid: Pid) -> std::io::Result<Vec<MappedFile>> {
    let p = process(pid).ok_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::NotFound, format!("process {pid}"))
    })?;
    let maps = p.maps().map_err(std::io::Error::other)?;
    let mut out: Vec<MappedFile> = maps
        .into_iter()
        .filter(|m| m.perms.contains(MMPermissions::EXECUTE))
        .filter_map(|m| match m.pathname {
            MMapPath::Path(path) => Some(mapped_file(&path.to_string_lossy())),
            _ => None,
        })
        .collect();
    out.sort();
    out.dedup();
    Ok(out)
}

fn mapped_file(path: &str) -> MappedFile {
    match path.strip_suffix(" (deleted)") {
        Some(p) => MappedFile {
            path: p.to_string(),
            deleted: true,
        },
        None => MappedFile {
            path: path.to_string(),
            deleted: false,
        },
    }
}

/// A path as process `pid` names it, opened from the agent: under /proc/PID/root, with
/// symlinks resolved inside that root. A container's `/usr/lib/…/libssl.so.3` is not the
/// file at the same path in the agent's view (the agent's own, or the host's), and an
/// absolute symlink in the container points into the container, so neither the plain
/// path nor `canonicalize` (which follows /proc/PID/root back to the agent's `/`) will
/// do. A path that does not resolve is returned joined as it is: opening it then fails
/// with the error worth reporting.
pub fn in_root(pid: Pid, path: &str) -> std::path::PathBuf {
    in_root_at(Path::new(&format!("/proc/{pid}/root")), path)
}

/// [`in_root`] for any root directory.
pub fn in_root_at(root: &Path, path: &str) -> std::path::PathBuf {
    // As the kernel's own limit on nested links (ELOOP).
    const MAX_LINKS: usize = 40;
    let mut todo: Vec<String> = components(path).rev().collect();
    let mut done: Vec<String> = Vec::new();
    let mut links = 0;
    while let Some(c) = todo.pop() {
        match c.as_str() {
            "." => continue,
            ".." => {
                done.pop();
                continue;
            }
            _ => {}
        }
        let here = join(root, &done).join(&c);
        let target = match std::fs::symlink_metadata(&here) {
            Ok(m) if m.file_type().is_symlink() => std::fs::read_link(&here).ok(),
            _ => None,
        };
        match target {
            Some(t) if links < MAX_LINKS => {
                links += 1;
                let t = t.to_string_lossy().into_owned();
                if t.starts_with('/') {
                    done.clear();
                }
                todo.extend(components(&t).rev());
            }
            _ => done.push(c),
        }
    }
    join(root, &done)
}

fn components(path: &str) -> impl DoubleEndedIterator<Item = String> + '_ {
    path.split('/')
        .filter(|c| !c.is_empty())
        .map(str::to_string)
}

fn join(root: &Path, parts: &[String]) -> std::path::PathBuf {
    let mut p = root.to_path_buf();
    p.extend(parts);
    p
}

/// The real /proc.
pub struct Procfs;

impl ProcEnv for Procfs {
    fn cwd(&self, pid: Pid) -> Option<String> {
        let cwd = process(pid)?.cwd().ok()?;
        Some(cwd.to_string_lossy().into_owned())
    }

    fn fd_path(&self, pid: Pid, fd: i32) -> Option<String> {
        match process(pid)?.fd_from_fd(fd).ok()?.target {
            FDTarget::Path(path) => Some(path.to_string_lossy().into_owned()),
            _ => None,
        }
    }

    fn socket_addrs(&self, pid: Pid, fd: i32) -> (Option<Addr>, Option<Addr>) {
        let Some(ino) = socket_inode(pid, fd) else {
            return (None, None);
        };
        match inet_sockets(pid).get(&ino) {
            Some((l, r)) => {
                let remote = if r.port() == 0 {
                    None
                } else {
                    Some(Addr::Inet(*r))
                };
                (Some(Addr::Inet(*l)), remote)
            }
            None => (None, None),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{io::Write, os::unix::net::UnixStream};

    use super::*;

    #[test]
    fn close_on_exec_descriptors_are_not_kept_across_exec() {
        use std::os::fd::AsRawFd;
        // std opens with O_CLOEXEC; dup(2) makes a copy without it.
        let file = std::fs::File::open("/proc/self/status").unwrap();
        let kept = unsafe { libc::dup(file.as_raw_fd()) };
        assert!(kept >= 0);
        let me = std::process::id();
        let kept_fds = fds_kept_across_exec(me);
        let has = |fd: i32| kept_fds.iter().any(|(f, _)| *f == fd);
        assert!(has(kept), "{kept_fds:?}");
        assert!(!has(file.as_raw_fd()), "{kept_fds:?}");
        assert!(fds(me).iter().any(|(f, _)| *f == file.as_raw_fd()));
        unsafe { libc::close(kept) };
    }

    #[test]
    fn paths_resolve_inside_the_given_root() {
        let root = std::env::temp_dir().join(format!("openbox-root-{}", std::process::id()));
        let lib = root.join("usr/lib/x86_64-linux-gnu");
        std::fs::create_dir_all(&lib).unwrap();
        std::fs::write(lib.join("libssl.so.3"), b"").unwrap();
        let _ = std::os::unix::fs::symlink("usr/lib", root.join("lib"));
        // Absolute targets are the container's, not the agent's.
        let _ = std::os::unix::fs::symlink(
            "/usr/lib/x86_64-linux-gnu/libssl.so.3",
            lib.join("libssl.so"),
        );
        let want = lib.join("libssl.so.3");
        for path in [
            "/usr/lib/x86_64-linux-gnu/libssl.so.3",
            "/lib/x86_64-linux-gnu/libssl.so.3",
            "/lib/x86_64-linux-gnu/libssl.so",
            "/usr/lib/../lib/x86_64-linux-gnu/./libssl.so",
        ] {
            assert_eq!(in_root_at(&root, path), want, "{path}");
        }
        // Missing files are joined as named, for the error that opening them gives.
        assert_eq!(in_root_at(&root, "/opt/none.so"), root.join("opt/none.so"));
        // A link loop ends.
        let _ = std::os::unix::fs::symlink("/loop", root.join("loop"));
        let _ = in_root_at(&root, "/loop/x");
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn fd_targets_are_classified() {
        assert_eq!(classify(FDTarget::Socket(123)), FdTarget::Socket(123));
        assert_eq!(
            classify(FDTarget::Path("/tmp/a b".into())),
            FdTarget::File("/tmp/a b".into())
        );
        assert_eq!(classify(FDTarget::Pipe(5)), FdTarget::Other);
        assert_eq!(
            classify(FDTarget::Path("/tmp/gone (deleted)".into())),
            FdTarget::Other
        );
    }

    #[test]
    fn own_process_has_descriptors_and_a_cwd() {
        let me = std::process::id();
        assert!(!fds(me).is_empty());
        assert!(Procfs.cwd(me).is_some());
    }

    #[test]
    fn a_connected_tcp_socket_has_its_addresses() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let server = listener.local_addr().unwrap();
        let client = std::net::TcpStream::connect(server).unwrap();
        let fd = std::os::fd::AsRawFd::as_raw_fd(&client);
        let (local, remote) = Procfs.socket_addrs(std::process::id(), fd);
        assert_eq!(remote, Some(Addr::Inet(server)));
        assert_eq!(local, Some(Addr::Inet(client.local_addr().unwrap())));
    }

    #[test]
    fn a_v4_peer_of_a_dual_stack_socket_is_reported_as_ipv4() {
        let a: SocketAddr = "[::ffff:127.0.0.1]:443".parse().unwrap();
        assert_eq!(unmapped(a).to_string(), "127.0.0.1:443");
        let b: SocketAddr = "[::1]:443".parse().unwrap();
        assert_eq!(unmapped(b), b);
    }

    #[test]
    fn unix_sockets_have_no_inet_addresses() {
        let (mut a, _b) = UnixStream::pair().unwrap();
        a.write_all(b"x").unwrap();
        let fd = std::os::fd::AsRawFd::as_raw_fd(&a);
        assert_eq!(Procfs.socket_addrs(std::process::id(), fd), (None, None));
    }

    #[test]
    fn descendants_include_a_child_and_its_child() {
        let mut child = std::process::Command::new("sh")
            .args(["-c", "sleep 5 & wait"])
            .spawn()
            .unwrap();
        let pid = child.id();
        let mut found = Vec::new();
        for _ in 0..100 {
            found = descendants(std::process::id());
            if found.contains(&pid) && found.len() >= 2 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let _ = std::process::Command::new("pkill")
            .args(["-P", &pid.to_string()])
            .status();
        let _ = child.kill();
        let _ = child.wait();
        assert!(found.contains(&pid), "{found:?} lacks {pid}");
    }

    #[test]
    fn deleted_and_spaced_paths_of_mappings_are_kept_whole() {
        assert_eq!(
            mapped_file("/opt/my env/lib/libssl.so.3"),
            MappedFile {
                path: "/opt/my env/lib/libssl.so.3".into(),
                deleted: false
            }
        );
        assert_eq!(
            mapped_file("/usr/lib/libssl.so.3 (deleted)"),
            MappedFile {
                path: "/usr/lib/libssl.so.3".into(),
                deleted: true
            }
        );
    }

    #[test]
    fn own_mappings_include_the_executable() {
        let files = mapped_files(std::process::id()).unwrap();
        let me = exe(std::process::id()).unwrap();
        assert!(
            files.iter().any(|f| f.path == me && !f.deleted),
            "{files:?}"
        );
    }
}

/// The ids of a task in each PID namespace it belongs to, outermost (the host's, as
/// the agent sees it) first: the `NSpid` line of /proc/PID/status or
/// /proc/PID/task/TID/status.
pub fn nspids(status_path: &str) -> Option<Vec<u32>> {
    let status = ::procfs::process::Status::from_file(status_path).ok()?;
    let ids: Vec<u32> = status
        .nspid?
        .into_iter()
        .filter_map(|id| u32::try_from(id).ok())
        .collect();
    (!ids.is_empty()).then_some(ids)
}

/// The host thread id of the thread that process `pid` (host id) knows as `ns_tid` in
/// its own PID namespace; None when it has no such thread.
pub fn host_tid(pid: Pid, ns_tid: u32) -> Option<u32> {
    let own = nspids(&format!("/proc/{pid}/status"))?;
    if own.len() == 1 {
        // Same namespace as ours: the ids are the host's.
        return Path::new(&format!("/proc/{pid}/task/{ns_tid}"))
            .exists()
            .then_some(ns_tid);
    }
    for task in process(pid)?.tasks().ok()?.flatten() {
        let ids = task.status().ok().and_then(|s| s.nspid);
        if ids.and_then(|ids| ids.last().copied()) == i32::try_from(ns_tid).ok() {
            return u32::try_from(task.tid).ok();
        }
    }
    None
}

/// Whether `[addr, addr + len)` lies in one writable mapping of process `pid`.
pub fn writable_range(pid: Pid, addr: u64, len: u64) -> bool {
    let Some(maps) = process(pid).and_then(|p| p.maps().ok()) else {
        return false;
    };
    let Some(end) = addr.checked_add(len) else {
        return false;
    };
    maps.into_iter().any(|m| {
        let (lo, hi) = m.address;
        m.perms.contains(MMPermissions::READ | MMPermissions::WRITE) && lo <= addr && end <= hi
    })
}

#[cfg(test)]
mod nspid_tests {
    use super::*;

    #[test]
    fn own_nspid_is_our_pid() {
        let pid = std::process::id();
        let ids = nspids(&format!("/proc/{pid}/status")).unwrap();
        assert_eq!(ids.first(), Some(&pid));
        assert_eq!(nspids("/proc/not-a-process/status"), None);
    }

    #[test]
    fn own_threads_translate_and_others_do_not() {
        let pid = std::process::id();
        let tid = unsafe { libc::gettid() } as u32;
        assert_eq!(host_tid(pid, tid), Some(tid));
        assert_eq!(host_tid(pid, u32::MAX - 1), None);
    }

    #[test]
    fn writable_range_accepts_heap_and_refuses_code() {
        let pid = std::process::id();
        let v = vec![0u64; 1024];
        assert!(writable_range(pid, v.as_ptr() as u64, 8 * 1024));
        let code = writable_range_accepts_heap_and_refuses_code as *const () as u64;
        assert!(!writable_range(pid, code, 8));
        assert!(!writable_range(pid, u64::MAX - 4, 8));
    }
}

/// The process (thread group) host thread `tid` belongs to: the `Tgid` line of
/// /proc/TID/status.
pub fn tgid_of(tid: u32) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{tid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Tgid:"))?
        .trim()
        .parse()
        .ok()
}
