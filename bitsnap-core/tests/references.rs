//! Reference codecs through the store: a mixed-precision snapshot (f32 masters, their
//! bf16 casts, a tied copy) is stored with `cast` and `identical` entries that name the
//! tensors they read, restores bit-exact from memory and from disk, through a delta, a
//! deletion that rebases it, and `verify`.

use bitsnap_core::codec::CodecId;
use bitsnap_core::format::RefScope;
use bitsnap_core::{DType, Policy, Role, Store, Tensor};

fn master(name: &str, n: usize, phase: f32) -> (Tensor, Vec<f32>) {
    let v: Vec<f32> = (0..n)
        .map(|i| (i as f32 * 0.013 + phase).sin() * 0.02)
        .collect();
    (
        Tensor::from_f32(name, &[n as u64], Role::Weight, &v).unwrap(),
        v,
    )
}

fn bf16(name: &str, v: &[f32], flip_every: usize) -> Tensor {
    let mut data: Vec<u8> = v
        .iter()
        .flat_map(|x| half::bf16::from_f32(*x).to_le_bytes())
        .collect();
    if flip_every > 0 {
        for i in (0..data.len()).step_by(2 * flip_every) {
            data[i] ^= 1;
        }
    }
    Tensor::new(name, DType::BF16, vec![v.len() as u64], Role::Weight, data).unwrap()
}

/// `phase` moves `optimizer.master.b` (and its cast) only.
fn snapshot(phase: f32) -> Vec<Tensor> {
    let (m, v) = master("optimizer.master.w", 20_000, 0.0);
    let (m2, v2) = master("optimizer.master.b", 3000, phase + 1.0);
    vec![
        m,
        bf16("model.w", &v, 0),
        m2,
        // Not quite the cast: one element in 97 differs.
        bf16("model.b", &v2, 97),
        bf16("lm_head.w", &v, 0),
    ]
}

#[test]
fn casts_and_copies_restore_bit_exact_and_are_named_in_the_header() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open_or_create(dir.path(), Policy::default()).unwrap();
    let s1 = snapshot(0.0);
    let r1 = store.save("s1", s1.clone()).unwrap();
    let coded: Vec<(CodecId, Vec<String>)> = r1
        .header
        .entries
        .iter()
        .map(|e| {
            assert!(e.references.iter().all(|r| r.scope == RefScope::Snapshot));
            (
                e.codec,
                e.references.iter().map(|r| r.name.clone()).collect(),
            )
        })
        .collect();
    assert_eq!(
        coded[1],
        (CodecId::Cast, vec!["optimizer.master.w".to_string()])
    );
    assert_eq!(
        coded[3],
        (CodecId::Cast, vec!["optimizer.master.b".to_string()])
    );
    assert_eq!(coded[4], (CodecId::Identical, vec!["model.w".to_string()]));
    let e = &r1.header.entries;
    // An exact cast costs 17 bytes; 31 exceptions of 3000 cost a few dozen more.
    assert_eq!(e[1].len, 17);
    assert!(e[3].len < 200, "{}", e[3].len);
    assert_eq!(e[4].len, 0);

    let s2 = snapshot(0.001);
    let r2 = store.save("s2", s2.clone()).unwrap();
    assert!(r2.info.base.is_some());
    // Unchanged beats a 17-byte cast.
    assert_eq!(r2.header.entries[1].codec, CodecId::Unchanged);
    assert_eq!(r2.header.entries[3].codec, CodecId::Cast);
    let reopened = Store::open(dir.path()).unwrap();
    assert_eq!(reopened.load(r1.info.id).unwrap().tensors, s1);
    assert_eq!(reopened.load(r2.info.id).unwrap().tensors, s2);
    let report = reopened.verify().unwrap();
    assert!(report.failed.is_empty(), "{:?}", report.failed);
    drop(reopened);

    // Deleting the base rewrites s2 against nothing: its reference entries are copied
    // with their references.
    store.delete(r1.info.id).unwrap();
    let reopened = Store::open(dir.path()).unwrap();
    assert_eq!(reopened.load(r2.info.id).unwrap().tensors, s2);
    assert!(reopened.verify().unwrap().failed.is_empty());
}
