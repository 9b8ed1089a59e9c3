"""pg8000 (pure Python, native API): the client-matrix workload. See tests/src/clients.rs.

pg8000 reads no environment variables: the libpq ones are mapped here. Its default
(`ssl_context=None`) asks for TLS and goes on in plain text when refused, unverified,
like libpq's `prefer`. It has no channel binding option.
"""

import io
import os
import ssl
import sys
import time

import pg8000.native

ROWS = 100_000  # about 10.7 MB of COPY text
PAYLOAD = "x" * 100
NL = b"\n"


def report(name, detail=""):
    print(f"ok {name} {detail}".rstrip(), flush=True)


def ssl_context():
    mode = os.environ.get("PGSSLMODE")
    if mode is None or mode == "prefer":
        return None
    if mode in ("disable", "allow"):
        return False
    if mode == "require" and not os.environ.get("PGSSLROOTCERT"):
        return True
    ctx = ssl.create_default_context(cafile=os.environ.get("PGSSLROOTCERT"))
    ctx.check_hostname = mode == "verify-full"
    return ctx


def connect():
    return pg8000.native.Connection(
        user=os.environ["PGUSER"],
        password=os.environ.get("PGPASSWORD"),
        host=os.environ["PGHOST"],
        port=int(os.environ.get("PGPORT", "5432")),
        database=os.environ.get("PGDATABASE"),
        ssl_context=ssl_context(),
        timeout=60,
    )


def sqlstate(e):
    return e.args[0].get("C") if e.args and isinstance(e.args[0], dict) else None


def workload():
    step = "connect"
    try:
        conn = connect()
        report(step, f"user={conn.run('select current_user')[0][0]}")

        step = "prepared"
        ps = conn.prepare("select :n::int * 2")
        got = [ps.run(n=n)[0][0] for n in (21, 50)]
        assert got == [42, 100], got
        ps.close()
        report(step, "results=42,100")

        step = "transaction"
        conn.run("create temp table tx (n int)")
        conn.run("begin")
        conn.run("insert into tx values (1)")
        conn.run("rollback")
        assert conn.run("select count(*) from tx")[0][0] == 0
        conn.run("begin")
        conn.run("insert into tx values (2)")
        conn.run("commit")
        assert conn.run("select count(*) from tx")[0][0] == 1
        report(step, "rollback=0 commit=1")

        step = "copy_in"
        data = "".join(f"{i}\t{PAYLOAD}\n" for i in range(ROWS)).encode()
        conn.run("create temp table big (id int, payload text)")
        conn.run("copy big from stdin", stream=io.BytesIO(data))
        assert conn.row_count == ROWS, conn.row_count
        assert conn.run("select count(*) from big")[0][0] == ROWS
        report(step, f"rows={ROWS} bytes={len(data)}")

        step = "copy_out"
        out = io.BytesIO()
        conn.run("copy (select * from big order by id) to stdout", stream=out)
        got = out.getvalue()
        assert got == data, (len(got), len(data))
        report(step, f"rows={got.count(NL)} bytes={len(got)}")

        step = "error"
        try:
            conn.run("select 1/0")
        except pg8000.native.DatabaseError as e:
            code = sqlstate(e)
        else:
            raise AssertionError("select 1/0 succeeded")
        assert code == "22012", code
        assert conn.run("select 2")[0][0] == 2
        report(step, f"sqlstate={code} then=2")

        # pg8000 has no cancel API (no CancelRequest at all): the one step it skips.
        print("skip cancel pg8000 has no cancel API", flush=True)

        step = "close"
        conn.close()
        report(step)
    except Exception as e:  # noqa: BLE001 - report any failure as the step's
        print(f"FAIL {step}: {type(e).__name__}: {e}".rstrip(), flush=True)
        sys.exit(1)


def bench(n):
    for _ in range(n):
        t0 = time.perf_counter()
        conn = connect()
        assert conn.run("select 1")[0][0] == 1
        t1 = time.perf_counter()
        conn.close()
        t2 = time.perf_counter()
        print(f"bench connect_ms={(t2 - t0) * 1e3:.3f} close_ms={(t2 - t1) * 1e3:.3f}", flush=True)


if os.environ.get("CLIENT_BENCH"):
    bench(int(os.environ["CLIENT_BENCH"]))
else:
    workload()
