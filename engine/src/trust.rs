//! The trust policy for libraries loaded from SQL: who may have written them (file and directory
//! permissions), and which exact bytes were meant (SHA-256 pinning).

use std::fmt;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use sha2::{Digest, Sha256};

/// A SHA-256 digest of a library file, written as 64 hexadecimal digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Sha256Digest([u8; 32]);

impl Sha256Digest {
    /// The digest of `bytes`.
    pub fn of_bytes(bytes: &[u8]) -> Sha256Digest {
        Sha256Digest(Sha256::digest(bytes).into())
    }

    /// The digest of everything `reader` yields.
    pub fn of_reader(mut reader: impl Read) -> std::io::Result<Sha256Digest> {
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => hasher.update(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(Sha256Digest(hasher.finalize().into()))
    }

    /// The digest of the file at `path` (what `udfsql hash FILE` prints).
    pub fn of_file(path: impl AsRef<Path>) -> std::io::Result<Sha256Digest> {
        Self::of_reader(std::fs::File::open(path)?)
    }

    /// The 32 bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Display for Sha256Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Sha256Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Sha256Digest({self})")
    }
}

/// Why a string is not a SHA-256 digest.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("'{text}' is not a SHA-256 digest: expected 64 hexadecimal digits, {reason}")]
pub struct DigestParseError {
    text: String,
    reason: String,
}

impl FromStr for Sha256Digest {
    type Err = DigestParseError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let fail = |reason: String| DigestParseError {
            text: text.to_string(),
            reason,
        };
        let chars: Vec<char> = text.chars().collect();
        if chars.len() != 64 {
            return Err(fail(format!("got {} characters", chars.len())));
        }
        let mut out = [0u8; 32];
        for (i, pair) in chars.chunks(2).enumerate() {
            let digit = |c: char| c.to_digit(16).ok_or_else(|| fail(format!("got '{c}'")));
            out[i] = (digit(pair[0])? * 16 + digit(pair[1])?) as u8;
        }
        Ok(Sha256Digest(out))
    }
}

/// Refuses the library at `path` whose digest is `actual` when a different `pin` is given.
pub(crate) fn check_pin(
    path: &Path,
    pin: Option<&Sha256Digest>,
    actual: &Sha256Digest,
) -> Result<(), crate::LoadError> {
    match pin {
        Some(expected) if expected != actual => Err(crate::LoadError::DigestMismatch {
            path: path.to_path_buf(),
            expected: *expected,
            actual: *actual,
        }),
        _ => Ok(()),
    }
}

/// A file or directory that other users could have written to, so that loading a library through
/// it would run their code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path} {reason}")]
pub struct InsecurePath {
    /// The file or directory at fault.
    pub path: PathBuf,
    /// What is wrong with it, and how to fix it.
    pub reason: String,
}

/// What is wrong with a file or directory of `mode` owned by `owner`, for a process running as
/// `euid`; `None` when only root or `euid` can change it.
///
/// Rules (OpenSSH's `StrictModes`, applied to code): the owner is root or the process's user; no
/// write permission for the group or for others, except on a directory with the sticky bit
/// (`/tmp`), where others cannot rename or remove what they do not own.
pub fn judge(mode: u32, owner: u32, euid: u32, is_dir: bool) -> Option<String> {
    if owner != 0 && owner != euid {
        return Some(format!(
            "is owned by uid {owner}, neither root nor this process's user (uid {euid})"
        ));
    }
    let sticky_dir = is_dir && mode & 0o1000 != 0;
    if sticky_dir {
        return None;
    }
    let who = match (mode & 0o020 != 0, mode & 0o002 != 0) {
        (false, false) => return None,
        (true, false) => "its group",
        (false, true) => "other users",
        (true, true) => "its group and other users",
    };
    Some(format!(
        "is writable by {who} (mode {:04o}); fix it with `chmod go-w`",
        mode & 0o7777
    ))
}

/// Checks `path` (canonical) and every directory above it up to `/` under [`judge`].
pub fn check_not_writable_by_others(path: &Path) -> Result<(), InsecurePath> {
    let euid = crate::ffi::effective_uid();
    for p in path.ancestors() {
        let meta = std::fs::metadata(p).map_err(|e| InsecurePath {
            path: p.to_path_buf(),
            reason: format!("cannot be inspected: {e}"),
        })?;
        if let Some(reason) = judge(meta.mode(), meta.uid(), euid, meta.is_dir()) {
            return Err(InsecurePath {
                path: p.to_path_buf(),
                reason,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_round_trips_through_hex() {
        let d = Sha256Digest::of_bytes(b"abc");
        // FIPS 180-2, appendix B.1.
        assert_eq!(
            d.to_string(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(d.to_string().parse::<Sha256Digest>(), Ok(d));
        assert_eq!(d.to_string().to_uppercase().parse::<Sha256Digest>(), Ok(d));
    }

    #[test]
    fn bad_digests_say_why() {
        let e = "abc".parse::<Sha256Digest>().unwrap_err().to_string();
        assert!(e.contains("got 3 characters"), "{e}");
        let e = "g"
            .repeat(64)
            .parse::<Sha256Digest>()
            .unwrap_err()
            .to_string();
        assert!(e.contains("got 'g'"), "{e}");
        // 64 bytes but not 64 characters: must not split a UTF-8 sequence.
        let e = "é"
            .repeat(32)
            .parse::<Sha256Digest>()
            .unwrap_err()
            .to_string();
        assert!(e.contains("32 characters"), "{e}");
    }

    #[test]
    fn judge_follows_the_rules() {
        let me = 1000;
        assert_eq!(judge(0o100755, me, me, false), None);
        assert_eq!(judge(0o100755, 0, me, false), None);
        assert_eq!(judge(0o40755, 0, 0, true), None);
        let e = judge(0o100755, 1001, me, false).unwrap();
        assert!(
            e.contains("owned by uid 1001") && e.contains("(uid 1000)"),
            "{e}"
        );
        let e = judge(0o100775, me, me, false).unwrap();
        assert!(e.contains("writable by its group (mode 0775)"), "{e}");
        let e = judge(0o40757, me, me, true).unwrap();
        assert!(e.contains("writable by other users (mode 0757)"), "{e}");
        let e = judge(0o40777, me, me, true).unwrap();
        assert!(e.contains("its group and other users"), "{e}");
        // /tmp: root's, world-writable, sticky.
        assert_eq!(judge(0o41777, 0, me, true), None);
        // The sticky bit means nothing on a file.
        assert!(judge(0o101777, me, me, false).is_some());
        // A sticky directory of someone else's is still someone else's.
        assert!(judge(0o41777, 1001, me, true).is_some());
    }
}
