//! Who may connect: the users file shared by the PostgreSQL and Flight SQL servers, and the TLS
//! identity they present.
//!
//! The users file has one `name:password` per line (`#` starts a comment line; blank lines are
//! skipped). It holds passwords, so it must not be readable or writable by group or others (as
//! `ssh` treats its keys): a file with such a mode is refused at start-up, naming it. Names are
//! 1–63 bytes without `:` or control characters, passwords 1–1024 bytes; at most 10,000 users.
//!
//! The PostgreSQL server checks passwords with SCRAM-SHA-256 (the password never crosses the
//! wire; each user's salted password is derived at start-up with a random salt), the Flight SQL
//! server with HTTP basic credentials (compared in constant time), which are only safe over TLS.

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, bail};

/// The most users a users file may hold.
pub const MAX_USERS: usize = 10_000;

/// The longest users file, in bytes.
const MAX_USERS_FILE: u64 = 4 * 1024 * 1024;

/// The longest user name, in bytes (PostgreSQL's identifier length).
const MAX_NAME: usize = 63;

/// The longest password, in bytes.
const MAX_PASSWORD: usize = 1024;

/// SCRAM's iteration count (RFC 7677's minimum, PostgreSQL's default).
pub const SCRAM_ITERATIONS: usize = 4096;

/// One user: the password and its SCRAM-SHA-256 salted form.
#[derive(Clone)]
pub(crate) struct User {
    password: String,
    pub(crate) salt: Vec<u8>,
    pub(crate) salted_password: Vec<u8>,
}

/// The users who may connect, or nobody named (no authentication).
#[derive(Clone, Default)]
pub struct Users {
    users: Option<Arc<HashMap<String, User>>>,
    /// The server's secret for the salts of unknown users (see [`Users::decoy_salt`]).
    secret: [u8; 32],
}

impl std::fmt::Debug for Users {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.users {
            None => f.write_str("Users(open)"),
            Some(users) => write!(f, "Users({} users)", users.len()),
        }
    }
}

impl Users {
    /// No authentication: every client may connect (allowed on loopback only).
    pub fn open() -> Users {
        Users {
            users: None,
            secret: [0; 32],
        }
    }

    /// The users of `path` (see the module docs for its format and mode).
    pub fn from_file(path: &Path) -> anyhow::Result<Users> {
        let file = std::fs::File::open(path)
            .with_context(|| format!("cannot open the users file {}", path.display()))?;
        let meta = file
            .metadata()
            .with_context(|| format!("cannot stat the users file {}", path.display()))?;
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = meta.permissions().mode();
            if mode & 0o077 != 0 {
                bail!(
                    "the users file {} has mode {:o}: it holds passwords, so group and others \
                     must have no access (chmod 600)",
                    path.display(),
                    mode & 0o777
                );
            }
        }
        let mut text = String::new();
        file.take(MAX_USERS_FILE + 1)
            .read_to_string(&mut text)
            .with_context(|| format!("the users file {} is not UTF-8 text", path.display()))?;
        if text.len() as u64 > MAX_USERS_FILE {
            bail!(
                "the users file {} is larger than {MAX_USERS_FILE} bytes",
                path.display()
            );
        }
        Users::parse(&text).with_context(|| format!("in the users file {}", path.display()))
    }

    /// The users of a users file's text.
    pub fn parse(text: &str) -> anyhow::Result<Users> {
        let mut users = HashMap::new();
        for (number, line) in text.lines().enumerate() {
            let line_no = number + 1;
            let line = line.trim_end_matches('\r');
            if line.trim().is_empty() || line.trim_start().starts_with('#') {
                continue;
            }
            let Some((name, password)) = line.split_once(':') else {
                bail!("line {line_no}: expected name:password");
            };
            if name.is_empty() || name.len() > MAX_NAME || name.chars().any(char::is_control) {
                bail!(
                    "line {line_no}: a user name is 1 to {MAX_NAME} bytes without control characters"
                );
            }
            if password.is_empty() || password.len() > MAX_PASSWORD {
                bail!("line {line_no}: user {name}: a password is 1 to {MAX_PASSWORD} bytes");
            }
            if users.len() >= MAX_USERS {
                bail!("more than {MAX_USERS} users");
            }
            let salt = random_bytes::<16>()?.to_vec();
            let salted_password = pgwire::api::auth::sasl::scram::gen_salted_password(
                password,
                &salt,
                SCRAM_ITERATIONS,
            );
            let user = User {
                password: password.to_string(),
                salt,
                salted_password,
            };
            if users.insert(name.to_string(), user).is_some() {
                bail!("line {line_no}: user {name} is listed twice");
            }
        }
        if users.is_empty() {
            bail!("no user is listed");
        }
        Ok(Users {
            users: Some(Arc::new(users)),
            secret: random_bytes::<32>()?,
        })
    }

    /// Whether no authentication is configured.
    pub fn is_open(&self) -> bool {
        self.users.is_none()
    }

    /// Whether `name` with `password` may connect (always, when open). Compares in time that
    /// does not depend on where the passwords differ.
    pub fn check(&self, name: &str, password: &str) -> bool {
        let Some(users) = &self.users else {
            return true;
        };
        match users.get(name) {
            Some(user) => constant_time_eq(user.password.as_bytes(), password.as_bytes()),
            None => {
                // The same work as for a known user.
                constant_time_eq(password.as_bytes(), password.as_bytes());
                false
            }
        }
    }

    /// The SCRAM salt offered to `name` when no such user is listed: the same for the same name
    /// on every attempt (a random one each time would tell which users exist), derived from a
    /// secret drawn at start-up.
    pub(crate) fn decoy_salt(&self, name: &str) -> Vec<u8> {
        use sha2::Digest;
        let mut hash = sha2::Sha256::new();
        hash.update(self.secret);
        hash.update(name.as_bytes());
        hash.finalize()[..16].to_vec()
    }

    /// The user `name`, when authentication is configured and it is listed.
    pub(crate) fn get(&self, name: &str) -> Option<&User> {
        self.users.as_ref()?.get(name)
    }
}

