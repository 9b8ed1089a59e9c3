//! Types shared by the kernel programs (`broker-ebpf`) and the daemon (`broker-userspace`).
//!
//! Every type here is `#[repr(C)]`, has no hidden padding (explicit `_pad` fields) and is
//! `Copy`, so the same bytes mean the same thing on both sides of a BPF map.
//!
//! Addresses are always stored as 16-byte IPv6 addresses in network byte order; an IPv4
//! address is stored in its IPv4-mapped form `::ffff:a.b.c.d`. Ports are host byte order.
#![no_std]

/// Name of the map of exact `ip:port` targets ([`AddrKey`] -> [`TargetValue`]).
pub const MAP_TARGETS: &str = "TARGETS";
/// Name of the LPM trie of `cidr:port` targets ([`CidrKey`] -> [`TargetValue`]).
pub const MAP_TARGET_CIDRS: &str = "TARGET_CIDRS";
/// Name of the array of the ports some target names ([`PortBits`], [`PORT_WORDS`]
/// entries): connect4/6 look a destination up only if its port is there.
pub const MAP_TARGET_PORTS: &str = "TARGET_PORTS";
/// Name of the one-entry array holding [`BrokerSettings`].
pub const MAP_SETTINGS: &str = "SETTINGS";
/// Name of the LRU map socket cookie -> [`ConnRecord`], written by connect4/6.
pub const MAP_BY_COOKIE: &str = "BY_COOKIE";
/// Name of the LRU map [`ConnKey`] (the broker's network namespace and the app socket's
/// own 4-tuple) -> [`ConnRecord`], written by sock_ops when a redirected socket is
/// established to the broker's listener, deleted when that socket closes.
pub const MAP_BY_CONN: &str = "BY_CONN";
/// Name of the sockhash of applications' sockets, keyed by socket cookie, filled by
/// sock_ops for connections to services that may be spliced; the `sk_msg` program is
/// attached to it.
pub const MAP_SPLICE_APP: &str = "SPLICE_APP";
/// Name of the sockhash of the broker's upstream sockets, keyed by socket cookie, filled
/// by the daemon when it splices a session; the `sk_skb` stream verdict is attached to it.
pub const MAP_SPLICE_UP: &str = "SPLICE_UP";
/// Name of the hash map socket cookie -> [`SpliceValue`]: where a spliced socket's data
/// goes, and how many bytes went. Cookies are unique for the kernel's lifetime, so an
/// entry can only ever name the socket it was written for.
pub const MAP_SPLICE: &str = "SPLICE";
/// Name of the hash map app socket cookie -> bytes the app has read of what the kernel
/// redirected to it (counted at the `sock_recv_length` tracepoint).
pub const MAP_SPLICE_READ: &str = "SPLICE_READ";
/// Name of the ring buffer of app socket cookies whose server -> app direction has just
/// fallen back to the daemon (see [`SPLICE_FALLBACK`]).
pub const MAP_SPLICE_EVENTS: &str = "SPLICE_EVENTS";
/// Name of the per-CPU hash map service id -> connects redirected to the broker (a
/// `u64` per CPU, summed by the daemon for `broker_kernel_redirects_total`).
pub const MAP_REDIRECTS: &str = "REDIRECTS";
/// Names of the load-time constants (`.rodata`) holding byte offsets in the kernel's
/// `struct sock`, found in its BTF by the daemon.
pub const GLOBAL_SK_WMEM_QUEUED: &str = "SK_WMEM_QUEUED_OFF";
/// See [`GLOBAL_SK_WMEM_QUEUED`].
pub const GLOBAL_SK_SNDBUF: &str = "SK_SNDBUF_OFF";
/// See [`GLOBAL_SK_WMEM_QUEUED`].
pub const GLOBAL_SK_COOKIE: &str = "SK_COOKIE_OFF";
/// Byte offset of `cb` in the kernel's `struct sk_buff` (where TCP keeps a segment's
/// sequence numbers, `struct tcp_skb_cb`), for the stream verdict.
pub const GLOBAL_SKB_CB: &str = "SKB_CB_OFF";
/// Byte offset of `sk_socket` in the kernel's `struct sock` (0 when the kernel has no
/// BTF): with [`GLOBAL_SOCKET_FILE`], connect4/6 recognise sockets the kernel created
/// for itself (MPTCP subflows, SMC's TCP socket), which have no file.
pub const GLOBAL_SK_SOCKET: &str = "SK_SOCKET_OFF";
/// Byte offset of `file` in the kernel's `struct socket` (see [`GLOBAL_SK_SOCKET`]).
pub const GLOBAL_SOCKET_FILE: &str = "SOCKET_FILE_OFF";
/// Byte offset of `sk` in the kernel's `struct socket` (see [`GLOBAL_SK_SOCKET`]).
pub const GLOBAL_SOCKET_SK: &str = "SOCKET_SK_OFF";
/// Device and inode of the broker's pid namespace (`stat /proc/self/ns/pid`), set at
/// load time when the kernel lets cgroup programs call `bpf_get_ns_current_pid_tgid`
/// (6.10): connect4/6 then compare [`BrokerSettings::bypass_tgid`] with the caller's
/// tgid *in that namespace*. 0: compared with the tgid in the initial pid namespace.
pub const GLOBAL_PIDNS_DEV: &str = "PIDNS_DEV";
/// See [`GLOBAL_PIDNS_DEV`].
pub const GLOBAL_PIDNS_INO: &str = "PIDNS_INO";

