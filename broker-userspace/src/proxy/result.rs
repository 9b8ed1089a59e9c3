//! One result record per brokered connection: created when the connection is accepted,
//! filled in by the core and the connector, written as the access-log line when it is
//! dropped. Written from `Drop`, so a connection that ends in a panic, an abort at the
//! drain deadline or any early return still has exactly one line (result `aborted` when
//! it never finished). Metrics and audit will read the same record.
//!
//! Field names are dotted and stable: `service`, `connector`, `src.addr`, `dst.addr`,
//! `dst.host`, `upstream.addr`, `caller.{pid,uid,gid,cgroup,cgroup_path,comm,exe,thread}`
//! (`caller.cgroup` is the id), `request`, `credentials`, `result`, `error`,
//! `error.kind`, `bytes.up`, `bytes.down`, `spliced`, `splice.fallback`, `duration_ms`.
//! Never a credential value. The same drop counts the connection in the service's
//! metrics (`ConnStats::metrics`), before the line is written. A client that closed before asking for anything
//! (`result=client_closed`) is logged at debug.

use std::time::Instant;

use crate::connector::{Conn, ConnError};

/// A connection's record; its line is written when it drops.
#[derive(Debug)]
pub struct ConnResult {
    started: Instant,
    pub conn: Conn,
    /// `None` until the connection finished.
    outcome: Option<Result<(), ConnError>>,
}

impl ConnResult {
    #[must_use]
    pub fn new(conn: Conn) -> Self {
        Self {
            started: Instant::now(),
            conn,
            outcome: None,
        }
    }

    /// How the connection ended.
    pub fn finish(&mut self, outcome: Result<(), ConnError>) {
        self.outcome = Some(outcome);
    }
}

/// The access line at `$level`; one place for the field list.
macro_rules! access_line {
    ($level:expr, $conn:expr, $c:expr, $result:expr, $error:expr, $kind:expr, $ms:expr) => {
        tracing::event!(
            target: "access",
            $level,
            service = %$conn.service.name,
            connector = $conn.service.connector.name(),
            request = $conn.stats.request,
            src.addr = %$conn.client_addr,
            dst.addr = $conn.orig_dst.map(|d| d.to_string()),
            dst.host = $conn.orig_host.as_deref(),
            upstream.addr = $conn.stats.upstream.as_deref(),
            caller.pid = $c.map(|c| c.pid),
            caller.uid = $c.map(|c| c.uid),
            caller.gid = $c.map(|c| c.gid),
            caller.cgroup = $c.map(|c| c.cgroup_id),
            caller.cgroup_path = $c.and_then(|c| c.cgroup.as_deref()).map(|p| p.display()).map(tracing::field::display),
            caller.comm = $c.map(|c| c.comm.as_str()),
            caller.exe = $c.and_then(|c| c.exe.as_deref()).map(|p| p.display()).map(tracing::field::display),
            caller.thread = $c.map(|c| c.thread.as_str()),
            credentials = %$conn.stats.fetched.join(","),
            result = $result,
            error = %$error,
            error.kind = $kind,
            bytes.up = $conn.stats.bytes_up,
            bytes.down = $conn.stats.bytes_down,
            spliced = $conn.stats.spliced,
            client.tls = $conn.stats.client_tls,
            splice.fallback = $conn.stats.splice_fallback,
            duration_ms = $ms,
            "connection"
        )
    };
}

impl Drop for ConnResult {
    fn drop(&mut self) {
        let (result, error, kind) = match &self.outcome {
            None => ("aborted", String::new(), None),
            Some(Ok(())) => ("ok", String::new(), None),
            Some(Err(e)) => (e.kind(), e.to_string(), e.detail()),
        };
        let conn = &self.conn;
        // Counted before the line is written: whoever reads the line sees the count.
        if let Some(m) = &conn.stats.metrics {
            m.closed(&crate::metrics::Finished {
                result,
                bytes_up: conn.stats.bytes_up,
                bytes_down: conn.stats.bytes_down,
                spliced: conn.stats.spliced,
                fallback: conn.stats.splice_fallback,
            });
        }
        let c = conn.caller.as_ref();
        let ms = self.started.elapsed().as_millis() as u64;
        // A client that left before asking for anything (a driver's probe, a client
        // that wanted TLS the service does not offer) is routine: debug.
        if matches!(self.outcome, Some(Err(ConnError::ClientGone(_)))) {
            access_line!(tracing::Level::DEBUG, conn, c, result, error, kind, ms);
        } else {
            access_line!(tracing::Level::INFO, conn, c, result, error, kind, ms);
        }
    }
}
