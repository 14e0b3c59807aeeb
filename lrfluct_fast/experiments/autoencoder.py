"""The autoencoder of the learning-rate experiment: an MLP (default) or a small conv net.

Owns the architectures and the naming of their layers; knows nothing of data, training or
monitoring. Every layer a monitor should see is an nn.Linear or nn.Conv2d with a readable
name (`encoder.fc1`, `decoder.out`, ...), and every hidden layer is followed by a ReLU so
that an inactive ("dead") neuron means what it says; `relu_layers(model)` lists them.

Choices (the paper does not publish its architecture):
  mlp  (default)  flatten -> fc1 (256) -> fc2 (64) -> latent (16, linear)
                  -> fc1 (64) -> fc2 (256) -> out (H*W) -> sigmoid.
                  `widths` are the encoder's hidden widths, mirrored by the decoder.
  conv            conv1 (16 ch, stride 2) -> conv2 (32 ch, stride 2) -> latent (Linear)
                  -> fc (Linear) -> [upsample 2x -> conv] x 2 -> sigmoid; `widths` are the
                  channels. Needs the image side divisible by 2**len(widths).
Linear layers rather than transposed convolutions in the decoder keep every layer one the
monitor wraps (Linear / Conv1d / Conv2d). The latent layer has no ReLU (a bottleneck code),
the output a sigmoid because pixels are in [0, 1].
"""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

ARCHS = ("mlp", "conv")
DEFAULT_WIDTHS = {"mlp": (256, 64), "conv": (16, 32)}
DEFAULT_LATENT = 16


class MLPAutoencoder(nn.Module):
    def __init__(self, image_size: int, widths=DEFAULT_WIDTHS["mlp"], latent: int = DEFAULT_LATENT):
        super().__init__()
        self.image_size = image_size
        dims = [image_size * image_size, *widths]
        enc: OrderedDict[str, nn.Module] = OrderedDict()
        for i, (a, b) in enumerate(zip(dims, dims[1:]), 1):
            enc[f"fc{i}"] = nn.Linear(a, b)
            enc[f"relu{i}"] = nn.ReLU()
        enc["latent"] = nn.Linear(dims[-1], latent)
        dec: OrderedDict[str, nn.Module] = OrderedDict()
        back = [latent, *reversed(widths)]
        for i, (a, b) in enumerate(zip(back, back[1:]), 1):
            dec[f"fc{i}"] = nn.Linear(a, b)
            dec[f"relu{i}"] = nn.ReLU()
        dec["out"] = nn.Linear(back[-1], dims[0])
        self.encoder = nn.Sequential(enc)
        self.decoder = nn.Sequential(dec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        code = self.encoder(x.flatten(1))
        return torch.sigmoid(self.decoder(code)).view_as(x)


class ConvAutoencoder(nn.Module):
    def __init__(self, image_size: int, widths=DEFAULT_WIDTHS["conv"],
                 latent: int = DEFAULT_LATENT):
        super().__init__()
        levels = len(widths)
        if image_size % (2 ** levels):
            raise ValueError(f"conv autoencoder needs the image size divisible by {2 ** levels}, "
                             f"got {image_size}")
        self.bottom = image_size // 2 ** levels
        self.channels = widths[-1]
        flat = widths[-1] * self.bottom * self.bottom
        enc: OrderedDict[str, nn.Module] = OrderedDict()
        for i, (a, b) in enumerate(zip((1, *widths), widths), 1):
            enc[f"conv{i}"] = nn.Conv2d(a, b, 3, stride=2, padding=1)
            enc[f"relu{i}"] = nn.ReLU()
        enc["flatten"] = nn.Flatten()
        enc["latent"] = nn.Linear(flat, latent)
        dec: OrderedDict[str, nn.Module] = OrderedDict()
        dec["fc"] = nn.Linear(latent, flat)
        dec["relu0"] = nn.ReLU()
        dec["unflatten"] = nn.Unflatten(1, (widths[-1], self.bottom, self.bottom))
        back = [*reversed(widths), 1]
        for i, (a, b) in enumerate(zip(back, back[1:]), 1):
            dec[f"up{i}"] = nn.Upsample(scale_factor=2, mode="nearest")
            name = "out" if i == levels else f"conv{i}"
            dec[name] = nn.Conv2d(a, b, 3, padding=1)
            if i < levels:
                dec[f"relu{i}"] = nn.ReLU()
        self.encoder = nn.Sequential(enc)
        self.decoder = nn.Sequential(dec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.decoder(self.encoder(x)))


def build_autoencoder(arch: str, image_size: int, widths=None,
                      latent: int = DEFAULT_LATENT) -> nn.Module:
    """The autoencoder `arch` ("mlp" or "conv") for [n, 1, image_size, image_size] inputs."""
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    widths = tuple(DEFAULT_WIDTHS[arch] if widths is None else widths)
    cls = MLPAutoencoder if arch == "mlp" else ConvAutoencoder
    return cls(image_size, widths, latent)


def monitored_layers(model: nn.Module) -> list[str]:
    """Names of the layers a monitor wraps (Linear / Conv1d / Conv2d), in forward order."""
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d))]


def relu_layers(model: nn.Module) -> list[str]:
    """Monitored layers whose output goes through a ReLU: where "dead" is meaningful."""
    out = []
    for prefix, seq in model.named_children():
        if not isinstance(seq, nn.Sequential):
            continue
        children = list(seq.named_children())
        for (name, m), (_, nxt) in zip(children, children[1:]):
            if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)) and isinstance(nxt, nn.ReLU):
                out.append(f"{prefix}.{name}")
    return out
