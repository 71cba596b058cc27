//! Fuzz target bodies for bitsnap's parsers and decoders, shared by the libFuzzer
//! targets in `fuzz_targets/` (run by `scripts/fuzz.sh`) and by the stable smoke test
//! `bitsnap-core/tests/fuzz_smoke.rs`, which runs them over the seeds below and a few
//! thousand mutations of them without libFuzzer.
//!
//! Every body feeds untrusted bytes to public bitsnap-core entry points and asserts only
//! what must hold for any input: no panic, no hang, and results that are consistent
//! (a parsed header re-encodes to itself; a decode into a dirty buffer gives what a
//! decode into a fresh one gives). Checksums would stop most mutations at the door, so
//! the bodies recompute them where the structure behind them is the target.
//!
//! Allocation bound: a decoder checks a payload's structure (`codec::check`) before it
//! allocates the tensor size its caller declares, and allocates fallibly. The decoder
//! bodies declare up to [`MAX_FUZZ_ELEMS`] (2^34) elements, far more than memory holds,
//! so that a decoder which allocates before checking is caught: under `scripts/fuzz.sh`
//! (`-malloc_limit_mb=256`) any larger allocation is reported as a crash, and
//! `bitsnap-core/tests/fuzz_smoke.rs` fails any allocation of 64 MiB. A payload whose
//! structure can validly fill a huge tensor (a few KiB of constant-plane chunks declare
//! tens of GiB) is then refused by a byte budget, [`MAX_FUZZ_BYTES`] per tensor, which
//! stands in for the snapshot reader's decoded-size budget: over it the body only checks
//! the structure, and decodes only to confirm that what the check refuses is refused
//! before anything is allocated.

use std::path::{Path, PathBuf};

use bitsnap_core::codec::{self, Codec, CodecId, EncodeInput};
use bitsnap_core::format::{self, Header, SnapshotFile};
use bitsnap_core::{DType, Error, Lossiness, MANIFEST_FILE, Policy, Role, Store, Tensor};
use xxhash_rust::xxh3::xxh3_64;

/// Most elements a decoder input may declare for one tensor (2^34: 128 GiB of f64, what
/// about 13 KiB of constant-plane chunks can validly declare).
pub const MAX_FUZZ_ELEMS: u64 = 1 << 34;
/// Most decoded bytes of a tensor a body decodes (8 MiB): the per-target stand-in for
/// the snapshot reader's decoded-size budget. Larger tensors are only checked.
pub const MAX_FUZZ_BYTES: u64 = 8 << 20;

/// The fuzz targets, by name (the names of `fuzz_targets/*.rs` and `corpus/*`).
pub const TARGETS: [&str; 12] = [
    "snapshot_header",
    "decode_planes",
    "decode_xor",
    "decode_intdelta",
    "decode_grouped",
    "decode_reference",
    "decode_replay",
    "decode_bitmask",
    "decode_cluster",
    "decode_residual",
    "manifest",
    "safetensors",
];

/// A deterministic base tensor of `len` bytes (delta decoders need one), at most
/// [`MAX_FUZZ_BYTES`].
pub fn base_bytes(len: usize) -> &'static [u8] {
    static BASE: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    let base = BASE.get_or_init(|| {
        (0..MAX_FUZZ_BYTES as usize)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 7) as u8)
            .collect()
    });
    &base[..len.min(base.len())]
}

