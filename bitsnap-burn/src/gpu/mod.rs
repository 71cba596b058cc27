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
//! | cluster codes | 4/8/16-bit codes and the codebook | a table lookup |
//!
//! The result is bit for bit what the CPU decoder gives (and the tests check it on Mesa's
//! lavapipe). On any other device (flex), or with [`Expansion::Host`], the CPU decodes the
//! whole chain and the dense tensors are uploaded: same call, same result.
//!
//! Tensors of 8-byte elements (f64, i64, u64) stored as deltas are finished on the CPU
//! (their base is read back): the kernels handle 1-, 2- and 4-byte elements.

mod kernels;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bitsnap_core::codec::{DeviceForm, apply_device_form};
use bitsnap_core::format::{Entry, Header};
use bitsnap_core::{DType, Role, Store};
use burn::backend::Cube;
use burn::backend::wgpu::CubeTensor;
use burn::cubecl::client::Client;
use burn::module::{Module, ModuleMapper, Param, ParamId};
use burn::prelude::{Bool, Int, Tensor, TensorData};
use burn::tensor::{DType as BurnDType, Device, Shape};
use crossbeam::channel;
use rayon::prelude::*;

use crate::Error;
use crate::bridge::{self, Metadata};
use kernels::Words;

/// How a [`DeviceLoader`] turns payloads into device tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Expansion {
    /// Upload the compact form and expand it with GPU kernels (falls back to
    /// [`Expansion::Host`] on devices without CubeCL kernels, such as flex). Default.
    #[default]
    OnDevice,
    /// Decode the whole chain on the CPU, then upload dense tensors.
    Host,
}

