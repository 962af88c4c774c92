//! Where a kernel structure's fields are on the running kernel, from its BTF
//! (`/sys/kernel/btf/vmlinux`).
//!
//! aya parses BTF for loading but keeps the members of a type to itself, and the
//! programs here are not CO-RE-relocated (aya's Rust programs have no field
//! relocations), so the few offsets a program needs are found here and handed to it
//! as load-time globals. Only what that needs is read: the type table, struct and
//! union members (through anonymous members, which `randomized_struct_fields_start`
//! makes of most of `task_struct` on some configurations) and names.
//!
//! Format: Documentation/bpf/btf.rst — a header, then `struct btf_type` records, each
//! followed by data whose size depends on its kind, then the string section.

use anyhow::{bail, ensure, Context, Result};

const MAGIC: u16 = 0xeb9f;
const KIND_INT: u32 = 1;
const KIND_PTR: u32 = 2;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_DECL_TAG: u32 = 17;
const KIND_TYPE_TAG: u32 = 18;
const KIND_ENUM64: u32 = 19;

/// A parsed BTF blob: where each type's record starts, by type id.
pub struct Btf {
    data: Vec<u8>,
    /// Byte offset of type id `i + 1`'s record in `data` (id 0 is `void`).
    types: Vec<usize>,
    strings: std::ops::Range<usize>,
}

/// One member of a struct or union, with its offset from the outermost type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Member {
    /// Byte offset.
    pub offset: u32,
    /// Its type id, typedefs and qualifiers resolved.
    pub type_id: u32,
}

impl Btf {
    /// The running kernel's BTF.
    pub fn from_sys_fs() -> Result<Btf> {
        let path = crate::preflight::BTF;
        let data = std::fs::read(path).with_context(|| {
            format!("reading the kernel's BTF from {path} failed; it needs a kernel built with CONFIG_DEBUG_INFO_BTF=y")
        })?;
        Btf::parse(data).with_context(|| format!("parsing the kernel's BTF ({path})"))
    }

    pub fn parse(data: Vec<u8>) -> Result<Btf> {
        ensure!(data.len() >= 24, "shorter than a BTF header");
        let u16_at = |at: usize| u16::from_ne_bytes([data[at], data[at + 1]]);
        ensure!(
            u16_at(0) == MAGIC,
            "not BTF in this machine's byte order (magic {:#x})",
            u16_at(0)
        );
        let u32_at = |at: usize| u32::from_ne_bytes(data[at..at + 4].try_into().unwrap());
        let hdr_len = u32_at(4) as usize;
        let (type_off, type_len) = (u32_at(8) as usize, u32_at(12) as usize);
        let (str_off, str_len) = (u32_at(16) as usize, u32_at(20) as usize);
        let types_at = hdr_len + type_off;
        let strings = hdr_len + str_off..hdr_len + str_off + str_len;
        ensure!(
            types_at + type_len <= data.len() && strings.end <= data.len(),
            "sections past the end of the data"
        );
        let mut types = Vec::new();
        let mut at = types_at;
        while at < types_at + type_len {
            ensure!(at + 12 <= types_at + type_len, "truncated type record");
            let info = u32_at(at + 4);
            let vlen = (info & 0xffff) as usize;
            let extra = match (info >> 24) & 0x1f {
                KIND_INT | KIND_VAR | KIND_DECL_TAG => 4,
                KIND_ARRAY => 12,
                KIND_STRUCT | KIND_UNION | KIND_DATASEC | KIND_ENUM64 => 12 * vlen,
                KIND_ENUM | KIND_FUNC_PROTO => 8 * vlen,
                // PTR, FWD, TYPEDEF, VOLATILE, CONST, RESTRICT, FUNC, FLOAT, TYPE_TAG
                0..=19 => 0,
                kind => bail!("type {} has unknown kind {kind}", types.len() + 1),
            };
            types.push(at);
            at += 12 + extra;
        }
        Ok(Btf {
            data,
            types,
            strings,
        })
    }

    fn u32_at(&self, at: usize) -> u32 {
        u32::from_ne_bytes(self.data[at..at + 4].try_into().unwrap())
    }

    fn record(&self, id: u32) -> Option<usize> {
        id.checked_sub(1)
            .and_then(|i| self.types.get(i as usize).copied())
    }

    fn kind(&self, id: u32) -> Option<u32> {
        self.record(id).map(|at| (self.u32_at(at + 4) >> 24) & 0x1f)
    }

    fn name(&self, name_off: u32) -> &[u8] {
        let start = self.strings.start + name_off as usize;
        if start >= self.strings.end {
            return b"";
        }
        let rest = &self.data[start..self.strings.end];
        &rest[..rest.iter().position(|&b| b == 0).unwrap_or(rest.len())]
    }

