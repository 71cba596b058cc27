//! Every codec and baseline side by side on one series of checkpoints: size and speed,
//! measured on the same bytes in the same run.
//!
//! A series is a list of files (snapshots), oldest first. File `i`'s tensors are deltas on
//! file `i - 1`'s tensors of the same name, dtype and shape; a tensor without such a base
//! (the first file, a new tensor, a changed shape) is coded without one. Each file is fed
//! to [`Bench::push`] in turn, so only two files are held in memory at a time, and every
//! method is run on it:
//!
//! | method | what it does, per tensor |
//! |---|---|
//! | `zstd-1` | zstd (level 1 by default) over the raw bytes, one frame per tensor |
//! | `planes` | [`codec::Planes`]: byte planes + zstd, no base |
//! | `xor` | [`codec::XorDelta`] against the previous file (`planes` where there is no base) |
//! | `bitmask` | [`codec::BitmaskDelta`] against the previous file (`planes` where there is no base) |
//! | `bitsnap` | [`Policy::encode_tensor`] as the [`Store`](crate::Store) calls it: against what the previous snapshot decodes to, with the store's full-snapshot interval and "delta would not pay" rule |
//!
//! plus the bitmask-only size bound: a 1-bit-per-element mask and the changed elements
//! stored raw, `(numel + bits × changed) / 8` bytes per tensor, i.e. a ratio of
//! `bits / (1 + bits × p)` for a changed fraction `p` (computed over tensors that have a
//! base).
//!
//! Within a file, the tensors of each dtype are encoded (then decoded) together, on all
//! rayon threads (tensors in parallel and, inside the codecs, chunks in parallel); the
//! wall-clock time of each is recorded. Encode and decode GB/s are raw (decoded) bytes
//! divided by those seconds, with 1 GB = 10^9 bytes. Every decode is checked against its
//! input (outside the timed region); sizes are payload bytes, without container headers.
//!
//! [`Synthetic`] generates a realistic series in memory (see its docs); [`BenchReport`]
//! is the result, serialisable to JSON and printable as markdown.
//!
//! ```
//! use bitsnap_core::bench::{Bench, Synthetic};
//! use bitsnap_core::Policy;
//! let mut bench = Bench::new(Policy::default());
//! for (name, tensors) in Synthetic::default().with_scale(0.001).steps() {
//!     bench.push(&name, tensors).unwrap();
//! }
//! let report = bench.finish();
//! assert_eq!(report.files.len(), 5);
//! assert!(report.methods.iter().all(|m| m.stored_bytes > 0));
//! assert!(report.to_markdown().contains("| bitsnap"));
//! ```

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::time::Instant;

use rayon::prelude::*;
use serde::Serialize;

use crate::codec::{self, BitmaskDelta, Codec, CodecId, EncodeInput, Encoded, Planes, XorDelta};
use crate::{DType, DeltaVerdict, Error, Lossiness, Policy, Role, Tensor};

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
}

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

