//! What the agent keeps per host name: the current answer, and superseded addresses that stay
//! allowed for a grace period, because applications cache answers past their TTL.

use std::{net::IpAddr, time::Duration};

use tokio::time::Instant;

#[derive(Clone, Copy, Debug)]
pub struct Lifetimes {
    pub min_ttl: Duration,
    pub max_ttl: Duration,
    /// How long a superseded address stays allowed; `None`: the larger of its TTL and 120 s.
    pub grace: Option<Duration>,
    /// Most addresses kept per name (current first, then the most recently superseded).
    pub max_ips: usize,
}

pub const DEFAULT_GRACE_FLOOR: Duration = Duration::from_secs(120);

impl Default for Lifetimes {
    /// The agent's defaults.
    fn default() -> Self {
        Self {
            min_ttl: Duration::from_secs(5),
            max_ttl: Duration::from_secs(300),
            grace: None,
            max_ips: 1000,
        }
    }
}

#[derive(Clone, Debug)]
pub struct HostRecord {
    current: Vec<IpAddr>,
    /// Superseded addresses and when their grace ends, newest first.
    retired: Vec<(IpAddr, Instant)>,
    ttl: Duration,
    pub refresh_at: Instant,
    pub expires_at: Instant,
    pub last_error: Option<String>,
}

impl HostRecord {
    /// A name with no answer yet: nothing allowed, retried after `retry`.
    pub fn unresolved(now: Instant, retry: Duration) -> Self {
        Self {
            current: Vec::new(),
            retired: Vec::new(),
            ttl: Duration::ZERO,
            refresh_at: now + retry,
            expires_at: now + retry,
            last_error: None,
        }
    }

    /// Takes a new answer. `jitter` in [0, 1) spreads refreshes between 75% and 85% of the TTL,
    /// so that many names with one TTL do not all refresh at once. Returns whether the set of
    /// allowed addresses changed.
    pub fn update(
        &mut self,
        mut ips: Vec<IpAddr>,
        ttl: Duration,
        now: Instant,
        jitter: f32,
        life: &Lifetimes,
    ) -> bool {
        ips.sort();
        ips.dedup();
        let before = self.allowed_set();
        let ttl = ttl.clamp(life.min_ttl, life.max_ttl);
        // The grace of an address follows the TTL it was last served with.
        let grace = life
            .grace
            .unwrap_or_else(|| self.ttl.max(DEFAULT_GRACE_FLOOR));
        let superseded: Vec<IpAddr> = self
            .current
            .iter()
            .filter(|ip| !ips.contains(ip))
            .copied()
            .collect();
        self.retired
            .retain(|(ip, _)| !ips.contains(ip) && !superseded.contains(ip));
        for ip in superseded.into_iter().rev() {
            if !grace.is_zero() {
                self.retired.insert(0, (ip, now + grace));
            }
        }
        self.current = ips;
        self.ttl = ttl;
        self.refresh_at = now + ttl.mul_f32(0.75 + 0.1 * jitter.clamp(0.0, 1.0));
        self.expires_at = now + ttl;
        self.last_error = None;
        self.cap(life.max_ips);
        self.allowed_set() != before
    }

    fn allowed_set(&self) -> std::collections::BTreeSet<IpAddr> {
        self.allowed().into_iter().collect()
    }

    /// Drops superseded addresses whose grace has ended; returns whether any were dropped.
    pub fn expire(&mut self, now: Instant) -> bool {
        let before = self.retired.len();
        self.retired.retain(|(_, until)| *until > now);
        before != self.retired.len()
    }

    /// When the next superseded address leaves.
    pub fn next_expiry(&self) -> Option<Instant> {
        self.retired.iter().map(|(_, until)| *until).min()
    }

    /// Current addresses, then those still in their grace period.
    pub fn allowed(&self) -> Vec<IpAddr> {
        self.current
            .iter()
            .copied()
            .chain(self.retired.iter().map(|(ip, _)| *ip))
            .collect()
    }

    pub fn current(&self) -> &[IpAddr] {
        &self.current
    }

    pub fn retired(&self) -> &[(IpAddr, Instant)] {
        &self.retired
    }

