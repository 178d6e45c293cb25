//! DNS-aware enforcement, its pure core (issue 14): which names a scope learns addresses for
//! (Istio's host matching), and what a DNS answer teaches. The path that carries workloads'
//! answers to it (a proxy, kernel hooks) is not built yet.

pub mod answer;
pub mod host;
pub mod learn;
