"""GPT-2-style byte-level causal language model whose parameter names follow
Megatron-core's local (non-Transformer-Engine) GPT layer spec:

  embedding.word_embeddings.weight              [vocab, d]
  embedding.position_embeddings.weight          [ctx, d]
  decoder.layers.<i>.input_layernorm.{weight,bias}
  decoder.layers.<i>.self_attention.linear_qkv.{weight,bias}   weight [3d, d]
  decoder.layers.<i>.self_attention.linear_proj.{weight,bias}  weight [d, d]
  decoder.layers.<i>.pre_mlp_layernorm.{weight,bias}
  decoder.layers.<i>.mlp.linear_fc1.{weight,bias}              weight [4d, d]
  decoder.layers.<i>.mlp.linear_fc2.{weight,bias}              weight [d, 4d]
  decoder.final_layernorm.{weight,bias}
  output_layer.weight                                          [vocab, d] (untied)

Linear weights are [out, in] (PyTorch layout). Pre-LN blocks, GELU MLP, no dropout.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

VOCAB = 256  # byte-level


@dataclass(frozen=True)
class Preset:
    """Model size and the default batch shape of one preset."""

    layers: int
    d_model: int
    heads: int
    ctx: int
    batch: int


PRESETS = {
    # 1,890,432 params: the CPU self-check.
    "small": Preset(layers=4, d_model=192, heads=4, ctx=64, batch=8),
    # 86,235,648 params: GPT-2 small's transformer (12 x 768, 12 heads, ctx 1024) with a
    # byte vocabulary and an untied output layer.
    "gpt2": Preset(layers=12, d_model=768, heads=12, ctx=1024, batch=8),
}


class Embedding(nn.Module):
    def __init__(self, ctx, d):
        super().__init__()
        self.word_embeddings = nn.Embedding(VOCAB, d)
        self.position_embeddings = nn.Embedding(ctx, d)

    def forward(self, idx):
        pos = torch.arange(idx.shape[1], device=idx.device)
        return self.word_embeddings(idx) + self.position_embeddings(pos)


class SelfAttention(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.linear_qkv = nn.Linear(d, 3 * d)
        self.linear_proj = nn.Linear(d, d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.linear_qkv(x).split(d, dim=-1)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.linear_proj(y.transpose(1, 2).reshape(b, t, d))


class Mlp(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.linear_fc1 = nn.Linear(d, 4 * d)
        self.linear_fc2 = nn.Linear(4 * d, d)

    def forward(self, x):
        return self.linear_fc2(F.gelu(self.linear_fc1(x)))


class Layer(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(d)
        self.self_attention = SelfAttention(d, heads)
        self.pre_mlp_layernorm = nn.LayerNorm(d)
        self.mlp = Mlp(d)

    def forward(self, x):
        x = x + self.self_attention(self.input_layernorm(x))
        return x + self.mlp(self.pre_mlp_layernorm(x))


class Decoder(nn.Module):
    def __init__(self, layers, d, heads):
        super().__init__()
        self.layers = nn.ModuleList(Layer(d, heads) for _ in range(layers))
        self.final_layernorm = nn.LayerNorm(d)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.final_layernorm(x)


class GPT(nn.Module):
    """Byte-level GPT; `forward(idx, targets)` returns the mean cross-entropy in nats/byte."""

    def __init__(self, p: Preset):
        super().__init__()
        self.preset = p
        self.embedding = Embedding(p.ctx, p.d_model)
        self.decoder = Decoder(p.layers, p.d_model, p.heads)
        self.output_layer = nn.Linear(p.d_model, VOCAB, bias=False)

    def init_weights(self, generator):
        """GPT-2 init: N(0, 0.02), residual projections N(0, 0.02/sqrt(2L)), LN 1/0, biases 0."""
        proj_std = 0.02 / math.sqrt(2 * self.preset.layers)
        with torch.no_grad():
            for name, t in self.named_parameters():
                if "layernorm" in name:
                    t.fill_(1.0 if name.endswith("weight") else 0.0)
                elif name.endswith("bias"):
                    t.zero_()
                elif name.endswith(("linear_proj.weight", "linear_fc2.weight")):
                    t.normal_(0.0, proj_std, generator=generator)
                else:
                    t.normal_(0.0, 0.02, generator=generator)

    def forward(self, idx, targets):
        logits = self.output_layer(self.decoder(self.embedding(idx)))
        return F.cross_entropy(logits.float().view(-1, VOCAB), targets.reshape(-1))


def no_weight_decay(name: str, shape) -> bool:
    """GPT practice: decay only the 2-D matrices of the linear layers, not biases,
    LayerNorm parameters or the embeddings."""
    return len(shape) != 2 or name.startswith("embedding.")


def frozen_for_finetune(name: str, layers: int) -> bool:
    """Fine-tune freezes the embeddings and the lower half of the transformer layers."""
    if name.startswith("embedding."):
        return True
    return any(name.startswith(f"decoder.layers.{i}.") for i in range(layers // 2))
