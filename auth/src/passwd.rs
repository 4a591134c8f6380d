//! The password file: one user per line, `name:PHC`, where PHC is an argon2id
//! hash string (`$argon2id$v=19$m=19456,t=2,p=1$salt$hash`). Blank lines and
//! lines starting with `#` are ignored.
//!
//! Invariants: every stored hash parses as a PHC string; user names are
//! unique and valid ([`validate_user_name`]). Rewrites ([`set_user`],
//! [`remove_user`]) keep the other lines as they were and replace the file
//! atomically (temporary sibling, mode 0600, fsync, rename), so a reader sees
//! the old file or the new one, never a mix. Errors name the file and the
//! line, never a hash.

use std::collections::HashMap;
use std::fmt;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::LazyLock;

use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};

use crate::AuthError;

/// Longest user name accepted, in characters.
pub const MAX_USER_NAME_CHARS: usize = 128;

/// argon2 memory cost in KiB (the OWASP minimum for argon2id).
const M_COST_KIB: u32 = 19_456;
/// argon2 passes.
const T_COST: u32 = 2;
/// argon2 lanes.
const P_COST: u32 = 1;

/// Verified against when the user is unknown, so that an unknown user costs
/// as much time as a wrong password. `None` only if hashing itself fails.
static DUMMY_HASH: LazyLock<Option<String>> =
    LazyLock::new(|| hash_password(b"edge-gateway: no such user").ok());

/// Users and their password hashes, as read from a password file.
#[derive(Clone, Default)]
pub struct PasswordFile {
    users: HashMap<String, String>,
}

impl fmt::Debug for PasswordFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PasswordFile")
            .field("users", &self.users.len())
            .finish()
    }
}

impl PasswordFile {
    /// Reads and parses the password file at `path`.
    pub fn load(path: &Path) -> Result<PasswordFile, AuthError> {
        let text = fs::read_to_string(path).map_err(|e| AuthError::io(path, e))?;
        // Hash the dummy now, not during the first login of an unknown user.
        LazyLock::force(&DUMMY_HASH);
        parse_lines(&text, path).map(|(file, _)| file)
    }

    /// Parses password file text (errors name the path `<text>`).
    pub fn parse(text: &str) -> Result<PasswordFile, AuthError> {
        parse_lines(text, Path::new("<text>")).map(|(file, _)| file)
    }

    /// Whether `password` is `user`'s password. An unknown user still costs
    /// one argon2 verification (against a fixed dummy hash), so timing does
    /// not tell which user names exist. CPU-heavy: call from a blocking thread.
    pub fn verify(&self, user: &str, password: &[u8]) -> bool {
        match self.users.get(user) {
            Some(phc) => verify_phc(phc, password),
            None => {
                if let Some(dummy) = DUMMY_HASH.as_deref() {
                    verify_phc(dummy, password);
                }
                false
            }
        }
    }

    /// Whether the file has an entry for `user`.
    pub fn contains(&self, user: &str) -> bool {
        self.users.contains_key(user)
    }

    /// Number of users.
    pub fn len(&self) -> usize {
        self.users.len()
    }

    /// Whether the file has no users.
    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }
}

fn verify_phc(phc: &str, password: &[u8]) -> bool {
    match PasswordHash::new(phc) {
        Ok(hash) => Argon2::default().verify_password(password, &hash).is_ok(),
        Err(_) => false,
    }
}

/// Whether `phc` is a complete argon2 PHC string: algorithm, valid params, salt and hash.
fn is_argon2_phc(phc: &str) -> bool {
    let Ok(hash) = PasswordHash::new(phc) else {
        return false;
    };
    Algorithm::try_from(hash.algorithm).is_ok()
        && Params::try_from(&hash).is_ok()
        && hash.salt.is_some()
        && hash.hash.is_some()
}

/// Parses `text`; also returns, per line (0-based), the user it defines.
fn parse_lines(text: &str, path: &Path) -> Result<(PasswordFile, Vec<Option<String>>), AuthError> {
    let mut users = HashMap::new();
    let mut first_line: HashMap<String, usize> = HashMap::new();
    let mut owners = Vec::new();
    for (index, raw) in text.lines().enumerate() {
        let line = index + 1;
        let parse_error = |reason: String| AuthError::Parse {
            path: path.to_path_buf(),
            line,
            reason,
        };
        let trimmed = raw.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            owners.push(None);
            continue;
        }
        let Some((name, phc)) = trimmed.split_once(':') else {
            return Err(parse_error(
                "expected `name:$argon2id$...` (a user name, a colon, a PHC hash string)".into(),
            ));
        };
        validate_user_name(name).map_err(|e| parse_error(e.to_string()))?;
        if !is_argon2_phc(phc) {
            return Err(parse_error(format!(
                "the hash of user {name:?} is not a PHC string (`$argon2id$v=19$m=...,t=...,p=...$salt$hash`)"
            )));
        }
        if let Some(first) = first_line.get(name) {
            return Err(parse_error(format!(
                "user {name:?} is listed twice (first on line {first})"
            )));
        }
        first_line.insert(name.to_string(), line);
        users.insert(name.to_string(), phc.to_string());
        owners.push(Some(name.to_string()));
    }
    Ok((PasswordFile { users }, owners))
}