/// Decoder input: `[head][element count, u32 LE][payload]`. The low nibble of `head` is
/// the dtype tag, the high nibble a shift: the tensor declares `count << shift` elements,
/// reduced modulo [`MAX_FUZZ_ELEMS`] + 1 (a head below 16 declares `count` elements).
///
/// What must hold: [`codec::check`] refuses whatever [`codec::decode`] refuses before
/// allocating the output (the same error), and never allocates for the declared size;
/// within [`MAX_FUZZ_BYTES`], decoding succeeds only where the check passed, a decode
/// into a dirty buffer gives what a fresh decode gives, and the device form finished on
/// the CPU equals the CPU decode.
pub fn decode(codec: CodecId, data: &[u8]) -> Option<Vec<u8>> {
    let (&head, rest) = data.split_first()?;
    let (count, payload) = rest.split_first_chunk::<4>()?;
    let dtype = DType::from_tag(head & 0x0f)?;
    let declared = u64::from(u32::from_le_bytes(*count)) << (head >> 4);
    let numel = usize::try_from(declared % (MAX_FUZZ_ELEMS + 1)).ok()?;
    let bytes = numel as u64 * dtype.size() as u64;
    let checked = codec::check(codec, payload, dtype, numel);
    if let Err(e) = &checked {
        assert!(e.alloc.is_none(), "the check allocated: {e}");
        assert!(
            e.offset <= payload.len(),
            "error offset {} past the payload",
            e.offset
        );
        // Refused before anything is allocated for the tensor, at any declared size (no
        // base: a delta decoder checks the payload before the base).
        match codec::decode(codec, payload, dtype, numel, None) {
            Err(again) => assert!(
                again == *e,
                "decode refused with {again}, the check with {e}"
            ),
            Ok(_) => panic!("decode accepted what the check refused: {e}"),
        }
    }
    if bytes > MAX_FUZZ_BYTES {
        // Over the budget: a snapshot reader refuses this tensor before decoding it.
        return None;
    }
    let len = numel * dtype.size();
    let base = codec.needs_base().then(|| base_bytes(len));
    let fresh = codec::decode(codec, payload, dtype, numel, base);
    // No output leak: decoding into a dirty buffer gives the same answer.
    let mut dirty = vec![0xa5u8; len];
    let into = codec::decode_into(codec, payload, dtype, base, &mut dirty);
    match &fresh {
        Ok(out) => {
            assert!(checked.is_ok(), "decode accepted what the check refused");
            assert_eq!(out.len(), len, "decoded length");
            assert!(into.is_ok(), "decode_into refused what decode accepted");
            assert!(dirty == *out, "decode_into differs from decode");
            match codec::decode_for_device(codec, payload, dtype, numel) {
                // Residual codebooks and grouped deltas have no device form: hosts
                // decode them.
                Err(e) if matches!(codec, CodecId::ClusterResidual | CodecId::GroupedDelta) => {
                    assert!(e.reason.contains("no device form"), "{e}")
                }
                Ok(form) => match codec::apply_device_form(&form, dtype, numel, base, None) {
                    Ok(done) => assert!(done == *out, "device form differs from decode"),
                    Err(e) => panic!("a device form of a valid payload is refused: {e}"),
                },
                Err(e) => panic!("decode_for_device refused what decode accepted: {e}"),
            }
        }
        Err(e) => assert!(
            e.offset <= payload.len(),
            "error offset {} past the payload",
            e.offset
        ),
    }
    fresh.ok()
}

/// A payload of codec `codec` that is structurally valid for `numel` elements of
/// `dtype` (a `count` of `numel >> shift` with the given `shift`) and tiny: chunks of
/// [`codec::MAX_CHUNK_BYTES`] elements whose planes are all constant, so that it
/// declares far more than the budget. Returns the decoder input (head, count, payload).
pub fn amplified(codec: CodecId, dtype: DType, count: u32, shift: u8) -> Vec<u8> {
    let numel = (u64::from(count) << shift) as usize;
    let w = dtype.size();
    let mut payload = Vec::new();
    let (elems, width) = match codec {
        CodecId::Cluster | CodecId::ClusterResidual => {
            let transform = u8::from(codec == CodecId::ClusterResidual) * 3;
            payload.extend_from_slice(&[8, transform, 0, 0]);
            payload.extend_from_slice(&1u32.to_le_bytes());
            payload.extend(std::iter::repeat_n(0u8, w));
            (numel, 1)
        }
        _ => (numel, w),
    };
    let per = codec::MAX_CHUNK_BYTES;
    let chunks = elems.div_ceil(per);
    let body = |n: usize| {
        let mut b = Vec::new();
        if codec == CodecId::BitmaskDelta {
            b.extend_from_slice(&(n as u32).to_le_bytes());
            b.push(4); // every element changed: no mask bytes
            b.extend_from_slice(&0u32.to_le_bytes());
        }
        for _ in 0..width {
            b.push(2); // a constant plane
            b.extend_from_slice(&1u32.to_le_bytes());
            b.push(0x3c);
        }
        b
    };
    payload.extend_from_slice(&(per as u32).to_le_bytes());
    payload.extend_from_slice(&(chunks as u32).to_le_bytes());
    let bodies: Vec<Vec<u8>> = (0..chunks)
        .map(|c| body(per.min(elems - c * per)))
        .collect();
    for b in &bodies {
        payload.extend_from_slice(&(b.len() as u32).to_le_bytes());
    }
    bodies.iter().for_each(|b| payload.extend_from_slice(b));
    let mut input = vec![dtype.tag() | (shift << 4)];
    input.extend_from_slice(&count.to_le_bytes());
    input.extend_from_slice(&payload);
    input
}

