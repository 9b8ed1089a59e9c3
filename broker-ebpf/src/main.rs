//! Kernel side of the credential broker.
//!
//! * `connect4` / `connect6` (cgroup/sock_addr): if the destination is a configured target
//!   (exact `ip:port` in `TARGETS`, or `cidr:port` in the `TARGET_CIDRS` LPM trie), record
//!   the original destination and the caller's identity under the socket cookie
//!   (`BY_COOKIE`) and rewrite the destination to the broker's loopback listener.
//! * `sock_ops` (ACTIVE_ESTABLISHED): if the socket really is connected to the broker's
//!   listener in the broker's network namespace, copy the record to `BY_CONN`, keyed by
//!   that namespace's cookie and the socket's own 4-tuple (which the broker sees, reversed,
//!   on the socket it accepts). The callback runs while the client processes the SYN-ACK,
//!   before it sends the final ACK, so the entry exists before the broker can accept:
//!   race-free. It also asks for state callbacks so both entries are deleted when the
//!   socket closes: a record lives exactly as long as the socket that made it.
//! * `getpeername4` / `getpeername6`: the application sees the original peer, never the
//!   broker (and only a socket that is connected to the broker's listener is rewritten).
//!
//! Only sockets in the broker's own network namespace are redirected: the listener they
//! are sent to is the broker's loopback, and another namespace has its own loopback
//! (which anyone with a user namespace can listen on). Sockets in other namespaces are
//! left alone, like any connection to an address that is not a target.
//! * Splice (after the daemon has authenticated a session): sock_ops also puts the app's
//!   socket in `SPLICE_APP` under its socket cookie (which connect4/6 wrote in the
//!   socket's own storage, `APP_SK`, read by the sk_msg program, which cannot ask for a
//!   cookie). Once the daemon writes the two `SPLICE` entries (keyed by socket cookies,
//!   which are never reused, so no other socket can ever match them), `broker_splice_msg` (sk_msg on `SPLICE_APP`) sends what the app
//!   writes straight out of the broker's upstream socket, and `broker_splice_skb`
//!   (sk_skb stream verdict on `SPLICE_UP`) puts what the upstream sends straight into
//!   the app socket's receive queue. The daemon's relay is then out of the data path.
//!
//! Sockets carrying the bypass mark (the broker's upstream sockets) and sockets of the
//! broker's own process (recognised in its own pid namespace, so also in a container)
//! are never redirected, so there are no loops even at the root cgroup.
// Host builds (`cargo clippy --workspace`) type-check the programs against std.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]
// The BPF target has no atomic read-modify-write in `core::sync::atomic`; the intrinsic
// lowers to the BPF atomic add.
#![cfg_attr(target_arch = "bpf", feature(core_intrinsics))]
#![cfg_attr(target_arch = "bpf", allow(internal_features))]

use aya_ebpf::{
    EbpfContext,
    bindings::{bpf_pidns_info, bpf_sock, bpf_sock_addr},
    btf_maps::SkStorage,
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_uid_gid,
        bpf_probe_read_kernel,
        generated::{
            bpf_get_current_cgroup_id, bpf_get_netns_cookie, bpf_get_ns_current_pid_tgid,
            bpf_get_socket_cookie, bpf_ktime_get_ns, bpf_msg_apply_bytes, bpf_msg_pull_data,
            bpf_setsockopt, bpf_sk_storage_get, bpf_skb_adjust_room,
        },
    },
    macros::{btf_map, cgroup_sock_addr, map, raw_tracepoint, sk_msg, sock_ops, stream_verdict},
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuHashMap, RingBuf, SockHash, lpm_trie::Key},
    programs::{
        RawTracePointContext, SkBuffContext, SkMsgContext, SockAddrContext, SockOpsContext,
    },
};
use aya_log_ebpf::debug;

/// `*p += v`, atomically (BPF `lock xadd`).
///
/// # Safety
/// `p` points to a valid, aligned u64 (a map value).
#[inline(always)]
unsafe fn add_atomic(p: *mut u64, v: u64) {
    #[cfg(target_arch = "bpf")]
    // SAFETY: per the function's contract.
    unsafe {
        core::intrinsics::atomic_xadd::<u64, u64, { core::intrinsics::AtomicOrdering::Relaxed }>(
            p, v,
        );
    }
    #[cfg(not(target_arch = "bpf"))]
    // SAFETY: per the function's contract (host builds only type-check).
    unsafe {
        *p = (*p).wrapping_add(v);
    }
}
use broker_common::{
    AddrKey, BrokerSettings, CidrKey, ConnKey, ConnRecord, FAMILY_INET, FAMILY_INET6, MAX_CIDRS,
    MAX_CONNS, MAX_SERVICES, MAX_TARGETS, MYSQL_COM_CHANGE_USER, PORT_WORDS, PortBits,
    REC_IN_SPLICE_APP, SETTINGS_DEBUG, SETTINGS_ENABLED, SETTINGS_V6, SPLICE_FALLBACK,
    SPLICE_INGRESS, SPLICE_MYSQL, SPLICE_READ_BUDGET, SPLICE_SEQ, SockKey, SpliceValue,
    TARGET_SPLICE, TargetValue, is_mapped_v4, mapped_v4, port_slot,
};

#[map]
static TARGETS: HashMap<AddrKey, TargetValue> = HashMap::with_max_entries(MAX_TARGETS, 0);

#[map]
static TARGET_CIDRS: LpmTrie<CidrKey, TargetValue> = LpmTrie::with_max_entries(MAX_CIDRS, 0);

/// The ports some target names (see [`PortBits`]): an array lookup, which the verifier
/// inlines, spares a connect to any other port both target lookups.
#[map]
static TARGET_PORTS: Array<PortBits> = Array::with_max_entries(PORT_WORDS, 0);

#[map]
static SETTINGS: Array<BrokerSettings> = Array::with_max_entries(1, 0);

#[map]
static BY_COOKIE: LruHashMap<u64, ConnRecord> = LruHashMap::with_max_entries(MAX_CONNS, 0);

#[map]
static BY_CONN: LruHashMap<ConnKey, ConnRecord> = LruHashMap::with_max_entries(MAX_CONNS, 0);

#[map]
static SPLICE_APP: SockHash<u64> = SockHash::with_max_entries(MAX_CONNS, 0);

#[map]
static SPLICE_UP: SockHash<u64> = SockHash::with_max_entries(MAX_CONNS, 0);

#[map]
static SPLICE: HashMap<u64, SpliceValue> = HashMap::with_max_entries(2 * MAX_CONNS, 0);

