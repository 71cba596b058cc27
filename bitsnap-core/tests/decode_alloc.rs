//! A valid payload of a few hundred bytes can declare a tensor larger than memory (chunks
//! of constant byte planes). On a machine without the memory, every decoder fails with
//! an allocation error naming the bytes instead of aborting the process.
//!
//! This binary's allocator refuses every request of [`REFUSE`] bytes or more, as a
//! machine without that memory would: without fallible allocation these tests abort.

use std::sync::OnceLock;

use bitsnap_core::codec::{self, CodecId, MAX_CHUNK_BYTES};
use bitsnap_core::format::{self, Decision, Entry, Header, SnapshotFile};
use bitsnap_core::{DType, Error, Role};
use xxhash_rust::xxh3::xxh3_64;

#[path = "common/largest_alloc.rs"]
mod largest_alloc;
use largest_alloc::Largest;

#[global_allocator]
static ALLOCATOR: Largest = Largest;

/// Requests of this size or more fail (1 GiB).
const REFUSE: usize = 1 << 30;

/// A base of `REFUSE` bytes for the delta decoders, allocated (lazily zeroed, so not made
/// resident) before the allocator starts refusing; then the allocator refuses.
fn base() -> &'static [u8] {
    static BASE: OnceLock<Vec<u8>> = OnceLock::new();
    BASE.get_or_init(|| {
        let base = vec![0u8; REFUSE];
        largest_alloc::refuse_from(REFUSE);
        base
    })
}

/// A payload of `codec` for `numel` elements of `dtype` in chunks of [`MAX_CHUNK_BYTES`]
/// elements whose planes are all constant: valid, and 10 to 60 bytes per chunk.
fn constant_chunks(codec: CodecId, dtype: DType, numel: usize) -> Vec<u8> {
    let mut payload = Vec::new();
    let width = if codec == CodecId::Cluster {
        payload.extend_from_slice(&[8, 0, 0, 0]);
        payload.extend_from_slice(&1u32.to_le_bytes());
        payload.extend(std::iter::repeat_n(0u8, dtype.size()));
        1
    } else {
        dtype.size()
    };
    let chunks = numel.div_ceil(MAX_CHUNK_BYTES);
    let body = |n: usize| {
        let mut b = Vec::new();
        if codec == CodecId::BitmaskDelta {
            b.extend_from_slice(&(n as u32).to_le_bytes());
            b.push(4); // every element changed: no mask bytes
            b.extend_from_slice(&0u32.to_le_bytes());
        }
        for _ in 0..width {
            b.extend_from_slice(&[2, 1, 0, 0, 0, 0x3c]); // a constant plane
        }
        b
    };
    payload.extend_from_slice(&(MAX_CHUNK_BYTES as u32).to_le_bytes());
    payload.extend_from_slice(&(chunks as u32).to_le_bytes());
    let bodies: Vec<Vec<u8>> = (0..chunks)
        .map(|c| body(MAX_CHUNK_BYTES.min(numel - c * MAX_CHUNK_BYTES)))
        .collect();
    bodies
        .iter()
        .for_each(|b| payload.extend_from_slice(&(b.len() as u32).to_le_bytes()));
    bodies.iter().for_each(|b| payload.extend_from_slice(b));
    payload
}

fn expect_alloc(err: codec::CodecError, bytes: usize) {
    assert_eq!(err.alloc, Some(bytes as u64), "{err}");
    assert!(err.reason.contains("cannot allocate"), "{err}");
}

#[test]
fn planes_declaring_more_than_memory_is_an_error() {
    base();
    let n = REFUSE; // 16 chunks of 2^26 bytes
    let payload = constant_chunks(CodecId::Planes, DType::U8, n);
    assert!(payload.len() < 200, "{} bytes", payload.len());
    codec::check(CodecId::Planes, &payload, DType::U8, n).unwrap();
    let err = codec::decode(CodecId::Planes, &payload, DType::U8, n, None).unwrap_err();
    expect_alloc(err, REFUSE);
    let err = codec::decode_for_device(CodecId::Planes, &payload, DType::U8, n).unwrap_err();
    expect_alloc(err, REFUSE);
}

