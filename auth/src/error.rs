//! The one error type of the crate: reading or parsing the password and ACL
//! files, user names, hashing. Messages name the file and line, never a
//! password or a hash.

use std::path::PathBuf;

/// What went wrong loading, parsing or writing an authentication file.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// Reading or writing a file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file (or its temporary sibling) being read or written.
        path: PathBuf,
        /// The underlying I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A line of a password or ACL file is malformed.
    #[error("{}:{line}: {reason}", path.display())]
    Parse {
        /// The file, or `<text>` when parsing text that came from no file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong and what is allowed (never the line's content when it may hold a hash).
        reason: String,
    },
    /// A user name is empty, longer than 128 characters, or holds `:`, whitespace or a control character.
    #[error("bad user name: {reason}")]
    BadUserName {
        /// Which rule the name breaks.
        reason: &'static str,
    },
    /// Hashing a password failed (the message comes from the hashing library and holds no input).
    #[error("password hashing failed: {0}")]
    Hash(String),
}

impl AuthError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> AuthError {
        AuthError::Io {
            path: path.into(),
            source,
        }
    }
}