    /// The id of the struct called `name`.
    pub fn struct_id(&self, name: &str) -> Option<u32> {
        (1..=self.types.len() as u32).find(|&id| {
            let at = self.types[id as usize - 1];
            self.kind(id) == Some(KIND_STRUCT)
                && self.u32_at(at + 4) & 0xffff != 0
                && self.name(self.u32_at(at)) == name.as_bytes()
        })
    }

    /// Follows typedefs and qualifiers to the type they name.
    pub fn resolve(&self, mut id: u32) -> u32 {
        for _ in 0..32 {
            match self.kind(id) {
                Some(KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG) => {
                    id = self.u32_at(self.record(id).unwrap() + 8)
                }
                _ => break,
            }
        }
        id
    }

    /// Whether `id` (resolved) is a pointer.
    pub fn is_pointer(&self, id: u32) -> bool {
        self.kind(self.resolve(id)) == Some(KIND_PTR)
    }

    /// The size in bytes of a struct, union or int `id` (resolved); None for others.
    pub fn size(&self, id: u32) -> Option<u32> {
        let id = self.resolve(id);
        match self.kind(id)? {
            KIND_STRUCT | KIND_UNION | KIND_INT | KIND_ENUM | KIND_ENUM64 => {
                Some(self.u32_at(self.record(id)? + 8))
            }
            KIND_PTR => Some(8),
            _ => None,
        }
    }

    /// The member `name` of struct or union `id`, looked for through anonymous
    /// members. Bitfields are not members a program can read, so they are not found.
    pub fn member(&self, id: u32, name: &str) -> Option<Member> {
        self.member_in(self.resolve(id), name.as_bytes(), 0, 0)
    }

    fn member_in(&self, id: u32, name: &[u8], base_bits: u32, depth: u32) -> Option<Member> {
        if depth > 8 || !matches!(self.kind(id), Some(KIND_STRUCT | KIND_UNION)) {
            return None;
        }
        let at = self.record(id)?;
        let info = self.u32_at(at + 4);
        let bitfields = info >> 31 != 0;
        for i in 0..(info & 0xffff) as usize {
            let m = at + 12 + 12 * i;
            let (name_off, ty, raw) = (self.u32_at(m), self.u32_at(m + 4), self.u32_at(m + 8));
            // With kind_flag set, the high 8 bits are the bitfield size.
            let (bits, bitfield_size) = if bitfields {
                (raw & 0xff_ffff, raw >> 24)
            } else {
                (raw, 0)
            };
            let member_name = self.name(name_off);
            if member_name.is_empty() {
                if let Some(found) =
                    self.member_in(self.resolve(ty), name, base_bits + bits, depth + 1)
                {
                    return Some(found);
                }
            } else if member_name == name && bitfield_size == 0 && bits % 8 == 0 {
                return Some(Member {
                    offset: (base_bits + bits) / 8,
                    type_id: self.resolve(ty),
                });
            }
        }
        None
    }
}

/// Where the exit program finds whether a thread group is dead, on kernels whose
/// `sched_process_exit` record has no `group_dead`: `current->signal->live`, the
/// count of the group's live threads, which `do_exit` decrements before the
/// tracepoint fires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LiveThreads {
    /// `task_struct.signal` (a pointer to `signal_struct`).
    pub task_signal: u32,
    /// `signal_struct.live` (an `atomic_t`, 4 bytes).
    pub signal_live: u32,
}

