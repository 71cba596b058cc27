//! The documented limits are enforced before anything is allocated for what a file
//! declares: a few bytes that claim a huge header, tensor count, metadata count, tensor
//! or manifest are refused with [`Error::Limit`] (or a named [`Error::Malformed`]), and
//! no allocation in this test binary comes near the declared size.

use std::path::Path;

use bitsnap_core::format::{
    self, Header, MAX_HEADER_BYTES, MAX_METADATA, MAX_TENSORS, SnapshotFile,
};
use bitsnap_core::{DType, Error, MAX_MANIFEST_BYTES, MAX_TENSOR_BYTES, Role, Store, Tensor};
use xxhash_rust::xxh3::xxh3_64;

/// No single allocation in these tests may reach this (the declared sizes are GiBs).
const MAX_ALLOC: usize = 16 << 20;

#[path = "common/largest_alloc.rs"]
mod largest_alloc;
use largest_alloc::Largest;

#[global_allocator]
static ALLOCATOR: Largest = Largest;

fn assert_small_allocations() {
    let largest = largest_alloc::largest();
    assert!(largest < MAX_ALLOC, "an allocation of {largest} bytes");
}

const FILE: &str = "hostile.bsnap";

/// A snapshot file around `region` (a header region), with a valid trailer.
fn file_with_region(region: &[u8]) -> Vec<u8> {
    let mut out = format::MAGIC.to_vec();
    out.extend_from_slice(&format::VERSION.to_le_bytes());
    out.extend_from_slice(&[0; 6]);
    let h_at = out.len() as u64;
    out.extend_from_slice(region);
    out.extend_from_slice(&h_at.to_le_bytes());
    out.extend_from_slice(&(region.len() as u64).to_le_bytes());
    out.extend_from_slice(&xxh3_64(region).to_le_bytes());
    out.extend_from_slice(&format::END_MAGIC);
    out
}

/// A raw header body of the current version (2): id, empty name, no base, attempt 0,
/// an empty extension area, then the given tail.
fn header_body(tail: &[u8]) -> Vec<u8> {
    let mut b = 7u64.to_le_bytes().to_vec();
    b.extend_from_slice(&0u16.to_le_bytes());
    b.extend_from_slice(&[0; 17]);
    b.extend_from_slice(&0u64.to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes());
    b.extend_from_slice(tail);
    b
}

fn expect_limit(err: Error, what: &str, value: u64, limit: u64) {
    match &err {
        Error::Limit {
            what: w,
            value: v,
            limit: l,
            file,
        } => {
            assert_eq!((*w, *v, *l), (what, value, limit), "{err}");
            assert!(file.ends_with(FILE) || file.ends_with("MANIFEST"), "{err}");
        }
        other => panic!("expected a {what} limit error, got {other:?}"),
    }
}

#[test]
fn header_length_over_the_limit() {
    // A trailer that declares a header of MAX_HEADER_BYTES + 1.
    let mut bytes = file_with_region(&[format::HEADER_RAW]);
    let t_at = bytes.len() - format::TRAILER_BYTES;
    bytes[t_at + 8..t_at + 16].copy_from_slice(&(MAX_HEADER_BYTES + 1).to_le_bytes());
    let err = SnapshotFile::from_bytes(bytes, Path::new(FILE)).unwrap_err();
    expect_limit(err, "header length", MAX_HEADER_BYTES + 1, MAX_HEADER_BYTES);
    // A compressed header region that declares as much once decoded.
    let mut region = vec![format::HEADER_ZSTD];
    region.extend_from_slice(&(MAX_HEADER_BYTES as u32 + 1).to_le_bytes());
    region.extend_from_slice(&[0x28, 0xb5, 0x2f, 0xfd]);
    let err = SnapshotFile::from_bytes(file_with_region(&region), Path::new(FILE)).unwrap_err();
    expect_limit(
        err,
        "decoded header length",
        MAX_HEADER_BYTES + 1,
        MAX_HEADER_BYTES,
    );
    assert_small_allocations();
}

