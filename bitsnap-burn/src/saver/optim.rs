//! What the saver knows of the optimizer: the update rule it names in the snapshot's
//! metadata (`bitsnap.optimizer`, read by the replay codec), and a `ModuleOptimizer` whose
//! restored state lands on the model's device.
//!
//! Burn 0.22's `ModuleOptimizer::load_record` builds every state tensor on
//! `Device::default()`, which in a build with a GPU backend is the GPU even when the model
//! trains on the CPU (the state only moves at the next `step`). [`OptimizerSpec::init_on`]
//! gives the optimizer one extra parameter group, matching every parameter, whose optimizer
//! is the configured one except that it rebuilds state on a chosen device. Steps, saves and
//! moves delegate to the configured optimizer, so training is bit for bit the same.
//! The same group lets a [`StepSaver`](super::StepSaver) read Adam and AdamW state tensors
//! in its one read-back transaction instead of one by one ([`capture`](super::capture)).
//! Upstream, Burn would need `ModuleOptimizer::load_record_on(record, &Device)` (or a
//! device argument to `load_record`) and public access to the state's tensors (a
//! `ModuleOptimizer::visit_state`) to make this wrapper unnecessary.

use burn::grad_clipping::{GradientClipping, GradientClippingConfig};
use burn::module::ParamGroup;
use burn::optim::LearningRate;
use burn::optim::{
    AdamConfig, AdamWConfig, DynOptimizer, DynState, ModuleOptimizer, Optimizer, StateSink,
    StateSource,
};
use burn::tensor::Device;
use burn::tensor::kind::BridgeTensor;
use serde::Deserialize;

/// An optimizer configuration the saver understands (Burn's [`AdamWConfig`] and
/// [`AdamConfig`]).
pub trait OptimizerSpec {
    /// The `bitsnap.optimizer` metadata value (`<rule>:beta1=..,beta2=..,eps=..,
    /// weight_decay=..`), or `None` when the configuration is one the replay predictor does
    /// not model (AMSGrad, cautious weight decay).
    fn replay_rule(&self) -> Option<String>;

    /// The optimizer, built as `init()` builds it (gradient clipping included), whose state
    /// is rebuilt on `device` by `load_record` instead of on `Device::default()`.
    ///
    /// ```
    /// # use bitsnap_burn::OptimizerSpec;
    /// use burn::optim::{AdamWConfig, ModuleOptimizer};
    /// let device = burn::tensor::Device::flex();
    /// let optim: ModuleOptimizer = AdamWConfig::new().init_on(&device);
    /// // optim.load_record(restored.optimizer) keeps every state tensor on `device`.
    /// # let _ = optim;
    /// ```
    fn init_on(&self, device: &Device) -> ModuleOptimizer;
}

/// The fields of Burn's Adam configurations that the rule names (they are private in Burn;
/// the configurations serialize them).
#[derive(Deserialize)]
struct AdamFields {
    beta_1: f32,
    beta_2: f32,
    epsilon: f32,
    #[serde(default)]
    amsgrad: bool,
    #[serde(default)]
    cautious_weight_decay: bool,
    #[serde(default)]
    weight_decay: Option<serde_json::Value>,
    #[serde(default)]
    grad_clipping: Option<GradientClippingConfig>,
}

impl AdamFields {
    fn of(config: &impl serde::Serialize) -> Option<AdamFields> {
        serde_json::to_value(config)
            .ok()
            .and_then(|v| serde_json::from_value(v).ok())
    }

    /// AdamW's decay is a number; Adam's an optional `{ "penalty": p }`.
    fn decay(&self) -> f32 {
        match &self.weight_decay {
            Some(serde_json::Value::Number(n)) => n.as_f64().unwrap_or(0.0) as f32,
            Some(serde_json::Value::Object(o)) => o
                .get("penalty")
                .and_then(|p| p.as_f64())
                .map_or(0.0, |p| p as f32),
            _ => 0.0,
        }
    }

    fn rule(&self, name: &str) -> Option<String> {
        if self.amsgrad || self.cautious_weight_decay {
            return None;
        }
        Some(format!(
            "{name}:beta1={},beta2={},eps={},weight_decay={}",
            self.beta_1,
            self.beta_2,
            self.epsilon,
            self.decay()
        ))
    }
}

impl OptimizerSpec for AdamWConfig {
    fn replay_rule(&self) -> Option<String> {
        AdamFields::of(self)?.rule("adamw-burn")
    }