impl LiveThreads {
    pub fn find(btf: &Btf) -> Result<LiveThreads> {
        let task = btf
            .struct_id("task_struct")
            .context("the kernel's BTF has no struct task_struct")?;
        let signal = btf
            .member(task, "signal")
            .context("the kernel's BTF has no task_struct.signal")?;
        ensure!(
            btf.is_pointer(signal.type_id),
            "task_struct.signal is not a pointer in the kernel's BTF"
        );
        let signal_struct = btf
            .struct_id("signal_struct")
            .context("the kernel's BTF has no struct signal_struct")?;
        let live = btf
            .member(signal_struct, "live")
            .context("the kernel's BTF has no signal_struct.live")?;
        ensure!(
            btf.size(live.type_id) == Some(4),
            "signal_struct.live is not a 4-byte atomic_t in the kernel's BTF"
        );
        // 0 is what the program takes for "use the record's group_dead".
        ensure!(signal.offset != 0, "task_struct.signal at offset 0");
        Ok(LiveThreads {
            task_signal: signal.offset,
            signal_live: live.offset,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A BTF blob built by hand: types as (kind, name, vlen/kind_flag info, size or
    /// type, extra words).
    struct Builder {
        types: Vec<u32>,
        strings: Vec<u8>,
        count: u32,
    }

    impl Builder {
        fn new() -> Self {
            Builder {
                types: Vec::new(),
                strings: vec![0],
                count: 0,
            }
        }
        fn string(&mut self, s: &str) -> u32 {
            if s.is_empty() {
                return 0;
            }
            let at = self.strings.len() as u32;
            self.strings.extend_from_slice(s.as_bytes());
            self.strings.push(0);
            at
        }
        /// Adds a type and returns its id.
        fn add(
            &mut self,
            kind: u32,
            name: &str,
            vlen: u32,
            flag: bool,
            size_or_type: u32,
            extra: &[u32],
        ) -> u32 {
            let name = self.string(name);
            self.types.push(name);
            self.types.push(vlen | kind << 24 | u32::from(flag) << 31);
            self.types.push(size_or_type);
            self.types.extend_from_slice(extra);
            self.count += 1;
            self.count
        }
        fn members(&mut self, list: &[(&str, u32, u32)]) -> Vec<u32> {
            list.iter()
                .flat_map(|&(n, ty, off)| [self.string(n), ty, off])
                .collect()
        }
        fn build(self) -> Vec<u8> {
            let types: Vec<u8> = self.types.iter().flat_map(|w| w.to_ne_bytes()).collect();
            let mut out = Vec::new();
            out.extend_from_slice(&MAGIC.to_ne_bytes());
            out.extend_from_slice(&[1, 0]);
            for w in [
                24,
                0,
                types.len() as u32,
                types.len() as u32,
                self.strings.len() as u32,
            ] {
                out.extend_from_slice(&w.to_ne_bytes());
            }
            out.extend_from_slice(&types);
            out.extend_from_slice(&self.strings);
            out
        }
    }

    #[test]
    fn finds_members_through_anonymous_structs_and_typedefs() {
        let mut b = Builder::new();
        let int = b.add(KIND_INT, "int", 0, false, 4, &[32]);
        let m = b.members(&[("counter", int, 0)]);
        let anon_atomic = b.add(KIND_STRUCT, "", 1, false, 4, &m);
        let atomic_t = b.add(KIND_TYPEDEF, "atomic_t", 0, false, anon_atomic, &[]);
        let m = b.members(&[("sigcnt", atomic_t, 0), ("live", atomic_t, 32)]);
        let signal_struct = b.add(KIND_STRUCT, "signal_struct", 2, false, 8, &m);
        let ptr = b.add(KIND_PTR, "", 0, false, signal_struct, &[]);
        // Bitfields (kind_flag): offset in the low 24 bits, size in the high 8.
        let m = b.members(&[("flags", int, 3 << 24), ("signal", ptr, 64 * 8)]);
        let inner = b.add(KIND_STRUCT, "", 2, true, 80, &m);
        let m = b.members(&[("state", int, 0), ("", inner, 128 * 8)]);
        b.add(KIND_STRUCT, "task_struct", 2, false, 4096, &m);
        let btf = Btf::parse(b.build()).unwrap();
        assert_eq!(
            LiveThreads::find(&btf).unwrap(),
            LiveThreads {
                task_signal: 192,
                signal_live: 4
            }
        );
        let task = btf.struct_id("task_struct").unwrap();
        // A bitfield is not readable at a byte offset.
        assert_eq!(btf.member(task, "flags"), None);
        assert_eq!(btf.member(task, "nothing"), None);
    }

    #[test]
    fn a_kernel_without_the_fields_is_named_in_the_error() {
        let mut b = Builder::new();
        let int = b.add(KIND_INT, "int", 0, false, 4, &[32]);
        let m = b.members(&[("state", int, 0)]);
        b.add(KIND_STRUCT, "task_struct", 1, false, 4, &m);
        let err = LiveThreads::find(&Btf::parse(b.build()).unwrap()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "the kernel's BTF has no task_struct.signal"
        );
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(Btf::parse(vec![0; 10]).is_err());
        assert!(Btf::parse(vec![0; 64]).is_err());
        let mut b = Builder::new();
        b.add(KIND_INT, "int", 0, false, 4, &[32]);
        let mut data = b.build();
        // Type section longer than the blob.
        data[12] = 0xff;
        assert!(Btf::parse(data).is_err());
    }

    #[test]
    fn reads_this_kernels_btf_when_it_has_one() {
        if !std::path::Path::new(crate::preflight::BTF).exists() {
            return;
        }
        let btf = Btf::from_sys_fs().unwrap();
        let live = LiveThreads::find(&btf).unwrap();
        assert!(live.task_signal > 0 && live.signal_live > 0, "{live:?}");
    }
}
