//! The process-wide record of the library images this process mapped, and checks against the
//! real mappings in `/proc/self/maps`.
//!
//! glibc's `dlopen` matches an already loaded library by its path name: while an image of
//! `/plugins/lib.so` is mapped, opening that path again returns the old image, even when the file
//! on disk has been replaced since (renamed over, or rewritten in place). The digest and inode
//! checks of the new file would then vouch for code that is not the code that runs. So:
//!
//! * before `dlopen`, a load whose file differs (inode or SHA-256) from the image of the same path
//!   this process mapped earlier is refused while that image is still mapped;
//! * after `dlopen`, the mapping that holds one of the library's symbols must come from the file
//!   that was hashed (same inode, same path, not deleted): otherwise the dynamic loader handed back
//!   another image, and the load is refused before any of its code is called.

use std::collections::HashMap;
use std::fs::Metadata;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use crate::error::LoadError;
use crate::trust::Sha256Digest;

/// One mapped image: which file, which bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Image {
    dev: u64,
    ino: u64,
    sha256: Sha256Digest,
}

fn images() -> &'static Mutex<HashMap<PathBuf, Image>> {
    static IMAGES: OnceLock<Mutex<HashMap<PathBuf, Image>>> = OnceLock::new();
    IMAGES.get_or_init(Default::default)
}

/// One line of `/proc/self/maps`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Mapping {
    /// First address.
    pub start: usize,
    /// One past the last address.
    pub end: usize,
    /// Device as `major:minor`.
    pub major: u32,
    /// Device minor number.
    pub minor: u32,
    /// Inode (0 for anonymous mappings).
    pub inode: u64,
    /// The path, with the kernel's ` (deleted)` suffix if the file was unlinked.
    pub path: String,
}

/// The mappings of this process, or `None` where `/proc/self/maps` cannot be read.
pub(crate) fn mappings() -> Option<Vec<Mapping>> {
    let text = std::fs::read_to_string("/proc/self/maps").ok()?;
    Some(text.lines().filter_map(parse_mapping).collect())
}

fn parse_mapping(line: &str) -> Option<Mapping> {
    let mut fields = line.splitn(6, ' ');
    let range = fields.next()?;
    let _perms = fields.next()?;
    let _offset = fields.next()?;
    let device = fields.next()?;
    let inode = fields.next()?;
    let path = fields.next().unwrap_or("").trim_start().to_string();
    let (start, end) = range.split_once('-')?;
    let (major, minor) = device.split_once(':')?;
    Some(Mapping {
        start: usize::from_str_radix(start, 16).ok()?,
        end: usize::from_str_radix(end, 16).ok()?,
        major: u32::from_str_radix(major, 16).ok()?,
        minor: u32::from_str_radix(minor, 16).ok()?,
        inode: inode.parse().ok()?,
        path,
    })
}

fn same_device(m: &Mapping, dev: u64) -> bool {
    libc::major(dev) == m.major && libc::minor(dev) == m.minor
}

/// Whether the image recorded for a path (device and inode) is still mapped.
fn still_mapped(image: &Image) -> bool {
    mappings().is_some_and(|maps| {
        maps.iter()
            .any(|m| m.inode == image.ino && same_device(m, image.dev))
    })
}

/// Before `dlopen`: refuses `path` (a file with `metadata` and digest `sha256`) while an earlier,
/// different image of the same path is still mapped.
pub(crate) fn check_before_open(
    path: &Path,
    metadata: &Metadata,
    sha256: &Sha256Digest,
) -> Result<(), LoadError> {
    let earlier = images()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(path)
        .copied();
    let Some(earlier) = earlier else {
        return Ok(());
    };
    let now = Image {
        dev: metadata.dev(),
        ino: metadata.ino(),
        sha256: *sha256,
    };
    // Reading /proc/self/maps happens outside the lock.
    if earlier != now && still_mapped(&earlier) {
        return Err(LoadError::StaleImage {
            path: path.to_path_buf(),
            mapped: format!("SHA-256 {}", earlier.sha256),
            file: *sha256,
        });
    }
    Ok(())
}

/// After `dlopen`, before any of the library's code is called: the mapping that holds `address`
/// (a symbol of the library) must come from the file that was hashed. Records the image.
pub(crate) fn check_after_open(
    path: &Path,
    address: usize,
    metadata: &Metadata,
    sha256: &Sha256Digest,
) -> Result<(), LoadError> {
    // Where /proc is not mounted nothing can be observed; the pre-open record still applies.
    if let Some(maps) = mappings()
        && let Some(m) = maps.iter().find(|m| m.start <= address && address < m.end)
    {
        let expected = path.to_string_lossy();
        if m.inode != metadata.ino() || m.path != expected {
            return Err(LoadError::StaleImage {
                path: path.to_path_buf(),
                mapped: format!("inode {}, mapped from {}", m.inode, m.path),
                file: *sha256,
            });
        }
    }
    images().lock().unwrap_or_else(|e| e.into_inner()).insert(
        path.to_path_buf(),
        Image {
            dev: metadata.dev(),
            ino: metadata.ino(),
            sha256: *sha256,
        },
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_lines_parse() {
        let m = parse_mapping(
            "7f29a0ef9000-7f29a104f000 r-xp 00026000 fe:00 326279                     /usr/lib/libc.so.6",
        )
        .unwrap();
        assert_eq!((m.start, m.end), (0x7f29a0ef9000, 0x7f29a104f000));
        assert_eq!((m.major, m.minor, m.inode), (0xfe, 0, 326279));
        assert_eq!(m.path, "/usr/lib/libc.so.6");
        let deleted =
            parse_mapping("1000-2000 r--p 00000000 08:01 42 /p/lib.so (deleted)").unwrap();
        assert_eq!(deleted.path, "/p/lib.so (deleted)");
        let anonymous = parse_mapping("1000-2000 rw-p 00000000 00:00 0 ").unwrap();
        assert_eq!((anonymous.inode, anonymous.path.as_str()), (0, ""));
    }

    #[test]
    fn this_process_has_mappings() {
        let maps = mappings().expect("/proc/self/maps is readable on Linux");
        let here = maps_lines_parse as fn() as usize;
        assert!(maps.iter().any(|m| m.start <= here && here < m.end));
    }
}