/// Restores snapshots of a [`Store`] onto a Burn device.
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
    /// A loader onto `device`, expanding on the device where it can.
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

    /// Also reads every restored tensor back and checks it against the checksum the
    /// snapshot recorded for its decoded bytes (default off: payload checksums are always
    /// verified; this adds a device-to-host copy of the whole state).
    pub fn with_verify(mut self, verify: bool) -> Self {
        self.verify = verify;
        self
    }

    /// Restores snapshot `id` of `store` (its whole chain) onto the device.
    pub fn load(&self, store: &Store, id: u64) -> Result<DeviceSnapshot, Error> {
        let start = Instant::now();
        let cube = match self.expansion {
            Expansion::OnDevice => CubeTarget::probe(&self.device),
            Expansion::Host => None,
        };
        let mut snap = match cube {
            Some(target) => self.load_on_device(store, id, &target)?,
            None => self.load_on_host(store, id)?,
        };
        if self.verify {
            let file = store.open_file(id)?;
            for e in &file.header.entries {
                let t = snap.get(&e.name).ok_or_else(|| Error::Incomplete {
                    store: store.dir().to_path_buf(),
                    reason: format!("tensor `{}` was not restored", e.name),
                })?;
                file.check_decoded(e, &t.to_bytes()?)?;
            }
        }
        self.device
            .sync()
            .map_err(|e| Error::Device(format!("{e:?}")))?;
        snap.stats.wall = start.elapsed();
        Ok(snap)
    }

    fn load_on_host(&self, store: &Store, id: u64) -> Result<DeviceSnapshot, Error> {
        let t0 = Instant::now();
        let snapshot = store.load(id)?;
        let decode = t0.elapsed();
        let cube = CubeTarget::probe(&self.device);
        let mut stats = LoadStats {
            snapshots: store.chain(id)?.len(),
            cpu_decode: decode,
            ..LoadStats::default()
        };
        let mut tensors = Vec::with_capacity(snapshot.tensors.len());
        for t in snapshot.tensors {
            stats.upload_bytes += t.data.len() as u64;
            stats.dense_bytes += t.data.len() as u64;
            stats.forms.dense += 1;
            let burn_dtype = burn_dtype(&t.name, t.dtype, &snapshot.metadata)?;
            let shape: Vec<usize> = t.shape.iter().map(|&d| d as usize).collect();
            let value = match &cube {
                Some(target) => Value::Cube(target.upload(&t.data)),
                None => Value::Host(t.data),
            };
            tensors.push(DeviceTensor {
                name: t.name,
                dtype: t.dtype,
                burn_dtype,
                shape,
                role: t.role,
                value,
                device: self.device.clone(),
                cube: cube.clone(),
            });
        }
        Ok(DeviceSnapshot {
            tensors,
            metadata: snapshot.metadata,
            stats,
        })
    }

    fn load_on_device(
        &self,
        store: &Store,
        id: u64,
        target: &CubeTarget,
    ) -> Result<DeviceSnapshot, Error> {
        let chain = store.chain(id)?;
        let mut stats = LoadStats {
            snapshots: chain.len(),
            ..LoadStats::default()
        };
        let files = chain
            .par_iter()
            .map(|&sid| store.open_file(sid))
            .collect::<Result<Vec<_>, _>>()?;
        // A tensor's history starts at its last base-free payload (dense or codes): what
        // came before is overwritten, so it is neither decoded nor uploaded.
        let mut start: HashMap<&str, usize> = HashMap::new();
        for (k, f) in files.iter().enumerate() {
            for e in &f.header.entries {
                if !e.codec.needs_base() {
                    start.insert(e.name.as_str(), k);
                }
            }
        }
        // Entropy decoding and uploads run on the rayon pool, a few tensors ahead of the
        // kernels, which this thread launches in chain order.
        let (tx, rx) = channel::bounded::<Result<Decoded, Error>>(rayon::current_num_threads() * 2);
        let mut state: HashMap<String, Words> = HashMap::new();
        let mut header: Option<Header> = None;
        let mut decode_time = Duration::ZERO;
        let (files, start) = (&files, &start);
        std::thread::scope(|scope| -> Result<(), Error> {
            scope.spawn(move || {
                for (k, file) in files.iter().enumerate() {
                    let head = file.header.clone();
                    if tx.send(Ok(Decoded::Header(Box::new(head)))).is_err() {
                        return;
                    }
                    let sent = file.header.entries.par_iter().try_for_each(|e| {
                        if start.get(e.name.as_str()).is_some_and(|&s| k < s) {
                            return tx
                                .send(Ok(Decoded::Skipped(e.name.clone())))
                                .map_err(|_| ());
                        }
                        let t = Instant::now();
                        let staged = file
                            .decode_for_device(e)
                            .map_err(Error::from)
                            .and_then(|form| target.stage(e, form));
                        let msg =
                            staged.map(|f| Decoded::Tensor(Box::new((e.clone(), f, t.elapsed()))));
                        tx.send(msg).map_err(|_| ())
                    });
                    if sent.is_err() {
                        return;
                    }
                }
            });
            // Owned here, so an early return drops it and stops the producer.
            let rx = rx;
            let mut next: HashMap<String, Words> = HashMap::new();
            let mut current: Option<Header> = None;
            for msg in rx.iter() {
                match msg? {
                    Decoded::Header(h) => {
                        if let Some(done) = current.take() {
                            check_base(store, &h, &done)?;
                            state = std::mem::take(&mut next);
                            header = Some(done);
                        } else if let Some(b) = h.base {
                            return Err(bitsnap_core::Error::MissingBase {
                                file: store.dir().join(format!("snapshot {}", h.id)),
                                base_id: b.id,
                                reason: "was not provided".into(),
                            }
                            .into());
                        }
                        current = Some(*h);
                    }
                    Decoded::Skipped(name) => {
                        stats.forms.skipped += 1;
                        next.remove(&name);
                    }
                    Decoded::Tensor(boxed) => {
                        let (entry, staged, took) = *boxed;
                        decode_time += took;
                        let base = state.get(&entry.name);
                        let words = target.finish(store, &entry, staged, base, &mut stats)?;
                        next.insert(entry.name, words);
                    }
                }
            }
            if let Some(done) = current.take() {
                state = next;
                header = Some(done);
            }
            Ok(())
        })?;
        stats.cpu_decode = decode_time;
        let header = header.ok_or_else(|| Error::Incomplete {
            store: store.dir().to_path_buf(),
            reason: format!("snapshot {id} has no chain"),
        })?;
        // Only the last snapshot's dense bytes count as the restored state.
        stats.dense_bytes = header.raw_bytes();
        let mut tensors = Vec::with_capacity(header.entries.len());
        for e in &header.entries {
            let words = state.remove(&e.name).ok_or_else(|| Error::Incomplete {
                store: store.dir().to_path_buf(),
                reason: format!("tensor `{}` was not restored", e.name),
            })?;
            tensors.push(DeviceTensor {
                name: e.name.clone(),
                dtype: e.dtype,
                burn_dtype: burn_dtype(&e.name, e.dtype, &header.metadata)?,
                shape: e.shape.iter().map(|&d| d as usize).collect(),
                role: e.role,
                value: Value::Cube(words),
                device: self.device.clone(),
                cube: Some(target.clone()),
            });
        }
        Ok(DeviceSnapshot {
            tensors,
            metadata: header.metadata,
            stats,
        })
    }
}

