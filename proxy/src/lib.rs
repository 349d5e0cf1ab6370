//! SPACE, the edge proxy of a containerized EHR: listeners and the request path on Pingora,
//! the admin endpoint, live reload, and the `space` command line.
//!
//! The request path is [`service::SpaceProxy`]; [`server::run`] assembles a process from a
//! validated configuration.

pub mod admin;
mod affinity;
pub mod cli;
pub mod cookies;
pub mod demo;
mod h1;
pub mod headers;
pub mod health;
mod listening;
pub mod metrics;
pub mod module_cmd;
pub mod path;
pub mod reload;
pub mod server;
pub mod service;
pub mod shutdown;