/// A socket whose connect connect4/6 recorded -> its own socket cookie (written before
/// the record, read by the sk_msg program, which has no cookie helper). Lives and dies
/// with the socket, and nothing deletes it: a socket without it has never had a record
/// (`BY_COOKIE`) nor a splice entry (`SPLICE`), so connect4/6 and sock_ops look no
/// further for one (one cheap lookup instead of a cookie and two hash lookups).
#[btf_map]
static APP_SK: SkStorage<u64> = SkStorage::new();

#[map]
static SPLICE_READ: HashMap<u64, u64> = HashMap::with_max_entries(MAX_CONNS, 0);

#[map]
static SPLICE_EVENTS: RingBuf = RingBuf::with_byte_size(16 * 1024, 0);

/// Service id -> connects redirected to the broker, per CPU (the daemon sums them at
/// scrape time: `broker_kernel_redirects_total`).
#[map]
static REDIRECTS: PerCpuHashMap<u32, u64> = PerCpuHashMap::with_max_entries(MAX_SERVICES, 0);

const IPPROTO_TCP: u32 = 6;
const SK_PASS: u32 = 1;
const SK_DROP: u32 = 0;
const SOL_SOCKET: i32 = 1;
const SO_RCVBUF: i32 = 8;
/// Receive buffer asked for on an app socket that may be spliced (the kernel doubles it).
const SPLICE_RCVBUF: i32 = 4 << 20;
const BPF_F_INGRESS: u64 = 1;
const MSG_PEEK: i32 = 2;
const LOOPBACK_V4: [u8; 4] = [127, 0, 0, 1];
/// `lo` is interface 1 in every network namespace.
const LOOPBACK_IFINDEX: u32 = 1;
const LOOPBACK_V6: [u8; 16] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];

const SOCK_OPS_ACTIVE_ESTABLISHED_CB: u32 = 4;
const SOCK_OPS_STATE_CB: u32 = 10;
const SOCK_OPS_STATE_CB_FLAG: i32 = 1 << 2;
const TCP_CLOSE: u32 = 7;
/// Map update flag: fail if the key exists (an entry is never silently overwritten).
const BPF_NOEXIST: u64 = 1;
const BPF_SK_STORAGE_GET_F_CREATE: u64 = 1;

#[inline(always)]
fn settings() -> Option<BrokerSettings> {
    SETTINGS.get(0).copied()
}

#[inline(always)]
fn addr_from_words(words: [u32; 4]) -> [u8; 16] {
    let mut out = [0u8; 16];
    let mut i = 0;
    while i < 4 {
        let b = words[i].to_ne_bytes();
        out[i * 4] = b[0];
        out[i * 4 + 1] = b[1];
        out[i * 4 + 2] = b[2];
        out[i * 4 + 3] = b[3];
        i += 1;
    }
    out
}

/// Whether two addresses are equal (two 8-byte compares: no `memcmp` in BPF).
#[inline(always)]
fn same_addr(a: &[u8; 16], b: &[u8; 16]) -> bool {
    let (a0, a1) = (
        u64::from_ne_bytes([a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7]]),
        u64::from_ne_bytes([a[8], a[9], a[10], a[11], a[12], a[13], a[14], a[15]]),
    );
    let (b0, b1) = (
        u64::from_ne_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]),
        u64::from_ne_bytes([b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]]),
    );
    a0 == b0 && a1 == b1
}

/// Whether `addr:port` is the broker's transparent listener (`127.0.0.1:P`, as itself or
/// IPv4-mapped, or `[::1]:P`): where connect4/6 send what they redirect.
#[inline(always)]
fn is_listener(addr: &[u8; 16], port: u16, s: &BrokerSettings) -> bool {
    port == s.listen_port
        && (same_addr(addr, &mapped_v4(LOOPBACK_V4)) || same_addr(addr, &LOOPBACK_V6))
}

#[inline(always)]
fn words_from_addr(addr: [u8; 16]) -> [u32; 4] {
    [
        u32::from_ne_bytes([addr[0], addr[1], addr[2], addr[3]]),
        u32::from_ne_bytes([addr[4], addr[5], addr[6], addr[7]]),
        u32::from_ne_bytes([addr[8], addr[9], addr[10], addr[11]]),
        u32::from_ne_bytes([addr[12], addr[13], addr[14], addr[15]]),
    ]
}

/// The target a destination maps to: exact `ip:port` first, then the longest CIDR. Each
/// lookup is made only if some target of its kind names the port (`TARGET_PORTS`):
/// nearly every connect goes to a port no target names, and stops at that array.
#[inline(always)]
fn lookup_target(addr: [u8; 16], port: u16) -> Option<TargetValue> {
    let (slot, bit) = port_slot(port);
    let ports = TARGET_PORTS.get(slot)?;
    let (exact, cidr) = (ports.exact & bit != 0, ports.cidr & bit != 0);
    if exact {
        let key = AddrKey {
            addr,
            port,
            _pad: 0,
        };
        // SAFETY: the value is copied out immediately; TARGETS is only written by the
        // daemon.
        if let Some(v) = unsafe { TARGETS.get(key) } {
            return Some(*v);
        }
    }
    if !cidr {
        return None;
    }
    let cidr = Key::new(
        16 + 128,
        CidrKey {
            port_be: port.to_be_bytes(),
            addr,
        },
    );
    TARGET_CIDRS.get(&cidr).copied()
}

/// Whether this connect must be left alone, by what its context fields say: sockets
/// bound to another device, the bypass mark, or not TCP. The checks that call helpers
/// ([`exempt_caller`]) wait until the destination is a target: most connects are not,
/// and pay only for these loads, a socket-storage lookup and an array lookup.
#[inline(always)]
fn exempt(ctx: &SockAddrContext, s: &BrokerSettings) -> bool {
    if s.flags & SETTINGS_ENABLED == 0 {
        return true;
    }
    // SAFETY: the kernel hands us a valid bpf_sock_addr; sk is always set for connect.
    let (protocol, mark, dev) = unsafe {
        let sa: *const bpf_sock_addr = ctx.sock_addr;
        let sk = (*sa).__bindgen_anon_1.sk;
        ((*sa).protocol, (*sk).mark, (*sk).bound_dev_if)
    };
    // The bypass mark counts only whole: a mark that shares a bit with it (another
    // program's routing or firewall mark) is not the broker's.
    if protocol != IPPROTO_TCP || (s.bypass_mark != 0 && mark & s.bypass_mark == s.bypass_mark) {
        return true;
    }
    // A socket bound to a device other than loopback (SO_BINDTODEVICE, IP_UNICAST_IF)
    // would send the redirected SYN out of that device, not to our listener.
    dev != 0 && dev != LOOPBACK_IFINDEX
}

