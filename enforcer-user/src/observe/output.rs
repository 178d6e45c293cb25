//! Where records go: one JSON line each on stdout (from a thread of its own, never waited
//! for), the metrics' counts, and the hub that `enforcer events` and `audit-report` read.

use std::{
    io::Write,
    sync::{
        atomic::{AtomicU64, Ordering},
        mpsc, Arc, OnceLock, RwLock,
    },
};

use aya::maps::{MapData, RingBuf};
use enforcer_common::DenyEvent;
use tokio::io::unix::AsyncFd;

use super::records::{DenyRecord, Explainer};

/// Records the output could not take (stdout blocked), since the agent started.
pub static OUTPUT_DROPPED: AtomicU64 = AtomicU64::new(0);

/// Lines waiting for stdout; beyond this, records are dropped and counted, never waited for.
const OUTPUT_QUEUE: usize = 4096;

/// Prints records as the ring buffer's are printed: one JSON line each on stdout.
pub fn print(records: &[DenyRecord]) {
    for record in records {
        emit(record);
    }
}

/// Where records are counted, once the agent serves metrics.
pub static RECORD_COUNTS: OnceLock<Arc<crate::observe::Metrics>> = OnceLock::new();

/// Counts one record, hands it to the hub, and queues it for stdout, never waiting: what the
/// queue cannot take is counted.
fn emit(record: &DenyRecord) {
    if let Some(metrics) = RECORD_COUNTS.get() {
        metrics.record(record);
    }
    super::hub::HUB.publish(record);
    static OUTPUT: OnceLock<Option<mpsc::SyncSender<String>>> = OnceLock::new();
    let output = OUTPUT.get_or_init(|| {
        let (tx, rx) = mpsc::sync_channel::<String>(OUTPUT_QUEUE);
        let writer = std::thread::Builder::new()
            .name("records".into())
            .spawn(move || write_lines(&rx));
        match writer {
            Ok(_) => Some(tx),
            Err(err) => {
                log::error!("starting the records' writer: {err}; records are only counted");
                None
            }
        }
    });
    let Ok(line) = serde_json::to_string(record) else {
        return;
    };
    if output.as_ref().is_none_or(|tx| tx.try_send(line).is_err()) {
        OUTPUT_DROPPED.fetch_add(1, Ordering::Relaxed);
    }
}

/// Reads the ring buffer until the agent stops, printing one JSON line per record on stdout.
/// A thread of its own writes them, so that a blocked stdout never stalls the ring buffer or
/// the agent; what it cannot take is counted in [`OUTPUT_DROPPED`].
pub async fn run(ring: RingBuf<MapData>, explainer: Arc<RwLock<Explainer>>) -> anyhow::Result<()> {
    // SAFETY: the ring buffer owns its fd, which stays open and unchanged while the AsyncFd
    // owns the ring buffer.
    let mut fd = unsafe { AsyncFd::register(ring) }
        .map_err(|e| anyhow::anyhow!("watching the ring buffer: {}", e.into_parts().1))?;
    loop {
        let mut guard = fd.readable_mut().await?;
        let ring = guard.get_inner_mut();
        while let Some(item) = ring.next() {
            if item.len() < std::mem::size_of::<DenyEvent>() {
                continue;
            }
            // SAFETY: the length was checked and DenyEvent is plain old data.
            let ev: DenyEvent = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
            let record = match explainer.read() {
                Ok(ex) => ex.record(&ev),
                Err(poisoned) => poisoned.into_inner().record(&ev),
            };
            emit(&record);
        }
        guard.clear_ready();
    }
}

/// Holds stdout's lock only while it writes: others (logging aside) may print between.
fn write_lines(rx: &mpsc::Receiver<String>) {
    while let Ok(line) = rx.recv() {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{line}");
        for more in rx.try_iter() {
            let _ = writeln!(out, "{more}");
        }
        let _ = out.flush();
    }
}
