//! seedsweep's coordinator: holds sweeps of seeds in a database and leases them to workers.
//!
//! - [`spec`] parses and validates sweep files ([`finetune`]: the `finetune-head` task's part);
//! - [`store`] is the only code that talks SQL (SQLite and PostgreSQL);
//! - [`service`] is the gRPC service, converting proto messages to [`domain`] types;
//! - [`server`] is the start-up seam, with [`auth`] (tokens and roles) and [`metrics`];
//! - [`admin`] holds the command-line clients.

pub mod admin;
pub mod auth;
pub mod config;
pub mod domain;
pub mod export;
pub mod finetune;
pub mod metrics;
pub mod report;
pub mod server;
pub mod service;
pub mod spec;
pub mod stats;
pub mod store;
