//! Minimal reader for the kernel's BTF type information (`/sys/kernel/btf/vmlinux`).
//!
//! The splice eBPF programs read a few `struct sock` fields directly, and their
//! offsets differ between kernel builds, so userspace looks them up here and hands
//! them to the programs as load-time constants. Only that is implemented: walk the
//! type section and find a member's byte offset, descending into anonymous
//! struct/union members. Native-endian blobs only; malformed input is an error.

use std::io;

const SYS_BTF: &str = "/sys/kernel/btf/vmlinux";
const MAGIC: u16 = 0xeb9f;
const KIND_INT: u32 = 1;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
/// Limit on typedef/const chains and on nested anonymous members.
const MAX_DEPTH: usize = 32;
/// Limit on members visited by one lookup (guards against crafted type graphs).
const MAX_VISITS: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error("reading BTF from {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("malformed BTF: {0}")]
    Malformed(&'static str),
    #[error("BTF has no struct {0} with members")]
    NoStruct(String),
    #[error("struct {strukt} has no member {member}")]
    NoMember { strukt: String, member: String },
    #[error("member {member} of struct {strukt} is a bitfield or not byte aligned")]
    Bitfield { strukt: String, member: String },
}

use BtfError::Malformed;

/// A parsed BTF blob.
pub struct Btf {
    data: Vec<u8>,
    /// Byte range of the string section.
    strs: (usize, usize),
    /// Position of each type record; index `i` is type id `i + 1`.
    types: Vec<usize>,
}

struct Ty {
    pos: usize,
    name_off: u32,
    kind: u32,
    vlen: usize,
    kind_flag: bool,
    size_or_type: u32,
}

fn read_u32(data: &[u8], pos: usize) -> Result<u32, BtfError> {
    let b = pos.checked_add(4).and_then(|end| data.get(pos..end));
    let b = b.ok_or(Malformed("read past end of data"))?;
    Ok(u32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
}

/// `(start, end)` of the section whose offset/length header fields are at `at`.
fn section(data: &[u8], hdr_len: usize, at: usize) -> Result<(usize, usize), BtfError> {
    let start = hdr_len.checked_add(read_u32(data, at)? as usize);
    let end = start.and_then(|s| s.checked_add(read_u32(data, at + 4).ok()? as usize));
    match (start, end) {
        (Some(start), Some(end)) if end <= data.len() => Ok((start, end)),
        _ => Err(Malformed("section out of bounds")),
    }
}

impl Btf {
    pub fn parse(data: Vec<u8>) -> Result<Self, BtfError> {
        if data.get(..2).map(|m| u16::from_ne_bytes([m[0], m[1]])) != Some(MAGIC) {
            return Err(Malformed("bad magic (not BTF, or foreign endianness)"));
        }
        let hdr_len = read_u32(&data, 4)? as usize;
        if hdr_len < 24 {
            return Err(Malformed("header too short"));
        }
        let (mut pos, types_end) = section(&data, hdr_len, 8)?;
        let strs = section(&data, hdr_len, 16)?;
        let mut types = Vec::new();
        while pos < types_end {
            if types_end - pos < 12 {
                return Err(Malformed("truncated type record"));
            }
            let info = read_u32(&data, pos + 4)?;
            let vlen = (info & 0xffff) as usize;
            let extra = match (info >> 24) & 0x1f {
                1 | 14 | 17 => 4,
                2 | 7..=12 | 16 | 18 => 0,
                3 => 12,
                4 | 5 | 15 | 19 => vlen * 12,
                6 | 13 => vlen * 8,
                _ => return Err(Malformed("unknown type kind")),
            };
            types.push(pos);
            pos += 12 + extra;
            if pos > types_end {
                return Err(Malformed("truncated type record"));
            }
        }
        Ok(Self { data, strs, types })
    }

    /// The raw blob (for another parser, e.g. aya's relocations).
    #[must_use]
    pub fn data(&self) -> &[u8] {
        &self.data
    }

    /// Reads and parses `/sys/kernel/btf/vmlinux`.
    pub fn from_sys_fs() -> Result<Self, BtfError> {
        let data = std::fs::read(SYS_BTF).map_err(|source| BtfError::Read {
            path: SYS_BTF.to_owned(),
            source,
        })?;
        Self::parse(data)
    }

    /// Byte offset of `member` in `struct <strukt>`; Err if the struct or member is missing or the member is a bitfield / not byte aligned.
    pub fn member_offset(&self, strukt: &str, member: &str) -> Result<u32, BtfError> {
        let mut found = None;
        for id in 1..=self.types.len() {
            let t = self.ty(id as u32)?;
            if t.kind == KIND_STRUCT && t.vlen > 0 && self.name(t.name_off)? == strukt.as_bytes() {
                found = Some(t);
                break;
            }
        }
        let t = found.ok_or_else(|| BtfError::NoStruct(strukt.to_owned()))?;
        let mut visits = 0;
        match self.find(&t, member.as_bytes(), 0, 0, &mut visits)? {
            Some((bits, false)) => Ok(bits / 8),
            hit => {
                let (strukt, member) = (strukt.to_owned(), member.to_owned());
                Err(match hit {
                    None => BtfError::NoMember { strukt, member },
                    Some(_) => BtfError::Bitfield { strukt, member },
                })
            }
        }
    }

    /// Bit offset of `member` in `t` (plus `base`) and whether it is a bitfield or unaligned.
    fn find(
        &self,
        t: &Ty,
        member: &[u8],
        base: u32,
        depth: usize,
        visits: &mut usize,
    ) -> Result<Option<(u32, bool)>, BtfError> {
        if depth > MAX_DEPTH {
            return Err(Malformed("anonymous members nested too deep"));
        }
        for i in 0..t.vlen {
            *visits += 1;
            if *visits > MAX_VISITS {
                return Err(Malformed("too many anonymous members"));
            }
            let m = t.pos + 12 + i * 12;
            let (name_off, mtype, off) = (
                read_u32(&self.data, m)?,
                read_u32(&self.data, m + 4)?,
                read_u32(&self.data, m + 8)?,
            );
            let (bits, size) = if t.kind_flag {
                (off & 0xff_ffff, off >> 24)
            } else {
                (off, 0)
            };
            let at = base
                .checked_add(bits)
                .ok_or(Malformed("member offset overflows"))?;
            if name_off == 0 {
                if let Some(inner) = self.resolve(mtype)?
                    && matches!(inner.kind, KIND_STRUCT | KIND_UNION)
                    && let Some(hit) = self.find(&inner, member, at, depth + 1, visits)?
                {
                    return Ok(Some(hit));
                }
            } else if self.name(name_off)? == member {
                let bitfield =
                    size != 0 || at % 8 != 0 || (!t.kind_flag && self.int_bitfield(mtype)?);
                return Ok(Some((at, bitfield)));
            }
        }
        Ok(None)
    }

    /// Without kind_flag, a bitfield member's type is an INT whose bit size is not its byte size.
    fn int_bitfield(&self, id: u32) -> Result<bool, BtfError> {
        match self.resolve(id)? {
            Some(t) if t.kind == KIND_INT => {
                let enc = read_u32(&self.data, t.pos + 12)?;
                Ok((enc >> 16) & 0xff != 0
                    || u64::from(enc & 0xff) != u64::from(t.size_or_type) * 8)
            }
            _ => Ok(false),
        }
    }

    /// Follows typedef/volatile/const/restrict/type_tag; `None` for void.
    fn resolve(&self, mut id: u32) -> Result<Option<Ty>, BtfError> {
        for _ in 0..MAX_DEPTH {
            if id == 0 {
                return Ok(None);
            }
            let t = self.ty(id)?;
            match t.kind {
                8..=11 | 18 => id = t.size_or_type,
                _ => return Ok(Some(t)),
            }
        }
        Err(Malformed("type modifier chain too long"))
    }

    fn ty(&self, id: u32) -> Result<Ty, BtfError> {
        let pos = id.checked_sub(1).and_then(|i| self.types.get(i as usize));
        let pos = *pos.ok_or(Malformed("type id out of range"))?;
        let info = read_u32(&self.data, pos + 4)?;
        Ok(Ty {
            pos,
            name_off: read_u32(&self.data, pos)?,
            kind: (info >> 24) & 0x1f,
            vlen: (info & 0xffff) as usize,
            kind_flag: info >> 31 != 0,
            size_or_type: read_u32(&self.data, pos + 8)?,
        })
    }

    fn name(&self, off: u32) -> Result<&[u8], BtfError> {
        let (start, end) = self.strs;
        let s = start
            .checked_add(off as usize)
            .and_then(|s| self.data.get(s..end));
        let s = s.ok_or(Malformed("string offset out of range"))?;
        let nul = s
            .iter()
            .position(|&b| b == 0)
            .ok_or(Malformed("unterminated string"))?;
        Ok(&s[..nul])
    }
}

/// Offsets in `struct sock` that the splice programs read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SockOffsets {
    pub wmem_queued: u32,
    pub sndbuf: u32,
    /// `__sk_common.skc_cookie` (the socket cookie, once something has asked for it).
    pub cookie: u32,
    /// `cb` in `struct sk_buff` (TCP's per-segment control block: `seq` first).
    pub skb_cb: u32,
}

impl SockOffsets {
    pub fn from_btf(b: &Btf) -> Result<Self, BtfError> {
        Ok(Self {
            wmem_queued: b.member_offset("sock", "sk_wmem_queued")?,
            sndbuf: b.member_offset("sock", "sk_sndbuf")?,
            cookie: b.member_offset("sock", "__sk_common")?
                + b.member_offset("sock_common", "skc_cookie")?,
            skb_cb: b.member_offset("sk_buff", "cb")?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(kind: u32, vlen: u32, kind_flag: bool) -> u32 {
        u32::from(kind_flag) << 31 | kind << 24 | vlen
    }

    /// Header + type words + strings, native endian.
    fn blob(types: &[u32], strs: &[u8]) -> Vec<u8> {
        let type_len = (types.len() * 4) as u32;
        let mut b = MAGIC.to_ne_bytes().to_vec();
        b.extend([1, 0]);
        for w in [24, 0, type_len, type_len, strs.len() as u32]
            .into_iter()
            .chain(types.iter().copied())
        {
            b.extend(w.to_ne_bytes());
        }
        b.extend(strs);
        b
    }

    /// struct S { int plain; volatile union { int other; const struct { int x; int target; int old:3 (INT-encoded) }; }; int bits:3; }
    fn sample() -> Vec<u8> {
        let strs = b"\0S\0plain\0target\0bits\0int\0other\0x\0old\0";
        let (s, plain, target, bits, int, other, x, old) = (1, 3, 9, 16, 21, 25, 31, 33);
        #[rustfmt::skip]
        let types = [
            int, info(1, 0, false), 4, 32,                    // 1: int
            s, info(4, 0, false), 0,                          // 2: empty struct S (skipped)
            0, info(4, 3, false), 12,                         // 3: anonymous struct
                x, 1, 0,  target, 1, 32,  old, 8, 64,
            0, info(5, 2, false), 12,                         // 4: anonymous union
                other, 1, 0,  0, 5, 0,
            0, info(10, 0, false), 3,                         // 5: const -> 3
            s, info(4, 3, true), 20,                          // 6: struct S
                plain, 1, 0,  0, 7, 32,  bits, 1, 3 << 24 | 128,
            0, info(9, 0, false), 4,                          // 7: volatile -> 4
            int, info(1, 0, false), 4, 3,                     // 8: int, 3 bits
        ];
        blob(&types, strs)
    }

    #[test]
    fn offsets_and_errors() {
        let b = Btf::parse(sample()).unwrap();
        assert_eq!(b.member_offset("S", "plain").unwrap(), 0);
        assert_eq!(b.member_offset("S", "x").unwrap(), 4);
        assert_eq!(b.member_offset("S", "target").unwrap(), 8);
        assert!(matches!(
            b.member_offset("S", "bits"),
            Err(BtfError::Bitfield { .. })
        ));
        assert!(matches!(
            b.member_offset("S", "old"),
            Err(BtfError::Bitfield { .. })
        ));
        assert!(matches!(
            b.member_offset("S", "nope"),
            Err(BtfError::NoMember { .. })
        ));
        assert!(matches!(
            b.member_offset("T", "plain"),
            Err(BtfError::NoStruct(_))
        ));
    }

    #[test]
    fn malformed_input_is_an_error() {
        let good = sample();
        for n in 0..good.len() {
            assert!(Btf::parse(good[..n].to_vec()).is_err(), "prefix {n}");
        }
        let mut bad = good.clone();
        bad[0] ^= 0xff;
        assert!(matches!(Btf::parse(bad), Err(Malformed(_))));
        for i in 0..good.len() {
            for v in [0, 0xff, good[i] ^ 0x80] {
                let mut b = good.clone();
                b[i] = v;
                if let Ok(btf) = Btf::parse(b) {
                    let _ = btf.member_offset("S", "target");
                    let _ = btf.member_offset("S", "zzz");
                }
            }
        }
    }

    #[test]
    fn running_kernel() {
        if !std::path::Path::new(SYS_BTF).exists() {
            return;
        }
        let o = SockOffsets::from_btf(&Btf::from_sys_fs().unwrap()).unwrap();
        assert!(
            o.wmem_queued != 0
                && o.sndbuf != 0
                && o.wmem_queued != o.sndbuf
                && o.cookie != 0
                && o.skb_cb != 0,
            "{o:?}"
        );
    }
}
