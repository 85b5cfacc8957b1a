//! Wire messages and framing between agent, process server and master target.
//!
//! Every message is an rkyv archive of [`Message`] in a length-prefixed frame:
//!
//! ```text
//! +----------------+-----------------------------+
//! | u32 LE length  | rkyv archive of Message     |
//! +----------------+-----------------------------+
//! ```
//!
//! A frame longer than [`MAX_FRAME`] is refused before a byte of it is buffered, and every frame is
//! validated by bytecheck before any field is read, so a peer cannot make us read out of bounds. A
//! stream starts with [`Message::Hello`]; a peer speaking another [`PROTOCOL_VERSION`] is refused.
//!
//! One QUIC bidirectional stream carries one replicated disk:
//!
//! ```text
//! client                         server
//!   Hello ----------------------->
//!   Open{item,disk,size} -------->
//!   <------------------------ Resume{next}
//!   Batch / Sealed ------------->      (changes next, next+1, ...)
//!   <------------- DurableAck / AppliedAck{through}
//! ```

use crate::types::{DiskId, ItemId, Seq};
use rkyv::rancor;
use rkyv::util::AlignedVec;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Version of this protocol. A peer with another version is refused at hello.
pub const PROTOCOL_VERSION: u32 = 5;
/// Largest frame either side accepts (a batch holds at most a few MiB of changes).
pub const MAX_FRAME: usize = 64 * 1024 * 1024;
/// Largest single write carried in one change.
pub const MAX_WRITE: usize = 32 * 1024 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
#[rkyv(derive(Debug))]
pub enum Role {
    Agent,
    ProcessServer,
    MasterTarget,
    ConfigServer,
    /// A client of the master target's NBD exports (a hypervisor bringing up a failed-over
    /// machine, an operator's tools): it takes part in no replication.
    NbdClient,
}

impl Role {
    pub const ALL: [Role; 5] =
        [Role::Agent, Role::ProcessServer, Role::MasterTarget, Role::ConfigServer, Role::NbdClient];

    pub fn name(self) -> &'static str {
        match self {
            Role::Agent => "agent",
            Role::ProcessServer => "process-server",
            Role::MasterTarget => "master-target",
            Role::ConfigServer => "config-server",
            Role::NbdClient => "nbd-client",
        }
    }

    pub fn from_name(name: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.name() == name)
    }
}

/// Kind of consistency marker carried in the change stream.
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub enum MarkerKind {
    /// The source completed a FLUSH: everything before it is a crash-consistent point.
    Flush,
    /// Applications were quiesced at this point (tag names the point across disks).
    AppConsistent { tag: String },
    /// Initial replication finished: from here on the replica is a consistent copy.
    InitialCopyDone,
    /// A named crash-consistent point, set on every disk of a machine at one moment (the policy's
    /// crash-consistency interval, or an app-consistent point whose pre-hook failed).
    Bookmark { tag: String },
    /// From here the stream carries blocks in block order, not write order (changes that bypassed the
    /// journal are being copied from the dirty map, or a resync's differing blocks): the points after
    /// this marker and before the next [`MarkerKind::InconsistentEnd`] are not crash-consistent.
    InconsistentBegin,
    /// Every block the replica lacked has been copied: from here points are crash-consistent again.
    InconsistentEnd,
}

