//! The keeper: redundancy that survives the trainer.
//!
//! A keeper is a small separate process (`bitsnap keep STORE --socket PATH`, or a
//! [`Keeper`] spawned by a library) that holds the latest snapshots of a training run in
//! its memory. The trainer hands each snapshot over a Unix-domain socket with
//! [`KeeperClient::put`], which returns as soon as the keeper *holds* it: a trainer killed
//! (SIGKILL) right after loses nothing. A restarted trainer gets it back with
//! [`KeeperClient::latest`], from the keeper's memory, without any disk read. The keeper
//! persists to its [`Store`](crate::Store) (a directory or object storage) in the
//! background, every N-th snapshot and always the latest on [`KeeperClient::flush`] and
//! shutdown (SIGTERM for `bitsnap keep`), so disk and object storage writes continue
//! after a trainer crash.
//!
//! - [`Keeper`]: the server ([`Keeper::spawn`], [`KeeperOptions`], [`Keeper::shutdown`]);
//! - [`KeeperClient`]: `connect`, `put`, `latest`, `flush`;
//! - the wire protocol (frames, messages, limits) is specified in `FORMAT.md`, "Keeper
//!   protocol", with the constants [`FRAME_MAGIC`], [`PROTOCOL_VERSION`],
//!   [`FRAME_HEADER_BYTES`] and [`MAX_HEAD_BYTES`]; the same frames carry a keeper's
//!   forwarding to a peer machine's keeper (described there, not implemented yet).
//!
//! A keeper that is gone makes the client fail with [`Error::Io`](crate::Error::Io) naming
//! the socket, so a trainer can fall back to its store. A keeper restarted after a crash
//! starts empty and answers `latest` from its store ([`Snapshot::from_memory`](crate::Snapshot)
//! false), so a caller can tell memory from disk.
//!
//! See [`Keeper`] for an example.

mod client;
mod memory;
mod persist;
mod server;
mod wire;

pub use client::{KeeperClient, KeeperInfo, PutReceipt};
pub use persist::PersistCounts;
pub use server::{KEEPER_LOCK_FILE, Keeper, KeeperOptions, KeeperStats};
pub use wire::{FRAME_HEADER_BYTES, FRAME_MAGIC, MAX_HEAD_BYTES, PROTOCOL_VERSION};