const FUZZ_FILE: &str = "fuzz.bsnap";

/// Snapshot input: `[header region length, u32 LE][header region][data section]`.
///
/// The whole input is also tried as a snapshot file and as a header body. A header that
/// parses is then laid out over the data section as a writer would lay it out, with
/// matching checksums, opened, and every tensor decoded (against a generated base).
pub fn snapshot_header(data: &[u8]) {
    let path = Path::new(FUZZ_FILE);
    let _ = SnapshotFile::from_bytes(data.to_vec(), path);
    let _ = Header::parse(data, path, 0);
    let Some((len, rest)) = data.split_first_chunk::<4>() else {
        return;
    };
    let len = (u32::from_le_bytes(*len) as usize).min(rest.len());
    let (region, mut section) = rest.split_at(len);
    let Ok(body) = format::decode_header_region(region, path, 0) else {
        return;
    };
    let Ok(mut header) = Header::parse(&body, path, 0) else {
        return;
    };
    // What parses re-encodes to itself.
    let encoded = header.encode();
    match Header::parse(&encoded, path, 0) {
        Ok(again) => assert!(again.encode() == encoded, "header round trip differs"),
        Err(e) => panic!("a parsed header, re-encoded, is refused: {e}"),
    }
    let mut file = Vec::with_capacity(data.len() + 64);
    file.extend_from_slice(&format::MAGIC);
    file.extend_from_slice(&format::VERSION.to_le_bytes());
    file.extend_from_slice(&[0; 6]);
    for e in &mut header.entries {
        let n = usize::try_from(e.len)
            .unwrap_or(usize::MAX)
            .min(section.len());
        let (payload, tail) = section.split_at(n);
        section = tail;
        e.offset = file.len() as u64;
        e.len = n as u64;
        e.payload_hash = xxh3_64(payload);
        file.extend_from_slice(payload);
    }
    let h_at = file.len() as u64;
    let region = format::encode_header_region(&header.encode());
    file.extend_from_slice(&region);
    file.extend_from_slice(&h_at.to_le_bytes());
    file.extend_from_slice(&(region.len() as u64).to_le_bytes());
    file.extend_from_slice(&xxh3_64(&region).to_le_bytes());
    file.extend_from_slice(&format::END_MAGIC);
    let snap = match SnapshotFile::from_bytes(file, path) {
        Ok(s) => s,
        Err(e) => panic!("a well-formed file is refused: {e}"),
    };
    // Any element count the header allows (up to MAX_TENSOR_BYTES) goes through the
    // decode budget the stores apply, which refuses it before anything is decoded.
    if bitsnap_core::check_decode_budget(&snap.header, 0, MAX_FUZZ_BYTES, path).is_err() {
        return;
    }
    for e in &snap.header.entries {
        let _ = snap.decode(e, Some(base_bytes(e.raw_len() as usize)));
        let _ = snap.decode(e, None);
    }
}

/// A scratch directory for the bodies that read files: a small real store (whose
/// snapshot files a fuzzed manifest may list) and a file for safetensors input.
#[derive(Debug)]
pub struct Scratch {
    dir: tempfile::TempDir,
}

impl Scratch {
    /// Creates the directory and writes the fixture store into `store/`.
    pub fn new() -> Scratch {
        let dir = match tempfile::tempdir() {
            Ok(d) => d,
            Err(e) => panic!("fuzz scratch directory: {e}"),
        };
        let store = dir.path().join("store");
        if let Err(e) = fixture_store(&store, |_| {}) {
            panic!("fuzz fixture store: {e}");
        }
        Scratch { dir }
    }

    fn store(&self) -> PathBuf {
        self.dir.path().join("store")
    }

