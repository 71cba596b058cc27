//! Random tensors of every dtype, shapes including empty and odd lengths, and random
//! change patterns round-trip bit-exact through the store (lossless policy).

mod common;

use bitsnap_core::{DType, Policy, Role, Store};
use common::{mutate, random_tensor};
use proptest::prelude::*;

fn shapes() -> impl Strategy<Value = Vec<u64>> {
    prop::sample::select(vec![
        vec![],
        vec![0],
        vec![1],
        vec![7],
        vec![3, 0, 5],
        vec![33, 17],
        vec![2, 3, 5, 7],
        vec![4097],
    ])
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn series_round_trips_through_the_store(
        specs in prop::collection::vec((prop::sample::select(DType::ALL.to_vec()), shapes()), 1..6),
        permilles in prop::collection::vec(prop::sample::select(vec![0u64, 1, 100, 1000]), 1..5),
        full_every in 1u32..4,
        seed in any::<u64>(),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open_or_create(dir.path(), Policy::default().with_full_every(full_every)).unwrap();
        let mut state: Vec<_> = specs.iter().enumerate()
            .map(|(i, (d, s))| random_tensor(&format!("t{i}"), *d, s, Role::Weight, seed ^ i as u64))
            .collect();
        let mut saved = Vec::new();
        let first = store.save("s0", state.clone()).unwrap();
        saved.push((first.info.id, state.clone()));
        for (step, &p) in permilles.iter().enumerate() {
            state = state.iter().enumerate().map(|(i, t)| mutate(t, p, seed ^ ((step as u64) << 8) ^ i as u64)).collect();
            let r = store.save(&format!("s{}", step + 1), state.clone()).unwrap();
            saved.push((r.info.id, state.clone()));
        }
        // From memory (latest) and from disk (everything, in a fresh process view).
        let latest = store.load(saved.last().unwrap().0).unwrap();
        prop_assert!(latest.from_memory);
        prop_assert_eq!(&latest.tensors, &saved.last().unwrap().1);
        let reopened = Store::open(dir.path()).unwrap();
        for (id, tensors) in &saved {
            let snap = reopened.load(*id).unwrap();
            prop_assert!(!snap.from_memory);
            prop_assert_eq!(&snap.tensors, tensors);
        }
        let report = reopened.verify().unwrap();
        prop_assert!(report.failed.is_empty(), "{:?}", report.failed);
        prop_assert_eq!(report.ok.len(), saved.len());
    }
}

#[test]
fn chains_are_bounded_by_full_every() {
    let dir = tempfile::tempdir().unwrap();
    let mut store =
        Store::open_or_create(dir.path(), Policy::default().with_full_every(3)).unwrap();
    let mut t = random_tensor("w", DType::F32, &[50_000], Role::Weight, 1);
    let mut bases = Vec::new();
    for step in 0..7 {
        t = mutate(&t, 5, step);
        let r = store.save(&format!("s{step}"), vec![t.clone()]).unwrap();
        bases.push(r.info.base.is_some());
    }
    assert_eq!(bases, [false, true, true, false, true, true, false]);
}

#[test]
fn new_and_reshaped_tensors_are_stored_full_inside_a_delta() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open_or_create(dir.path(), Policy::default()).unwrap();
    let a = random_tensor("a", DType::BF16, &[10_000], Role::Weight, 1);
    let b = random_tensor("b", DType::F32, &[100, 10], Role::Weight, 2);
    store.save("0", vec![a.clone(), b.clone()]).unwrap();
    let a1 = mutate(&a, 10, 3);
    let b1 = random_tensor("b", DType::F32, &[10, 100, 2], Role::Weight, 4);
    let c1 = random_tensor("c", DType::I64, &[33], Role::Other, 5);
    let r = store
        .save("1", vec![a1.clone(), b1.clone(), c1.clone()])
        .unwrap();
    assert!(r.info.base.is_some());
    let codecs: Vec<_> = r.header.entries.iter().map(|e| e.codec.name()).collect();
    assert_eq!(codecs[0], "bitmask");
    assert!(!r.header.entries[1].codec.needs_base() && !r.header.entries[2].codec.needs_base());
    let back = Store::open(dir.path()).unwrap().load(r.info.id).unwrap();
    assert_eq!(back.tensors, vec![a1, b1, c1]);
}

#[test]
fn lossy_optimizer_restores_dequantized_moments_and_exact_weights() {
    use bitsnap_core::{Lossiness, codec::QuantBits};
    let dir = tempfile::tempdir().unwrap();
    let policy = Policy::default().with_lossiness(Lossiness::LossyOptimizer {
        bits: QuantBits::B8,
    });
    let mut store = Store::open_or_create(dir.path(), policy).unwrap();
    let w = random_tensor("w", DType::F32, &[20_000], Role::Weight, 1);
    let v: Vec<f32> = (0..20_000u64)
        .map(|i| 1e-9 * ((i * 2_654_435_761 % 9973) as f32 * 1e-3).exp())
        .collect();
    let m2 = bitsnap_core::Tensor::from_f32("v", &[20_000], Role::OptimizerMoment(2), &v).unwrap();
    let r = store.save("0", vec![w.clone(), m2.clone()]).unwrap();
    let q = &r.header.entries[1];
    assert_eq!(q.codec.name(), "cluster");
    let err = q.decision.error.expect("lossy tensors report their error");
    assert!(err.rel_l2 > 0.0 && err.rel_l2 < 0.05, "{err:?}");
    let from_disk = Store::open(dir.path()).unwrap().load(r.info.id).unwrap();
    let from_memory = store.load(r.info.id).unwrap();
    assert_eq!(from_disk.tensors, from_memory.tensors);
    assert_eq!(from_disk.tensors[0], w);
    let back = from_disk.tensors[1].to_f32().unwrap();
    let rel = (back
        .iter()
        .zip(&v)
        .map(|(a, b)| ((a - b) as f64).powi(2))
        .sum::<f64>()
        / v.iter().map(|b| (*b as f64).powi(2)).sum::<f64>())
    .sqrt();
    assert!((rel - err.rel_l2).abs() < 1e-6, "{rel} vs {}", err.rel_l2);
}

#[test]
fn series_in_one_store_are_deltas_on_their_own_series() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open_or_create(dir.path(), Policy::default()).unwrap();
    let mut model = random_tensor("w", DType::F32, &[20_000], Role::Weight, 1);
    let mut optim = random_tensor(
        "w.moment_1",
        DType::F32,
        &[20_000],
        Role::OptimizerMoment(1),
        2,
    );
    let mut saved = Vec::new();
    for epoch in 1..=4 {
        model = mutate(&model, 10, epoch);
        optim = mutate(&optim, 10, 100 + epoch);
        let m = store
            .save_in(
                "model",
                &format!("epoch-{epoch}"),
                vec![model.clone()],
                vec![],
            )
            .unwrap();
        let o = store
            .save_in(
                "optim",
                &format!("epoch-{epoch}"),
                vec![optim.clone()],
                vec![],
            )
            .unwrap();
        if epoch > 1 {
            assert_eq!(store.get(m.info.base.unwrap()).unwrap().series, "model");
            assert_eq!(store.get(o.info.base.unwrap()).unwrap().series, "optim");
        }
        saved.push((m.info.id, model.clone()));
        saved.push((o.info.id, optim.clone()));
    }
    assert_eq!(store.find("optim", "epoch-2").unwrap().id, saved[3].0);
    let reopened = Store::open(dir.path()).unwrap();
    for (id, t) in saved {
        assert_eq!(reopened.load(id).unwrap().tensors, vec![t]);
    }
}
