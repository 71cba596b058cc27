//! The streamed save: tensors are encoded on all threads while a writer thread appends
//! each finished payload to the snapshot file, in header order, so the disk works
//! during the encode instead of after it; and a base held only by this save is freed
//! tensor by tensor as the new snapshot's tensors are encoded.
//!
//! The tensors are encoded in units ([`crate::references::encode_units`]): a weight
//! with its two moments together, so that optimizer replay predicts from the base
//! tensors of the unit, which are freed when the unit is done, and from the unit's
//! tensors as they decode; casts of f32 tensors are weighed as each half tensor is
//! encoded. A payload is written before the save's last decision only when that cannot
//! change it: the copies pass ([`crate::references::apply`]) only ever replaces the
//! encoding of a tensor with an earlier bit-identical twin
//! ([`ReferencePlan::twin`](crate::references::ReferencePlan)); the writer stops at the
//! first such tensor and the rest is written once the pass ran. If the policy then
//! finds that the delta would not pay, the streamed file is dropped (its temporary file
//! removed) and the caller re-encodes the snapshot full.

use std::collections::HashMap;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use rayon::prelude::*;
use xxhash_rust::xxh3::xxh3_64;

use super::save::{EncodedTensor, Plan, SaveTimings, timed};
use super::{State, Store};
use crate::backend::ObjectWriter;
use crate::format::{Entry, Reference, SnapshotWriter};
use crate::references::replay::{self, Unit};
use crate::references::{self, ReferencePlan};
use crate::{Error, Policy, Tensor};

/// The tensors of a save's base, handed to the encoder one at a time.
pub(crate) enum BaseTensors {
    /// No base: a full snapshot.
    None,
    /// A base only this save holds: each tensor is taken out, used once and freed.
    Owned {
        index: HashMap<String, usize>,
        slots: Vec<Mutex<Option<Tensor>>>,
    },
    /// A base shared with others (a cache, a caller): borrowed.
    Shared {
        index: HashMap<String, usize>,
        state: State,
    },
}

impl BaseTensors {
    /// The tensors of `state`, owned if no one else holds them.
    pub(crate) fn of(state: State) -> BaseTensors {
        let index = state
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.clone(), i))
            .collect();
        match Arc::try_unwrap(state) {
            Ok(tensors) => BaseTensors::Owned {
                index,
                slots: tensors.into_iter().map(|t| Mutex::new(Some(t))).collect(),
            },
            Err(state) => BaseTensors::Shared { index, state },
        }
    }

    /// Calls `f` with the base tensor named `name`, if any. An owned base tensor is
    /// freed after the call (every name is asked for at most once per save: a
    /// snapshot's names are unique).
    fn with<R>(&self, name: &str, f: impl FnOnce(Option<&Tensor>) -> R) -> R {
        match self {
            BaseTensors::None => f(None),
            BaseTensors::Owned { index, slots } => {
                let taken = index
                    .get(name)
                    .and_then(|&i| slots.get(i))
                    .and_then(|slot| slot.lock().ok().and_then(|mut s| s.take()));
                f(taken.as_ref())
            }
            BaseTensors::Shared { index, state } => f(index.get(name).and_then(|&i| state.get(i))),
        }
    }
}

/// One encoded tensor and its checksums (raw bytes as decoded, payload).
pub(crate) struct Item {
    pub(crate) encoded: EncodedTensor,
    /// The tensors its payload references.
    pub(crate) references: Vec<Reference>,
    pub(crate) raw_hash: u64,
    pub(crate) payload_hash: u64,
}

/// A snapshot file being written: the first `written` payloads are in it.
pub(crate) struct Streamed {
    pub(crate) writer: SnapshotWriter<Box<dyn ObjectWriter>>,
    /// Every tensor's encoding, in order.
    pub(crate) encoded: Vec<EncodedTensor>,
    /// Every tensor's (raw, payload) checksums, in order.
    pub(crate) hashes: Vec<(u64, u64)>,
    /// Every tensor's references, in order.
    pub(crate) references: Vec<Vec<Reference>>,
    pub(crate) written: usize,
}