/// Whether a connect to a target must be left alone all the same: sockets of another
/// network namespace (their loopback is not ours), the kernel's own sockets (MPTCP
/// subflows, SMC) and the broker's own process. Checked before anything is written for
/// the socket; until then such a socket has only been looked at: its storage cannot
/// exist (a socket never changes namespace, and [`mark_recorded`] runs only after this),
/// so [`forget_earlier_connect`] did nothing for it.
#[inline(always)]
fn exempt_caller(ctx: &SockAddrContext, s: &BrokerSettings) -> bool {
    // SAFETY: ctx.as_ptr() is the program's context.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    netns != s.netns_cookie || kernel_socket(ctx) || broker_process(s)
}

/// Device and inode of the broker's pid namespace, set by the daemon at load time when
/// the kernel lets this program type call `bpf_get_ns_current_pid_tgid` (6.10); 0: not
/// available, `bypass_tgid` is a tgid in the initial pid namespace (the daemon only
/// sets one then if it runs there).
#[unsafe(no_mangle)]
static PIDNS_DEV: u64 = 0;
/// See [`PIDNS_DEV`].
#[unsafe(no_mangle)]
static PIDNS_INO: u64 = 0;

/// Whether the connecting thread belongs to the broker's own process (its secret-store
/// clients and DNS, which do not carry the mark). The tgid is compared in the broker's
/// own pid namespace: in a container without the host's pid namespace, the daemon's
/// pid and the kernel's tgid differ, and a host process whose tgid happened to equal
/// the daemon's pid would otherwise be exempt. A thread of another pid namespace fails
/// the helper's namespace check and is never the broker.
#[inline(always)]
fn broker_process(s: &BrokerSettings) -> bool {
    if s.bypass_tgid == 0 {
        return false;
    }
    // SAFETY: reads of load-time constants.
    let (dev, ino) = unsafe {
        (
            core::ptr::read_volatile(&raw const PIDNS_DEV),
            core::ptr::read_volatile(&raw const PIDNS_INO),
        )
    };
    if ino != 0 {
        // The constant is known to the verifier (frozen .rodata): with 0 this call is
        // dead code, never checked, so the object still loads where the helper is not
        // allowed for cgroup programs (before 6.10).
        let mut ns = bpf_pidns_info { pid: 0, tgid: 0 };
        // SAFETY: `ns` is a writable bpf_pidns_info of the size passed.
        let r = unsafe {
            bpf_get_ns_current_pid_tgid(
                dev,
                ino,
                &raw mut ns,
                core::mem::size_of::<bpf_pidns_info>() as u32,
            )
        };
        return r == 0 && ns.tgid == s.bypass_tgid;
    }
    (bpf_get_current_pid_tgid() >> 32) as u32 == s.bypass_tgid
}

/// Whether a connect of this socket was ever recorded: it has storage in `APP_SK`.
/// Without it, no `BY_COOKIE` record nor `SPLICE` entry can exist for the socket: only
/// [`mark_recorded`] makes the storage, and it runs before every record is written;
/// the daemon splices only sockets whose record it took; nothing deletes the storage
/// while the socket lives. A lookup without `F_CREATE` on a socket that has no
/// storage at all (nearly every one) is one pointer read in the helper.
#[inline(always)]
fn was_recorded(sk: *mut bpf_sock) -> bool {
    // SAFETY: APP_SK is a socket storage map and sk the program's socket (checked by the
    // verifier); no value to create.
    !unsafe {
        bpf_sk_storage_get(
            (&raw const APP_SK).cast_mut().cast(),
            sk.cast(),
            core::ptr::null_mut(),
            0,
        )
    }
    .is_null()
}

/// The socket's cookie, in its own storage (`APP_SK`) before its connect is recorded
/// (see [`was_recorded`]): made with it, or holding it since an earlier recorded connect
/// of the socket (a cookie never changes), so nothing is written over. `None` if the
/// storage cannot be made (no memory): the connect is then not redirected, since its
/// next connect would not look for the record.
#[inline(always)]
fn mark_recorded(ctx: &SockAddrContext) -> Option<u64> {
    // SAFETY: ctx.as_ptr() is the program's context, valid for the cookie helper.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let mut init = cookie;
    // SAFETY: APP_SK is a socket storage map, sk the connecting socket, init outlives the
    // call.
    let stored = unsafe {
        bpf_sk_storage_get(
            (&raw const APP_SK).cast_mut().cast(),
            (*ctx.sock_addr).__bindgen_anon_1.sk.cast(),
            (&raw mut init).cast(),
            BPF_SK_STORAGE_GET_F_CREATE,
        )
    };
    (!stored.is_null()).then_some(cookie)
}

/// Drop whatever an earlier `connect()` of the same socket recorded (one that failed, or
/// was undone with `AF_UNSPEC`): a record only ever describes the socket's current
/// connect. Nearly every socket connects once and was never recorded: it stops at
/// [`was_recorded`].
#[inline(always)]
fn forget_earlier_connect(ctx: &SockAddrContext) {
    // SAFETY: the kernel hands us a valid bpf_sock_addr; sk is always set for connect.
    if !was_recorded(unsafe { (*ctx.sock_addr).__bindgen_anon_1.sk }) {
        return;
    }
    // SAFETY: ctx.as_ptr() is the program's context, valid for the cookie helper.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // A lookup first: a delete takes the bucket's lock even when there is nothing to
    // delete. Only this socket's own connect writes its `BY_COOKIE` entry (under the
    // socket lock), and the daemon writes its `SPLICE` entry only while it is connected,
    // so nothing appears in between.
    // SAFETY: only tested for presence.
    if unsafe { BY_COOKIE.get(cookie) }.is_some() {
        let _ = BY_COOKIE.remove(cookie);
    }
    // A socket reconnecting after `connect(AF_UNSPEC)` keeps its cookie: its earlier
    // session's splice entry must not carry the new connection's bytes.
    // SAFETY: as above.
    if unsafe { SPLICE.get(cookie) }.is_some() {
        let _ = SPLICE.remove(cookie);
    }
}

/// Byte offsets of `sk_socket` in the kernel's `struct sock` and of `file` and `sk` in
/// its `struct socket`; set by the daemon from the kernel's BTF (0: unknown, no check).
#[unsafe(no_mangle)]
static SK_SOCKET_OFF: u32 = 0;
/// See [`SK_SOCKET_OFF`].
#[unsafe(no_mangle)]
static SOCKET_FILE_OFF: u32 = 0;
/// See [`SK_SOCKET_OFF`].
#[unsafe(no_mangle)]
static SOCKET_SK_OFF: u32 = 0;

