#!/usr/bin/env python3
"""pg_flow.py - raw PostgreSQL wire-protocol (v3) client for broker flow-control tests.

Stdlib only. Works directly against PostgreSQL (trust or cleartext-password auth) and
through the credential broker, which answers the StartupMessage itself with
AuthenticationOk. md5/SCRAM are deliberately not implemented.

Usage:
  pg_flow.py --host H --port P --user U --dbname D [--password PW] MODE ...

Modes:
  stall-read --rows N --stall SECONDS [--marker-file F]
      Server -> app flow control. Runs COPY (SELECT generate_series(1,N)) TO STDOUT (rows zero-padded
      to --width characters if given),
      and after CopyOutResponse writes "stalled" to F and sleeps SECONDS without
      reading the socket at all. A correct proxy must stop reading from the server
      (backpressure) instead of buffering without bound or dropping data. Afterwards
      it reads everything and checks that the rows are exactly 1..N in order and the
      tag is "COPY N".

  et-write --rows N [--chunk BYTES] [--edge-timeout SECONDS] --table T
      Write wake-ups for edge-triggered non-blocking writers (Go netpoller,
      tokio/mio). Runs COPY T FROM STDIN and streams rows 1..N in ~BYTES CopyData
      messages on a non-blocking socket registered with EPOLLET: it send()s until
      EAGAIN and only then waits for a *new* EPOLLOUT edge. If the proxy never
      produces that edge once its buffer drains (e.g. it keeps the socket
      unwritable or never reads again), the writer hangs; this is reported as
      {"stalled": true} with exit code 1 after --edge-timeout seconds.

Prints one JSON line on stdout; progress on stderr.
Exit codes: 0 ok, 1 failed check (or stalled writer), 2 protocol/connection error.
"""
import argparse, json, select, socket, struct, sys, time

RECV = 256 * 1024


class ProtoError(Exception):
    pass


def log(text):
    print(f"pg_flow: {text}", file=sys.stderr, flush=True)


def frame(t, body=b""):
    return t + struct.pack("!I", len(body) + 4) + body


def die_error(body):
    f = {p[:1].decode(): p[1:].decode(errors="replace") for p in body.split(b"\0") if p}
    print(f"pg_flow: ErrorResponse S={f.get('S')} C={f.get('C')} M={f.get('M')}",
          file=sys.stderr, flush=True)
    sys.exit(2)


class Conn:
    """Incremental message parser: keeps only the unparsed tail of the stream."""

    def __init__(self, sock):
        self.sock, self.buf, self.pos = sock, bytearray(), 0

    def _fill(self, data):
        if not data:
            raise ProtoError("connection closed by server")
        if self.pos:
            del self.buf[:self.pos]
            self.pos = 0
        self.buf += data

    def next_msg(self):
        """Return (type, body) of the next buffered message, or None."""
        avail = len(self.buf) - self.pos
        if avail < 5:
            return None
        (n,) = struct.unpack_from("!I", self.buf, self.pos + 1)
        if avail < n + 1:
            return None
        t, body = chr(self.buf[self.pos]), bytes(self.buf[self.pos + 5:self.pos + 1 + n])
        self.pos += n + 1
        if t == "E":
            die_error(body)
        return t, body

    def read(self):
        """Blocking read of the next message, skipping ParameterStatus/BackendKeyData/Notice."""
        while True:
            m = self.next_msg()
            if m is None:
                self._fill(self.sock.recv(RECV))
            elif m[0] not in "SKN":
                return m

    def expect(self, want):
        t, body = self.read()
        if t != want:
            raise ProtoError(f"expected {want!r}, got {t!r}")
        return body

    def drain_nonblocking(self):
        """Read whatever is readable now (non-blocking socket); ErrorResponse exits 2."""
        while True:
            try:
                self._fill(self.sock.recv(RECV))
            except BlockingIOError:
                break
        while (m := self.next_msg()) is not None:
            if m[0] not in "SKN":
                raise ProtoError(f"unexpected {m[0]!r} message during COPY IN")

    def finish(self):
        """After CommandComplete: ReadyForQuery, Terminate, close."""
        self.expect("Z")
        self.sock.sendall(frame(b"X"))
        self.sock.close()


