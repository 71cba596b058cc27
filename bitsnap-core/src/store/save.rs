//! Saving: the one save routine behind full, delta and shard saves: choose the base,
//! encode against it (or full), write the file, keep what it decodes to.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rayon::prelude::*;
use xxhash_rust::xxh3::xxh3_64;

use super::stream::{BaseTensors, Streamed};
use super::{Cached, SaveReport, SnapshotInfo, Store};
use crate::codec::Encoded;
use crate::format::{BaseRef, Decision, Entry, Header, Reference, SnapshotWriter};
use crate::policy::DeltaVerdict;
use crate::references::replay::Unit;
use crate::{Error, Policy, Tensor};

/// Why a snapshot was stored full rather than as a delta. `Display` gives the text the
/// CLI prints (`full (first snapshot)`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum FullReason {
    /// The series had no snapshot yet.
    First,
    /// The latest snapshot of the series is sharded (unsharded saves).
    LatestSharded,
    /// The latest snapshot is not sharded the same way (shard saves).
    ShardLayoutChanged,
    /// The chain reached [`Policy::full_every`](crate::Policy).
    Interval,
    /// The latest snapshot could not be decoded.
    LatestUnreadable,
    /// No tensor gained from a delta.
    NoGain,
    /// The delta would not pay ([`Policy::min_delta_gain`](crate::Policy)).
    WouldNotPay,
}

impl FullReason {
    /// The reason as text (what `Display` prints).
    pub fn as_str(self) -> &'static str {
        match self {
            FullReason::First => "first snapshot",
            FullReason::LatestSharded => "latest snapshot is sharded",
            FullReason::ShardLayoutChanged => "latest snapshot is not sharded the same way",
            FullReason::Interval => "full snapshot interval reached",
            FullReason::LatestUnreadable => "latest snapshot unreadable",
            FullReason::NoGain => "no tensor gained from a delta",
            FullReason::WouldNotPay => "delta would not pay",
        }
    }

    fn from_verdict(v: DeltaVerdict) -> Option<FullReason> {
        match v {
            DeltaVerdict::Keep => None,
            DeltaVerdict::NoGain => Some(FullReason::NoGain),
            DeltaVerdict::WouldNotPay => Some(FullReason::WouldNotPay),
        }
    }
}

impl std::fmt::Display for FullReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Wall-clock time one save spent in each of its stages, which run one after another
/// on the saving thread (each stage itself runs on all rayon threads where it can), so
/// they add up to the save. `bitsnap pack --stages` prints them.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
#[non_exhaustive]
pub struct SaveTimings {
    /// Taking the base state: from memory (the latest save of this `Store`), else by
    /// reading and decoding its chain.
    pub base: Duration,
    /// Choosing each tensor's codec (trial encodes on samples, casts and optimizer
    /// replay weighed beside the codecs) and encoding it, a weight with its moments as
    /// one unit, all units in parallel, with each payload's checksum; payloads are
    /// written to the file meanwhile, as they come out in order.
    pub encode: Duration,
    /// Finding tensors that are bit-identical copies of earlier ones.
    pub references: Duration,
    /// xxh3 of every tensor's raw bytes before the encode, and of the payloads the
    /// references pass replaced, in parallel.
    pub checksum: Duration,
    /// What the encode left to write (payloads after the first tensor the references
    /// pass may change), header and trailer, to the temporary file (page cache).
    pub write: Duration,
    /// fsync of the file, rename into place and fsync of the directory.
    pub sync: Duration,
    /// Replacing the manifest (write, fsync, rename) under the store lock.
    pub commit: Duration,
}

