//! Decoding ring-buffer records into owned Rust values.
//!
//! A record is untrusted bytes of a length the kernel chose: every decode checks the
//! length first and reads with `read_unaligned`, so a short or odd record becomes an
//! error, never undefined behaviour.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use openbox_common::*;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("record of {0} bytes is shorter than its header")]
    Short(usize),
    #[error("unknown record kind {0}")]
    UnknownKind(u32),
    #[error("data record claims {claimed} payload bytes but carries {carried}")]
    BadLength { claimed: usize, carried: usize },
}

/// A peer or local address as the kernel saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Addr {
    Inet(SocketAddr),
    Unix(String),
    Unknown(u16),
}

impl Addr {
    pub fn from_raw(raw: &SockAddr) -> Addr {
        match raw.family {
            2 => {
                let ip = Ipv4Addr::new(raw.addr[0], raw.addr[1], raw.addr[2], raw.addr[3]);
                Addr::Inet(SocketAddr::new(IpAddr::V4(ip), raw.port))
            }
            10 => {
                let ip = Ipv6Addr::from(raw.addr);
                // An IPv4-mapped peer is reported as the IPv4 address it is.
                let ip = match ip.to_ipv4_mapped() {
                    Some(v4) => IpAddr::V4(v4),
                    None => IpAddr::V6(ip),
                };
                Addr::Inet(SocketAddr::new(ip, raw.port))
            }
            1 => {
                let end = raw
                    .addr
                    .iter()
                    .position(|&b| b == 0)
                    .unwrap_or(raw.addr.len());
                Addr::Unix(String::from_utf8_lossy(&raw.addr[..end]).into_owned())
            }
            f => Addr::Unknown(f),
        }
    }

    pub fn family(&self) -> &'static str {
        match self {
            Addr::Inet(SocketAddr::V4(_)) => "ipv4",
            Addr::Inet(SocketAddr::V6(_)) => "ipv6",
            Addr::Unix(_) => "unix",
            Addr::Unknown(_) => "unknown",
        }
    }
}

impl std::fmt::Display for Addr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Addr::Inet(a) => write!(f, "{a}"),
            Addr::Unix(p) if p.is_empty() => write!(f, "unix:(unnamed)"),
            Addr::Unix(p) => write!(f, "unix:{p}"),
            Addr::Unknown(fam) => write!(f, "family {fam}"),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Data {
    pub fd: i32,
    pub source: u32,
    pub ssl: u64,
    pub call_len: u64,
    pub offset: u64,
    pub direction: u32,
    pub payload: Vec<u8>,
}

#[derive(Debug, Clone)]
pub struct Conn {
    pub fd: i32,
    pub ret: i32,
    pub peer: Addr,
}

#[derive(Debug, Clone)]
pub struct FileOpen {
    pub fd: i32,
    pub open_flags: u32,
    pub dirfd: i32,
    pub path: String,
}

#[derive(Debug, Clone)]
pub struct FileIo {
    pub fd: i32,
    pub direction: u32,
    pub bytes: u64,
}

/// A descriptor copy (dup, dup2, dup3, fcntl F_DUPFD*).
#[derive(Debug, Clone)]
pub struct Dup {
    pub oldfd: i32,
    pub newfd: i32,
    /// `FD_*` kind of the copied descriptor.
    pub fd_kind: u32,
    /// `FD_*` kind of a tracked descriptor the copy replaced (dup2/dup3), 0 when none.
    pub replaced_kind: u32,
}

/// Bytes moved between two descriptors by the kernel (sendfile, splice,
/// copy_file_range): counted, not copied.
#[derive(Debug, Clone)]
pub struct Transfer {
    pub source: u32,
    pub in_fd: i32,
    /// `FD_*` kind, 0 when not tracked (a pipe).
    pub in_kind: u32,
    pub out_fd: i32,
    pub out_kind: u32,
    pub bytes: u64,
}

#[derive(Debug, Clone)]
pub struct Proc {
    pub other: u32,
    pub comm: String,
    pub path: String,
}

