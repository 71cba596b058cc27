//! The training state beside model and optimizer, as snapshot metadata and tensors.
//!
//! | key | value |
//! |---|---|
//! | `bitsnap.step` | optimizer steps taken (after the update that produced the state) |
//! | `bitsnap.lr` | learning rate of that update |
//! | `bitsnap.optimizer`, `bitsnap.peak_lr`, `bitsnap.warmup_steps` | from [`StepSaverConfig`](super::StepSaverConfig) |
//! | `bitsnap.state.scheduler` | `1` when the LR scheduler's record is stored (under `scheduler/`) |
//! | `bitsnap.state.rng.<name>` | an RNG state, JSON |
//! | `bitsnap.state.data_position` | the data loader's position, JSON |
//! | `bitsnap.state.user` | user metadata (config, metrics), JSON |

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::Error;
use crate::bridge::Metadata;

pub(crate) const STEP: &str = "bitsnap.step";
pub(crate) const LR: &str = "bitsnap.lr";
pub(crate) const OPTIMIZER: &str = "bitsnap.optimizer";
pub(crate) const PEAK_LR: &str = "bitsnap.peak_lr";
pub(crate) const WARMUP_STEPS: &str = "bitsnap.warmup_steps";
pub(crate) const SCHEDULER: &str = "bitsnap.state.scheduler";
pub(crate) const RNG: &str = "bitsnap.state.rng.";
pub(crate) const DATA_POSITION: &str = "bitsnap.state.data_position";
pub(crate) const USER: &str = "bitsnap.state.user";

/// Prefixes of the record tensors in a step snapshot.
pub(crate) const MODEL_PREFIX: &str = "model/";
pub(crate) const OPTIM_PREFIX: &str = "optim/";
pub(crate) const SCHEDULER_PREFIX: &str = "scheduler/";

/// `value` as JSON, for the metadata entry `key`.
pub(crate) fn to_json(key: &str, value: &impl Serialize) -> Result<String, Error> {
    serde_json::to_string(value).map_err(|source| Error::StateValue {
        key: key.to_string(),
        source,
    })
}

/// The metadata entry `key`, parsed from JSON; `None` when the snapshot has no such entry.
pub(crate) fn from_json<T: DeserializeOwned>(
    metadata: &Metadata,
    key: &str,
) -> Result<Option<T>, Error> {
    lookup(metadata, key)
        .map(|v| {
            serde_json::from_str(v).map_err(|source| Error::StateValue {
                key: key.to_string(),
                source,
            })
        })
        .transpose()
}

pub(crate) fn lookup<'a>(metadata: &'a Metadata, key: &str) -> Option<&'a str> {
    metadata
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_values_round_trip_and_a_bad_one_names_its_key() {
        let meta: Metadata = vec![
            (
                DATA_POSITION.into(),
                to_json(DATA_POSITION, &(3u32, 17u64)).unwrap(),
            ),
            (USER.into(), "{not json".into()),
        ];
        let pos: Option<(u32, u64)> = from_json(&meta, DATA_POSITION).unwrap();
        assert_eq!(pos, Some((3, 17)));
        assert_eq!(from_json::<u8>(&meta, "absent").unwrap(), None);
        let err = from_json::<serde_json::Value>(&meta, USER).unwrap_err();
        assert!(
            matches!(&err, Error::StateValue { key, .. } if key == USER),
            "{err:?}"
        );
        assert!(err.to_string().contains(USER));
    }
}
