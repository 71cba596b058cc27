//! The client a trainer uses to hand snapshots to its keeper and to get them back.

use std::io::BufReader;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::server::{SOURCE_DISK, SOURCE_MEMORY};
use super::wire::{self, Frame, HeadReader, HeadWriter, Kind, PROTOCOL_VERSION, SnapshotHead};
use crate::{Error, Snapshot, SnapshotInfo, Tensor};

/// Replies are read through a buffer of this size (bulk tensor reads bypass it).
const READ_BUFFER_BYTES: usize = 256 << 10;

/// What the keeper said when the client connected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct KeeperInfo {
    /// Protocol version spoken.
    pub version: u16,
    /// The keeper persists every N-th put of a series (0: only on flush and shutdown).
    pub persist_every: u64,
    /// Snapshots it holds per series.
    pub keep_in_memory: u64,
    /// Largest put it accepts, in bytes of tensor data.
    pub max_snapshot_bytes: u64,
    /// Its process id.
    pub pid: u32,
}

/// The keeper's answer to [`KeeperClient::put`]: the snapshot is held in its memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct PutReceipt {
    /// Keeper-wide order of this put (1 for the first put a keeper process received).
    pub seq: u64,
    /// Bytes of tensor data handed over.
    pub bytes: u64,
    /// Whether the keeper will persist this snapshot (every N-th put; the latest is
    /// always persisted on flush and shutdown).
    pub persist: bool,
    /// Time from the start of the put to the keeper's answer, as this client measured it.
    pub elapsed: Duration,
}

/// A connection to a keeper ([`Keeper`](super::Keeper), `bitsnap keep`).
///
/// Every error leaves a clear cause: a keeper that is not running gives
/// [`Error::Io`] naming the socket (`NotFound` or `ConnectionRefused`) at connect, one that
/// died gives [`Error::Io`] (broken pipe, connection reset, or unexpected end) on the next
/// request: a caller can fall back to the store on disk. A request the keeper refused
/// gives [`Error::Keeper`] with its reason.
#[derive(Debug)]
pub struct KeeperClient {
    socket: PathBuf,
    stream: UnixStream,
    reader: BufReader<UnixStream>,
    info: KeeperInfo,
}

impl KeeperClient {
    /// Connects to the keeper listening on `socket` and checks that it speaks this
    /// protocol version.
    pub fn connect(socket: impl AsRef<Path>) -> Result<KeeperClient, Error> {
        let socket = socket.as_ref().to_path_buf();
        let stream = UnixStream::connect(&socket).map_err(|e| Error::io(&socket, e))?;
        let reader = BufReader::with_capacity(
            READ_BUFFER_BYTES,
            stream.try_clone().map_err(|e| Error::io(&socket, e))?,
        );
        let mut client = KeeperClient {
            socket,
            stream,
            reader,
            info: KeeperInfo {
                version: 0,
                persist_every: 0,
                keep_in_memory: 0,
                max_snapshot_bytes: 0,
                pid: 0,
            },
        };
        let mut h = HeadWriter::default();
        h.u16(PROTOCOL_VERSION);
        client.send(Kind::Hello, &h.0, &[])?;
        let frame = client.reply(Kind::Welcome, 0)?;
        let mut r = HeadReader::new(&frame.head, &client.socket);
        client.info = KeeperInfo {
            version: r.u16()?,
            persist_every: r.u64()?,
            keep_in_memory: r.u64()?,
            max_snapshot_bytes: r.u64()?,
            pid: r.u32()?,
        };
        r.finish()?;
        if client.info.version != PROTOCOL_VERSION {
            return Err(Error::UnsupportedVersion {
                file: client.socket.clone(),
                version: client.info.version,
                supported: PROTOCOL_VERSION,
            });
        }
        Ok(client)
    }

    /// What the keeper said when this client connected.
    pub fn info(&self) -> &KeeperInfo {
        &self.info
    }

    /// The keeper's socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Hands a snapshot of `series` to the keeper and returns once the keeper holds it
    /// in memory: a trainer killed after `put` returns loses nothing. The keeper
    /// persists it to its store in the background (every N-th put, and the latest on
    /// [`flush`](KeeperClient::flush) and shutdown). The tensors' bytes are written to
    /// the socket as they are (no copy), each with its xxh3 checksum.
    pub fn put(
        &mut self,
        series: &str,
        name: &str,
        metadata: &[(String, String)],
        tensors: &[Tensor],
    ) -> Result<PutReceipt, Error> {
        let started = Instant::now();
        let head = SnapshotHead::describe(series, name, metadata, tensors)?;
        let bytes = head.data_len();
        if bytes > self.info.max_snapshot_bytes {
            return Err(Error::InputLimit {
                what: format!(
                    "snapshot `{name}` for the keeper at {}",
                    self.socket.display()
                ),
                value: bytes,
                limit: self.info.max_snapshot_bytes,
            });
        }
        let mut h = HeadWriter::default();
        head.encode(&mut h);
        let data: Vec<&[u8]> = tensors.iter().map(|t| t.data.as_slice()).collect();
        self.send(Kind::Put, &h.0, &data)?;
        let frame = self.reply(Kind::Held, 0)?;
        let mut r = HeadReader::new(&frame.head, &self.socket);
        let receipt = PutReceipt {
            seq: r.u64()?,
            bytes: r.u64()?,
            persist: r.u8()? != 0,
            elapsed: started.elapsed(),
        };
        r.finish()?;
        Ok(receipt)
    }

