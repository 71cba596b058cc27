//! Background faults are reported to the trainer, never lost.

use bitsnap_burn::{Error, StepSaver, StepSaverConfig};
use burn::module::{Devices, Module, ModuleMapper, ModuleVisitor};
use burn::nn::{Linear, LinearConfig};
use burn::optim::{AdamWConfig, ModuleOptimizer};
use burn::store::ModuleRecord;
use burn::tensor::Device;

#[derive(Module, Debug)]
struct Net {
    a: Linear,
}

#[test]
fn a_failed_background_save_is_returned_by_the_next_call() {
    let device = Device::flex();
    let dir = tempfile::tempdir().unwrap();
    let store_dir = dir.path().join("store");
    let saver = StepSaver::open(&store_dir, StepSaverConfig::default()).unwrap();
    let model = Net {
        a: LinearConfig::new(4, 4).init(&device),
    };
    let optim: ModuleOptimizer = AdamWConfig::new().init();
    saver.snapshot(1, &model, &optim).submit().unwrap();
    saver.flush().unwrap();
    // The disk goes away under the saver (unmounted: its directory is no longer there):
    // the next save fails in the background.
    let away = dir.path().join("unmounted");
    std::fs::rename(&store_dir, &away).unwrap();
    saver.snapshot(2, &model, &optim).submit().unwrap();
    let err = saver.flush().unwrap_err();
    assert!(matches!(err, Error::Background { step: 2, .. }), "{err:?}");
    assert!(err.to_string().contains("store"), "{err}");
    // Reported once.
    saver.flush().unwrap();
    assert_eq!(saver.stats().len(), 1);
    // The disk is back: the saver saves again, and the new snapshot loads, in this
    // process and from disk, to the state it was given.
    std::fs::rename(&away, &store_dir).unwrap();
    let trained = Net {
        a: LinearConfig::new(4, 4).init(&device),
    };
    saver.snapshot(3, &trained, &optim).submit().unwrap();
    saver.flush().unwrap();
    assert_eq!(saver.steps(), vec![1, 3]);
    assert_eq!(saver.stats().len(), 2);
    let want = record_bytes(trained.clone().into_record());
    let restored = saver.restore(3).unwrap();
    assert_eq!(record_bytes(restored.model), want);
    saver.close().unwrap();
    let reopened = StepSaver::open(&store_dir, StepSaverConfig::default()).unwrap();
    let from_disk = reopened.restore(3).unwrap();
    assert_eq!(from_disk.from, bitsnap_burn::RestoredFrom::Disk);
    assert_eq!(record_bytes(from_disk.model), want);
}

/// The parameter values a model record holds, loaded into a `Net`.
fn record_bytes(record: ModuleRecord) -> Vec<u8> {
    let device = Device::flex();
    let net = Net {
        a: LinearConfig::new(4, 4).init(&device),
    }
    .load_record(record);
    let mut out = net.a.weight.val().into_data().as_bytes().to_vec();
    if let Some(b) = &net.a.bias {
        out.extend_from_slice(b.val().into_data().as_bytes());
    }
    out
}

#[test]
fn close_finishes_pending_saves_and_reports_errors() {
    let device = Device::flex();
    let dir = tempfile::tempdir().unwrap();
    let saver =
        StepSaver::open(dir.path(), StepSaverConfig::default().with_queue_depth(4)).unwrap();
    let model = Net {
        a: LinearConfig::new(8, 8).init(&device),
    };
    let optim: ModuleOptimizer = AdamWConfig::new().init();
    for step in 1..=4 {
        saver.snapshot(step, &model, &optim).submit().unwrap();
    }
    saver.close().unwrap();
    let reopened = StepSaver::open(dir.path(), StepSaverConfig::default()).unwrap();
    assert_eq!(reopened.steps(), vec![1, 2, 3, 4]);
}

#[test]
fn keep_last_bounds_the_store() {
    let device = Device::flex();
    let dir = tempfile::tempdir().unwrap();
    let saver = StepSaver::open(dir.path(), StepSaverConfig::default().with_keep_last(2)).unwrap();
    let model = Net {
        a: LinearConfig::new(8, 8).init(&device),
    };
    let optim: ModuleOptimizer = AdamWConfig::new().init();
    for step in 1..=5 {
        saver.snapshot(step, &model, &optim).submit().unwrap();
    }
    saver.flush().unwrap();
    assert_eq!(saver.steps(), vec![4, 5]);
    assert!(saver.restore(4).is_ok() && saver.restore(2).is_err());
}

/// A model whose read-back panics in the background thread: a bug or a device fault in
/// the middle of a save.
#[derive(Debug, Clone)]
struct Exploding(Net);

