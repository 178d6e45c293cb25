//! bpf(2) where aya 0.14 has no API: reading a TCX link's interface, and the link of a
//! `cgroup/setsockopt` program (aya's `CgroupSockoptLink` cannot become an `FdLink`, so it
//! could not be pinned to outlive the agent).

use std::{
    io,
    os::{
        fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
        unix::ffi::OsStrExt as _,
    },
    path::Path,
};

use aya_obj::generated::{bpf_attach_type, bpf_cmd};

/// bpf(2) with `attr`, the head of `union bpf_attr` that `cmd` reads: the kernel takes a shorter
/// attr as zero-extended.
pub(super) fn bpf<T>(cmd: bpf_cmd, attr: &mut T) -> io::Result<i32> {
    // SAFETY: `attr` is valid for `size_of::<T>()` bytes and outlives the call; the pointers in
    // it point at memory that outlives the call as well.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd as libc::c_long,
            std::ptr::from_mut(attr),
            std::mem::size_of::<T>(),
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    i32::try_from(rc).map_err(io::Error::other)
}

/// A bpf_link of `prog` on `target` (a cgroup), multi-attach as every such link is.
pub(super) fn link_create(
    prog: BorrowedFd<'_>,
    target: BorrowedFd<'_>,
    attach_type: bpf_attach_type,
) -> io::Result<OwnedFd> {
    /// The head of `union bpf_attr` for BPF_LINK_CREATE.
    #[repr(C)]
    struct LinkCreate {
        prog_fd: u32,
        target_fd: u32,
        attach_type: u32,
        flags: u32,
    }
    let mut attr = LinkCreate {
        prog_fd: prog.as_raw_fd() as u32,
        target_fd: target.as_raw_fd() as u32,
        attach_type: attach_type as u32,
        flags: 0,
    };
    let fd = bpf(bpf_cmd::BPF_LINK_CREATE, &mut attr)?;
    // SAFETY: BPF_LINK_CREATE returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Pins `fd` (a link) at `path` under bpffs.
pub(super) fn obj_pin(fd: BorrowedFd<'_>, path: &Path) -> io::Result<()> {
    /// The head of `union bpf_attr` for BPF_OBJ_PIN.
    #[repr(C)]
    struct ObjPin {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    let path = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|err| io::Error::new(io::ErrorKind::InvalidInput, err))?;
    let mut attr = ObjPin {
        pathname: path.as_ptr() as u64,
        bpf_fd: fd.as_raw_fd() as u32,
        file_flags: 0,
    };
    bpf(bpf_cmd::BPF_OBJ_PIN, &mut attr).map(drop)
}