impl SaveTimings {
    /// The stages as (name, time), in the order they run.
    pub fn stages(&self) -> [(&'static str, Duration); 7] {
        [
            ("base", self.base),
            ("encode", self.encode),
            ("references", self.references),
            ("checksum", self.checksum),
            ("write", self.write),
            ("sync", self.sync),
            ("commit", self.commit),
        ]
    }

    /// The sum of every stage.
    pub fn total(&self) -> Duration {
        self.stages().iter().map(|s| s.1).sum()
    }

    /// Adds `other`'s stages to these (totals over several saves).
    pub fn add(&mut self, other: &SaveTimings) {
        self.base += other.base;
        self.encode += other.encode;
        self.references += other.references;
        self.checksum += other.checksum;
        self.write += other.write;
        self.sync += other.sync;
        self.commit += other.commit;
    }
}

/// Runs `f` and adds the time it took to `slot`.
pub(crate) fn timed<T>(slot: &mut Duration, f: impl FnOnce() -> T) -> T {
    let start = Instant::now();
    let out = f();
    *slot += start.elapsed();
    out
}

/// The snapshot a save is encoded against: its id, what it decodes to, and its state
/// hash ([`Header::state_hash`]).
#[derive(Debug, Clone)]
pub struct BaseState {
    /// The base snapshot's id.
    pub id: u64,
    /// Its decoded tensors.
    pub state: Arc<Vec<Tensor>>,
    /// Its state hash.
    pub hash: u64,
}

impl BaseState {
    /// The reference a delta on it records.
    pub fn base_ref(&self) -> BaseRef {
        BaseRef {
            id: self.id,
            state_hash: self.hash,
        }
    }

    fn by_name(&self) -> HashMap<&str, &Tensor> {
        self.state.iter().map(|t| (t.name.as_str(), t)).collect()
    }
}

/// An encoded tensor and how its codec was chosen.
pub(crate) type EncodedTensor = (Encoded, Decision);

/// What to write: one snapshot file of a save.
pub(crate) struct Plan<'a> {
    /// Object name of the file.
    pub(crate) file: String,
    /// Snapshot id and name.
    pub(crate) id: u64,
    pub(crate) name: &'a str,
    /// Commit attempt nonce (shards; 0 otherwise).
    pub(crate) attempt: u64,
    /// The base, or why there is none.
    pub(crate) base: Result<BaseState, FullReason>,
}

/// What [`Store::write_save`] wrote.
pub(crate) struct Written {
    pub(crate) header: Header,
    pub(crate) stored_bytes: u64,
    pub(crate) base: Option<BaseRef>,
    pub(crate) full_reason: Option<FullReason>,
    /// What the snapshot decodes to (lossy tensors dequantized).
    pub(crate) cached: Cached,
    /// Time per stage so far (no commit yet).
    pub(crate) timings: SaveTimings,
}

impl Store {
    /// Saves `tensors` as the next snapshot, named `name`.
    pub fn save(&mut self, name: &str, tensors: Vec<Tensor>) -> Result<SaveReport, Error> {
        self.save_with_metadata(name, tensors, Vec::new())
    }

    /// Saves `tensors` with string metadata as the next snapshot of the default series.
    pub fn save_with_metadata(
        &mut self,
        name: &str,
        tensors: Vec<Tensor>,
        metadata: Vec<(String, String)>,
    ) -> Result<SaveReport, Error> {
        self.save_in("", name, tensors, metadata)
    }

