//! One error type for the library: every variant says what went wrong and, where it can, which
//! file and what to do about it, so the CLI prints it on one line. [`Error::kind`] says whose
//! move it is: the caller's (bad input), nobody's (unsupported), the machine's, or ours (a bug),
//! which is what a server needs to choose between 400 and 500.

use std::path::{Path, PathBuf};

/// Errors from loading models, reading images and generating.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What the system said.
        source: std::io::Error,
    },
    /// A configuration value is missing or invalid.
    #[error("{}{message}", file_prefix(.file))]
    Config {
        /// The file, when known.
        file: Option<PathBuf>,
        /// What is wrong.
        message: String,
    },
    /// A checkpoint file is missing, corrupt, or does not match the configuration.
    #[error("{}: {message}", path.display())]
    Checkpoint {
        /// The file or folder.
        path: PathBuf,
        /// What is wrong, and what to do.
        message: String,
    },
    /// An image could not be decoded.
    #[error("{}: cannot decode image: {message}", path.display())]
    Image {
        /// The image file.
        path: PathBuf,
        /// Why it cannot be decoded.
        message: String,
    },
    /// The request itself is invalid (a task without its input, an out-of-range setting).
    #[error("{0}")]
    Usage(String),
    /// A tensor operation failed; this indicates a bug or an unsupported model shape.
    #[error("tensor error: {0}")]
    Tensor(candle_core::Error),
    /// The tokenizer could not be loaded or failed.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// A valid request for something this build or this model does not do.
    #[error("{0}")]
    Unsupported(String),
    /// Results could not be written (a full disk, a closed pipe).
    #[error("{0}")]
    Output(String),
    /// An invariant of the library broke: a bug, not the caller's doing.
    #[error("internal error: {0}; please report it")]
    Internal(String),
}

/// Whose move an [`Error`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The caller's input is wrong: a file, a model folder, a flag, a request. Fix the input
    /// (a server answers 400).
    Input,
    /// The input is valid, but asks for something not supported (a server answers 501).
    Unsupported,
    /// The machine failed us: results could not be written (a server answers 503).
    Environment,
    /// A bug in this library (a server answers 500).
    Internal,
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

impl Error {
    /// Whose move this error is.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Io { .. }
            | Error::Config { .. }
            | Error::Checkpoint { .. }
            | Error::Image { .. }
            | Error::Usage(_)
            | Error::Tokenizer(_) => ErrorKind::Input,
            Error::Unsupported(_) => ErrorKind::Unsupported,
            Error::Output(_) => ErrorKind::Environment,
            Error::Tensor(_) | Error::Internal(_) => ErrorKind::Internal,
        }
    }
}

/// The library's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An [`Error::Io`] on `path`.
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        Error::Io {
            path: path.to_path_buf(),
            source,
        }
    }
    /// An [`Error::Config`]; [`in_file`](Self::in_file) names its file.
    pub fn config(message: impl Into<String>) -> Self {
        Error::Config {
            file: None,
            message: message.into(),
        }
    }
    /// An [`Error::Checkpoint`] about `path`.
    pub fn checkpoint(path: &Path, message: impl Into<String>) -> Self {
        Error::Checkpoint {
            path: path.to_path_buf(),
            message: message.into(),
        }
    }
    /// An [`Error::Usage`].
    pub fn usage(message: impl Into<String>) -> Self {
        Error::Usage(message.into())
    }
    /// An [`Error::Unsupported`].
    pub fn unsupported(message: impl Into<String>) -> Self {
        Error::Unsupported(message.into())
    }
    /// An [`Error::Output`].
    pub fn output(message: impl Into<String>) -> Self {
        Error::Output(message.into())
    }
    /// An [`Error::Internal`]: a broken invariant.
    pub fn internal(message: impl Into<String>) -> Self {
        Error::Internal(message.into())
    }
    /// Attaches the file a configuration error came from.
    pub fn in_file(self, path: &Path) -> Self {
        match self {
            Error::Config { file: None, message } => Error::Config {
                file: Some(path.to_path_buf()),
                message,
            },
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A server answers by the kind: the caller's mistakes, unsupported requests, the machine,
    /// and bugs stay apart.
    #[test]
    fn kinds_separate_whose_move_it_is() {
        let io = Error::io(Path::new("x.png"), std::io::ErrorKind::NotFound.into());
        assert_eq!(io.kind(), ErrorKind::Input);
        assert_eq!(Error::config("bad").kind(), ErrorKind::Input);
        assert_eq!(Error::usage("bad flag").kind(), ErrorKind::Input);
        assert_eq!(Error::unsupported("cuda").kind(), ErrorKind::Unsupported);
        assert_eq!(Error::output("disk full").kind(), ErrorKind::Environment);
        assert_eq!(Error::internal("shape").kind(), ErrorKind::Internal);
        assert_eq!(
            Error::from(candle_core::Error::Msg("x".into())).kind(),
            ErrorKind::Internal
        );
        assert_eq!(
            Error::internal("a bug").to_string(),
            "internal error: a bug; please report it"
        );
    }
}
