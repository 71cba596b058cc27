"""Megatron-style mixed-precision training state and its checkpoint files.

`MixedPrecisionTrainer` keeps what Megatron's `Float16OptimizerWithFloat16Params` keeps:

* the model's parameters in **bf16** (the forward and backward run on them, under
  `torch.autocast(dtype=torch.bfloat16)`);
* an **fp32 master** copy of every parameter, which is what the optimizer updates;
* torch AdamW state (`exp_avg`, `exp_avg_sq`, fp32) for each master.

One step: bf16 backward -> master.grad = grad.float() -> clip the global grad norm ->
AdamW (fused on CUDA, foreach on CPU) on the masters -> copy each master into its bf16
model parameter (`copy_`, which rounds to nearest even, as Megatron's
`_copy_main_params_to_model_params` does). Frozen parameters have `requires_grad=False`:
they get no gradient, so AdamW skips them and their master, moments and bf16 copy stay
bit-for-bit as they were.

Checkpoint file (`safetensors`), for each parameter name `<p>`:

  model.<p>                 BF16  the model copy
  optimizer.master.<p>      F32   the master weight
  optimizer.exp_avg.<p>     F32   AdamW first moment
  optimizer.exp_avg_sq.<p>  F32   AdamW second moment

`__metadata__` (all values strings, JSON where structured) is described in README.md.
"""
import contextlib
import json
import math
import os
import time

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.nn.attention import SDPBackend, sdpa_kernel

from model import GPT, frozen_for_finetune, no_weight_decay

KINDS = ("model", "optimizer.master", "optimizer.exp_avg", "optimizer.exp_avg_sq")
FORMAT = "bitsnap.megatron_series.v1"


def warmup_cosine(step, peak, warmup, total, min_ratio):
    """lr of update number `step` (1-based): linear warm-up to `peak` over `warmup`
    updates, then cosine decay to `peak * min_ratio` at update `total`, flat after."""
    if step <= warmup:
        return peak * step / warmup
    frac = min(1.0, (step - warmup) / max(1, total - warmup))
    lo = peak * min_ratio
    return lo + 0.5 * (peak - lo) * (1.0 + math.cos(math.pi * frac))