    /// The latest snapshot of `series` the keeper has: from its memory
    /// ([`Snapshot::from_memory`] true; its `info.id` is the store's id once persisted,
    /// 0 before) or, for a keeper restarted after a crash that holds nothing of the
    /// series yet, from its store (`from_memory` false, `info` as the store lists it).
    /// Nothing is read from disk by the client. `None`: neither has one.
    pub fn latest(&mut self, series: &str) -> Result<Option<Snapshot>, Error> {
        let mut h = HeadWriter::default();
        h.str(series);
        self.send(Kind::Latest, &h.0, &[])?;
        let frame = self.reply(Kind::Snapshot, crate::default_decode_budget())?;
        let mut r = HeadReader::new(&frame.head, &self.socket);
        if r.u8()? == 0 {
            r.finish()?;
            return Ok(None);
        }
        let at = r.offset();
        let source = r.u8()?;
        if source != SOURCE_MEMORY && source != SOURCE_DISK {
            return Err(r.bad(at, format!("unknown snapshot source {source}")));
        }
        let _seq = r.u64()?;
        let id = r.u64()?;
        let base = r.u64()?;
        let state_hash = r.u64()?;
        let stored_bytes = r.u64()?;
        let file = r.str(crate::MAX_NAME_BYTES, "file name")?;
        let head = SnapshotHead::decode(&mut r, frame.data_len)?;
        r.finish()?;
        let tensors = wire::read_tensors(&mut self.reader, &head.tensors, &self.socket)?;
        let raw_bytes = head.data_len();
        Ok(Some(Snapshot {
            info: SnapshotInfo {
                id,
                name: head.name,
                series: head.series,
                file,
                base: (base != 0).then_some(base),
                state_hash,
                tensors: tensors.len() as u64,
                raw_bytes,
                stored_bytes,
                shards: Vec::new(),
            },
            metadata: head.metadata,
            tensors,
            from_memory: source == SOURCE_MEMORY,
        }))
    }

    /// Returns once every snapshot handed over (the latest of each series) is saved in
    /// the keeper's store.
    pub fn flush(&mut self) -> Result<(), Error> {
        self.send(Kind::Flush, &[], &[])?;
        let frame = self.reply(Kind::Flushed, 0)?;
        let mut r = HeadReader::new(&frame.head, &self.socket);
        let (_saved, _skipped) = (r.u64()?, r.u64()?);
        r.finish()
    }

    /// Sends one frame. If the keeper closed the connection mid-send (it refused the
    /// frame), its reason is read and returned when it sent one.
    fn send(&mut self, kind: Kind, head: &[u8], data: &[&[u8]]) -> Result<(), Error> {
        match wire::write_frame(&mut &self.stream, kind, head, data) {
            Ok(()) => Ok(()),
            Err(e) => match wire::read_frame(&mut self.reader, &self.socket, 0) {
                Ok(Some(f)) if f.kind == Kind::Failed => Err(self.refusal(&f)),
                _ => Err(Error::io(&self.socket, e)),
            },
        }
    }

    /// Reads the answer to a request: a frame of kind `want`, or `failed`.
    fn reply(&mut self, want: Kind, max_data: u64) -> Result<Frame, Error> {
        let frame =
            wire::read_frame(&mut self.reader, &self.socket, max_data)?.ok_or_else(|| {
                Error::io(
                    &self.socket,
                    std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "the keeper closed the connection",
                    ),
                )
            })?;
        if frame.kind == Kind::Failed {
            return Err(self.refusal(&frame));
        }
        if frame.kind != want {
            return Err(wire::malformed(
                &self.socket,
                4,
                format!("expected a {want:?} answer, got {:?}", frame.kind),
            ));
        }
        Ok(frame)
    }

    fn refusal(&self, frame: &Frame) -> Error {
        let mut r = HeadReader::new(&frame.head, &self.socket);
        match r.str(usize::MAX, "reason") {
            Ok(reason) => Error::Keeper {
                socket: self.socket.clone(),
                reason,
            },
            Err(e) => e,
        }
    }
}
