"""MySQL Connector/Python: server-side prepared statements (tests/tests/mysql.rs).

Environment as for mysql_pymysql.py; MYSQL_USE_PURE=1 chooses the pure-Python
implementation instead of the C extension (bundled libmysqlclient, whose first answer
is always `caching_sha2_password`). Prints `ok <step> ...` per step, `FAIL <step>: ...`
and a non-zero exit on the first failure.

Steps: connect, a prepared statement (COM_STMT_PREPARE, then COM_STMT_EXECUTE twice
with binary parameters), a transaction rolled back then committed, COM_CHANGE_USER
(refused by the broker with 1235; the session goes on as the brokered user).
"""

import os
import sys

import mysql.connector


def report(name, detail=""):
    print(f"ok {name} {detail}".rstrip(), flush=True)


def workload():
    step = "connect"
    try:
        pure = os.environ.get("MYSQL_USE_PURE") == "1"
        conn = mysql.connector.connect(
            host=os.environ["MYSQL_HOST"],
            port=int(os.environ.get("MYSQL_PORT", "3306")),
            user=os.environ["MYSQL_USER"],
            password=os.environ.get("MYSQL_PASSWORD", ""),
            database=os.environ.get("MYSQL_DATABASE"),
            connection_timeout=10,
            autocommit=True,
            use_pure=pure,
            ssl_disabled=os.environ.get("MYSQL_SSL") != "1",
        )
        cur = conn.cursor()
        cur.execute("select current_user()")
        report(step, f"user={cur.fetchone()[0]} pure={pure}")

        step = "prepared"
        ps = conn.cursor(prepared=True)
        got = []
        for n, s in ((21, "a"), (50, "it's")):
            ps.execute("select ? * 2, concat(?, '!')", (n, s))
            got.append(tuple(ps.fetchone()))
        assert got == [(42, "a!"), (100, "it's!")], got
        ps.close()
        report(step, "server-side results=42,100")

        step = "transaction"
        cur.execute("drop table if exists tx_connector")
        cur.execute("create table tx_connector (n int) engine=InnoDB")
        conn.start_transaction()
        cur.execute("insert into tx_connector values (1)")
        conn.rollback()
        cur.execute("select count(*) from tx_connector")
        assert cur.fetchone()[0] == 0
        conn.start_transaction()
        cur.execute("insert into tx_connector values (2)")
        conn.commit()
        cur.execute("select count(*) from tx_connector")
        assert cur.fetchone()[0] == 1
        cur.execute("drop table tx_connector")
        report(step, "rollback=0 commit=1")

        # COM_CHANGE_USER with the app's credentials: the broker refuses it with an
        # error naming the service; the session stays the brokered user's.
        step = "change_user"
        try:
            conn.cmd_change_user(
                username="someone-else",
                password=os.environ.get("MYSQL_PASSWORD", ""),
                database=os.environ.get("MYSQL_DATABASE"),
            )
            raise AssertionError("COM_CHANGE_USER was not refused")
        except mysql.connector.Error as e:
            assert e.errno == 1235, (e.errno, e.msg)
            assert "COM_CHANGE_USER" in e.msg and "service `" in e.msg, e.msg
            refused = e.errno
        cur = conn.cursor()
        cur.execute("select current_user()")
        report(step, f"refused={refused} then user={cur.fetchone()[0]}")
        conn.close()
    except Exception as e:  # noqa: BLE001 - report any failure of the step
        print(f"FAIL {step}: {type(e).__name__}: {e}", flush=True)
        sys.exit(1)


if __name__ == "__main__":
    workload()
