//! Reading a model (and, through [`capture`](super::capture), its optimizer's state) back
//! from its device in one batched transaction.
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
use burn::tensor::kind::{Autodiff, Transaction};
use burn::tensor::{Bool, Int, Tensor};

use crate::Error;

/// Which record a tensor registered in a [`Batch`] belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Part {
    /// A model parameter, named by module path.
    Model,
    /// An optimizer state tensor, named `<param id>.<field path>` as Burn's
    /// `OptimizerRecord` names it.
    Optimizer,
}

/// Tensors registered for one read-back: every one goes into the same Burn
/// `Transaction`, so a GPU reads them all in one submission.
#[derive(Default)]
pub(crate) struct Batch {
    transaction: burn::tensor::Transaction,
    entries: Vec<(Part, String, u64)>,
}

/// What a [`Batch`] read back, each part sorted by name (the order burnpack lists them).
pub(crate) struct BatchData {
    pub model: Vec<burn_pack::Tensor>,
    pub optimizer: Vec<burn_pack::Tensor>,
}

impl BatchData {
    /// Bytes read back for `part`.
    pub fn bytes(&self, part: Part) -> u64 {
        let list = match part {
            Part::Model => &self.model,
            Part::Optimizer => &self.optimizer,
        };
        list.iter().map(|t| t.byte_len() as u64).sum()
    }
}

impl Batch {
    /// Registers every parameter of `module` (in its saved form), named by module path.
    pub fn add_module<M: Module>(&mut self, module: &M) {
        let mut collector = Collector {
            path: Vec::new(),
            batch: self,
        };
        module.visit(&mut collector);
    }

    /// Registers `tensor` as `name` of `part`, with parameter id `param_id`. It is read
    /// without its autodiff association: a transaction takes tensors of one backend, and
    /// an autodiff model's parameters are wrapped while its optimizer's state is not.
    pub fn register<const D: usize, K: Transaction + Autodiff>(
        &mut self,
        part: Part,
        name: String,
        param_id: u64,
        tensor: Tensor<D, K>,
    ) {
        self.entries.push((part, name, param_id));
        self.transaction =
            std::mem::take(&mut self.transaction).register(tensor.without_autodiff());
    }

    /// Tensors registered for `part`.
    pub fn count(&self, part: Part) -> usize {
        self.entries.iter().filter(|(p, ..)| *p == part).count()
    }

    /// Reads every registered tensor back in one transaction.
    pub fn execute(self) -> Result<BatchData, Error> {
        let Batch {
            transaction,
            entries,
        } = self;
        let data = if entries.is_empty() {
            Vec::new()
        } else {
            transaction.try_execute().map_err(|e| Error::Device {
                operation: format!("reading {} tensors back", entries.len()),
                source: Box::new(e),
            })?
        };
        let mut out = BatchData {
            model: Vec::new(),
            optimizer: Vec::new(),
        };
        for ((part, name, id), data) in entries.into_iter().zip(data) {
            let (bytes, shape, dtype) = data.into_parts();
            let t = burn_pack::Tensor::new(name, dtype, shape.to_vec(), Some(id), bytes);
            match part {
                Part::Model => out.model.push(t),
                Part::Optimizer => out.optimizer.push(t),
            }
        }
        // Burnpack lists tensors by name: the same order as snapshots taken from records.
        out.model.sort_by(|a, b| a.name.cmp(&b.name));
        out.optimizer.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }
}

/// Registers every parameter (in its saved form) in a batch, in visiting order.
struct Collector<'a> {
    path: Vec<String>,
    batch: &'a mut Batch,
}

impl Collector<'_> {
    fn register<const D: usize, K: Transaction + Autodiff>(
        &mut self,
        id: ParamId,
        tensor: Tensor<D, K>,
    ) {
        let name = self.path.join(".");
        self.batch.register(Part::Model, name, id.val(), tensor);
    }
}

impl ModuleVisitor for Collector<'_> {
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
    use crate::bridge::{self, Metadata, RecordKind};
    use burn::nn::{Linear, LinearConfig};

    /// The module's parameters, named by module path as `ModuleRecord` names them, read back
    /// in one transaction; tensor names get `prefix`.
    fn module_tensors<M: Module>(
        module: &M,
        prefix: &str,
    ) -> Result<(Vec<bitsnap_core::Tensor>, Metadata), Error> {
        let mut batch = Batch::default();
        batch.add_module(module);
        let read = batch.execute()?;
        bridge::from_pack_tensors(read.model, RecordKind::Module, prefix)
    }

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
