//! File descriptors of a worker process at start-up: the channel comes in on standard input and
//! moves to descriptor 3; standard input becomes `/dev/null`; every other inherited descriptor is
//! closed, so that the plugin the worker loads sees nothing of its host but the channel.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::UnixStream;

/// The descriptor the channel lives on in a worker.
pub(crate) const CHANNEL_FD: RawFd = 3;

/// Moves the channel from standard input to descriptor 3 (close-on-exec), points standard input
/// at `/dev/null` and closes every other descriptor from 3 up. Call once, first thing in the
/// worker's `main`, before any other descriptor is opened.
pub(crate) fn take_channel_from_stdin() -> std::io::Result<UnixStream> {
    // SAFETY: plain descriptor syscalls on numbers. At this point of the worker's start nothing
    // in the process owns a descriptor from 3 up (they are unused, or leaked by the host), so
    // closing them breaks no ownership; descriptor 3 is then owned by the returned stream alone.
    unsafe {
        if libc::syscall(libc::SYS_close_range, CHANNEL_FD as u32, u32::MAX, 0) != 0 {
            // Without close_range (Linux < 5.9), close what /proc lists.
            let inherited: Vec<RawFd> = std::fs::read_dir("/proc/self/fd")?
                .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect();
            for fd in inherited.into_iter().filter(|&fd| fd >= CHANNEL_FD) {
                libc::close(fd);
            }
        }
        if libc::dup2(0, CHANNEL_FD) != CHANNEL_FD
            || libc::fcntl(CHANNEL_FD, libc::F_SETFD, libc::FD_CLOEXEC) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
        let channel = UnixStream::from_raw_fd(CHANNEL_FD);
        let null = File::open("/dev/null")?;
        if libc::dup2(null.as_raw_fd(), 0) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(channel)
    }
}

/// Writes `data` to the stream socket `channel` with `MSG_NOSIGNAL`: a worker that died makes it
/// fail with `EPIPE` instead of raising `SIGPIPE` in the host (which kills a host program that
/// has not ignored it; Rust programs ignore it by default, programs that embed the engine may not).
pub(crate) fn send_nosignal(channel: &UnixStream, data: &[u8]) -> std::io::Result<usize> {
    // SAFETY: `data` is a valid, initialised byte slice for the whole call and `send` only reads
    // `data.len()` bytes from it; the descriptor is borrowed from a live `UnixStream`.
    let sent = unsafe {
        libc::send(
            channel.as_raw_fd(),
            data.as_ptr().cast(),
            data.len(),
            libc::MSG_NOSIGNAL,
        )
    };
    if sent < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(sent as usize)
    }
}
