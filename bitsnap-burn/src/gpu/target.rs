//! A CubeCL device as the loader sees it: uploads, read-backs, and the finishing of one
//! tensor's device form next to its base (the kernel launches are in `kernels.rs`).

use bitsnap_core::DType;
use bitsnap_core::codec::{DeviceForm, apply_device_form};
use bitsnap_core::format::{Entry, SnapshotFile};
use burn::backend::Cube;
use burn::backend::wgpu::CubeTensor;
use burn::cubecl::client::Client;
use burn::prelude::Tensor;
use burn::tensor::Device;

use super::chain;
use super::kernels::{self, Words};
use super::snapshot::LoadStats;
use crate::Error;

/// A CubeCL device: its client and Burn-side device, found through a probe tensor.
#[derive(Clone)]
pub(super) struct CubeTarget {
    pub(super) client: Client,
    pub(super) device: burn::cubecl::Device,
}

impl std::fmt::Debug for CubeTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CubeTarget")
    }
}

/// A tensor restored on the device so far, with what its successor's delta is checked
/// against.
pub(super) struct Resident {
    pub(super) words: Words,
    pub(super) dtype: DType,
    pub(super) shape: Vec<u64>,
}

/// One tensor's payload, uploaded and waiting for its base.
pub(super) struct Staged {
    kind: StagedKind,
    upload_bytes: u64,
    /// Time spent issuing the uploads.
    pub(super) upload_time: std::time::Duration,
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
    IntDelta(Words),
    Cast {
        /// The exception records (word, values, lanes), when there are exceptions.
        patch: Option<(Words, Words, Words)>,
    },
    Identical,
    Host(DeviceForm),
}

impl Staged {
    /// Whether finishing it reads the entry's referenced tensor.
    pub(super) fn needs_reference(&self) -> bool {
        matches!(self.kind, StagedKind::Cast { .. } | StagedKind::Identical)
    }
}

/// A payload the decoder accepted but whose parts do not fit `entry`.
fn malformed(file: &SnapshotFile, entry: &Entry, reason: String) -> Error {
    bitsnap_core::Error::Malformed {
        file: file.path.clone(),
        tensor: Some(entry.name.clone()),
        what: "payload",
        offset: entry.offset,
        reason,
    }
    .into()
}

impl CubeTarget {
    /// The CubeCL client behind `device`, if it is a CubeCL (wgpu) device.
    pub(super) fn probe(device: &Device) -> Option<CubeTarget> {
        let probe = Tensor::<1>::zeros([1], &device.clone().inner());
        let t: CubeTensor = probe.try_into_primitive::<Cube>().ok()?;
        Some(CubeTarget {
            client: t.client,
            device: t.device,
        })
    }

