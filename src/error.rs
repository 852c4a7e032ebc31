//! The error every domain module returns to the façade: a kind per gRPC code the CRI answer
//! needs (`cri/` maps each to its status) and a message naming the object. Ground floor: it
//! knows no domain; each domain converts its own errors into it.

/// Errors of the runtime core; `cri/` maps each kind to a gRPC code.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request is malformed; the message names what.
    #[error("{0}")]
    InvalidArgument(String),
    /// The object does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The object exists but is in the wrong state for this call.
    #[error("{0}")]
    FailedPrecondition(String),
    /// The caller may not do this (e.g. a registry refused the credentials).
    #[error("{0}")]
    PermissionDenied(String),
    /// The object (or its name) exists already.
    #[error("{0}")]
    AlreadyExists(String),
    /// The call was cancelled or ran out of time.
    #[error("{0}")]
    DeadlineExceeded(String),
    /// The host ran out of something (disk, addresses).
    #[error("{0}")]
    ResourceExhausted(String),
    /// A dependency (registry, kernel facility) is not reachable right now.
    #[error("{0}")]
    Unavailable(String),
    /// Anything else: a bug or an unexpected failure of the host.
    #[error("{0}")]
    Internal(String),
}

/// The result type of the runtime core.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A record that could not be written: ResourceExhausted when the disk is full (the caller
/// can free space and retry), Internal otherwise.
pub fn from_store(e: crate::store::StoreError) -> Error {
    if e.is_no_space() {
        Error::ResourceExhausted(e.to_string())
    } else {
        Error::Internal(e.to_string())
    }
}

/// A filesystem step that failed, named by `what`: ResourceExhausted when the disk is full,
/// Internal otherwise.
pub fn from_io(what: &str, e: std::io::Error) -> Error {
    if crate::store::is_no_space(&e) {
        Error::ResourceExhausted(format!("{what}: {e}"))
    } else {
        Error::Internal(format!("{what}: {e}"))
    }
}

/// For idempotent calls: a lookup that found nothing is `None`, not an error.
pub fn optional<T>(r: Result<T>) -> Result<Option<T>> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(Error::NotFound(_)) => Ok(None),
        Err(e) => Err(e),
    }
}
