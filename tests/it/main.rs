//! One test binary for all integration tests (faster to link): the store conformance suite run
//! against SQLite and PostgreSQL, end-to-end sweeps through the real binaries, bad input, and
//! the dashboard in a real browser.

mod bad_input;
mod chaos;
mod command;
mod dashboard;
mod e2e;
mod finetune;
mod hostile;
mod programs_only;
mod protocol_model;
mod resilience;
mod security;
mod service;
mod statistics;
mod store_conformance;
mod training;

/// Tests that train spread over both cores each; running two at once only slows both down.
pub static HEAVY: std::sync::Mutex<()> = std::sync::Mutex::new(());

pub fn heavy() -> std::sync::MutexGuard<'static, ()> {
    HEAVY.lock().unwrap_or_else(|p| p.into_inner())
}
