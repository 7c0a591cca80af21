//! The libraries of a plugin directory that may be loaded at start-up (`udfsql --plugin-dir`,
//! `udfsql-server --plugin-dir`): one policy for every program that loads a whole directory.
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};

use crate::trust::{InsecurePath, check_not_writable_by_others};

/// Why a plugin directory, or a library in it, is refused. Nothing of the directory should be
/// loaded when this is returned.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PluginDirError {
    /// The directory does not exist, cannot be resolved to a canonical path, or cannot be listed.
    #[error("plugin directory {dir}: {source}")]
    Unreadable {
        /// The directory as given.
        dir: PathBuf,
        /// What the file system said.
        source: std::io::Error,
    },
    /// The path names something that is not a directory.
    #[error("plugin directory {dir} is not a directory")]
    NotADirectory {
        /// The directory, canonical.
        dir: PathBuf,
    },
    /// The directory, or a directory above it, could have been written by another user.
    #[error(
        "plugin directory {dir}: {problem}; its libraries could have been written by other users"
    )]
    InsecureDirectory {
        /// The plugin directory, canonical.
        dir: PathBuf,
        /// The directory at fault (the plugin directory or one above it) and why.
        problem: InsecurePath,
    },
    /// A library entry (a symlink, usually) cannot be resolved.
    #[error("plugin library {library} cannot be resolved: {source}")]
    Unresolvable {
        /// The entry in the plugin directory.
        library: PathBuf,
        /// What the file system said.
        source: std::io::Error,
    },
    /// A library entry is a symlink to a file outside the plugin directory.
    #[error(
        "plugin library {library} resolves to {target}, which is outside the plugin directory \
         {dir}; copy the library into the directory or add its own directory with --plugin-dir"
    )]
    OutsideDirectory {
        /// The entry in the plugin directory.
        library: PathBuf,
        /// What it resolves to.
        target: PathBuf,
        /// The plugin directory, canonical.
        dir: PathBuf,
    },
    /// A library entry resolves to something other than a regular file.
    #[error("plugin library {library} is not a regular file (it is {kind}); refusing to open it")]
    NotARegularFile {
        /// The library, canonical.
        library: PathBuf,
        /// What it is instead (a directory, a FIFO, ...).
        kind: &'static str,
    },
    /// The library file could have been written by another user.
    #[error(
        "plugin library {library}: {problem}; refusing to load code that other users could have written"
    )]
    InsecureLibrary {
        /// The library, canonical.
        library: PathBuf,
        /// The file at fault and why.
        problem: InsecurePath,
    },
}

/// The shared libraries of the plugin directory `dir` that may be loaded, as canonical paths in
/// the order of their names, each once.
///
/// The rules, the same ones `CREATE FUNCTION` applies to a library it loads (see
/// [`check_not_writable_by_others`]):
///
/// * `dir` is canonicalised first (`..` and symlinks resolved), so the directories checked are
///   the ones that really hold the libraries, not those of a symlink's path; it must be a
///   directory that neither it nor any directory above it can be written by another user.
/// * The libraries are the entries [`libraries_in`](crate::libraries_in) lists: names with the
///   platform's library extension (`.so`) that resolve to a regular file. Entries that do not
///   (directories, FIFOs, sockets, devices, dangling symlinks) are not listed and never opened.
/// * Each library is canonicalised. A symlink in the directory is followed, and its target must
///   lie inside `dir` (canonical; subdirectories included); a symlink that leads anywhere else is
///   refused, so that the directory's permissions are what protects every library loaded from it.
///   Symlinks are allowed at all so that the usual `libfoo.so -> libfoo.so.1` layout works.
/// * The resolved file must be a regular file (checked again after resolving, without opening
///   it) and must pass the permission rules itself: owned by root or the running user, and not
///   writable by its group or by others.
///
/// The first library or directory that breaks a rule is returned as the error: a directory is
/// loaded entirely or not at all.
pub fn trusted_libraries_in(dir: &Path) -> Result<Vec<PathBuf>, PluginDirError> {
    let canonical = std::fs::canonicalize(dir).map_err(|source| PluginDirError::Unreadable {
        dir: dir.to_path_buf(),
        source,
    })?;
    let meta = std::fs::metadata(&canonical).map_err(|source| PluginDirError::Unreadable {
        dir: dir.to_path_buf(),
        source,
    })?;
    if !meta.is_dir() {
        return Err(PluginDirError::NotADirectory { dir: canonical });
    }
    check_not_writable_by_others(&canonical).map_err(|problem| {
        PluginDirError::InsecureDirectory {
            dir: canonical.clone(),
            problem,
        }
    })?;
    let entries = crate::libraries_in(&canonical).map_err(|source| PluginDirError::Unreadable {
        dir: dir.to_path_buf(),
        source,
    })?;
    let mut libraries: Vec<PathBuf> = Vec::with_capacity(entries.len());
    for entry in entries {
        let library = trusted_library(&canonical, &entry)?;
        if !libraries.contains(&library) {
            libraries.push(library);
        }
    }
    Ok(libraries)
}

