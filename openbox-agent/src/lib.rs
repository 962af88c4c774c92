//! openbox-agent as a library: the capture pipeline from kernel records to what a user
//! sees. The binary (`main.rs`) is its command line.
//!
//! The data's path, top to bottom: [`capture`] (load, attach, read the ring buffer) →
//! [`conn`] (descriptor tables, streams, TLS linking) → [`protocol`] (parsers) →
//! [`span`] (SDK-compatible spans) → sinks ([`trace`]'s printer, [`daemon`]'s
//! attribution and [`governance`], [`export`] over OTLP). [`pipeline`] drives those stages.

pub mod bounded;
pub mod capture;
pub mod check;
pub mod config;
pub mod conn;
pub mod daemon;
pub mod export;
pub mod governance;
pub mod logging;
pub mod pipeline;
pub mod preflight;
pub mod procfs;
pub mod protocol;
pub mod redact;
pub mod span;
pub mod trace;
pub mod workload;
