//! `enforcer exec --user`: the workload runs as an ordinary user, with no capabilities, so it
//! cannot leave its cgroup (moving needs write access to another cgroup's `cgroup.procs`),
//! make child cgroups in it, or detach the programs. A root workload can do all of that; it is
//! out of scope (see the README's threat model).

use std::{ffi::CString, io, os::unix::process::CommandExt as _, process::Command};

use anyhow::{bail, Context as _};

/// Who the workload runs as.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Identity {
    pub uid: libc::uid_t,
    pub gid: libc::gid_t,
}

/// A user name, or a numeric uid. A uid with no passwd entry runs with the group of the same
/// number: never group 0, which would be root's.
pub fn resolve(spec: &str) -> anyhow::Result<Identity> {
    if let Ok(uid) = spec.parse::<libc::uid_t>() {
        let gid = lookup_uid(uid)?.map_or(uid, |found| found.gid);
        return Ok(Identity { uid, gid });
    }
    lookup_name(spec)?.with_context(|| format!("--user {spec:?}: no such user"))
}

fn lookup_uid(uid: libc::uid_t) -> anyhow::Result<Option<Identity>> {
    // SAFETY: `passwd` is plain data; getpwuid_r fills it and `buf`, which outlive its use.
    lookup(|pw, buf, out| unsafe { libc::getpwuid_r(uid, pw, buf.as_mut_ptr(), buf.len(), out) })
}

fn lookup_name(name: &str) -> anyhow::Result<Option<Identity>> {
    let name = CString::new(name).context("--user: the name holds a NUL byte")?;
    // SAFETY: as in `lookup_uid`; `name` is a valid C string for the call.
    lookup(|pw, buf, out| unsafe {
        libc::getpwnam_r(name.as_ptr(), pw, buf.as_mut_ptr(), buf.len(), out)
    })
}

/// Runs a reentrant passwd lookup with a buffer that grows while the entry does not fit.
fn lookup(
    mut get: impl FnMut(&mut libc::passwd, &mut [libc::c_char], &mut *mut libc::passwd) -> libc::c_int,
) -> anyhow::Result<Option<Identity>> {
    let mut size = 1024;
    loop {
        let mut buf = vec![0 as libc::c_char; size];
        // SAFETY: all-zero is a valid `passwd` (null pointers, zero ids); it is only read
        // after the lookup filled it.
        let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
        let mut out = std::ptr::null_mut();
        match get(&mut pw, &mut buf, &mut out) {
            0 if out.is_null() => return Ok(None),
            0 => {
                return Ok(Some(Identity {
                    uid: pw.pw_uid,
                    gid: pw.pw_gid,
                }))
            }
            libc::ERANGE if size < 1 << 20 => size *= 4,
            // glibc reports "no such entry" as one of these with some NSS modules.
            libc::ENOENT | libc::ESRCH | libc::EBADF | libc::EPERM => return Ok(None),
            err => bail!("looking up the user: {}", io::Error::from_raw_os_error(err)),
        }
    }
}

/// Makes `cmd` run as `who` once it has forked, just before it runs: the caller has joined
/// the cgroup (and the network namespace) already, which needs the privileges dropped here.
pub fn run_as(cmd: &mut Command, who: Identity) {
    let last_cap = last_capability();
    // SAFETY: the closure makes only async-signal-safe system calls (no allocation, no locks).
    unsafe {
        cmd.pre_exec(move || drop_privileges(who, last_cap));
    }
}

/// Makes `cmd` join the network namespace `netns` (a file under `/run/netns`) once it has
/// forked; registered before [`run_as`], which takes the privilege setns needs.
pub fn join_netns(cmd: &mut Command, netns: std::fs::File) {
    use std::os::fd::AsRawFd as _;
    // SAFETY: setns is a single system call; the file stays open in the closure.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) == 0 {
                Ok(())
            } else {
                Err(io::Error::last_os_error())
            }
        });
    }
}

/// The highest capability number this kernel knows (`CAP_LAST_CAP`), read before fork.
fn last_capability() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        // 63 covers every kernel: dropping a capability the kernel lacks fails harmlessly.
        .unwrap_or(63)
}

/// Groups, then group, then user (after setuid the others are no longer allowed); the bounding
/// and ambient sets emptied first (that needs CAP_SETPCAP) and no_new_privs set, so that no
/// setuid or file-capability program run later gets a capability back.
fn drop_privileges(who: Identity, last_cap: u32) -> io::Result<()> {
    let check = |rc: libc::c_int| {
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    };
    // SAFETY: plain system calls with valid arguments.
    unsafe {
        check(libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        ))?;
        for cap in 0..=last_cap {
            check(libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0))?;
        }
        check(libc::setgroups(1, &who.gid))?;
        check(libc::setgid(who.gid))?;
        check(libc::setuid(who.uid))?;
        check(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))?;
        // Leaving uid 0 clears the permitted and effective sets; make sure it did.
        if who.uid != 0 && libc::setuid(0) == 0 {
            // No allocation here (after fork): a plain error code.
            return Err(io::Error::from_raw_os_error(libc::EPERM));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_names_and_numbers() {
        let root = resolve("root").expect("root is in every passwd");
        assert_eq!(root, Identity { uid: 0, gid: 0 });
        assert_eq!(resolve("0").expect("uid 0"), root);
        // A uid with no entry gets the group of the same number, never root's.
        let unknown = resolve("4000000000").expect("any uid");
        assert_eq!(
            unknown,
            Identity {
                uid: 4_000_000_000,
                gid: 4_000_000_000
            }
        );
        let err = resolve("no-such-user-here").expect_err("unknown name");
        assert!(err.to_string().contains("no such user"), "{err}");
    }
}
