//! One open from hash to map, and the process-wide record of the library images this process
//! holds.
//!
//! **What is hashed is what is mapped.** A library file is opened once; its bytes are copied into
//! an anonymous memory file (`memfd_create`) that is then sealed (`F_SEAL_WRITE`, `F_SEAL_SHRINK`,
//! `F_SEAL_GROW`, `F_SEAL_SEAL`: nobody, this process included, can change it any more). The
//! digest is computed from the sealed copy, the pin is checked against it, and `dlopen` maps that
//! same copy through `/proc/self/fd/N`. Renaming another file over the path, or rewriting the
//! file in place, at any moment of a load cannot make the dynamic loader run bytes that were not
//! hashed: the path is never opened a second time, and the copy cannot change. A mapped image no
//! longer shares pages with the file either, so rewriting a library in place does not change the
//! code of a running image. The images appear in `/proc/self/maps` as
//! `/memfd:<canonical path> (deleted)`, and the dynamic loader names them `/proc/self/fd/N`
//! (`dladdr`, `$ORIGIN`), so an `$ORIGIN`-relative rpath does not find a library's neighbours;
//! an absolute rpath does. Loading needs `/proc`: without it a load is refused, saying so.
//!
//! glibc matches an already loaded object by its name, so a name `/proc/self/fd/N` of an image
//! still loaded (the descriptor is closed after mapping, and numbers are reused) must never be
//! used again while that image lives: a probe with `RTLD_NOLOAD` finds such a name before the
//! copy is mapped, and the copy moves to another descriptor number. After `dlopen`, before any
//! of the library's code is called, the mapping holding one of its symbols must be the sealed
//! copy (same device and inode), or the load is refused; this check fails closed: an unreadable
//! `/proc/self/maps`, or a symbol in no mapping, is a refusal. `/proc/self/maps` is read as bytes
//! (a mapped file whose name is not UTF-8 changes nothing).
//!
//! **One version of a path at a time.** The record maps each canonical path to the
//! [`PluginLibrary`] this process holds for it and the identity of the file it was made from
//! (device, inode, size, modification and change times). Every load of the path compares the
//! file now at the path with that image: the same identity uses the held library without reading
//! the file; another identity hashes the file again, and the same bytes use the held library,
//! different bytes are the `StaleImage` refusal while the held library lives (drop every
//! function of the old version first), and a fresh load once it is gone.

use std::collections::HashMap;
use std::ffi::CString;
use std::fs::{File, Metadata};
use std::io::{Read, Seek, SeekFrom};
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::ffi::OsStringExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, Weak};

use super::PluginLibrary;
use crate::error::LoadError;
use crate::trust::Sha256Digest;

/// The largest library file that is loaded, in bytes: its sealed copy is held in memory.
pub const MAX_LIBRARY_BYTES: u64 = 4 << 30;

/// What tells two versions of a file apart without reading it. The change time cannot be set
/// back by the file's owner (only by changing the clock), so a rewrite in place that restores
/// the size and the modification time is still seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FileIdentity {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl FileIdentity {
    /// The identity of the file `metadata` describes.
    pub fn of(metadata: &Metadata) -> FileIdentity {
        FileIdentity {
            dev: metadata.dev(),
            ino: metadata.ino(),
            size: metadata.size(),
            mtime: (metadata.mtime(), metadata.mtime_nsec()),
            ctime: (metadata.ctime(), metadata.ctime_nsec()),
        }
    }
}

/// A held library and the identity of the file it was made from.
struct Held {
    library: Weak<PluginLibrary>,
    file: FileIdentity,
}

fn held_images() -> &'static Mutex<HashMap<PathBuf, Held>> {
    static HELD: OnceLock<Mutex<HashMap<PathBuf, Held>>> = OnceLock::new();
    HELD.get_or_init(Default::default)
}

