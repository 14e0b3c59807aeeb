"""Models nobody here wrote, built from small configs (no weights downloaded).

For each: at least 99.9% of trainable parameters in monitored layers (tied parameters once);
losses and parameters after 3 AdamW steps equal to the plain twin's, bit for bit; every
monitored layer's statistics equal to the float64 hook snapshot of the twin; remove()
restores the exact module classes and state_dict. transformers is a test extra: its models
skip cleanly without it. Dropout is 0 so the two twins see the same computation.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import lrfluct_fast as lf
from lrfluct_fast.baselines import HookSnapshot

from twins import assert_summaries_close, loss_of

try:
    import transformers
except ImportError:  # a test extra
    transformers = None

needs_transformers = pytest.mark.skipif(transformers is None, reason="transformers not installed")
VOCAB, SEQ, BATCH = 61, 7, 3


def _tokens(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)


def _hf(config_name, model_name, **config):
    def build():
        cfg = getattr(transformers, config_name)(**config)
        cfg._attn_implementation = "eager"
        return getattr(transformers, model_name)(cfg)
    return build


def _lm_loss(model, seed):
    ids = _tokens(seed)
    return model(input_ids=ids, labels=ids).loss


def _t5_loss(model, seed):
    ids = _tokens(seed)
    return model(input_ids=ids, labels=_tokens(seed + 100)).loss


def _vit_loss(model, seed):
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(BATCH, 3, 16, 16, generator=g)
    return model(pixel_values=pixels, labels=torch.tensor([0, 2, 1])).loss


class Encoder(nn.Module):
    """nn.TransformerEncoder (MultiheadAttention inside) under an embedding and a head."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 16)
        layer = nn.TransformerEncoderLayer(16, 4, dim_feedforward=24, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(16, VOCAB)

    def forward(self, ids):
        return self.head(self.encoder(self.embed(ids), is_causal=False))


class Volumes(nn.Module):
    """Conv3d -> BatchNorm3d -> ConvTranspose2d (groups 2, dilation) -> GroupNorm -> Linear."""

    def __init__(self):
        super().__init__()
        self.c3 = nn.Conv3d(2, 4, 3, padding=1, padding_mode="replicate")
        self.bn = nn.BatchNorm3d(4)
        self.up = nn.ConvTranspose2d(8, 6, 3, stride=2, groups=2, dilation=2, padding=1)
        self.gn = nn.GroupNorm(3, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):                       # x [B, 2, 2, 5, 5]
        h = torch.relu(self.bn(self.c3(x)))      # [B, 4, 2, 5, 5]
        h = self.gn(self.up(h.flatten(1, 2)))    # [B, 6, 11, 11]
        return self.head(h.mean((2, 3)))


def _encoder_loss(model, seed):
    return loss_of(model(_tokens(seed)))


def _volumes_loss(model, seed):
    g = torch.Generator().manual_seed(seed)
    return loss_of(model(torch.randn(BATCH, 2, 2, 5, 5, generator=g)))


MODELS = {
    "gpt2": (_hf("GPT2Config", "GPT2LMHeadModel", vocab_size=VOCAB, n_positions=16, n_embd=16,
                 n_layer=2, n_head=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0), _lm_loss),
    "llama": (_hf("LlamaConfig", "LlamaForCausalLM", vocab_size=VOCAB, hidden_size=16,
                  intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=16), _lm_loss),
    "bert": (_hf("BertConfig", "BertForMaskedLM", vocab_size=VOCAB, hidden_size=16,
                 num_hidden_layers=2, num_attention_heads=2, intermediate_size=24,
                 max_position_embeddings=16, hidden_dropout_prob=0.0,
                 attention_probs_dropout_prob=0.0), _lm_loss),
    "t5": (_hf("T5Config", "T5ForConditionalGeneration", vocab_size=VOCAB, d_model=16, d_kv=8,
               d_ff=24, num_layers=2, num_heads=2, dropout_rate=0.0,
               decoder_start_token_id=0), _t5_loss),
    "vit": (_hf("ViTConfig", "ViTForImageClassification", image_size=16, patch_size=4,
                hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                intermediate_size=24, num_labels=3, hidden_dropout_prob=0.0,
                attention_probs_dropout_prob=0.0), _vit_loss),
    "transformer_encoder": (Encoder, _encoder_loss),
    "conv3d_convtranspose": (Volumes, _volumes_loss),
}
HF = {"gpt2", "llama", "bert", "t5", "vit"}


def _params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name", [pytest.param(n, marks=needs_transformers) if n in HF else n
                                  for n in MODELS])
