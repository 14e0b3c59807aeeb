"""Benchmark models. Each factory(device) returns a Workload: model, optimizer, batch, loss.

  mlp          4 x Linear(2048, 2048) with ReLU, batch 256, MSE
  gpt          GPT-style decoder from nn.Linear layers: 6 layers, d_model 512, 8 heads,
               sequence 256, batch 8, vocabulary 1024, next-token cross-entropy
  autoencoder  the paper experiment's MLP autoencoder on 32x32 eight-shape images, batch 64
  gpt2-medium  24 layers, d_model 1024, sequence 1024, batch 8, bf16 autocast (for a GPU)
  hf:NAME      a transformers architecture built from its config (nothing downloaded), sized
               for a CPU run: HF_PRESETS below (gpt2, llama, bert, t5, vit)

A user's model plugs in as "package.module:factory", a function factory(device) returning
(model, optimizer, batch) or (model, optimizer, batch, loss_fn); batch is a tensor or a tuple
of tensors; without loss_fn, a tuple (inputs, target) gives MSE, a single tensor x gives
mean(model(x)^2).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


class FactoryError(ValueError):
    """A model spec or a user's factory that cannot give a workload (a one-line reason)."""


@dataclass
class Workload:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    batch: tuple
    loss_fn: Callable[[nn.Module, tuple], torch.Tensor]


def mse_loss(model, batch):
    x, y = batch
    return F.mse_loss(model(x), y)


def mlp(device, width=2048, depth=4, batch=256) -> Workload:
    layers = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.ReLU()]
    model = nn.Sequential(*layers[:-1]).to(device)
    data = (torch.randn(batch, width, device=device), torch.randn(batch, width, device=device))
    return Workload(model, torch.optim.Adam(model.parameters(), 1e-4), data, mse_loss)


class Block(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).unbind(2)
        att = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                             v.transpose(1, 2), is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class GPT(nn.Module):
    def __init__(self, vocab=1024, d=512, layers=6, heads=8, seq=256):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(seq, d)
        self.blocks = nn.Sequential(*[Block(d, heads) for _ in range(layers)])
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, idx):
        pos = torch.arange(idx.shape[1], device=idx.device)
        return self.head(self.ln(self.blocks(self.tok(idx) + self.pos(pos))))


def gpt_loss(model, batch):
    idx, = batch
    logits = model(idx[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), idx[:, 1:].reshape(-1))


def gpt(device, vocab=1024, d=512, layers=6, heads=8, seq=256, batch=8, dtype=None) -> Workload:
    model = GPT(vocab, d, layers, heads, seq).to(device)
    if dtype is not None:
        model = model.to(dtype)
    idx = torch.randint(0, vocab, (batch, seq + 1), device=device)
    return Workload(model, torch.optim.AdamW(model.parameters(), 1e-4), (idx,), gpt_loss)


def gpt2_medium(device, batch=8, seq=1024) -> Workload:
    """GPT-2-medium-sized (24 layers, d_model 1024, 16 heads, vocabulary 50257), trained in
    bf16 autocast with float32 master weights: the GPU overhead target's workload."""
    w = gpt(device, vocab=50257, d=1024, layers=24, heads=16, seq=seq, batch=batch)

    def loss_bf16(model, b):
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
            return gpt_loss(model, b)
    return Workload(w.model, w.optimizer, w.batch, loss_bf16)


def autoencoder(device, image_size=32, batch=64) -> Workload:
    from ..experiments.autoencoder import build_autoencoder
    from ..experiments.shapes import make_shapes
    model = build_autoencoder("mlp", image_size).to(device)
    images = torch.as_tensor(make_shapes(batch, size=image_size, seed=0)[0], device=device)
    return Workload(model, torch.optim.Adam(model.parameters(), 1e-3), (images, images), mse_loss)


# name -> (config class, model class, config overrides, batch, sequence); the blocks are the real
# architecture's, the depth is cut so that a step takes about a second on 2 CPU cores
HF_PRESETS = {
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(n_layer=4), 2, 64),
    "llama": ("LlamaConfig", "LlamaForCausalLM",
              dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
                   num_attention_heads=8, num_key_value_heads=4, vocab_size=32000), 2, 64),
    "bert": ("BertConfig", "BertForMaskedLM", dict(num_hidden_layers=4), 2, 64),
    "t5": ("T5Config", "T5ForConditionalGeneration", dict(num_layers=2, num_decoder_layers=2), 2, 64),
    "vit": ("ViTConfig", "ViTForImageClassification", dict(num_hidden_layers=4, num_labels=10), 4, 0),
}


def hf(name: str, device) -> Workload:
    """transformers' NAME (HF_PRESETS) from its config, in train mode, with AdamW."""
    try:
        import transformers
    except ImportError:
        raise FactoryError(f"hf:{name} needs transformers (pip install transformers)") from None
    if name not in HF_PRESETS:
        raise FactoryError(f"unknown model hf:{name}: use one of hf:{', hf:'.join(HF_PRESETS)}")
    config_cls, model_cls, overrides, batch, seq = HF_PRESETS[name]
    config = getattr(transformers, config_cls)(**overrides)
    model = getattr(transformers, model_cls)(config).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), 1e-4)
    g = torch.Generator().manual_seed(0)
    if name == "vit":
        size = config.image_size
        data = (torch.randn(batch, 3, size, size, generator=g).to(device),
                torch.randint(0, config.num_labels, (batch,), generator=g).to(device))
        return Workload(model, opt, data, lambda m, b: m(pixel_values=b[0], labels=b[1]).loss)
    ids = torch.randint(0, config.vocab_size, (batch, seq), generator=g).to(device)
    return Workload(model, opt, (ids,), lambda m, b: m(input_ids=b[0], labels=b[0]).loss)


BUILTIN = {"mlp": mlp, "gpt": gpt, "autoencoder": autoencoder, "gpt2-medium": gpt2_medium}


def resolve(spec: str):
    """The factory named by a built-in name or "module:factory"; FactoryError if there is none."""
    if spec in BUILTIN:
        return BUILTIN[spec]
    if spec.startswith("hf:"):
        name = spec[3:]
        if name not in HF_PRESETS:
            raise FactoryError(f"unknown model {spec!r}: use one of hf:{', hf:'.join(HF_PRESETS)}")
        return partial(hf, name)
    if ":" not in spec:
        raise FactoryError(f"unknown model {spec!r}: use one of {sorted(BUILTIN)} or module:factory")
    module_name, _, attr = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise FactoryError(f"cannot load factory {spec!r}: {e}") from None
    if not callable(factory):
        raise FactoryError(f"{spec} is not callable")
    return partial(_user_workload, spec, factory)


def _user_workload(spec, factory, device) -> Workload:
    out = factory(device)
    if not isinstance(out, tuple) or len(out) not in (3, 4):
        raise FactoryError(f"{spec} must return (model, optimizer, batch[, loss_fn]), got {type(out).__name__}")
    model, optimizer, batch = out[:3]
    if not isinstance(model, nn.Module) or not isinstance(optimizer, torch.optim.Optimizer):
        raise FactoryError(f"{spec} must return an nn.Module and a torch.optim.Optimizer first")
    batch = batch if isinstance(batch, tuple) else (batch,)
    loss_fn = out[3] if len(out) == 4 else (mse_loss if len(batch) == 2 else
                                            (lambda m, b: m(*b).float().square().mean()))
    return Workload(model, optimizer, batch, loss_fn)
