//! Raw `NETLINK_SOCK_DIAG`: dumps the TCP and UDP sockets of the agent's network namespace with
//! their cgroup ids (`INET_DIAG_CGROUP_ID`, Linux 5.7), and destroys one (`SOCK_DESTROY`, which
//! needs `CONFIG_INET_DIAG_DESTROY`). Messages are built and parsed as bytes, so the only unsafe
//! code is the four system calls.

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    time::Duration,
};

/// `SOCK_DIAG_BY_FAMILY` and `SOCK_DESTROY` from `linux/sock_diag.h`.
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const SOCK_DESTROY: u16 = 21;
/// `INET_DIAG_CGROUP_ID` from `linux/inet_diag.h`.
const INET_DIAG_CGROUP_ID: u16 = 21;

const NLMSG_HDRLEN: usize = 16;
/// `struct inet_diag_req_v2`: family, protocol, ext, pad, states, then the socket id.
const REQ_LEN: usize = 8 + SOCKID_LEN;
/// `struct inet_diag_sockid`: ports, addresses, interface, cookie.
const SOCKID_LEN: usize = 48;
/// `struct inet_diag_msg`: family, state, timer, retrans, socket id, then five u32.
const MSG_LEN: usize = 4 + SOCKID_LEN + 20;

/// TCP states (`include/net/tcp_states.h`) as they appear in `idiag_state`.
pub mod state {
    pub const ESTABLISHED: u8 = 1;
    pub const SYN_SENT: u8 = 2;
    pub const FIN_WAIT1: u8 = 4;
    pub const FIN_WAIT2: u8 = 5;
    pub const CLOSE_WAIT: u8 = 8;
    pub const LAST_ACK: u8 = 9;
    pub const LISTEN: u8 = 10;
    pub const CLOSING: u8 = 11;
}

/// How long one answer from the kernel may take before the sweep gives up on it.
const RECV_TIMEOUT: Duration = Duration::from_secs(2);
/// Bounds one dump, whatever the kernel keeps sending.
const MAX_DUMP_MESSAGES: usize = 4_000_000;