/// Capacity of the exact target map.
pub const MAX_TARGETS: u32 = 16_384;
/// Capacity of the CIDR trie.
pub const MAX_CIDRS: u32 = 4_096;
/// Entries of `TARGET_PORTS`: one [`PortBits`] per 64 ports.
pub const PORT_WORDS: u32 = 65_536 / 64;
/// Capacity of each per-connection LRU map. LRU eviction bounds them even if the daemon
/// never reads an entry (a client that connects and dies before the broker accepts).
pub const MAX_CONNS: u32 = 65_536;

/// Capacity of the per-service redirect counter map (`REDIRECTS`): services beyond it
/// are still redirected, their connects just not counted in the kernel.
pub const MAX_SERVICES: u32 = 4_096;

/// Default socket mark that the broker sets on its own upstream sockets. A socket whose
/// mark has all of its bits set is never redirected.
pub const DEFAULT_BYPASS_MARK: u32 = 0x0000_0539;

/// `SETTINGS.flags`: redirection is enabled. Cleared, every connect goes direct.
pub const SETTINGS_ENABLED: u32 = 1;
/// `SETTINGS.flags`: emit aya-log debug lines from the kernel programs.
pub const SETTINGS_DEBUG: u32 = 2;
/// `SETTINGS.flags`: the broker listens on `[::1]:P`. Without it native IPv6
/// destinations are not redirected (anyone could bind the free port and receive them).
pub const SETTINGS_V6: u32 = 4;

/// [`TargetValue::flags`] / [`ConnRecord::flags`]: the service's sessions may be spliced
/// in the kernel after authentication (sock_ops puts the app's socket in `SPLICE_APP`).
pub const TARGET_SPLICE: u32 = 1;
/// [`ConnRecord::flags`]: sock_ops put the app's socket in `SPLICE_APP`.
pub const REC_IN_SPLICE_APP: u32 = 2;

/// [`SpliceValue::flags`]: deliver to the peer socket's receive queue (`BPF_F_INGRESS`)
/// instead of sending it out of the peer socket.
pub const SPLICE_INGRESS: u32 = 1;
/// [`SpliceValue::flags`]: this direction has left the kernel path for good and goes
/// through the daemon (set by the programs when the receiver falls behind by more than
/// [`SPLICE_READ_BUDGET`], or the upstream's send buffer is half full).
pub const SPLICE_FALLBACK: u32 = 2;
/// [`SpliceValue::flags`] of an upstream entry: [`SpliceValue::next_seq`] is known.
pub const SPLICE_SEQ: u32 = 4;
/// [`SpliceValue::flags`] of an app entry: the app speaks MySQL's client protocol; the
/// sk_msg program frames its sends into packets and hands the upload to the daemon at
/// the first `COM_CHANGE_USER` (which must not reach the server as the app wrote it).
pub const SPLICE_MYSQL: u32 = 8;
/// MySQL's `COM_CHANGE_USER` command byte.
pub const MYSQL_COM_CHANGE_USER: u8 = 0x11;

/// Bytes the kernel may have redirected to an app that it has not read yet. Past this,
/// the server -> app direction falls back to the daemon's relay, which reads only what
/// the app can take, so a stalled reader stalls the server (TCP flow control) with a
/// known bound on what waits in kernel memory, whatever the kernel's own sockmap
/// queues do. Small results (the latency-bound traffic splicing is for) never come
/// near it; a bulk result to a slow reader is relayed, which moves bulk data as fast.
pub const SPLICE_READ_BUDGET: u64 = 4 << 20;

/// `AF_INET`, as recorded in [`ConnRecord::family`].
pub const FAMILY_INET: u16 = 2;
/// `AF_INET6`, as recorded in [`ConnRecord::family`].
pub const FAMILY_INET6: u16 = 10;

/// An address and port: a target's destination.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AddrKey {
    /// IPv6 address, network byte order (IPv4 as `::ffff:a.b.c.d`).
    pub addr: [u8; 16],
    /// Port, host byte order.
    pub port: u16,
    pub _pad: u16,
}