    /// Manifest input: the bytes of a `MANIFEST`, opened as the fixture store's manifest.
    /// A wrong checksum is put right once, so that what it guards is fuzzed too.
    pub fn manifest(&self, data: &[u8]) {
        let dir = self.store();
        let path = dir.join(MANIFEST_FILE);
        if std::fs::write(&path, data).is_err() {
            return;
        }
        let store = match Store::open(&dir) {
            Ok(s) => s,
            Err(Error::Checksum {
                what: "manifest",
                actual,
                ..
            }) => {
                let Some(fixed) = with_checksum(data, actual) else {
                    return;
                };
                if std::fs::write(&path, fixed).is_err() {
                    return;
                }
                match Store::open(&dir) {
                    Ok(s) => s,
                    Err(_) => return,
                }
            }
            Err(_) => return,
        };
        let ids: Vec<u64> = store.snapshots().iter().map(|s| s.id).collect();
        for id in ids {
            let _ = store.header(id);
            let _ = store.load(id);
        }
        let _ = store.verify();
        let _ = store.latest().map(|s| store.latest_in(&s.series));
    }

    /// Safetensors input: a whole file, indexed and read.
    pub fn safetensors(&self, data: &[u8]) {
        let path = self.dir.path().join("input.safetensors");
        if std::fs::write(&path, data).is_err() {
            return;
        }
        let index = bitsnap_core::safetensors::read_index(&path);
        let read = bitsnap_core::safetensors::read_file(&path, |_| None);
        match (&index, &read) {
            (Ok(index), Ok((tensors, metadata))) => {
                assert_eq!(index.tensors.len(), tensors.len(), "index and read differ");
                assert!(*metadata == index.metadata, "metadata differs");
            }
            (Err(_), Err(_)) => {}
            _ => panic!("read_index and read_file disagree on whether the file is valid"),
        }
    }
}

impl Default for Scratch {
    fn default() -> Self {
        Scratch::new()
    }
}

/// `manifest` with its `checksum` field replaced by `checksum`, if it is a JSON object.
fn with_checksum(manifest: &[u8], checksum: u64) -> Option<Vec<u8>> {
    let mut v: serde_json::Value = serde_json::from_slice(manifest).ok()?;
    v.as_object_mut()?.insert(
        "checksum".into(),
        serde_json::Value::String(format!("{checksum:016x}")),
    );
    serde_json::to_vec(&v).ok()
}

fn scratch() -> &'static Scratch {
    static SCRATCH: std::sync::OnceLock<Scratch> = std::sync::OnceLock::new();
    SCRATCH.get_or_init(Scratch::new)
}

/// [`Scratch::manifest`] in a process-wide scratch directory (libFuzzer entry).
pub fn manifest(data: &[u8]) {
    scratch().manifest(data);
}

/// [`Scratch::safetensors`] in a process-wide scratch directory (libFuzzer entry).
pub fn safetensors(data: &[u8]) {
    scratch().safetensors(data);
}

/// A small tensor set that changes a little with `step`.
fn fixture_tensors(step: u64) -> Result<Vec<Tensor>, Error> {
    let w: Vec<f32> = (0..512)
        .map(|i| ((i as f32) * 0.01).sin() + if i as u64 % 97 == step { 1.0 } else { 0.0 })
        .collect();
    let m: Vec<f32> = (0..256)
        .map(|i| 1e-6 * (1 + (i + step) % 13) as f32)
        .collect();
    let b: Vec<u8> = (0..64u32)
        .flat_map(|i| half::bf16::from_f32(i as f32 * 0.5).to_le_bytes())
        .collect();
    Ok(vec![
        Tensor::from_f32("layer.weight", &[16, 32], Role::Weight, &w)?,
        Tensor::from_f32(
            "layer.weight.moment_2",
            &[256],
            Role::OptimizerMoment(2),
            &m,
        )?,
        Tensor::new("layer.bias", DType::BF16, vec![64], Role::Weight, b)?,
        Tensor::new(
            "step",
            DType::I64,
            vec![],
            Role::Other,
            step.to_le_bytes().to_vec(),
        )?,
    ])
}

/// Writes a small store to `dir`: full and delta snapshots, two series, metadata, a
/// lossy optimizer moment, a delete that rebases. Calls `each_manifest` with the
/// manifest after every change.
pub fn fixture_store(dir: &Path, mut each_manifest: impl FnMut(Vec<u8>)) -> Result<(), Error> {
    let policy = Policy::default()
        .with_full_every(3)
        .with_lossiness(Lossiness::LossyOptimizer {
            bits: codec::QuantBits::B4,
        });
    let mut store = Store::open_or_create(dir, policy)?;
    let manifest = |m: &mut dyn FnMut(Vec<u8>)| {
        if let Ok(b) = std::fs::read(dir.join(MANIFEST_FILE)) {
            m(b);
        }
    };
    for step in 0..4 {
        let meta = vec![("step".to_string(), step.to_string())];
        store.save_with_metadata(&format!("step-{step}"), fixture_tensors(step)?, meta)?;
        manifest(&mut each_manifest);
    }
    store.save_in("optim", "o-0", fixture_tensors(9)?, Vec::new())?;
    manifest(&mut each_manifest);
    store.delete(2)?;
    manifest(&mut each_manifest);
    Ok(())
}

