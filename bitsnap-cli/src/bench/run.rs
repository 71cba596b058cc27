//! The runner: every method on each file of a series, and the results.

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

use rayon::prelude::*;
use serde::Serialize;

use bitsnap_core::codec::{
    self, BitmaskDelta, Codec, CodecId, EncodeInput, Encoded, Planes, XorDelta,
};
use bitsnap_core::fmt::ratio;
use bitsnap_core::format::{BaseRef, Entry, RefScope, Reference, SnapshotWriter};
use bitsnap_core::{DType, DeltaVerdict, Error, Lossiness, Policy, Role, Tensor};

/// One thing measured: a baseline, a single codec or bitsnap's adaptive policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Method {
    /// zstd over the raw bytes, one frame per tensor.
    Zstd,
    /// Byte planes + zstd ([`codec::Planes`]).
    Planes,
    /// XOR with the previous file + byte planes + zstd ([`codec::XorDelta`]).
    Xor,
    /// Bitmask sparse delta against the previous file ([`codec::BitmaskDelta`]).
    Bitmask,
    /// The adaptive policy, as the store runs it.
    Bitsnap,
}

impl Method {
    /// Every method, in report order.
    pub const ALL: [Method; 5] = [
        Method::Zstd,
        Method::Planes,
        Method::Xor,
        Method::Bitmask,
        Method::Bitsnap,
    ];

    /// Short name used in tables and JSON.
    pub const fn name(self) -> &'static str {
        match self {
            Method::Zstd => "zstd-1",
            Method::Planes => "planes",
            Method::Xor => "xor",
            Method::Bitmask => "bitmask",
            Method::Bitsnap => "bitsnap",
        }
    }

    /// One-line description.
    pub const fn describe(self) -> &'static str {
        match self {
            Method::Zstd => "zstd over raw bytes, one frame per tensor",
            Method::Planes => "byte planes + zstd",
            Method::Xor => "XOR with previous file + byte planes + zstd",
            Method::Bitmask => "bitmask sparse delta vs previous file",
            Method::Bitsnap => "adaptive policy, as the store runs it",
        }
    }
}

/// Sizes and timings of one method on some set of tensors.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MethodResult {
    /// [`Method::name`].
    pub method: &'static str,
    /// Decoded bytes.
    pub raw_bytes: u64,
    /// Payload bytes.
    pub stored_bytes: u64,
    /// `raw_bytes / stored_bytes`.
    pub ratio: f64,
    /// Wall-clock seconds spent encoding.
    pub encode_seconds: f64,
    /// Wall-clock seconds spent decoding.
    pub decode_seconds: f64,
    /// `raw_bytes / encode_seconds / 1e9`.
    pub encode_gbps: f64,
    /// `raw_bytes / decode_seconds / 1e9`.
    pub decode_gbps: f64,
}

/// A method's totals over the whole series.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MethodSummary {
    /// [`Method::name`].
    pub method: &'static str,
    /// [`Method::describe`].
    pub description: &'static str,
    /// Decoded bytes of every file.
    pub raw_bytes: u64,
    /// Payload bytes of every file.
    pub stored_bytes: u64,
    /// `raw_bytes / stored_bytes`, first file included.
    pub ratio: f64,
    /// The ratio over files 1.. only (the deltas); `None` for a one-file series.
    pub delta_ratio: Option<f64>,
    /// Wall-clock seconds spent encoding.
    pub encode_seconds: f64,
    /// Wall-clock seconds spent decoding.
    pub decode_seconds: f64,
    /// Raw GB encoded per second.
    pub encode_gbps: f64,
    /// Raw GB decoded per second.
    pub decode_gbps: f64,
}

/// The bitmask-only size bound over some tensors that have a base.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BoundResult {
    /// Decoded bytes of the tensors that have a base.
    pub raw_bytes: u64,
    /// `Σ (numel + bits × changed) / 8` over them.
    pub bound_bytes: u64,
    /// `raw_bytes / bound_bytes` (`bits / (1 + bits × p)` for one dtype).
    pub ratio: f64,
}

