//! The optimizer's state tensors registered in the read-back transaction instead of read
//! one by one.
//!
//! `ModuleOptimizer::to_record` flattens each parameter's state through its group's
//! `DynOptimizer::state_flatten`, and Burn's own flattening reads every state tensor with a
//! synchronous `into_data` (on a GPU: one submission and one wait per tensor). The
//! optimizer [`OptimizerSpec::init_on`](super::OptimizerSpec::init_on) and
//! [`optimizer_on`](super::optimizer_on) build routes every parameter through its own
//! group, whose `state_flatten` calls [`offer`] first: while [`optimizer_record`] runs on
//! this thread, a state whose type is known here (Burn's `AdamWState` and `AdamState`) hands
//! its tensor handles (cheap clones) to the read-back [`Batch`] instead, and only its
//! scalars (Adam's `time`) go into the record. The record keeps its ranks, scalars and
//! parameter paths; the tensors come back from the same transaction as the model's, under
//! the names and parameter ids the record path gives them.
//!
//! Optimizers built another way (`AdamWConfig::init()`, or other optimizers' states) are
//! flattened by Burn as before: their state tensors are read inside `to_record`.

use std::any::Any;
use std::cell::RefCell;

use burn::optim::{
    AdamState, AdamWState, AdaptiveMomentumState, DynState, ModuleOptimizer, Optimizer,
    OptimizerRecord, StateSink, join_path,
};
use burn::store::burn_pack::Scalar;

use super::readback::{Batch, Part};

thread_local! {
    /// The batch of the read-back running on this thread, while `to_record` runs.
    static CAPTURE: RefCell<Option<Batch>> = const { RefCell::new(None) };
}

/// `optimizer.to_record()`, with the state tensors of known state types registered in
/// `batch` instead of read (their names are `<param id>.<field path>`, as in the record).
pub(crate) fn optimizer_record(batch: &mut Batch, optimizer: &ModuleOptimizer) -> OptimizerRecord {
    /// Clears the capture even when `to_record` panics, so that no later flatten on this
    /// thread registers into a batch nobody reads.
    struct Active;
    impl Drop for Active {
        fn drop(&mut self) {
            CAPTURE.with_borrow_mut(|c| c.take());
        }
    }
    CAPTURE.set(Some(std::mem::take(batch)));
    let active = Active;
    let record = optimizer.to_record();
    if let Some(b) = CAPTURE.with_borrow_mut(|c| c.take()) {
        *batch = b;
    }
    drop(active);
    record
}

/// Called by the saver's optimizer group for each parameter's state: when a capture is
/// active and `O`'s state type is one whose tensors are known, registers them in the
/// batch, pushes the scalars into `out` and returns `true`; otherwise returns `false` (the
/// caller flattens through Burn).
pub(super) fn offer<O: Optimizer>(prefix: &str, state: &DynState, out: &mut StateSink) -> bool {
    CAPTURE.with_borrow_mut(|capture| {
        let Some(batch) = capture.as_mut() else {
            return false;
        };
        // `to_record` names each parameter's state by its id.
        let Ok(param_id) = prefix.parse::<u64>() else {
            return false;
        };
        macro_rules! ranks {
            ($($d:literal)*) => {
                match state.rank() {
                    $($d => take::<O, $d>(batch, param_id, prefix, state, out),)*
                    _ => false,
                }
            };
        }
        ranks!(0 1 2 3 4 5 6 7 8)
    })
}

/// Registers the Adam moments of a rank-`D` state of `O`, if `O::State<D>` is an Adam state.
fn take<O: Optimizer, const D: usize>(
    batch: &mut Batch,
    param_id: u64,
    prefix: &str,
    state: &DynState,
    out: &mut StateSink,
) -> bool {
    // `DynState` of a parameter in `O`'s group holds `O::State<D>` (Burn's invariant).
    let concrete: &dyn Any = state.downcast_ref::<O::State<D>>();
    let momentum = if let Some(s) = concrete.downcast_ref::<AdamWState<D>>() {
        &s.momentum
    } else if let Some(s) = concrete.downcast_ref::<AdamState<D>>() {
        &s.momentum
    } else {
        return false;
    };
    register_momentum(
        batch,
        param_id,
        &join_path(prefix, "momentum"),
        momentum,
        out,
    );
    true
}

/// What `#[derive(RecordState)]` pushes for `AdaptiveMomentumState` (fields in declaration
/// order: `time`, `moment_1`, `moment_2`, `max_moment_2` when present), with tensors
/// registered instead of read.
fn register_momentum<const D: usize>(
    batch: &mut Batch,
    param_id: u64,
    prefix: &str,
    m: &AdaptiveMomentumState<D>,
    out: &mut StateSink,
) {
    out.push_scalar(prefix, "time", Scalar::from(m.time));
    let mut tensor = |leaf: &str, t: &burn::tensor::Tensor<D>| {
        batch.register(
            Part::Optimizer,
            join_path(prefix, leaf),
            param_id,
            t.clone(),
        );
    };
    tensor("moment_1", &m.moment_1);
    tensor("moment_2", &m.moment_2);
    if let Some(max) = &m.max_moment_2 {
        tensor("max_moment_2", max);
    }
}

