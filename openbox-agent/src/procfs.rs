//! What the agent reads from /proc: descriptors opened before watching began, socket
//! addresses, working directories, descendants.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
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

/// The descriptors of a process.
pub fn fds(pid: Pid) -> Vec<(i32, FdTarget)> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for entry in dir.flatten() {
        let Some(fd) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(target) = std::fs::read_link(entry.path()) else {
            continue;
        };
        let target = target.to_string_lossy().into_owned();
        out.push((fd, classify(&target)));
    }
    out.sort_by_key(|(fd, _)| *fd);
    out
}

fn classify(target: &str) -> FdTarget {
    if let Some(ino) = target
        .strip_prefix("socket:[")
        .and_then(|s| s.strip_suffix(']'))
    {
        return ino.parse().map(FdTarget::Socket).unwrap_or(FdTarget::Other);
    }
    if target.starts_with('/') && !target.ends_with(" (deleted)") {
        return FdTarget::File(target.to_string());
    }
    FdTarget::Other
}

fn socket_inode(pid: Pid, fd: i32) -> Option<u64> {
    let t = std::fs::read_link(format!("/proc/{pid}/fd/{fd}")).ok()?;
    match classify(&t.to_string_lossy()) {
        FdTarget::Socket(ino) => Some(ino),
        _ => None,
    }
}

/// Parses an address of /proc/net/tcp{,6}: hex IP in host-order 32-bit words, hex port.
fn parse_proc_addr(s: &str) -> Option<SocketAddr> {
    let (ip, port) = s.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let ip = match ip.len() {
        8 => IpAddr::V4(Ipv4Addr::from(
            u32::from_str_radix(ip, 16).ok()?.to_ne_bytes(),
        )),
        32 => {
            let mut b = [0u8; 16];
            for i in 0..4 {
                let w = u32::from_str_radix(&ip[i * 8..i * 8 + 8], 16).ok()?;
                b[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
            }
            let v6 = Ipv6Addr::from(b);
            match v6.to_ipv4_mapped() {
                Some(v4) => IpAddr::V4(v4),
                None => IpAddr::V6(v6),
            }
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// inode → (local, remote) for the TCP and UDP sockets of a process's network namespace.
fn inet_sockets(pid: Pid) -> HashMap<u64, (SocketAddr, SocketAddr)> {
    let mut out = HashMap::new();
    for table in ["tcp", "tcp6", "udp", "udp6"] {
        let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")) else {
            continue;
        };
        out.extend(parse_inet_table(&text));
    }
    out
}

fn parse_inet_table(text: &str) -> HashMap<u64, (SocketAddr, SocketAddr)> {
    let mut out = HashMap::new();
    for line in text.lines().skip(1) {
        let cols: Vec<&str> = line.split_whitespace().collect();
        if cols.len() < 10 {
            continue;
        }
        if let (Some(l), Some(r), Ok(ino)) = (
            parse_proc_addr(cols[1]),
            parse_proc_addr(cols[2]),
            cols[9].parse(),
        ) {
            out.insert(ino, (l, r));
        }
    }
    out
}

/// Every descendant of a process (children, grandchildren …), from /proc/*/stat.
pub fn descendants(root: Pid) -> Vec<Pid> {
    let mut parent_of: Vec<(Pid, Pid)> = Vec::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<Pid>().ok()) else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                continue;
            };
            // The comm field may hold spaces and parentheses: ppid follows the last ')'.
            let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
                continue;
            };
            if let Some(ppid) = rest.split_whitespace().nth(1).and_then(|s| s.parse().ok()) {
                parent_of.push((pid, ppid));
            }
        }
    }
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

pub fn exe(pid: Pid) -> Option<String> {
    std::fs::read_link(format!("/proc/{pid}/exe"))
        .ok()
        .map(|p| p.to_string_lossy().into_owned())
}

/// The real /proc.
pub struct Procfs;

impl ProcEnv for Procfs {
    fn cwd(&self, pid: Pid) -> Option<String> {
        std::fs::read_link(format!("/proc/{pid}/cwd"))
            .ok()
            .map(|p| p.to_string_lossy().into_owned())
    }