/// One file of the series.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FileResult {
    /// Position in the series, from 0.
    pub index: usize,
    /// Its name (file stem, or the synthetic step's name).
    pub name: String,
    /// Number of tensors.
    pub tensors: usize,
    /// Tensors with no base in the previous file (all of them in the first file).
    pub tensors_without_base: usize,
    /// Decoded bytes.
    pub raw_bytes: u64,
    /// Elements of the tensors that have a base.
    pub compared_elements: u64,
    /// Of those, elements whose bits differ from the base.
    pub changed_elements: u64,
    /// `changed_elements / compared_elements`; `None` when nothing was compared.
    pub changed_fraction: Option<f64>,
    /// The bitmask-only bound over tensors that have a base; `None` when none has.
    pub bitmask_bound: Option<BoundResult>,
    /// Every method on this file.
    pub methods: Vec<MethodResult>,
    /// Whether bitsnap stored this file as a delta snapshot.
    pub bitsnap_delta: bool,
    /// Codec name → tensors bitsnap coded with it in this file.
    pub bitsnap_codecs: BTreeMap<&'static str, usize>,
    /// Payload bytes of the best per-tensor baseline: per tensor the smaller of `xor`
    /// and `planes`.
    pub best_baseline_bytes: u64,
    /// Bytes of the snapshot file bitsnap writes for this file (payloads, header,
    /// trailer).
    pub bitsnap_file_bytes: u64,
    /// Bytes each codec's bitsnap payloads take in this file, by codec name.
    pub bitsnap_codec_bytes: BTreeMap<&'static str, u64>,
    /// Bytes each codec saved in this file against the best candidate of another kind
    /// (for `cast`, `identical` and `replay`: the best codec that reads no other tensor;
    /// for `intdelta`: the best of the other delta and full codecs), by codec name.
    pub bitsnap_codec_saved: BTreeMap<&'static str, i64>,
}

/// Every method on the tensors of one dtype, over the series.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DTypeResult {
    /// Dtype name (`f32`, `bf16`, ...).
    pub dtype: &'static str,
    /// Tensors of this dtype, summed over files.
    pub tensors: usize,
    /// Every method on them.
    pub methods: Vec<MethodResult>,
}

/// bitsnap's result on the tensors of one role, over the series.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RoleResult {
    /// `weight`, `moment1`, `moment2` or `other`.
    pub role: String,
    /// Tensors of this role, summed over files.
    pub tensors: usize,
    /// Decoded bytes.
    pub raw_bytes: u64,
    /// Payload bytes.
    pub stored_bytes: u64,
    /// `raw_bytes / stored_bytes`.
    pub ratio: f64,
    /// Largest relative L2 error of a lossy tensor (`None`: all lossless).
    pub max_rel_l2: Option<f64>,
    /// Largest absolute error of a lossy tensor (`None`: all lossless).
    pub max_abs: Option<f64>,
}

/// The result of a benchmark run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BenchReport {
    /// Rayon threads the run used.
    pub threads: usize,
    /// The policy bitsnap ran with (`lossless` or `lossy-optimizer, N-bit moments`).
    pub policy: String,
    /// zstd level of every method.
    pub zstd_level: i32,
    /// Files in the series.
    pub file_count: usize,
    /// Decoded bytes of the whole series.
    pub raw_bytes: u64,
    /// Every method over the whole series.
    pub methods: Vec<MethodSummary>,
    /// The bitmask-only bound over every tensor that has a base (files 1..).
    pub bitmask_bound: Option<BoundResult>,
    /// Per file.
    pub files: Vec<FileResult>,
    /// Per dtype.
    pub dtypes: Vec<DTypeResult>,
    /// bitsnap per role.
    pub roles: Vec<RoleResult>,
    /// zstd over each whole input file, when the series came from files.
    pub whole_file_zstd: Option<WholeFileResult>,
    /// bitsnap against the best per-tensor baseline, over the whole series.
    pub best_baseline: BestBaseline,
    /// Payload bytes of bitsnap's tensors per codec, over the whole series.
    pub bitsnap_codec_bytes: BTreeMap<&'static str, u64>,
    /// Bytes each codec saved over the whole series ([`FileResult::bitsnap_codec_saved`]).
    pub bitsnap_codec_saved: BTreeMap<&'static str, i64>,
}

/// bitsnap against the best per-tensor baseline (per tensor the smaller of XOR planes and
/// planes, the first file's tensors in planes), over the whole series.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BestBaseline {
    /// Decoded bytes of every file.
    pub raw_bytes: u64,
    /// The baseline's payload bytes, every file.
    pub stored_bytes: u64,
    /// `raw_bytes / stored_bytes`.
    pub ratio: f64,
    /// bitsnap's payload bytes, every file.
    pub bitsnap_bytes: u64,
    /// `stored_bytes / bitsnap_bytes`: how much smaller bitsnap is (> 1: smaller).
    pub bitsnap_gain: f64,
    /// Bytes of the snapshot files bitsnap writes (payloads, headers, trailers).
    pub bitsnap_file_bytes: u64,
    /// `bitsnap_file_bytes / stored_bytes`; must stay ≤ [`MAX_FILE_OVER_BASELINE`].
    pub file_over_baseline: f64,
    /// Whether `file_over_baseline` ≤ [`MAX_FILE_OVER_BASELINE`].
    pub files_within_limit: bool,
}

