//! `BitSnapCheckpointer` behaves as Burn's `FileCheckpointer` under the learner's call
//! pattern, including `KeepLastNCheckpoints` deleting epochs that later ones are deltas on.

use bitsnap_burn::BitSnapCheckpointer;
use bitsnap_core::Policy;
use burn::lr_scheduler::LrSchedulerRecord;
use burn::module::Module;
use burn::nn::{Linear, LinearConfig};
use burn::optim::{AdamWConfig, GradientsParams, ModuleOptimizer, OptimizerRecord};
use burn::store::ModuleRecord;
use burn::tensor::{Device, Tensor, TensorData};
use burn::train::checkpoint::{Checkpoint, Checkpointer, CheckpointingAction};

#[derive(Module, Debug)]
struct Net {
    a: Linear,
    b: Linear,
}

/// What a record holds, in a canonical order: tensors (name, dtype, shape, param id,
/// bytes) sorted by name, string metadata and scalars.
type Content = (
    Vec<(String, String, Vec<usize>, Option<u64>, Vec<u8>)>,
    Vec<(String, String)>,
    Vec<(String, String)>,
);

fn bytes<R: Checkpoint>(r: R) -> Content {
    let reader = burn::store::burn_pack::Reader::from_bytes(
        r.checkpoint_into_bytes().expect("record bytes"),
    )
    .expect("burnpack");
    let metadata = reader
        .metadata()
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let scalars = reader
        .scalars()
        .iter()
        .map(|(k, v)| (k.clone(), format!("{v:?}")))
        .collect();
    let mut tensors: Vec<_> = reader
        .into_tensors()
        .expect("tensors")
        .into_iter()
        .map(|t| {
            let (name, dtype, shape, pid, data) = t.into_parts().expect("tensor bytes");
            (
                name,
                format!("{dtype:?}"),
                shape.to_vec(),
                pid,
                data.to_vec(),
            )
        })
        .collect();
    tensors.sort();
    (tensors, metadata, scalars)
}

fn train_epoch(model: Net, optim: &mut ModuleOptimizer, epoch: usize, device: &Device) -> Net {
    let mut model = model;
    for i in 0..3 {
        let xs: Vec<f32> = (0..8 * 12)
            .map(|j| ((j * 7 + i * 3 + epoch) % 11) as f32 / 11.0)
            .collect();
        let x = Tensor::<2>::from_data(TensorData::new(xs, [8, 12]), device);
        let loss = model.b.forward(model.a.forward(x)).powf_scalar(2.0).mean();
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optim.step(1e-3, model, grads);
    }
    model
}

