//! The fuzz targets' bodies (`fuzz/src/lib.rs`) on stable, without libFuzzer: each runs
//! over its committed seed corpus, the seeds the real encoders generate now, every
//! persisted crash in `fuzz/regressions/`, and a few thousand deterministic mutations.
//! `scripts/fuzz.sh` runs the same bodies under libFuzzer for longer.
//!
//! `BITSNAP_FUZZ_SMOKE_ITERS` sets the mutations per target (default 2000);
//! `BITSNAP_BLESS_FUZZ_SEEDS=1` rewrites `fuzz/corpus/<target>/seed-*` from the
//! generated seeds.

#[path = "../../fuzz/src/lib.rs"]
#[allow(dead_code)] // the libFuzzer entry points
mod targets;

use std::path::{Path, PathBuf};

use targets::{Scratch, TARGETS};

/// The allocation bound of the fuzz bodies, checked here as libFuzzer's
/// `-malloc_limit_mb` checks it: they decode at most 8 MiB per tensor (larger declared
/// tensors, up to 2^34 elements, are only checked), so no single allocation in this test
/// binary may reach 64 MiB.
const MAX_ALLOC: usize = 64 << 20;

#[path = "common/largest_alloc.rs"]
mod largest_alloc;
use largest_alloc::Largest;

#[global_allocator]
static ALLOCATOR: Largest = Largest;

fn assert_allocations_bounded(what: &str) {
    let largest = largest_alloc::largest();
    assert!(
        largest < MAX_ALLOC,
        "{what}: an allocation of {largest} bytes, above the fuzz bound of {MAX_ALLOC}"
    );
}

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz")
}

fn files_in(dir: &Path) -> Vec<Vec<u8>> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    paths.sort();
    paths
        .iter()
        .filter(|p| p.is_file())
        .map(|p| std::fs::read(p).unwrap())
        .collect()
}

/// A xorshift stream: deterministic mutations, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// One to four libFuzzer-style edits: bit flips, interesting bytes and words, cuts,
/// duplicated and inserted ranges, and splices of two inputs.
fn mutate(rng: &mut Rng, input: &[u8], other: &[u8]) -> Vec<u8> {
    let mut out = input.to_vec();
    for _ in 0..1 + rng.below(4) {
        let len = out.len();
        match rng.below(8) {
            0 if len > 0 => {
                let i = rng.below(len);
                out[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                out[i] = [0, 1, 0x7f, 0x80, 0xff, 4, 16][rng.below(7)];
            }
            2 if len >= 4 => {
                let i = rng.below(len - 3);
                let v: u32 = [0, 1, u32::MAX, 1 << 20, 1 << 26, 0x8000_0000, 3][rng.below(7)];
                out[i..i + 4].copy_from_slice(&v.to_le_bytes());
            }
            3 => out.truncate(rng.below(len + 1)),
            4 if len > 0 => {
                let a = rng.below(len);
                let b = (a + 1 + rng.below(64)).min(len);
                let piece = out[a..b].to_vec();
                let at = rng.below(len + 1);
                out.splice(at..at, piece);
            }
            5 => {
                let at = rng.below(len + 1);
                let n = 1 + rng.below(16);
                let bytes: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
                out.splice(at..at, bytes);
            }
            6 if len > 0 => {
                let a = rng.below(len);
                let b = (a + 1 + rng.below(256)).min(len);
                out.drain(a..b);
            }
            _ => {
                let cut = rng.below(len + 1);
                let from = rng.below(other.len() + 1);
                out.truncate(cut);
                out.extend_from_slice(&other[from..]);
            }
        }
    }
    out
}

/// For the decoder targets (input `[head][count u32][payload]`, see
/// `targets::decode`): declares a larger tensor, scaling the count by a shift of 1 to 15
/// in the head's high nibble or setting a large count, so that mutations reach declared
/// sizes of up to 2^34 elements, far past what may be allocated.
fn declare_large(rng: &mut Rng, input: &mut [u8]) {
    if input.len() < 5 {
        return;
    }
    if rng.below(2) == 0 {
        input[0] = (input[0] & 0x0f) | ((1 + rng.below(15) as u8) << 4);
    } else {
        let count: u32 = [1 << 26, 1 << 30, (1 << 26) + 1, u32::MAX, 3 << 28][rng.below(5)];
        input[1..5].copy_from_slice(&count.to_le_bytes());
    }
}

fn smoke(target: &str) {
    let iters: usize = std::env::var("BITSNAP_FUZZ_SMOKE_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    let scratch = Scratch::new();
    let generated = targets::seeds(target);
    assert!(!generated.is_empty(), "{target}: no seeds generated");
    let corpus_dir = fuzz_dir().join("corpus").join(target);
    if std::env::var_os("BITSNAP_BLESS_FUZZ_SEEDS").is_some() {
        std::fs::create_dir_all(&corpus_dir).unwrap();
        for old in std::fs::read_dir(&corpus_dir).unwrap() {
            let old = old.unwrap().path();
            if old
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("seed-"))
            {
                std::fs::remove_file(old).unwrap();
            }
        }
        for (i, s) in generated.iter().enumerate() {
            std::fs::write(corpus_dir.join(format!("seed-{i:02}")), s).unwrap();
        }
    }
    let committed = files_in(&corpus_dir);
    assert!(
        !committed.is_empty(),
        "{target}: no seed corpus in {} (BITSNAP_BLESS_FUZZ_SEEDS=1 writes it)",
        corpus_dir.display()
    );
    let regressions = files_in(&fuzz_dir().join("regressions").join(target));
    let mut pool: Vec<Vec<u8>> = generated;
    pool.extend(committed);
    pool.extend(regressions);
    for input in &pool {
        targets::run(target, &scratch, input);
    }
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ target.len() as u64);
    for _ in 0..iters {
        let a = &pool[rng.below(pool.len())];
        let b = &pool[rng.below(pool.len())];
        let mut input = mutate(&mut rng, a, b);
        if target.starts_with("decode_") && rng.below(4) == 0 {
            declare_large(&mut rng, &mut input);
        }
        targets::run(target, &scratch, &input);
    }
    assert_allocations_bounded(target);
}