    /// Saves `tensors` with string metadata as the next snapshot of `series`. It is a
    /// delta on the latest snapshot of that series unless the policy calls for a full one.
    pub fn save_in(
        &mut self,
        series: &str,
        name: &str,
        tensors: Vec<Tensor>,
        metadata: Vec<(String, String)>,
    ) -> Result<SaveReport, Error> {
        self.become_writer()?;
        validate(&tensors, name)?;
        validate_metadata(&metadata)?;
        let mut base_time = Duration::ZERO;
        let base = timed(&mut base_time, || {
            match self.latest_in(series).map(|s| (s.id, s.shards.is_empty())) {
                None => Err(FullReason::First),
                Some((_, false)) => Err(FullReason::LatestSharded),
                Some((latest, true))
                    if self.depth(latest).saturating_add(1) >= self.policy.full_every =>
                {
                    Err(FullReason::Interval)
                }
                Some((latest, true)) => {
                    // The cached state is taken, not shared, so that the save can free it
                    // tensor by tensor; this save's own state replaces it.
                    match self.last.remove(series).filter(|c| c.id == latest) {
                    Some(c) => self.base_state_from(latest, c.state),
                    None => self.base_state(latest),
                }
                .map_err(|e| {
                    tracing::warn!(error = %e, "latest snapshot unreadable; saving a full snapshot");
                    FullReason::LatestUnreadable
                })
                }
            }
        });
        // Reserved after the base is chosen, so the id is above the base's.
        let reservation = self.reserve_snapshot()?;
        let id = reservation.id;
        let plan = Plan {
            file: reservation.file.clone(),
            id,
            name,
            attempt: 0,
            base,
        };
        let file = plan.file.clone();
        let mut w = self.write_save(plan, tensors, metadata)?;
        w.timings.base = base_time;
        let info = SnapshotInfo {
            id,
            name: name.to_string(),
            series: series.to_string(),
            file: file.clone(),
            base: w.base.map(|b| b.id),
            state_hash: w.header.state_hash(),
            tensors: w.header.entries.len() as u64,
            raw_bytes: w.header.raw_bytes(),
            stored_bytes: w.stored_bytes,
            shards: Vec::new(),
        };
        timed(&mut w.timings.commit, || {
            self.commit_new(info.clone(), &[file], reservation.reserved)
        })?;
        // Keep what this snapshot decodes to: the base of the next delta, and the answer
        // to a restore in this process.
        self.last.insert(series.to_string(), w.cached);
        Ok(SaveReport {
            info,
            header: w.header,
            full_reason: w.full_reason,
            timings: w.timings,
        })
    }

    /// The one save routine: encodes `tensors` against `plan.base` if there is one and
    /// the delta pays (else full), writes the file, and returns what it wrote and what
    /// the snapshot decodes to. Commits nothing.
    ///
    /// Payloads are streamed to the file while other tensors still encode, and a base
    /// that only this save holds is freed unit by unit ([`super::stream`]; a weight and
    /// its moments are one unit, so optimizer replay saves stream too); a delta that
    /// would not pay is re-encoded full and written again.
    pub(crate) fn write_save(
        &self,
        mut plan: Plan<'_>,
        tensors: Vec<Tensor>,
        metadata: Vec<(String, String)>,
    ) -> Result<Written, Error> {
        // The stage signals in the metadata scale a lossy error budget (policy/budget.rs).
        let metadata = self.with_base_lr(metadata, plan.base.as_ref().ok().map(|b| b.id));
        let (policy, metadata) = self.policy.staged(metadata);
        let mut timings = SaveTimings::default();
        let all: Vec<usize> = (0..tensors.len()).collect();
        // The base is moved out of the plan, which keeps no reference to its tensors: a
        // base only this save holds is then freed unit by unit as it is used (a weight
        // and its moments together: optimizer replay predicts from all three).
        let (base_ref, base, first_reason, units) =
            match std::mem::replace(&mut plan.base, Err(FullReason::First)) {
                Ok(b) => {
                    let units = crate::references::units_of(
                        &policy,
                        &tensors,
                        &all,
                        &b.by_name(),
                        &metadata,
                    );
                    (Some(b.base_ref()), BaseTensors::of(b.state), None, units)
                }
                Err(reason) => {
                    let units = all.iter().map(|&i| Unit::One(i)).collect();
                    (None, BaseTensors::None, Some(reason), units)
                }
            };
        let Streamed {
            mut writer,
            mut encoded,
            mut hashes,
            mut references,
            written,
        } = self.encode_streamed(
            &plan,
            &policy,
            &tensors,
            &units,
            &base,
            metadata.clone(),
            &mut timings,
        )?;
        drop(base);
        // Copies of earlier tensors, among those not written yet.
        let changed = timed(&mut timings.references, || {
            if references_allowed(&policy) {
                crate::references::apply(&tensors, &mut encoded, &mut references, &|i| i >= written)
            } else {
                vec![false; tensors.len()]
            }
        });
        let (base, full_reason) = match base_ref {
            None => (None, first_reason),
            Some(b) => {
                let verdict = policy.judge_delta(&encoded);
                match FullReason::from_verdict(verdict) {
                    None => (Some(b), None),
                    // Re-encoded without a base, ending the chain: the streamed file
                    // is dropped unfinished (its temporary file removed).
                    Some(reason) if verdict == DeltaVerdict::WouldNotPay => {
                        drop(writer);
                        return self.write_unstreamed(
                            plan,
                            tensors,
                            metadata,
                            Err(reason),
                            timings,
                        );
                    }
                    // No tensor used a delta codec: already full.
                    Some(reason) => (None, Some(reason)),
                }
            }
        };
        // The payloads the copies pass replaced get new checksums.
        timed(&mut timings.checksum, || {
            hashes[written..]
                .par_iter_mut()
                .zip(&encoded[written..])
                .zip(&changed[written..])
                .filter(|(_, c)| **c)
                .for_each(|((h, (e, _)), _)| h.1 = xxh3_64(&e.payload));
        });
        let write_start = Instant::now();
        let rest = tensors.iter().zip(&encoded).zip(&hashes).zip(&references);
        for (((t, e), &(raw_hash, payload_hash)), r) in rest.skip(written) {
            writer.push_hashed(
                Entry::of(t, e.0.codec, &e.1, raw_hash, r),
                &e.0.payload,
                payload_hash,
            )?;
        }
        writer.set_base(base);
        let (header, out) = writer.finish()?;
        timings.write += write_start.elapsed();
        let stored_bytes = timed(&mut timings.sync, || out.finish())?;
        let state = decoded_state(tensors, encoded);
        Ok(Written {
            header,
            stored_bytes,
            base,
            full_reason,
            cached: Cached {
                id: plan.id,
                state: Arc::new(state),
                metadata,
            },
            timings,
        })
    }