/// Key data of the CIDR trie: the port comes first so that it is always matched in full
/// (prefix length = 16 + the address prefix length in IPv6 terms).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CidrKey {
    /// Port, network byte order (the trie compares bytes most significant first).
    pub port_be: [u8; 2],
    /// IPv6 address, network byte order (IPv4 as `::ffff:a.b.c.d`).
    pub addr: [u8; 16],
}

/// What a target maps to.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TargetValue {
    /// Stable id of the service (derived from its name, not its position).
    pub service_id: u32,
    /// `TARGET_*` bits.
    pub flags: u32,
    /// Generation of the daemon's configuration snapshot that wrote the target; copied
    /// into the record, so a record outliving a reload is recognised as stale.
    pub generation: u32,
    pub _pad: u32,
}

/// The ports that have a target, 64 per entry of `TARGET_PORTS` (entry `port / 64`, bit
/// `port % 64`, see [`port_slot`]): one bit for exact targets (`TARGETS`), one for CIDR
/// targets (`TARGET_CIDRS`). A connect to a port without its bit skips that lookup.
/// The daemon sets a bit before it inserts the first target on the port and clears it
/// only after it has removed the last one, so a connect never misses a target.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PortBits {
    /// Ports with an exact target.
    pub exact: u64,
    /// Ports with a CIDR target.
    pub cidr: u64,
}

/// Where `port` is in `TARGET_PORTS`: the entry, and the bit within [`PortBits`]' words.
#[must_use]
#[inline(always)]
pub const fn port_slot(port: u16) -> (u32, u64) {
    ((port >> 6) as u32, 1u64 << (port & 63))
}

/// Global settings, written by the daemon before it attaches the programs.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct BrokerSettings {
    /// `SETTINGS_*` bits.
    pub flags: u32,
    /// Mark that exempts a socket from redirection (the broker's own sockets): every
    /// one of its bits must be set in the socket's mark.
    pub bypass_mark: u32,
    /// Thread-group id of the broker, in its own pid namespace when the programs were
    /// loaded with [`GLOBAL_PIDNS_INO`], else in the initial one; its connects are never
    /// redirected, whatever their mark. 0 = none.
    pub bypass_tgid: u32,
    /// Port of the broker's transparent listener on 127.0.0.1 and ::1, host byte order.
    pub listen_port: u16,
    pub _pad: u16,
    /// Cookie of the broker's network namespace (`SO_NETNS_COOKIE`). Only sockets in
    /// this namespace are redirected: the loopback listener they are sent to is there.
    pub netns_cookie: u64,
}

/// Everything the broker learns about one intercepted connection.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnRecord {
    /// cgroup v2 id of the calling process.
    pub cgroup_id: u64,
    /// `bpf_ktime_get_ns()` at connect time.
    pub connect_ns: u64,
    /// Cookie of the app's socket (`SO_COOKIE`).
    pub cookie: u64,
    /// Cookie of the app socket's network namespace (`SO_NETNS_COOKIE`).
    pub netns_cookie: u64,
    /// Original destination address (network byte order, IPv4-mapped for IPv4).
    pub orig_addr: [u8; 16],
    /// `comm` of the calling thread, NUL padded.
    pub comm: [u8; 16],
    /// Original destination port, host byte order.
    pub orig_port: u16,
    /// Address family of the socket that connected (`FAMILY_INET` or `FAMILY_INET6`).
    pub family: u16,
    /// Service index from the matching target.
    pub service_id: u32,
    /// Thread-group id of the caller (initial pid namespace).
    pub pid: u32,
    pub uid: u32,
    pub gid: u32,
    /// `TARGET_SPLICE` copied from the target, plus `REC_IN_SPLICE_APP`.
    pub flags: u32,
    /// The target's configuration generation.
    pub generation: u32,
    pub _pad: u32,
}

/// One TCP socket, as seen from itself: its own address and its peer's. Both the kernel
/// programs (from their context) and the daemon (from `getsockname`/`getpeername`) can
/// build it, which is what lets them name the same socket.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct SockKey {
    /// Local address, network byte order (IPv4 as `::ffff:a.b.c.d`).
    pub local: [u8; 16],
    /// Remote address, network byte order (IPv4 as `::ffff:a.b.c.d`).
    pub remote: [u8; 16],
    /// Local port, host byte order.
    pub local_port: u16,
    /// Remote port, host byte order.
    pub remote_port: u16,
}