/// One change of a disk, in journal order.
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub enum Op {
    Write {
        offset: u64,
        data: Vec<u8>,
    },
    /// Write zeroes or trim: the range reads as zeroes afterwards.
    Zero {
        offset: u64,
        len: u64,
    },
    Marker {
        kind: MarkerKind,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct Change {
    pub seq: Seq,
    /// When the source captured the change, in µs since the Unix epoch: recovery points by time.
    pub at: u64,
    pub op: Op,
}

/// A contiguous run of changes of one disk, as the agent ships it.
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct Batch {
    pub item: ItemId,
    pub disk: DiskId,
    pub disk_size: u64,
    pub first: Seq,
    pub last: Seq,
    pub changes: Vec<Change>,
}

impl Batch {
    /// Whether the batch carries a planned failover's final bookmark ([`crate::types::stop_tag`]).
    pub fn has_stop_mark(&self) -> bool {
        self.changes.iter().any(
            |c| matches!(&c.op, Op::Marker { kind: MarkerKind::Bookmark { tag } } if crate::types::is_stop_tag(tag)),
        )
    }
}

/// A batch after the process server compressed and sealed it for the master target.
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct SealedBatch {
    /// The epoch of the item's data key it is sealed under.
    pub epoch: u32,
    pub item: ItemId,
    pub disk: DiskId,
    pub disk_size: u64,
    pub first: Seq,
    pub last: Seq,
    pub nonce: [u8; 12],
    /// AES-256-GCM ciphertext of a [`crate::compress`] payload of the batch.
    pub ciphertext: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub enum Message {
    Hello {
        version: u32,
        role: Role,
        node: String,
    },
    Open {
        item: ItemId,
        disk: DiskId,
        disk_size: u64,
    },
    Resume {
        next: Seq,
    },
    Batch(Batch),
    Sealed(SealedBatch),
    DurableAck {
        through: Seq,
    },
    AppliedAck {
        through: Seq,
    },
    /// The peer refused the stream: `code` says what kind of failure it is (whether retrying can help),
    /// `message` what happened, for the operator.
    Error {
        code: ErrorCode,
        message: String,
    },
    /// Starts a checksum comparison of a disk's replica (agent to master target, relayed by the process
    /// server), with blocks of `block` bytes; answered by `TreeHashes` with no hashes when ready.
    TreeOpen {
        item: ItemId,
        disk: DiskId,
        disk_size: u64,
        block: u32,
    },
    /// Nodes `first..first+count` of `level` of the checksum tree of region `offset..offset+len`.
    TreeQuery {
        offset: u64,
        len: u64,
        level: u8,
        first: u64,
        count: u64,
    },
    TreeHashes {
        hashes: Vec<[u8; 16]>,
    },
}

pub use crate::errcode::{Coded, ErrorCode};

/// TLS alerts that mean a certificate was refused (RFC 8446 section 6.2).
const CERTIFICATE_ALERTS: &[u8] = &[42, 43, 44, 45, 46, 48, 49, 51, 116];
/// The application close code the accept loop uses for a certificate without the expected role.
pub const CLOSE_WRONG_ROLE: u32 = 1;

/// The code of an error: the first tagged cause in its chain (a [`Coded`] error, a peer's refusal, a
/// QUIC connection closed for a certificate or role), else [`ErrorCode::Transient`].
pub fn code_of(err: &anyhow::Error) -> ErrorCode {
    for cause in err.chain() {
        if let Some(c) = cause.downcast_ref::<Coded>() {
            return c.code;
        }
        if let Some(WireError::Peer { code, .. }) = cause.downcast_ref::<WireError>() {
            return *code;
        }
        if let Some(e) = cause.downcast_ref::<crate::stream::StreamError>() {
            return e.code();
        }
        if let Some(e) = cause.downcast_ref::<quinn::ConnectionError>() {
            let transport = match e {
                quinn::ConnectionError::TransportError(t) => Some(u64::from(t.code)),
                quinn::ConnectionError::ConnectionClosed(c) => Some(u64::from(c.error_code)),
                quinn::ConnectionError::ApplicationClosed(a) if a.error_code == CLOSE_WRONG_ROLE.into() => {
                    return ErrorCode::WrongRole
                }
                _ => None,
            };
            // Crypto errors are 0x100 + the TLS alert.
            if let Some(code) = transport.filter(|c| (0x100..0x200).contains(c)) {
                if CERTIFICATE_ALERTS.contains(&((code - 0x100) as u8)) {
                    return ErrorCode::CertificateRejected;
                }
            }
        }
    }
    ErrorCode::Transient
}

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("connection closed by peer")]
    Closed,
    #[error("i/o error on stream: {0}")]
    Io(#[from] std::io::Error),
    #[error("frame of {len} bytes exceeds the limit of {MAX_FRAME} bytes")]
    TooLarge { len: usize },
    #[error("malformed frame ({len} bytes): {reason}")]
    Malformed { len: usize, reason: String },
    #[error("peer speaks protocol version {theirs}, this build speaks {PROTOCOL_VERSION}")]
    Version { theirs: u32 },
    #[error("unexpected message: expected {expected}, got {got}")]
    Unexpected { expected: &'static str, got: String },
    #[error("peer reported an error: {message}")]
    Peer { code: ErrorCode, message: String },
    #[error("invalid batch: {0}")]
    InvalidBatch(String),
}

impl Message {
    pub fn kind(&self) -> &'static str {
        match self {
            Message::Hello { .. } => "Hello",
            Message::Open { .. } => "Open",
            Message::Resume { .. } => "Resume",
            Message::Batch(_) => "Batch",
            Message::Sealed(_) => "Sealed",
            Message::DurableAck { .. } => "DurableAck",
            Message::AppliedAck { .. } => "AppliedAck",
            Message::Error { .. } => "Error",
            Message::TreeOpen { .. } => "TreeOpen",
            Message::TreeQuery { .. } => "TreeQuery",
            Message::TreeHashes { .. } => "TreeHashes",
        }
    }
}

impl Message {
    /// About how many bytes the archive takes, so it is built without growing its buffer.
    fn size_hint(&self) -> usize {
        256 + match self {
            Message::Batch(b) => b.size_hint(),
            Message::Sealed(s) => s.ciphertext.len(),
            Message::TreeHashes { hashes } => hashes.len() * 16,
            _ => 0,
        }
    }
}

impl Batch {
    /// A batch of `ops` numbered from `first` on, each with its time (microseconds): the one way tests,
    /// benchmarks and fuzz seeds build batches.
    pub fn numbered(
        item: ItemId,
        disk: DiskId,
        disk_size: u64,
        first: Seq,
        ops: impl IntoIterator<Item = (u64, Op)>,
    ) -> Batch {
        let changes: Vec<Change> =
            ops.into_iter().enumerate().map(|(i, (at, op))| Change { seq: Seq(first.0 + i as u64), at, op }).collect();
        let last = Seq(first.0 + changes.len().saturating_sub(1) as u64);
        Batch { item, disk, disk_size, first, last, changes }
    }

    /// About how many bytes the archive of this batch takes.
    pub fn size_hint(&self) -> usize {
        64 + self
            .changes
            .iter()
            .map(|c| {
                48 + match &c.op {
                    Op::Write { data, .. } => data.len(),
                    _ => 0,
                }
            })
            .sum::<usize>()
    }
}

/// Serializes a message into a frame body (no length prefix). The receiver copies it into an aligned
/// buffer before validation, so the body's own alignment does not matter.
pub fn encode_body(msg: &Message) -> Vec<u8> {
    rkyv::api::high::to_bytes_in::<_, rancor::Error>(msg, Vec::with_capacity(msg.size_hint()))
        .expect("serializing into memory cannot fail")
}

/// Serializes a message into one frame (length prefix included).
pub fn encode(msg: &Message) -> Vec<u8> {
    let body = encode_body(msg);
    let mut out = Vec::with_capacity(4 + body.len());
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&body);
    out
}

/// Validates and deserializes one frame body (without the length prefix).
pub fn decode(body: &[u8]) -> Result<Message, WireError> {
    let mut aligned = AlignedVec::<16>::with_capacity(body.len());
    aligned.extend_from_slice(body);
    rkyv::from_bytes::<Message, rancor::Error>(&aligned)
        .map_err(|e| WireError::Malformed { len: body.len(), reason: e.to_string() })
}

/// Writes one message as a frame; returns the frame's length.
pub async fn write_msg<W: AsyncWrite + Unpin>(w: &mut W, msg: &Message) -> Result<usize, WireError> {
    let body = encode_body(msg);
    w.write_all(&(body.len() as u32).to_le_bytes()).await?;
    w.write_all(&body).await?;
    Ok(4 + body.len())
}

/// How much of a frame's buffer is grown at a time while its bytes arrive.
const FRAME_STEP: usize = 1 << 20;

/// Reads one frame and validates it. `Ok(None)` is a clean end of stream between frames.
pub async fn read_msg<R: AsyncRead + Unpin>(r: &mut R) -> Result<Option<Message>, WireError> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(WireError::TooLarge { len });
    }
    // The buffer grows with the bytes that arrive (a step at a time), not with the length the peer
    // declared: a peer that announces a large frame and sends nothing holds no memory for it.
    let mut body = AlignedVec::<16>::new();
    while body.len() < len {
        let from = body.len();
        body.resize(from + (len - from).min(FRAME_STEP), 0);
        r.read_exact(&mut body[from..]).await.map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                WireError::Malformed { len, reason: "stream ended inside the frame (truncated)".into() }
            } else {
                WireError::Io(e)
            }
        })?;
    }
    let msg = rkyv::from_bytes::<Message, rancor::Error>(&body)
        .map_err(|e| WireError::Malformed { len, reason: e.to_string() })?;
    if let Message::Error { code, message } = msg {
        return Err(WireError::Peer { code, message });
    }
    Ok(Some(msg))
}