/// The library this process holds for the canonical `path`, and the identity of the file it was
/// made from.
pub(crate) fn held(path: &Path) -> Option<(Arc<PluginLibrary>, FileIdentity)> {
    let mut held = held_images().lock().unwrap_or_else(|e| e.into_inner());
    let (library, file) = held
        .get(path)
        .map(|entry| (entry.library.upgrade(), entry.file))?;
    match library {
        Some(library) => Some((library, file)),
        None => {
            held.remove(path);
            None
        }
    }
}

/// Remembers that the file `file` at `path` has the bytes of the held `library` (the same digest
/// under a new identity: copied over, touched), so that the next load need not hash it again.
pub(crate) fn refresh(path: &Path, library: &Arc<PluginLibrary>, file: FileIdentity) {
    let mut held = held_images().lock().unwrap_or_else(|e| e.into_inner());
    if let Some(entry) = held.get_mut(path)
        && std::ptr::eq(entry.library.as_ptr(), Arc::as_ptr(library))
    {
        entry.file = file;
    }
}

/// Records `library`, just mapped from the file `file` at `path`, as the one this process holds
/// for the path. When another load of the path won a race: the same bytes give that one (this
/// one is dropped), other bytes are `StaleImage`.
pub(crate) fn record(
    path: &Path,
    library: Arc<PluginLibrary>,
    file: FileIdentity,
) -> Result<Arc<PluginLibrary>, LoadError> {
    let mut held = held_images().lock().unwrap_or_else(|e| e.into_inner());
    if let Some(first) = held.get(path).and_then(|h| h.library.upgrade()) {
        drop(held);
        // `library` drops here, outside the lock (it unloads its image).
        return if first.sha256() == library.sha256() {
            Ok(first)
        } else {
            Err(stale(path, &first, library.sha256()))
        };
    }
    held.insert(
        path.to_path_buf(),
        Held {
            library: Arc::downgrade(&library),
            file,
        },
    );
    Ok(library)
}

/// The refusal of a file at `path` with digest `file` while `held` (other bytes) lives.
pub(crate) fn stale(path: &Path, held: &PluginLibrary, file: &Sha256Digest) -> LoadError {
    LoadError::StaleImage {
        path: path.to_path_buf(),
        mapped: format!("SHA-256 {}", held.sha256()),
        file: *file,
    }
}

/// A sealed in-memory copy of a library file: the bytes that were hashed and will be mapped.
pub(crate) struct SealedCopy {
    memfd: File,
    dev: u64,
    ino: u64,
    sha256: Sha256Digest,
}

// `MFD_EXEC` (Linux 6.3): the copy may be mapped executable even where `vm.memfd_noexec` = 1
// makes memory files non-executable by default. Older kernels refuse the flag (EINVAL).
const MFD_EXEC: libc::c_uint = 0x0010;
const SEALS: libc::c_int =
    libc::F_SEAL_SEAL | libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_WRITE;
/// The seals when `F_SEAL_WRITE` stays busy: `F_SEAL_FUTURE_WRITE` (Linux 5.1) refuses every
/// later write and every new writable shared mapping just the same, but does not wait for pages
/// that still hold references. The kernel answers `F_SEAL_WRITE` with EBUSY while a page of the
/// file just written is still referenced, e.g. from another CPU's LRU batch under load (seen in
/// CI); this process holds the only descriptor and made no shared mapping, so nothing can write
/// to the copy either way.
const FUTURE_SEALS: libc::c_int =
    libc::F_SEAL_SEAL | libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_FUTURE_WRITE;

