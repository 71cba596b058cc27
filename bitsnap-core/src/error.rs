//! The crate's one error type.

use std::path::PathBuf;

/// Everything that can go wrong in bitsnap-core. Messages name the file, the tensor and
/// the byte offset where they are known.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An operating-system I/O error on `path`.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The file does not start with the bitsnap magic bytes.
    #[error("{}: not a bitsnap snapshot (bad magic bytes)", file.display())]
    BadMagic {
        /// The file.
        file: PathBuf,
    },
    /// The file was written by a format version this build cannot read.
    #[error("{}: format version {version} is not supported (this build reads up to {supported})", file.display())]
    UnsupportedVersion {
        /// The file.
        file: PathBuf,
        /// Version found in the file.
        version: u16,
        /// Highest version this build reads.
        supported: u16,
    },
    /// The file ends before a structure it declares.
    #[error("{}: truncated at offset {offset}: {what}", file.display())]
    Truncated {
        /// The file.
        file: PathBuf,
        /// Offset where more bytes were needed.
        offset: u64,
        /// What was being read.
        what: String,
    },
    /// A checksum did not match.
    #[error("{}: checksum mismatch in {what}{} at offset {offset}: expected {expected:016x}, found {actual:016x}",
        file.display(), tensor.as_deref().map(|t| format!(" of tensor `{t}`")).unwrap_or_default())]
    Checksum {
        /// The file.
        file: PathBuf,
        /// The tensor, if the checksum covers one.
        tensor: Option<String>,
        /// Which checksum (`header`, `payload`, `decoded data`, `manifest`, `base`).
        what: &'static str,
        /// Offset of the checked bytes in the file.
        offset: u64,
        /// Checksum recorded in the file.
        expected: u64,
        /// Checksum of the bytes found.
        actual: u64,
    },
    /// A structure in the file is invalid.
    #[error("{}: malformed {what} at offset {offset}{}: {reason}",
        file.display(), tensor.as_deref().map(|t| format!(" (tensor `{t}`)")).unwrap_or_default())]
    Malformed {
        /// The file.
        file: PathBuf,
        /// The tensor, if the problem is in one.
        tensor: Option<String>,
        /// Which structure (`header`, `payload`, `manifest`).
        what: &'static str,
        /// Offset of the structure in the file.
        offset: u64,
        /// What is wrong.
        reason: String,
    },
    /// A value in a file exceeds a documented limit; nothing was allocated for it.
    #[error("{}: {what} is {value}, above the limit of {limit}", file.display())]
    Limit {
        /// The file.
        file: PathBuf,
        /// Which quantity.
        what: &'static str,
        /// The value found.
        value: u64,
        /// The limit.
        limit: u64,
    },
    /// A delta snapshot's base is missing or is not the snapshot it was encoded against.
    #[error("{}: base snapshot {base_id} {reason}", file.display())]
    MissingBase {
        /// The delta snapshot.
        file: PathBuf,
        /// Id of the base it needs.
        base_id: u64,
        /// What is wrong with it.
        reason: String,
    },
    /// A tensor given to bitsnap is inconsistent (length, shape, name).
    #[error("tensor `{tensor}`: {reason}")]
    InvalidTensor {
        /// The tensor.
        tensor: String,
        /// What is wrong.
        reason: String,
    },
    /// A snapshot was asked for that the store does not list.
    #[error("{}: no snapshot {snapshot}", store.display())]
    UnknownSnapshot {
        /// The store directory.
        store: PathBuf,
        /// The id or name asked for.
        snapshot: String,
    },
    /// A buffer of this size could not be allocated.
    #[error("could not allocate {bytes} bytes for {what}")]
    Alloc {
        /// What the buffer was for.
        what: String,
        /// Requested size.
        bytes: u64,
    },
    /// Something given to bitsnap (a snapshot name, metadata, the number of tensors) is
    /// over a limit of the format; nothing was written.
    #[error("{what} is {value}, above the format's limit of {limit}")]
    InputLimit {
        /// Which quantity (names the key or tensor where there is one).
        what: String,
        /// The value given.
        value: u64,
        /// The limit.
        limit: u64,
    },
    /// Decoding a snapshot would take more memory than the decode budget allows
    /// ([`Store::with_decode_budget`](crate::Store::with_decode_budget)); nothing of it
    /// was decoded.
    #[error("{}: decoding needs {needed} bytes (tensor `{tensor}` crosses the budget), above the decode budget of {budget} bytes", file.display())]
    Budget {
        /// The snapshot file.
        file: PathBuf,
        /// The tensor whose decoded size crosses the budget.
        tensor: String,
        /// Decoded bytes the snapshot (with what it is decoded against) needs.
        needed: u64,
        /// The budget.
        budget: u64,
    },
    /// A directory holds snapshot files but no manifest: not creating a store over them.
    #[error("{}: holds snapshot files ({}) but no MANIFEST; refusing to create a store over them", store.display(), file.display())]
    NotAStore {
        /// The directory.
        store: PathBuf,
        /// The first snapshot file found.
        file: PathBuf,
    },
    /// A snapshot was asked for in a way its kind (sharded or not) does not allow.
    #[error("{}: snapshot {snapshot} {reason}", store.display())]
    WrongKind {
        /// The store.
        store: PathBuf,
        /// The snapshot.
        snapshot: u64,
        /// What does not fit (`is sharded: read it with Store::load or Store::load_shard`).
        reason: String,
    },
    /// A snapshot cannot be deleted while others depend on it in a way a deletion cannot
    /// rewrite.
    #[error("{}: snapshot {snapshot} is the base of shards of snapshot {user}; deleting the base of shard deltas is not supported (delete the newer snapshots first)", store.display())]
    InUse {
        /// The store.
        store: PathBuf,
        /// The snapshot asked to be deleted.
        snapshot: u64,
        /// A snapshot that depends on it.
        user: u64,
    },
    /// A rank and world size of a sharded save that do not fit.
    #[error("rank {rank} of {world}: need 0 <= rank < world <= {max}")]
    InvalidRank {
        /// The rank given.
        rank: u32,
        /// The world size given.
        world: u32,
        /// Most ranks allowed.
        max: u32,
    },
    /// JSON that could not be parsed or written (the manifest); the serde_json error
    /// gives line and column.
    #[error("{}: {what}: {source}", file.display())]
    Json {
        /// The file.
        file: PathBuf,
        /// What was being read or written.
        what: &'static str,
        /// The serde_json error (line and column for parse errors).
        #[source]
        source: serde_json::Error,
    },
    /// A store location (URL or path) that cannot be used.
    #[error("{location}: {reason}")]
    InvalidLocation {
        /// The location as given.
        location: String,
        /// What is wrong.
        reason: String,
    },
    /// The safetensors library refused to write a file.
    #[error("{}: cannot write safetensors: {source}", file.display())]
    Safetensors {
        /// The file.
        file: PathBuf,
        /// The safetensors error.
        #[source]
        source: ::safetensors::SafeTensorError,
    },
    /// A shard file belongs to another commit attempt than the one committed or listed
    /// (a stale shard left by an earlier, interrupted attempt).
    #[error("{}: shard of commit attempt {actual:016x}, expected attempt {expected:016x}", file.display())]
    StaleShard {
        /// The shard file.
        file: PathBuf,
        /// The attempt the commit or manifest names.
        expected: u64,
        /// The attempt in the shard's header.
        actual: u64,
    },
    /// Another writer changed the store first (a concurrent commit to a remote manifest,
    /// or a snapshot id already taken); nothing this writer wrote became visible.
    #[error("{}: conflict: {reason}", file.display())]
    Conflict {
        /// The object that was changed (usually the manifest).
        file: PathBuf,
        /// What happened.
        reason: String,
    },
    /// The keeper ([`crate::keeper`]) at `socket` answered a request with an error (a put
    /// it refused, a persistence that failed); the connection stays usable.
    #[error("{}: keeper: {reason}", socket.display())]
    Keeper {
        /// The keeper's socket.
        socket: PathBuf,
        /// What the keeper reported.
        reason: String,
    },
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Error {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}