/// Seed inputs for `target`, generated by the real encoders and writers.
pub fn seeds(target: &str) -> Vec<Vec<u8>> {
    match target {
        "snapshot_header" => snapshot_seeds(),
        "decode_planes" => codec_seeds(CodecId::Planes),
        "decode_xor" => codec_seeds(CodecId::XorDelta),
        "decode_intdelta" => codec_seeds(CodecId::IntDelta),
        "decode_grouped" => codec_seeds(CodecId::GroupedDelta),
        "decode_reference" => reference_seeds(),
        "decode_replay" => replay_seeds(),
        "decode_bitmask" => codec_seeds(CodecId::BitmaskDelta),
        "decode_cluster" => codec_seeds(CodecId::Cluster),
        "decode_residual" => codec_seeds(CodecId::ClusterResidual),
        "manifest" => {
            let mut out = Vec::new();
            if let Ok(dir) = tempfile::tempdir() {
                let _ = fixture_store(dir.path(), |m| out.push(m));
            }
            out
        }
        "safetensors" => safetensors_seeds(),
        _ => Vec::new(),
    }
}

/// Runs the body of `target` on `data` (the libFuzzer targets call the same bodies).
pub fn run(target: &str, scratch: &Scratch, data: &[u8]) {
    match target {
        "snapshot_header" => snapshot_header(data),
        "decode_planes" => {
            let _ = decode(CodecId::Planes, data);
        }
        "decode_xor" => {
            let _ = decode(CodecId::XorDelta, data);
        }
        "decode_intdelta" => {
            let _ = decode(CodecId::IntDelta, data);
        }
        "decode_grouped" => {
            let _ = decode(CodecId::GroupedDelta, data);
        }
        "decode_reference" => {
            let _ = decode_reference(data);
        }
        "decode_replay" => {
            let _ = decode_replay(data);
        }
        "decode_bitmask" => {
            let _ = decode(CodecId::BitmaskDelta, data);
        }
        "decode_cluster" => {
            let _ = decode(CodecId::Cluster, data);
        }
        "decode_residual" => {
            let _ = decode(CodecId::ClusterResidual, data);
        }
        "manifest" => scratch.manifest(data),
        "safetensors" => scratch.safetensors(data),
        other => panic!("no fuzz target `{other}`"),
    }
}

/// The optimizer-replay decoder on `data`: a head byte (high nibble: a shift of the
/// count), a u32 element count, then the payload; the base tensor and both references
/// are deterministic f32 tensors of that many elements (three different windows of
/// [`base_bytes`]). As for the other decoders, the structure check runs at any declared
/// size and must refuse before allocating; only tensors within [`MAX_FUZZ_BYTES`] / 4
/// are decoded.
pub fn decode_replay(data: &[u8]) -> Option<Vec<u8>> {
    let (&head, rest) = data.split_first()?;
    let (count, payload) = rest.split_first_chunk::<4>()?;
    let declared = u64::from(u32::from_le_bytes(*count)) << (head >> 4);
    let numel = usize::try_from(declared % (MAX_FUZZ_ELEMS + 1)).ok()?;
    let checked = codec::check(CodecId::Replay, payload, DType::F32, numel);
    if let Err(e) = &checked {
        assert!(e.alloc.is_none(), "the check allocated: {e}");
        assert!(
            e.offset <= payload.len(),
            "error offset {} past the payload",
            e.offset
        );
    }
    let len = numel as u64 * 4;
    if len * 4 > MAX_FUZZ_BYTES {
        return None;
    }
    let all = base_bytes(len as usize * 3);
    let (base, rest) = all.split_at(len as usize);
    let (a, b) = rest.split_at(len as usize);
    let refs = [(DType::F32, a), (DType::F32, b)];
    let out = codec::decode_with_references(
        CodecId::Replay,
        payload,
        DType::F32,
        numel,
        Some(base),
        &refs,
    );
    match (&out, &checked) {
        (Ok(o), Ok(())) => assert_eq!(o.len(), numel * 4, "decoded length"),
        (Ok(_), Err(e)) => panic!("decode accepted what the check refused: {e}"),
        (Err(e), Err(c)) => assert!(e == c, "decode refused with {e}, the check with {c}"),
        (Err(e), Ok(())) => assert!(
            e.offset <= payload.len(),
            "error offset {} past the payload",
            e.offset
        ),
    }
    // A replay payload is refused by the plain decoder and without its base.
    assert!(codec::decode(CodecId::Replay, payload, DType::F32, numel, Some(base)).is_err());
    assert!(
        codec::decode_with_references(CodecId::Replay, payload, DType::F32, numel, None, &refs)
            .is_err()
    );
    out.ok()
}