fn ratio(raw: u64, stored: u64) -> f64 {
    if stored == 0 {
        if raw == 0 { 1.0 } else { f64::INFINITY }
    } else {
        raw as f64 / stored as f64
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
        for m in [Method::Zstd, Method::Planes, Method::Xor, Method::Bitmask] {
            let accs = run_baseline(m, level, &tensors, &bases, &groups, name)?;
            per_method.push((m, accs));
        }
        let accs = self.run_bitsnap(&tensors, &groups, &mut file, name)?;
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
        let mut encoded = encode_groups(&policy, tensors, groups, &base_map, &mut accs)?;
        let mut delta = prev.is_some();
        if delta {
            let verdict = policy.judge_delta(&encoded);
            delta = verdict.full_reason().is_none();
            if verdict == DeltaVerdict::WouldNotPay {
                encoded = encode_groups(&policy, tensors, groups, &HashMap::new(), &mut accs)?;
            }
        }
        let depth = match (delta, prev) {
            (true, Some((_, d))) => d + 1,
            _ => 0,
        };
        // Decode, timed per group, and check against what the store would keep.
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
        // Roles and codec counts.
        for (t, (e, d)) in tensors.iter().zip(&encoded) {
            *file.bitsnap_codecs.entry(e.codec.name()).or_default() += 1;
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
        BenchReport {
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
    }
}

type EncodedTensor = (Encoded, crate::format::Decision);

/// Encodes every tensor with the policy, timed per dtype group; results by tensor index.
fn encode_groups(
    policy: &Policy,
    tensors: &[Tensor],
    groups: &BTreeMap<u8, Vec<usize>>,
    base_map: &HashMap<&str, &Tensor>,
    accs: &mut BTreeMap<u8, Acc>,
) -> Result<Vec<EncodedTensor>, Error> {
    let mut out: Vec<Option<EncodedTensor>> = (0..tensors.len()).map(|_| None).collect();
    for (tag, g) in groups {
        let start = Instant::now();
        let enc: Vec<EncodedTensor> = g
            .par_iter()
            .map(|&i| {
                policy.encode_tensor(&tensors[i], base_map.get(tensors[i].name.as_str()).copied())
            })
            .collect::<Result<_, _>>()?;
        accs.entry(*tag).or_default().enc += start.elapsed().as_secs_f64();
        for (&i, e) in g.iter().zip(enc) {
            out[i] = Some(e);
        }
    }
    out.into_iter()
        .zip(tensors)
        .map(|(e, t)| {
            e.ok_or_else(|| Error::InvalidTensor {
                tensor: t.name.clone(),
                reason: "was not encoded".into(),
            })
        })
        .collect()
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
) -> Result<BTreeMap<u8, Acc>, Error> {
    let mut accs = BTreeMap::new();
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
        }
        accs.insert(*tag, acc);
    }
    Ok(accs)
}

// ---------------------------------------------------------------------------------------
// Markdown.

/// Bytes in decimal units: `512 B`, `1.5 kB`, `12.34 MB`, `1.20 GB`.
pub fn human_bytes(b: u64) -> String {
    let b = b as f64;
    if b >= 1e9 {
        format!("{:.2} GB", b / 1e9)
    } else if b >= 1e6 {
        format!("{:.2} MB", b / 1e6)
    } else if b >= 1e3 {
        format!("{:.1} kB", b / 1e3)
    } else {
        format!("{b} B")
    }
}

fn fmt_ratio(r: f64) -> String {
    if r.is_infinite() {
        "∞".into()
    } else if r >= 100.0 {
        format!("{r:.0}x")
    } else {
        format!("{r:.2}x")
    }
}

/// Below this many raw bytes, the markdown tables show no speed: the time is mostly
/// thread start-up and allocation, not coding (the JSON still has it).
const MIN_TIMED_BYTES: u64 = 1_000_000;

fn fmt_fraction(f: Option<f64>) -> String {
    match f {
        None => "—".into(),
        Some(f) => format!("{:.3}%", f * 100.0),
    }
}

impl BenchReport {
    /// The report as markdown tables: totals per method, per file, per dtype and
    /// bitsnap per role.
    pub fn to_markdown(&self) -> String {
        let mut s = String::new();
        // Writing to a String cannot fail.
        let _ = self.write_markdown(&mut s);
        s
    }

