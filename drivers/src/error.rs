//! Errors of the data path and of opening devices.
//!
//! [`IoError`] is `Copy` and carries no strings: a failing I/O costs no allocation, and
//! every export maps it to its wire status in exactly one place. Details worth a human's
//! attention (a corrupt qcow2 table, say) are logged where they are detected.

use std::fmt;
use std::path::PathBuf;

/// Why an I/O failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoError {
    /// The kernel returned this errno.
    Os(i32),
    /// The request reaches past the end of the device.
    OutOfRange,
    /// A write to a read-only device.
    ReadOnly,
    /// The device cannot do this (or cannot do it fast, for a fast-zero request).
    NotSupported,
    /// The device or its file system is full.
    NoSpace,
    /// The image's metadata is corrupt; the device refuses further writes.
    Corrupt,
    /// The request is larger than the device accepts in one piece.
    TooLarge,
    /// The device is shutting down or was removed.
    Shutdown,
    /// The request itself is malformed (a block-status query of no bytes, say).
    Invalid,
}

impl IoError {
    /// The closest errno, for exports whose wire format speaks errno.
    pub fn errno(self) -> i32 {
        match self {
            IoError::Os(e) => e,
            IoError::OutOfRange => libc::EINVAL,
            IoError::ReadOnly => libc::EPERM,
            IoError::NotSupported => libc::EOPNOTSUPP,
            IoError::NoSpace => libc::ENOSPC,
            IoError::Corrupt => libc::EIO,
            IoError::TooLarge => libc::EOVERFLOW,
            IoError::Shutdown => libc::ESHUTDOWN,
            IoError::Invalid => libc::EINVAL,
        }
    }

    /// Maps a negative kernel result.
    pub fn from_errno(errno: i32) -> Self {
        match errno {
            libc::ENOSPC | libc::EDQUOT => IoError::NoSpace,
            libc::EOPNOTSUPP => IoError::NotSupported,
            e => IoError::Os(e),
        }
    }
}

impl fmt::Display for IoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IoError::Os(e) => write!(f, "{}", std::io::Error::from_raw_os_error(*e)),
            IoError::OutOfRange => f.write_str("request beyond the end of the device"),
            IoError::ReadOnly => f.write_str("device is read-only"),
            IoError::NotSupported => f.write_str("operation not supported by the device"),
            IoError::NoSpace => f.write_str("no space left on the device"),
            IoError::Corrupt => f.write_str("image metadata is corrupt"),
            IoError::TooLarge => f.write_str("request too large"),
            IoError::Shutdown => f.write_str("device is shutting down"),
            IoError::Invalid => f.write_str("malformed request"),
        }
    }
}

impl std::error::Error for IoError {}

impl From<std::io::Error> for IoError {
    fn from(e: std::io::Error) -> Self {
        IoError::from_errno(e.raw_os_error().unwrap_or(libc::EIO))
    }
}

/// Why a device could not be opened. Always names the file.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

impl OpenError {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        OpenError::Io { path: path.into(), source }
    }
    pub fn invalid(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        OpenError::Invalid { path: path.into(), message: message.into() }
    }
}