class MixedPrecisionTrainer:
    def __init__(self, preset, args, device, seed):
        self.args = args
        self.device = torch.device(device)
        self.fused = self.device.type == "cuda"
        self.optimizer_name = "torch.adamw.fused" if self.fused else "torch.adamw.foreach"
        # cuDNN/flash attention backward kernels may reduce in a varying order; the math
        # backend makes a CUDA run reproducible bit for bit (see README).
        self.attention = "math" if args.deterministic and self.fused else "auto"
        model = GPT(preset)
        model.init_weights(torch.Generator().manual_seed(seed))
        self.names = [n for n, _ in model.named_parameters()]
        self.masters = {n: p.detach().to(self.device, torch.float32).clone()
                        for n, p in model.named_parameters()}
        # RNE cast of the fp32 init: the bf16 model copy of the master.
        self.model = model.to(self.device, torch.bfloat16)
        self.params = dict(self.model.named_parameters())
        self.no_decay = sorted(n for n in self.names if no_weight_decay(n, self.masters[n].shape))
        groups = [
            {"params": [self.masters[n] for n in self.names if n not in self.no_decay],
             "weight_decay": args.wd},
            {"params": [self.masters[n] for n in self.names if n in self.no_decay],
             "weight_decay": 0.0},
        ]
        kw = {"fused": True} if self.fused else {"foreach": True}
        self.opt = torch.optim.AdamW(groups, lr=0.0, betas=(args.beta1, args.beta2),
                                     eps=args.eps, **kw)
        self.frozen = []
        self.step = 0  # optimizer updates applied to the trainable parameters
        self.lr = 0.0  # lr of the last update
        self.grad_norm = float("nan")
        self.save_seconds = 0.0  # wall time spent in `save` (device->host copy + write)

    def n_params(self):
        return sum(t.numel() for t in self.masters.values())

    def freeze(self, layers):
        """Freeze the embeddings and the lower half of the layers (for the fine-tune)."""
        self.frozen = sorted(n for n in self.names if frozen_for_finetune(n, layers))
        for n in self.frozen:
            self.params[n].requires_grad_(False)

    def _forward_context(self):
        if self.attention == "math":
            return sdpa_kernel([SDPBackend.MATH])
        return contextlib.nullcontext()

    def train_step(self, x, y, lr):
        for p in self.model.parameters():
            p.grad = None
        with self._forward_context(), torch.autocast(self.device.type, dtype=torch.bfloat16):
            loss = self.model(x, y)
        loss.backward()  # the backward kernels follow the forward's choice
        for n in self.names:
            g = self.params[n].grad
            self.masters[n].grad = None if g is None else g.float()
        live = [m for m in self.masters.values() if m.grad is not None]
        self.grad_norm = float(torch.nn.utils.clip_grad_norm_(live, self.args.clip, foreach=True))
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.opt.step()
        with torch.no_grad():
            for n in self.names:
                if self.masters[n].grad is not None:
                    self.params[n].copy_(self.masters[n])  # fp32 -> bf16, round to nearest even
                self.masters[n].grad = None
        self.step += 1
        self.lr = lr
        return float(loss.detach())

    @torch.no_grad()
    def eval_loss(self, x, y):
        with self._forward_context(), torch.autocast(self.device.type, dtype=torch.bfloat16):
            return float(self.model(x, y))

    def adam_step(self):
        """The AdamW bias-correction step count of the trainable parameters."""
        for n in self.names:
            st = self.opt.state.get(self.masters[n])
            if st and n not in self.frozen:
                return int(float(st["step"]))
        return 0

    # ------------------------------------------------------------------ checkpoints

    def tensors(self):
        t = {}
        for n in self.names:
            master = self.masters[n]
            st = self.opt.state.get(master) or {}
            t["model." + n] = self.params[n].detach()
            t["optimizer.master." + n] = master
            t["optimizer.exp_avg." + n] = st.get("exp_avg", torch.zeros_like(master))
            t["optimizer.exp_avg_sq." + n] = st.get("exp_avg_sq", torch.zeros_like(master))
        return {k: v.detach().to("cpu").contiguous() for k, v in t.items()}

    def metadata(self, phase, phase_step, next_lr, loss, extra):
        a = self.args
        m = {
            "format": FORMAT,
            "phase": phase,
            "step": self.step,
            "phase_step": phase_step,
            "adam_step": self.adam_step(),
            "lr": self.lr,
            "next_lr": next_lr,
            "betas": [a.beta1, a.beta2],
            "eps": a.eps,
            "weight_decay": a.wd,
            "no_weight_decay": self.no_decay,
            "grad_clip": a.clip,
            "grad_norm": self.grad_norm,
            "optimizer": self.optimizer_name,
            "attention": self.attention,
            "frozen": self.frozen,
            "loss": loss,
            "preset": a.preset,
            "seed": a.seed,
        }
        m.update(extra)
        return {k: v if isinstance(v, str) else json.dumps(v) for k, v in m.items()}

    def save(self, folder, phase, phase_step, next_lr, loss, extra=None):
        """Write `folder/step-NNNNNN.safetensors` (temp file, then rename). Returns its path."""
        t0 = time.time()
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"step-{self.step:06d}.safetensors")
        tmp = path + ".tmp"
        save_file(self.tensors(), tmp,
                  metadata=self.metadata(phase, phase_step, next_lr, loss, extra or {}))
        os.replace(tmp, path)
        self.save_seconds += time.time() - t0
        return path

    def load(self, path):
        """Resume from a checkpoint written by `save`: masters, moments, bf16 copy, step."""
        with safe_open(path, framework="pt") as f:
            meta = f.metadata()
            if meta.get("format") != FORMAT:
                raise ValueError(f"{path}: format {meta.get('format')!r}, expected {FORMAT!r}")
            adam_step = int(meta["adam_step"])
            for n in self.names:
                master = self.masters[n]
                with torch.no_grad():
                    master.copy_(f.get_tensor("optimizer.master." + n))
                    self.params[n].copy_(f.get_tensor("model." + n))
                step_dev = self.device if self.fused else "cpu"
                self.opt.state[master] = {
                    "step": torch.tensor(float(adam_step), dtype=torch.float32, device=step_dev),
                    "exp_avg": f.get_tensor("optimizer.exp_avg." + n).to(self.device),
                    "exp_avg_sq": f.get_tensor("optimizer.exp_avg_sq." + n).to(self.device),
                }
        self.step = int(meta["step"])
        self.lr = float(meta["lr"])
        self.grad_norm = float(meta["grad_norm"])
        return meta