#[test]
fn xor_declaring_more_than_memory_is_an_error() {
    let base = base();
    let n = REFUSE / 8; // 2 chunks of 2^26 f64
    let payload = constant_chunks(CodecId::XorDelta, DType::F64, n);
    assert!(payload.len() < 200, "{} bytes", payload.len());
    codec::check(CodecId::XorDelta, &payload, DType::F64, n).unwrap();
    let err = codec::decode(CodecId::XorDelta, &payload, DType::F64, n, Some(base)).unwrap_err();
    expect_alloc(err, REFUSE);
    let err = codec::decode_for_device(CodecId::XorDelta, &payload, DType::F64, n).unwrap_err();
    expect_alloc(err, REFUSE);
}

#[test]
fn bitmask_declaring_more_than_memory_is_an_error() {
    let base = base();
    let n = REFUSE / 4; // 4 chunks of 2^26 f32, every element changed
    let payload = constant_chunks(CodecId::BitmaskDelta, DType::F32, n);
    assert!(payload.len() < 200, "{} bytes", payload.len());
    codec::check(CodecId::BitmaskDelta, &payload, DType::F32, n).unwrap();
    let err =
        codec::decode(CodecId::BitmaskDelta, &payload, DType::F32, n, Some(base)).unwrap_err();
    expect_alloc(err, REFUSE);
    // The device form holds the changed values: 1 GiB, allocated before decoding.
    let err = codec::decode_for_device(CodecId::BitmaskDelta, &payload, DType::F32, n).unwrap_err();
    expect_alloc(err, REFUSE);
}

#[test]
fn cluster_declaring_more_than_memory_is_an_error() {
    base();
    let n = REFUSE / 4; // 2^28 f32 codes of one byte: 4 chunks
    let payload = constant_chunks(CodecId::Cluster, DType::F32, n);
    assert!(payload.len() < 200, "{} bytes", payload.len());
    codec::check(CodecId::Cluster, &payload, DType::F32, n).unwrap();
    let err = codec::decode(CodecId::Cluster, &payload, DType::F32, n, None).unwrap_err();
    expect_alloc(err, REFUSE);
}

#[test]
fn unchanged_declaring_more_than_the_address_space_is_an_error() {
    base();
    // An empty payload; the base check comes first, so there is nothing to allocate.
    let n = isize::MAX as usize / 8 + 1;
    let err = codec::decode(CodecId::Unchanged, &[], DType::F64, n, Some(&[])).unwrap_err();
    assert!(err.alloc.is_none() && err.reason.contains("base"), "{err}");
}

#[test]
fn a_snapshot_tensor_larger_than_memory_is_an_alloc_error_naming_it() {
    base();
    let payload = constant_chunks(CodecId::Planes, DType::U8, REFUSE);
    let mut file = format::MAGIC.to_vec();
    file.extend_from_slice(&format::VERSION.to_le_bytes());
    file.extend_from_slice(&[0; 6]);
    let header = Header {
        id: 1,
        name: "huge".into(),
        entries: vec![Entry {
            name: "embed.weight".into(),
            dtype: DType::U8,
            role: Role::Weight,
            codec: CodecId::Planes,
            shape: vec![REFUSE as u64],
            offset: file.len() as u64,
            len: payload.len() as u64,
            payload_hash: xxh3_64(&payload),
            raw_hash: 0,
            decision: Decision::default(),
            references: Vec::new(),
        }],
        ..Header::default()
    };
    file.extend_from_slice(&payload);
    let h_at = file.len() as u64;
    let region = format::encode_header_region(&header.encode());
    file.extend_from_slice(&region);
    file.extend_from_slice(&h_at.to_le_bytes());
    file.extend_from_slice(&(region.len() as u64).to_le_bytes());
    file.extend_from_slice(&xxh3_64(&region).to_le_bytes());
    file.extend_from_slice(&format::END_MAGIC);
    let snap = SnapshotFile::from_bytes(file, "huge.bsnap".as_ref()).unwrap();
    match snap.decode(&snap.header.entries[0], None).unwrap_err() {
        Error::Alloc { what, bytes } => {
            assert_eq!(bytes, REFUSE as u64);
            assert!(
                what.contains("embed.weight") && what.contains("huge.bsnap"),
                "{what}"
            );
        }
        other => panic!("expected an allocation error, got {other}"),
    }
}
