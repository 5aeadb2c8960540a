"""Generator networks shared by the generator-based synthesizers (DAFL, ZSKT, DFAD, ...).

All generators map a latent ``z`` to images in ``[0, 1]`` (the package's image contract).
"""
from __future__ import annotations

import torch
from torch import nn


class ToPixels(nn.Module):
    """Map a batch-normalised output ``h`` to pixels: ``clamp(mean + std * h, 0, 1)``.

    The DCGAN-style generators of DAFL/DFAD/ZSKT end with ``tanh`` followed by a
    ``BatchNorm2d(affine=False)``, so their output lives in the teacher's *normalised* input
    space with zero mean and unit variance per channel over the batch. ``ToPixels`` maps
    that output back to ``[0,1]`` with the teacher's own mean/std (known from its
    checkpoint), so the teacher sees exactly what the paper's teacher saw. The clamp passes
    gradients straight through (otherwise saturated pixels would stop learning).
    """

    def __init__(self, channels: int, mean=None, std=None):
        super().__init__()
        mean = torch.as_tensor(mean if mean is not None else [0.5] * channels, dtype=torch.float32)
        std = torch.as_tensor(std if std is not None else [0.5] * channels, dtype=torch.float32)
        self.register_buffer("mean", mean.reshape(1, -1, 1, 1).expand(1, channels, 1, 1).clone())
        self.register_buffer("std", std.reshape(1, -1, 1, 1).expand(1, channels, 1, 1).clone())

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = self.mean + self.std * h
        return x + (x.clamp(0.0, 1.0) - x).detach()


class DCGANGenerator(nn.Module):
    """The generator of DAFL (Chen et al., ICCV 2019), also used by ZSKT and DFAD.

    ``z -> Linear(nz, 2*ngf*s*s) -> BN -> [Upsample x2 -> Conv3x3 -> BN -> LeakyReLU(0.2)] x2
    -> Conv3x3(ngf, C) -> tanh -> BN(affine=False) -> ToPixels`` with ``s = image_size // 4``.
    The paper uses ``nz=100, ngf=64`` (128 channels in the first stage) and BN eps 0.8 in the
    hidden blocks, kept here. ``ngf`` is the main cost knob on CPU.

    ``output="sigmoid"`` gives the variant of CMI and Fast (Fang et al., IJCAI 2021 / AAAI
    2022): the same body with bias-free hidden convolutions and BN eps 1e-5, ending in
    ``Conv3x3 -> sigmoid``, which is already in ``[0,1]``.

    ``num_classes > 0`` makes it class-conditional: ``forward(z, labels)`` feeds
    ``z + E[labels]`` with a learned embedding ``E`` (``num_classes x nz``).
    """

    def __init__(self, nz: int = 100, image_shape=(1, 32, 32), ngf: int = 64, mean=None, std=None, output: str = "normalized",
                 num_classes: int = 0):
        super().__init__()
        channels, height, width = image_shape
        if height % 4 or width % 4:
            raise ValueError(f"DCGANGenerator needs image sides divisible by 4, got {height}x{width}")
        self.nz = nz
        self.init_hw = (height // 4, width // 4)
        self.project = nn.Sequential(nn.Linear(nz, 2 * ngf * self.init_hw[0] * self.init_hw[1]))
        if output not in ("normalized", "sigmoid"):
            raise ValueError(f"DCGANGenerator output must be 'normalized' or 'sigmoid', got {output!r}")
        dafl = output == "normalized"
        eps = 0.8 if dafl else 1e-5
        self.body = nn.Sequential(
            nn.BatchNorm2d(2 * ngf),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(2 * ngf, 2 * ngf, 3, padding=1, bias=dafl),
            nn.BatchNorm2d(2 * ngf, eps=eps),
            nn.LeakyReLU(0.2),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(2 * ngf, ngf, 3, padding=1, bias=dafl),
            nn.BatchNorm2d(ngf, eps=eps),
            nn.LeakyReLU(0.2),
            nn.Conv2d(ngf, channels, 3, padding=1),
            *((nn.Tanh(), nn.BatchNorm2d(channels, affine=False)) if dafl else (nn.Sigmoid(),)),
        )
        self.to_pixels = ToPixels(channels, mean, std) if dafl else nn.Identity()
        self.label_embedding = nn.Embedding(num_classes, nz) if num_classes > 0 else None
        self.ngf = ngf
        # channels-last convolutions: 2.2x faster forward on CPU (oneDNN), the fast layout on CUDA
        self.to(memory_format=torch.channels_last)

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if self.label_embedding is not None:
            if labels is None:
                raise ValueError("this generator is class-conditional: call it with labels")
            z = z + self.label_embedding(labels)
        h = self.project(z).view(z.shape[0], -1, *self.init_hw).contiguous(memory_format=torch.channels_last)
        return self.to_pixels(self.body(h))

    def sample_latent(self, batch_size: int, device, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.randn(batch_size, self.nz, device=device, generator=generator)

