#!/usr/bin/env bash
# psql (libpq): the client-matrix workload. See tests/src/clients.rs.
#
# libpq reads PGHOST, PGPORT, PGUSER, PGPASSWORD, PGDATABASE, PGSSLMODE, PGSSLROOTCERT
# and PGCHANNELBINDING itself. psql runs one statement list per invocation, so the
# steps use several sessions; the COPY table is a regular one, dropped at the end.
set -u

ROWS=100000 # about 10.7 MB of COPY text
CANCEL_WITHIN=10
work=$(mktemp -d)
table="psql_big_$$"
trap 'rm -rf "$work"' EXIT

fail() {
    echo "FAIL $1: $2"
    exit 1
}

# psql, never prompting, unaligned, tuples only; stops at the first error.
q() {
    psql -X -w -A -t -v ON_ERROR_STOP=1 "$@"
}

ms() {
    echo $(($(date +%s%N) / 1000000))
}

if [ -n "${CLIENT_BENCH:-}" ]; then
    # One process per connection, as psql is used: connect + SELECT 1 + close, with
    # the process start (close cannot be timed apart).
    for _ in $(seq "$CLIENT_BENCH"); do
        t0=$(date +%s%N)
        [ "$(q -c 'select 1' 2>&1)" = 1 ] || fail bench "select 1"
        t1=$(date +%s%N)
        d=$((t1 - t0))
        echo "bench connect_ms=$((d / 1000000)).$(printf %03d $((d / 1000 % 1000)))"
    done
    exit 0
fi

out=$(q -c "select current_user" 2>&1) || fail connect "$out"
echo "ok connect user=$out"

out=$(q -q 2>&1 <<'SQL'
prepare twice(int) as select $1 * 2;
execute twice(21);
execute twice(50);
SQL
) || fail prepared "$out"
[ "$(echo $out)" = "42 100" ] || fail prepared "got: $out"
echo "ok prepared results=42,100"

out=$(q -q 2>&1 <<'SQL'
create temp table tx (n int);
begin;
insert into tx values (1);
rollback;
select count(*) from tx;
begin;
insert into tx values (2);
commit;
select count(*) from tx;
SQL
) || fail transaction "$out"
[ "$(echo $out)" = "0 1" ] || fail transaction "got: $out"
echo "ok transaction rollback=0 commit=1"

awk -v n="$ROWS" 'BEGIN { p = sprintf("%100s", ""); gsub(/ /, "x", p); for (i = 0; i < n; i++) printf "%d\t%s\n", i, p }' >"$work/in"
bytes=$(wc -c <"$work/in")
out=$(q -c "create unlogged table $table (id int, payload text)" 2>&1) || fail copy_in "$out"
out=$(q -c "copy $table from stdin" <"$work/in" 2>&1) || fail copy_in "$out"
[ "$out" = "COPY $ROWS" ] || fail copy_in "got: $out"
out=$(q -c "select count(*) from $table" 2>&1) || fail copy_in "$out"
[ "$out" = "$ROWS" ] || fail copy_in "count: $out"
echo "ok copy_in rows=$ROWS bytes=$bytes"

q -c "copy (select * from $table order by id) to stdout" >"$work/out" 2>"$work/err" || fail copy_out "$(cat "$work/err")"
cmp -s "$work/in" "$work/out" || fail copy_out "copied out $(wc -c <"$work/out") bytes, $bytes in"
echo "ok copy_out rows=$(wc -l <"$work/out") bytes=$(wc -c <"$work/out")"
q -c "drop table $table" >/dev/null 2>&1

# Without ON_ERROR_STOP psql runs the next -c in the same session after the error.
out=$(psql -X -w -A -t -v VERBOSITY=verbose -c "select 1/0" -c "select 2" 2>&1)
case "$out" in
*"ERROR:  22012:"*) ;;
*) fail error "no 22012: $out" ;;
esac
[ "$(echo "$out" | tail -n 1)" = 2 ] || fail error "session not usable: $out"
echo "ok error sqlstate=22012 then=2"

# SIGINT makes psql send a CancelRequest for the running query (what Ctrl-C does),
# sent once the query runs (seen in pg_stat_activity from another session). A
# non-interactive psql then stops, so "still usable" is a new session here.
timeout --kill-after=5 60 psql -X -w -A -t -v VERBOSITY=verbose \
    -c "select pg_sleep(30) -- cancel me" >"$work/cancel" 2>&1 &
pid=$!
running=0
for _ in $(seq 100); do
    running=$(q -c "select count(*) from pg_stat_activity where state = 'active' and query like 'select pg_sleep(30) -- cancel me%'" 2>&1)
    [ "$running" = 1 ] && break
    sleep 0.1
done
[ "$running" = 1 ] || fail cancel "the query did not start: $running"
t0=$(ms)
kill -INT "$(pgrep -P "$pid" -x psql)" 2>/dev/null || kill -INT "$pid"
wait "$pid"
took_ms=$(($(ms) - t0))
took=$((took_ms / 1000)).$(printf %02d $((took_ms % 1000 / 10)))
out=$(cat "$work/cancel")
case "$out" in
*"ERROR:  57014:"*) ;;
*) fail cancel "no 57014 after ${took}s: $out" ;;
esac
[ "$took_ms" -lt $((CANCEL_WITHIN * 1000)) ] || fail cancel "took ${took}s"
out=$(q -c "select 3" 2>&1)
[ "$out" = 3 ] || fail cancel "no new session after the cancel: $out"
echo "ok cancel sqlstate=57014 seconds=$took"

echo "ok close"
