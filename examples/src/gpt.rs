//! A small decoder-only transformer language model over bytes.

use burn::module::Module;
use burn::nn::attention::generate_autoregressive_mask;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::nn::transformer::{
    TransformerEncoder, TransformerEncoderConfig, TransformerEncoderInput,
};
use burn::nn::{Embedding, EmbeddingConfig, LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::tensor::{Device, Int, Tensor};
use serde::{Deserialize, Serialize};

/// Shape of a [`Gpt`].
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct GptConfig {
    /// Vocabulary size (bytes: 128 covers ASCII).
    pub vocab: usize,
    /// Width of the residual stream.
    pub d_model: usize,
    /// Attention heads per block.
    pub n_heads: usize,
    /// Transformer blocks.
    pub n_layers: usize,
    /// Context length in tokens.
    pub context: usize,
    /// Dropout probability in the transformer blocks (attention weights, residual
    /// branches, feed-forward). A resumed run draws the same masks because the run
    /// reseeds the device's generator each step from a saved stream
    /// ([`crate::loader::DropoutSeeds`]).
    #[serde(default)]
    pub dropout: f64,
}

impl GptConfig {
    /// Builds the model on `device` (initialised from the device's random generator).
    pub fn init(&self, device: &Device) -> Gpt {
        let blocks = TransformerEncoderConfig::new(
            self.d_model,
            4 * self.d_model,
            self.n_heads,
            self.n_layers,
        )
        .with_dropout(self.dropout)
        .with_norm_first(true)
        .init(device);
        Gpt {
            tokens: EmbeddingConfig::new(self.vocab, self.d_model).init(device),
            positions: EmbeddingConfig::new(self.context, self.d_model).init(device),
            blocks,
            norm: LayerNormConfig::new(self.d_model).init(device),
            head: LinearConfig::new(self.d_model, self.vocab).init(device),
        }
    }

    /// Parameter count, computed from the shapes.
    pub fn num_params(&self) -> usize {
        let d = self.d_model;
        let block = 4 * d * d + 4 * d // attention: q, k, v, o with biases
            + 2 * (d * 4 * d) + 4 * d + d // feed-forward, with biases
            + 4 * d; // two layer norms
        self.vocab * d
            + self.context * d
            + self.n_layers * block
            + 2 * d
            + d * self.vocab
            + self.vocab
    }
}

/// Token and position embeddings, pre-norm transformer blocks with a causal mask, a final
/// layer norm and a linear head over the vocabulary.
#[derive(Module, Debug)]
pub struct Gpt {
    tokens: Embedding,
    positions: Embedding,
    blocks: TransformerEncoder,
    norm: LayerNorm,
    head: Linear,
}

impl Gpt {
    /// Logits `[batch, time, vocab]` for tokens `[batch, time]`.
    pub fn forward(&self, input: Tensor<2, Int>) -> Tensor<3> {
        let [batch, time] = input.dims();
        let device = input.device();
        let positions = Tensor::<1, Int>::arange(0..time as i64, &device)
            .reshape([1, time])
            .repeat_dim(0, batch);
        let x = self.tokens.forward(input) + self.positions.forward(positions);
        let mask = generate_autoregressive_mask(batch, time, &device);
        let x = self
            .blocks
            .forward(TransformerEncoderInput::new(x).mask_attn(mask));
        self.head.forward(self.norm.forward(x))
    }

    /// Mean next-token cross-entropy of `input` against `target` (both `[batch, time]`).
    pub fn loss(&self, input: Tensor<2, Int>, target: Tensor<2, Int>) -> Tensor<1> {
        let [batch, time] = input.dims();
        let logits = self.forward(input);
        let vocab = logits.dims()[2];
        CrossEntropyLossConfig::new()
            .init(&logits.device())
            .forward(
                logits.reshape([batch * time, vocab]),
                target.reshape([batch * time]),
            )
    }

    /// Stops gradients to the embeddings and the lowest `blocks` transformer blocks: the
    /// optimizer then never touches them (no gradient, no weight decay), and bitsnap stores
    /// them as `unchanged`.
    pub fn freeze_lower(mut self, blocks: usize) -> Gpt {
        self.tokens = self.tokens.no_grad();
        self.positions = self.positions.no_grad();
        let layers = std::mem::take(&mut self.blocks.layers);
        self.blocks.layers = layers
            .into_iter()
            .enumerate()
            .map(|(i, l)| if i < blocks { l.no_grad() } else { l })
            .collect();
        self
    }

    /// Whether the tensor `name` (a record path such as `blocks.layers.0.mha.query.weight`)
    /// is frozen by [`Gpt::freeze_lower`]`(blocks)`.
    pub fn is_frozen(name: &str, blocks: usize) -> bool {
        if name.starts_with("tokens.") || name.starts_with("positions.") {
            return true;
        }
        name.strip_prefix("blocks.layers.")
            .and_then(|rest| rest.split('.').next())
            .and_then(|i| i.parse::<usize>().ok())
            .is_some_and(|i| i < blocks)
    }
}
