//! Where every record goes besides stdout: the last ones kept for `enforcer events`, a live
//! feed for those following, and the audit book for `enforcer audit-report`.

use std::{
    collections::VecDeque,
    sync::{Arc, LazyLock, Mutex},
};

use tokio::sync::broadcast;

use super::{audit::AuditBook, records::DenyRecord};

/// Records kept for a reader who asks for the recent ones (`hubble observe` keeps a ring too).
pub const RECENT: usize = 1024;
/// Records a follower may lag behind before it is told how many it lost.
const FEED: usize = 1024;

pub struct Hub {
    recent: Mutex<VecDeque<Arc<DenyRecord>>>,
    feed: broadcast::Sender<Arc<DenyRecord>>,
    audit: Mutex<AuditBook>,
}

pub static HUB: LazyLock<Hub> = LazyLock::new(|| Hub {
    recent: Mutex::new(VecDeque::with_capacity(RECENT)),
    feed: broadcast::channel(FEED).0,
    audit: Mutex::default(),
});

impl Hub {
    /// Never waits on a reader: a slow follower loses records, and is told so.
    pub fn publish(&self, record: &DenyRecord) {
        let record = Arc::new(record.clone());
        self.audit
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .add(&record);
        // Sent under the lock, so that a reader's copy and subscription see each record once.
        let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        if recent.len() == RECENT {
            recent.pop_front();
        }
        recent.push_back(Arc::clone(&record));
        // No follower is no error.
        let _ = self.feed.send(record);
    }

    /// The recent records, oldest first, and the feed of those to come: each record is in
    /// exactly one of them.
    pub fn recent_and_feed(&self) -> (Vec<Arc<DenyRecord>>, broadcast::Receiver<Arc<DenyRecord>>) {
        let recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        (recent.iter().cloned().collect(), self.feed.subscribe())
    }

    pub fn audit(&self) -> AuditBook {
        self.audit.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}