/// The delta snapshot `next` must have been encoded against `prev`.
fn check_base(store: &Store, next: &Header, prev: &Header) -> Result<(), Error> {
    match next.base {
        Some(b) if b.id == prev.id && b.state_hash == prev.state_hash() => Ok(()),
        Some(b) => Err(bitsnap_core::Error::MissingBase {
            file: store.dir().join(format!("snapshot {}", next.id)),
            base_id: b.id,
            reason: format!(
                "does not match: found snapshot {} with state hash {:016x}",
                prev.id,
                prev.state_hash()
            ),
        }
        .into()),
        None => Ok(()),
    }
}

enum Decoded {
    Header(Box<Header>),
    Tensor(Box<(Entry, Staged, Duration)>),
    /// Overwritten later in the chain by a base-free payload.
    Skipped(String),
}

fn burn_dtype(name: &str, dtype: DType, metadata: &Metadata) -> Result<BurnDType, Error> {
    bridge::burn_dtype_of(name, dtype, metadata).ok_or_else(|| Error::UnsupportedDType {
        tensor: name.to_string(),
        dtype: dtype.to_string(),
    })
}

/// A CubeCL device: its client and Burn-side device, found through a probe tensor.
#[derive(Clone)]
struct CubeTarget {
    client: Client,
    device: burn::cubecl::Device,
}

impl std::fmt::Debug for CubeTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CubeTarget")
    }
}

impl CubeTarget {
    /// The CubeCL client behind `device`, if it is a CubeCL (wgpu) device.
    fn probe(device: &Device) -> Option<CubeTarget> {
        let probe = Tensor::<1>::zeros([1], &device.clone().inner());
        let t: CubeTensor = probe.try_into_primitive::<Cube>().ok()?;
        Some(CubeTarget {
            client: t.client,
            device: t.device,
        })
    }

    /// Uploads `bytes`, padded with zeros to whole words.
    fn upload(&self, bytes: &[u8]) -> Words {
        let words = bytes.len().div_ceil(4);
        let handle = if bytes.len() == words * 4 && !bytes.is_empty() {
            self.client.create_from_slice(bytes)
        } else {
            let mut padded = Vec::with_capacity(words.max(1) * 4);
            padded.extend_from_slice(bytes);
            padded.resize(words.max(1) * 4, 0);
            self.client.create_from_slice(&padded)
        };
        Words { handle, words }
    }

    /// Uploads 32-bit words.
    fn upload_words(&self, words: &[u32]) -> Words {
        let mut bytes = Vec::with_capacity(words.len() * 4);
        words
            .iter()
            .for_each(|w| bytes.extend_from_slice(&w.to_le_bytes()));
        self.upload(&bytes)
    }

    fn empty(&self, words: usize) -> Words {
        Words {
            handle: self.client.empty(words.max(1) * 4),
            words,
        }
    }

    fn read(&self, words: &Words, len: usize) -> Result<Vec<u8>, Error> {
        let bytes = self
            .client
            .read_one(words.handle.clone())
            .map_err(|e| Error::Device(format!("reading a tensor back: {e:?}")))?;
        bytes
            .get(..len)
            .map(<[u8]>::to_vec)
            .ok_or_else(|| Error::Device(format!("read {} bytes, {len} expected", bytes.len())))
    }

