//! The loop's clocks: when a burst of policy events has settled, and the heartbeat that
//! `enforcer health` reads.

use std::time::Duration;

use tokio::time::Instant;

/// Quiet period that ends a burst of changes (an editor's writes, a rollout's events).
const DEBOUNCE: Duration = Duration::from_millis(20);
/// Under a steady stream of events, the agent still applies at least this often.
const DEBOUNCE_MAX: Duration = Duration::from_millis(200);

/// When to reload the policy after a burst of events: a quiet period after the last event,
/// but no later than a bound after the first.
#[derive(Clone, Copy)]
pub(super) struct Debounce {
    pub due: Instant,
    latest: Instant,
}

impl Debounce {
    pub fn start() -> Self {
        let now = Instant::now();
        Self {
            due: now + DEBOUNCE,
            latest: now + DEBOUNCE_MAX,
        }
    }

    pub fn extend(self) -> Self {
        Self {
            due: (Instant::now() + DEBOUNCE).min(self.latest),
            ..self
        }
    }
}

/// Touches the status file once a second, whichever branch of the loop ran: a loop that
/// turns keeps beating, and a stuck one stops.
pub(super) fn beat(status_file: &std::path::Path, last: &mut std::time::Instant) {
    if last.elapsed() >= Duration::from_secs(1) {
        heartbeat(status_file);
        *last = std::time::Instant::now();
    }
}

/// `enforcer health` reads the status file's age: touching it says the loop runs.
fn heartbeat(status_file: &std::path::Path) {
    if let Ok(file) = std::fs::File::options().write(true).open(status_file) {
        let _ = file.set_modified(std::time::SystemTime::now());
    }
}
