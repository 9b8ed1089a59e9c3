//! Real PostgreSQL servers for tests (owned by the PostgreSQL connector work).
