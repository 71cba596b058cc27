//! Restoring snapshots onto a Burn device, expanding them on the GPU.
//!
//! [`DeviceLoader::load`] walks a snapshot's chain (the full snapshot at its root, then
//! each delta) and keeps every tensor on the device. On a CubeCL device (wgpu) only the
//! compact form crosses the bus: the CPU entropy-decodes each payload (zstd, byte planes,
//! mask gaps: [`bitsnap_core::codec::decode_for_device`]) on all cores while the calling
//! thread uploads what is ready, and kernels finish it next to the base already on the
//! device:
//!
//! | stored as | uploaded | on the device |
//! |---|---|---|
//! | raw / byte planes | the dense tensor | nothing |
//! | unchanged | nothing | the base buffer is reused |
//! | XOR delta | `tensor XOR base` | one XOR |
//! | bitmask delta | the mask (1 bit per element), one running count per 1024 elements, the changed values | a scatter: each set bit's rank (block count + popcounts) picks its value |
//! | cluster codes | 2/3/4/6/8/16-bit codes as stored (3- and 6-bit codes straddle words) and the codebook | a table lookup |
//! | integer delta | `zigzag(tensor − base)` | per lane: un-zigzag, wrapping add to the base |
//! | cast of an f32 tensor | the exceptions, one record per 32-bit word they touch | round-to-nearest-even of the referenced f32 tensor (already on the device), then the exceptions patched in |
//! | identical to another tensor | nothing | the referenced tensor's buffer is reused |
//!
//! The result is bit for bit what the CPU decoder gives (and the tests check it on Mesa's
//! lavapipe, special values included: NaN payloads, ±0, subnormals, ±Inf). On any other
//! device (flex), or with [`Expansion::Host`], the CPU decodes the whole chain and the
//! dense tensors are uploaded: same call, same result. A chain holding a payload without
//! a device form ([`bitsnap_core::codec::CodecId::has_device_form`]) restores that way
//! too.
//!
//! Referenced tensors are restored first: a cast or copy waits on the launching thread
//! until the tensor it references (in its own snapshot, or the base) is on the device;
//! a tensor an earlier snapshot holds only for a later reference or delta is read, the
//! others that a later snapshot overwrites are not.
//!
//! Tensors of 8-byte elements (f64, i64, u64) stored as deltas are finished on the CPU
//! (their base is read back): the kernels handle 1-, 2- and 4-byte elements.
//!
//! [`LoadStats`] breaks each load down by stage: reading the files, checksums, entropy
//! decoding, uploads, kernels.

//!
//! # What a load checks
//!
//! Always, on every path (the chain is read and checked by bitsnap-core's
//! [`Store::restore_chains_needed`], the same checks as the reader the CPU decoder uses):
//! - each snapshot file of the chain: magic, version, trailer, header checksum, header
//!   fields, payloads tiling the data section, and that it holds the snapshot the
//!   manifest names;
//! - each link of the chain: a delta's recorded base (id and state hash, which covers
//!   every tensor's name, dtype, shape and decoded-data checksum) is the snapshot before
//!   it; the root has no base; for a sharded snapshot, each rank's chain, and that its
//!   shards belong to the committed attempt;
//! - the decode budget ([`Store::with_decode_budget`]): the decoded size of each snapshot
//!   and the state it is decoded against, before anything is allocated;
//! - each payload that is read: its checksum, and that it entropy-decodes to the size of
//!   its tensor;
//! - each delta tensor: its base tensor exists with the same dtype and shape (refused
//!   with [`bitsnap_core::Error::MissingBase`] naming the file and tensor otherwise).
//!
//! Payloads that a later snapshot of the chain overwrites with a base-free payload (and
//! that nothing references) are not read, so not checked ([`FormCounts::skipped`]).
//!
//! On the device path ([`Expansion::OnDevice`] on a CubeCL device) the decoded-data
//! checksum of each restored tensor, which covers what the kernels computed, is checked
//! only with [`DeviceLoader::with_verify`]: it needs a device-to-host copy of the whole
//! state. On the host path ([`Expansion::Host`], devices without CubeCL kernels, and chains
//! holding payloads without a device form) the
//! CPU decoder checks it for every tensor of
//! every snapshot of the chain; `with_verify` then also reads the uploaded tensors back
//! and compares them with what was uploaded.