    fn write_markdown(&self, s: &mut String) -> std::fmt::Result {
        writeln!(
            s,
            "bitsnap bench: {} files, {} raw, {} rayon threads, bitsnap policy {}, zstd level {}",
            self.file_count,
            human_bytes(self.raw_bytes),
            self.threads,
            self.policy,
            self.zstd_level
        )?;
        writeln!(s)?;
        writeln!(
            s,
            "| method | what | stored | ratio | ratio on deltas | encode GB/s | decode GB/s |"
        )?;
        writeln!(s, "|---|---|---:|---:|---:|---:|---:|")?;
        for m in &self.methods {
            writeln!(
                s,
                "| {} | {} | {} | {} | {} | {:.2} | {:.2} |",
                m.method,
                m.description,
                human_bytes(m.stored_bytes),
                fmt_ratio(m.ratio),
                m.delta_ratio.map_or("—".into(), fmt_ratio),
                m.encode_gbps,
                m.decode_gbps
            )?;
        }
        if let Some(w) = &self.whole_file_zstd {
            writeln!(
                s,
                "| zstd-1 whole files | each input file (header included) as one zstd frame | {} | {} | — | {:.2} | — |",
                human_bytes(w.stored_bytes),
                fmt_ratio(w.ratio),
                w.encode_gbps
            )?;
        }
        if let Some(b) = &self.bitmask_bound {
            writeln!(
                s,
                "| bitmask bound | bits/(1 + bits·p): 1-bit mask + changed elements raw, no entropy coding | {} | — | {} | — | — |",
                human_bytes(b.bound_bytes),
                fmt_ratio(b.ratio)
            )?;
        }
        writeln!(s)?;
        writeln!(
            s,
            "Ratio per file (changed: elements differing from the previous file's tensor of the same name, dtype and shape):"
        )?;
        writeln!(s)?;
        let names: Vec<&str> = Method::ALL.iter().map(|m| m.name()).collect();
        writeln!(
            s,
            "| # | file | raw | changed | {} | bitmask bound | bitsnap codecs |",
            names.join(" | ")
        )?;
        writeln!(
            s,
            "|---:|---|---:|---:|{}---:|---|",
            "---:|".repeat(names.len())
        )?;
        for f in &self.files {
            let ratios: Vec<String> = f.methods.iter().map(|m| fmt_ratio(m.ratio)).collect();
            let codecs: Vec<String> = f
                .bitsnap_codecs
                .iter()
                .map(|(c, n)| format!("{c} {n}"))
                .collect();
            writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} | {}{} |",
                f.index,
                f.name,
                human_bytes(f.raw_bytes),
                fmt_fraction(f.changed_fraction),
                ratios.join(" | "),
                f.bitmask_bound
                    .as_ref()
                    .map_or("—".into(), |b| fmt_ratio(b.ratio)),
                codecs.join(", "),
                if f.bitsnap_delta { "" } else { " (full)" }
            )?;
        }
        writeln!(s)?;
        writeln!(s, "Encode / decode GB/s per file:")?;
        writeln!(s)?;
        writeln!(s, "| # | file | {} |", names.join(" | "))?;
        writeln!(s, "|---:|---|{}", "---:|".repeat(names.len()))?;
        for f in &self.files {
            let cells: Vec<String> = f
                .methods
                .iter()
                .map(|m| format!("{:.2} / {:.2}", m.encode_gbps, m.decode_gbps))
                .collect();
            writeln!(s, "| {} | {} | {} |", f.index, f.name, cells.join(" | "))?;
        }
        writeln!(s)?;
        writeln!(
            s,
            "Per dtype, over the series: ratio, encode / decode GB/s:"
        )?;
        writeln!(s)?;
        writeln!(s, "| dtype | tensors | raw | {} |", names.join(" | "))?;
        writeln!(s, "|---|---:|---:|{}", "---:|".repeat(names.len()))?;
        for d in &self.dtypes {
            let raw = d.methods.first().map_or(0, |m| m.raw_bytes);
            let cells: Vec<String> = d
                .methods
                .iter()
                .map(|m| {
                    if m.raw_bytes < MIN_TIMED_BYTES {
                        format!("{}, —", fmt_ratio(m.ratio))
                    } else {
                        format!(
                            "{}, {:.2} / {:.2}",
                            fmt_ratio(m.ratio),
                            m.encode_gbps,
                            m.decode_gbps
                        )
                    }
                })
                .collect();
            writeln!(
                s,
                "| {} | {} | {} | {} |",
                d.dtype,
                d.tensors,
                human_bytes(raw),
                cells.join(" | ")
            )?;
        }
        writeln!(s)?;
        writeln!(s, "bitsnap per role, over the series:")?;
        writeln!(s)?;
        writeln!(
            s,
            "| role | tensors | raw | stored | ratio | max rel. L2 error | max abs. error |"
        )?;
        writeln!(s, "|---|---:|---:|---:|---:|---:|---:|")?;
        for r in &self.roles {
            writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} | {} |",
                r.role,
                r.tensors,
                human_bytes(r.raw_bytes),
                human_bytes(r.stored_bytes),
                fmt_ratio(r.ratio),
                r.max_rel_l2
                    .map_or("lossless".into(), |e| format!("{e:.2e}")),
                r.max_abs.map_or("lossless".into(), |e| format!("{e:.2e}"))
            )?;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------