    /// Encodes `tensors` against `base` (all at once, a full snapshot if it is `Err` or
    /// the delta would not pay) and writes them after: the save of a delta that would
    /// not pay.
    fn write_unstreamed(
        &self,
        plan: Plan<'_>,
        tensors: Vec<Tensor>,
        metadata: Vec<(String, String)>,
        base: Result<BaseState, FullReason>,
        mut timings: SaveTimings,
    ) -> Result<Written, Error> {
        let metadata = self.with_base_lr(metadata, base.as_ref().ok().map(|b| b.id));
        let (policy, metadata) = self.policy.staged(metadata);
        let Encoding {
            tensors: encoded,
            references,
            base,
            full_reason,
        } = encode_against(&policy, &tensors, base, &metadata, &mut timings)?;
        let (header, stored_bytes) = self.write_snapshot(
            &plan.file,
            plan.id,
            plan.name,
            base,
            plan.attempt,
            metadata.clone(),
            tensors
                .iter()
                .zip(encoded.iter())
                .zip(references.iter())
                .map(|((t, (e, d)), r)| (t, e, d, r.as_slice())),
            &mut timings,
        )?;
        let state = decoded_state(tensors, encoded);
        Ok(Written {
            header,
            stored_bytes,
            base,
            full_reason,
            cached: Cached {
                id: plan.id,
                state: Arc::new(state),
                metadata,
            },
            timings,
        })
    }

    /// The decoded state of snapshot `id` and its state hash, from memory if possible.
    pub(crate) fn base_state(&self, id: u64) -> Result<BaseState, Error> {
        let hash = self
            .chain_info(id)
            .ok_or_else(|| Error::UnknownSnapshot {
                store: self.dir.clone(),
                snapshot: id.to_string(),
            })?
            .state_hash;
        if let Some(c) = self.cached(id) {
            return Ok(BaseState {
                id,
                state: c.state.clone(),
                hash,
            });
        }
        let chain = self.restore_chain(id, None)?;
        let state = chain.decode()?;
        Ok(BaseState {
            id,
            state: Arc::new(state),
            hash: chain.target().header.state_hash(),
        })
    }

