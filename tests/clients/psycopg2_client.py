"""psycopg2 (libpq): the client-matrix workload. See tests/src/clients.rs.

libpq reads PGHOST, PGPORT, PGUSER, PGPASSWORD, PGDATABASE, PGSSLMODE, PGSSLROOTCERT
and PGCHANNELBINDING itself, so the connection string is empty.
"""

import io
import os
import sys
import threading
import time

import psycopg2
import psycopg2.extensions

ROWS = 100_000  # about 10.7 MB of COPY text
PAYLOAD = "x" * 100
NL = b"\n"
CANCEL_AFTER = 1.0
CANCEL_WITHIN = 10.0


def step(name):
    def wrap(f):
        def run(*a):
            try:
                res = f(*a)
            except Exception as e:  # noqa: BLE001 - report any failure as the step's
                print(f"FAIL {name}: {type(e).__name__}: {e}".rstrip(), flush=True)
                sys.exit(1)
            value, detail = res if isinstance(res, tuple) else (None, res)
            print(f"ok {name} {detail or ''}".rstrip(), flush=True)
            return value

        return run

    return wrap


def copy_text():
    return "".join(f"{i}\t{PAYLOAD}\n" for i in range(ROWS)).encode()


def scalar(cur, sql, args=None):
    cur.execute(sql, args)
    return cur.fetchone()[0]


@step("connect")
def connect():
    conn = psycopg2.connect("")
    conn.autocommit = True
    cur = conn.cursor()
    return conn, f"user={scalar(cur, 'select current_user')}"


@step("prepared")
def prepared(cur):
    # psycopg2 has no protocol-level prepare: SQL PREPARE/EXECUTE, as its users do.
    cur.execute("prepare twice(int) as select $1 * 2")
    got = [scalar(cur, "execute twice(%s)", (n,)) for n in (21, 50)]
    assert got == [42, 100], got
    cur.execute("deallocate twice")
    return "results=42,100"


@step("transaction")
def transaction(cur):
    cur.execute("create temp table tx (n int)")
    cur.execute("begin")
    cur.execute("insert into tx values (1)")
    cur.execute("rollback")
    assert scalar(cur, "select count(*) from tx") == 0
    cur.execute("begin")
    cur.execute("insert into tx values (2)")
    cur.execute("commit")
    assert scalar(cur, "select count(*) from tx") == 1
    return "rollback=0 commit=1"


@step("copy_in")
def copy_in(cur, data):
    cur.execute("create temp table big (id int, payload text)")
    cur.copy_expert("copy big from stdin", io.BytesIO(data))
    rows = cur.rowcount
    assert rows == ROWS, rows
    assert scalar(cur, "select count(*) from big") == ROWS
    return f"rows={rows} bytes={len(data)}"


@step("copy_out")
def copy_out(cur, data):
    out = io.BytesIO()
    cur.copy_expert("copy (select * from big order by id) to stdout", out)
    got = out.getvalue()
    assert len(got) == len(data), (len(got), len(data))
    assert got == data
    return f"rows={got.count(NL)} bytes={len(got)}"


@step("error")
def error(cur):
    try:
        cur.execute("select 1/0")
    except psycopg2.Error as e:
        code = e.pgcode
    else:
        raise AssertionError("select 1/0 succeeded")
    assert code == "22012", code
    assert scalar(cur, "select 2") == 2
    return f"sqlstate={code} then=2"


@step("cancel")
def cancel(conn, cur):
    timer = threading.Timer(CANCEL_AFTER, conn.cancel)
    timer.start()
    start = time.monotonic()
    code = None
    try:
        cur.execute("select pg_sleep(30)")
    except psycopg2.Error as e:
        code = e.pgcode
    finally:
        timer.cancel()
    took = time.monotonic() - start
    assert code == "57014", f"sqlstate {code} after {took:.2f}s"
    assert took < CANCEL_AFTER + CANCEL_WITHIN, f"cancel took {took:.2f}s"
    assert scalar(cur, "select 3") == 3
    return f"sqlstate={code} seconds={took:.2f}"


@step("close")
def close(conn):
    conn.close()
    assert conn.closed


def bench(n):
    for _ in range(n):
        t0 = time.perf_counter()
        conn = psycopg2.connect("")
        conn.autocommit = True
        cur = conn.cursor()
        assert scalar(cur, "select 1") == 1
        t1 = time.perf_counter()
        conn.close()
        t2 = time.perf_counter()
        print(f"bench connect_ms={(t2 - t0) * 1e3:.3f} close_ms={(t2 - t1) * 1e3:.3f}", flush=True)


def main():
    if os.environ.get("CLIENT_BENCH"):
        bench(int(os.environ["CLIENT_BENCH"]))
        return
    conn = connect()
    cur = conn.cursor()
    prepared(cur)
    transaction(cur)
    data = copy_text()
    copy_in(cur, data)
    copy_out(cur, data)
    error(cur)
    cancel(conn, cur)
    close(conn)


main()