/// Seals `memfd` against every change: [`SEALS`], retried a few times while busy, then
/// [`FUTURE_SEALS`].
fn seal(memfd: &File) -> std::io::Result<()> {
    let add = |seals: libc::c_int| {
        // SAFETY: fcntl on a descriptor the caller owns; F_ADD_SEALS takes an int argument.
        let added = unsafe { libc::fcntl(memfd.as_raw_fd(), libc::F_ADD_SEALS, seals) };
        if added == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    };
    let mut outcome = add(SEALS);
    for pause_ms in [1, 5, 20] {
        match &outcome {
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                std::thread::sleep(std::time::Duration::from_millis(pause_ms));
                outcome = add(SEALS);
            }
            _ => break,
        }
    }
    if matches!(&outcome, Err(e) if e.raw_os_error() == Some(libc::EBUSY)) {
        outcome = add(FUTURE_SEALS);
    }
    outcome?;
    // SAFETY: as above; F_GET_SEALS takes no argument.
    let seals = unsafe { libc::fcntl(memfd.as_raw_fd(), libc::F_GET_SEALS) };
    if seals < 0 {
        return Err(std::io::Error::last_os_error());
    }
    if seals & SEALS != SEALS && seals & FUTURE_SEALS != FUTURE_SEALS {
        return Err(std::io::Error::other(format!(
            "the seals are {seals:#x} after sealing"
        )));
    }
    Ok(())
}

impl SealedCopy {
    /// Copies the open `file` (the library at `path`) into a sealed memory file and hashes the
    /// sealed bytes.
    pub(crate) fn of(path: &Path, file: &File) -> Result<SealedCopy, LoadError> {
        let fail = |what: &str, e: std::io::Error| LoadError::Read {
            path: path.to_path_buf(),
            source: std::io::Error::new(e.kind(), format!("{what}: {e}")),
        };
        let memfd = memfd_for(path).map_err(|e| fail("creating its in-memory copy", e))?;
        let mut writer = &memfd;
        let copied = std::io::copy(&mut file.take(MAX_LIBRARY_BYTES + 1), &mut writer)
            .map_err(|e| fail("copying it into memory", e))?;
        if copied > MAX_LIBRARY_BYTES {
            return Err(LoadError::Read {
                path: path.to_path_buf(),
                source: std::io::Error::new(
                    std::io::ErrorKind::FileTooLarge,
                    format!("it is larger than {MAX_LIBRARY_BYTES} bytes, the most that is loaded"),
                ),
            });
        }
        seal(&memfd).map_err(|e| fail("sealing its in-memory copy", e))?;
        let metadata = memfd
            .metadata()
            .map_err(|e| fail("inspecting its in-memory copy", e))?;
        let mut reader = &memfd;
        reader
            .seek(SeekFrom::Start(0))
            .map_err(|e| fail("reading its in-memory copy", e))?;
        let sha256 =
            Sha256Digest::of_reader(reader).map_err(|e| fail("hashing its in-memory copy", e))?;
        Ok(SealedCopy {
            dev: metadata.dev(),
            ino: metadata.ino(),
            memfd,
            sha256,
        })
    }

    /// The digest of the sealed bytes.
    pub(crate) fn sha256(&self) -> &Sha256Digest {
        &self.sha256
    }

    /// Maps the sealed copy with `dlopen(flags)` (which runs the library's initialisers: the
    /// pinned bytes), through a `/proc/self/fd/N` name no loaded object has. The descriptor is
    /// closed afterwards: the mapping keeps the copy alive.
    pub(crate) fn map(
        self,
        path: &Path,
        flags: libc::c_int,
    ) -> Result<(dlopen2::raw::Library, MappedCopy), LoadError> {
        let open_error = |message: String| LoadError::Open {
            path: path.to_path_buf(),
            message,
        };
        let mut memfd = self.memfd;
        let mut tries = 0;
        let name = loop {
            let name = PathBuf::from(format!("/proc/self/fd/{}", memfd.as_raw_fd()));
            if let Err(e) = std::fs::metadata(&name) {
                return Err(open_error(format!(
                    "its sealed copy cannot be reached as {} ({e}); loading plugin libraries \
                     needs /proc to be mounted",
                    name.display()
                )));
            }
            if !name_in_use(&name) {
                break name;
            }
            // An image still loaded from an earlier copy has that name: move to another
            // descriptor number.
            tries += 1;
            if tries > 1024 {
                return Err(open_error(
                    "no free /proc/self/fd/N name to map its sealed copy".to_string(),
                ));
            }
            memfd = dup_above(&memfd).map_err(|e| {
                open_error(format!(
                    "cannot move its sealed copy to another descriptor: {e}"
                ))
            })?;
        };
        // The loader's messages name the copy; they are about the library.
        let library = dlopen2::raw::Library::open_with_flags(&name, Some(flags)).map_err(|e| {
            open_error(
                super::library::dl_message(e)
                    .replace(&*name.to_string_lossy(), &path.display().to_string()),
            )
        })?;
        drop(memfd);
        let mapped = MappedCopy {
            dev: self.dev,
            ino: self.ino,
            sha256: self.sha256,
        };
        Ok((library, mapped))
    }
}

