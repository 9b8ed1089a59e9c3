//! A second, unrelated client implementation (tokio-postgres: pure Rust, no libpq)
//! through the PostgreSQL connector: prepared statements, COPY in and out of 100 MB,
//! LISTEN/NOTIFY. Uses a `listenOn` service (`--no-ebpf`): the connector code path is
//! the same as for intercepted connections, and the test process itself is the client.

use std::time::Duration;

use broker_tests::{
    Daemon, assert_no_secret, free_port,
    pg::{PgAuth, PgOptions, PgServer},
    privileged,
};
use futures_util::{SinkExt as _, StreamExt as _};
use tokio_postgres::{AsyncMessage, NoTls};

const MB: usize = 1024 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokio_postgres_prepared_copy_100mb_listen_notify() {
    if !privileged() {
        return;
    }
    let pw = "driver-pw-8f2a4c6e0b";
    let pg = PgServer::start(PgOptions::new(PgAuth::Scram, pw));
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("pw"), pw).expect("write pw");
    let (listen, health) = (free_port(), free_port());
    let cfg = dir.path().join("broker.yaml");
    std::fs::write(
        &cfg,
        format!(
            "version: 2\nbroker:\n  health: 127.0.0.1:{health}\nservices:\n  db:\n    connector: pg\n    listenOn: tcp://127.0.0.1:{listen}\n    credentials:\n      host: 127.0.0.1\n      port: \"{}\"\n      sslmode: disable\n      username: app_user\n      password: {{from: file, get: {}}}\n",
            pg.addr().port(),
            dir.path().join("pw").display()
        ),
    )
    .expect("write config");
    let daemon = Daemon::start(
        &cfg,
        &["--no-ebpf"],
        format!("127.0.0.1:{health}").parse().unwrap(),
        &dir.path().join("broker.log"),
    );
    let dsn = format!("host=127.0.0.1 port={listen} user=anything dbname=app");

    // Connection 1: its notifications go to a channel.
    let (client, mut connection) = tokio_postgres::connect(&dsn, NoTls)
        .await
        .expect("connect 1");
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(Ok(m)) = messages.next().await {
            if let AsyncMessage::Notification(n) = m {
                let _ = tx.send((n.channel().to_owned(), n.payload().to_owned()));
            }
        }
    });

    // Prepared statements, reused.
    let stmt = client
        .prepare("select $1::int4 + $2::int4, current_user::text")
        .await
        .expect("prepare");
    for i in 0..50i32 {
        let row = client
            .query_one(&stmt, &[&i, &2i32])
            .await
            .expect("execute prepared");
        assert_eq!(row.get::<_, i32>(0), i + 2);
        assert_eq!(row.get::<_, String>(1), "app_user");
    }

    // COPY in 100 MB, then COPY it back out.
    client
        .batch_execute("create unlogged table big (id int, payload text)")
        .await
        .expect("create table");
    let payload = "x".repeat(1000);
    let rows_per_chunk = 1000;
    let chunks = 100 * MB / (rows_per_chunk * 1000) + 1;
    let sink = client
        .copy_in("copy big from stdin")
        .await
        .expect("copy in");
    futures_util::pin_mut!(sink);
    let mut sent = 0usize;
    for c in 0..chunks {
        let mut buf = String::with_capacity(rows_per_chunk * 1010);
        for r in 0..rows_per_chunk {
            buf.push_str(&format!("{}\t{payload}\n", c * rows_per_chunk + r));
        }
        sent += buf.len();
        sink.send(bytes::Bytes::from(buf))
            .await
            .expect("copy chunk");
    }
    let rows = sink.finish().await.expect("finish copy in");
    assert_eq!(rows as usize, chunks * rows_per_chunk);
    assert!(sent >= 100 * MB, "sent {sent} bytes");
    let stream = client
        .copy_out("copy big to stdout")
        .await
        .expect("copy out");
    futures_util::pin_mut!(stream);
    let mut got = 0usize;
    while let Some(chunk) = stream.next().await {
        got += chunk.expect("copy out chunk").len();
    }
    assert_eq!(got, sent, "COPY out returns every byte");

    // LISTEN on connection 1, NOTIFY from connection 2.
    client
        .batch_execute("listen broker_test")
        .await
        .expect("listen");
    let (client2, connection2) = tokio_postgres::connect(&dsn, NoTls)
        .await
        .expect("connect 2");
    tokio::spawn(connection2);
    client2
        .batch_execute("notify broker_test, 'hello through the broker'")
        .await
        .expect("notify");
    let (chan, payload) = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("notification within 10 s")
        .expect("channel open");
    assert_eq!(chan, "broker_test");
    assert_eq!(payload, "hello through the broker");

    drop(client);
    drop(client2);
    assert_no_secret(&daemon.log_text(), &[pw], "broker log");
}