/// Whether the connecting TCP socket is one the kernel made for itself in the app's
/// context rather than the app's own socket: it has no file of its own (SMC's internal
/// TCP socket), or it hangs under another socket's `struct socket` (an MPTCP subflow is
/// grafted onto its MPTCP socket, which never reaches connect4/6 itself). Redirected,
/// the app's own socket would have another cookie and no record (its `getpeername`
/// would show the broker), and such a socket must not be in a sockmap (SMC replaces the
/// callbacks sockmap relies on). They are left alone: they go direct.
#[inline(always)]
fn kernel_socket(ctx: &SockAddrContext) -> bool {
    // SAFETY: reads of load-time constants.
    let (sk_socket, file, sock_sk) = unsafe {
        (
            u64::from(core::ptr::read_volatile(&raw const SK_SOCKET_OFF)),
            u64::from(core::ptr::read_volatile(&raw const SOCKET_FILE_OFF)),
            u64::from(core::ptr::read_volatile(&raw const SOCKET_SK_OFF)),
        )
    };
    if sk_socket == 0 {
        return false;
    }
    // SAFETY: sk is the connecting socket; its address is read back through the probe
    // helper (the verifier allows no arithmetic on a socket pointer), then its
    // `struct socket` and that socket's fields through the same checked helper.
    unsafe {
        let sk: u64 = (*ctx.sock_addr).__bindgen_anon_1.sk as u64;
        let Ok(addr) = bpf_probe_read_kernel(&raw const sk) else {
            return false;
        };
        let Ok(sock) = bpf_probe_read_kernel((addr + sk_socket) as *const u64) else {
            return false;
        };
        if sock == 0 {
            return true;
        }
        let owner = bpf_probe_read_kernel((sock + sock_sk) as *const u64);
        let f = bpf_probe_read_kernel((sock + file) as *const u64);
        !matches!((owner, f), (Ok(o), Ok(f)) if o == addr && f != 0)
    }
}

/// Count one redirected connect of `service` on this CPU. The add is atomic although
/// the slot is this CPU's: a program can be preempted by another task running it on the
/// same CPU. A service not in the map yet is inserted (another CPU may insert it at the
/// same moment: then the entry exists and the add is retried); a full map loses the
/// count, never the redirect.
#[inline(always)]
fn count_redirect(service: u32) {
    if let Some(p) = REDIRECTS.get_ptr_mut(service) {
        // SAFETY: a map value of this CPU, a valid aligned u64.
        unsafe { add_atomic(p, 1) };
        return;
    }
    if REDIRECTS.insert(service, 1u64, BPF_NOEXIST).is_err()
        && let Some(p) = REDIRECTS.get_ptr_mut(service)
    {
        // SAFETY: as above.
        unsafe { add_atomic(p, 1) };
    }
}

/// Record the caller and original destination under the socket cookie. `false` if the
/// record could not be stored: the connect is then not redirected.
#[inline(always)]
fn record(
    cookie: u64,
    s: &BrokerSettings,
    dst: (&[u8; 16], u16, u16),
    target: TargetValue,
) -> bool {
    let (addr, port, family) = dst;
    let pid_tgid = bpf_get_current_pid_tgid();
    let uid_gid = bpf_get_current_uid_gid();
    let rec = ConnRecord {
        // SAFETY: helpers without pointer arguments.
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        connect_ns: unsafe { bpf_ktime_get_ns() },
        cookie,
        netns_cookie: s.netns_cookie,
        orig_addr: *addr,
        comm: bpf_get_current_comm().unwrap_or([0u8; 16]),
        orig_port: port,
        family,
        service_id: target.service_id,
        pid: (pid_tgid >> 32) as u32,
        uid: uid_gid as u32,
        gid: (uid_gid >> 32) as u32,
        flags: target.flags & TARGET_SPLICE,
        generation: target.generation,
        _pad: 0,
    };
    BY_COOKIE.insert(cookie, rec, BPF_NOEXIST).is_ok()
}

#[cgroup_sock_addr(connect4)]
pub fn broker_connect4(ctx: SockAddrContext) -> i32 {
    let Some(s) = settings() else { return 1 };
    if exempt(&ctx, &s) {
        return 1;
    }
    // SAFETY: valid context pointer for the duration of the program.
    let (ip, port_raw) = unsafe { ((*ctx.sock_addr).user_ip4, (*ctx.sock_addr).user_port) };
    let addr = mapped_v4(ip.to_ne_bytes());
    let port = u16::from_be(port_raw as u16);
    forget_earlier_connect(&ctx);
    let Some(target) = lookup_target(addr, port) else {
        return 1;
    };
    if exempt_caller(&ctx, &s) {
        return 1;
    }
    let Some(cookie) = mark_recorded(&ctx) else {
        return 1;
    };
    if !record(cookie, &s, (&addr, port, FAMILY_INET), target) {
        return 1;
    }
    count_redirect(target.service_id);
    // SAFETY: 4-byte stores to writable context fields.
    unsafe {
        (*ctx.sock_addr).user_ip4 = u32::from_ne_bytes(LOOPBACK_V4);
        (*ctx.sock_addr).user_port = u32::from(s.listen_port.to_be());
    }
    if s.flags & SETTINGS_DEBUG != 0 {
        debug!(&ctx, "redirect v4 port {} -> broker", port);
    }
    1
}

/// The IPv6 address and port (host order) of a sock_addr context.
#[inline(always)]
fn user_addr6(ctx: &SockAddrContext) -> ([u8; 16], u16) {
    // SAFETY: valid context pointer for the duration of the program.
    // One fixed-offset load per word (see on_established).
    let (words, port_raw) = unsafe {
        let sa = ctx.sock_addr;
        (
            [
                core::ptr::read_volatile(&raw const (*sa).user_ip6[0]),
                core::ptr::read_volatile(&raw const (*sa).user_ip6[1]),
                core::ptr::read_volatile(&raw const (*sa).user_ip6[2]),
                core::ptr::read_volatile(&raw const (*sa).user_ip6[3]),
            ],
            (*sa).user_port,
        )
    };
    (addr_from_words(words), u16::from_be(port_raw as u16))
}