/// The most bitsnap's files may take over the best per-tensor baseline's payloads (issue
/// #12: never meaningfully larger).
pub const MAX_FILE_OVER_BASELINE: f64 = 1.001;

#[derive(Debug, Clone, Copy, Default)]
struct Acc {
    raw: u64,
    stored: u64,
    enc: f64,
    dec: f64,
}

impl Acc {
    fn add(&mut self, o: Acc) {
        self.raw += o.raw;
        self.stored += o.stored;
        self.enc += o.enc;
        self.dec += o.dec;
    }

    fn result(&self, m: Method) -> MethodResult {
        MethodResult {
            method: m.name(),
            raw_bytes: self.raw,
            stored_bytes: self.stored,
            ratio: ratio(self.raw, self.stored),
            encode_seconds: self.enc,
            decode_seconds: self.dec,
            encode_gbps: gbps(self.raw, self.enc),
            decode_gbps: gbps(self.raw, self.dec),
        }
    }
}

fn gbps(bytes: u64, seconds: f64) -> f64 {
    if seconds > 0.0 {
        bytes as f64 / seconds / 1e9
    } else {
        0.0
    }
}

#[derive(Debug, Default)]
struct RoleAcc {
    tensors: usize,
    raw: u64,
    stored: u64,
    max_rel: Option<f64>,
    max_abs: Option<f64>,
}

/// Runs every method over a series of files, one [`push`](Bench::push) per file.
#[derive(Debug)]
pub struct Bench {
    policy: Policy,
    /// The previous file's tensors: the base of the `xor` and `bitmask` methods.
    prev: Option<Vec<Tensor>>,
    /// What bitsnap's previous snapshot decodes to and its chain depth.
    prev_state: Option<(Vec<Tensor>, u32)>,
    files: Vec<FileResult>,
    totals: BTreeMap<Method, Acc>,
    delta_totals: BTreeMap<Method, Acc>,
    dtypes: BTreeMap<u8, (usize, BTreeMap<Method, Acc>)>,
    roles: BTreeMap<u8, RoleAcc>,
    bound: (u64, u64),
}

impl Bench {
    /// A benchmark whose `bitsnap` method uses `policy`; every method uses its zstd level.
    pub fn new(policy: Policy) -> Bench {
        Bench {
            policy,
            prev: None,
            prev_state: None,
            files: Vec::new(),
            totals: BTreeMap::new(),
            delta_totals: BTreeMap::new(),
            dtypes: BTreeMap::new(),
            roles: BTreeMap::new(),
            bound: (0, 0),
        }
    }

    /// Runs every method on the next file of the series and returns its result.
    pub fn push(&mut self, name: &str, tensors: Vec<Tensor>) -> Result<&FileResult, Error> {
        self.push_with_metadata(name, tensors, &[])
    }