fn replay_seeds() -> Vec<Vec<u8>> {
    use codec::{Predictor, Replay};
    let mut out = Vec::new();
    for (i, numel) in [0usize, 1, 3000, 50_000, 1 << 18].into_iter().enumerate() {
        let len = numel * 4;
        let all = base_bytes(len * 3);
        if all.len() < len * 3 {
            continue;
        }
        let (base, rest) = all.split_at(len);
        let (a, b) = rest.split_at(len);
        let p = Predictor::ALL[i * 2 % Predictor::ALL.len()];
        let r = Replay::new(p, &[0.9, 0.1, 0.95, 0.05, 1e-3, 0.0]);
        // The prediction itself, with a few elements off.
        let mut actual = vec![0u8; len];
        r.predict_into(base, a, b, &mut actual);
        for j in (0..actual.len()).step_by(4 * 97) {
            actual[j] ^= 0x01;
        }
        let Ok(Some(payload)) = codec::replay::encode(&r, &actual, base, a, b, 1) else {
            continue;
        };
        let mut seed = vec![0u8];
        seed.extend_from_slice(&(numel as u32).to_le_bytes());
        seed.extend_from_slice(&payload);
        if seed.len() <= 64 << 10 {
            out.push(seed);
        }
    }
    out
}

/// The reference decoders (`cast`, `identical`) on `data`: a head byte (bit 0: bf16 or
/// f16; bit 1: `identical` instead of `cast`; high nibble: a shift of the count), a u32
/// element count, then the payload. The referenced tensor is f32 for a cast, the tensor's
/// own dtype for `identical`, [`base_bytes`] either way. As in [`decode`], the structure
/// check runs at any declared size and must refuse before allocating; only tensors
/// within [`MAX_FUZZ_BYTES`] are decoded.
pub fn decode_reference(data: &[u8]) -> Option<Vec<u8>> {
    let (&head, rest) = data.split_first()?;
    let (count, payload) = rest.split_first_chunk::<4>()?;
    let dtype = if head & 1 == 0 {
        DType::BF16
    } else {
        DType::F16
    };
    let (codec, ref_dtype) = if head & 2 == 0 {
        (CodecId::Cast, DType::F32)
    } else {
        (CodecId::Identical, dtype)
    };
    let declared = u64::from(u32::from_le_bytes(*count)) << (head >> 4);
    let numel = usize::try_from(declared % (MAX_FUZZ_ELEMS + 1)).ok()?;
    let checked = codec::check(codec, payload, dtype, numel);
    if let Err(e) = &checked {
        assert!(e.alloc.is_none(), "the check allocated: {e}");
        assert!(
            e.offset <= payload.len(),
            "error offset {} past the payload",
            e.offset
        );
    }
    let ref_bytes = numel as u64 * ref_dtype.size() as u64;
    if ref_bytes > MAX_FUZZ_BYTES {
        return None;
    }
    let reference = base_bytes(ref_bytes as usize);
    let out = codec::decode_with_reference(codec, payload, dtype, numel, ref_dtype, reference);
    match (&out, &checked) {
        (Ok(o), Ok(())) => assert_eq!(o.len(), numel * dtype.size(), "decoded length"),
        (Ok(_), Err(e)) => panic!("decode accepted what the check refused: {e}"),
        (Err(e), Err(c)) => assert!(e == c, "decode refused with {e}, the check with {c}"),
        (Err(e), Ok(())) => assert!(
            e.offset <= payload.len(),
            "error offset {} past the payload",
            e.offset
        ),
    }
    // The codecs do not mix: a reference payload is refused by the plain decoder.
    assert!(codec::decode(codec, payload, dtype, numel, Some(reference)).is_err());
    out.ok()
}