#[cgroup_sock_addr(connect6)]
pub fn broker_connect6(ctx: SockAddrContext) -> i32 {
    let Some(s) = settings() else { return 1 };
    if exempt(&ctx, &s) {
        return 1;
    }
    let (addr, port) = user_addr6(&ctx);
    forget_earlier_connect(&ctx);
    let Some(target) = lookup_target(addr, port) else {
        return 1;
    };
    if exempt_caller(&ctx, &s) {
        return 1;
    }
    // A dual-stack socket connecting to ::ffff:a.b.c.d talks IPv4: send it to the
    // IPv4-mapped loopback listener; a native IPv6 destination goes to ::1.
    let to = if is_mapped_v4(&addr) {
        mapped_v4(LOOPBACK_V4)
    } else if s.flags & SETTINGS_V6 != 0 {
        LOOPBACK_V6
    } else {
        // No [::1] listener of ours: whoever binds that port would get the connection.
        return 1;
    };
    let Some(cookie) = mark_recorded(&ctx) else {
        return 1;
    };
    let family = FAMILY_INET6;
    if !record(cookie, &s, (&addr, port, family), target) {
        return 1;
    }
    count_redirect(target.service_id);
    let w = words_from_addr(to);
    // SAFETY: 4-byte stores to writable context fields.
    unsafe {
        let sa = ctx.sock_addr;
        core::ptr::write_volatile(&raw mut (*sa).user_ip6[0], w[0]);
        core::ptr::write_volatile(&raw mut (*sa).user_ip6[1], w[1]);
        core::ptr::write_volatile(&raw mut (*sa).user_ip6[2], w[2]);
        core::ptr::write_volatile(&raw mut (*sa).user_ip6[3], w[3]);
        (*sa).user_port = u32::from(s.listen_port.to_be());
    }
    if s.flags & SETTINGS_DEBUG != 0 {
        debug!(&ctx, "redirect v6 port {} -> broker", port);
    }
    1
}

/// The record of a socket whose real peer (`addr:port`, as the kernel is about to report
/// it) is the broker's listener: only such a socket has anything to hide.
#[inline(always)]
fn redirected_record(ctx: &SockAddrContext, addr: &[u8; 16], port: u16) -> Option<ConnRecord> {
    let s = settings()?;
    if !is_listener(addr, port, &s) {
        return None;
    }
    // SAFETY: ctx.as_ptr() is the program's context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: the record is copied out immediately.
    unsafe { BY_COOKIE.get(cookie) }.copied()
}

#[cgroup_sock_addr(getpeername4)]
pub fn broker_getpeername4(ctx: SockAddrContext) -> i32 {
    // SAFETY: valid context pointer for the duration of the program.
    let (ip, port_raw) = unsafe { ((*ctx.sock_addr).user_ip4, (*ctx.sock_addr).user_port) };
    let peer = mapped_v4(ip.to_ne_bytes());
    let Some(rec) = redirected_record(&ctx, &peer, u16::from_be(port_raw as u16)) else {
        return 1;
    };
    let a = rec.orig_addr;
    // SAFETY: 4-byte stores to writable context fields.
    unsafe {
        (*ctx.sock_addr).user_ip4 = u32::from_ne_bytes([a[12], a[13], a[14], a[15]]);
        (*ctx.sock_addr).user_port = u32::from(rec.orig_port.to_be());
    }
    1
}

#[cgroup_sock_addr(getpeername6)]
pub fn broker_getpeername6(ctx: SockAddrContext) -> i32 {
    let (peer, port) = user_addr6(&ctx);
    let Some(rec) = redirected_record(&ctx, &peer, port) else {
        return 1;
    };
    let w = words_from_addr(rec.orig_addr);
    // SAFETY: 4-byte stores to writable context fields.
    unsafe {
        let sa = ctx.sock_addr;
        core::ptr::write_volatile(&raw mut (*sa).user_ip6[0], w[0]);
        core::ptr::write_volatile(&raw mut (*sa).user_ip6[1], w[1]);
        core::ptr::write_volatile(&raw mut (*sa).user_ip6[2], w[2]);
        core::ptr::write_volatile(&raw mut (*sa).user_ip6[3], w[3]);
        (*sa).user_port = u32::from(rec.orig_port.to_be());
    }
    1
}

/// Build the [`SockKey`] of the socket behind a `bpf_sock_ops` context pointer. Remote
/// ports are network order;
/// most kernels hand them shifted into the upper half of the u32, older ones not: both
/// read right. Each field is one fixed-offset volatile load (see `on_established`).
macro_rules! sock_key {
    ($p:expr) => {{
        let p = $p;
        // Straight-line loads, all fields, before any branch: LLVM then addresses each
        // one as ctx+offset instead of keeping a derived pointer the verifier refuses.
        let family = core::ptr::read_volatile(&raw const (*p).family);
        let l4 = core::ptr::read_volatile(&raw const (*p).local_ip4);
        let r4 = core::ptr::read_volatile(&raw const (*p).remote_ip4);
        let l6 = [
            core::ptr::read_volatile(&raw const (*p).local_ip6[0]),
            core::ptr::read_volatile(&raw const (*p).local_ip6[1]),
            core::ptr::read_volatile(&raw const (*p).local_ip6[2]),
            core::ptr::read_volatile(&raw const (*p).local_ip6[3]),
        ];
        let r6 = [
            core::ptr::read_volatile(&raw const (*p).remote_ip6[0]),
            core::ptr::read_volatile(&raw const (*p).remote_ip6[1]),
            core::ptr::read_volatile(&raw const (*p).remote_ip6[2]),
            core::ptr::read_volatile(&raw const (*p).remote_ip6[3]),
        ];
        let lp = core::ptr::read_volatile(&raw const (*p).local_port);
        let rp = core::ptr::read_volatile(&raw const (*p).remote_port);
        let (local, remote) = if family == u32::from(FAMILY_INET) {
            (mapped_v4(l4.to_ne_bytes()), mapped_v4(r4.to_ne_bytes()))
        } else {
            (addr_from_words(l6), addr_from_words(r6))
        };
        let rp = if rp > 0xffff { rp >> 16 } else { rp };
        SockKey {
            local,
            remote,
            local_port: lp as u16,
            remote_port: u16::from_be(rp as u16),
        }
    }};
}

#[sock_ops]
pub fn broker_sock_ops(ctx: SockOpsContext) -> u32 {
    match ctx.op() {
        SOCK_OPS_ACTIVE_ESTABLISHED_CB => on_established(&ctx),
        SOCK_OPS_STATE_CB if ctx.arg(1) == TCP_CLOSE => on_close(&ctx),
        _ => {}
    }
    1
}

/// The record key of the socket behind a sock_ops context: its network namespace and
/// its own 4-tuple.
#[inline(always)]
fn conn_key(ctx: &SockOpsContext) -> ConnKey {
    ConnKey {
        // SAFETY: ctx.as_ptr() is the program's context.
        netns_cookie: unsafe { bpf_get_netns_cookie(ctx.as_ptr()) },
        // SAFETY: the context pointer is valid for the duration of the program.
        sock: unsafe { sock_key!(ctx.ops) },
        _pad: 0,
    }
}

