//! What a load returns: the restored tensors on the device, as Burn tensors or loaded
//! into a module's parameters, and what the load cost.

use std::path::PathBuf;
use std::time::Duration;

use bitsnap_core::{DType, Role};
use burn::backend::Cube;
use burn::backend::wgpu::CubeTensor;
use burn::module::{Module, ModuleMapper, Param, ParamId};
use burn::prelude::{Bool, Int, Tensor, TensorData};
use burn::tensor::{DType as BurnDType, Device, Shape};

use super::kernels::Words;
use super::target::CubeTarget;
use crate::Error;
use crate::bridge::{self, Metadata};

/// Where a restored tensor lives.
pub(super) enum Value {
    /// A CubeCL buffer on the device, padded to whole words.
    Cube(Words, CubeTarget),
    /// Host bytes (devices without CubeCL: Burn tensors are made on request).
    Host(Vec<u8>),
}

/// A restored tensor as Burn takes it.
enum Parts {
    Cube(Box<CubeTensor>),
    Host(TensorData),
}

/// One restored tensor, on the device.
pub struct DeviceTensor {
    pub(super) name: String,
    pub(super) dtype: DType,
    pub(super) burn_dtype: BurnDType,
    pub(super) shape: Vec<usize>,
    pub(super) role: Role,
    pub(super) value: Value,
    pub(super) device: Device,
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
            Err(Error::Rank {
                tensor: self.name.clone(),
                actual: self.shape.len(),
                requested: D,
            })
        }
    }

    /// The CubeCL tensor over the restored buffer (no copy), or the host bytes.
    fn parts(&self) -> Parts {
        match &self.value {
            Value::Cube(w, target) => Parts::Cube(Box::new(CubeTensor::new_contiguous(
                target.client.clone(),
                target.device.clone(),
                Shape::from(self.shape.clone()),
                w.handle.clone(),
                self.burn_dtype,
            ))),
            Value::Host(bytes) => Parts::Host(TensorData::from_bytes_vec(
                bytes.clone(),
                self.shape.clone(),
                self.burn_dtype,
            )),
        }
    }

    /// The tensor as a float tensor of rank `D`, on the loader's device, in its stored
    /// dtype (no copy on a CubeCL device).
    pub fn float<const D: usize>(&self) -> Result<Tensor<D>, Error> {
        self.check_rank::<D>()?;
        Ok(match self.parts() {
            Parts::Cube(p) => Tensor::<D>::from_primitive::<Cube>(*p).to_device(&self.device),
            Parts::Host(data) => Tensor::from_data(data, (&self.device, self.burn_dtype)),
        })
    }

    /// The tensor as an int tensor of rank `D`, on the loader's device.
    pub fn int<const D: usize>(&self) -> Result<Tensor<D, Int>, Error> {
        self.check_rank::<D>()?;
        Ok(match self.parts() {
            Parts::Cube(p) => Tensor::<D, Int>::from_primitive::<Cube>(*p).to_device(&self.device),
            Parts::Host(data) => Tensor::from_data(data, (&self.device, self.burn_dtype)),
        })
    }

    /// The tensor as a bool tensor of rank `D`, on the loader's device.
    pub fn bool<const D: usize>(&self) -> Result<Tensor<D, Bool>, Error> {
        self.check_rank::<D>()?;
        Ok(match self.parts() {
            Parts::Cube(p) => Tensor::<D, Bool>::from_primitive::<Cube>(*p).to_device(&self.device),
            Parts::Host(data) => Tensor::from_data(data, (&self.device, self.burn_dtype)),
        })
    }

    /// Reads the tensor's bytes back to the host (a device-to-host copy on a GPU).
    pub fn to_bytes(&self) -> Result<Vec<u8>, Error> {
        let len = self.shape.iter().product::<usize>() * self.dtype.size();
        match &self.value {
            Value::Host(b) => Ok(b.clone()),
            Value::Cube(w, target) => target.read(&self.name, w, len),
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
    /// Bytes of snapshot files read.
    pub read_bytes: u64,
    /// Wall time reading the chain's files and checking their headers and links.
    pub read: Duration,
    /// CPU time verifying payload checksums, summed over threads.
    pub checksum: Duration,
    /// CPU time spent entropy-decoding, summed over threads (on the host path: the
    /// whole CPU decode, checksums included, wall time).
    pub cpu_decode: Duration,
    /// CPU time issuing host-to-device copies, summed over threads.
    pub upload: Duration,
    /// Time the kernel-launching thread spent launching kernels, plus the final wait
    /// for the device to finish everything queued.
    pub kernels: Duration,
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
    /// Integer deltas added to their base on the device.
    pub intdelta: usize,
    /// Cast from their referenced f32 tensor on the device (exceptions patched in).
    pub cast: usize,
    /// Copies of another restored tensor (its buffer is reused).
    pub identical: usize,
    /// Finished on the CPU (8-byte elements).
    pub host: usize,
    /// Not read at all: a later snapshot stores the tensor without a base.
    pub skipped: usize,
}

/// A snapshot restored onto a device: every tensor, the snapshot's metadata, and what the
/// load cost.
#[derive(Debug)]
pub struct DeviceSnapshot {
    pub(super) store: PathBuf,
    pub(super) id: u64,
    pub(super) tensors: Vec<DeviceTensor>,
    pub(super) metadata: Metadata,
    /// What the load did.
    pub stats: LoadStats,
}

impl DeviceSnapshot {
    /// Takes in the tensors and costs of another rank's part of the same sharded
    /// snapshot (this part's metadata, rank 0's, stays).
    pub(super) fn absorb(&mut self, part: DeviceSnapshot) {
        self.tensors.extend(part.tensors);
        let (s, p) = (&mut self.stats, part.stats);
        s.snapshots += p.snapshots;
        s.upload_bytes += p.upload_bytes;
        s.dense_bytes += p.dense_bytes;
        s.read_bytes += p.read_bytes;
        s.read += p.read;
        s.checksum += p.checksum;
        s.cpu_decode += p.cpu_decode;
        s.upload += p.upload;
        s.kernels += p.kernels;
        let (f, g) = (&mut s.forms, p.forms);
        f.dense += g.dense;
        f.unchanged += g.unchanged;
        f.xor += g.xor;
        f.sparse += g.sparse;
        f.codes += g.codes;
        f.intdelta += g.intdelta;
        f.cast += g.cast;
        f.identical += g.identical;
        f.host += g.host;
        f.skipped += g.skipped;
    }

    /// The id of the snapshot restored.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The tensors, in the snapshot's order.
    pub fn tensors(&self) -> &[DeviceTensor] {
        &self.tensors
    }

    /// The tensor named `name`.
    pub fn get(&self, name: &str) -> Option<&DeviceTensor> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The tensor named `name`, or [`Error::MissingTensor`].
    pub fn require(&self, name: &str) -> Result<&DeviceTensor, Error> {
        self.get(name).ok_or_else(|| Error::MissingTensor {
            store: self.store.clone(),
            snapshot: self.id,
            tensor: name.to_string(),
        })
    }

    /// The snapshot's metadata.
    pub fn metadata(&self) -> &Metadata {
        &self.metadata
    }

    /// Loads the tensors named `prefix + <parameter path>` into `module`'s parameters,
    /// keeping each parameter's device and autodiff setting and restoring its saved
    /// parameter id. On a CubeCL device the parameters take the restored buffers without
    /// a copy. Every parameter of the module must be in the snapshot
    /// ([`Error::MissingTensor`] names the first that is not) with the parameter's rank
    /// ([`Error::Rank`]).
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
        match self.snapshot.require(&name).and_then(get) {
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
