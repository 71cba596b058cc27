//! Golden bytes freeze format version 1 (and the encoder's choices): a store written today must produce exactly the
//! committed files, and the committed files must decode to the same tensors forever.
//! Regenerate (only with a format version bump) with `BITSNAP_BLESS=1 cargo test --test golden`.

use std::path::PathBuf;

use bitsnap_core::{DType, Lossiness, Policy, Role, Store, Tensor, codec::QuantBits};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn series() -> Vec<Vec<Tensor>> {
    let w: Vec<f32> = (0..600).map(|i| ((i as f32) * 0.37).sin() * 0.1).collect();
    let v: Vec<f32> = (0..256).map(|i| 1e-6 * (1.0 + (i % 13) as f32)).collect();
    let bf: Vec<u8> = (0..100u16)
        .flat_map(|i| half::bf16::from_f32(i as f32 * 0.5).to_le_bytes())
        .collect();
    let step = Tensor::new(
        "opt.step",
        DType::I64,
        vec![],
        Role::Other,
        7i64.to_le_bytes().to_vec(),
    )
    .unwrap();
    let first = vec![
        Tensor::from_f32("w", &[20, 30], Role::Weight, &w).unwrap(),
        Tensor::from_f32("opt.w.moment_2", &[256], Role::OptimizerMoment(2), &v).unwrap(),
        Tensor::new("emb", DType::BF16, vec![100], Role::Weight, bf.clone()).unwrap(),
        step,
    ];
    let mut second = first.clone();
    let mut w2 = w.clone();
    w2[5] += 0.25;
    w2[599] = -0.0;
    second[0] = Tensor::from_f32("w", &[20, 30], Role::Weight, &w2).unwrap();
    second[3] = Tensor::new(
        "opt.step",
        DType::I64,
        vec![],
        Role::Other,
        8i64.to_le_bytes().to_vec(),
    )
    .unwrap();
    vec![first, second]
}

#[test]
fn version_1_bytes_are_frozen() {
    let dir = tempfile::tempdir().unwrap();
    let policy = Policy::default().with_lossiness(Lossiness::LossyOptimizer {
        bits: QuantBits::B4,
    });
    let mut store = Store::open_or_create(dir.path(), policy).unwrap();
    let mut written = Vec::new();
    for (i, tensors) in series().into_iter().enumerate() {
        let r = store.save(&format!("golden-{i}"), tensors).unwrap();
        written.push((
            dir.path().join(&r.info.file),
            fixtures().join(format!("golden-v1-{i}.bsnap")),
        ));
    }
    for (new, golden) in &written {
        let bytes = std::fs::read(new).unwrap();
        if std::env::var_os("BITSNAP_BLESS").is_some() {
            std::fs::write(golden, &bytes).unwrap();
        }
        let frozen =
            std::fs::read(golden).expect("golden fixture missing: run with BITSNAP_BLESS=1 once");
        assert!(
            bytes == frozen,
            "{} differs from {}: the on-disk format changed",
            new.display(),
            golden.display()
        );
    }
    // The frozen files decode to the series (moments dequantized).
    let copy = tempfile::tempdir().unwrap();
    for f in std::fs::read_dir(dir.path()).unwrap() {
        let f = f.unwrap();
        std::fs::copy(f.path(), copy.path().join(f.file_name())).unwrap();
    }
    for (i, (new, golden)) in written.iter().enumerate() {
        std::fs::copy(golden, copy.path().join(new.file_name().unwrap())).unwrap();
        let store = Store::open(copy.path()).unwrap();
        let snap = store.load(store.snapshots()[i].id).unwrap();
        let expect = &series()[i];
        for (got, want) in snap.tensors.iter().zip(expect) {
            if want.role.is_moment() {
                assert_eq!(got.shape, want.shape);
            } else {
                assert_eq!(got, want);
            }
        }
    }
}
