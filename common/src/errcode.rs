//! The kind of a failure, as every part decides on it: retry, stop, raise Critical or Resync required.
//! It travels in the wire protocol's error message and in heartbeats; nothing here depends on another
//! module, so the protocol (`wire.rs`) and the stream's rules (`stream.rs`) can both use it.

/// What kind of failure a refusal is: what a component decides on (retry, stop, raise Critical or
/// Resync required), never the text of the message.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    rkyv::Archive,
    rkyv::Serialize,
    rkyv::Deserialize,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// A failure retrying may get past (network, a peer restarting, disk full).
    Transient,
    /// The item is not assigned to the peer (not yet, or no longer).
    NotAssigned,
    /// The item is not configured on the peer (no key for it).
    NotConfigured,
    /// The peer's certificate does not name the role it must have.
    WrongRole,
    /// A certificate was refused: revoked, expired, or not from this deployment's CA.
    CertificateRejected,
    /// Sequence numbers have a gap, or a journal or cache is corrupt: the replica chain is broken and
    /// only a resync repairs it.
    ChainBroken,
    /// The replica cannot be used (missing, or its disk cannot be adopted).
    ReplicaUnusable,
}

impl ErrorCode {
    /// Retrying cannot help: stop and raise it to the operator.
    pub fn fatal(self) -> bool {
        self != ErrorCode::Transient
    }

    /// Only an operator (or a resync) can clear it. The others that are fatal to a session (not
    /// assigned, not configured) settle by themselves once the control plane's assignments reach
    /// every component, so they never make an item Critical.
    pub fn needs_operator(self) -> bool {
        matches!(
            self,
            ErrorCode::WrongRole | ErrorCode::CertificateRejected | ErrorCode::ChainBroken | ErrorCode::ReplicaUnusable
        )
    }

    /// What the operator is told the failure is.
    pub fn describe(self) -> &'static str {
        match self {
            ErrorCode::Transient => "a transient failure",
            ErrorCode::NotAssigned => "the item is not assigned to that peer",
            ErrorCode::NotConfigured => "the item is not configured on the peer",
            ErrorCode::WrongRole => "a certificate does not name the expected role",
            ErrorCode::CertificateRejected => "a certificate was refused (revoked, expired or from another CA)",
            ErrorCode::ChainBroken => "the replica chain is broken and needs a resync",
            ErrorCode::ReplicaUnusable => "the replica cannot be used",
        }
    }
}

/// An error tagged with its [`ErrorCode`] where it arises, so that whoever handles it decides by the code.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Coded {
    pub code: ErrorCode,
    pub message: String,
}

impl Coded {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Coded {
        Coded { code, message: message.into() }
    }
}
