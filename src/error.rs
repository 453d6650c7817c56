//! The one error type of the storage core, and its one mapping to errno.

use std::fmt;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FsError {
    NotFound,
    Exists,
    NotDir,
    IsDir,
    NotEmpty,
    Invalid,
    NameTooLong,
    NoData,
    Range,
    TooBig,
    Perm,
    Access,
    ReadOnly,
    NoSpace,
    XDev,
    Unsupported,
    BadHandle,
    Busy,
    /// Stored bytes failed verification (checksum, decode, or a dangling reference).
    Corrupt,
    /// The storage engine failed (I/O error, engine in a failed state).
    Io,
}

impl FsError {
    pub fn to_errno(self) -> i32 {
        match self {
            FsError::NotFound => libc::ENOENT,
            FsError::Exists => libc::EEXIST,
            FsError::NotDir => libc::ENOTDIR,
            FsError::IsDir => libc::EISDIR,
            FsError::NotEmpty => libc::ENOTEMPTY,
            FsError::Invalid => libc::EINVAL,
            FsError::NameTooLong => libc::ENAMETOOLONG,
            FsError::NoData => libc::ENODATA,
            FsError::Range => libc::ERANGE,
            FsError::TooBig => libc::EFBIG,
            FsError::Perm => libc::EPERM,
            FsError::Access => libc::EACCES,
            FsError::ReadOnly => libc::EROFS,
            FsError::NoSpace => libc::ENOSPC,
            FsError::XDev => libc::EXDEV,
            FsError::Unsupported => libc::EOPNOTSUPP,
            FsError::BadHandle => libc::EBADF,
            FsError::Busy => libc::EBUSY,
            FsError::Corrupt | FsError::Io => libc::EIO,
        }
    }
}

impl fmt::Display for FsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = std::io::Error::from_raw_os_error(self.to_errno());
        write!(f, "{self:?} ({s})")
    }
}

impl std::error::Error for FsError {}

pub type Result<T> = std::result::Result<T, FsError>;
