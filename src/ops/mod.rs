//! Operations: configs, INFO and counters, errors, logs.

pub mod configs;
pub mod errors;
pub mod info;
pub mod log;
pub mod metrics;