    /// [`Bench::push`] for a file with metadata, which bitsnap's method reads as the store
    /// does (optimizer replay's hyperparameters, `--derive` rules).
    pub fn push_with_metadata(
        &mut self,
        name: &str,
        tensors: Vec<Tensor>,
        metadata: &[(String, String)],
    ) -> Result<&FileResult, Error> {
        let index = self.files.len();
        let level = self.policy.zstd_level;
        let prev_map: HashMap<&str, &Tensor> = self
            .prev
            .as_ref()
            .map(|p| p.iter().map(|t| (t.name.as_str(), t)).collect())
            .unwrap_or_default();
        let bases: Vec<Option<&[u8]>> = tensors
            .iter()
            .map(|t| {
                prev_map
                    .get(t.name.as_str())
                    .filter(|b| b.dtype == t.dtype && b.shape == t.shape)
                    .map(|b| b.data.as_slice())
            })
            .collect();

        // Changed fraction and the bitmask bound.
        let mut file = FileResult {
            index,
            name: name.to_string(),
            tensors: tensors.len(),
            tensors_without_base: bases.iter().filter(|b| b.is_none()).count(),
            raw_bytes: tensors.iter().map(|t| t.data.len() as u64).sum(),
            compared_elements: 0,
            changed_elements: 0,
            changed_fraction: None,
            bitmask_bound: None,
            methods: Vec::new(),
            bitsnap_delta: false,
            bitsnap_codecs: BTreeMap::new(),
            best_baseline_bytes: 0,
            bitsnap_file_bytes: 0,
            bitsnap_codec_bytes: BTreeMap::new(),
            bitsnap_codec_saved: BTreeMap::new(),
        };
        let (mut b_raw, mut b_bound) = (0u64, 0u64);
        for (t, b) in tensors.iter().zip(&bases) {
            if let Some(b) = b {
                let w = t.dtype.size();
                let numel = (t.data.len() / w) as u64;
                let changed = codec::bitmask::changed_count(&t.data, b, w);
                file.compared_elements += numel;
                file.changed_elements += changed;
                b_raw += t.data.len() as u64;
                b_bound += (numel + 8 * w as u64 * changed).div_ceil(8);
            }
        }
        if file.compared_elements > 0 {
            file.changed_fraction =
                Some(file.changed_elements as f64 / file.compared_elements as f64);
            file.bitmask_bound = Some(BoundResult {
                raw_bytes: b_raw,
                bound_bytes: b_bound,
                ratio: ratio(b_raw, b_bound),
            });
            self.bound.0 += b_raw;
            self.bound.1 += b_bound;
        }

        // Tensors grouped by dtype, in tag order.
        let mut groups: BTreeMap<u8, Vec<usize>> = BTreeMap::new();
        for (i, t) in tensors.iter().enumerate() {
            groups.entry(t.dtype.tag()).or_default().push(i);
        }
        for (tag, g) in &groups {
            self.dtypes.entry(*tag).or_default().0 += g.len();
        }

        let mut per_method: Vec<(Method, BTreeMap<u8, Acc>)> = Vec::new();
        let mut sizes: BTreeMap<Method, Vec<u64>> = BTreeMap::new();
        for m in [Method::Zstd, Method::Planes, Method::Xor, Method::Bitmask] {
            let (accs, per_tensor) = run_baseline(m, level, &tensors, &bases, &groups, name)?;
            per_method.push((m, accs));
            sizes.insert(m, per_tensor);
        }
        // The best per-tensor baseline: per tensor the smaller of XOR planes and planes
        // (planes alone where there is no base).
        file.best_baseline_bytes = match (sizes.get(&Method::Planes), sizes.get(&Method::Xor)) {
            (Some(p), Some(x)) => p.iter().zip(x).map(|(p, x)| *p.min(x)).sum(),
            _ => 0,
        };
        let accs = self.run_bitsnap(&tensors, &groups, &mut file, name, metadata)?;
        per_method.push((Method::Bitsnap, accs));

        for (m, accs) in per_method {
            let mut total = Acc::default();
            for (tag, a) in accs {
                total.add(a);
                if let Some(d) = self.dtypes.get_mut(&tag) {
                    d.1.entry(m).or_default().add(a);
                }
            }
            self.totals.entry(m).or_default().add(total);
            if index > 0 {
                self.delta_totals.entry(m).or_default().add(total);
            }
            file.methods.push(total.result(m));
        }
        self.prev = Some(tensors);
        self.files.push(file);
        let last = self.files.len() - 1;
        Ok(&self.files[last])
    }