mod chain;
mod kernels;
mod snapshot;
mod target;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bitsnap_core::format::{Entry, RefScope, SnapshotFile};
use bitsnap_core::{DType, Store};
use burn::tensor::{DType as BurnDType, Device};
use crossbeam::channel;
use rayon::prelude::*;

use crate::Error;
use crate::bridge::{self, Metadata};
use chain::Chain;
use snapshot::Value;
pub use snapshot::{DeviceSnapshot, DeviceTensor, FormCounts, LoadStats};
use target::{CubeTarget, Resident, Staged};

/// How a [`DeviceLoader`] turns payloads into device tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Expansion {
    /// Upload the compact form and expand it with GPU kernels (falls back to
    /// [`Expansion::Host`] on devices without CubeCL kernels, such as flex, and for
    /// chains holding payloads without a device form;
    /// [`bitsnap_core::Policy::device_forms_only`] keeps them out; a sharded snapshot
    /// restores rank by rank). Default.
    #[default]
    OnDevice,
    /// Decode the whole chain on the CPU, then upload dense tensors.
    Host,
}

/// Restores snapshots of a [`Store`] onto a Burn device.
///
/// What a load checks, and what only [`DeviceLoader::with_verify`] adds, is listed in
/// the [module documentation](self#what-a-load-checks).
///
/// ```
/// use bitsnap_burn::gpu::DeviceLoader;
/// use bitsnap_core::{DType, Policy, Role, Store, Tensor};
/// let dir = tempfile::tempdir().unwrap();
/// let mut store = Store::open_or_create(dir.path(), Policy::default()).unwrap();
/// let w = Tensor::from_f32("w", &[2, 2], Role::Weight, &[1.0, 2.0, 3.0, 4.0]).unwrap();
/// let id = store.save("step-1", vec![w]).unwrap().info.id;
/// let device = burn::tensor::Device::flex();
/// let snap = DeviceLoader::new(&device).load(&store, id).unwrap();
/// let t = snap.get("w").unwrap().float::<2>().unwrap();
/// assert_eq!(t.into_data().to_vec::<f32>().unwrap(), vec![1.0, 2.0, 3.0, 4.0]);
/// ```
#[derive(Debug, Clone)]
pub struct DeviceLoader {
    device: Device,
    expansion: Expansion,
    verify: bool,
}

impl DeviceLoader {
    /// A loader onto `device`, expanding on the device where it can, without the
    /// read-back verification.
    pub fn new(device: &Device) -> DeviceLoader {
        DeviceLoader {
            device: device.clone(),
            expansion: Expansion::default(),
            verify: false,
        }
    }

    /// Chooses how payloads are expanded (default [`Expansion::OnDevice`]).
    pub fn with_expansion(mut self, expansion: Expansion) -> Self {
        self.expansion = expansion;
        self
    }

    /// Also reads every restored tensor back and checks it: on the device path against
    /// the checksum the snapshot recorded for its decoded bytes, on the host path against
    /// the bytes uploaded (default off: it adds a device-to-host copy of the whole state;
    /// see the [module documentation](self#what-a-load-checks) for what is always
    /// checked).
    pub fn with_verify(mut self, verify: bool) -> Self {
        self.verify = verify;
        self
    }