fn reference_seeds() -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for (head, numel, every) in [
        (0u8, 0usize, 1usize),
        (0, 1, 1),
        (0, 3000, 37),
        (1, 5000, 3),
        (0, 1 << 19, 1000),
        (1, 700, 1),
    ] {
        let dtype = if head & 1 == 0 {
            DType::BF16
        } else {
            DType::F16
        };
        let source = base_bytes(numel * 4);
        // The exact cast: what a payload without exceptions decodes to.
        let mut empty = vec![codec::cast::CAST_RULE_RNE];
        empty.extend_from_slice(&[0u8; 16]);
        let Ok(mut data) =
            codec::decode_with_reference(CodecId::Cast, &empty, dtype, numel, DType::F32, source)
        else {
            continue;
        };
        for i in (0..data.len()).step_by(2 * every) {
            data[i] ^= 0x01;
        }
        let Ok(Some(e)) = codec::CastOf::default().encode(dtype, &data, DType::F32, source) else {
            continue;
        };
        let mut seed = vec![head];
        seed.extend_from_slice(&(numel as u32).to_le_bytes());
        seed.extend_from_slice(&e.payload);
        if seed.len() <= 64 << 10 {
            out.push(seed);
        }
    }
    // `identical`: the empty payload, small and huge.
    for (head, count, shift) in [(2u8, 1000u32, 0u8), (3, 1 << 30, 4)] {
        let mut seed = vec![head | (shift << 4)];
        seed.extend_from_slice(&count.to_le_bytes());
        out.push(seed);
    }
    // A cast declaring a huge tensor with a huge exception count.
    let mut seed = vec![4 << 4];
    seed.extend_from_slice(&(1u32 << 30).to_le_bytes());
    seed.push(codec::cast::CAST_RULE_RNE);
    seed.extend_from_slice(&(1u64 << 34).to_le_bytes());
    seed.extend_from_slice(&[0u8; 8]);
    out.push(seed);
    out
}

