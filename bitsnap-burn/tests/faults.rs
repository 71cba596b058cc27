//! Background faults are reported to the trainer, never lost.

use bitsnap_burn::{Error, StepSaver, StepSaverConfig};
use burn::module::Module;
use burn::nn::{Linear, LinearConfig};
use burn::optim::{AdamWConfig, ModuleOptimizer};
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
    saver.snapshot(1, &model, &optim).unwrap();
    saver.flush().unwrap();
    // The disk goes away under the saver: the next save fails in the background.
    std::fs::remove_dir_all(&store_dir).unwrap();
    saver.snapshot(2, &model, &optim).unwrap();
    let err = saver.flush().unwrap_err();
    assert!(matches!(err, Error::Background { step: 2, .. }), "{err:?}");
    assert!(err.to_string().contains("store"), "{err}");
    // Reported once; the saver keeps working when the disk is back.
    std::fs::create_dir_all(&store_dir).unwrap();
    saver.flush().unwrap();
    assert_eq!(saver.stats().len(), 1);
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
        saver.snapshot(step, &model, &optim).unwrap();
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
        saver.snapshot(step, &model, &optim).unwrap();
    }
    saver.flush().unwrap();
    assert_eq!(saver.steps(), vec![4, 5]);
    assert!(saver.restore(4).is_ok() && saver.restore(2).is_err());
}