#[inline(always)]
fn on_established(ctx: &SockOpsContext) {
    // SAFETY: the context pointer is valid; `sk` is the full socket or null.
    let sk = unsafe { (*ctx.ops).__bindgen_anon_2.sk };
    // Every socket of the cgroup that connects gets here; only one whose connect was
    // recorded can have a record to move (see `was_recorded`).
    if sk.is_null() || !was_recorded(sk) {
        return;
    }
    // SAFETY: ctx.as_ptr() is the program's context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: the record is copied out immediately.
    let Some(mut rec) = (unsafe { BY_COOKIE.get(cookie) }).copied() else {
        return;
    };
    let Some(s) = settings() else { return };
    let key = conn_key(ctx);
    // Only a socket the kernel redirected to the broker's listener, in the broker's
    // namespace, gets a record the broker can find. Anything else (a socket whose
    // redirected connect failed and which then connected elsewhere without a new
    // connect4/6 decision) loses its record here, so getpeername does not lie either.
    if rec.netns_cookie != s.netns_cookie
        || key.netns_cookie != s.netns_cookie
        || !is_listener(&key.sock.remote, key.sock.remote_port, &s)
    {
        let _ = BY_COOKIE.remove(cookie);
        return;
    }
    if rec.flags & TARGET_SPLICE != 0 && splice_candidate(ctx, cookie) {
        rec.flags |= REC_IN_SPLICE_APP;
    }
    if BY_CONN.insert(key, rec, BPF_NOEXIST).is_err() {
        // A live record under this socket's key: impossible for two live sockets of one
        // namespace, so it is stale or forged. Never overwrite; drop it, and let the
        // broker find nothing for either (it refuses the connection).
        let _ = BY_CONN.remove(key);
    }
    // Delete both records when this socket closes (getpeername needs the cookie entry
    // until then).
    let _ = ctx.set_cb_flags(ctx.cb_flags() as i32 | SOCK_OPS_STATE_CB_FLAG);
}

/// Put an app socket that may be spliced in `SPLICE_APP` under its cookie (connect4/6
/// already wrote the cookie in its own storage, `APP_SK`, for the sk_msg program).
/// `false` if it is not there.
#[inline(always)]
fn splice_candidate(ctx: &SockOpsContext, cookie: u64) -> bool {
    let mut key = cookie;
    // SAFETY: ctx.ops is the program's own bpf_sock_ops.
    if SPLICE_APP
        .update(&mut key, unsafe { &mut *ctx.ops }, BPF_NOEXIST)
        .is_err()
    {
        return false;
    }
    // Spliced data waits in this socket's receive queue, bounded by its receive buffer;
    // when that is full the kernel retries a jiffy later. TCP's own autotuning never
    // grows it (no TCP data arrives once spliced), so ask for a large one up front (the
    // kernel caps it at net.core.rmem_max).
    let mut val: i32 = SPLICE_RCVBUF;
    // SAFETY: valid context; val outlives the call.
    let _ = unsafe {
        bpf_setsockopt(
            ctx.ops.cast(),
            SOL_SOCKET,
            SO_RCVBUF,
            (&raw mut val).cast(),
            core::mem::size_of::<i32>() as i32,
        )
    };
    true
}

/// An app socket closes: its records go with it (the sockhashes drop it by themselves).
#[inline(always)]
fn on_close(ctx: &SockOpsContext) {
    // SAFETY: ctx.as_ptr() is the program's context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let _ = BY_COOKIE.remove(cookie);
    let key = conn_key(ctx);
    // SAFETY: the record is copied out immediately.
    if unsafe { BY_CONN.get(key) }.is_some_and(|r| r.cookie == cookie) {
        let _ = BY_CONN.remove(key);
    }
}

/// Byte offset of `sk_wmem_queued` in the kernel's `struct sock`; set by the daemon from
/// the kernel's BTF before loading (`.rodata`: the verifier sees a constant).
#[unsafe(no_mangle)]
static SK_WMEM_QUEUED_OFF: u32 = 0;
/// Byte offset of `sk_sndbuf` in the kernel's `struct sock` (see above).
#[unsafe(no_mangle)]
static SK_SNDBUF_OFF: u32 = 0;

/// Whether the upstream socket of `SPLICE` entry `up` has no room for `size` more bytes
/// with half of its send buffer to spare. Redirected into a full send buffer, a
/// non-blocking app's send would fail with EAGAIN while its own socket stays writable:
/// an edge-triggered app (Go, tokio) would then wait for a wake-up that never comes; and
/// a send the kernel redirects only in part returns short, so the app sends (and this
/// program counts) the rest again.
///
/// The socket's address comes from its `SPLICE` entry (recorded by the stream verdict:
/// an sk_msg program may not hold a socket reference, so it cannot look the socket up
/// itself); until the upstream has sent a first packet it is unknown. Meanwhile the app
/// may send `blind_budget` bytes in all (`sent` so far): half the upstream's send buffer
/// when the splice began, which the daemon wrote. A client that pipelines (many
/// requests before the first answer) sends more than one request before that packet.
#[inline(always)]
fn upstream_pressed(up: u64, size: u32, sent: u64, blind_budget: u64) -> bool {
    // SAFETY: the value is copied out immediately.
    let Some(sk) = (unsafe { SPLICE.get(up) }).map(|v| v.sk) else {
        return true;
    };
    if sk == 0 {
        return sent.saturating_add(u64::from(size)) > blind_budget;
    }
    // SAFETY: reads of the kernel's own socket through the checked probe helper; the
    // offsets come from the running kernel's BTF.
    let (queued, sndbuf) = unsafe {
        let q = u64::from(core::ptr::read_volatile(&raw const SK_WMEM_QUEUED_OFF));
        let b = u64::from(core::ptr::read_volatile(&raw const SK_SNDBUF_OFF));
        (
            bpf_probe_read_kernel((sk + q) as *const i32),
            bpf_probe_read_kernel((sk + b) as *const i32),
        )
    };
    let (Ok(queued), Ok(sndbuf)) = (queued, sndbuf) else {
        return true;
    };
    i64::from(queued) + i64::from(size) > i64::from(sndbuf) / 2
}

