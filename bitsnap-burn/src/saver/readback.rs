//! Reading a model back from its device in one batched transaction.
//!
//! `Module::into_record` reads each parameter with its own synchronous `into_data`, and
//! the record then goes through burnpack bytes (a second copy) before bitsnap's tensors
//! are cut out of them (a third). Here the parameters are registered in one Burn
//! `Transaction` (one submission, reads in flight together on a GPU), and each read
//! buffer becomes a bitsnap tensor without a further copy where the allocation allows
//! (`Bytes::try_into_vec`). The tensors and metadata are exactly what the record path
//! gives (same names, parameter ids, Burn dtypes), so snapshots taken either way restore
//! through `ModuleRecord`.

use burn::module::{Module, ModuleVisitor, Param, ParamId};
use burn::store::burn_pack;
use burn::tensor::{Bool, Int, Tensor, Transaction};

use crate::Error;
use crate::bridge::{self, Metadata, RecordKind};

/// The module's parameters, named by module path as `ModuleRecord` names them, read back
/// in one transaction; tensor names get `prefix`.
pub(crate) fn module_tensors<M: Module>(
    module: &M,
    prefix: &str,
) -> Result<(Vec<bitsnap_core::Tensor>, Metadata), Error> {
    let mut collector = Collector {
        path: Vec::new(),
        params: Vec::new(),
        transaction: Some(Transaction::default()),
    };
    module.visit(&mut collector);
    let Collector {
        params,
        transaction,
        ..
    } = collector;
    let data = match transaction {
        Some(t) if !params.is_empty() => t.try_execute().map_err(|e| Error::Device {
            operation: format!("reading {} model tensors back", params.len()),
            source: Box::new(e),
        })?,
        _ => Vec::new(),
    };
    let mut pack: Vec<burn_pack::Tensor> = params
        .into_iter()
        .zip(data)
        .map(|((path, id), data)| {
            let (bytes, shape, dtype) = data.into_parts();
            burn_pack::Tensor::new(path, dtype, shape.to_vec(), Some(id.val()), bytes)
        })
        .collect();
    // Burnpack lists tensors by name: the same order as snapshots taken from records.
    pack.sort_by(|a, b| a.name.cmp(&b.name));
    bridge::from_pack_tensors(pack, RecordKind::Module, prefix)
}

/// Registers every parameter (in its saved form) in one transaction, in visiting order.
struct Collector {
    path: Vec<String>,
    params: Vec<(String, ParamId)>,
    transaction: Option<Transaction>,
}

impl Collector {
    fn register<const D: usize, K: burn::tensor::kind::Transaction>(
        &mut self,
        id: ParamId,
        tensor: Tensor<D, K>,
    ) {
        self.params.push((self.path.join("."), id));
        self.transaction = self.transaction.take().map(|t| t.register(tensor));
    }
}

impl ModuleVisitor for Collector {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        self.register(param.id, param.transform_for_save().val());
    }

    fn visit_int<const D: usize>(&mut self, param: &Param<Tensor<D, Int>>) {
        self.register(param.id, param.transform_for_save().val());
    }

    fn visit_bool<const D: usize>(&mut self, param: &Param<Tensor<D, Bool>>) {
        self.register(param.id, param.transform_for_save().val());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::nn::{Linear, LinearConfig};
    use burn::train::checkpoint::Checkpoint;

    #[derive(Module, Debug)]
    struct Net {
        a: Linear,
        b: Option<Linear>,
    }

    /// The transaction path gives what the record path gives, tensor for tensor and key
    /// for key.
    #[test]
    fn a_transaction_read_back_equals_the_record_path() {
        let device = burn::tensor::Device::flex();
        let net = Net {
            a: LinearConfig::new(3, 4).init(&device),
            b: Some(LinearConfig::new(4, 2).with_bias(false).init(&device)),
        };
        let (tensors, mut meta) = module_tensors(&net, "model/").unwrap();
        let bytes = net.clone().into_record().checkpoint_into_bytes().unwrap();
        let (want, mut want_meta) =
            bridge::from_burnpack(bytes, RecordKind::Module, "model/").unwrap();
        assert_eq!(tensors.len(), 3);
        assert_eq!(tensors, want);
        meta.sort();
        want_meta.sort();
        assert_eq!(meta, want_meta);
    }
}