impl Module for Exploding {
    fn collect_devices(&self, devices: Devices) -> Devices {
        self.0.collect_devices(devices)
    }
    fn fork(self, device: &Device) -> Self {
        Exploding(self.0.fork(device))
    }
    fn to_device(self, device: &Device) -> Self {
        Exploding(self.0.to_device(device))
    }
    fn train(self) -> Self {
        Exploding(self.0.train())
    }
    fn valid(&self) -> Self {
        Exploding(self.0.valid())
    }
    fn materialize(self) -> Self {
        Exploding(self.0.materialize())
    }
    fn visit<V: ModuleVisitor>(&self, visitor: &mut V) {
        self.0.visit(visitor)
    }
    fn map<M: ModuleMapper>(self, mapper: &mut M) -> Self {
        Exploding(self.0.map(mapper))
    }
    fn into_record(self) -> ModuleRecord {
        panic!("injected fault: read-back failed");
    }
}

fn net(device: &Device) -> Net {
    Net {
        a: LinearConfig::new(4, 4).init(device),
    }
}

#[test]
fn a_panic_in_the_background_is_returned_by_the_next_snapshot_and_later_saves_go_on() {
    let device = Device::flex();
    let dir = tempfile::tempdir().unwrap();
    // Queue depth 0: each `snapshot` hands its job to the worker only once the previous
    // one is done, so the call after the failing one is sure to see its error.
    let saver =
        StepSaver::open(dir.path(), StepSaverConfig::default().with_queue_depth(0)).unwrap();
    let optim: ModuleOptimizer = AdamWConfig::new().init();
    let good = net(&device);
    saver.snapshot(1, &good, &optim).submit().unwrap();
    saver
        .snapshot(2, &Exploding(good.clone()), &optim)
        .submit()
        .unwrap();
    saver.snapshot(3, &good, &optim).submit().unwrap();
    let err = saver.snapshot(4, &good, &optim).submit().unwrap_err();
    match &err {
        Error::Background { step: 2, source } => {
            assert!(
                matches!(&**source, Error::Panicked { message, .. } if message.contains("injected fault")),
                "{err:?}"
            )
        }
        other => panic!("expected the background panic of step 2, got {other:?}"),
    }
    // Step 4 was refused, not queued; nothing else was lost or reported twice.
    saver.flush().unwrap();
    assert_eq!(saver.steps(), vec![1, 3]);
    let saved: Vec<u64> = saver.stats().iter().map(|s| s.step).collect();
    assert_eq!(saved, vec![1, 3]);
    // The worker survived the panic: later saves and restores work.
    saver.snapshot(5, &good, &optim).submit().unwrap();
    saver.flush().unwrap();
    assert_eq!(saver.steps(), vec![1, 3, 5]);
    let restored = saver.restore(3).unwrap();
    assert_eq!(restored.step, 3);
    saver.close().unwrap();
}

#[test]
fn close_reports_a_pending_save_that_fails_and_keeps_the_others() {
    let device = Device::flex();
    let dir = tempfile::tempdir().unwrap();
    let saver =
        StepSaver::open(dir.path(), StepSaverConfig::default().with_queue_depth(4)).unwrap();
    let optim: ModuleOptimizer = AdamWConfig::new().init();
    let good = net(&device);
    saver.snapshot(1, &good, &optim).submit().unwrap();
    saver
        .snapshot(2, &Exploding(good.clone()), &optim)
        .submit()
        .unwrap();
    saver.snapshot(3, &good, &optim).submit().unwrap();
    let err = saver.close().unwrap_err();
    assert!(matches!(err, Error::Background { step: 2, .. }), "{err:?}");
    let reopened = StepSaver::open(dir.path(), StepSaverConfig::default()).unwrap();
    assert_eq!(reopened.steps(), vec![1, 3]);
}

#[test]
fn dropping_the_saver_finishes_its_pending_saves() {
    let device = Device::flex();
    let dir = tempfile::tempdir().unwrap();
    let saver =
        StepSaver::open(dir.path(), StepSaverConfig::default().with_queue_depth(8)).unwrap();
    let optim: ModuleOptimizer = AdamWConfig::new().init();
    let good = net(&device);
    for step in 1..=6 {
        saver.snapshot(step, &good, &optim).submit().unwrap();
    }
    drop(saver);
    let reopened = StepSaver::open(dir.path(), StepSaverConfig::default()).unwrap();
    assert_eq!(reopened.steps(), vec![1, 2, 3, 4, 5, 6]);
    assert_eq!(reopened.latest().unwrap().unwrap().step, 6);
}

#[test]
fn every_failed_step_is_reported_once_oldest_first() {
    let device = Device::flex();
    let dir = tempfile::tempdir().unwrap();
    let saver =
        StepSaver::open(dir.path(), StepSaverConfig::default().with_queue_depth(4)).unwrap();
    let optim: ModuleOptimizer = AdamWConfig::new().init();
    let good = net(&device);
    saver.snapshot(1, &good, &optim).submit().unwrap();
    saver
        .snapshot(2, &Exploding(good.clone()), &optim)
        .submit()
        .unwrap();
    saver
        .snapshot(3, &Exploding(good.clone()), &optim)
        .submit()
        .unwrap();
    saver.snapshot(4, &good, &optim).submit().unwrap();
    for failed in [2, 3] {
        let err = saver.flush().unwrap_err();
        assert!(
            matches!(err, Error::Background { step, .. } if step == failed),
            "{err:?}"
        );
    }
    saver.flush().unwrap();
    assert_eq!(saver.steps(), vec![1, 4]);
}