#[cfg(test)]
mod tests {
    use burn::module::Module;
    use burn::nn::{Linear, LinearConfig};
    use burn::optim::{AdamConfig, AdamWConfig, GradientsParams};
    use burn::tensor::{Device, Tensor};
    use burn::train::checkpoint::Checkpoint;

    use super::super::OptimizerSpec;
    use super::super::request::read_state;
    use super::super::restored::{Restored, RestoredFrom};
    use super::*;
    use crate::bridge::{self, Metadata, RecordKind};

    #[derive(Module, Debug)]
    struct Net {
        a: Linear,
        b: Linear,
    }

    /// Two optimizer steps of a two-layer net (three parameters: two weights, one bias).
    fn trained(optim: &mut ModuleOptimizer, device: &Device) -> Net {
        let mut net = Net {
            a: LinearConfig::new(3, 4).init(device),
            b: LinearConfig::new(4, 2).with_bias(false).init(device),
        };
        for k in 0..2 {
            let x = Tensor::<2>::ones([5, 3], device).mul_scalar(k as f32 + 0.5);
            let loss = net.b.forward(net.a.forward(x)).powf_scalar(2.0).mean();
            let grads = GradientsParams::from_grads(loss.backward(), &net);
            net = optim.step(1e-2, net, grads);
        }
        net
    }

    /// What the record path gives: `into_record` and `to_record` through burnpack bytes.
    fn record_path(net: &Net, optim: &ModuleOptimizer) -> (Vec<bitsnap_core::Tensor>, Metadata) {
        let bytes = net.clone().into_record().checkpoint_into_bytes().unwrap();
        let (mut tensors, mut meta) =
            bridge::from_burnpack(bytes, RecordKind::Module, "model/").unwrap();
        let bytes = optim.to_record().checkpoint_into_bytes().unwrap();
        let (t, m) = bridge::from_burnpack(bytes, RecordKind::Optimizer, "optim/").unwrap();
        tensors.extend(t);
        meta.extend(m);
        meta.sort();
        (tensors, meta)
    }

    /// The capture gives exactly what the record path gives — names, parameter ids, dtypes,
    /// scalars (`time`, ranks), paths — for AdamW (with and without AMSGrad's third moment)
    /// and Adam built by `init_on`, and an optimizer built by plain `init()` still goes
    /// the record way. A snapshot taken either way restores to the same optimizer state.
    #[test]
    fn optimizer_state_read_in_the_transaction_equals_the_record_path() {
        let device = Device::flex().autodiff();
        type Build<'a> = Box<dyn Fn() -> ModuleOptimizer + 'a>;
        let cases: [(&str, Build, usize); 4] = [
            (
                "adamw init_on",
                Box::new(|| AdamWConfig::new().init_on(&device)),
                6,
            ),
            (
                "adamw amsgrad init_on",
                Box::new(|| AdamWConfig::new().with_amsgrad(true).init_on(&device)),
                9,
            ),
            (
                "adam init_on",
                Box::new(|| AdamConfig::new().init_on(&device)),
                6,
            ),
            ("adamw init", Box::new(|| AdamWConfig::new().init()), 0),
        ];
        for (name, build, captured) in cases {
            let mut optim = build();
            let net = trained(&mut optim, &device);
            let (tensors, mut meta, stats) = read_state(&net, &optim).unwrap();
            meta.sort();
            let (want, want_meta) = record_path(&net, &optim);
            assert_eq!(stats.optimizer_in_transaction, captured, "{name}");
            assert_eq!(tensors.len(), 3 + captured.max(6), "{name}");
            assert_eq!(tensors, want, "{name}");
            assert_eq!(meta, want_meta, "{name}");
            assert!(
                meta.iter().any(|(k, _)| k.ends_with(".momentum.time")),
                "{name}: Adam's time is kept"
            );
            assert_eq!(
                stats.model_bytes + stats.optimizer_bytes,
                tensors.iter().map(|t| t.data.len() as u64).sum::<u64>()
            );

            // Restored into a fresh optimizer, the state is the one saved, bit for bit.
            let restored =
                Restored::from_tensors(2, &tensors, meta, RestoredFrom::Memory, Default::default())
                    .unwrap();
            let loaded = build().load_record(restored.optimizer);
            let again = loaded.to_record().checkpoint_into_bytes().unwrap();
            let (again, _) = bridge::from_burnpack(again, RecordKind::Optimizer, "optim/").unwrap();
            let saved: Vec<_> = want
                .into_iter()
                .filter(|t| t.name.starts_with("optim/"))
                .collect();
            assert_eq!(again, saved, "{name}");
        }
    }

    /// No capture outlives its `to_record`: a flatten on this thread afterwards is Burn's.
    #[test]
    fn no_capture_is_left_active() {
        let device = Device::flex().autodiff();
        let mut optim = AdamWConfig::new().init_on(&device);
        let net = trained(&mut optim, &device);
        let _ = read_state(&net, &optim).unwrap();
        assert!(CAPTURE.with_borrow(Option::is_none));
        assert_eq!(
            optim.to_record().len(),
            6,
            "Burn's own record has the tensors"
        );
    }
}
