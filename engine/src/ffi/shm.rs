//! Shared memory between the host and a worker process: `memfd` regions that both map, and the
//! doorbell that wakes a side that went to sleep waiting for the other.
//!
//! The host creates every region (`memfd_create`) and seals it against shrinking
//! (`F_SEAL_SHRINK`) and against further seals (`F_SEAL_SEAL`) before the worker receives it
//! (`SCM_RIGHTS` over the channel). A region can grow (either side `ftruncate`s it larger) but
//! never shrink, so a mapping of a length the file had once stays backed by the file: a worker
//! that truncates a region gets `EPERM`, and no read of the host's can fault (`SIGBUS`). Nothing
//! else about a region is trusted by the host: the worker can write any byte of it at any time,
//! also while the host copies it. The host therefore reads a region only by copying bytes out
//! ([`Region::read_into`], [`Region::copy_out`], treated as arbitrary bytes and checked
//! afterwards) and loads its control words with atomic loads ([`Region::word`]); it never builds
//! a reference, a buffer or a pointer into a region a worker writes.
//!
//! A worker, which trusts its host, uses what the host wrote in place ([`Region::buffer`]).
//!
//! A [`Region`] maps its file through a [`Mapping`] that is unmapped when the last user drops it:
//! when a region grows, a new mapping replaces the old one, which buffers decoded from it keep
//! alive.

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::ptr::NonNull;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use datafusion::arrow::buffer::Buffer;

/// The largest region (a result column over 2 GiB is refused in-process too, plus framing).
pub(crate) const MAX_REGION: usize = (i32::MAX as usize) + (1 << 20);

/// A page: mappings and growth are in whole pages.
const PAGE: usize = 4096;

fn round_up(len: usize) -> usize {
    len.div_ceil(PAGE).max(1) * PAGE
}

/// One `mmap` of a region's file, shared read-write; unmapped on drop.
#[derive(Debug)]
pub(crate) struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: a `Mapping` is a plain address range owned by this value; every access through it is
// either a bounds-checked copy or an atomic operation, so it may move between and be shared by
// threads.
unsafe impl Send for Mapping {}
// SAFETY: as above.
unsafe impl Sync for Mapping {}

impl Mapping {
    fn new(file: &File, len: usize) -> std::io::Result<Mapping> {
        // SAFETY: a new shared mapping of `len` bytes of a file this process holds open; the
        // kernel picks the address, so no existing memory is affected. The file is at least
        // `len` bytes long (callers grow it first) and can never shrink (it is sealed), so every
        // page of the mapping stays backed.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let ptr = NonNull::new(ptr.cast::<u8>()).ok_or_else(|| std::io::Error::other("mmap"))?;
        Ok(Mapping { ptr, len })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the range `new` mapped; nothing refers to it any more (every
        // buffer made from it holds this value alive).
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.len);
        }
    }
}

/// A `memfd` mapped in this process.
#[derive(Debug)]
pub(crate) struct Region {
    file: File,
    mapping: Arc<Mapping>,
}