    /// Uploads what one tensor's device form needs (on any thread).
    fn stage(&self, entry: &Entry, form: DeviceForm) -> Result<Staged, Error> {
        let upload_bytes = form.upload_bytes();
        let narrow = matches!(entry.dtype.size(), 1 | 2 | 4);
        let kind = match form {
            DeviceForm::Dense(d) => StagedKind::Dense(self.upload(&d)),
            DeviceForm::Unchanged => StagedKind::Unchanged,
            DeviceForm::Xor(x) if narrow => StagedKind::Xor(self.upload(&x)),
            DeviceForm::Sparse(s) if narrow => {
                let numel = entry.numel() as usize;
                if s.mask.len() != numel.div_ceil(32)
                    || s.block_ranks.len() != numel.div_ceil(bitsnap_core::codec::RANK_BLOCK)
                    || s.values.len() as u64 != s.changed * entry.dtype.size() as u64
                {
                    return Err(Error::Device(format!(
                        "tensor `{}`: inconsistent bitmask delta",
                        entry.name
                    )));
                }
                if s.changed == 0 {
                    StagedKind::Unchanged
                } else {
                    StagedKind::Sparse {
                        mask: self.upload_words(&s.mask),
                        ranks: self.upload_words(&s.block_ranks),
                        values: self.upload(&s.values),
                    }
                }
            }
            DeviceForm::Codes(c) if narrow => StagedKind::Codes {
                codes: self.upload(&c.codes),
                book: self.upload(&c.codebook),
                bits: c.bits,
            },
            // 8-byte elements: finished on the CPU once the base is known.
            other => StagedKind::Host(other),
        };
        Ok(Staged { kind, upload_bytes })
    }

    /// Turns one tensor's staged form into its buffer, next to its base.
    fn finish(
        &self,
        store: &Store,
        entry: &Entry,
        staged: Staged,
        base: Option<&Words>,
        stats: &mut LoadStats,
    ) -> Result<Words, Error> {
        let len = entry.raw_len() as usize;
        let words = len.div_ceil(4);
        let width_bits = 8 * entry.dtype.size() as u32;
        stats.upload_bytes += staged.upload_bytes;
        let missing_base = || -> Error {
            bitsnap_core::Error::MissingBase {
                file: store.dir().to_path_buf(),
                base_id: 0,
                reason: format!(
                    "has no tensor `{}` of dtype {} and shape {:?} to decode against",
                    entry.name, entry.dtype, entry.shape
                ),
            }
            .into()
        };
        let base = base.filter(|b| b.words == words);
        let base_needed = || base.ok_or_else(missing_base);
        Ok(match staged.kind {
            StagedKind::Dense(d) => {
                stats.forms.dense += 1;
                d
            }
            StagedKind::Unchanged => {
                stats.forms.unchanged += 1;
                Words {
                    handle: base_needed()?.handle.clone(),
                    words,
                }
            }
            StagedKind::Xor(delta) => {
                stats.forms.xor += 1;
                let b = base_needed()?;
                let out = self.empty(words);
                if words > 0 {
                    kernels::xor(&self.client, b, &delta, &out);
                }
                out
            }
            StagedKind::Sparse {
                mask,
                ranks,
                values,
            } => {
                stats.forms.sparse += 1;
                let b = base_needed()?;
                let out = self.empty(words);
                kernels::scatter(&self.client, b, &mask, &ranks, &values, &out, width_bits);
                out
            }
            StagedKind::Codes { codes, book, bits } => {
                stats.forms.codes += 1;
                let out = self.empty(words);
                if words > 0 {
                    let numel = entry.numel() as u32;
                    kernels::lookup(&self.client, &codes, &book, &out, numel, width_bits, bits);
                }
                out
            }
            StagedKind::Host(form) => {
                stats.forms.host += 1;
                let base = match form {
                    DeviceForm::Dense(_) | DeviceForm::Codes(_) => None,
                    _ => Some(self.read(base_needed()?, len)?),
                };
                let numel = entry.numel() as usize;
                let dense = apply_device_form(&form, entry.dtype, numel, base.as_deref())
                    .map_err(|e| Error::Device(format!("tensor `{}`: {}", entry.name, e.reason)))?;
                self.upload(&dense)
            }
        })
    }
}

/// One tensor's payload, uploaded and waiting for its base.
struct Staged {
    kind: StagedKind,
    upload_bytes: u64,
}