/// sk_msg on `SPLICE_APP`: an app socket's send goes straight out of its upstream socket
/// once the session is spliced; before that (and if the upstream socket is gone) it takes
/// the normal path to the broker's listener. So does every send once the upstream's send
/// buffer has filled up (see [`upstream_pressed`]): the daemon then relays this direction
/// with ordinary TCP flow control (the bytes the kernel sent are already in the upstream
/// socket, ahead of anything the daemon writes, so the order holds).
#[sk_msg]
pub fn broker_splice_msg(ctx: SkMsgContext) -> u32 {
    // The sending socket's cookie, from its own storage (connect4/6 wrote it there).
    // SAFETY: the context pointer is valid; `sk` is the sending socket.
    let cookie = unsafe {
        let sk = (*ctx.msg).__bindgen_anon_3.sk;
        if sk.is_null() {
            return SK_PASS;
        }
        let p = bpf_sk_storage_get(
            (&raw const APP_SK).cast_mut().cast(),
            sk.cast(),
            core::ptr::null_mut(),
            0,
        );
        if p.is_null() {
            return SK_PASS;
        }
        *p.cast::<u64>()
    };
    let Some(v) = SPLICE.get_ptr_mut(cookie) else {
        return SK_PASS;
    };
    // SAFETY: v points into the map value for the duration of the program; only this
    // socket's sends (serialised by its socket lock) write `bytes` and `flags`.
    unsafe {
        if (*v).flags & SPLICE_FALLBACK != 0 {
            return SK_PASS;
        }
        let peer = (*v).peer;
        let size = ctx.size();
        if upstream_pressed(peer, size, (*v).bytes, (*v).blind_budget) {
            (*v).flags |= SPLICE_FALLBACK;
            return SK_PASS;
        }
        // The bytes this verdict covers.
        let mut covered = size;
        if (*v).flags & SPLICE_MYSQL != 0 {
            match mysql_frame(&ctx, &mut (*v).msg_left, size) {
                Frame::All => {}
                Frame::First(n) => {
                    // The verdict covers this packet's end; the program runs again for
                    // the rest of the send, at the next packet's start.
                    bpf_msg_apply_bytes(ctx.msg, n);
                    covered = n;
                }
                Frame::Daemon => {
                    (*v).flags |= SPLICE_FALLBACK;
                    return SK_PASS;
                }
            }
        }
        if SPLICE_UP.redirect_msg(&ctx, peer, 0) as u32 == SK_PASS {
            (*v).bytes += u64::from(covered);
        }
    }
    SK_PASS
}

/// What the sk_msg program does with an app's send on a MySQL session.
enum Frame {
    /// Redirect all of it (it lies within the current packet, or ends with it).
    All,
    /// Redirect its first `n` bytes (the current packet's end); the rest starts a packet.
    First(u32),
    /// It starts a `COM_CHANGE_USER`, or starts a command packet without its header and
    /// command byte whole: hand the upload to the daemon, from here on. (Holding a short send
    /// back with `bpf_msg_cork_bytes` until the command byte comes, then passing it to
    /// the daemon, left the bytes queued on 6.18: the app waited for a reply forever.
    /// Clients write a packet's header and command byte in one send; the few that do
    /// not are relayed by the daemon, which frames the stream the same way.)
    Daemon,
}

/// Frame an app's send into MySQL packets (3-byte length, sequence id; a command is the
/// first payload byte of a packet with sequence id 0). `left`: bytes of the current
/// packet still to come, updated. A `COM_CHANGE_USER` goes to the daemon, which refuses
/// it (`connector/mysql/guard.rs` frames the same way).
/// No command byte in the send (not a byte value).
const NO_COMMAND: u32 = 0x100;

#[inline(always)]
fn mysql_frame(ctx: &SkMsgContext, left: &mut u32, size: u32) -> Frame {
    if *left >= size {
        *left -= size;
        return Frame::All;
    }
    if *left > 0 {
        let n = *left;
        *left = 0;
        return Frame::First(n);
    }
    if size < 4 {
        return Frame::Daemon;
    }
    let want: u32 = if size < 5 { 4 } else { 5 };
    // SAFETY: the helper makes [0, want) of the message linear (it is at least that
    // long); every read below is bounds-checked against data_end for the verifier.
    let hdr = unsafe {
        if bpf_msg_pull_data(ctx.msg, 0, want, 0) != 0 {
            // Cannot look: let the daemon frame it.
            return Frame::Daemon;
        }
        let data = ctx.data();
        if data + 4 > ctx.data_end() {
            return Frame::Daemon;
        }
        let p = data as *const u8;
        // NO_COMMAND when the send holds the header only.
        let cmd = if data + 5 <= ctx.data_end() {
            u32::from(*p.add(4))
        } else {
            NO_COMMAND
        };
        (
            u32::from(*p) | u32::from(*p.add(1)) << 8 | u32::from(*p.add(2)) << 16,
            *p.add(3),
            cmd,
        )
    };
    let (payload, seq, cmd) = hdr;
    // A command without its command byte (a 4-byte send of a header), or COM_CHANGE_USER.
    if seq == 0 && payload > 0 && (cmd == NO_COMMAND || cmd == u32::from(MYSQL_COM_CHANGE_USER)) {
        return Frame::Daemon;
    }
    let total = 4 + payload;
    if total >= size {
        *left = total - size;
        Frame::All
    } else {
        Frame::First(total)
    }
}

/// Byte offset of `cb` in the kernel's `struct sk_buff` (see above); TCP keeps a
/// segment's first sequence number at its start (`struct tcp_skb_cb`).
#[unsafe(no_mangle)]
static SKB_CB_OFF: u32 = 0;

/// The most `bpf_skb_adjust_room` takes off an sk_skb's head in one call.
const TRIM_STEP: u32 = 0xfff;

/// What to do with a segment whose head the upstream socket already had.
enum Seen {
    /// Nothing of it was seen before (or nothing is known yet).
    New,
    /// Its head was, and has been cut off: the rest is new.
    Trimmed,
    /// Every byte of it was.
    Old,
    /// Its head was, and could not be cut off.
    Failed,
}

