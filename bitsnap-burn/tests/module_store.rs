//! `module.save_into` / `load_from` through `BitSnapModuleStore`.

use bitsnap_burn::BitSnapModuleStore;
use burn::module::Module;
use burn::nn::{Linear, LinearConfig};
use burn::store::{ModuleSnapshot, ModuleStore};
use burn::tensor::{Device, Tensor, TensorData};

#[derive(Module, Debug)]
struct Net {
    a: Linear,
    b: Linear,
}

fn net(device: &Device) -> Net {
    Net {
        a: LinearConfig::new(8, 16).init(device),
        b: LinearConfig::new(16, 2).init(device),
    }
}

fn output(n: &Net, device: &Device) -> Vec<f32> {
    let x = Tensor::<2>::from_data(
        TensorData::new((0..24).map(|i| i as f32 * 0.1).collect::<Vec<_>>(), [3, 8]),
        device,
    );
    n.b.forward(n.a.forward(x))
        .into_data()
        .try_to_vec::<f32>()
        .expect("f32")
}

#[test]
fn save_into_and_load_from_round_trip_exactly() {
    let device = Device::flex();
    let dir = tempfile::tempdir().unwrap();
    let trained = net(&device);
    let mut store = BitSnapModuleStore::open(dir.path())
        .unwrap()
        .with_name("v1");
    trained.save_into(&mut store).unwrap();
    drop(store); // one writer at a time holds a store
    // A second, different module saved as the next snapshot (a delta on the first).
    let other = net(&device);
    let mut store2 = BitSnapModuleStore::open(dir.path())
        .unwrap()
        .with_name("v2");
    other.save_into(&mut store2).unwrap();

    let mut fresh = net(&device);
    let mut load = BitSnapModuleStore::open(dir.path())
        .unwrap()
        .with_name("v1");
    let result = fresh.load_from(&mut load).unwrap();
    assert_eq!(result.applied.len(), 4);
    assert!(result.missing.is_empty() && result.unused.is_empty());
    assert_eq!(output(&fresh, &device), output(&trained, &device));
    assert_eq!(
        load.keys().unwrap(),
        vec!["a.bias", "a.weight", "b.bias", "b.weight"]
    );
    // Latest by default.
    let mut latest = BitSnapModuleStore::open(dir.path()).unwrap();
    let mut fresh2 = net(&device);
    fresh2.load_from(&mut latest).unwrap();
    assert_eq!(output(&fresh2, &device), output(&other, &device));
}

#[test]
fn a_missing_snapshot_is_a_clear_error() {
    let device = Device::flex();
    let dir = tempfile::tempdir().unwrap();
    let mut store = BitSnapModuleStore::open(dir.path())
        .unwrap()
        .with_name("nope");
    let err = net(&device).load_from(&mut store).unwrap_err();
    assert!(err.to_string().contains("nope"), "{err}");
}