/// Reads a message that must be there (end of stream is an error).
pub async fn expect_msg<R: AsyncRead + Unpin>(r: &mut R) -> Result<Message, WireError> {
    read_msg(r).await?.ok_or(WireError::Closed)
}

/// Checks a peer's hello: version and role.
pub fn check_hello(msg: Message, want: Role) -> Result<String, WireError> {
    match msg {
        Message::Hello { version, role, node } => {
            if version != PROTOCOL_VERSION {
                return Err(WireError::Version { theirs: version });
            }
            if role != want {
                return Err(WireError::Unexpected {
                    expected: want.name(),
                    got: format!("hello from role {}", role.name()),
                });
            }
            Ok(node)
        }
        other => Err(WireError::Unexpected { expected: "Hello", got: other.kind().to_string() }),
    }
}

impl Batch {
    /// Checks what validation of the archive cannot: the changes are exactly `first..=last` in order,
    /// and every range lies inside the disk.
    pub fn check(&self) -> Result<(), WireError> {
        let bad = |m: String| Err(WireError::InvalidBatch(format!("item {} disk {}: {m}", self.item, self.disk)));
        if self.changes.is_empty() || self.first > self.last {
            return bad(format!("empty or inverted range {}..={}", self.first, self.last));
        }
        if self.last.0 - self.first.0 + 1 != self.changes.len() as u64 {
            return bad(format!("range {}..={} does not match {} changes", self.first, self.last, self.changes.len()));
        }
        for (i, c) in self.changes.iter().enumerate() {
            if c.seq.0 != self.first.0 + i as u64 {
                return bad(format!("change {i} has seq {} out of order", c.seq));
            }
            let (offset, len) = match &c.op {
                Op::Write { offset, data } => {
                    if data.len() > MAX_WRITE {
                        return bad(format!("write of {} bytes at seq {} is too large", data.len(), c.seq));
                    }
                    (*offset, data.len() as u64)
                }
                Op::Zero { offset, len } => (*offset, *len),
                Op::Marker { .. } => continue,
            };
            if offset.checked_add(len).is_none_or(|end| end > self.disk_size) {
                return bad(format!("seq {} touches {offset}+{len}, beyond the disk size {}", c.seq, self.disk_size));
            }
        }
        Ok(())
    }