enum StagedKind {
    Dense(Words),
    Unchanged,
    Xor(Words),
    Sparse {
        mask: Words,
        ranks: Words,
        values: Words,
    },
    Codes {
        codes: Words,
        book: Words,
        bits: u32,
    },
    Host(DeviceForm),
}

/// Where a restored tensor lives.
enum Value {
    /// A CubeCL buffer on the device, padded to whole words.
    Cube(Words),
    /// Host bytes (devices without CubeCL: Burn tensors are made on request).
    Host(Vec<u8>),
}

/// One restored tensor, on the device.
pub struct DeviceTensor {
    name: String,
    dtype: DType,
    burn_dtype: BurnDType,
    shape: Vec<usize>,
    role: Role,
    value: Value,
    device: Device,
    cube: Option<CubeTarget>,
}

impl std::fmt::Debug for DeviceTensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceTensor")
            .field("name", &self.name)
            .field("dtype", &self.burn_dtype)
            .field("shape", &self.shape)
            .finish()
    }
}

impl DeviceTensor {
    /// The stored name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The stored dtype (kept on the device).
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Burn's dtype for it.
    pub fn burn_dtype(&self) -> BurnDType {
        self.burn_dtype
    }

    /// Dimensions.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// The role it was saved with.
    pub fn role(&self) -> Role {
        self.role
    }

    fn check_rank<const D: usize>(&self) -> Result<(), Error> {
        if self.shape.len() == D {
            Ok(())
        } else {
            Err(Error::Device(format!(
                "tensor `{}` has rank {}, {D} requested",
                self.name,
                self.shape.len()
            )))
        }
    }

    fn cube_primitive(&self) -> Option<CubeTensor> {
        match (&self.value, &self.cube) {
            (Value::Cube(w), Some(target)) => Some(CubeTensor::new_contiguous(
                target.client.clone(),
                target.device.clone(),
                Shape::from(self.shape.clone()),
                w.handle.clone(),
                self.burn_dtype,
            )),
            _ => None,
        }
    }

    fn host_data(&self) -> Option<TensorData> {
        match &self.value {
            Value::Host(bytes) => Some(TensorData::from_bytes_vec(
                bytes.clone(),
                self.shape.clone(),
                self.burn_dtype,
            )),
            Value::Cube(_) => None,
        }
    }

    /// The tensor as a float tensor of rank `D`, on the loader's device, in its stored
    /// dtype (no copy on a CubeCL device).
    pub fn float<const D: usize>(&self) -> Result<Tensor<D>, Error> {
        self.check_rank::<D>()?;
        if let Some(p) = self.cube_primitive() {
            return Ok(Tensor::<D>::from_primitive::<Cube>(p).to_device(&self.device));
        }
        let data = self.host_data().ok_or_else(|| self.not_float())?;
        Ok(Tensor::from_data(data, (&self.device, self.burn_dtype)))
    }

    /// The tensor as an int tensor of rank `D`, on the loader's device.
    pub fn int<const D: usize>(&self) -> Result<Tensor<D, Int>, Error> {
        self.check_rank::<D>()?;
        if let Some(p) = self.cube_primitive() {
            return Ok(Tensor::<D, Int>::from_primitive::<Cube>(p).to_device(&self.device));
        }
        let data = self.host_data().ok_or_else(|| self.not_float())?;
        Ok(Tensor::from_data(data, (&self.device, self.burn_dtype)))
    }

    /// The tensor as a bool tensor of rank `D`, on the loader's device.
    pub fn bool<const D: usize>(&self) -> Result<Tensor<D, Bool>, Error> {
        self.check_rank::<D>()?;
        if let Some(p) = self.cube_primitive() {
            return Ok(Tensor::<D, Bool>::from_primitive::<Cube>(p).to_device(&self.device));
        }
        let data = self.host_data().ok_or_else(|| self.not_float())?;
        Ok(Tensor::from_data(data, (&self.device, self.burn_dtype)))
    }

    fn not_float(&self) -> Error {
        Error::Device(format!("tensor `{}` has no data", self.name))
    }