    /// [`BaseState`] of snapshot `id` that decodes to `state`.
    fn base_state_from(&self, id: u64, state: super::State) -> Result<BaseState, Error> {
        let hash = self
            .chain_info(id)
            .ok_or_else(|| Error::UnknownSnapshot {
                store: self.dir.clone(),
                snapshot: id.to_string(),
            })?
            .state_hash;
        Ok(BaseState { id, state, hash })
    }

    /// `metadata` with the base snapshot's learning rate (the stage rule's lr-change
    /// signal, policy/budget.rs), when the policy has an error budget.
    fn with_base_lr(
        &self,
        metadata: Vec<(String, String)>,
        base: Option<u64>,
    ) -> Vec<(String, String)> {
        match base.filter(|_| self.policy.wants_base_lr()) {
            Some(id) => match self.header(id) {
                Ok(h) => self.policy.with_base_lr(metadata, &h.metadata),
                Err(_) => metadata,
            },
            None => metadata,
        }
    }

    pub(crate) fn depth(&self, id: u64) -> u32 {
        self.chain(id).map_or(u32::MAX, |c| c.len() as u32 - 1)
    }

    /// Writes snapshot file `file` through the backend; returns its header and size.
    /// Checksums (raw bytes and payloads) are computed in parallel before the payloads
    /// are streamed out; `timings` gets the checksum, write and sync stages.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn write_snapshot<'a>(
        &self,
        file: &str,
        id: u64,
        name: &str,
        base: Option<BaseRef>,
        attempt: u64,
        metadata: Vec<(String, String)>,
        items: impl Iterator<Item = (&'a Tensor, &'a Encoded, &'a Decision, &'a [Reference])>,
        timings: &mut SaveTimings,
    ) -> Result<(Header, u64), Error> {
        let items: Vec<_> = items.collect();
        let hashes: Vec<(u64, u64)> = timed(&mut timings.checksum, || {
            items
                .par_iter()
                .map(|(t, e, _, _)| {
                    let raw = e.lossy.as_ref().map_or(&t.data, |l| &l.0);
                    (xxh3_64(raw), xxh3_64(&e.payload))
                })
                .collect()
        });
        let path = self.backend.path_of(file);
        let write_start = Instant::now();
        let out = self.backend.create(file)?;
        let mut w = SnapshotWriter::new(out, &path, id, name, base)?;
        w.set_attempt(attempt);
        w.set_metadata(metadata);
        for ((t, e, d, references), (raw_hash, payload_hash)) in items.into_iter().zip(hashes) {
            let entry = Entry::of(t, e.codec, d, raw_hash, references);
            w.push_hashed(entry, &e.payload, payload_hash)?;
        }
        let (header, out) = w.finish()?;
        timings.write += write_start.elapsed();
        let size = timed(&mut timings.sync, || out.finish())?;
        Ok((header, size))
    }
}

/// Tensors encoded for one snapshot file.
pub(crate) struct Encoding {
    /// Per tensor, in order.
    pub(crate) tensors: Vec<EncodedTensor>,
    /// Per tensor, the tensors its payload references (reference codecs).
    pub(crate) references: Vec<Vec<Reference>>,
    /// The base they were encoded against (`None`: a full snapshot).
    pub(crate) base: Option<BaseRef>,
    /// Why the snapshot is full, if it is.
    pub(crate) full_reason: Option<FullReason>,
}