/// Whether `a` and `b` are equal, in time that depends on their lengths only.
pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = u8::from(a.len() != b.len());
    for (i, x) in a.iter().enumerate() {
        diff |= x ^ b.get(i).copied().unwrap_or(!x);
    }
    diff == 0
}

/// `N` random bytes from the kernel.
pub(crate) fn random_bytes<const N: usize>() -> anyhow::Result<[u8; N]> {
    let mut bytes = [0u8; N];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .context("cannot read random bytes from /dev/urandom")?;
    Ok(bytes)
}

/// A TLS identity: certificate chain and private key, PEM.
#[derive(Clone)]
pub struct TlsIdentity {
    /// The certificate chain, PEM.
    pub cert_pem: Vec<u8>,
    /// The private key, PEM (PKCS#8, PKCS#1 or SEC1).
    pub key_pem: Vec<u8>,
}

impl std::fmt::Debug for TlsIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsIdentity").finish_non_exhaustive()
    }
}

impl TlsIdentity {
    /// Reads a certificate chain and a key from PEM files, checking that they parse.
    pub fn from_files(cert: &Path, key: &Path) -> anyhow::Result<TlsIdentity> {
        let read = |p: &Path, what: &str| {
            let mut bytes = Vec::new();
            std::fs::File::open(p)
                .and_then(|f| f.take(MAX_USERS_FILE + 1).read_to_end(&mut bytes))
                .with_context(|| format!("cannot read the TLS {what} {}", p.display()))?;
            if bytes.len() as u64 > MAX_USERS_FILE {
                bail!("the TLS {what} {} is too large", p.display());
            }
            Ok(bytes)
        };
        let identity = TlsIdentity {
            cert_pem: read(cert, "certificate")?,
            key_pem: read(key, "key")?,
        };
        identity
            .rustls_config()
            .with_context(|| format!("TLS with {} and {}", cert.display(), key.display()))?;
        Ok(identity)
    }

    /// A rustls server configuration presenting this identity.
    pub(crate) fn rustls_config(&self) -> anyhow::Result<tokio_rustls::rustls::ServerConfig> {
        use tokio_rustls::rustls;
        let certs = rustls_pemfile::certs(&mut self.cert_pem.as_slice())
            .collect::<Result<Vec<_>, _>>()
            .context("the certificate is not PEM")?;
        if certs.is_empty() {
            bail!("no certificate in the certificate file");
        }
        let key = rustls_pemfile::private_key(&mut self.key_pem.as_slice())
            .context("the key is not PEM")?
            .context("no private key in the key file")?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .context("TLS protocol versions")?
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .context("the key does not match the certificate")?;
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_file_lines() {
        let users = Users::parse("# who\nalice:s3cret\n\nbob:pa:ss\n").unwrap();
        assert!(users.check("alice", "s3cret"));
        assert!(users.check("bob", "pa:ss"));
        assert!(!users.check("alice", "s3cre"));
        assert!(!users.check("alice", "s3cret "));
        assert!(!users.check("carol", "s3cret"));
        assert!(!users.is_open());
        assert!(Users::open().check("anyone", ""));
        assert_eq!(users.decoy_salt("mallory"), users.decoy_salt("mallory"));
        assert_ne!(users.decoy_salt("mallory"), users.decoy_salt("mallorz"));
        assert_eq!(
            users.decoy_salt("x").len(),
            users.get("alice").unwrap().salt.len()
        );
        for (text, needle) in [
            ("alice", "expected name:password"),
            (":x", "user name"),
            ("alice:", "password"),
            ("a:1\na:2", "twice"),
            ("# nobody", "no user"),
        ] {
            let e = Users::parse(text).err().unwrap().to_string();
            assert!(e.contains(needle), "{text:?}: {e}");
        }
    }

    #[test]
    fn constant_time_eq_is_eq() {
        for (a, b) in [
            ("", ""),
            ("a", "a"),
            ("a", "b"),
            ("ab", "a"),
            ("a", "ab"),
            ("", "x"),
        ] {
            assert_eq!(
                constant_time_eq(a.as_bytes(), b.as_bytes()),
                a == b,
                "{a} {b}"
            );
        }
    }
}