fn regression(target: &str, name: &str) {
    let path = fuzz_dir().join("regressions").join(target).join(name);
    let input = std::fs::read(&path).unwrap();
    targets::run(target, &Scratch::new(), &input);
    assert_allocations_bounded(name);
}

/// Fuzz finding (snapshot_header, out-of-memory): a 256-byte input whose compressed
/// header region declared 256 MiB made `decode_header_region` allocate all of it before
/// decompressing a frame that could not fill it. Now the buffer grows as it decodes.
#[test]
fn regression_compressed_header_declaring_256_mib_is_not_preallocated() {
    regression("snapshot_header", "compressed-header-declares-256mib");
}

/// Decode amplification (#14.3): a few KiB of constant-plane chunks validly declare
/// 2^34 elements (16 to 128 GiB). Before the bodies declared more than 2^20 elements this
/// class was out of the fuzzers' reach; now each decoder target gets such inputs, which
/// must pass the structure check, be refused by the byte budget, and allocate nothing
/// near their size, and broken variants of them must be refused before allocating.
#[test]
fn regression_tiny_payloads_declaring_huge_tensors_are_not_allocated() {
    use bitsnap_core::DType;
    use bitsnap_core::codec::{self, CodecId};
    let scratch = Scratch::new();
    for (target, id) in [
        ("decode_planes", CodecId::Planes),
        ("decode_xor", CodecId::XorDelta),
        ("decode_intdelta", CodecId::IntDelta),
        ("decode_grouped", CodecId::GroupedDelta),
        ("decode_bitmask", CodecId::BitmaskDelta),
        ("decode_cluster", CodecId::Cluster),
        ("decode_residual", CodecId::ClusterResidual),
    ] {
        for dtype in [DType::F32, DType::F64, DType::BF16] {
            let input = targets::amplified(id, dtype, 1 << 30, 4);
            assert!(input.len() < 16 << 10, "{target}: {} bytes", input.len());
            let numel = 1usize << 34;
            codec::check(id, &input[5..], dtype, numel).unwrap();
            targets::run(target, &scratch, &input);
            // Another constant byte: still valid. One byte short: the chunk lengths no
            // longer tile the payload, refused before allocating.
            let mut broken = input.clone();
            let last = broken.len() - 1;
            broken[last] ^= 0xff;
            targets::run(target, &scratch, &broken);
            broken.truncate(last);
            assert!(codec::check(id, &broken[5..], dtype, numel).is_err());
            targets::run(target, &scratch, &broken);
        }
    }
    assert_allocations_bounded("amplified payloads");
}

#[test]
fn every_target_has_a_smoke_test() {
    let names = [
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
    assert_eq!(TARGETS, names);
    for t in TARGETS {
        assert!(
            fuzz_dir().join(format!("fuzz_targets/{t}.rs")).is_file(),
            "{t}: no libFuzzer entry point"
        );
    }
}

#[test]
fn smoke_snapshot_header() {
    smoke("snapshot_header");
}

#[test]
fn smoke_decode_planes() {
    smoke("decode_planes");
}

#[test]
fn smoke_decode_xor() {
    smoke("decode_xor");
}

#[test]
fn smoke_decode_intdelta() {
    smoke("decode_intdelta");
}

#[test]
fn smoke_decode_grouped() {
    smoke("decode_grouped");
}

#[test]
fn smoke_decode_reference() {
    smoke("decode_reference");
}

#[test]
fn smoke_decode_replay() {
    smoke("decode_replay");
}

#[test]
fn smoke_decode_bitmask() {
    smoke("decode_bitmask");
}

#[test]
fn smoke_decode_cluster() {
    smoke("decode_cluster");
}

#[test]
fn smoke_decode_residual() {
    smoke("decode_residual");
}

#[test]
fn smoke_manifest() {
    smoke("manifest");
}

#[test]
fn smoke_safetensors() {
    smoke("safetensors");
}
