//! Records of refusals (and AUDIT would-refuse), through a ring buffer to the agent.
//!
//! A verdict never depends on its record. Each scope may make [`RECORDS_PER_SECOND`] records
//! per second on each CPU; what is over the budget, and what a full ring buffer loses, is
//! counted in per-CPU counters that the agent reports.

use aya_ebpf::{
    helpers::{bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_ktime_get_ns},
    macros::map,
    maps::{LruPerCpuHashMap, PerCpuArray, RingBuf},
};
use enforcer_common::{
    counter, verdict_slot, CgroupScope, DenyEvent, PolicyKey, RecordBudget, RECORDS_PER_SECOND,
    VERDICT_SCOPES, VERDICT_SLOTS,
};

#[map(name = "ENF_EVENTS")]
static EVENTS: RingBuf = RingBuf::pinned(1 << 20, 0);

#[map(name = "ENF_COUNTERS")]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(counter::COUNT, 0);

#[map(name = "ENF_VERDICTS")]
static VERDICTS: PerCpuArray<u64> = PerCpuArray::pinned(VERDICT_SCOPES * VERDICT_SLOTS, 0);

/// Counts one verdict of `scope` (see [`enforcer_common::verdict_slot`]).
#[inline(always)]
pub fn count_verdict(scope: u32, slot: u32) {
    if let Some(value) = VERDICTS.get_ptr_mut(verdict_slot(scope, slot)) {
        // SAFETY: a per-CPU slot: no other writer while this program runs.
        unsafe { *value += 1 };
    }
}

#[map(name = "ENF_RECORD_BUDGETS")]
static BUDGETS: LruPerCpuHashMap<u32, RecordBudget> = LruPerCpuHashMap::pinned(16_384, 0);

const WINDOW_NS: u64 = 1_000_000_000;

/// What a record says, beside the scope and the time.
pub struct Record {
    pub cgroup_id: u64,
    pub key: PolicyKey,
    pub hook: u8,
    pub verdict: u8,
    pub reason: u8,
    pub sock_type: u8,
}

/// `TASK`: the current task is the one that acted (socket hooks), so its pid and name go in.
/// A const, so that programs without one (TC, cgroup_skb) hold no call to those helpers: the
/// verifier of kernels before 6.? refuses them there even where the call is never made.
pub fn report<const TASK: bool>(scope: &CgroupScope, record: Record) {
    // SAFETY: the helper has no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    if !spend(scope.scope, now) {
        count(counter::RATE_LIMITED);
        return;
    }
    let Some(mut entry) = EVENTS.reserve::<DenyEvent>(0) else {
        count(counter::RING_FULL);
        return;
    };
    let (pid, comm) = if TASK {
        (
            (bpf_get_current_pid_tgid() >> 32) as u32,
            bpf_get_current_comm().unwrap_or([0; 16]),
        )
    } else {
        (0, [0; 16])
    };
    entry.write(DenyEvent {
        ts_ns: now,
        cgroup_id: record.cgroup_id,
        scope: scope.scope,
        pid,
        comm,
        addr: record.key.addr,
        port: record.key.port,
        proto: record.key.proto,
        verdict: record.verdict,
        hook: record.hook,
        reason: record.reason,
        sock_type: record.sock_type,
        pad: 0,
    });
    entry.submit(0);
}

/// Takes one record from the scope's budget on this CPU; false when it is spent.
fn spend(scope: u32, now: u64) -> bool {
    match BUDGETS.get_ptr_mut(scope) {
        Some(budget) => {
            // SAFETY: a per-CPU value, so nothing else writes it while this program runs.
            let budget = unsafe { &mut *budget };
            if now.wrapping_sub(budget.window_start_ns) >= WINDOW_NS {
                budget.window_start_ns = now;
                budget.used = 0;
            }
            if budget.used >= RECORDS_PER_SECOND {
                return false;
            }
            budget.used += 1;
            true
        }
        None => {
            let fresh = RecordBudget {
                window_start_ns: now,
                used: 1,
                pad: 0,
            };
            let _ = BUDGETS.insert(scope, fresh, 0);
            true
        }
    }
}

fn count(index: u32) {
    if let Some(value) = COUNTERS.get_ptr_mut(index) {
        // SAFETY: a per-CPU slot: no other writer while this program runs.
        unsafe { *value += 1 };
    }
}
