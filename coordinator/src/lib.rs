//! seedsweep's coordinator: holds sweeps of seeds in a database and leases them to workers.
//! What a sweep is, the lease rules and the statistics live in `seedsweep-core`; this crate is
//! the server around them.
//!
//! - [`store`] is the only code that talks SQL (SQLite and PostgreSQL);
//! - [`service`] is the gRPC service, converting proto messages to core's domain types;
//! - [`server`] is the start-up seam, with [`auth`] (tokens and roles) and [`metrics`];
//! - [`config`] serve's settings; [`fleet`] which programs the connected workers allow;
//!   [`lease_keys`] the check that a write under a lease comes from the worker granted it;
//! - [`dashboard`] the web pages; [`export`] results and epochs as CSV or Parquet (for
//!   `sweep export` and the dashboard's downloads).
//!
//! The command-line client (`coordinator sweep ...`) is part of the binary only (`src/cli`).

pub mod auth;
pub mod config;
pub mod dashboard;
pub mod export;
pub mod fleet;
pub mod lease_keys;
pub mod metrics;
pub mod server;
pub mod service;
pub mod store;