    /// Reads the tensor's bytes back to the host (a device-to-host copy on a GPU).
    pub fn to_bytes(&self) -> Result<Vec<u8>, Error> {
        let len = self.shape.iter().product::<usize>() * self.dtype.size();
        match (&self.value, &self.cube) {
            (Value::Host(b), _) => Ok(b.clone()),
            (Value::Cube(w), Some(target)) => target.read(w, len),
            (Value::Cube(_), None) => Err(self.not_float()),
        }
    }
}

/// What a load did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LoadStats {
    /// Snapshots applied (the chain's length).
    pub snapshots: usize,
    /// Bytes moved host-to-device.
    pub upload_bytes: u64,
    /// Bytes of the restored state (dense).
    pub dense_bytes: u64,
    /// CPU time spent entropy-decoding, summed over threads.
    pub cpu_decode: Duration,
    /// Wall time of the whole load, until the device finished.
    pub wall: Duration,
    /// How many tensor payloads took each path.
    pub forms: FormCounts,
}

/// Payloads per path of a load.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FormCounts {
    /// Uploaded dense.
    pub dense: usize,
    /// Reused the base buffer.
    pub unchanged: usize,
    /// XOR'd on the device.
    pub xor: usize,
    /// Bitmask-scattered on the device.
    pub sparse: usize,
    /// Dequantized on the device.
    pub codes: usize,
    /// Finished on the CPU (8-byte elements).
    pub host: usize,
    /// Not read at all: a later snapshot stores the tensor without a base.
    pub skipped: usize,
}

/// A snapshot restored onto a device: every tensor, the snapshot's metadata, and what the
/// load cost.
#[derive(Debug)]
pub struct DeviceSnapshot {
    tensors: Vec<DeviceTensor>,
    metadata: Metadata,
    /// What the load did.
    pub stats: LoadStats,
}

impl DeviceSnapshot {
    /// The tensors, in the snapshot's order.
    pub fn tensors(&self) -> &[DeviceTensor] {
        &self.tensors
    }

    /// The tensor named `name`.
    pub fn get(&self, name: &str) -> Option<&DeviceTensor> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The snapshot's metadata.
    pub fn metadata(&self) -> &Metadata {
        &self.metadata
    }

    /// Loads the tensors named `prefix + <parameter path>` into `module`'s parameters,
    /// keeping each parameter's device and autodiff setting and restoring its saved
    /// parameter id. On a CubeCL device the parameters take the restored buffers without
    /// a copy. Every parameter of the module must be in the snapshot.
    pub fn apply_to_module<M: Module>(&self, module: M, prefix: &str) -> Result<M, Error> {
        let mut mapper = Applier {
            snapshot: self,
            prefix,
            path: Vec::new(),
            error: None,
        };
        let module = module.map(&mut mapper);
        match mapper.error {
            Some(e) => Err(e),
            None => Ok(module),
        }
    }
}

struct Applier<'a> {
    snapshot: &'a DeviceSnapshot,
    prefix: &'a str,
    path: Vec<String>,
    error: Option<Error>,
}

impl Applier<'_> {
    fn take<T, F>(&mut self, param: Param<T>, get: F) -> Param<T>
    where
        T: burn::module::Parameter,
        F: FnOnce(&DeviceTensor) -> Result<T, Error>,
    {
        if self.error.is_some() {
            return param;
        }
        let name = format!("{}{}", self.prefix, self.path.join("."));
        let Some(t) = self.snapshot.get(&name) else {
            self.error = Some(Error::Device(format!(
                "the snapshot has no tensor `{name}`"
            )));
            return param;
        };
        match get(t) {
            Ok(value) => {
                let id = bridge::param_id_of(&name, &self.snapshot.metadata)
                    .map_or(param.id, ParamId::from);
                param.transform_for_load(value, id)
            }
            Err(e) => {
                self.error = Some(e);
                param
            }
        }
    }
}

impl ModuleMapper for Applier<'_> {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        self.take(param, DeviceTensor::float::<D>)
    }

    fn map_int<const D: usize>(&mut self, param: Param<Tensor<D, Int>>) -> Param<Tensor<D, Int>> {
        self.take(param, DeviceTensor::int::<D>)
    }

    fn map_bool<const D: usize>(
        &mut self,
        param: Param<Tensor<D, Bool>>,
    ) -> Param<Tensor<D, Bool>> {
        self.take(param, DeviceTensor::bool::<D>)
    }
}