def connect(a):
    sock = socket.create_connection((a.host, a.port), timeout=a.timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    conn = Conn(sock)
    params = [("user", a.user), ("database", a.dbname), ("application_name", "pg_flow")]
    body = struct.pack("!I", 3 << 16) + b"".join(
        k.encode() + b"\0" + v.encode() + b"\0" for k, v in params) + b"\0"
    sock.sendall(struct.pack("!I", len(body) + 4) + body)
    while True:
        t, body = conn.read()
        if t == "R":
            (code,) = struct.unpack_from("!I", body)
            if code == 3:
                sock.sendall(frame(b"p", a.password.encode() + b"\0"))
            elif code != 0:
                raise ProtoError(f"unsupported authentication request {code}: only trust "
                                 "(AuthenticationOk) and cleartext password are supported, "
                                 "not md5/SCRAM")
        elif t == "Z":
            return conn
        else:
            raise ProtoError(f"unexpected {t!r} message during startup")


def stall_read(conn, a):
    n = a.rows
    # --width pads each row with leading zeros (still an integer) to make rows bigger.
    sel = f"lpad(i::text, {a.width}, '0')" if a.width else "i"
    conn.sock.sendall(frame(b"Q", f"COPY (SELECT {sel} FROM generate_series(1,{n}) i) TO STDOUT\0".encode()))
    conn.expect("H")
    if a.marker_file:
        with open(a.marker_file, "w") as f:
            f.write("stalled\n")
            f.flush()
    log(f"CopyOutResponse received; not reading for {a.stall}s")
    time.sleep(a.stall)
    count = nbytes = 0
    mismatch, t0 = None, time.monotonic()
    while True:
        t, body = conn.read()
        if t == "d":
            count += 1
            nbytes += len(body)
            if mismatch is None:
                try:
                    ok = int(body) == count
                except ValueError:
                    ok = False
                if not ok:
                    mismatch = count
            if count % 1_000_000 == 0:
                log(f"read {count} rows, {nbytes} bytes")
        elif t == "C":
            tag = body.rstrip(b"\0").decode()
            break
        elif t != "c":
            raise ProtoError(f"unexpected {t!r} message during COPY OUT")
    conn.finish()
    log(f"read {count} rows in {time.monotonic() - t0:.2f}s after the stall")
    in_order = mismatch is None and count == n
    res = {"mode": "stall-read", "rows": count, "in_order": in_order, "bytes": nbytes, "tag": tag}
    if mismatch is not None:
        res["first_mismatch"] = mismatch
    return res, in_order and tag == f"COPY {n}"


def copy_messages(n, chunk):
    """Lazily yield CopyData frames of ~chunk bytes with rows 1..n, then CopyDone."""
    i = 1
    while i <= n:
        k = max(1, chunk // (len(str(i)) + 1))
        j = min(i + k, n + 1)
        yield frame(b"d", ("\n".join(map(str, range(i, j))) + "\n").encode())
        i = j
    yield frame(b"c")


def et_write(conn, a):
    sock = conn.sock
    sock.sendall(frame(b"Q", f"COPY {a.table} FROM STDIN\0".encode()))
    conn.expect("G")
    sock.setblocking(False)
    ep = select.epoll()
    ep.register(sock.fileno(), select.EPOLLOUT | select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLET)
    msgs = copy_messages(a.rows, a.chunk)
    pending, sent, nbytes = memoryview(b""), 0, 0
    eagain = edges = other = 0
    max_wait, next_log, t_start = 0.0, 64 << 20, time.monotonic()
    while True:
        if not pending:
            m = next(msgs, None)
            if m is None:
                break
            pending = memoryview(m)
            nbytes += len(m) - 5
        try:
            k = sock.send(pending)  # partial send: keep the remainder, send again
            sent += k
            pending = pending[k:]
            if sent >= next_log:
                log(f"sent {sent} bytes, eagain={eagain} edges={edges}")
                next_log += 64 << 20
            continue
        except BlockingIOError:
            eagain += 1
        t0 = time.monotonic()  # edge-triggered: wait for a new EPOLLOUT edge
        while True:
            left = t0 + a.edge_timeout - time.monotonic()
            if left <= 0:
                waited = round(time.monotonic() - t0, 3)
                log(f"no EPOLLOUT edge within {a.edge_timeout}s after EAGAIN (sent {sent})")
                return {"mode": "et-write", "stalled": True, "sent": sent, "waited": waited}, False
            mask = 0
            for _, ev in ep.poll(left):
                mask |= ev
            if mask & (select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR):
                conn.drain_nonblocking()
            if mask & select.EPOLLOUT:
                edges += 1
                break
            if mask:
                other += 1
        w = time.monotonic() - t0
        if w > 0.5:
            log(f"waited {w:.2f}s for EPOLLOUT edge at {sent} bytes")
        max_wait = max(max_wait, w)
    ep.close()
    sock.settimeout(a.timeout)
    log(f"sent {sent} bytes in {time.monotonic() - t_start:.2f}s; waiting for CommandComplete")
    tag = conn.expect("C").rstrip(b"\0").decode()
    conn.finish()
    res = {"mode": "et-write", "stalled": False, "rows": a.rows, "tag": tag, "bytes": nbytes,
           "eagain": eagain, "edges": edges, "max_wait": round(max_wait, 3),
           "non_out_events": other}
    return res, tag == f"COPY {a.rows}"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=5432)
    p.add_argument("--user", required=True)
    p.add_argument("--dbname", required=True)
    p.add_argument("--password", default="")
    p.add_argument("--timeout", type=float, default=120.0, help="timeout for blocking socket ops")
    sub = p.add_subparsers(dest="mode", required=True)
    s = sub.add_parser("stall-read")
    s.add_argument("--rows", type=int, required=True)
    s.add_argument("--width", type=int, default=0)
    s.add_argument("--stall", type=float, required=True)
    s.add_argument("--marker-file")
    e = sub.add_parser("et-write")
    e.add_argument("--rows", type=int, required=True)
    e.add_argument("--chunk", type=int, default=65536)
    e.add_argument("--edge-timeout", type=float, default=10.0)
    e.add_argument("--table", required=True)
    a = p.parse_args()
    try:
        conn = connect(a)
        res, ok = (stall_read if a.mode == "stall-read" else et_write)(conn, a)
    except (ProtoError, OSError) as exc:
        log(f"error: {exc!r}")
        return 2
    print(json.dumps(res), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