impl Store {
    /// Encodes `tensors` in `units` against `base` with `policy` on all threads,
    /// writing each payload that no later decision can change to `plan.file` as soon as
    /// it and all before it are encoded. Returns the file being written and every
    /// encoding.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn encode_streamed(
        &self,
        plan: &Plan<'_>,
        policy: &Policy,
        tensors: &[Tensor],
        units: &[Unit],
        base: &BaseTensors,
        metadata: Vec<(String, String)>,
        timings: &mut SaveTimings,
    ) -> Result<Streamed, Error> {
        let hashes: Vec<u64> = timed(&mut timings.checksum, || {
            tensors.par_iter().map(|t| xxh3_64(&t.data)).collect()
        });
        let ref_plan = if super::save::references_allowed(policy) {
            ReferencePlan::new(policy, tensors, &hashes, &metadata)
        } else {
            ReferencePlan::none(tensors.len())
        };
        let held = &ref_plan.twin;
        let ctx = replay::Context::new(&metadata, policy.zstd_level);
        let path = self.backend.path_of(&plan.file);
        let out = self.backend.create(&plan.file)?;
        let mut writer = SnapshotWriter::new(out, &path, plan.id, plan.name, None)?;
        writer.set_attempt(plan.attempt);
        writer.set_metadata(metadata);
        let n = tensors.len();
        let (tx, rx) = mpsc::channel::<(usize, Item)>();
        std::thread::scope(|scope| {
            let streamer = scope.spawn(move || {
                let mut slots: Vec<Option<Item>> = (0..n).map(|_| None).collect();
                let mut written = 0;
                let mut failed = None;
                for (i, item) in rx {
                    if let Some(slot) = slots.get_mut(i) {
                        *slot = Some(item);
                    }
                    while failed.is_none() && written < n && !held[written] {
                        let Some(item) = &slots[written] else { break };
                        let entry = Entry::of(
                            &tensors[written],
                            item.encoded.0.codec,
                            &item.encoded.1,
                            item.raw_hash,
                            &item.references,
                        );
                        match writer.push_hashed(entry, &item.encoded.0.payload, item.payload_hash)
                        {
                            Ok(()) => written += 1,
                            Err(e) => failed = Some(e),
                        }
                    }
                }
                (writer, slots, written, failed)
            });
            let encoded = timed(&mut timings.encode, || {
                units.par_iter().try_for_each(|&unit| {
                    let done = with_unit_base(base, tensors, unit, |b| {
                        references::encode_unit(policy, &ctx, &ref_plan, tensors, unit, b)
                    })?;
                    for (i, (e, d, references)) in done {
                        let raw_hash = match &e.lossy {
                            Some((decoded, _)) => xxh3_64(decoded),
                            None => hashes[i],
                        };
                        let payload_hash = xxh3_64(&e.payload);
                        // The streamer ends only when every sender is gone.
                        let _ = tx.send((
                            i,
                            Item {
                                encoded: (e, d),
                                references,
                                raw_hash,
                                payload_hash,
                            },
                        ));
                    }
                    Ok::<(), Error>(())
                })
            });
            drop(tx);
            let joined = streamer.join();
            let (writer, slots, written, failed) = match joined {
                Ok(r) => r,
                Err(panic) => std::panic::resume_unwind(panic),
            };
            encoded?;
            if let Some(e) = failed {
                return Err(e);
            }
            let mut encoded = Vec::with_capacity(n);
            let mut sums = Vec::with_capacity(n);
            let mut references = Vec::with_capacity(n);
            for (s, t) in slots.into_iter().zip(tensors) {
                let item = s.ok_or_else(|| Error::InvalidTensor {
                    tensor: t.name.clone(),
                    reason: "was not encoded".into(),
                })?;
                encoded.push(item.encoded);
                sums.push((item.raw_hash, item.payload_hash));
                references.push(item.references);
            }
            Ok(Streamed {
                writer,
                encoded,
                hashes: sums,
                references,
                written,
            })
        })
    }
}

/// Calls `f` with the base tensors of `unit` (weight, first moment, second moment; a
/// lone tensor's first), each freed after the call if only the save held it.
fn with_unit_base<R>(
    base: &BaseTensors,
    tensors: &[Tensor],
    unit: Unit,
    f: impl FnOnce([Option<&Tensor>; 3]) -> R,
) -> R {
    match unit {
        Unit::One(i) => base.with(&tensors[i].name, |b| f([b, None, None])),
        Unit::Group { w, m, v } => base.with(&tensors[w].name, |bw| {
            base.with(&tensors[m].name, |bm| {
                base.with(&tensors[v].name, |bv| f([bw, bm, bv]))
            })
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{DType, Role};

    fn t(name: &str, dtype: DType, n: usize, fill: u8) -> Tensor {
        Tensor::new(
            name,
            dtype,
            vec![n as u64],
            Role::Weight,
            vec![fill; n * dtype.size()],
        )
        .unwrap()
    }

    #[test]
    fn an_owned_base_is_freed_as_it_is_used() {
        let state = Arc::new(vec![t("a", DType::F32, 8, 1)]);
        let base = BaseTensors::of(state);
        assert!(matches!(base, BaseTensors::Owned { .. }));
        assert!(base.with("a", |b| b.is_some()));
        assert!(base.with("a", |b| b.is_none()), "taken once, then freed");
        let shared = Arc::new(vec![t("a", DType::F32, 8, 1)]);
        let base = BaseTensors::of(shared.clone());
        assert!(base.with("a", |b| b.is_some()) && base.with("a", |b| b.is_some()));
        assert!(BaseTensors::None.with("a", |b| b.is_none()));
    }
}