// Synthetic series.

/// A synthetic training run, generated in memory: what a checkpoint series of a model
/// trained with mixed precision and Adam looks like, with a chosen fraction of elements
/// updated at each step.
///
/// Per layer `i` of 8 (sizes 1M, 2M, 3M, 4M, 1M, 2M, 3M, 4M elements, times
/// [`scale`](Synthetic::scale)), each step holds:
///
/// | tensor | dtype | role (from [`Role::guess`]) |
/// |---|---|---|
/// | `layers.{i}.weight` | f32 | weight (the master weights) |
/// | `layers.{i}.weight_bf16` | bf16 | weight (the model's copy: `w` rounded to bf16) |
/// | `optimizer.state.{i}.exp_avg` | f32 | moment1 |
/// | `optimizer.state.{i}.exp_avg_sq` | f32 | moment2 |
///
/// plus `optimizer.step`, an i64 scalar step counter (role other): 280 MB per step at
/// scale 1.
///
/// Step 0 (`init`): per element a gradient scale `s = 1e-3 · exp(1.5 z₀)` (log-normal,
/// spanning decades as real second moments do), `w = 0.02 z₁`, `v = s²`, `m = 0.3 s z₂`,
/// with `zₖ` standard normal. Each later step, for a fraction `p` of
/// [`fractions`](Synthetic::fractions) (default 100%, 10%, 1%, 0.1%), picks each element
/// independently with probability `p` and applies one Adam update to it: gradient
/// `g = √v · z`, `m ← 0.9 m + 0.1 g`, `v ← 0.999 v + 0.001 g²`,
/// `w ← w − lr · m / (√v + 1e-8)` with `lr = 1e-4`: small updates, which change the low
/// mantissa bits of `w` and, for a part of them, its bf16 copy. Unpicked elements keep
/// every bit (as with sparse gradients, frozen rows or masked fine-tuning).
///
/// The generator is deterministic for a given seed and scale (whatever the thread count).
#[derive(Debug, Clone, PartialEq)]
pub struct Synthetic {
    /// Multiplies every tensor's element count (default 1.0; at least one element each).
    pub scale: f64,
    /// Seed of the generator (default `0x5eed`).
    pub seed: u64,
    /// Changed fraction of each step after the first (default `[1.0, 0.1, 0.01, 0.001]`).
    pub fractions: Vec<f64>,
}

impl Default for Synthetic {
    fn default() -> Self {
        Synthetic {
            scale: 1.0,
            seed: 0x5eed,
            fractions: vec![1.0, 0.1, 0.01, 0.001],
        }
    }
}

/// Layers of the synthetic model.
pub const SYNTHETIC_LAYERS: usize = 8;
/// Elements generated per random stream; the unit of parallel generation.
const GEN_CHUNK: usize = 1 << 16;

impl Synthetic {
    /// Sets [`Synthetic::scale`].
    pub fn with_scale(mut self, scale: f64) -> Self {
        self.scale = scale;
        self
    }

    /// Sets [`Synthetic::seed`].
    pub fn with_seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// Element count of each layer.
    pub fn layer_sizes(&self) -> Vec<usize> {
        (0..SYNTHETIC_LAYERS)
            .map(|i| (((1 + i % 4) as f64 * 1_048_576.0 * self.scale).round() as usize).max(1))
            .collect()
    }

    /// Number of steps the series has (the initial one and one per fraction).
    pub fn len(&self) -> usize {
        1 + self.fractions.len()
    }

    /// Whether the series is empty (never: it always has the initial step).
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Raw bytes of one step.
    pub fn step_bytes(&self) -> u64 {
        self.layer_sizes()
            .iter()
            .map(|&n| n as u64 * 14)
            .sum::<u64>()
            + 8
    }

    /// The steps, generated one at a time: `(name, tensors)`.
    pub fn steps(&self) -> SyntheticSteps {
        SyntheticSteps {
            spec: self.clone(),
            layers: Vec::new(),
            step: 0,
        }
    }
}

