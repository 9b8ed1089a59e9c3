"""PyMySQL (pure Python): the mysql connector's real-client workload (tests/tests/mysql.rs).

Environment: MYSQL_HOST, MYSQL_PORT, MYSQL_USER, MYSQL_PASSWORD, MYSQL_DATABASE; under
the broker the user and password are dummies. Prints one `ok <step> ...` line per step
and exits non-zero with a `FAIL <step>: ...` line on the first failure.

Steps: a parameterized query (PyMySQL interpolates parameters on the client: it has no
server-side prepared statements), a transaction rolled back then committed,
multi-statement results, 50 MiB in with `LOAD DATA LOCAL INFILE` and back out with a
`SELECT` (byte for byte), `KILL QUERY` from a second connection ending a running
`SELECT SLEEP(30)`, and last the connection id the client was told in the handshake
against the one the server reports (what `KILL QUERY` tools use); then every packet
written one byte per send, with a COM_CHANGE_USER among them (refused by the broker).
"""

import hashlib
import os
import sys
import tempfile
import threading
import time

import pymysql
import pymysql.cursors
from pymysql.constants import CLIENT

ROWS = 50 * 1024  # lines of 1 KiB: 50 MiB
WIDTH = 1024


def report(name, detail=""):
    print(f"ok {name} {detail}".rstrip(), flush=True)


def connect(**kw):
    return pymysql.connect(
        host=os.environ["MYSQL_HOST"],
        port=int(os.environ.get("MYSQL_PORT", "3306")),
        user=os.environ["MYSQL_USER"],
        password=os.environ.get("MYSQL_PASSWORD", ""),
        database=os.environ.get("MYSQL_DATABASE"),
        connect_timeout=10,
        read_timeout=120,
        write_timeout=120,
        local_infile=True,
        client_flag=CLIENT.MULTI_STATEMENTS,
        **kw,
    )