    /// bitsnap's method: what the store does for one save, timed per dtype group.
    /// Returns the timings and sizes per dtype, and records in `self.prev_state` what
    /// the snapshot decodes to (the next file's base).
    fn run_bitsnap(
        &mut self,
        tensors: &[Tensor],
        groups: &BTreeMap<u8, Vec<usize>>,
        file: &mut FileResult,
        file_name: &str,
        metadata: &[(String, String)],
    ) -> Result<BTreeMap<u8, Acc>, Error> {
        let policy = self.policy;
        // The store's base choice: the previous snapshot unless the chain is full.
        let prev = self
            .prev_state
            .as_ref()
            .filter(|(_, depth)| depth.saturating_add(1) < policy.full_every);
        let base_map: HashMap<&str, &Tensor> = prev
            .map(|(s, _)| s.iter().map(|t| (t.name.as_str(), t)).collect())
            .unwrap_or_default();
        let mut accs: BTreeMap<u8, Acc> = BTreeMap::new();
        let (mut encoded, mut refs) =
            encode_groups(&policy, tensors, groups, &base_map, metadata, &mut accs)?;
        let mut delta = prev.is_some();
        if delta {
            let verdict = policy.judge_delta(&encoded);
            delta = verdict.full_reason().is_none();
            if verdict == DeltaVerdict::WouldNotPay {
                (encoded, refs) = encode_groups(
                    &policy,
                    tensors,
                    groups,
                    &HashMap::new(),
                    metadata,
                    &mut accs,
                )?;
            }
        }
        let depth = match (delta, prev) {
            (true, Some((_, d))) => d + 1,
            _ => 0,
        };
        // Decode, timed per group, and check against what the store would keep.
        let by_name: HashMap<&str, usize> = tensors
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.as_str(), i))
            .collect();
        for (tag, g) in groups {
            let start = Instant::now();
            let decoded: Vec<Vec<u8>> = g
                .par_iter()
                .map(|&i| {
                    let t = &tensors[i];
                    let (e, _) = &encoded[i];
                    let base = base_map
                        .get(t.name.as_str())
                        .filter(|b| b.dtype == t.dtype && b.shape == t.shape)
                        .map(|b| b.data.as_slice())
                        .filter(|_| delta);
                    if e.codec.needs_reference() {
                        // Referenced tensors as they decode: lossless ones are their
                        // input bytes (checked when they are decoded themselves), lossy
                        // ones what the quantizer kept; base ones the previous state.
                        let references = refs[i]
                            .iter()
                            .map(|r| {
                                let found = match r.scope {
                                    RefScope::Snapshot => by_name.get(r.name.as_str()).map(|&j| {
                                        let data = encoded[j]
                                            .0
                                            .lossy
                                            .as_ref()
                                            .map_or(tensors[j].data.as_slice(), |l| l.0.as_slice());
                                        (tensors[j].dtype, data)
                                    }),
                                    RefScope::Base => base_map
                                        .get(r.name.as_str())
                                        .filter(|_| delta)
                                        .map(|b| (b.dtype, b.data.as_slice())),
                                };
                                found.ok_or_else(|| {
                                    codec_error(
                                        Method::Bitsnap,
                                        t,
                                        format!("reference `{}` not found", r.name),
                                    )
                                })
                            })
                            .collect::<Result<Vec<_>, Error>>()?;
                        return codec::decode_with_references(
                            e.codec,
                            &e.payload,
                            t.dtype,
                            t.data.len() / t.dtype.size(),
                            base,
                            &references,
                        )
                        .map_err(|err| codec_error(Method::Bitsnap, t, err));
                    }
                    decode_codec(e.codec, &e.payload, t, base)
                })
                .collect::<Result<_, _>>()?;
            let secs = start.elapsed().as_secs_f64();
            let acc = accs.entry(*tag).or_default();
            acc.dec += secs;
            for (&i, d) in g.iter().zip(&decoded) {
                let (e, _) = &encoded[i];
                let want = e.lossy.as_ref().map_or(&tensors[i].data, |l| &l.0);
                check(d, want, Method::Bitsnap, &tensors[i], file_name)?;
                acc.raw += tensors[i].data.len() as u64;
                acc.stored += e.payload.len() as u64;
            }
        }
        file.bitsnap_file_bytes = file_bytes(tensors, &encoded, &refs, delta, metadata)?;
        // Roles and codec counts.
        for (t, (e, d)) in tensors.iter().zip(&encoded) {
            *file.bitsnap_codecs.entry(e.codec.name()).or_default() += 1;
            *file.bitsnap_codec_bytes.entry(e.codec.name()).or_default() += e.payload.len() as u64;
            if let Some(saved) = saved_against_others(e, d) {
                *file.bitsnap_codec_saved.entry(e.codec.name()).or_default() += saved;
            }
            let r = self.roles.entry(t.role.tag()).or_default();
            r.tensors += 1;
            r.raw += t.data.len() as u64;
            r.stored += e.payload.len() as u64;
            if let Some(q) = d.error {
                r.max_rel = Some(r.max_rel.map_or(q.rel_l2, |m| m.max(q.rel_l2)));
                r.max_abs = Some(r.max_abs.map_or(q.max_abs, |m| m.max(q.max_abs)));
            }
        }
        let state: Vec<Tensor> = tensors
            .iter()
            .zip(encoded)
            .map(|(t, (e, _))| match e.lossy {
                Some((data, _)) => Tensor { data, ..t.clone() },
                None => t.clone(),
            })
            .collect();
        file.bitsnap_delta = delta;
        self.prev_state = Some((state, depth));
        Ok(accs)
    }

    /// The report over every file pushed so far.
    pub fn finish(self) -> BenchReport {
        let methods = Method::ALL
            .iter()
            .filter_map(|&m| {
                let a = self.totals.get(&m)?;
                Some(MethodSummary {
                    method: m.name(),
                    description: m.describe(),
                    raw_bytes: a.raw,
                    stored_bytes: a.stored,
                    ratio: ratio(a.raw, a.stored),
                    delta_ratio: self.delta_totals.get(&m).map(|d| ratio(d.raw, d.stored)),
                    encode_seconds: a.enc,
                    decode_seconds: a.dec,
                    encode_gbps: gbps(a.raw, a.enc),
                    decode_gbps: gbps(a.raw, a.dec),
                })
            })
            .collect();
        let dtypes = self
            .dtypes
            .iter()
            .filter_map(|(tag, (n, accs))| {
                Some(DTypeResult {
                    dtype: DType::from_tag(*tag)?.name(),
                    tensors: *n,
                    methods: accs.iter().map(|(m, a)| a.result(*m)).collect(),
                })
            })
            .collect();
        let roles = self
            .roles
            .iter()
            .filter_map(|(tag, r)| {
                Some(RoleResult {
                    role: Role::from_tag(*tag)?.to_string(),
                    tensors: r.tensors,
                    raw_bytes: r.raw,
                    stored_bytes: r.stored,
                    ratio: ratio(r.raw, r.stored),
                    max_rel_l2: r.max_rel,
                    max_abs: r.max_abs,
                })
            })
            .collect();
        let raw: u64 = self.files.iter().map(|f| f.raw_bytes).sum();
        let best: u64 = self.files.iter().map(|f| f.best_baseline_bytes).sum();
        let bitsnap = self.totals.get(&Method::Bitsnap).map_or(0, |a| a.stored);
        let files: u64 = self.files.iter().map(|f| f.bitsnap_file_bytes).sum();
        let over = files as f64 / best.max(1) as f64;
        let best_baseline = BestBaseline {
            raw_bytes: raw,
            stored_bytes: best,
            ratio: ratio(raw, best),
            bitsnap_bytes: bitsnap,
            bitsnap_gain: ratio(best, bitsnap),
            bitsnap_file_bytes: files,
            file_over_baseline: over,
            files_within_limit: over <= MAX_FILE_OVER_BASELINE,
        };
        let mut bitsnap_codec_bytes = BTreeMap::new();
        let mut bitsnap_codec_saved = BTreeMap::new();
        for f in &self.files {
            for (c, b) in &f.bitsnap_codec_bytes {
                *bitsnap_codec_bytes.entry(*c).or_default() += b;
            }
            for (c, b) in &f.bitsnap_codec_saved {
                *bitsnap_codec_saved.entry(*c).or_default() += b;
            }
        }
        BenchReport {
            bitsnap_codec_saved,
            best_baseline,
            bitsnap_codec_bytes,
            threads: rayon::current_num_threads(),
            policy: policy_label(&self.policy),
            zstd_level: self.policy.zstd_level,
            file_count: self.files.len(),
            raw_bytes: self.files.iter().map(|f| f.raw_bytes).sum(),
            methods,
            bitmask_bound: (self.bound.0 > 0).then(|| BoundResult {
                raw_bytes: self.bound.0,
                bound_bytes: self.bound.1,
                ratio: ratio(self.bound.0, self.bound.1),
            }),
            files: self.files,
            dtypes,
            roles,
            whole_file_zstd: None,
        }
    }
}