#[test]
fn tensor_count_over_the_limit() {
    let mut tail = 0u32.to_le_bytes().to_vec(); // no metadata
    tail.extend_from_slice(&(MAX_TENSORS as u32 + 1).to_le_bytes());
    let err = Header::parse(&header_body(&tail), Path::new(FILE), 0).unwrap_err();
    expect_limit(err, "tensor count", MAX_TENSORS + 1, MAX_TENSORS);
    // At the limit, the count is refused by the bytes that are missing, not by an
    // allocation of a million entries.
    let mut tail = 0u32.to_le_bytes().to_vec();
    tail.extend_from_slice(&(MAX_TENSORS as u32).to_le_bytes());
    let err = Header::parse(&header_body(&tail), Path::new(FILE), 0).unwrap_err();
    assert!(matches!(err, Error::Malformed { .. }), "{err:?}");
    assert_small_allocations();
}

#[test]
fn metadata_count_over_the_limit() {
    let tail = (MAX_METADATA as u32 + 1).to_le_bytes();
    let err = Header::parse(&header_body(&tail), Path::new(FILE), 0).unwrap_err();
    expect_limit(err, "metadata entry count", MAX_METADATA + 1, MAX_METADATA);
    assert_small_allocations();
}

#[test]
fn tensor_size_over_the_limit() {
    // In memory: refused before a buffer is asked for.
    let elems = MAX_TENSOR_BYTES / 4 + 1;
    let err = Tensor::new("big", DType::F32, vec![elems], Role::Weight, Vec::new()).unwrap_err();
    assert!(err.to_string().contains("`big`"), "{err}");
    // In a header: refused while parsing, naming the tensor.
    let mut tail = 0u32.to_le_bytes().to_vec();
    tail.extend_from_slice(&1u32.to_le_bytes());
    tail.extend_from_slice(&3u16.to_le_bytes());
    tail.extend_from_slice(b"big");
    tail.extend_from_slice(&[DType::F32.tag(), 0, 0, 1]);
    tail.extend_from_slice(&elems.to_le_bytes());
    tail.extend_from_slice(&[0; 8 * 7 + 1]);
    let err = Header::parse(&header_body(&tail), Path::new(FILE), 0).unwrap_err();
    match &err {
        Error::Malformed { tensor, reason, .. } => {
            assert_eq!(tensor.as_deref(), Some("big"));
            assert!(reason.contains("exceeds the limit"), "{err}");
        }
        other => panic!("expected a malformed tensor, got {other:?}"),
    }
    assert_small_allocations();
}

#[test]
fn manifest_over_the_limit() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = dir.path().join(bitsnap_core::MANIFEST_FILE);
    // A sparse file: no disk or memory is used for its size.
    std::fs::File::create(&manifest)
        .unwrap()
        .set_len(MAX_MANIFEST_BYTES + 1)
        .unwrap();
    let err = Store::open(dir.path()).unwrap_err();
    expect_limit(
        err,
        "manifest size",
        MAX_MANIFEST_BYTES + 1,
        MAX_MANIFEST_BYTES,
    );
    assert_small_allocations();
}

#[test]
fn safetensors_header_over_the_limit() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big.safetensors");
    let n = bitsnap_core::safetensors::MAX_HEADER_BYTES + 1;
    let mut bytes = n.to_le_bytes().to_vec();
    bytes.extend_from_slice(b"{}");
    std::fs::write(&path, bytes).unwrap();
    let err = bitsnap_core::safetensors::read_index(&path).unwrap_err();
    assert!(err.to_string().contains("above the limit"), "{err}");
    assert_small_allocations();
}

/// Regression: a cluster payload of a codebook and nothing else, for a tensor declared
/// at 1 GiB, made the decoder allocate the output (and the packed codes) before finding
/// that no codes follow; at 64 GiB the allocation failure aborted the process. The code
/// chunk table is now checked first, as every other codec's is.
#[test]
fn a_cluster_payload_that_cannot_fill_its_tensor_is_refused_before_allocating() {
    use bitsnap_core::codec::{self, CodecId};
    let mut payload = vec![8, 0, 0, 0];
    payload.extend_from_slice(&1u32.to_le_bytes());
    payload.extend_from_slice(&1.0f32.to_le_bytes());
    let err = codec::decode(CodecId::Cluster, &payload, DType::F32, 1 << 28, None).unwrap_err();
    assert!(err.reason.contains("chunk"), "{err}");
    assert_small_allocations();
}
