//! DNS-aware enforcement (issue 14): which names a scope learns addresses for (Istio's host
//! matching), what a DNS answer teaches, and the proxy that learns from workloads' own
//! answers before releasing them (the kernel's side is `enforcer-ebpf`'s `dns.rs`).

pub mod answer;
pub mod host;
pub mod learn;
pub mod learner;
pub mod maps;
pub mod not_learned;
pub mod proxy;