    /// Bytes of payload carried (writes only).
    pub fn payload_bytes(&self) -> u64 {
        self.changes
            .iter()
            .map(|c| match &c.op {
                Op::Write { data, .. } => data.len() as u64,
                _ => 0,
            })
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch() -> Batch {
        let ops = [
            (1, Op::Write { offset: 0, data: vec![1; 4096] }),
            (2, Op::Zero { offset: 4096, len: 8192 }),
            (3, Op::Marker { kind: MarkerKind::Flush }),
        ];
        Batch::numbered(ItemId(1), DiskId(2), 1 << 20, Seq(5), ops)
    }

    #[test]
    fn frame_round_trip() {
        let msg = Message::Batch(batch());
        let frame = encode(&msg);
        assert_eq!(decode(&frame[4..]).unwrap(), msg);
    }

    #[tokio::test]
    async fn oversized_frame_is_refused_before_reading_it() {
        let mut bytes = ((MAX_FRAME + 1) as u32).to_le_bytes().to_vec();
        bytes.extend_from_slice(&[0; 16]);
        let err = read_msg(&mut &bytes[..]).await.unwrap_err();
        assert!(matches!(err, WireError::TooLarge { .. }), "{err}");
    }

    #[tokio::test]
    async fn truncated_frame_is_malformed() {
        let frame = encode(&Message::Batch(batch()));
        let err = read_msg(&mut &frame[..frame.len() - 3]).await.unwrap_err();
        assert!(matches!(err, WireError::Malformed { .. }), "{err}");
    }

    #[test]
    fn bit_flips_never_panic() {
        use rand::{Rng, SeedableRng};
        let frame = encode(&Message::Batch(batch()));
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for _ in 0..3000 {
            let mut f = frame[4..].to_vec();
            for _ in 0..rng.gen_range(1..4) {
                let i = rng.gen_range(0..f.len());
                f[i] ^= 1 << rng.gen_range(0..8);
            }
            // Either a clean error or a message that still passes the batch checks or fails them.
            if let Ok(Message::Batch(b)) = decode(&f) {
                let _ = b.check();
            }
        }
    }

    #[test]
    fn batch_checks() {
        assert!(batch().check().is_ok());
        let mut b = batch();
        b.last = Seq(8);
        assert!(b.check().is_err());
        let mut b = batch();
        b.changes.swap(0, 1);
        assert!(b.check().is_err());
        let mut b = batch();
        b.changes[0].op = Op::Write { offset: (1 << 20) - 1, data: vec![0; 2] };
        assert!(b.check().is_err());
        let mut b = batch();
        b.changes[1].op = Op::Zero { offset: u64::MAX, len: 2 };
        assert!(b.check().is_err());
    }

    #[test]
    fn hello_checks_version_and_role() {
        let hello = |version, role| Message::Hello { version, role, node: "n".into() };
        assert!(check_hello(hello(PROTOCOL_VERSION, Role::Agent), Role::Agent).is_ok());
        assert!(matches!(check_hello(hello(99, Role::Agent), Role::Agent), Err(WireError::Version { .. })));
        assert!(check_hello(hello(PROTOCOL_VERSION, Role::MasterTarget), Role::Agent).is_err());
    }
}