/// Encodes `tensors` against `base` if there is one and the delta pays, else full.
pub(crate) fn encode_against(
    policy: &Policy,
    tensors: &[Tensor],
    base: Result<BaseState, FullReason>,
    metadata: &[(String, String)],
    timings: &mut SaveTimings,
) -> Result<Encoding, Error> {
    let full = |reason, timings: &mut SaveTimings| -> Result<Encoding, Error> {
        let (encoded, references) =
            encode_all(policy, tensors, &HashMap::new(), metadata, timings)?;
        Ok(Encoding {
            tensors: encoded,
            references,
            base: None,
            full_reason: Some(reason),
        })
    };
    let base = match base {
        Err(reason) => return full(reason, timings),
        Ok(b) => b,
    };
    let (encoded, references) = encode_all(policy, tensors, &base.by_name(), metadata, timings)?;
    let verdict = policy.judge_delta(&encoded);
    match FullReason::from_verdict(verdict) {
        None => Ok(Encoding {
            tensors: encoded,
            references,
            base: Some(base.base_ref()),
            full_reason: None,
        }),
        // Re-encoded without a base, ending the chain.
        Some(reason) if verdict == DeltaVerdict::WouldNotPay => full(reason, timings),
        // No tensor used a delta codec: already full.
        Some(reason) => Ok(Encoding {
            tensors: encoded,
            references,
            base: None,
            full_reason: Some(reason),
        }),
    }
}

/// Encodes every tensor as [`crate::references::encode_snapshot`] does (casts and
/// optimizer replay from the base weighed beside the codecs, then copies), with the
/// save's `metadata`; returns the encodings and each tensor's references.
pub(crate) fn encode_all(
    policy: &Policy,
    tensors: &[Tensor],
    base: &HashMap<&str, &Tensor>,
    metadata: &[(String, String)],
    timings: &mut SaveTimings,
) -> Result<(Vec<EncodedTensor>, Vec<Vec<Reference>>), Error> {
    timed(&mut timings.encode, || {
        crate::references::encode_snapshot(
            policy,
            tensors,
            base,
            metadata,
            references_allowed(policy),
        )
    })
}

pub(crate) fn validate_metadata(metadata: &[(String, String)]) -> Result<(), Error> {
    let over = |what: String, value: usize, limit: usize| -> Result<(), Error> {
        if value > limit {
            return Err(Error::InputLimit {
                what,
                value: value as u64,
                limit: limit as u64,
            });
        }
        Ok(())
    };
    over(
        "metadata entry count".into(),
        metadata.len(),
        crate::format::MAX_METADATA as usize,
    )?;
    for (k, v) in metadata {
        let key: String = k.chars().take(64).collect();
        over(
            format!("metadata key `{key}` length"),
            k.len(),
            crate::MAX_NAME_BYTES,
        )?;
        over(
            format!("metadata `{key}` value length"),
            v.len(),
            crate::format::MAX_METADATA_VALUE_BYTES,
        )?;
    }
    Ok(())
}

pub(crate) fn validate(tensors: &[Tensor], snapshot: &str) -> Result<(), Error> {
    if snapshot.len() > crate::MAX_NAME_BYTES {
        return Err(Error::InputLimit {
            what: "snapshot name length".into(),
            value: snapshot.len() as u64,
            limit: crate::MAX_NAME_BYTES as u64,
        });
    }
    if tensors.len() as u64 > crate::format::MAX_TENSORS {
        return Err(Error::InputLimit {
            what: "tensor count".into(),
            value: tensors.len() as u64,
            limit: crate::format::MAX_TENSORS,
        });
    }
    let mut names = std::collections::HashSet::new();
    for t in tensors {
        let expected = crate::tensor::byte_len(&t.name, t.dtype, &t.shape)?;
        if t.data.len() as u64 != expected {
            return Err(Error::InvalidTensor {
                tensor: t.name.clone(),
                reason: format!(
                    "{} bytes of data, {expected} expected for shape {:?} of {}",
                    t.data.len(),
                    t.shape,
                    t.dtype
                ),
            });
        }
        if !names.insert(t.name.as_str()) {
            return Err(Error::InvalidTensor {
                tensor: t.name.clone(),
                reason: "appears twice in one snapshot".into(),
            });
        }
    }
    Ok(())
}