#[derive(Debug, Clone)]
pub enum Body {
    SockData(Data),
    TlsData(Data),
    Connect(Conn),
    Accept(Conn),
    Socket(Conn),
    Close {
        fd: i32,
    },
    FileOpen(FileOpen),
    FileIo(FileIo),
    Dup(Dup),
    Transfer(Transfer),
    Exec(Proc),
    Fork(Proc),
    Exit(Proc),
    /// A forked child stopped itself until its TLS probes are attached.
    TlsWait(Proc),
}

#[derive(Debug, Clone)]
pub struct Event {
    pub hdr: EventHeader,
    pub body: Body,
}

fn read<T: Copy>(bytes: &[u8]) -> Result<T, DecodeError> {
    if bytes.len() < std::mem::size_of::<T>() {
        return Err(DecodeError::Short(bytes.len()));
    }
    // SAFETY: length checked; T is a #[repr(C)] plain-data type valid for any bits.
    Ok(unsafe { std::ptr::read_unaligned(bytes.as_ptr() as *const T) })
}

fn cstr(bytes: &[u8], len: u32) -> String {
    let len = (len as usize).min(bytes.len());
    let bytes = &bytes[..len];
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

/// A data record is a [`DataEvent`] header followed by `len` payload bytes: read the
/// header fields one by one so the record may be shorter than the full struct.
fn data(bytes: &[u8]) -> Result<Data, DecodeError> {
    if bytes.len() < DATA_HEADER_LEN {
        return Err(DecodeError::Short(bytes.len()));
    }
    let at = |off: usize| read::<u64>(&bytes[off..]);
    let at32 = |off: usize| read::<u32>(&bytes[off..]);
    let base = std::mem::size_of::<EventHeader>();
    let fd = at32(base)? as i32;
    let source = at32(base + 4)?;
    let ssl = at(base + 8)?;
    let call_len = at(base + 16)?;
    let offset = at(base + 24)?;
    let len = at32(base + 32)? as usize;
    let direction = at32(base + 36)?;
    let carried = bytes.len() - DATA_HEADER_LEN;
    if len > carried || len > MAX_CHUNK {
        return Err(DecodeError::BadLength {
            claimed: len,
            carried,
        });
    }
    Ok(Data {
        fd,
        source,
        ssl,
        call_len,
        offset,
        direction,
        payload: bytes[DATA_HEADER_LEN..DATA_HEADER_LEN + len].to_vec(),
    })
}

fn conn(bytes: &[u8]) -> Result<Conn, DecodeError> {
    let c: ConnEvent = read(bytes)?;
    Ok(Conn {
        fd: c.fd,
        ret: c.ret,
        peer: Addr::from_raw(&c.peer),
    })
}

fn proc_(bytes: &[u8]) -> Result<Proc, DecodeError> {
    let p: ProcEvent = read(bytes)?;
    Ok(Proc {
        other: p.other,
        comm: cstr(&p.comm, COMM_LEN as u32),
        path: cstr(&p.path, p.path_len),
    })
}

/// The process a record says the kernel stopped (`FLAG_PAUSED`), read from its header
/// alone: a record that does not decode must not leave its process stopped.
pub fn paused_tgid(bytes: &[u8]) -> Option<u32> {
    let hdr: EventHeader = read(bytes).ok()?;
    let stops = matches!(hdr.kind, EV_FILE_OPEN | EV_TLS_WAIT);
    (stops && hdr.flags & FLAG_PAUSED != 0).then_some(hdr.tgid)
}

pub fn decode(bytes: &[u8]) -> Result<Event, DecodeError> {
    let hdr: EventHeader = read(bytes)?;
    let body = match hdr.kind {
        EV_SOCK_DATA => Body::SockData(data(bytes)?),
        EV_TLS_DATA => Body::TlsData(data(bytes)?),
        EV_CONNECT => Body::Connect(conn(bytes)?),
        EV_ACCEPT => Body::Accept(conn(bytes)?),
        EV_SOCKET => Body::Socket(conn(bytes)?),
        EV_CLOSE => {
            let c: CloseEvent = read(bytes)?;
            Body::Close { fd: c.fd }
        }
        EV_FILE_OPEN => {
            let f: FileOpenEvent = read(bytes)?;
            Body::FileOpen(FileOpen {
                fd: f.fd,
                open_flags: f.open_flags,
                dirfd: f.dirfd,
                path: cstr(&f.path, f.path_len),
            })
        }
        EV_FILE_IO => {
            let f: FileIoEvent = read(bytes)?;
            Body::FileIo(FileIo {
                fd: f.fd,
                direction: f.direction,
                bytes: f.bytes,
            })
        }
        EV_DUP => {
            let d: DupEvent = read(bytes)?;
            Body::Dup(Dup {
                oldfd: d.oldfd,
                newfd: d.newfd,
                fd_kind: d.fd_kind,
                replaced_kind: d.replaced_kind,
            })
        }
        EV_TRANSFER => {
            let t: TransferEvent = read(bytes)?;
            Body::Transfer(Transfer {
                source: t.source,
                in_fd: t.in_fd,
                in_kind: t.in_kind,
                out_fd: t.out_fd,
                out_kind: t.out_kind,
                bytes: t.bytes,
            })
        }
        EV_EXEC => Body::Exec(proc_(bytes)?),
        EV_FORK => Body::Fork(proc_(bytes)?),
        EV_EXIT => Body::Exit(proc_(bytes)?),
        EV_TLS_WAIT => Body::TlsWait(proc_(bytes)?),
        k => return Err(DecodeError::UnknownKind(k)),
    };
    Ok(Event { hdr, body })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data_record(len: u32, payload: &[u8]) -> Vec<u8> {
        let hdr = EventHeader {
            kind: EV_SOCK_DATA,
            flags: FLAG_LAST,
            ts_ns: 5,
            tgid: 7,
            tid: 8,
            ..Default::default()
        };
        let mut v = Vec::new();
        v.extend_from_slice(unsafe {
            std::slice::from_raw_parts(
                &hdr as *const _ as *const u8,
                std::mem::size_of::<EventHeader>(),
            )
        });
        v.extend_from_slice(&3i32.to_ne_bytes());
        v.extend_from_slice(&SRC_WRITE.to_ne_bytes());
        v.extend_from_slice(&0u64.to_ne_bytes());
        v.extend_from_slice(&(payload.len() as u64).to_ne_bytes());
        v.extend_from_slice(&0u64.to_ne_bytes());
        v.extend_from_slice(&len.to_ne_bytes());
        v.extend_from_slice(&DIR_EGRESS.to_ne_bytes());
        assert_eq!(v.len(), DATA_HEADER_LEN);
        v.extend_from_slice(payload);
        v
    }

    #[test]
    fn data_record_with_payload_decodes() {
        let ev = decode(&data_record(5, b"hello")).unwrap();
        let Body::SockData(d) = ev.body else {
            panic!("not data")
        };
        assert_eq!(d.payload, b"hello");
        assert_eq!((ev.hdr.tgid, ev.hdr.tid, d.fd), (7, 8, 3));
    }

    #[test]
    fn data_record_claiming_more_than_it_carries_is_rejected() {
        assert_eq!(
            decode(&data_record(9, b"hello")).unwrap_err(),
            DecodeError::BadLength {
                claimed: 9,
                carried: 5
            }
        );
    }

    #[test]
    fn short_and_unknown_records_are_errors_not_panics() {
        for n in 0..80 {
            let _ = decode(&vec![0xffu8; n]);
        }
        let mut v = data_record(0, b"");
        v[0] = 99;
        assert_eq!(decode(&v).unwrap_err(), DecodeError::UnknownKind(99));
    }

    #[test]
    fn ipv4_mapped_peer_is_reported_as_ipv4() {
        let mut raw = SockAddr {
            family: 10,
            port: 443,
            ..Default::default()
        };
        raw.addr[10] = 0xff;
        raw.addr[11] = 0xff;
        raw.addr[12..].copy_from_slice(&[127, 0, 0, 1]);
        assert_eq!(Addr::from_raw(&raw).to_string(), "127.0.0.1:443");
    }
}