    fn cap(&mut self, max: usize) {
        self.current.truncate(max);
        self.retired
            .truncate(max.saturating_sub(self.current.len()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ips(list: &[&str]) -> Vec<IpAddr> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    fn life(grace: Option<u64>, max_ips: usize) -> Lifetimes {
        Lifetimes {
            min_ttl: Duration::from_secs(5),
            max_ttl: Duration::from_secs(300),
            grace: grace.map(Duration::from_secs),
            max_ips,
        }
    }

    #[test]
    fn ttl_is_clamped_and_refresh_comes_before_expiry() {
        let now = Instant::now();
        let mut r = HostRecord::unresolved(now, Duration::from_secs(5));
        assert!(r.update(
            ips(&["198.51.100.1"]),
            Duration::from_secs(1),
            now,
            0.5,
            &life(None, 10)
        ));
        assert_eq!(r.expires_at - now, Duration::from_secs(5), "floor");
        assert!(r.refresh_at < r.expires_at);
        r.update(
            ips(&["198.51.100.1"]),
            Duration::from_secs(86_400),
            now,
            0.0,
            &life(None, 10),
        );
        assert_eq!(r.expires_at - now, Duration::from_secs(300), "cap");
        assert_eq!(
            r.refresh_at - now,
            Duration::from_secs(225),
            "75% with no jitter"
        );
        r.update(
            ips(&["198.51.100.1"]),
            Duration::from_secs(100),
            now,
            0.999,
            &life(None, 10),
        );
        assert!(r.refresh_at - now <= Duration::from_secs(85));
    }

    #[test]
    fn superseded_addresses_stay_for_the_grace_period() {
        let now = Instant::now();
        let mut r = HostRecord::unresolved(now, Duration::from_secs(5));
        let l = life(None, 10);
        r.update(
            ips(&["198.51.100.1"]),
            Duration::from_secs(30),
            now,
            0.0,
            &l,
        );
        assert!(r.update(
            ips(&["198.51.100.2"]),
            Duration::from_secs(30),
            now,
            0.0,
            &l
        ));
        assert_eq!(r.allowed(), ips(&["198.51.100.2", "198.51.100.1"]));
        // Default grace: the larger of the TTL (30 s) and 120 s.
        assert_eq!(r.next_expiry(), Some(now + Duration::from_secs(120)));
        assert!(!r.expire(now + Duration::from_secs(119)));
        assert!(r.expire(now + Duration::from_secs(121)));
        assert_eq!(r.allowed(), ips(&["198.51.100.2"]));
    }

    #[test]
    fn an_address_that_comes_back_is_current_again() {
        let now = Instant::now();
        let mut r = HostRecord::unresolved(now, Duration::from_secs(5));
        let l = life(Some(60), 10);
        r.update(
            ips(&["198.51.100.1"]),
            Duration::from_secs(30),
            now,
            0.0,
            &l,
        );
        r.update(
            ips(&["198.51.100.2"]),
            Duration::from_secs(30),
            now,
            0.0,
            &l,
        );
        assert!(!r.update(
            ips(&["198.51.100.1", "198.51.100.2"]),
            Duration::from_secs(30),
            now,
            0.0,
            &l
        ));
        assert!(r.retired().is_empty());
        assert_eq!(r.current(), ips(&["198.51.100.1", "198.51.100.2"]));
    }

    #[test]
    fn zero_grace_drops_at_once_and_the_cap_keeps_the_newest() {
        let now = Instant::now();
        let mut r = HostRecord::unresolved(now, Duration::from_secs(5));
        r.update(
            ips(&["198.51.100.1"]),
            Duration::from_secs(30),
            now,
            0.0,
            &life(Some(0), 10),
        );
        r.update(
            ips(&["198.51.100.2"]),
            Duration::from_secs(30),
            now,
            0.0,
            &life(Some(0), 10),
        );
        assert_eq!(r.allowed(), ips(&["198.51.100.2"]));

        let l = life(Some(600), 3);
        let mut r = HostRecord::unresolved(now, Duration::from_secs(5));
        for i in 1..=5 {
            r.update(
                ips(&[&format!("198.51.100.{i}")]),
                Duration::from_secs(30),
                now,
                0.0,
                &l,
            );
        }
        assert_eq!(
            r.allowed(),
            ips(&["198.51.100.5", "198.51.100.4", "198.51.100.3"])
        );
        r.update(
            ips(&["203.0.113.1", "203.0.113.2", "203.0.113.3", "203.0.113.4"]),
            Duration::from_secs(30),
            now,
            0.0,
            &l,
        );
        assert_eq!(
            r.allowed().len(),
            3,
            "the cap holds for one large answer too"
        );
    }
}