/// What is known of a sealed copy once it is mapped.
pub(crate) struct MappedCopy {
    dev: u64,
    ino: u64,
    sha256: Sha256Digest,
}

impl MappedCopy {
    /// After `dlopen`, before any of the library's code is called by the host: the mapping that
    /// holds `address` (a symbol of the library) must be the sealed copy. Fails closed.
    pub(crate) fn check(&self, path: &Path, address: usize) -> Result<(), LoadError> {
        let maps = mappings().map_err(|e| LoadError::Open {
            path: path.to_path_buf(),
            message: format!(
                "cannot check which image the dynamic loader mapped: /proc/self/maps: {e}; \
                 refusing to run it"
            ),
        })?;
        match maps.iter().find(|m| m.start <= address && address < m.end) {
            Some(m) if m.inode == self.ino && same_device(m, self.dev) => Ok(()),
            Some(m) => Err(LoadError::StaleImage {
                path: path.to_path_buf(),
                mapped: format!("inode {}, mapped from {}", m.inode, m.path.display()),
                file: self.sha256,
            }),
            None => Err(LoadError::Open {
                path: path.to_path_buf(),
                message: format!(
                    "its symbol at {address:#x} lies in no mapping of /proc/self/maps; refusing \
                     to run it"
                ),
            }),
        }
    }
}

/// A memory file for a copy of `path`, named after the path (its last 249 bytes, the most a
/// memory file's name may hold), close-on-exec, sealable and executable.
fn memfd_for(path: &Path) -> std::io::Result<File> {
    let bytes = path.as_os_str().as_bytes();
    let tail = &bytes[bytes.len().saturating_sub(249)..];
    let name = CString::new(tail).map_err(std::io::Error::other)?;
    let base = libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING;
    // SAFETY: `name` is a NUL-terminated string that outlives the call; the flags are defined.
    let mut fd = unsafe { libc::memfd_create(name.as_ptr(), base | MFD_EXEC) };
    if fd < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EINVAL) {
        // SAFETY: as above, without MFD_EXEC (kernels before 6.3).
        fd = unsafe { libc::memfd_create(name.as_ptr(), base) };
    }
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by memfd_create, is open, and nothing else owns it.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// Whether the dynamic loader has an object loaded under `name` (`RTLD_NOLOAD` loads nothing;
/// it finds an object by name, or by the device and inode of the file `name` opens).
fn name_in_use(name: &Path) -> bool {
    let Ok(name) = CString::new(name.as_os_str().as_bytes()) else {
        return true;
    };
    // SAFETY: `name` is NUL-terminated and outlives the call; with RTLD_NOLOAD nothing is
    // mapped and no initialiser runs. (dlopen2 cannot be used here: it reads `dlerror()`, which is
    // null when RTLD_NOLOAD finds nothing.)
    let handle = unsafe { libc::dlopen(name.as_ptr(), libc::RTLD_NOLOAD | libc::RTLD_LAZY) };
    if handle.is_null() {
        return false;
    }
    // SAFETY: `handle` was just returned by dlopen, which counted a reference; this gives it
    // back (the object stays loaded for whoever loaded it).
    unsafe { libc::dlclose(handle) };
    true
}