/// zstd over each whole input file (its header included), one frame per file.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct WholeFileResult {
    /// Bytes of the files.
    pub file_bytes: u64,
    /// Bytes of their zstd frames.
    pub stored_bytes: u64,
    /// `file_bytes / stored_bytes`.
    pub ratio: f64,
    /// Compression speed over all files, files compressed in parallel.
    pub encode_gbps: f64,
}

/// The "zstd on each whole file" baseline: every file compressed as one zstd frame at
/// `level`, files in parallel.
pub fn whole_file_zstd(paths: &[std::path::PathBuf], level: i32) -> Result<WholeFileResult, Error> {
    let files: Vec<Vec<u8>> = paths
        .iter()
        .map(|p| {
            std::fs::read(p).map_err(|e| Error::Io {
                path: p.clone(),
                source: e,
            })
        })
        .collect::<Result<_, _>>()?;
    let start = Instant::now();
    let stored: Vec<u64> = files
        .par_iter()
        .zip(paths)
        .map(|(f, p)| {
            zstd::bulk::compress(f, level)
                .map(|z| z.len() as u64)
                .map_err(|e| Error::Io {
                    path: p.clone(),
                    source: e,
                })
        })
        .collect::<Result<_, _>>()?;
    let secs = start.elapsed().as_secs_f64();
    let file_bytes: u64 = files.iter().map(|f| f.len() as u64).sum();
    let stored_bytes = stored.iter().sum();
    Ok(WholeFileResult {
        file_bytes,
        stored_bytes,
        ratio: ratio(file_bytes, stored_bytes),
        encode_gbps: file_bytes as f64 / 1e9 / secs.max(1e-9),
    })
}

/// `lossless`, or `lossy-optimizer, N-bit moments`.
pub fn policy_label(p: &Policy) -> String {
    match p.lossiness {
        Lossiness::Lossless => "lossless".into(),
        Lossiness::LossyOptimizer { bits } => {
            format!("lossy-optimizer, {}-bit moments", bits.bits())
        }
        Lossiness::LossyOptimizerBudget { max_error } => {
            format!("lossy-optimizer, moments within rel. L2 {max_error}")
        }
    }
}

type EncodedTensor = (Encoded, bitsnap_core::Decision);