/// Applies the rules of [`trusted_libraries_in`] to one `entry` of the canonical directory `dir`.
fn trusted_library(dir: &Path, entry: &Path) -> Result<PathBuf, PluginDirError> {
    let library = std::fs::canonicalize(entry).map_err(|source| PluginDirError::Unresolvable {
        library: entry.to_path_buf(),
        source,
    })?;
    if !library.starts_with(dir) {
        return Err(PluginDirError::OutsideDirectory {
            library: entry.to_path_buf(),
            target: library,
            dir: dir.to_path_buf(),
        });
    }
    // `symlink_metadata` of a canonical path: the file itself, never opened.
    let meta =
        std::fs::symlink_metadata(&library).map_err(|source| PluginDirError::Unresolvable {
            library: entry.to_path_buf(),
            source,
        })?;
    let kind = file_kind(&meta.file_type());
    if kind != "a regular file" {
        return Err(PluginDirError::NotARegularFile { library, kind });
    }
    check_not_writable_by_others(&library).map_err(|problem| PluginDirError::InsecureLibrary {
        library: library.clone(),
        problem,
    })?;
    Ok(library)
}

/// What kind of file `file_type` is, for messages.
fn file_kind(file_type: &std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if file_type.is_file() {
        "a regular file"
    } else if file_type.is_dir() {
        "a directory"
    } else if file_type.is_symlink() {
        "a symbolic link"
    } else if file_type.is_fifo() {
        "a FIFO"
    } else if file_type.is_socket() {
        "a socket"
    } else if file_type.is_block_device() {
        "a block device"
    } else if file_type.is_char_device() {
        "a character device"
    } else {
        "not a regular file"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("udf-plugin-dir-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        set_mode(&dir, 0o755);
        dir
    }

    fn set_mode(path: &Path, mode: u32) {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn lists_canonical_libraries_once_and_follows_symlinks_inside() {
        let dir = scratch("ok");
        let real = dir.join("libreal.so.1");
        std::fs::write(&real, b"not really a library").unwrap();
        set_mode(&real, 0o755);
        std::os::unix::fs::symlink("libreal.so.1", dir.join("libreal.so")).unwrap();
        std::os::unix::fs::symlink("libreal.so.1", dir.join("libalias.so")).unwrap();
        std::fs::write(dir.join("notes.txt"), b"").unwrap();
        let found = trusted_libraries_in(&dir).unwrap();
        assert_eq!(
            found,
            vec![dir.canonicalize().unwrap().join("libreal.so.1")]
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn refuses_a_symlink_out_of_the_directory() {
        let dir = scratch("out");
        let outside = scratch("out-target");
        let target = outside.join("libelsewhere.so");
        std::fs::write(&target, b"").unwrap();
        set_mode(&target, 0o644);
        std::os::unix::fs::symlink(&target, dir.join("libelsewhere.so")).unwrap();
        let e = trusted_libraries_in(&dir).unwrap_err();
        assert!(matches!(e, PluginDirError::OutsideDirectory { .. }), "{e}");
        let text = e.to_string();
        assert!(text.contains("outside the plugin directory"), "{text}");
        assert!(text.contains("libelsewhere.so"), "{text}");
        std::fs::remove_dir_all(&dir).unwrap();
        std::fs::remove_dir_all(&outside).unwrap();
    }

    #[test]
    fn refuses_a_group_writable_library_and_directory() {
        let dir = scratch("perm");
        let lib = dir.join("libw.so");
        std::fs::write(&lib, b"").unwrap();
        set_mode(&lib, 0o664);
        let e = trusted_libraries_in(&dir).unwrap_err().to_string();
        assert!(
            e.contains("libw.so") && e.contains("writable by its group"),
            "{e}"
        );
        set_mode(&lib, 0o644);
        set_mode(&dir, 0o775);
        let e = trusted_libraries_in(&dir).unwrap_err();
        assert!(matches!(e, PluginDirError::InsecureDirectory { .. }), "{e}");
        set_mode(&dir, 0o755);
        assert_eq!(trusted_libraries_in(&dir).unwrap().len(), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_file_is_not_a_directory() {
        let dir = scratch("file");
        let file = dir.join("plain");
        std::fs::write(&file, b"").unwrap();
        let e = trusted_libraries_in(&file).unwrap_err();
        assert!(matches!(e, PluginDirError::NotADirectory { .. }), "{e}");
        let e = trusted_libraries_in(&dir.join("missing")).unwrap_err();
        assert!(e.to_string().contains("missing"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