    /// Uploads `bytes`, padded with zeros to whole words.
    pub(super) fn upload(&self, bytes: &[u8]) -> Words {
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

    /// Reads the first `len` bytes of tensor `name`'s buffer back to the host.
    pub(super) fn read(&self, name: &str, words: &Words, len: usize) -> Result<Vec<u8>, Error> {
        let operation = || format!("reading tensor `{name}` back");
        let bytes = self
            .client
            .read_one(words.handle.clone())
            .map_err(|e| Error::Device {
                operation: operation(),
                source: Box::new(e),
            })?;
        bytes
            .get(..len)
            .map(<[u8]>::to_vec)
            .ok_or_else(|| Error::Device {
                operation: operation(),
                source: format!("the device returned {} bytes, {len} expected", bytes.len()).into(),
            })
    }

    /// Uploads what one tensor's device form needs (on any thread).
    pub(super) fn stage(
        &self,
        file: &SnapshotFile,
        entry: &Entry,
        form: DeviceForm,
    ) -> Result<Staged, Error> {
        let t0 = std::time::Instant::now();
        let upload_bytes = form.upload_bytes();
        let narrow = matches!(entry.dtype.size(), 1 | 2 | 4);
        let kind = match form {
            DeviceForm::IntDelta(z) if narrow => StagedKind::IntDelta(self.upload(&z)),
            DeviceForm::Identical => StagedKind::Identical,
            DeviceForm::Cast(p) => {
                let records = p.words.len();
                let half_words = (entry.numel() as usize).div_ceil(2);
                if p.values.len() != records
                    || p.lanes.len() != records
                    || p.words.iter().any(|&w| w as usize >= half_words)
                {
                    return Err(malformed(
                        file,
                        entry,
                        format!(
                            "cast patch of {records} words, {} values and {} lanes for {half_words} words",
                            p.values.len(),
                            p.lanes.len()
                        ),
                    ));
                }
                StagedKind::Cast {
                    patch: (records > 0).then(|| {
                        (
                            self.upload_words(&p.words),
                            self.upload_words(&p.values),
                            self.upload_words(&p.lanes),
                        )
                    }),
                }
            }
            DeviceForm::Dense(d) => StagedKind::Dense(self.upload(&d)),
            DeviceForm::Unchanged => StagedKind::Unchanged,
            DeviceForm::Xor(x) if narrow => StagedKind::Xor(self.upload(&x)),
            DeviceForm::Sparse(s) if narrow => {
                let numel = entry.numel() as usize;
                if s.mask.len() != numel.div_ceil(32)
                    || s.block_ranks.len() != numel.div_ceil(bitsnap_core::codec::RANK_BLOCK)
                    || s.values.len() as u64 != s.changed * entry.dtype.size() as u64
                {
                    return Err(malformed(
                        file,
                        entry,
                        format!(
                            "bitmask delta of {} mask words, {} block ranks and {} value bytes for {} changed of {numel} elements",
                            s.mask.len(),
                            s.block_ranks.len(),
                            s.values.len(),
                            s.changed
                        ),
                    ));
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
            DeviceForm::Codes(c) if narrow => {
                // Every code, straddling ones included, lies in the uploaded words.
                let numel = entry.numel() as usize;
                if !matches!(c.bits, 2 | 3 | 4 | 6 | 8 | 16)
                    || (c.codes.len() as u64) * 8 < numel as u64 * u64::from(c.bits)
                {
                    return Err(malformed(
                        file,
                        entry,
                        format!(
                            "{} code bytes of {} bits for {numel} elements",
                            c.codes.len(),
                            c.bits
                        ),
                    ));
                }
                StagedKind::Codes {
                    codes: self.upload(&c.codes),
                    book: self.upload(&c.codebook),
                    bits: c.bits,
                }
            }
            // 8-byte elements: finished on the CPU once the base is known.
            other => StagedKind::Host(other),
        };
        Ok(Staged {
            kind,
            upload_bytes,
            upload_time: t0.elapsed(),
        })
    }

    /// Turns one tensor's staged form (from `file`) into its buffer, next to `base`, the
    /// same tensor restored from the previous snapshot of the chain, and `reference`, the
    /// tensor the entry references (for casts and identical copies), already restored.
    pub(super) fn finish(
        &self,
        file: &SnapshotFile,
        entry: &Entry,
        staged: Staged,
        base: Option<&Resident>,
        reference: Option<&Resident>,
        stats: &mut LoadStats,
    ) -> Result<Resident, Error> {
        let len = entry.raw_len() as usize;
        let words = len.div_ceil(4);
        let width_bits = 8 * entry.dtype.size() as u32;
        stats.upload_bytes += staged.upload_bytes;
        // The base must be the tensor the delta was encoded against: same dtype and shape
        // (the same word count is not enough).
        let base_needed = || match base {
            Some(b) if chain::fits(entry, b.dtype, &b.shape) => Ok(&b.words),
            other => Err(chain::missing_base(
                file,
                entry,
                other.map(|b| (b.dtype, b.shape.as_slice())),
            )),
        };
        let out = match staged.kind {
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
            StagedKind::IntDelta(z) => {
                stats.forms.intdelta += 1;
                let b = base_needed()?;
                let out = self.empty(words);
                if words > 0 {
                    kernels::add(&self.client, b, &z, &out, width_bits);
                }
                out
            }
            StagedKind::Identical => {
                stats.forms.identical += 1;
                let r = reference_needed(file, entry, reference, entry.dtype)?;
                Words {
                    handle: r.words.handle.clone(),
                    words,
                }
            }
            StagedKind::Cast { patch } => {
                stats.forms.cast += 1;
                let r = reference_needed(file, entry, reference, DType::F32)?;
                let out = self.empty(words);
                if words > 0 {
                    let numel = entry.numel() as u32;
                    let bf16 = entry.dtype == DType::BF16;
                    kernels::cast(&self.client, &r.words, &out, numel, bf16);
                    if let Some((w, v, l)) = &patch {
                        kernels::patch(&self.client, w, v, l, &out);
                    }
                }
                out
            }
            StagedKind::Host(form) => {
                stats.forms.host += 1;
                let base = match form {
                    DeviceForm::Dense(_) | DeviceForm::Codes(_) => None,
                    _ => Some(self.read(&entry.name, base_needed()?, len)?),
                };
                let numel = entry.numel() as usize;
                let dense = apply_device_form(&form, entry.dtype, numel, base.as_deref(), None)
                    .map_err(|e| malformed(file, entry, e.reason))?;
                self.upload(&dense)
            }
        };
        Ok(Resident {
            words: out,
            dtype: entry.dtype,
            shape: entry.shape.clone(),
        })
    }
}

/// The tensor `entry` references, restored, if it is what the entry's codec reads:
/// `dtype` (f32 for a cast, the entry's own for a copy) and the entry's element count.
fn reference_needed<'a>(
    file: &SnapshotFile,
    entry: &Entry,
    reference: Option<&'a Resident>,
    dtype: DType,
) -> Result<&'a Resident, Error> {
    let name = entry
        .references
        .first()
        .map_or("(none)", |r| r.name.as_str());
    match reference {
        Some(r) if r.dtype == dtype && r.shape.iter().product::<u64>() == entry.numel() => Ok(r),
        Some(r) => Err(malformed(
            file,
            entry,
            format!(
                "its {} payload references `{name}`, a {} tensor of shape {:?}: {} elements of {dtype} expected",
                entry.codec,
                r.dtype,
                r.shape,
                entry.numel()
            ),
        )),
        None => Err(malformed(
            file,
            entry,
            format!(
                "the tensor `{name}` its {} payload references is missing",
                entry.codec
            ),
        )),
    }
}