/// 64 random bits, for object names no other writer picks.
pub(crate) fn unique_token() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish()
}

/// What a saved snapshot decodes to: `tensors`, with each lossy encoding's dequantized
/// data in place of the original.
fn decoded_state(mut tensors: Vec<Tensor>, encoded: Vec<EncodedTensor>) -> Vec<Tensor> {
    for (t, (e, _)) in tensors.iter_mut().zip(encoded) {
        if let Some((decoded, _)) = e.lossy {
            t.data = decoded;
        }
    }
    tensors
}

/// Whether the references pass (casts, copies) may run under `policy`: always, unless
/// the policy admits only codecs with a device form and a reference codec has none.
pub(crate) fn references_allowed(policy: &Policy) -> bool {
    use crate::codec::CodecId;
    !policy.device_forms_only
        || [CodecId::Cast, CodecId::Identical]
            .iter()
            .all(|c| c.has_device_form())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Role;

    /// The CLI prints these (`full (first snapshot)`): they must not change.
    #[test]
    fn full_reasons_read_as_before() {
        let all = [
            (FullReason::First, "first snapshot"),
            (FullReason::LatestSharded, "latest snapshot is sharded"),
            (
                FullReason::ShardLayoutChanged,
                "latest snapshot is not sharded the same way",
            ),
            (FullReason::Interval, "full snapshot interval reached"),
            (FullReason::LatestUnreadable, "latest snapshot unreadable"),
            (FullReason::NoGain, "no tensor gained from a delta"),
            (FullReason::WouldNotPay, "delta would not pay"),
        ];
        for (r, text) in all {
            assert_eq!(r.to_string(), text);
        }
        for v in [
            DeltaVerdict::Keep,
            DeltaVerdict::NoGain,
            DeltaVerdict::WouldNotPay,
        ] {
            assert_eq!(
                FullReason::from_verdict(v).map(FullReason::as_str),
                v.full_reason()
            );
        }
    }

    #[test]
    fn one_routine_for_full_and_delta() {
        let w: Vec<f32> = (0..4096).map(|i| i as f32).collect();
        let t = Tensor::from_f32("w", &[4096], Role::Weight, &w).unwrap();
        let policy = Policy::default();
        let mut timings = SaveTimings::default();
        let e = encode_against(
            &policy,
            std::slice::from_ref(&t),
            Err(FullReason::First),
            &[],
            &mut timings,
        )
        .unwrap();
        assert_eq!((e.base, e.full_reason), (None, Some(FullReason::First)));
        let mut w2 = w.clone();
        w2[5] = 0.5;
        let t2 = Tensor::from_f32("w", &[4096], Role::Weight, &w2).unwrap();
        let b = BaseState {
            id: 7,
            state: Arc::new(vec![t]),
            hash: 99,
        };
        let e = encode_against(&policy, &[t2], Ok(b.clone()), &[], &mut timings).unwrap();
        assert!(timings.encode > Duration::ZERO && timings.total() >= timings.encode);
        assert_eq!((e.base, e.full_reason), (Some(b.base_ref()), None));
        assert!(e.tensors[0].0.codec.needs_base());
    }

    #[test]
    fn limits_are_input_limits() {
        let t = Tensor::from_f32("w", &[1], Role::Weight, &[1.0]).unwrap();
        assert!(matches!(
            validate(&[t], &"n".repeat(crate::MAX_NAME_BYTES + 1)),
            Err(Error::InputLimit { .. })
        ));
        let md = vec![(
            "k".into(),
            "v".repeat(crate::format::MAX_METADATA_VALUE_BYTES + 1),
        )];
        assert!(matches!(
            validate_metadata(&md),
            Err(Error::InputLimit { what, .. }) if what.contains("metadata `k`")
        ));
    }
}