impl Region {
    /// A new region of at least `len` bytes, sealed against shrinking and further seals.
    pub(crate) fn create(name: &str, len: usize) -> std::io::Result<Region> {
        let name = std::ffi::CString::new(name).map_err(std::io::Error::other)?;
        // SAFETY: `name` is a NUL-terminated string that lives across the call.
        let fd = unsafe {
            libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING)
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` was just created and is owned by nothing else.
        let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        let len = round_up(len);
        file.set_len(len as u64)?;
        // SAFETY: fcntl on a descriptor this function owns; F_ADD_SEALS takes an int argument.
        let sealed = unsafe {
            libc::fcntl(
                file.as_raw_fd(),
                libc::F_ADD_SEALS,
                libc::F_SEAL_SHRINK | libc::F_SEAL_SEAL,
            )
        };
        if sealed != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mapping = Arc::new(Mapping::new(&file, len)?);
        Ok(Region { file, mapping })
    }

    /// A region received from the host: the file is mapped at its current length.
    pub(crate) fn open(fd: OwnedFd) -> std::io::Result<Region> {
        let file = File::from(fd);
        let len = usize::try_from(file.metadata()?.len())
            .ok()
            .filter(|len| (PAGE..=MAX_REGION).contains(len))
            .ok_or_else(|| std::io::Error::other("a shared region of an unexpected size"))?;
        let mapping = Arc::new(Mapping::new(&file, len)?);
        Ok(Region { file, mapping })
    }

    /// The region's file descriptor (to send to the worker).
    pub(crate) fn fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }

    /// How long the file is now (the other side may have grown it).
    pub(crate) fn file_len(&self) -> std::io::Result<usize> {
        Ok(usize::try_from(self.file.metadata()?.len()).unwrap_or(usize::MAX))
    }

    /// Maps at least `len` bytes, growing the file first when it is shorter. Fails over
    /// [`MAX_REGION`].
    pub(crate) fn grow_to(&mut self, len: usize) -> std::io::Result<()> {
        if len <= self.mapping.len {
            return Ok(());
        }
        if len > MAX_REGION {
            return Err(std::io::Error::other(format!(
                "{len} bytes is over the shared region limit"
            )));
        }
        // Double, so that a growing sequence of calls remaps a few times only.
        let len = round_up(len.max(self.mapping.len.saturating_mul(2)).min(MAX_REGION));
        if self.file_len()? < len {
            self.file.set_len(len as u64)?;
        }
        self.mapping = Arc::new(Mapping::new(&self.file, len)?);
        Ok(())
    }

    /// Maps at least `len` bytes if the file (grown by the other side) holds them; never grows
    /// the file. `Ok(false)` when it is shorter than `len`.
    pub(crate) fn map_written(&mut self, len: usize) -> std::io::Result<bool> {
        if len <= self.mapping.len {
            return Ok(true);
        }
        if len > MAX_REGION {
            return Ok(false);
        }
        let file_len = self.file_len()?;
        if file_len < len {
            return Ok(false);
        }
        // Double (as `grow_to` does), within what the file holds: never past its end, whatever
        // size the other side claims for it.
        let map = round_up(len)
            .max(self.mapping.len.saturating_mul(2))
            .min(MAX_REGION)
            .min(file_len);
        self.mapping = Arc::new(Mapping::new(&self.file, map)?);
        Ok(true)
    }

    /// The control word at `offset` (a multiple of 8 within the first page).
    pub(crate) fn word(&self, offset: usize) -> &AtomicU64 {
        assert!(offset.is_multiple_of(8) && offset + 8 <= PAGE.min(self.mapping.len));
        // SAFETY: in bounds and aligned (the mapping is page-aligned) per the assertion; the
        // memory lives as long as `self.mapping`, which the returned borrow of `self` outlives.
        // Another process may write the word at any time: it is only ever accessed atomically.
        unsafe { AtomicU64::from_ptr(self.mapping.ptr.as_ptr().add(offset).cast()) }
    }

    /// Writes `bytes` at `at`, growing the region when needed.
    pub(crate) fn write_at(&mut self, at: usize, bytes: &[u8]) -> std::io::Result<()> {
        let end = at
            .checked_add(bytes.len())
            .ok_or_else(|| std::io::Error::other("a write past the shared region limit"))?;
        self.grow_to(end)?;
        // SAFETY: `at..end` lies within the mapping (grown just above); `bytes` is this
        // process's own memory, which cannot overlap a fresh shared mapping. The other process
        // may write the same bytes at the same time: this side never reads them back trusting
        // they are what it wrote.
        unsafe {
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                self.mapping.ptr.as_ptr().add(at),
                bytes.len(),
            );
        }
        Ok(())
    }

    /// Copies `out.len()` bytes from `at` into `out`; `false` (and nothing copied) when they are
    /// not all within the mapping.
    pub(crate) fn read_into(&self, at: usize, out: &mut [u8]) -> bool {
        if at
            .checked_add(out.len())
            .is_none_or(|end| end > self.mapping.len)
        {
            return false;
        }
        // SAFETY: `at..at + out.len()` lies within the mapping (checked above) and `out` is this
        // process's own memory. The other process may be writing these bytes during the copy:
        // the copy is then some mix of old and new bytes, which callers take as arbitrary bytes
        // (any `u8` is valid) and check after the copy.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.mapping.ptr.as_ptr().add(at),
                out.as_mut_ptr(),
                out.len(),
            );
        }
        true
    }

    /// A copy of `len` bytes from `at`, in memory of this process's own; `None` when they are
    /// not all within the mapping.
    pub(crate) fn copy_out(&self, at: usize, len: usize) -> Option<Vec<u8>> {
        if at.checked_add(len).is_none_or(|end| end > self.mapping.len) {
            return None;
        }
        let mut out = Vec::with_capacity(len);
        // SAFETY: as in `read_into`: in bounds, into this process's own (spare) memory, taken as
        // arbitrary bytes; `len` bytes were written, so the length may be set.
        unsafe {
            std::ptr::copy_nonoverlapping(self.mapping.ptr.as_ptr().add(at), out.as_mut_ptr(), len);
            out.set_len(len);
        }
        Some(out)
    }

    /// The bytes `at..at + len` as a buffer used in place (no copy), keeping the mapping alive;
    /// `None` when they are not all within the mapping. For the worker only, which trusts what
    /// its host wrote there.
    pub(crate) fn buffer(&self, at: usize, len: usize) -> Option<Buffer> {
        if at.checked_add(len).is_none_or(|end| end > self.mapping.len) {
            return None;
        }
        let ptr = NonNull::new(self.mapping.ptr.as_ptr().wrapping_add(at))?;
        // SAFETY: `ptr..ptr + len` lies within the mapping (checked above), which the buffer's
        // owner (a reference to the mapping) keeps mapped as long as the buffer, or any slice
        // of it, lives.
        Some(unsafe { Buffer::from_custom_allocation(ptr, len, Arc::clone(&self.mapping) as _) })
    }
}

/// Writes into a region from `start` on, growing it as needed: a frame is encoded straight into
/// shared memory.
#[derive(Debug)]
pub(crate) struct RegionWriter<'a> {
    region: &'a mut Region,
    start: usize,
    /// Bytes written so far, from `start`.
    written: usize,
}

impl<'a> RegionWriter<'a> {
    pub(crate) fn new(region: &'a mut Region, start: usize) -> RegionWriter<'a> {
        RegionWriter {
            region,
            start,
            written: 0,
        }
    }

    /// Bytes written so far.
    pub(crate) fn written(&self) -> usize {
        self.written
    }

    /// Starts over at `start`.
    pub(crate) fn reset(&mut self) {
        self.written = 0;
    }

    /// Overwrites bytes written before, at `at` (from `start`).
    pub(crate) fn patch(&mut self, at: usize, bytes: &[u8]) -> std::io::Result<()> {
        if at + bytes.len() > self.written {
            return Err(std::io::Error::other("a patch past what was written"));
        }
        self.region.write_at(self.start + at, bytes)
    }
}

impl Write for RegionWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.region.write_at(self.start + self.written, buf)?;
        self.written += buf.len();
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Rings the other side's doorbell: the byte `bell` on the channel, without blocking (a full
/// socket already holds unread bytes that wake the reader) and without `SIGPIPE`.
pub(crate) fn ring(channel: &UnixStream, bell: u8) -> std::io::Result<()> {
    // SAFETY: sends one byte from a local array over a descriptor borrowed from a live stream.
    let sent = unsafe {
        libc::send(
            channel.as_raw_fd(),
            [bell].as_ptr().cast(),
            1,
            libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
        )
    };
    if sent < 0 {
        let e = std::io::Error::last_os_error();
        if e.kind() == std::io::ErrorKind::WouldBlock {
            return Ok(());
        }
        return Err(e);
    }
    Ok(())
}

/// Sends `bytes` with the descriptors `fds` attached (`SCM_RIGHTS`), in one message.
pub(crate) fn send_with_fds(
    channel: &UnixStream,
    bytes: &[u8],
    fds: &[BorrowedFd<'_>],
) -> std::io::Result<()> {
    const MAX_FDS: usize = 4;
    assert!(fds.len() <= MAX_FDS && !bytes.is_empty());
    // Room for a control message of MAX_FDS descriptors, aligned for `cmsghdr`.
    let mut control = [0u64; 8];
    let fd_bytes = std::mem::size_of_val(fds);
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr().cast_mut().cast(),
        iov_len: bytes.len(),
    };
    // SAFETY: `msghdr` is plain data; every pointer in it refers to locals that outlive the
    // call (`iov`, `bytes`, `control`), `control` is large and aligned enough for one
    // `cmsghdr` carrying MAX_FDS descriptors (CMSG_SPACE(16) = 32 bytes of its 64), and the
    // CMSG_* macros stay within `msg_controllen`. `sendmsg` only reads through them.
    let sent = unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = libc::CMSG_SPACE(fd_bytes as u32) as _;
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(fd_bytes as u32) as _;
        let data = libc::CMSG_DATA(cmsg).cast::<libc::c_int>();
        for (i, fd) in fds.iter().enumerate() {
            data.add(i).write_unaligned(fd.as_raw_fd());
        }
        libc::sendmsg(channel.as_raw_fd(), &msg, libc::MSG_NOSIGNAL)
    };
    match usize::try_from(sent) {
        Ok(n) if n == bytes.len() => Ok(()),
        Ok(_) => Err(std::io::Error::other("a short write of a setup message")),
        Err(_) => Err(std::io::Error::last_os_error()),
    }
}

/// Receives exactly `out.len()` bytes, the first of which carry `N` descriptors
/// (`SCM_RIGHTS`); blocking. Fails when the descriptors are missing or more arrive.
pub(crate) fn receive_with_fds<const N: usize>(
    channel: &UnixStream,
    out: &mut [u8],
) -> std::io::Result<[OwnedFd; N]> {
    let mut control = [0u64; 8];
    let mut iov = libc::iovec {
        iov_base: out.as_mut_ptr().cast(),
        iov_len: out.len(),
    };
    let mut fds: Vec<OwnedFd> = Vec::new();
    // SAFETY: as in `send_with_fds`, every pointer in `msg` refers to live locals of the given
    // sizes; `recvmsg` writes at most `iov_len` bytes into `out` and at most `msg_controllen`
    // into `control`; the descriptors the kernel installed (MSG_CMSG_CLOEXEC) are taken into
    // `OwnedFd`s exactly once each, as the control message lists them.
    let received = unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of_val(&control) as _;
        let n = libc::recvmsg(channel.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC);
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg).cast::<libc::c_int>();
                let bytes = (*cmsg).cmsg_len as usize
                    - (data.cast::<u8>().offset_from(cmsg.cast::<u8>()) as usize);
                for i in 0..bytes / std::mem::size_of::<libc::c_int>() {
                    fds.push(OwnedFd::from_raw_fd(data.add(i).read_unaligned()));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
        if msg.msg_flags & libc::MSG_CTRUNC != 0 {
            return Err(std::io::Error::other("descriptors were cut off"));
        }
        n as usize
    };
    let mut channel_ref = channel;
    if received < out.len() {
        std::io::Read::read_exact(&mut channel_ref, &mut out[received..])?;
    }
    <[OwnedFd; N]>::try_from(fds)
        .map_err(|fds| std::io::Error::other(format!("{} descriptors instead of {N}", fds.len())))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A second mapping of the same file, as the other process has it.
    fn peer(region: &Region) -> Region {
        Region::open(region.fd().try_clone_to_owned().unwrap()).unwrap()
    }

    #[test]
    fn a_region_cannot_shrink_and_grows_for_both_sides() {
        let mut host = Region::create("udfsql-test", 10).unwrap();
        assert_eq!(host.file_len().unwrap(), PAGE);
        // Sealed against shrinking and against further seals.
        let file = File::from(host.fd().try_clone_to_owned().unwrap());
        let shrink = file.set_len(0).unwrap_err();
        assert_eq!(shrink.raw_os_error(), Some(libc::EPERM));
        let mut worker = peer(&host);
        host.write_at(100, b"hello").unwrap();
        let mut seen = [0u8; 5];
        assert!(worker.read_into(100, &mut seen));
        assert_eq!(&seen, b"hello");
        // Past the mapping: refused, nothing copied.
        assert!(!worker.read_into(PAGE - 2, &mut seen));
        assert!(worker.copy_out(PAGE, 1).is_none());
        assert!(worker.buffer(usize::MAX, 2).is_none());
        // The host grows it; the worker maps what the file holds, never more.
        host.write_at(3 * PAGE, b"far").unwrap();
        assert!(host.file_len().unwrap() >= 3 * PAGE + 3);
        assert!(worker.map_written(3 * PAGE + 3).unwrap());
        assert_eq!(worker.copy_out(3 * PAGE, 3).unwrap(), b"far");
        assert!(!worker.map_written(64 * PAGE).unwrap());
        assert!(!worker.map_written(MAX_REGION + 1).unwrap());
    }

    #[test]
    fn buffers_keep_their_mapping_across_growth() {
        let mut host = Region::create("udfsql-test", PAGE).unwrap();
        host.write_at(0, &[7u8; 64]).unwrap();
        let mut worker = peer(&host);
        let buffer = worker.buffer(0, 64).unwrap();
        host.write_at(8 * PAGE, &[1]).unwrap();
        assert!(worker.map_written(8 * PAGE + 1).unwrap());
        // The old mapping lives as long as the buffer made from it.
        assert_eq!(buffer.as_slice(), &[7u8; 64]);
    }

    #[test]
    fn control_words_are_shared() {
        let host = Region::create("udfsql-test", PAGE).unwrap();
        let worker = peer(&host);
        host.word(64).store(42, std::sync::atomic::Ordering::SeqCst);
        assert_eq!(
            worker.word(64).load(std::sync::atomic::Ordering::SeqCst),
            42
        );
    }

    #[test]
    fn descriptors_cross_a_socket() {
        let (a, b) = UnixStream::pair().unwrap();
        let region = Region::create("udfsql-test", PAGE).unwrap();
        region.word(0).store(9, std::sync::atomic::Ordering::SeqCst);
        send_with_fds(&a, b"hi", &[region.fd(), region.fd()]).unwrap();
        let mut got = [0u8; 2];
        let [x, y] = receive_with_fds::<2>(&b, &mut got).unwrap();
        assert_eq!(&got, b"hi");
        let (x, y) = (Region::open(x).unwrap(), Region::open(y).unwrap());
        assert_eq!(x.word(0).load(std::sync::atomic::Ordering::SeqCst), 9);
        assert_eq!(y.word(0).load(std::sync::atomic::Ordering::SeqCst), 9);
        // Without descriptors: an error, not a hang or a panic.
        std::io::Write::write_all(&mut &a, b"no").unwrap();
        assert!(receive_with_fds::<2>(&b, &mut got).is_err());
    }
}
