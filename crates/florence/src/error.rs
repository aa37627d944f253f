//! One error type for the library: every variant says what went wrong and, where it can, which
//! file and what to do about it, so the CLI prints it on one line.

use std::path::{Path, PathBuf};

/// Errors from loading models, reading images and generating.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    /// A configuration value is missing or invalid.
    #[error("{}{message}", file_prefix(.file))]
    Config { file: Option<PathBuf>, message: String },
    /// A checkpoint file is missing, corrupt, or does not match the configuration.
    #[error("{}: {message}", path.display())]
    Checkpoint { path: PathBuf, message: String },
    /// An image could not be decoded.
    #[error("{}: cannot decode image: {message}", path.display())]
    Image { path: PathBuf, message: String },
    /// The request itself is invalid (a task without its input, an out-of-range setting).
    #[error("{0}")]
    Usage(String),
    /// A tensor operation failed; this indicates a bug or an unsupported model shape.
    #[error("tensor error: {0}")]
    Tensor(candle_core::Error),
    /// The tokenizer could not be loaded or failed.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
}

fn file_prefix(file: &Option<PathBuf>) -> String {
    match file {
        Some(p) => format!("{}: ", p.display()),
        None => String::new(),
    }
}

impl From<candle_core::Error> for Error {
    /// Keeps candle's message but drops the backtrace it attaches when `RUST_BACKTRACE` is set,
    /// so errors stay on one line.
    fn from(e: candle_core::Error) -> Self {
        let mut e = e;
        while let candle_core::Error::WithBacktrace { inner, .. } = e {
            e = *inner;
        }
        Error::Tensor(e)
    }
}

/// The library's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        Error::Io {
            path: path.to_path_buf(),
            source,
        }
    }
    pub(crate) fn config(message: impl Into<String>) -> Self {
        Error::Config {
            file: None,
            message: message.into(),
        }
    }
    pub(crate) fn checkpoint(path: &Path, message: impl Into<String>) -> Self {
        Error::Checkpoint {
            path: path.to_path_buf(),
            message: message.into(),
        }
    }
    pub(crate) fn usage(message: impl Into<String>) -> Self {
        Error::Usage(message.into())
    }
    /// Attaches the file a configuration error came from.
    pub(crate) fn in_file(self, path: &Path) -> Self {
        match self {
            Error::Config { file: None, message } => Error::Config {
                file: Some(path.to_path_buf()),
                message,
            },
            other => other,
        }
    }
}