    fn fd_path(&self, pid: Pid, fd: i32) -> Option<String> {
        std::fs::read_link(format!("/proc/{pid}/fd/{fd}"))
            .ok()
            .map(|p| p.to_string_lossy().into_owned())
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
    use super::*;

    #[test]
    fn proc_net_tcp_lines_give_addresses_by_inode() {
        let text = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F90 0100007F:D431 01 00000000:00000000 00:00000000 00000000     0        0 4242 1 0000000000000000 20 4 30 10 -1
";
        let t = parse_inet_table(text);
        let (l, r) = t[&4242];
        assert_eq!(l.to_string(), "127.0.0.1:8080");
        assert_eq!(r.to_string(), "127.0.0.1:54321");
    }

    #[test]
    fn ipv6_loopback_parses() {
        let a = parse_proc_addr("00000000000000000000000001000000:01BB").unwrap();
        assert_eq!(a.to_string(), "[::1]:443");
    }

    #[test]
    fn fd_targets_are_classified() {
        assert_eq!(classify("socket:[123]"), FdTarget::Socket(123));
        assert_eq!(classify("/tmp/a"), FdTarget::File("/tmp/a".into()));
        assert_eq!(classify("pipe:[5]"), FdTarget::Other);
    }

    #[test]
    fn own_process_has_descriptors_and_a_cwd() {
        let me = std::process::id();
        assert!(!fds(me).is_empty());
        assert!(Procfs.cwd(me).is_some());
    }
}

/// The ids of a task in each PID namespace it belongs to, outermost (the host's, as
/// the agent sees it) first: the `NSpid` line of /proc/PID/status or
/// /proc/PID/task/TID/status.
pub fn nspids(status_path: &str) -> Option<Vec<u32>> {
    let text = std::fs::read_to_string(status_path).ok()?;
    parse_nspid(&text)
}

fn parse_nspid(status: &str) -> Option<Vec<u32>> {
    let line = status.lines().find(|l| l.starts_with("NSpid:"))?;
    let ids: Vec<u32> = line["NSpid:".len()..]
        .split_whitespace()
        .filter_map(|v| v.parse().ok())
        .collect();
    (!ids.is_empty()).then_some(ids)
}

/// The host thread id of the thread that process `pid` (host id) knows as `ns_tid` in
/// its own PID namespace; None when it has no such thread.
pub fn host_tid(pid: Pid, ns_tid: u32) -> Option<u32> {
    let own = nspids(&format!("/proc/{pid}/status"))?;
    if own.len() == 1 {
        // Same namespace as ours: the ids are the host's.
        return std::path::Path::new(&format!("/proc/{pid}/task/{ns_tid}"))
            .exists()
            .then_some(ns_tid);
    }
    let dir = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    for entry in dir.flatten() {
        let Some(tid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if let Some(ids) = nspids(&format!("/proc/{pid}/task/{tid}/status")) {
            if ids.last() == Some(&ns_tid) {
                return Some(tid);
            }
        }
    }
    None
}

/// Whether `[addr, addr + len)` lies in one writable mapping of process `pid`.
pub fn writable_range(pid: Pid, addr: u64, len: u64) -> bool {
    let Ok(maps) = std::fs::read_to_string(format!("/proc/{pid}/maps")) else {
        return false;
    };
    let Some(end) = addr.checked_add(len) else {
        return false;
    };
    maps.lines().any(|line| {
        let mut parts = line.split_whitespace();
        let (Some(range), Some(perms)) = (parts.next(), parts.next()) else {
            return false;
        };
        let Some((lo, hi)) = range.split_once('-') else {
            return false;
        };
        let (Ok(lo), Ok(hi)) = (u64::from_str_radix(lo, 16), u64::from_str_radix(hi, 16)) else {
            return false;
        };
        perms.starts_with("rw") && lo <= addr && end <= hi
    })
}

#[cfg(test)]
mod nspid_tests {
    use super::*;

    #[test]
    fn nspid_line_lists_outer_to_inner_ids() {
        let status = "Name:\tpython\nTgid:\t4242\nNSpid:\t4242\t1\nPPid:\t1\n";
        assert_eq!(parse_nspid(status), Some(vec![4242, 1]));
        assert_eq!(parse_nspid("Name:\tx\n"), None);
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