/// Encodes every tensor with the policy, timed per dtype group; results by tensor index.
fn encode_groups(
    policy: &Policy,
    tensors: &[Tensor],
    groups: &BTreeMap<u8, Vec<usize>>,
    base_map: &HashMap<&str, &Tensor>,
    metadata: &[(String, String)],
    accs: &mut BTreeMap<u8, Acc>,
) -> Result<(Vec<EncodedTensor>, Vec<Vec<Reference>>), Error> {
    // The references the store plans (copies, casts), in the store's time.
    let start = Instant::now();
    let plan = bitsnap_core::references::ReferencePlan::of(policy, tensors, metadata);
    let mut plan_secs = start.elapsed().as_secs_f64();
    let mut out: Vec<Option<EncodedTensor>> = (0..tensors.len()).map(|_| None).collect();
    let mut refs: Vec<Vec<Reference>> = vec![Vec::new(); tensors.len()];
    // Each dtype group as the store encodes it: weights with their moments as units
    // (optimizer replay beside the codecs), every other tensor alone.
    for (tag, g) in groups {
        let start = Instant::now();
        let enc =
            bitsnap_core::references::encode_units(policy, &plan, tensors, g, base_map, metadata)?;
        accs.entry(*tag).or_default().enc += start.elapsed().as_secs_f64();
        for (i, (e, d, r)) in enc {
            out[i] = Some((e, d));
            refs[i] = r;
        }
    }
    let mut encoded = out
        .into_iter()
        .zip(tensors)
        .map(|(e, t)| {
            e.ok_or_else(|| Error::InvalidTensor {
                tensor: t.name.clone(),
                reason: "was not encoded".into(),
            })
        })
        .collect::<Result<Vec<_>, Error>>()?;
    // Copies of other tensors of the snapshot, as the store finds them; their time and
    // the plan's is shared among the dtype groups by raw bytes.
    let start = Instant::now();
    bitsnap_core::references::apply(tensors, &mut encoded, &mut refs, &|_| true);
    plan_secs += start.elapsed().as_secs_f64();
    let secs = plan_secs;
    let total: u64 = tensors.iter().map(|t| t.data.len() as u64).sum();
    for (tag, g) in groups {
        let raw: u64 = g.iter().map(|&i| tensors[i].data.len() as u64).sum();
        accs.entry(*tag).or_default().enc += secs * raw as f64 / total.max(1) as f64;
    }
    Ok((encoded, refs))
}

fn codec_error(m: Method, t: &Tensor, e: impl std::fmt::Display) -> Error {
    Error::InvalidTensor {
        tensor: t.name.clone(),
        reason: format!("{} failed: {e}", m.name()),
    }
}

fn check(got: &[u8], want: &[u8], m: Method, t: &Tensor, file: &str) -> Result<(), Error> {
    if got == want {
        Ok(())
    } else {
        Err(Error::InvalidTensor {
            tensor: t.name.clone(),
            reason: format!("{} did not decode to its input in `{file}`", m.name()),
        })
    }
}

/// A baseline method's payload: a zstd frame, or a codec's payload.
fn encode_baseline(
    m: Method,
    level: i32,
    t: &Tensor,
    base: Option<&[u8]>,
) -> Result<(CodecId, Vec<u8>), Error> {
    if m == Method::Zstd {
        let frame = zstd::bulk::compress(&t.data, level).map_err(|e| codec_error(m, t, e))?;
        // Tag unused for zstd frames.
        return Ok((CodecId::Raw, frame));
    }
    let input = EncodeInput {
        shape: &t.shape,
        dtype: t.dtype,
        role: t.role,
        data: &t.data,
        base,
    };
    let planes = Planes { level };
    let enc = match (m, base) {
        (Method::Xor, Some(_)) => XorDelta { level }.encode(&input),
        (Method::Bitmask, Some(_)) => BitmaskDelta { level }.encode(&input),
        _ => planes.encode(&input),
    }
    .map_err(|e| codec_error(m, t, e))?
    .ok_or_else(|| codec_error(m, t, "codec refused the tensor"))?;
    Ok((enc.codec, enc.payload))
}

fn decode_codec(
    codec: CodecId,
    payload: &[u8],
    t: &Tensor,
    base: Option<&[u8]>,
) -> Result<Vec<u8>, Error> {
    codec::decode(codec, payload, t.dtype, t.data.len() / t.dtype.size(), base)
        .map_err(|e| codec_error(Method::Bitsnap, t, e))
}