def line(i):
    # id TAB payload NL, WIDTH bytes in all.
    head = f"{i}\t"
    body = (f"{i:08x}" * (WIDTH // 8))[: WIDTH - len(head) - 1]
    return f"{head}{body}\n"


def one(cur, sql, args=None):
    cur.execute(sql, args)
    return cur.fetchone()


def workload():
    step = "connect"
    try:
        conn = connect()
        cur = conn.cursor()
        user, server_id = one(cur, "select current_user(), connection_id()")
        report(step, f"user={user}")

        step = "parameterized"
        got = one(cur, "select %s * 2, %s, %s", (21, "it's", None))
        assert got == (42, "it's", None), got
        report(step, "results=42,it's,NULL")

        step = "transaction"
        cur.execute("drop table if exists tx")
        cur.execute("create table tx (n int) engine=InnoDB")
        conn.begin()
        cur.execute("insert into tx values (1)")
        conn.rollback()
        assert one(cur, "select count(*) from tx") == (0,)
        conn.begin()
        cur.execute("insert into tx values (2)")
        conn.commit()
        assert one(cur, "select count(*) from tx") == (1,)
        report(step, "rollback=0 commit=1")

        step = "multi_statement"
        cur.execute("select 1; select 'two'; update tx set n = n + 1; select n from tx")
        results = [cur.fetchall()]
        while cur.nextset():
            results.append(cur.fetchall())
        assert results == [((1,),), (("two",),), (), ((3,),)], results
        report(step, f"results={len(results)}")

        step = "load_data_local"
        digest = hashlib.sha256()
        with tempfile.NamedTemporaryFile("w", suffix=".tsv", delete=False) as f:
            path = f.name
            for i in range(ROWS):
                text = line(i)
                digest.update(text.encode())
                f.write(text)
        size = os.path.getsize(path)
        cur.execute("drop table if exists big")
        cur.execute("create table big (id int primary key, v varchar(1100)) engine=InnoDB")
        start = time.monotonic()
        n = cur.execute(
            f"load data local infile '{path}' into table big "
            "fields terminated by '\\t' lines terminated by '\\n'"
        )
        conn.commit()
        took = time.monotonic() - start
        os.unlink(path)
        assert n == ROWS, n
        report(step, f"rows={n} bytes={size} seconds={took:.1f}")

        step = "select_big"
        start = time.monotonic()
        back = hashlib.sha256()
        count = 0
        big = conn.cursor(pymysql.cursors.SSCursor)
        big.execute("select id, v from big order by id")
        for row_id, v in big:
            back.update(f"{row_id}\t{v}\n".encode())
            count += 1
        big.close()
        took = time.monotonic() - start
        assert count == ROWS, count
        assert back.hexdigest() == digest.hexdigest(), "the rows differ from the file"
        report(step, f"rows={count} bytes={size} seconds={took:.1f} sha256=same")

        step = "kill_query"
        victim = connect()
        vcur = victim.cursor()
        (victim_id,) = one(vcur, "select connection_id()")
        outcome = {}

        def sleeper():
            start = time.monotonic()
            try:
                vcur.execute("select sleep(30)")
                outcome["result"] = f"value={vcur.fetchone()[0]}"
            except pymysql.err.MySQLError as e:
                outcome["result"] = f"error={e.args[0]}"
            outcome["elapsed"] = time.monotonic() - start

        t = threading.Thread(target=sleeper)
        t.start()
        time.sleep(1.0)
        killer = connect()
        kcur = killer.cursor()
        kcur.execute(f"kill query {int(victim_id)}")
        killer.close()
        t.join(40)
        elapsed = outcome.get("elapsed", 99.0)
        # MariaDB ends the statement with 1317 (query interrupted), MySQL makes
        # SLEEP() return 1.
        assert outcome.get("result") in ("error=1317", "value=1"), outcome
        assert elapsed < 5.0, outcome
        assert one(vcur, "select 'still here'") == ("still here",)
        victim.close()
        report(step, f"{outcome['result']} seconds={elapsed:.1f}")

        step = "thread_id"
        told = conn.thread_id()
        assert told == server_id, f"handshake said {told}, the server says {server_id}"
        report(step, f"id={told}")

        # Every packet written one byte per send (TCP_NODELAY: one segment each): the
        # broker frames them all the same, and a COM_CHANGE_USER written so is refused
        # (ER_NOT_SUPPORTED_YET), never passed to the server.
        step = "split_writes"
        # A new session: spliced from its start, the kernel frames the bytes.
        conn2 = connect()
        # A reply that does not come fails the step in seconds.
        conn2._read_timeout = 8
        cur2 = conn2.cursor()
        real = conn2._sock

        class Dribble:
            def __init__(self, sock):
                self.sock = sock

            def sendall(self, data):
                for i in range(len(data)):
                    self.sock.send(data[i : i + 1])

            def __getattr__(self, name):
                return getattr(self.sock, name)

        conn2._sock = Dribble(real)
        assert one(cur2, "select 'dribbled', 6 * 7") == ("dribbled", 42)
        payload = b"\x11someone-else\x00\x00" + os.environ["MYSQL_DATABASE"].encode() + b"\x00"
        conn2._write_bytes(len(payload).to_bytes(3, "little") + b"\x00" + payload)
        conn2._next_seq_id = 1
        try:
            conn2._read_packet()
            raise AssertionError("COM_CHANGE_USER was not refused")
        except pymysql.err.MySQLError as e:
            assert e.args[0] == 1235, e.args
            refused = e.args[0]
        assert one(cur2, "select 'after', 7 * 6") == ("after", 42)
        conn2._sock = real
        user = one(cur2, "select current_user()")[0]
        conn2.close()
        report(step, f"refused={refused} then user={user}")

        cur.execute("drop table big")
        conn.close()
    except Exception as e:  # noqa: BLE001 - report any failure of the step
        print(f"FAIL {step}: {type(e).__name__}: {e}", flush=True)
        sys.exit(1)


if __name__ == "__main__":
    workload()
