//! Our errors and the gRPC codes they become, in one place.
//!
//! Every RPC reports failures as a [`CsiError`], whose variants are named
//! after the conditions the spec lists so the gRPC code follows from the
//! variant, not from whoever wrote the RPC. Messages must be readable by
//! humans (the CO surfaces them to users) and the status `details` must stay
//! empty, which [`tonic::Status::new`] guarantees.

use tonic::{Code, Status};

/// An RPC failure, one variant per gRPC code the spec prescribes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CsiError {
    /// A required field is missing or a field is malformed.
    #[error("{0}")]
    InvalidArgument(String),
    /// The volume, snapshot or node named does not exist.
    #[error("{0}")]
    NotFound(String),
    /// An object with this name exists but is incompatible with the request.
    #[error("{0}")]
    AlreadyExists(String),
    /// The request is valid but the system is not in a state to run it.
    #[error("{0}")]
    FailedPrecondition(String),
    /// A capacity outside what can be provided.
    #[error("{0}")]
    OutOfRange(String),
    /// Another operation on the same name or id is in flight; retry later.
    #[error("{0}")]
    Aborted(String),
    /// No space, or no topology segment can take the volume.
    #[error("{0}")]
    ResourceExhausted(String),
    /// The RPC is not offered; the CO must not retry.
    #[error("{0}")]
    Unimplemented(String),
    /// A dependency (the peer set, a backend) cannot be reached right now.
    #[error("{0}")]
    Unavailable(String),
    /// A bug or an unexpected backend failure.
    #[error("{0}")]
    Internal(String),
    /// The backend refused to authenticate the credentials in the request's secrets.
    #[error("{0}")]
    Unauthenticated(String),
    /// The credentials authenticate but do not allow what the request needs.
    #[error("{0}")]
    PermissionDenied(String),
}

impl CsiError {
    /// The gRPC code the spec assigns to this condition.
    pub fn code(&self) -> Code {
        match self {
            CsiError::InvalidArgument(_) => Code::InvalidArgument,
            CsiError::NotFound(_) => Code::NotFound,
            CsiError::AlreadyExists(_) => Code::AlreadyExists,
            CsiError::FailedPrecondition(_) => Code::FailedPrecondition,
            CsiError::OutOfRange(_) => Code::OutOfRange,
            CsiError::Aborted(_) => Code::Aborted,
            CsiError::ResourceExhausted(_) => Code::ResourceExhausted,
            CsiError::Unimplemented(_) => Code::Unimplemented,
            CsiError::Unavailable(_) => Code::Unavailable,
            CsiError::Internal(_) => Code::Internal,
            CsiError::Unauthenticated(_) => Code::Unauthenticated,
            CsiError::PermissionDenied(_) => Code::PermissionDenied,
        }
    }

    /// Shorthand for the most common failure: a missing required field.
    pub fn missing(field: &str) -> Self {
        CsiError::InvalidArgument(format!("{field} is required"))
    }
}

impl From<CsiError> for Status {
    fn from(err: CsiError) -> Self {
        let code = err.code();
        Status::new(code, err.to_string())
    }
}

/// Result type of the request checks.
pub type CsiResult<T> = Result<T, CsiError>;

/// Whether an errno means the backend is out of space (ENOSPC, or EDQUOT for a quota).
pub fn is_out_of_space(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT))
}

/// Whether a peer's error message says the backend is out of space. Peers pass backend
/// failures on as text (an `std::io::Error` printed as "... (os error 28)") and a bare xseg
/// `NoSpace` status as "no space", so that is what crosses into [`peers::client::ClientError`].
pub fn says_out_of_space(message: &str) -> bool {
    message == xseg::Status::NoSpace.to_string()
        || [libc::ENOSPC, libc::EDQUOT]
            .iter()
            .any(|code| message.contains(&format!("(os error {code})")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_map_to_spec_codes_with_empty_details() {
        let cases = [
            (CsiError::missing("x"), Code::InvalidArgument),
            (CsiError::NotFound("x".into()), Code::NotFound),
            (CsiError::AlreadyExists("x".into()), Code::AlreadyExists),
            (
                CsiError::FailedPrecondition("x".into()),
                Code::FailedPrecondition,
            ),
            (CsiError::OutOfRange("x".into()), Code::OutOfRange),
            (CsiError::Aborted("x".into()), Code::Aborted),
            (
                CsiError::ResourceExhausted("x".into()),
                Code::ResourceExhausted,
            ),
            (CsiError::Unimplemented("x".into()), Code::Unimplemented),
            (CsiError::Unavailable("x".into()), Code::Unavailable),
            (CsiError::Internal("x".into()), Code::Internal),
            (CsiError::Unauthenticated("x".into()), Code::Unauthenticated),
            (
                CsiError::PermissionDenied("x".into()),
                Code::PermissionDenied,
            ),
        ];
        for (err, code) in cases {
            let msg = err.to_string();
            let status = Status::from(err);
            assert_eq!(status.code(), code);
            assert_eq!(status.message(), msg);
            assert!(status.details().is_empty());
        }
    }
}