/// Cut off the head of the segment in `ctx` that the upstream socket already received
/// (and this program already handed on), and record where the stream now ends.
///
/// The stream verdict gets whole segments from the socket's receive queue
/// (`tcp_read_skb`), where TCP leaves a retransmitted segment that overlaps what it
/// already had as it came (a plain read skips the overlap by its sequence number; the
/// verdict path does not). Such a segment arrives when an acknowledgement was late: on
/// loopback, under load, after the download fell back and the upstream's receive window
/// closed. Handed on whole, its head reaches the app twice and corrupts the stream
/// (seen: 65 461 bytes twice in a 100 MB COPY out, which then hung).
///
/// # Safety
/// `v` points to this socket's `SPLICE` value.
#[inline(always)]
unsafe fn drop_seen_head(ctx: &SkBuffContext, v: *mut SpliceValue, len: u32) -> Seen {
    // SAFETY: the context is the kernel's sk_buff; a read through the checked probe
    // helper at the offset of its `cb` (from the running kernel's BTF).
    let seq = unsafe {
        let off = u64::from(core::ptr::read_volatile(&raw const SKB_CB_OFF));
        bpf_probe_read_kernel((ctx.skb.skb as u64 + off) as *const u32)
    };
    let Ok(seq) = seq else {
        return Seen::New;
    };
    // SAFETY: per the function's contract; this socket's receive path is serialised.
    unsafe {
        let mut seen = Seen::New;
        if (*v).flags & SPLICE_SEQ != 0 {
            // Sequence numbers wrap: compare by difference.
            let dup = (*v).next_seq.wrapping_sub(seq) as i32;
            if dup > 0 {
                let dup = dup as u32;
                if dup >= len {
                    return Seen::Old;
                }
                let mut left = dup;
                // Bounded: a segment is at most 64 KiB; 32 steps cut 128 KiB.
                for _ in 0..32 {
                    if left == 0 {
                        break;
                    }
                    let n = if left < TRIM_STEP { left } else { TRIM_STEP };
                    if bpf_skb_adjust_room(ctx.skb.skb, -(n as i32), 0, 0) != 0 {
                        break;
                    }
                    left -= n;
                }
                if left != 0 {
                    return Seen::Failed;
                }
                seen = Seen::Trimmed;
            }
        }
        let end = seq.wrapping_add(len);
        if (*v).flags & SPLICE_SEQ == 0 || (end.wrapping_sub((*v).next_seq) as i32) > 0 {
            (*v).next_seq = end;
        }
        (*v).flags |= SPLICE_SEQ;
        seen
    }
}

/// sk_skb stream verdict on `SPLICE_UP`: what an upstream socket receives goes straight
/// into its app socket's receive queue once the session is spliced; otherwise it stays
/// on the upstream socket for the daemon to read. It stays there too, for good, once the
/// app has fallen [`SPLICE_READ_BUDGET`] bytes behind: there it is charged to the
/// upstream socket, whose TCP window closes, which stops the server. The daemon hears
/// of it on `SPLICE_EVENTS` and relays this direction from then on. Either way, the
/// bytes of a retransmitted segment that were handed on already are cut off first (see
/// [`drop_seen_head`]).
#[stream_verdict]
pub fn broker_splice_skb(ctx: SkBuffContext) -> u32 {
    // SAFETY: the context pointer is valid for the duration of the program.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let Some(v) = SPLICE.get_ptr_mut(cookie) else {
        return SK_PASS;
    };
    // SAFETY: as in broker_splice_msg; this socket's receive path is serialised.
    unsafe {
        let mut len = ctx.len();
        if len == 0 {
            // A bare FIN. Redirected, it would become an empty message in the app
            // socket's queue, which recv() reports as EFAULT; the daemon passes the
            // end of the stream on itself (connector::splice).
            return SK_DROP;
        }
        match drop_seen_head(&ctx, v, len) {
            Seen::New => {}
            Seen::Trimmed => len = ctx.len(),
            Seen::Old => return SK_DROP,
            Seen::Failed => {
                // The new tail cannot be handed on alone: it is lost. Counted as
                // redirected, it is what the app will be found waiting for, so the
                // daemon ends the session (see proxy::splice::CatchUp) instead of
                // the app reading a corrupt stream.
                (*v).bytes += u64::from(len);
                if (*v).flags & SPLICE_FALLBACK == 0
                    && SPLICE_EVENTS.output::<u64>((*v).app_cookie, 0).is_ok()
                {
                    (*v).flags |= SPLICE_FALLBACK;
                }
                return SK_DROP;
            }
        }
        if (*v).flags & SPLICE_FALLBACK != 0 {
            return SK_PASS;
        }
        if (*v).sk == 0 {
            // For the app side's sk_msg program (see upstream_pressed). Storing a
            // kernel address in a map needs CAP_PERFMON, which the daemon has.
            (*v).sk = (*ctx.skb.skb).__bindgen_anon_2.sk as u64;
        }
        let cookie = (*v).app_cookie;
        // Wrapping: the read counter starts below zero by the bytes the daemon itself
        // wrote to the app after the splice began (ReadyForQuery).
        let read = SPLICE_READ.get(cookie).copied();
        let behind = match read {
            Some(r) => ((*v).bytes.wrapping_sub(r) as i64).max(0) as u64,
            None => u64::MAX,
        };
        // Committed only once the daemon is told (a full ring: try again next packet).
        if behind.saturating_add(u64::from(len)) > SPLICE_READ_BUDGET
            && SPLICE_EVENTS.output::<u64>(cookie, 0).is_ok()
        {
            (*v).flags |= SPLICE_FALLBACK;
            return SK_PASS;
        }
        let peer = (*v).peer;
        let flags = if (*v).flags & SPLICE_INGRESS != 0 {
            BPF_F_INGRESS
        } else {
            0
        };
        if SPLICE_APP.redirect_skb(&ctx, peer, flags) as u32 == SK_PASS {
            (*v).bytes += u64::from(len);
        }
    }
    SK_PASS
}

/// Byte offset of `__sk_common.skc_cookie` in the kernel's `struct sock` (see above).
#[unsafe(no_mangle)]
static SK_COOKIE_OFF: u32 = 0;

/// Raw tracepoint `sock_recv_length` (every `recvmsg`, after it returns): count the bytes
/// the app sockets in `SPLICE_READ` read, keyed by socket cookie. sock_ops asked for each
/// app socket's cookie at connect, so the kernel has stored it in the socket.
#[raw_tracepoint(tracepoint = "sock_recv_length")]
pub fn broker_splice_read(ctx: RawTracePointContext) -> i32 {
    // TP_PROTO(struct sock *sk, int ret, int flags)
    let sk: u64 = ctx.arg(0);
    let ret: u64 = ctx.arg(1);
    let flags: u64 = ctx.arg(2);
    let (ret, flags) = (ret as i32, flags as i32);
    if ret <= 0 || flags & MSG_PEEK != 0 || sk == 0 {
        return 0;
    }
    // SAFETY: a read of the kernel's own socket through the checked probe helper.
    let cookie = unsafe {
        let off = u64::from(core::ptr::read_volatile(&raw const SK_COOKIE_OFF));
        bpf_probe_read_kernel((sk + off) as *const u64)
    };
    let Ok(cookie) = cookie else { return 0 };
    if let Some(read) = SPLICE_READ.get_ptr_mut(cookie) {
        // SAFETY: points into the map value; several threads may read one socket.
        unsafe { add_atomic(read, ret as u64) };
    }
    0
}

#[cfg(not(target_arch = "bpf"))]
fn main() {}

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