fn codec_seeds(id: CodecId) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let shapes: [(DType, usize); 6] = [
        (DType::F32, 0),
        (DType::F32, 1),
        (DType::BF16, 77),
        (DType::F32, 3000),
        (DType::F64, 500),
        // Two chunks, compressible: a small file.
        (DType::U8, (1 << 20) + 5000),
    ];
    for (dtype, numel) in shapes {
        let base = base_bytes(numel * dtype.size()).to_vec();
        let mut data: Vec<u8> = match dtype {
            DType::F32 => (0..numel)
                .flat_map(|i| (1e-3 * (i % 50) as f32).to_le_bytes())
                .collect(),
            DType::U8 => base.clone(),
            _ => base.iter().map(|b| b & 0x3f).collect(),
        };
        for i in (0..data.len()).step_by(37) {
            data[i] ^= 0x10;
        }
        let input = EncodeInput {
            shape: &[],
            dtype,
            role: Role::OptimizerMoment(2),
            data: &data,
            base: Some(&base),
        };
        let encoders: Vec<Box<dyn Codec>> = match id {
            CodecId::Planes => vec![Box::new(codec::Planes::default())],
            CodecId::XorDelta => vec![Box::new(codec::XorDelta::default())],
            CodecId::IntDelta => vec![Box::new(codec::IntDelta::default())],
            CodecId::GroupedDelta => vec![Box::new(codec::GroupedDelta::default())],
            CodecId::BitmaskDelta => vec![Box::new(codec::BitmaskDelta::default())],
            CodecId::ClusterResidual => codec::QuantBits::ALL
                .into_iter()
                .flat_map(|b| {
                    [codec::ResidualKind::Delta, codec::ResidualKind::Ratio]
                        .map(|k| Box::new(codec::ResidualQuantizer::new(b, k)) as Box<dyn Codec>)
                })
                .collect(),
            _ => codec::QuantBits::ALL
                .into_iter()
                .map(|b| Box::new(codec::ClusterQuantizer::new(b)) as Box<dyn Codec>)
                .collect(),
        };
        for encoder in encoders {
            let Ok(Some(e)) = encoder.encode(&input) else {
                continue;
            };
            let mut seed = vec![dtype.tag()];
            seed.extend_from_slice(&(numel as u32).to_le_bytes());
            seed.extend_from_slice(&e.payload);
            if seed.len() <= 64 << 10 {
                out.push(seed);
            }
        }
    }
    // Codes context-coded (a 2-D tensor whose rows and columns differ in scale).
    if matches!(id, CodecId::Cluster | CodecId::ClusterResidual) {
        let (rows, cols) = (40usize, 64usize);
        let data: Vec<u8> = (0..rows * cols)
            .flat_map(|i| {
                let scale = (1 + i / cols % 5) as f32 * (1 + i % cols % 7) as f32;
                (1e-6 * scale * (1 + i % 3) as f32).to_le_bytes()
            })
            .collect();
        let base: Vec<u8> = data
            .chunks_exact(4)
            .flat_map(|b| (f32::from_le_bytes([b[0], b[1], b[2], b[3]]) * 0.9).to_le_bytes())
            .collect();
        let input = EncodeInput {
            shape: &[rows as u64, cols as u64],
            dtype: DType::F32,
            role: Role::OptimizerMoment(2),
            data: &data,
            base: Some(&base),
        };
        let encoder: Box<dyn Codec> = match id {
            CodecId::Cluster => Box::new(codec::ClusterQuantizer::new(codec::QuantBits::B4)),
            _ => Box::new(codec::ResidualQuantizer::new(
                codec::QuantBits::B4,
                codec::ResidualKind::Ratio,
            )),
        };
        if let Ok(Some(e)) = encoder.encode(&input) {
            let mut seed = vec![DType::F32.tag()];
            seed.extend_from_slice(&((rows * cols) as u32).to_le_bytes());
            seed.extend_from_slice(&e.payload);
            out.push(seed);
        }
    }
    // Tiny payloads that validly declare huge tensors: 2^34 bytes (2^30 << 4), 2^36
    // bytes of f32 and 2^37 of f64, and one just within the budget.
    for (dtype, count, shift) in [
        (DType::U8, 1 << 30, 4),
        (DType::F32, 1 << 30, 4),
        (DType::F64, 1 << 31, 3),
        (DType::BF16, 3 << 20, 0),
    ] {
        if !matches!(id, CodecId::Cluster | CodecId::ClusterResidual)
            || dtype.is_quantizable_float()
        {
            out.push(amplified(id, dtype, count, shift));
        }
    }
    out
}

fn snapshot_seeds() -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let Ok(dir) = tempfile::tempdir() else {
        return out;
    };
    if fixture_store(dir.path(), |_| {}).is_err() {
        return out;
    }
    let Ok(entries) = std::fs::read_dir(dir.path()) else {
        return out;
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "bsnap"))
        .collect();
    files.sort();
    for f in files {
        let Ok(bytes) = std::fs::read(&f) else {
            continue;
        };
        let t_at = bytes.len().saturating_sub(format::TRAILER_BYTES);
        let Some(h_at) = bytes
            .get(t_at..t_at + 8)
            .and_then(|w| w.try_into().ok())
            .map(|w| u64::from_le_bytes(w) as usize)
        else {
            continue;
        };
        let (Some(region), Some(section)) = (
            bytes.get(h_at..t_at),
            bytes.get(format::PREAMBLE_BYTES..h_at),
        ) else {
            continue;
        };
        let mut seed = (region.len() as u32).to_le_bytes().to_vec();
        seed.extend_from_slice(region);
        seed.extend_from_slice(section);
        out.push(seed);
    }
    out
}

fn safetensors_seeds() -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let Ok(dir) = tempfile::tempdir() else {
        return out;
    };
    let path = dir.path().join("seed.safetensors");
    let sets: Vec<(Vec<Tensor>, bitsnap_core::safetensors::Metadata)> = vec![
        (fixture_tensors(1).unwrap_or_default(), Vec::new()),
        (
            fixture_tensors(2)
                .unwrap_or_default()
                .into_iter()
                .take(1)
                .collect(),
            vec![("format".into(), "pt".into())],
        ),
        (Vec::new(), Vec::new()),
    ];
    for (tensors, meta) in sets {
        if bitsnap_core::safetensors::write_file(&path, &tensors, &meta).is_ok()
            && let Ok(b) = std::fs::read(&path)
        {
            out.push(b);
        }
    }
    out
}
