//! File descriptors of a worker process at start-up: the channel comes in on standard input and
//! moves to descriptor 3; standard input becomes `/dev/null`; every other inherited descriptor is
//! closed, so that the plugin the worker loads sees nothing of its host but the channel.

use std::fs::File;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, RawFd};
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

/// The device and inode of what descriptor `fd` refers to now, or `None` when it is closed: the
/// worker compares its channel's after each call, since the plugin can close (or replace) it.
pub(crate) fn identity(fd: BorrowedFd<'_>) -> Option<(u64, u64)> {
    // SAFETY: `fstat` writes a `stat` into the zeroed local; the descriptor number is only read.
    unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        if libc::fstat(fd.as_raw_fd(), &mut st) != 0 {
            return None;
        }
        Some((st.st_dev, st.st_ino))
    }
}
