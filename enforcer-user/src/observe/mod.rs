//! What operators see of the agent: Prometheus metrics (`metrics.rs`, the kernel's counters
//! read at each scrape in `kernel.rs`), and `/metrics` (OpenMetrics, or classic text from
//! `text.rs`), `/healthz`, `/readyz` over HTTP (`server.rs`).

mod admission;
pub mod audit;
pub mod control;
pub mod explain_live;
pub mod filter;
pub mod hub;
mod kernel;
pub mod metrics;
pub mod output;
pub mod records;
pub mod server;
pub mod status;
mod text;
pub mod workload;

pub use metrics::Metrics;
pub use server::Health;