#[test]
fn keep_last_n_with_deltas_restores_every_kept_epoch() {
    let device = Device::flex().autodiff();
    let dir = tempfile::tempdir().unwrap();
    let ckpt =
        BitSnapCheckpointer::open(dir.path(), Policy::default().with_full_every(100)).unwrap();
    let (cm, co, cl) = (ckpt.clone(), ckpt.clone(), ckpt.clone());
    let mut model = Net {
        a: LinearConfig::new(12, 32).init(&device),
        b: LinearConfig::new(32, 4).init(&device),
    };
    let mut optim: ModuleOptimizer = AdamWConfig::new().init();
    // Burn's `KeepLastNCheckpoints::new(2)` (burn-train strategy/lastn.rs): save every epoch,
    // then delete `epoch - 2` when positive. Its `EventStoreClient` argument cannot be built
    // outside burn-train, so the actions are spelled out here.
    let keep_last_2 = |epoch: usize| {
        let mut actions = vec![CheckpointingAction::Save];
        if epoch > 2 {
            actions.push(CheckpointingAction::Delete(epoch - 2));
        }
        actions
    };
    let mut expected = std::collections::BTreeMap::new();
    for epoch in 1..=6usize {
        model = train_epoch(model, &mut optim, epoch, &device);
        let scheduler = LrSchedulerRecord::new().with_scalar("step", epoch as u64 * 3);
        for action in keep_last_2(epoch) {
            match action {
                CheckpointingAction::Save => {
                    expected.insert(
                        epoch,
                        (
                            bytes(model.clone().into_record()),
                            bytes(optim.to_record()),
                            bytes(scheduler.clone()),
                        ),
                    );
                    Checkpointer::<ModuleRecord>::save(&cm, epoch, model.clone().into_record())
                        .unwrap();
                    Checkpointer::<OptimizerRecord>::save(&co, epoch, optim.to_record()).unwrap();
                    Checkpointer::<LrSchedulerRecord>::save(&cl, epoch, scheduler.clone()).unwrap();
                }
                CheckpointingAction::Delete(old) => {
                    Checkpointer::<ModuleRecord>::delete(&cm, old).unwrap();
                    Checkpointer::<OptimizerRecord>::delete(&co, old).unwrap();
                    Checkpointer::<LrSchedulerRecord>::delete(&cl, old).unwrap();
                    expected.remove(&old);
                }
            }
        }
        // Every kept epoch restores exactly, from a fresh view of the store.
        let fresh = BitSnapCheckpointer::open(dir.path(), Policy::default()).unwrap();
        for (e, (m, o, s)) in &expected {
            assert!(
                bytes(Checkpointer::<ModuleRecord>::restore(&fresh, *e).unwrap()) == *m,
                "model epoch {e}"
            );
            assert!(
                bytes(Checkpointer::<OptimizerRecord>::restore(&fresh, *e).unwrap()) == *o,
                "optim epoch {e}"
            );
            assert!(
                bytes(Checkpointer::<LrSchedulerRecord>::restore(&fresh, *e).unwrap()) == *s,
                "scheduler epoch {e}"
            );
        }
        drop(fresh);
    }
    assert_eq!(expected.keys().copied().collect::<Vec<_>>(), vec![5, 6]);
    {
        let store = ckpt.store();
        // Three series, two epochs each; the newest model snapshot is a delta on the kept one.
        assert_eq!(store.snapshots().len(), 6);
        let m6 = store.find("model", "epoch-6").unwrap();
        assert_eq!(m6.base, Some(store.find("model", "epoch-5").unwrap().id));
    }
    assert!(Checkpointer::<ModuleRecord>::restore(&ckpt, 3).is_err());
    // Deleting an absent epoch is not an error, as with FileCheckpointer.
    Checkpointer::<ModuleRecord>::delete(&ckpt, 3).unwrap();
}

#[test]
fn saving_an_epoch_again_replaces_it() {
    let device = Device::flex();
    let dir = tempfile::tempdir().unwrap();
    let ckpt = BitSnapCheckpointer::open(dir.path(), Policy::default()).unwrap();
    let net = |d: &Device| Net {
        a: LinearConfig::new(4, 4).init(d),
        b: LinearConfig::new(4, 4).init(d),
    };
    let first = net(&device);
    let second = net(&device);
    Checkpointer::<ModuleRecord>::save(&ckpt, 1, first.into_record()).unwrap();
    Checkpointer::<ModuleRecord>::save(&ckpt, 1, second.clone().into_record()).unwrap();
    let back = Checkpointer::<ModuleRecord>::restore(&ckpt, 1).unwrap();
    assert!(bytes(back) == bytes(second.into_record()));
    assert_eq!(ckpt.store().snapshots().len(), 1);
}

/// `with_optimizer` names the update rule in the optimizer records' metadata only.
#[test]
fn optimizer_records_carry_the_update_rule() {
    use bitsnap_burn::OptimizerSpec;
    let dir = tempfile::tempdir().unwrap();
    let adamw = AdamWConfig::new();
    let ckpt = BitSnapCheckpointer::open(dir.path(), Policy::default())
        .unwrap()
        .with_optimizer(&adamw);
    let device = Device::flex();
    let model = LinearConfig::new(2, 2).init(&device);
    ckpt.save_record(1, model.into_record()).unwrap();
    let optim: ModuleOptimizer = adamw.init();
    ckpt.save_record(1, optim.to_record()).unwrap();
    let store = ckpt.store();
    let rule = |series: &str| {
        let id = store.find(series, "epoch-1").unwrap().id;
        store
            .load(id)
            .unwrap()
            .metadata
            .into_iter()
            .find(|(k, _)| k == "bitsnap.optimizer")
            .map(|(_, v)| v)
    };
    assert_eq!(rule("optim"), adamw.replay_rule());
    assert!(rule("optim").is_some());
    assert_eq!(rule("model"), None);
}
