//! `enforcer`: Istio egress policy enforced by eBPF at connect() and sendmsg().

pub mod agent;
pub mod cgroup;
pub mod cli;
pub mod datapath;
pub mod diag;
pub mod dns;
pub mod istio;
pub mod k8s;
pub mod kubelet;
pub mod net;
pub mod observe;
pub mod pods;
pub mod policy;
pub mod resolver;
pub mod revoke;
pub mod sources;
pub mod stable_hash;
pub mod veth;