    /// Restores snapshot `id` of `store` (its whole chain) onto the device.
    pub fn load(&self, store: &Store, id: u64) -> Result<DeviceSnapshot, Error> {
        let start = Instant::now();
        // Uploads go to CubeCL buffers wherever the device has them; kernels expand
        // payloads there only with `Expansion::OnDevice`.
        let cube = CubeTarget::probe(&self.device);
        let expand = match self.expansion {
            Expansion::OnDevice => cube.as_ref(),
            Expansion::Host => None,
        };
        let t_read = Instant::now();
        let chains = match expand {
            Some(_) => Chain::open(store, id)?,
            None => Vec::new(),
        };
        let read = t_read.elapsed();
        // Payloads without a device form decode on the host: a chain holding one
        // restores through the CPU decoder.
        let host_only = chains.iter().any(Chain::has_host_only_payloads);
        let mut snap = match (expand, host_only) {
            (Some(target), false) => {
                // One chain per rank for a sharded snapshot; each restores its own tensors.
                let mut parts = chains
                    .iter()
                    .map(|chain| self.load_on_device(store, id, chain, target))
                    .collect::<Result<Vec<_>, Error>>()?
                    .into_iter();
                let mut snap = parts.next().ok_or_else(|| no_chain(store, id))?;
                for part in parts {
                    snap.absorb(part);
                }
                snap.stats.read = read;
                snap
            }
            _ => {
                let mut snap = self.load_on_host(store, id, cube.clone(), &chains)?;
                snap.stats.read = read;
                snap
            }
        };
        let t_sync = Instant::now();
        self.device.sync().map_err(|e| Error::Device {
            operation: "synchronising the device".into(),
            source: Box::new(e),
        })?;
        snap.stats.kernels += t_sync.elapsed();
        snap.stats.wall = start.elapsed();
        Ok(snap)
    }

    /// Decodes on the CPU and uploads dense tensors. `chains` are the chains the device
    /// path already read and checked (it falls back here for host-only payloads): they are
    /// decoded as they are, not read again; without them the store loads the snapshot
    /// (from memory when it made that save).
    fn load_on_host(
        &self,
        store: &Store,
        id: u64,
        cube: Option<CubeTarget>,
        chains: &[Chain],
    ) -> Result<DeviceSnapshot, Error> {
        let t0 = Instant::now();
        let ((snapshot_tensors, metadata), files) = match chains.first() {
            Some(first) => {
                let mut tensors = Vec::new();
                for chain in chains {
                    tensors.extend(chain.decode()?);
                }
                let metadata = first.target().header.metadata.clone();
                let files = chains.iter().map(|c| c.files().len()).sum();
                ((tensors, metadata), files)
            }
            None => {
                let s = store.load(id)?;
                // A sharded snapshot has one chain per rank: counted as one snapshot.
                let files = if store.get(id).is_some_and(|s| !s.shards.is_empty()) {
                    1
                } else {
                    store.chain(id)?.len()
                };
                ((s.tensors, s.metadata), files)
            }
        };
        let decode = t0.elapsed();
        let mut stats = LoadStats {
            snapshots: files,
            cpu_decode: decode,
            ..LoadStats::default()
        };
        let mut tensors = Vec::with_capacity(snapshot_tensors.len());
        for t in snapshot_tensors {
            stats.upload_bytes += t.data.len() as u64;
            stats.dense_bytes += t.data.len() as u64;
            stats.forms.dense += 1;
            let burn_dtype = burn_dtype(&t.name, t.dtype, &metadata)?;
            let value = match &cube {
                Some(target) => {
                    let words = target.upload(&t.data);
                    if self.verify {
                        let back = target.read(&t.name, &words, t.data.len())?;
                        if back != t.data {
                            return Err(upload_differs(store, id, &t.name, &t.data, &back));
                        }
                    }
                    Value::Cube(words, target.clone())
                }
                None => Value::Host(t.data),
            };
            tensors.push(DeviceTensor {
                name: t.name,
                dtype: t.dtype,
                burn_dtype,
                shape: t.shape.iter().map(|&d| d as usize).collect(),
                role: t.role,
                value,
                device: self.device.clone(),
            });
        }
        Ok(DeviceSnapshot {
            store: store.dir().to_path_buf(),
            id,
            tensors,
            metadata,
            stats,
        })
    }