/// Checks a user name: 1..=128 characters, no `:`, no whitespace, no control characters.
pub fn validate_user_name(name: &str) -> Result<(), AuthError> {
    let reason = if name.is_empty() {
        "it is empty"
    } else if name.chars().count() > MAX_USER_NAME_CHARS {
        "it is longer than 128 characters"
    } else if name.contains(':') {
        "it contains ':'"
    } else if name.chars().any(char::is_whitespace) {
        "it contains whitespace"
    } else if name.chars().any(char::is_control) {
        "it contains a control character"
    } else {
        return Ok(());
    };
    Err(AuthError::BadUserName { reason })
}

/// Hashes `password` with argon2id (m=19456 KiB, t=2, p=1) and a random salt,
/// returning the PHC string.
pub fn hash_password(password: &[u8]) -> Result<String, AuthError> {
    let params = Params::new(M_COST_KIB, T_COST, P_COST, None)
        .map_err(|e| AuthError::Hash(e.to_string()))?;
    let argon2 = Argon2::new(Algorithm::Argon2id, Version::V0x13, params);
    let salt = SaltString::generate(&mut OsRng);
    argon2
        .hash_password(password, &salt)
        .map(|hash| hash.to_string())
        .map_err(|e| AuthError::Hash(e.to_string()))
}

/// Adds `user` to the password file at `path` (creating the file), or
/// replaces its password. The file is rewritten atomically with mode 0600.
pub fn set_user(path: &Path, user: &str, password: &[u8]) -> Result<(), AuthError> {
    validate_user_name(user)?;
    let phc = hash_password(password)?;
    let text = read_existing(path)?;
    let (_, owners) = parse_lines(&text, path)?;
    let entry = format!("{user}:{phc}");
    let mut out = String::with_capacity(text.len() + entry.len() + 1);
    let mut replaced = false;
    for (raw, owner) in text.lines().zip(&owners) {
        if owner.as_deref() == Some(user) {
            out.push_str(&entry);
            replaced = true;
        } else {
            out.push_str(raw);
        }
        out.push('\n');
    }
    if !replaced {
        out.push_str(&entry);
        out.push('\n');
    }
    write_atomically(path, out.as_bytes())
}

/// Removes `user` from the password file at `path`; true if it was there
/// (the file is then rewritten atomically), false if not (the file is left alone).
pub fn remove_user(path: &Path, user: &str) -> Result<bool, AuthError> {
    let text = read_existing(path)?;
    let (_, owners) = parse_lines(&text, path)?;
    if !owners.iter().any(|o| o.as_deref() == Some(user)) {
        return Ok(false);
    }
    let mut out = String::with_capacity(text.len());
    for (raw, owner) in text.lines().zip(&owners) {
        if owner.as_deref() != Some(user) {
            out.push_str(raw);
            out.push('\n');
        }
    }
    write_atomically(path, out.as_bytes())?;
    Ok(true)
}

/// The file's text, or empty text if it does not exist yet.
fn read_existing(path: &Path) -> Result<String, AuthError> {
    match fs::read_to_string(path) {
        Ok(text) => Ok(text),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(String::new()),
        Err(e) => Err(AuthError::io(path, e)),
    }
}

/// Writes `bytes` to a temporary sibling of `path` (mode 0600), syncs it and
/// renames it over `path`, then syncs the directory.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), AuthError> {
    let file_name = path.file_name().ok_or_else(|| {
        AuthError::io(
            path,
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a file path"),
        )
    })?;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(file_name);
    tmp_name.push(format!(".tmp-{}", std::process::id()));
    let tmp = dir.join(tmp_name);
    // A leftover from a crashed run of this same process id is stale.
    match fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(AuthError::io(&tmp, e)),
    }
    let written = write_new_private(&tmp, bytes)
        .and_then(|()| fs::rename(&tmp, path).map_err(|e| AuthError::io(path, e)));
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
        return written;
    }
    // Make the rename itself durable.
    if let Ok(d) = fs::File::open(&dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

fn write_new_private(tmp: &Path, bytes: &[u8]) -> Result<(), AuthError> {
    let mut options = fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(tmp).map_err(|e| AuthError::io(tmp, e))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .map_err(|e| AuthError::io(tmp, e))
}

#[cfg(test)]
mod tests;