    fn init_on(&self, device: &Device) -> ModuleOptimizer {
        on_device(self.build(), AdamFields::of(self), device)
    }
}

impl OptimizerSpec for AdamConfig {
    fn replay_rule(&self) -> Option<String> {
        AdamFields::of(self)?.rule("adam-burn")
    }

    fn init_on(&self, device: &Device) -> ModuleOptimizer {
        on_device(self.build(), AdamFields::of(self), device)
    }
}

fn on_device<O: Optimizer>(
    bare: O,
    fields: Option<AdamFields>,
    device: &Device,
) -> ModuleOptimizer {
    let clipping = fields
        .and_then(|f| f.grad_clipping)
        .map(|c: GradientClippingConfig| c.init());
    optimizer_on(bare, clipping, device)
}

/// Any Burn optimizer as a `ModuleOptimizer` (as `ModuleOptimizer::from(optimizer)`, with
/// `grad_clipping` as `with_grad_clipping` sets it) whose state `load_record` rebuilds on
/// `device` (its inner, non-autodiff device) instead of on `Device::default()`.
/// [`OptimizerSpec::init_on`] does this for Adam and AdamW configurations.
pub fn optimizer_on<O: Optimizer>(
    optimizer: O,
    grad_clipping: Option<GradientClipping>,
    device: &Device,
) -> ModuleOptimizer {
    let mut optim = ModuleOptimizer::from(optimizer.clone());
    if let Some(c) = grad_clipping.clone() {
        optim = optim.with_grad_clipping(c);
    }
    optim.with_group(
        ParamGroup::all(),
        OnDevice {
            inner: optimizer,
            device: device.clone().inner(),
        },
        grad_clipping,
    )
}

/// A Burn optimizer whose state is rebuilt on `device` when loaded from a record, and
/// whose Adam state tensors a saver's read-back registers in its one transaction.
struct OnDevice<O> {
    inner: O,
    device: Device,
}

impl<O: Optimizer> DynOptimizer for OnDevice<O> {
    fn step_dyn(
        &self,
        rank: usize,
        lr: LearningRate,
        tensor: BridgeTensor,
        grad: BridgeTensor,
        state: Option<DynState>,
    ) -> (BridgeTensor, Option<DynState>) {
        self.inner.step_dyn(rank, lr, tensor, grad, state)
    }

    fn to_device_dyn(&self, state: DynState, device: &Device) -> DynState {
        self.inner.to_device_dyn(state, device)
    }

    /// During a [`StepSaver`](super::StepSaver) read-back, Adam states hand their tensors
    /// to the read-back transaction ([`capture`](super::capture)); otherwise (and for other
    /// optimizers) Burn flattens the state.
    fn state_flatten(&self, prefix: &str, state: &DynState, out: &mut StateSink) {
        if !super::capture::offer::<O>(prefix, state, out) {
            self.inner.state_flatten(prefix, state, out)
        }
    }

    fn state_unflatten(
        &self,
        rank: usize,
        prefix: &str,
        src: &mut StateSource,
        _default_device: &Device,
    ) -> Option<DynState> {
        self.inner.state_unflatten(rank, prefix, src, &self.device)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::optim::decay::WeightDecayConfig;

    #[test]
    fn rules_name_burn_defaults_in_shortest_round_trip_form() {
        assert_eq!(
            AdamWConfig::new().replay_rule().as_deref(),
            Some("adamw-burn:beta1=0.9,beta2=0.999,eps=0.00001,weight_decay=0.0001")
        );
        let adam = AdamConfig::new()
            .with_beta_2(0.95)
            .with_weight_decay(Some(WeightDecayConfig::new(0.01)));
        assert_eq!(
            adam.replay_rule().as_deref(),
            Some("adam-burn:beta1=0.9,beta2=0.95,eps=0.00001,weight_decay=0.01")
        );
        assert_eq!(
            AdamConfig::new().replay_rule().as_deref(),
            Some("adam-burn:beta1=0.9,beta2=0.999,eps=0.00001,weight_decay=0")
        );
    }

    #[test]
    fn rules_the_replay_cannot_model_are_not_named() {
        assert_eq!(AdamWConfig::new().with_amsgrad(true).replay_rule(), None);
        assert_eq!(
            AdamWConfig::new()
                .with_cautious_weight_decay(true)
                .replay_rule(),
            None
        );
    }
}