/// The iterator of [`Synthetic::steps`].
#[derive(Debug)]
pub struct SyntheticSteps {
    spec: Synthetic,
    layers: Vec<Layer>,
    step: usize,
}

#[derive(Debug)]
struct Layer {
    w: Vec<f32>,
    m: Vec<f32>,
    v: Vec<f32>,
}

/// SplitMix64: a small, fast, well-mixed generator.
struct Rng(u64);

impl Rng {
    fn new(seed: u64, a: u64, b: u64, c: u64) -> Rng {
        let mut r = Rng(seed ^ a.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        r.0 ^= r.next().wrapping_add(b.wrapping_mul(0xbf58_476d_1ce4_e5b9));
        r.0 ^= r.next().wrapping_add(c.wrapping_mul(0x94d0_49bb_1331_11eb));
        r
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in (0, 1].
    fn uniform(&mut self) -> f64 {
        ((self.next() >> 11) + 1) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Standard normal (Box–Muller).
    fn normal(&mut self) -> f64 {
        let (u1, u2) = (self.uniform(), self.uniform());
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    let mut out = vec![0u8; v.len() * 4];
    out.par_chunks_mut(GEN_CHUNK * 4)
        .zip(v.par_chunks(GEN_CHUNK))
        .for_each(|(o, v)| {
            for (o, x) in o.chunks_exact_mut(4).zip(v) {
                o.copy_from_slice(&x.to_le_bytes());
            }
        });
    out
}

fn bf16_bytes(v: &[f32]) -> Vec<u8> {
    let mut out = vec![0u8; v.len() * 2];
    out.par_chunks_mut(GEN_CHUNK * 2)
        .zip(v.par_chunks(GEN_CHUNK))
        .for_each(|(o, v)| {
            for (o, x) in o.chunks_exact_mut(2).zip(v) {
                o.copy_from_slice(&half::bf16::from_f32(*x).to_le_bytes());
            }
        });
    out
}

fn percent(p: f64) -> String {
    let s = format!("{:.4}", p * 100.0);
    let s = s.trim_end_matches('0').trim_end_matches('.');
    format!("changed-{s}%")
}

impl SyntheticSteps {
    fn init(&mut self) {
        let seed = self.spec.seed;
        self.layers = self
            .spec
            .layer_sizes()
            .into_iter()
            .enumerate()
            .map(|(l, n)| {
                let mut layer = Layer {
                    w: vec![0.0; n],
                    m: vec![0.0; n],
                    v: vec![0.0; n],
                };
                layer
                    .w
                    .par_chunks_mut(GEN_CHUNK)
                    .zip(layer.m.par_chunks_mut(GEN_CHUNK))
                    .zip(layer.v.par_chunks_mut(GEN_CHUNK))
                    .enumerate()
                    .for_each(|(c, ((w, m), v))| {
                        let mut rng = Rng::new(seed, 0, l as u64, c as u64);
                        for ((w, m), v) in w.iter_mut().zip(m).zip(v) {
                            let s = 1e-3 * (1.5 * rng.normal()).exp();
                            *w = (0.02 * rng.normal()) as f32;
                            *v = (s * s) as f32;
                            *m = (0.3 * s * rng.normal()) as f32;
                        }
                    });
                layer
            })
            .collect();
    }

    fn update(&mut self, p: f64) {
        let (seed, step) = (self.spec.seed, self.step as u64);
        for (l, layer) in self.layers.iter_mut().enumerate() {
            layer
                .w
                .par_chunks_mut(GEN_CHUNK)
                .zip(layer.m.par_chunks_mut(GEN_CHUNK))
                .zip(layer.v.par_chunks_mut(GEN_CHUNK))
                .enumerate()
                .for_each(|(c, ((w, m), v))| {
                    let mut rng = Rng::new(seed, step, l as u64, c as u64);
                    for ((w, m), v) in w.iter_mut().zip(m).zip(v) {
                        if rng.uniform() > p {
                            continue;
                        }
                        let (mut mm, mut vv) = (*m as f64, *v as f64);
                        let g = vv.sqrt() * rng.normal();
                        mm = 0.9 * mm + 0.1 * g;
                        vv = 0.999 * vv + 0.001 * g * g;
                        *w = (*w as f64 - 1e-4 * mm / (vv.sqrt() + 1e-8)) as f32;
                        *m = mm as f32;
                        *v = vv as f32;
                    }
                });
        }
    }

    fn tensors(&self) -> Result<Vec<Tensor>, Error> {
        let mut out = Vec::with_capacity(self.layers.len() * 4 + 1);
        for (i, l) in self.layers.iter().enumerate() {
            let shape = vec![l.w.len() as u64];
            let f32_tensor = |name: String, role, v: &[f32]| {
                Tensor::new(name, DType::F32, shape.clone(), role, f32_bytes(v))
            };
            out.push(f32_tensor(
                format!("layers.{i}.weight"),
                Role::Weight,
                &l.w,
            )?);
            out.push(Tensor::new(
                format!("layers.{i}.weight_bf16"),
                DType::BF16,
                shape.clone(),
                Role::Weight,
                bf16_bytes(&l.w),
            )?);
            out.push(f32_tensor(
                format!("optimizer.state.{i}.exp_avg"),
                Role::OptimizerMoment(1),
                &l.m,
            )?);
            out.push(f32_tensor(
                format!("optimizer.state.{i}.exp_avg_sq"),
                Role::OptimizerMoment(2),
                &l.v,
            )?);
        }
        out.push(Tensor::new(
            "optimizer.step",
            DType::I64,
            vec![],
            Role::Other,
            (self.step as i64 * 100).to_le_bytes().to_vec(),
        )?);
        Ok(out)
    }
}

impl Iterator for SyntheticSteps {
    type Item = (String, Vec<Tensor>);

    fn next(&mut self) -> Option<Self::Item> {
        let name = if self.step == 0 {
            self.init();
            "init".to_string()
        } else {
            let p = *self.spec.fractions.get(self.step - 1)?;
            self.update(p);
            percent(p)
        };
        // Shapes and lengths are consistent by construction; a failure here would be a
        // bug in the generator, reported as the end of the series.
        let tensors = self.tensors().ok()?;
        self.step += 1;
        Some((name, tensors))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let left = self.spec.len().saturating_sub(self.step);
        (left, Some(left))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::QuantBits;

    #[test]
    fn synthetic_series_has_the_asked_changed_fractions() {
        let spec = Synthetic::default().with_scale(0.01);
        let mut bench = Bench::new(Policy::default());
        let mut n = 0;
        for (name, tensors) in spec.steps() {
            assert_eq!(tensors.len(), 4 * SYNTHETIC_LAYERS + 1);
            let f = bench.push(&name, tensors).unwrap();
            n += 1;
            if f.index > 0 {
                let want = spec.fractions[f.index - 1];
                let got = f.changed_fraction.unwrap();
                // The step counter always changes, and bf16 copies change less often.
                assert!(
                    got <= want * 1.1 + 1e-4 && got >= want * 0.4,
                    "{name}: {got} vs {want}"
                );
            }
        }
        assert_eq!(n, 5);
        let r = bench.finish();
        assert_eq!(r.file_count, 5);
        let by = |m: &str| r.methods.iter().find(|x| x.method == m).unwrap().ratio;
        // On sparse changes the deltas beat the full codecs, and bitsnap is at least as
        // good as each of them (it picks per tensor).
        assert!(by("bitmask") > by("planes"));
        assert!(by("bitsnap") >= by("bitmask") * 0.95);
        assert!(by("bitsnap") >= by("xor") * 0.95);
        assert_eq!(r.roles.len(), 4);
        assert!(r.roles.iter().all(|r| r.max_rel_l2.is_none()));
        let json = serde_json::to_string(&r).unwrap();
        assert!(json.contains("\"changed_fraction\""));
    }

    #[test]
    fn generator_is_deterministic() {
        let a: Vec<_> = Synthetic::default().with_scale(0.002).steps().collect();
        let b: Vec<_> = Synthetic::default().with_scale(0.002).steps().collect();
        assert_eq!(a, b);
        let c: Vec<_> = Synthetic::default()
            .with_scale(0.002)
            .with_seed(7)
            .steps()
            .collect();
        assert_ne!(a, c);
    }

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
