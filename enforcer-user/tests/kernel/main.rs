//! Kernel tests: the real agent, the real BPF programs in this kernel, a real DNS server, and
//! test hosts in a network namespace. They need root; without it they fail and say why.

mod audit_kubernetes;
mod boundary;
mod boundary_tc;
mod escape;
mod events;
mod explain;
mod fake_node;
mod gateway;
mod gateway_kubernetes;
mod harness;
mod kubernetes;
mod learning;
mod learning_kubernetes;
mod learning_paths;
mod live;
mod metrics;
mod metrics_kubernetes;
mod pod;
mod prefixes;
mod records;
mod resolution;
mod revoke;
mod scoping;
mod tc;
mod tc_chain;
mod tc_paths;
mod upgrade;
mod veth;