    fn load_on_device(
        &self,
        store: &Store,
        id: u64,
        chain: &Chain,
        target: &CubeTarget,
    ) -> Result<DeviceSnapshot, Error> {
        let needed = chain.needed();
        let mut stats = LoadStats {
            snapshots: chain.files().len(),
            read_bytes: chain.read_bytes(&needed),
            ..LoadStats::default()
        };
        // Entropy decoding and uploads run on the rayon pool, a few tensors ahead of the
        // kernels, which this thread launches in chain order.
        let (tx, rx) = channel::bounded::<Result<Decoded, Error>>(rayon::current_num_threads() * 2);
        let mut state: HashMap<String, Resident> = HashMap::new();
        let (files, needed) = (chain.files(), &needed);
        std::thread::scope(|scope| -> Result<(), Error> {
            scope.spawn(move || {
                for (k, file) in files.iter().enumerate() {
                    if tx.send(Ok(Decoded::Snapshot(k))).is_err() {
                        return;
                    }
                    let sent = file.header.entries.par_iter().try_for_each(|e| {
                        if !needed.get(k).is_some_and(|n| n.contains(e.name.as_str())) {
                            return tx
                                .send(Ok(Decoded::Skipped(e.name.clone())))
                                .map_err(|_| ());
                        }
                        let msg = chain::decode_form(file, e).and_then(|(form, sum, dec)| {
                            let staged = target.stage(file, e, form)?;
                            Ok(Decoded::Tensor(Box::new(Ready {
                                entry: e.clone(),
                                staged,
                                checksum: sum,
                                decode: dec,
                            })))
                        });
                        tx.send(msg).map_err(|_| ())
                    });
                    if sent.is_err() {
                        return;
                    }
                }
            });
            // Owned here, so an early return drops it and stops the producer.
            let rx = rx;
            let mut next: HashMap<String, Resident> = HashMap::new();
            // Tensors waiting for a same-snapshot tensor they reference.
            let mut waiting: Vec<Ready> = Vec::new();
            let mut current: Option<&SnapshotFile> = None;
            let unresolved = |file: &SnapshotFile, waiting: &[Ready]| match waiting.first() {
                Some(r) => Err(unresolved_reference(file, &r.entry)),
                None => Ok(()),
            };
            for msg in rx.iter() {
                match msg? {
                    Decoded::Snapshot(k) => {
                        if let Some(file) = current {
                            unresolved(file, &waiting)?;
                            state = std::mem::take(&mut next);
                        }
                        current = files.get(k);
                    }
                    Decoded::Skipped(name) => {
                        stats.forms.skipped += 1;
                        next.remove(&name);
                    }
                    Decoded::Tensor(boxed) => {
                        let file = current.ok_or_else(|| no_chain(store, id))?;
                        stats.checksum += boxed.checksum;
                        stats.cpu_decode += boxed.decode;
                        stats.upload += boxed.staged.upload_time;
                        waiting.push(*boxed);
                        // Finish what is ready; each finished tensor may free others.
                        let t = Instant::now();
                        while let Some(i) = waiting.iter().position(|r| ready(r, &next)) {
                            let r = waiting.swap_remove(i);
                            let base = state.get(&r.entry.name);
                            let reference =
                                r.entry.references.first().and_then(|x| match x.scope {
                                    RefScope::Snapshot => next.get(&x.name),
                                    RefScope::Base => state.get(&x.name),
                                });
                            let resident = target
                                .finish(file, &r.entry, r.staged, base, reference, &mut stats)?;
                            next.insert(r.entry.name, resident);
                        }
                        stats.kernels += t.elapsed();
                    }
                }
            }
            if let Some(file) = current {
                unresolved(file, &waiting)?;
                state = next;
            }
            Ok(())
        })?;
        let last = chain.target();
        let header = &last.header;
        // Only the last snapshot's dense bytes count as the restored state.
        stats.dense_bytes = header.raw_bytes();
        let mut tensors = Vec::with_capacity(header.entries.len());
        for e in &header.entries {
            let resident = state.remove(&e.name).ok_or_else(|| Error::MissingTensor {
                store: store.dir().to_path_buf(),
                snapshot: id,
                tensor: e.name.clone(),
            })?;
            if self.verify {
                last.check_decoded(
                    e,
                    &target.read(&e.name, &resident.words, e.raw_len() as usize)?,
                )?;
            }
            tensors.push(DeviceTensor {
                name: e.name.clone(),
                dtype: e.dtype,
                burn_dtype: burn_dtype(&e.name, e.dtype, &header.metadata)?,
                shape: e.shape.iter().map(|&d| d as usize).collect(),
                role: e.role,
                value: Value::Cube(resident.words, target.clone()),
                device: self.device.clone(),
            });
        }
        Ok(DeviceSnapshot {
            store: store.dir().to_path_buf(),
            id,
            tensors,
            metadata: header.metadata.clone(),
            stats,
        })
    }
}

