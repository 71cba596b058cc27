//! `bitsnap.derive` rules for the optimizer replay codec: which Adam moments belong to
//! which model tensor. Burn's names (`model/<module path>`, `optim/<id>.momentum.moment_1`)
//! do not pair by any naming convention; the parameter id does.

use std::collections::HashMap;

use bitsnap_core::Tensor;

use super::state::{MODEL_PREFIX, OPTIM_PREFIX};
use crate::bridge;

/// The metadata key the replay codec reads its pairing rules from.
pub(crate) const DERIVE: &str = bitsnap_core::references::replay::keys::DERIVE;

/// `replay:model/<path>=optim/<m1>,optim/<m2>` for every model tensor whose parameter
/// has both Adam moments in `tensors`, `;`-separated; `None` when there is none.
pub(crate) fn replay_rules(tensors: &[Tensor], meta: &[(String, String)]) -> Option<String> {
    let id = |name: &str| {
        bridge::param_id_of(name, meta).or_else(|| {
            // Optimizer records key their state by parameter id: `optim/<id>.momentum...`.
            let rest = name.strip_prefix(OPTIM_PREFIX)?;
            rest.split('.').next()?.parse().ok()
        })
    };
    let mut moments: HashMap<u64, (Option<&str>, Option<&str>)> = HashMap::new();
    for t in tensors.iter().filter(|t| t.name.starts_with(OPTIM_PREFIX)) {
        let Some(pid) = id(&t.name) else { continue };
        let slot = moments.entry(pid).or_default();
        if t.name.ends_with(".moment_1") {
            slot.0 = Some(&t.name);
        } else if t.name.ends_with(".moment_2") {
            slot.1 = Some(&t.name);
        }
    }
    let rules: Vec<String> = tensors
        .iter()
        .filter(|t| t.name.starts_with(MODEL_PREFIX))
        .filter_map(|t| {
            let (Some(m), Some(v)) = *moments.get(&bridge::param_id_of(&t.name, meta)?)? else {
                return None;
            };
            Some(format!("replay:{}={m},{v}", t.name))
        })
        .collect();
    (!rules.is_empty()).then(|| rules.join(";"))
}

#[cfg(test)]
mod tests {
    use bitsnap_core::Role;

    use super::*;

    #[test]
    fn pairs_model_tensors_with_their_moments_by_parameter_id() {
        let t = |name: &str| Tensor::from_f32(name, &[1], Role::Weight, &[0.0]).unwrap();
        let tensors = vec![
            t("model/layer.weight"),
            t("model/layer.bias"),
            t("optim/7.momentum.moment_1"),
            t("optim/7.momentum.moment_2"),
            t("optim/9.momentum.moment_1"),
        ];
        let meta = vec![
            ("model/burn.pid.layer.weight".to_string(), "7".to_string()),
            ("model/burn.pid.layer.bias".to_string(), "9".to_string()),
        ];
        assert_eq!(
            replay_rules(&tensors, &meta).as_deref(),
            Some("replay:model/layer.weight=optim/7.momentum.moment_1,optim/7.momentum.moment_2")
        );
        assert_eq!(replay_rules(&tensors[..2], &meta), None);
    }
}
