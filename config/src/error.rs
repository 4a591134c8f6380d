use std::fmt;
use std::path::{Path, PathBuf};

/// One thing wrong with one key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Dotted path of the key, e.g. `route[2].upstream`.
    pub key: String,
    /// The offending value as written, when there is one.
    pub value: Option<String>,
    /// What is allowed instead.
    pub expected: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.value {
            Some(v) => write!(f, "{} = {v:?}: expected {}", self.key, self.expected),
            None => write!(f, "{}: {}", self.key, self.expected),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: {message}", path.as_ref().map_or("config".to_string(), |p| p.display().to_string()))]
    Syntax {
        path: Option<PathBuf>,
        message: String,
    },
    #[error("{}: {} problem(s):\n{}",
        path.as_ref().map_or("config".to_string(), |p| p.display().to_string()),
        problems.len(),
        problems.iter().map(|p| format!("  - {p}")).collect::<Vec<_>>().join("\n"))]
    Invalid {
        path: Option<PathBuf>,
        problems: Vec<Problem>,
    },
}

impl ConfigError {
    pub(crate) fn in_file(self, file: &Path) -> ConfigError {
        match self {
            ConfigError::Syntax { message, .. } => ConfigError::Syntax {
                path: Some(file.to_path_buf()),
                message,
            },
            ConfigError::Invalid { problems, .. } => ConfigError::Invalid {
                path: Some(file.to_path_buf()),
                problems,
            },
            other => other,
        }
    }

    /// The individual problems (empty for read and syntax errors).
    pub fn problems(&self) -> &[Problem] {
        match self {
            ConfigError::Invalid { problems, .. } => problems,
            _ => &[],
        }
    }
}