/// What the decoding threads hand to the kernel-launching thread, in chain order.
enum Decoded {
    /// The payloads that follow are of the chain's `k`-th snapshot.
    Snapshot(usize),
    Tensor(Box<Ready>),
    /// Not needed: overwritten later in the chain by a base-free payload.
    Skipped(String),
}

/// One tensor's payload, staged on the device, with what it cost.
struct Ready {
    entry: Entry,
    staged: Staged,
    checksum: Duration,
    decode: Duration,
}

/// Whether `r` can be finished: its codec reads no tensor of its own snapshot, or that
/// tensor is restored (in `next`).
fn ready(r: &Ready, next: &HashMap<String, Resident>) -> bool {
    !r.staged.needs_reference()
        || r.entry
            .references
            .first()
            .is_none_or(|x| x.scope == RefScope::Base || next.contains_key(&x.name))
}

/// A tensor of `file` whose same-snapshot reference was never restored.
fn unresolved_reference(file: &SnapshotFile, entry: &Entry) -> Error {
    let name = entry
        .references
        .first()
        .map_or("(none)", |r| r.name.as_str());
    bitsnap_core::Error::Malformed {
        file: file.path.clone(),
        tensor: Some(entry.name.clone()),
        what: "header",
        offset: 0,
        reason: format!("references `{name}`, which the snapshot does not restore"),
    }
    .into()
}

fn no_chain(store: &Store, id: u64) -> Error {
    bitsnap_core::Error::UnknownSnapshot {
        store: store.dir().to_path_buf(),
        snapshot: id.to_string(),
    }
    .into()
}

/// A tensor read back after its upload is not what was uploaded.
fn upload_differs(store: &Store, id: u64, tensor: &str, uploaded: &[u8], back: &[u8]) -> Error {
    let file = store
        .get(id)
        .map_or_else(|| store.dir().to_path_buf(), |s| store.dir().join(&s.file));
    bitsnap_core::Error::Checksum {
        file,
        tensor: Some(tensor.to_string()),
        what: "decoded data",
        offset: 0,
        expected: xxhash_rust::xxh3::xxh3_64(uploaded),
        actual: xxhash_rust::xxh3::xxh3_64(back),
    }
    .into()
}

fn burn_dtype(name: &str, dtype: DType, metadata: &Metadata) -> Result<BurnDType, Error> {
    bridge::burn_dtype_of(name, dtype, metadata).ok_or_else(|| Error::UnsupportedDType {
        tensor: name.to_string(),
        dtype: dtype.to_string(),
    })
}