#[derive(Debug, thiserror::Error)]
pub enum DiagError {
    #[error("opening a NETLINK_SOCK_DIAG socket: {0}")]
    Open(#[source] io::Error),
    #[error("sending a sock_diag request: {0}")]
    Send(#[source] io::Error),
    #[error("reading the sock_diag answer: {0}")]
    Recv(#[source] io::Error),
    #[error("the kernel refused the sock_diag request: {0}")]
    Kernel(#[source] io::Error),
    #[error("a malformed sock_diag message ({0})")]
    Malformed(&'static str),
    #[error("the sock_diag dump did not end after {MAX_DUMP_MESSAGES} messages")]
    TooLong,
}

impl DiagError {
    /// The kernel's errno, where it answered with one.
    pub fn errno(&self) -> Option<i32> {
        match self {
            Self::Kernel(e) => e.raw_os_error(),
            _ => None,
        }
    }
}

/// One socket as `SOCK_DIAG_BY_FAMILY` reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Socket {
    /// `AF_INET` or `AF_INET6` (an IPv6 socket may carry IPv4-mapped addresses).
    pub family: u8,
    /// `IPPROTO_TCP` or `IPPROTO_UDP`.
    pub proto: u8,
    /// A TCP state; UDP reports `ESTABLISHED` when connected.
    pub state: u8,
    pub src: IpAddr,
    pub sport: u16,
    pub dst: IpAddr,
    pub dport: u16,
    /// `None` where the kernel does not report it (before Linux 5.7).
    pub cgroup: Option<u64>,
    /// 0 for a socket no file refers to any more (an orphaned TCP socket).
    pub inode: u32,
    /// The raw `inet_diag_sockid`, cookie included, to name the socket to `SOCK_DESTROY`.
    id: [u8; SOCKID_LEN],
}

/// A `NETLINK_SOCK_DIAG` socket.
pub struct SockDiag {
    fd: OwnedFd,
    seq: u32,
}

impl SockDiag {
    pub fn open() -> Result<Self, DiagError> {
        // SAFETY: plain system call; the result is checked before use.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
                libc::NETLINK_SOCK_DIAG,
            )
        };
        if fd < 0 {
            return Err(DiagError::Open(io::Error::last_os_error()));
        }
        // SAFETY: `fd` is a new descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        set_recv_timeout(&fd, RECV_TIMEOUT).map_err(DiagError::Open)?;
        Ok(Self { fd, seq: 0 })
    }

    /// Every socket of `family` and `proto` in one of `states` (a bit per TCP state).
    pub fn dump(&mut self, family: u8, proto: u8, states: u32) -> Result<Vec<Socket>, DiagError> {
        let seq = self.next_seq();
        let flags = (libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16;
        let req = request(SOCK_DIAG_BY_FAMILY, flags, seq, family, proto, states, None);
        self.send(&req)?;
        let mut out = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        for _ in 0..MAX_DUMP_MESSAGES {
            let len = self.recv(&mut buf)?;
            for msg in messages(&buf[..len])? {
                if msg.seq != seq {
                    continue;
                }
                match msg.kind {
                    k if k == libc::NLMSG_DONE as u16 => return Ok(out),
                    k if k == libc::NLMSG_ERROR as u16 => ack(msg.payload)?,
                    SOCK_DIAG_BY_FAMILY => out.push(parse_socket(msg.payload, proto)?),
                    _ => {}
                }
            }
        }
        Err(DiagError::TooLong)
    }

    /// Destroys `socket` (`SOCK_DESTROY`): TCP sends a reset and fails with `ECONNABORTED`,
    /// UDP is disconnected. `ENOENT` means it is gone already.
    pub fn destroy(&mut self, socket: &Socket) -> Result<(), DiagError> {
        let seq = self.next_seq();
        let flags = (libc::NLM_F_REQUEST | libc::NLM_F_ACK) as u16;
        let req = request(
            SOCK_DESTROY,
            flags,
            seq,
            socket.family,
            socket.proto,
            u32::MAX,
            Some(&socket.id),
        );
        self.send(&req)?;
        let mut buf = vec![0u8; 8 * 1024];
        // The acknowledgement is the only answer; a bounded number of reads skips stale ones.
        for _ in 0..16 {
            let len = self.recv(&mut buf)?;
            for msg in messages(&buf[..len])? {
                if msg.seq == seq && msg.kind == libc::NLMSG_ERROR as u16 {
                    return ack(msg.payload);
                }
            }
        }
        Err(DiagError::Malformed("no acknowledgement of SOCK_DESTROY"))
    }

    fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    fn send(&self, msg: &[u8]) -> Result<(), DiagError> {
        // SAFETY: an all-zero sockaddr_nl is valid; the family makes it the kernel's address.
        let mut kernel: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        kernel.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        // SAFETY: `msg` and `kernel` are valid for the lengths given.
        let sent = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                msg.as_ptr().cast(),
                msg.len(),
                0,
                std::ptr::from_ref(&kernel).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if sent < 0 {
            return Err(DiagError::Send(io::Error::last_os_error()));
        }
        Ok(())
    }

    fn recv(&self, buf: &mut [u8]) -> Result<usize, DiagError> {
        // SAFETY: `buf` is valid for writes of its length.
        let got = unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        usize::try_from(got).map_err(|_| DiagError::Recv(io::Error::last_os_error()))
    }
}

fn set_recv_timeout(fd: &OwnedFd, timeout: Duration) -> io::Result<()> {
    let tv = libc::timeval {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_usec: libc::suseconds_t::from(timeout.subsec_micros() as i32),
    };
    // SAFETY: `tv` is a valid timeval for the length given.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            std::ptr::from_ref(&tv).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A netlink message: header fields and what follows the header.
struct Message<'a> {
    kind: u16,
    seq: u32,
    payload: &'a [u8],
}

/// Splits a datagram into its netlink messages.
fn messages(mut buf: &[u8]) -> Result<Vec<Message<'_>>, DiagError> {
    let mut out = Vec::new();
    while buf.len() >= NLMSG_HDRLEN {
        let len = u32_at(buf, 0) as usize;
        if len < NLMSG_HDRLEN || len > buf.len() {
            return Err(DiagError::Malformed("netlink message length"));
        }
        out.push(Message {
            kind: u16_at(buf, 4),
            seq: u32_at(buf, 8),
            payload: &buf[NLMSG_HDRLEN..len],
        });
        buf = &buf[align4(len).min(buf.len())..];
    }
    Ok(out)
}

/// An `NLMSG_ERROR` payload: 0 acknowledges, a negative errno refuses.
fn ack(payload: &[u8]) -> Result<(), DiagError> {
    if payload.len() < 4 {
        return Err(DiagError::Malformed("netlink error message"));
    }
    match i32::from_ne_bytes([payload[0], payload[1], payload[2], payload[3]]) {
        0 => Ok(()),
        err => Err(DiagError::Kernel(io::Error::from_raw_os_error(-err))),
    }
}

/// A netlink header followed by an `inet_diag_req_v2`.
fn request(
    kind: u16,
    flags: u16,
    seq: u32,
    family: u8,
    proto: u8,
    states: u32,
    id: Option<&[u8; SOCKID_LEN]>,
) -> Vec<u8> {
    let len = NLMSG_HDRLEN + REQ_LEN;
    let mut msg = Vec::with_capacity(len);
    msg.extend_from_slice(&(len as u32).to_ne_bytes());
    msg.extend_from_slice(&kind.to_ne_bytes());
    msg.extend_from_slice(&flags.to_ne_bytes());
    msg.extend_from_slice(&seq.to_ne_bytes());
    msg.extend_from_slice(&0u32.to_ne_bytes());
    msg.extend_from_slice(&[family, proto, 0, 0]);
    msg.extend_from_slice(&states.to_ne_bytes());
    msg.extend_from_slice(id.unwrap_or(&[0; SOCKID_LEN]));
    msg
}

/// An `inet_diag_msg` and its attributes.
fn parse_socket(payload: &[u8], proto: u8) -> Result<Socket, DiagError> {
    if payload.len() < MSG_LEN {
        return Err(DiagError::Malformed("inet_diag_msg too short"));
    }
    let family = payload[0];
    let mut id = [0u8; SOCKID_LEN];
    id.copy_from_slice(&payload[4..4 + SOCKID_LEN]);
    let addr = |at: usize| -> Result<IpAddr, DiagError> {
        let bytes = &payload[at..at + 16];
        match i32::from(family) {
            libc::AF_INET => Ok(IpAddr::V4(Ipv4Addr::new(
                bytes[0], bytes[1], bytes[2], bytes[3],
            ))),
            libc::AF_INET6 => {
                let mut v6 = [0u8; 16];
                v6.copy_from_slice(bytes);
                Ok(IpAddr::V6(Ipv6Addr::from(v6)))
            }
            _ => Err(DiagError::Malformed("address family")),
        }
    };
    Ok(Socket {
        family,
        proto,
        state: payload[1],
        sport: u16::from_be_bytes([payload[4], payload[5]]),
        dport: u16::from_be_bytes([payload[6], payload[7]]),
        src: addr(8)?,
        dst: addr(24)?,
        inode: u32_at(payload, 4 + SOCKID_LEN + 16),
        cgroup: cgroup_attr(&payload[MSG_LEN..]),
        id,
    })
}

/// The `INET_DIAG_CGROUP_ID` attribute among `attrs`, if present.
fn cgroup_attr(mut attrs: &[u8]) -> Option<u64> {
    while attrs.len() >= 4 {
        let len = usize::from(u16_at(attrs, 0));
        let kind = u16_at(attrs, 2) & 0x3fff;
        if len < 4 || len > attrs.len() {
            return None;
        }
        if kind == INET_DIAG_CGROUP_ID && len >= 12 {
            let mut v = [0u8; 8];
            v.copy_from_slice(&attrs[4..12]);
            return Some(u64::from_ne_bytes(v));
        }
        attrs = &attrs[align4(len).min(attrs.len())..];
    }
    None
}

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_ne_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An answer as the kernel lays it out: header, inet_diag_msg, a pad and the cgroup id.
    fn answer(seq: u32) -> Vec<u8> {
        let mut body = vec![libc::AF_INET as u8, state::ESTABLISHED, 0, 0];
        body.extend_from_slice(&40000u16.to_be_bytes());
        body.extend_from_slice(&443u16.to_be_bytes());
        let mut src = [0u8; 16];
        src[..4].copy_from_slice(&[198, 51, 100, 1]);
        let mut dst = [0u8; 16];
        dst[..4].copy_from_slice(&[198, 51, 100, 10]);
        body.extend_from_slice(&src);
        body.extend_from_slice(&dst);
        body.extend_from_slice(&[0; 12]); // interface, cookie
        body.extend_from_slice(&[0; 16]); // expires, queues, uid
        body.extend_from_slice(&77u32.to_ne_bytes()); // inode
        body.extend_from_slice(&4u16.to_ne_bytes()); // INET_DIAG_PAD, empty
        body.extend_from_slice(&14u16.to_ne_bytes());
        body.extend_from_slice(&12u16.to_ne_bytes());
        body.extend_from_slice(&INET_DIAG_CGROUP_ID.to_ne_bytes());
        body.extend_from_slice(&4242u64.to_ne_bytes());
        let mut msg = Vec::new();
        msg.extend_from_slice(&((NLMSG_HDRLEN + body.len()) as u32).to_ne_bytes());
        msg.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
        msg.extend_from_slice(&2u16.to_ne_bytes());
        msg.extend_from_slice(&seq.to_ne_bytes());
        msg.extend_from_slice(&0u32.to_ne_bytes());
        msg.extend_from_slice(&body);
        msg
    }

    #[test]
    fn parses_a_socket_and_its_cgroup() {
        let buf = answer(5);
        let msgs = messages(&buf).unwrap();
        assert_eq!(msgs.len(), 1);
        assert_eq!((msgs[0].kind, msgs[0].seq), (SOCK_DIAG_BY_FAMILY, 5));
        let s = parse_socket(msgs[0].payload, libc::IPPROTO_TCP as u8).unwrap();
        assert_eq!(s.dst, "198.51.100.10".parse::<IpAddr>().unwrap());
        assert_eq!(s.src, "198.51.100.1".parse::<IpAddr>().unwrap());
        assert_eq!(
            (s.sport, s.dport, s.state),
            (40000, 443, state::ESTABLISHED)
        );
        assert_eq!((s.cgroup, s.inode), (Some(4242), 77));
        assert_eq!(
            &s.id[..4],
            &[0x9c, 0x40, 0x01, 0xbb],
            "ports kept in network order"
        );
    }

    #[test]
    fn rejects_truncated_messages() {
        let buf = answer(1);
        assert!(messages(&buf[..buf.len() - 1]).is_err());
        assert!(parse_socket(&[0; 10], 6).is_err());
        assert_eq!(
            cgroup_attr(&[8, 0, 21, 0]),
            None,
            "a length beyond the buffer"
        );
    }

    #[test]
    fn requests_have_the_uapi_layout() {
        let req = request(SOCK_DESTROY, 5, 9, 10, 17, u32::MAX, Some(&[7; SOCKID_LEN]));
        assert_eq!(req.len(), 16 + 56);
        assert_eq!(u32_at(&req, 0), 72);
        assert_eq!(u16_at(&req, 4), SOCK_DESTROY);
        assert_eq!(&req[16..20], &[10, 17, 0, 0]);
        assert_eq!(u32_at(&req, 20), u32::MAX);
        assert!(req[24..].iter().all(|&b| b == 7));
        assert!(ack(&0i32.to_ne_bytes()).is_ok());
        let refused = ack(&(-libc::EOPNOTSUPP).to_ne_bytes()).unwrap_err();
        assert_eq!(refused.errno(), Some(libc::EOPNOTSUPP));
    }
}
