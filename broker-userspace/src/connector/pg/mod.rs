//! PostgreSQL connector (stub; see issue 3).
use tokio::net::TcpStream;

use crate::{
    broker::Broker,
    connector::{Conn, ConnError},
};

/// State shared between PostgreSQL connections.
#[derive(Debug, Default)]
pub struct PgShared {}

/// Serve one client connection.
///
/// # Errors
/// Always, for now.
pub async fn serve(
    _broker: &Broker,
    _conn: &mut Conn,
    _client: TcpStream,
) -> Result<(), ConnError> {
    Err(ConnError::Config("pg connector not built".into()))
}