/// Runs a baseline method on every dtype group of one file.
fn run_baseline(
    m: Method,
    level: i32,
    tensors: &[Tensor],
    bases: &[Option<&[u8]>],
    groups: &BTreeMap<u8, Vec<usize>>,
    file: &str,
) -> Result<(BTreeMap<u8, Acc>, Vec<u64>), Error> {
    let mut accs = BTreeMap::new();
    let mut sizes = vec![0u64; tensors.len()];
    for (tag, g) in groups {
        let start = Instant::now();
        let payloads: Vec<(CodecId, Vec<u8>)> = g
            .par_iter()
            .map(|&i| encode_baseline(m, level, &tensors[i], bases[i]))
            .collect::<Result<_, _>>()?;
        let enc = start.elapsed().as_secs_f64();
        let start = Instant::now();
        let decoded: Vec<Vec<u8>> = g
            .par_iter()
            .zip(&payloads)
            .map(|(&i, (c, p))| {
                let t = &tensors[i];
                if m == Method::Zstd {
                    zstd::bulk::decompress(p, t.data.len()).map_err(|e| codec_error(m, t, e))
                } else {
                    codec::decode(*c, p, t.dtype, t.data.len() / t.dtype.size(), bases[i])
                        .map_err(|e| codec_error(m, t, e))
                }
            })
            .collect::<Result<_, _>>()?;
        let dec = start.elapsed().as_secs_f64();
        let mut acc = Acc {
            enc,
            dec,
            ..Acc::default()
        };
        for ((&i, d), (_, p)) in g.iter().zip(&decoded).zip(&payloads) {
            check(d, &tensors[i].data, m, &tensors[i], file)?;
            acc.raw += tensors[i].data.len() as u64;
            acc.stored += p.len() as u64;
            sizes[i] = p.len() as u64;
        }
        accs.insert(*tag, acc);
    }
    Ok((accs, sizes))
}

/// What `e` saved against the best candidate of `d` of another kind: for reference
/// codecs the best codec reading no other tensor, for `intdelta` and `grouped` the best
/// of the others;
/// `None` for the rest (or when no such candidate was tried).
fn saved_against_others(e: &Encoded, d: &bitsnap_core::Decision) -> Option<i64> {
    let other = |c: &CodecId| match e.codec {
        CodecId::IntDelta | CodecId::GroupedDelta => *c != e.codec && !c.needs_reference(),
        c0 if c0.needs_reference() => !c.needs_reference(),
        _ => false,
    };
    let best = d
        .candidates
        .iter()
        .filter(|(c, _)| other(c))
        .map(|(_, b)| *b)
        .min()?;
    Some(best as i64 - e.payload.len() as i64)
}

/// Counts the bytes written to it.
struct Counter(u64);

impl std::io::Write for Counter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len() as u64;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Bytes of the snapshot file the store would write for these encodings.
fn file_bytes(
    tensors: &[Tensor],
    encoded: &[EncodedTensor],
    refs: &[Vec<Reference>],
    delta: bool,
    metadata: &[(String, String)],
) -> Result<u64, Error> {
    let path = std::path::Path::new("bench");
    let base = delta.then_some(BaseRef {
        id: 0,
        state_hash: 0,
    });
    let mut w = SnapshotWriter::new(Counter(0), path, 1, "bench", base)?;
    w.set_metadata(metadata.to_vec());
    for ((t, (e, d)), r) in tensors.iter().zip(encoded).zip(refs) {
        let entry = Entry::of(t, e.codec, d, 0, r);
        w.push(entry, &e.payload)?;
    }
    let (_, counter) = w.finish()?;
    Ok(counter.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bitsnap_core::codec::QuantBits;

    use crate::bench::Synthetic;

    #[test]
    fn lossy_policy_reports_moment_errors() {
        let policy = Policy::default().with_lossiness(Lossiness::LossyOptimizer {
            bits: QuantBits::B8,
        });
        let mut bench = Bench::new(policy);
        for (name, tensors) in Synthetic::default().with_scale(0.005).steps().take(2) {
            bench.push(&name, tensors).unwrap();
        }
        let r = bench.finish();
        let role = |n: &str| r.roles.iter().find(|x| x.role == n).unwrap();
        assert!(role("moment2").max_rel_l2.is_some());
        assert!(role("weight").max_rel_l2.is_none());
        assert!(r.policy.starts_with("lossy-optimizer"));
    }

    #[test]
    fn series_with_new_and_reshaped_tensors() {
        let t = |n: &str, shape: &[u64], v: f32| {
            let numel: u64 = shape.iter().product();
            Tensor::from_f32(n, shape, Role::Weight, &vec![v; numel as usize]).unwrap()
        };
        let mut bench = Bench::new(Policy::default());
        bench.push("a", vec![t("w", &[4, 4], 1.0)]).unwrap();
        let f = bench
            .push("b", vec![t("w", &[4, 8], 1.0), t("new", &[3], 2.0)])
            .unwrap();
        assert_eq!(f.tensors_without_base, 2);
        assert_eq!(f.changed_fraction, None);
        let f = bench
            .push("c", vec![t("w", &[4, 8], 1.5), t("new", &[3], 2.0)])
            .unwrap();
        assert_eq!(f.changed_fraction, Some(32.0 / 35.0));
        let r = bench.finish();
        assert_eq!(r.files.len(), 3);
    }
}