/// The key of a redirect record: the network namespace the app socket lives in and its
/// own 4-tuple. Within one namespace a connected 4-tuple names exactly one live socket,
/// and the record is deleted when that socket closes; another namespace has another
/// cookie, so it can never reproduce the key.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct ConnKey {
    /// Cookie of the app socket's network namespace.
    pub netns_cookie: u64,
    /// The app socket as it sees itself.
    pub sock: SockKey,
    pub _pad: u32,
}

/// Where a spliced socket's data goes.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SpliceValue {
    /// Cookie of the socket that receives this socket's data (its key in `SPLICE_UP` for
    /// an app socket's sends, in `SPLICE_APP` for an upstream socket's received data).
    pub peer: u64,
    /// Bytes moved by the kernel programs (written by them only).
    pub bytes: u64,
    /// Upstream entries: cookie of the app socket whose reads (`SPLICE_READ`) bound the
    /// redirected bytes. 0 in app entries.
    pub app_cookie: u64,
    /// Upstream entries: the kernel address of this socket (`struct sock *`), recorded
    /// by the stream verdict from its first packet, so that the app side's sk_msg
    /// program can read how full its send buffer is. 0 until then, and in app entries.
    pub sk: u64,
    /// App entries: bytes the app may send through the kernel while its upstream's
    /// address is still unknown (half the upstream's send buffer when the splice began,
    /// written by the daemon); past it, the upload falls back. 0 in upstream entries.
    pub blind_budget: u64,
    /// `SPLICE_*` bits.
    pub flags: u32,
    /// Upstream entries: the TCP sequence number just past the last byte the stream
    /// verdict handed on (valid with [`SPLICE_SEQ`]), so that the bytes of a
    /// retransmitted segment the socket already had are not handed on twice. 0 in app
    /// entries.
    pub next_seq: u32,
    /// App entries with [`SPLICE_MYSQL`]: bytes of the current MySQL packet the app has
    /// still to send (0: its next send starts a packet). Written by the sk_msg program;
    /// read by the daemon when the upload falls back mid-packet.
    pub msg_left: u32,
    /// Unused; keeps the size a multiple of 8 with every byte named.
    pub _pad: u32,
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are repr(C), Copy, contain only integers and byte arrays,
    // and have no implicit padding (checked by the size assertions below).
    unsafe impl aya::Pod for super::AddrKey {}
    unsafe impl aya::Pod for super::CidrKey {}
    unsafe impl aya::Pod for super::TargetValue {}
    unsafe impl aya::Pod for super::PortBits {}
    unsafe impl aya::Pod for super::BrokerSettings {}
    unsafe impl aya::Pod for super::ConnRecord {}
    unsafe impl aya::Pod for super::SockKey {}
    unsafe impl aya::Pod for super::ConnKey {}
    unsafe impl aya::Pod for super::SpliceValue {}
}

// No hidden padding: every byte is a named field.
const _: () = assert!(core::mem::size_of::<AddrKey>() == 20);
const _: () = assert!(core::mem::size_of::<CidrKey>() == 18);
const _: () = assert!(core::mem::size_of::<TargetValue>() == 16);
const _: () = assert!(core::mem::size_of::<PortBits>() == 16);
const _: () = assert!(core::mem::size_of::<BrokerSettings>() == 24);
const _: () =
    assert!(core::mem::size_of::<ConnRecord>() == 8 + 8 + 8 + 8 + 16 + 16 + 2 + 2 + 4 * 7);
const _: () = assert!(core::mem::size_of::<SockKey>() == 16 + 16 + 2 + 2);
const _: () = assert!(core::mem::size_of::<ConnKey>() == 8 + 36 + 4);
const _: () = assert!(core::mem::size_of::<SpliceValue>() == 8 * 5 + 4 * 4);

/// The IPv4-mapped IPv6 form of an IPv4 address given as network-order bytes.
#[must_use]
pub const fn mapped_v4(v4: [u8; 4]) -> [u8; 16] {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, v4[0], v4[1], v4[2], v4[3],
    ]
}

/// Whether a 16-byte address is IPv4-mapped (`::ffff:0:0/96`).
#[must_use]
pub const fn is_mapped_v4(a: &[u8; 16]) -> bool {
    a[0] == 0
        && a[1] == 0
        && a[2] == 0
        && a[3] == 0
        && a[4] == 0
        && a[5] == 0
        && a[6] == 0
        && a[7] == 0
        && a[8] == 0
        && a[9] == 0
        && a[10] == 0xff
        && a[11] == 0xff
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_port_has_one_slot_within_the_map() {
        assert_eq!(port_slot(0), (0, 1));
        assert_eq!(port_slot(63), (0, 1 << 63));
        assert_eq!(port_slot(64), (1, 1));
        assert_eq!(port_slot(5432), (84, 1 << 56));
        assert_eq!(port_slot(u16::MAX), (PORT_WORDS - 1, 1 << 63));
    }
}