def test_real_model(name):
    build, loss_fn = MODELS[name]
    torch.manual_seed(0)
    plain = build().train()
    wrapped = copy.deepcopy(plain)
    classes = {n: type(m) for n, m in plain.named_modules()}
    mon = lf.instrument(wrapped)
    ref = HookSnapshot(plain)

    coverage = mon.coverage()
    assert coverage["fraction"] >= 0.999, str(mon)

    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2) for m in (plain, wrapped)]
    for step in range(3):
        losses = []
        for m, opt in zip((plain, wrapped), opts):
            opt.zero_grad()
            loss = loss_fn(m, step)
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        assert torch.equal(losses[0], losses[1]), step
        mon.step()
        ref.step()
    for (k, p), (_, q) in zip(plain.state_dict().items(), wrapped.state_dict().items()):
        assert torch.equal(p, q), k

    got, want = mon.summary(), ref.summary()
    shared = sorted(set(want) & set(got))
    assert len(shared) >= 3 and set(want) <= set(got)
    # every layer the forward runs through is observed (T5's `shared` table is only read
    # through the stacks' own embed_tokens modules, which share its weight)
    ran = [n for n in shared if want[n]["activation.count"].max() > 0]
    assert len(ran) >= len(shared) - 1 and all(got[n]["activation.count"].min() > 0 for n in ran)
    assert_summaries_close({n: got[n] for n in shared}, {n: want[n] for n in shared})

    state = _params(wrapped)
    mon.remove()
    assert {n: type(m) for n, m in wrapped.named_modules()} == classes
    after = wrapped.state_dict()
    assert state.keys() == after.keys() and all(torch.equal(state[k], after[k]) for k in state)


@needs_transformers
def test_gpt2_model_without_head_is_monitored():
    # the bare GPT2Model: Conv1D projections, embeddings and LayerNorms, nothing else
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    model = transformers.GPT2Model(cfg)
    mon = lf.instrument(model)
    assert mon.coverage()["fraction"] == 1.0
    assert {"wte", "wpe", "h.0.attn.c_attn", "h.0.mlp.c_proj", "ln_f"} <= set(mon.layers)
    s = mon.summary()
    assert s["h.0.attn.c_attn"]["weight.temporal_var"].shape == (16, 48)   # Conv1D: [in, out]
    assert s["h.0.attn.c_attn"]["weight.spread"].shape == (48,)


@needs_transformers
def test_tied_weights_are_recorded_once():
    build, loss_fn = MODELS["gpt2"]
    torch.manual_seed(0)
    model = build().train()
    assert model.lm_head.weight is model.transformer.wte.weight
    mon = lf.instrument(model)
    separate = lf.instrument(copy.deepcopy(model).train(), weights=False).memory_bytes()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(2):
        opt.zero_grad()
        loss_fn(model, step).backward()
        opt.step()
        mon.step()
    s = mon.summary()
    wte, head = s["transformer.wte"], s["lm_head"]
    # 40 bytes of per-element state (3 float32 + 3 float64 + 1 int32) per parameter, the tied
    # one once
    assert mon.memory_bytes() < sum(40 * p.numel() for p in model.parameters()) + separate + 1024
    np.testing.assert_array_equal(wte["weight.temporal_var"], head["weight.temporal_var"])
    assert wte["weight.spread"].shape == (16,) and head["weight.spread"].shape == (VOCAB,)
    assert int(wte["steps"]) == 2 and np.isfinite(head["weight.spread"]).all()