/// A close-on-exec duplicate of `file` on a higher descriptor number than its own.
fn dup_above(file: &File) -> std::io::Result<File> {
    let fd = file.as_raw_fd();
    // SAFETY: fcntl on an open descriptor; F_DUPFD_CLOEXEC takes the lowest number to use.
    let new = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, fd + 1) };
    if new < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `new` was just returned by fcntl, is open, and nothing else owns it.
    Ok(unsafe { File::from_raw_fd(new) })
}

/// One line of `/proc/self/maps`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Mapping {
    /// First address.
    pub start: usize,
    /// One past the last address.
    pub end: usize,
    /// Device major number.
    pub major: u32,
    /// Device minor number.
    pub minor: u32,
    /// Inode (0 for anonymous mappings).
    pub inode: u64,
    /// The path as the kernel writes it (any bytes), with ` (deleted)` if the file was unlinked.
    pub path: PathBuf,
}

/// The mappings of this process, read as bytes.
pub(crate) fn mappings() -> std::io::Result<Vec<Mapping>> {
    let bytes = std::fs::read("/proc/self/maps")?;
    Ok(bytes
        .split(|&b| b == b'\n')
        .filter_map(parse_mapping)
        .collect())
}

fn parse_mapping(line: &[u8]) -> Option<Mapping> {
    let mut fields = line.splitn(6, |&b| b == b' ');
    let text = |field: &[u8]| std::str::from_utf8(field).ok().map(str::to_string);
    let range = text(fields.next()?)?;
    let _perms = fields.next()?;
    let _offset = fields.next()?;
    let device = text(fields.next()?)?;
    let inode = text(fields.next()?)?;
    let path = fields.next().unwrap_or(b"");
    let path = &path[path.iter().take_while(|&&b| b == b' ').count()..];
    let (start, end) = range.split_once('-')?;
    let (major, minor) = device.split_once(':')?;
    Some(Mapping {
        start: usize::from_str_radix(start, 16).ok()?,
        end: usize::from_str_radix(end, 16).ok()?,
        major: u32::from_str_radix(major, 16).ok()?,
        minor: u32::from_str_radix(minor, 16).ok()?,
        inode: inode.parse().ok()?,
        path: PathBuf::from(std::ffi::OsString::from_vec(path.to_vec())),
    })
}

fn same_device(m: &Mapping, dev: u64) -> bool {
    libc::major(dev) == m.major && libc::minor(dev) == m.minor
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_lines_parse() {
        let m = parse_mapping(
            b"7f29a0ef9000-7f29a104f000 r-xp 00026000 fe:00 326279                     /usr/lib/libc.so.6",
        )
        .unwrap();
        assert_eq!((m.start, m.end), (0x7f29a0ef9000, 0x7f29a104f000));
        assert_eq!((m.major, m.minor, m.inode), (0xfe, 0, 326279));
        assert_eq!(m.path, Path::new("/usr/lib/libc.so.6"));
        let deleted =
            parse_mapping(b"1000-2000 r--p 00000000 08:01 42 /p/lib.so (deleted)").unwrap();
        assert_eq!(deleted.path, Path::new("/p/lib.so (deleted)"));
        let anonymous = parse_mapping(b"1000-2000 rw-p 00000000 00:00 0 ").unwrap();
        assert_eq!((anonymous.inode, anonymous.path.as_os_str().len()), (0, 0));
        let not_utf8 = parse_mapping(b"1000-2000 r--p 00000000 08:01 43 /p/\xff.bin").unwrap();
        assert_eq!(not_utf8.path.as_os_str().as_bytes(), b"/p/\xff.bin");
    }

    #[test]
    fn this_process_has_mappings() {
        let maps = mappings().expect("/proc/self/maps is readable on Linux");
        let here = maps_lines_parse as fn() as usize;
        assert!(maps.iter().any(|m| m.start <= here && here < m.end));
    }
}
