"""asyncpg: the client-matrix workload. See tests/src/clients.rs.

asyncpg reads PGPORT, PGUSER, PGPASSWORD, PGDATABASE, PGSSLMODE and PGSSLROOTCERT
itself (default sslmode: prefer). PGHOST is passed as `host=`: asyncpg (0.27) parses
a bare IPv6 address in PGHOST as host:port (`::1` -> host `:`, port `1`). It has no
channel binding option.
"""

import asyncio
import io
import os
import sys
import time

import asyncpg

HOST = os.environ.get("PGHOST")

ROWS = 100_000  # about 10.7 MB of COPY text
PAYLOAD = "x" * 100
NL = b"\n"
CANCEL_AFTER = 1.0
CANCEL_WITHIN = 10.0


def report(name, detail=""):
    print(f"ok {name} {detail}".rstrip(), flush=True)


async def workload():
    step = "connect"
    try:
        conn = await asyncpg.connect(host=HOST)
        report(step, f"user={await conn.fetchval('select current_user')}")

        step = "prepared"
        stmt = await conn.prepare("select $1::int * 2")
        got = [await stmt.fetchval(n) for n in (21, 50)]
        assert got == [42, 100], got
        report(step, "results=42,100")

        step = "transaction"
        await conn.execute("create temp table tx (n int)")
        tr = conn.transaction()
        await tr.start()
        await conn.execute("insert into tx values (1)")
        await tr.rollback()
        assert await conn.fetchval("select count(*) from tx") == 0
        async with conn.transaction():
            await conn.execute("insert into tx values (2)")
        assert await conn.fetchval("select count(*) from tx") == 1
        report(step, "rollback=0 commit=1")

        step = "copy_in"
        data = "".join(f"{i}\t{PAYLOAD}\n" for i in range(ROWS)).encode()
        await conn.execute("create temp table big (id int, payload text)")
        status = await conn.copy_to_table("big", source=io.BytesIO(data))
        assert status == f"COPY {ROWS}", status
        assert await conn.fetchval("select count(*) from big") == ROWS
        report(step, f"rows={ROWS} bytes={len(data)}")

        step = "copy_out"
        out = io.BytesIO()
        status = await conn.copy_from_table("big", output=out)
        got = out.getvalue()
        assert status == f"COPY {ROWS}", status
        assert got == data, (len(got), len(data))
        report(step, f"rows={got.count(NL)} bytes={len(got)}")

        step = "error"
        try:
            await conn.fetchval("select 1/0")
        except asyncpg.PostgresError as e:
            code = e.sqlstate
        else:
            raise AssertionError("select 1/0 succeeded")
        assert code == "22012", code
        assert await conn.fetchval("select 2") == 2
        report(step, f"sqlstate={code} then=2")

        step = "cancel"
        # asyncpg cancels a query whose task is cancelled (here by the timeout) with a
        # CancelRequest on a new connection, then waits for the server's answer to the
        # query (57014, which it consumes) before the connection is usable again. The
        # 57014 itself is checked in the server log by the test.
        start = time.monotonic()
        try:
            await conn.fetchval("select pg_sleep(30)", timeout=CANCEL_AFTER)
        except asyncio.TimeoutError:
            pass
        else:
            raise AssertionError("pg_sleep(30) returned")
        assert await conn.fetchval("select 3") == 3
        took = time.monotonic() - start
        assert took < CANCEL_AFTER + CANCEL_WITHIN, f"cancel took {took:.2f}s"
        report(step, f"timeout-cancelled seconds={took:.2f}")

        step = "close"
        await asyncio.wait_for(conn.close(), 10)
        assert conn.is_closed()
        report(step)
    except Exception as e:  # noqa: BLE001 - report any failure as the step's
        print(f"FAIL {step}: {type(e).__name__}: {e}".rstrip(), flush=True)
        sys.exit(1)


async def bench(n):
    for _ in range(n):
        t0 = time.perf_counter()
        conn = await asyncpg.connect(host=HOST)
        assert await conn.fetchval("select 1") == 1
        t1 = time.perf_counter()
        await conn.close()
        t2 = time.perf_counter()
        print(f"bench connect_ms={(t2 - t0) * 1e3:.3f} close_ms={(t2 - t1) * 1e3:.3f}", flush=True)


if os.environ.get("CLIENT_BENCH"):
    asyncio.run(bench(int(os.environ["CLIENT_BENCH"])))
else:
    asyncio.run(workload())
