// PostgreSQL JDBC (pgjdbc, Debian's libpostgresql-jdbc-java): the client-matrix
// workload. See tests/src/clients.rs. Compiled by the test with javac, run with
// /usr/share/java/postgresql.jar on the class path.
//
// pgjdbc reads no libpq environment variables: they are mapped to its properties here
// (`sslmode`, `sslrootcert`, `channelBinding`). Without PGSSLMODE pgjdbc's own default
// applies (`prefer`).

import java.io.ByteArrayInputStream;
import java.io.ByteArrayOutputStream;
import java.nio.charset.StandardCharsets;
import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.PreparedStatement;
import java.sql.ResultSet;
import java.sql.SQLException;
import java.sql.Statement;
import java.util.Arrays;
import java.util.Properties;
import org.postgresql.PGConnection;
import org.postgresql.PGStatement;
import org.postgresql.copy.CopyManager;

public class Jdbc {
    static final int ROWS = 100_000; // about 10.7 MB of COPY text
    static final long CANCEL_AFTER_MS = 1000;
    static final long CANCEL_WITHIN_MS = 10000;

    static String env(String name, String dflt) {
        String v = System.getenv(name);
        return v == null || v.isEmpty() ? dflt : v;
    }

    static Connection connect() throws SQLException {
        String host = env("PGHOST", "localhost");
        if (host.contains(":")) {
            host = "[" + host + "]";
        }
        String url = "jdbc:postgresql://" + host + ":" + env("PGPORT", "5432") + "/"
                + env("PGDATABASE", env("PGUSER", ""));
        Properties p = new Properties();
        p.setProperty("user", env("PGUSER", ""));
        p.setProperty("password", env("PGPASSWORD", ""));
        p.setProperty("connectTimeout", "60");
        String[][] mapped = {
            {"PGSSLMODE", "sslmode"}, {"PGSSLROOTCERT", "sslrootcert"},
            {"PGCHANNELBINDING", "channelBinding"},
        };
        for (String[] m : mapped) {
            String v = System.getenv(m[0]);
            if (v != null && !v.isEmpty()) {
                p.setProperty(m[1], v);
            }
        }
        return DriverManager.getConnection(url, p);
    }

    static Object scalar(Connection c, String sql) throws SQLException {
        try (Statement s = c.createStatement(); ResultSet r = s.executeQuery(sql)) {
            r.next();
            return r.getObject(1);
        }
    }

    static void check(boolean cond, String what) {
        if (!cond) {
            throw new IllegalStateException("assertion failed: " + what);
        }
    }

    static void ok(String step, String detail) {
        System.out.println(("ok " + step + " " + detail).trim());
        System.out.flush();
    }

    static void workload() throws Exception {
        String step = "connect";
        try {
            Connection c = connect();
            ok(step, "user=" + scalar(c, "select current_user"));

            step = "prepared";
            try (PreparedStatement ps = c.prepareStatement("select ?::int * 2")) {
                // A named server-side statement from the first execution on.
                ps.unwrap(PGStatement.class).setPrepareThreshold(1);
                int[] got = new int[2];
                int[] in = {21, 50};
                for (int i = 0; i < 2; i++) {
                    ps.setInt(1, in[i]);
                    try (ResultSet r = ps.executeQuery()) {
                        r.next();
                        got[i] = r.getInt(1);
                    }
                }
                check(Arrays.equals(got, new int[] {42, 100}), Arrays.toString(got));
            }
            ok(step, "results=42,100");

            step = "transaction";
            try (Statement s = c.createStatement()) {
                s.execute("create temp table tx (n int)");
                c.setAutoCommit(false);
                s.execute("insert into tx values (1)");
                c.rollback();
                check(((Number) scalar(c, "select count(*) from tx")).intValue() == 0, "rollback");
                s.execute("insert into tx values (2)");
                c.commit();
                c.setAutoCommit(true);
                check(((Number) scalar(c, "select count(*) from tx")).intValue() == 1, "commit");
            }
            ok(step, "rollback=0 commit=1");

            step = "copy_in";
            StringBuilder sb = new StringBuilder(11 << 20);
            String payload = "x".repeat(100);
            for (int i = 0; i < ROWS; i++) {
                sb.append(i).append('\t').append(payload).append('\n');
            }
            byte[] data = sb.toString().getBytes(StandardCharsets.UTF_8);
            CopyManager copy = c.unwrap(PGConnection.class).getCopyAPI();
            try (Statement s = c.createStatement()) {
                s.execute("create temp table big (id int, payload text)");
            }
            long in = copy.copyIn("copy big from stdin", new ByteArrayInputStream(data));
            check(in == ROWS, "copied in " + in);
            check(((Number) scalar(c, "select count(*) from big")).intValue() == ROWS, "count");
            ok(step, "rows=" + in + " bytes=" + data.length);

            step = "copy_out";
            ByteArrayOutputStream out = new ByteArrayOutputStream(data.length);
            long outRows = copy.copyOut("copy (select * from big order by id) to stdout", out);
            byte[] back = out.toByteArray();
            check(outRows == ROWS, "copied out " + outRows);
            check(Arrays.equals(back, data), "copied out " + back.length + " bytes, " + data.length + " in");
            ok(step, "rows=" + outRows + " bytes=" + back.length);

            step = "error";
            String code = null;
            try {
                scalar(c, "select 1/0");
            } catch (SQLException e) {
                code = e.getSQLState();
            }
            check("22012".equals(code), "sqlstate " + code);
            check(((Number) scalar(c, "select 2")).intValue() == 2, "then");
            ok(step, "sqlstate=" + code + " then=2");

            step = "cancel";
            code = null;
            long start = System.nanoTime();
            try (Statement s = c.createStatement()) {
                Thread canceller = new Thread(() -> {
                    try {
                        Thread.sleep(CANCEL_AFTER_MS);
                        s.cancel();
                    } catch (Exception e) {
                        System.out.println("cancel thread: " + e);
                    }
                });
                canceller.start();
                try {
                    s.execute("select pg_sleep(30)");
                } catch (SQLException e) {
                    code = e.getSQLState();
                }
                canceller.join();
            }
            long tookMs = (System.nanoTime() - start) / 1_000_000;
            check("57014".equals(code), "sqlstate " + code + " after " + tookMs + " ms");
            check(tookMs < CANCEL_AFTER_MS + CANCEL_WITHIN_MS, "cancel took " + tookMs + " ms");
            check(((Number) scalar(c, "select 3")).intValue() == 3, "usable after cancel");
            ok(step, "sqlstate=" + code + String.format(" seconds=%.2f", tookMs / 1000.0));

            step = "close";
            c.close();
            check(c.isClosed(), "closed");
            ok(step, "");
        } catch (Exception e) {
            System.out.println("FAIL " + step + ": " + e);
            System.exit(1);
        }
    }

    static void bench(int n) throws Exception {
        for (int i = 0; i < n; i++) {
            long t0 = System.nanoTime();
            Connection c = connect();
            check(((Number) scalar(c, "select 1")).intValue() == 1, "select 1");
            long t1 = System.nanoTime();
            c.close();
            long t2 = System.nanoTime();
            System.out.printf("bench connect_ms=%.3f close_ms=%.3f%n", (t2 - t0) / 1e6, (t2 - t1) / 1e6);
        }
    }

    public static void main(String[] args) throws Exception {
        String n = System.getenv("CLIENT_BENCH");
        if (n != null && !n.isEmpty()) {
            bench(Integer.parseInt(n));
        } else {
            workload();
        }
    }
}
