//! Who may hold a connection to `/metrics`, `/healthz` and `/readyz`. Where they listen on the
//! node's address (deploy/monitoring/), any pod can connect: a few per address, so that no pod
//! holds them all, and the node's own connections (the kubelet's probes) have places of
//! their own, so that no pod keeps the probes out.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, Mutex},
};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Connections from other hosts and pods, in all.
const REMOTE: usize = 64;
/// Connections from one address.
const PER_PEER: usize = 4;
/// Connections from this host (the probes, a node-local scraper).
const LOCAL: usize = 16;

/// Connections held per remote address.
type PerPeer = Arc<Mutex<HashMap<IpAddr, usize>>>;

#[derive(Debug)]
pub struct Admission {
    remote: Arc<Semaphore>,
    local: Arc<Semaphore>,
    per_peer: PerPeer,
}

/// A place held; given back on drop.
#[derive(Debug)]
pub struct Ticket {
    _permit: OwnedSemaphorePermit,
    peer: Option<(IpAddr, PerPeer)>,
}

impl Default for Admission {
    fn default() -> Self {
        Self {
            remote: Arc::new(Semaphore::new(REMOTE)),
            local: Arc::new(Semaphore::new(LOCAL)),
            per_peer: Arc::default(),
        }
    }
}

impl Admission {
    /// A place for a connection from `peer` to `local` (the address it reached), if one is
    /// free; a connection from this host comes from the address it reached, or loopback.
    pub fn admit(&self, peer: IpAddr, local: IpAddr) -> Option<Ticket> {
        if peer == local || peer.is_loopback() {
            let permit = Arc::clone(&self.local).try_acquire_owned().ok()?;
            return Some(Ticket {
                _permit: permit,
                peer: None,
            });
        }
        let mut counts = self.per_peer.lock().unwrap_or_else(|p| p.into_inner());
        let count = counts.entry(peer).or_default();
        if *count >= PER_PEER {
            return None;
        }
        let permit = Arc::clone(&self.remote).try_acquire_owned().ok()?;
        *count += 1;
        Some(Ticket {
            _permit: permit,
            peer: Some((peer, Arc::clone(&self.per_peer))),
        })
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let Some((peer, counts)) = &self.peer else {
            return;
        };
        let mut counts = counts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = counts.get_mut(peer) {
            *n -= 1;
            if *n == 0 {
                counts.remove(peer);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn pods_cannot_keep_the_probes_out() {
        let admission = Admission::default();
        let node = ip("198.51.100.1");
        // One pod gets a few places, however many it asks for.
        let one: Vec<_> = (0..10)
            .filter_map(|_| admission.admit(ip("203.0.113.5"), node))
            .collect();
        assert_eq!(one.len(), PER_PEER);
        // Many pods fill the remote places...
        let many: Vec<_> = (0..100u8)
            .filter_map(|i| admission.admit(IpAddr::from([203, 0, 113, 100 + i % 100]), node))
            .collect();
        assert_eq!(one.len() + many.len(), REMOTE);
        assert!(admission.admit(ip("203.0.113.250"), node).is_none());
        // ...and the kubelet, on the node, still gets in, by the node's address or loopback.
        assert!(admission.admit(node, node).is_some());
        assert!(admission.admit(ip("127.0.0.1"), ip("127.0.0.1")).is_some());
        // A place given back is free again, for that pod too.
        drop(one);
        assert!(admission.admit(ip("203.0.113.5"), node).is_some());
    }
}
