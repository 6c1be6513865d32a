"""Augmentation on batched uint8 tensors, on whatever device the data lives (the GPU when present).

RandomResizedCrop + horizontal flip as one affine `grid_sample` per batch: the crop box of each image
is drawn as torchvision draws it (area fraction in `scale`, log-uniform aspect ratio in (3/4, 4/3)),
without its 10-try rejection loop: a box that would not fit is clamped to the image instead.

Every draw comes from a generator seeded by (seed, step) for the whole global batch, and each process
takes its own rows, so a run gives the same augmentation on 1 or N processes and after a resume.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def step_generator(seed: int, step: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator that depends only on (seed, step): the source of every per-step random draw."""
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + step * 7_919 + 12_345) % (2**63 - 1))
    return g


def crop_boxes(
    n: int,
    scale: tuple[float, float],
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    hflip: bool = True,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """(N, 5): crop width, height, left, top (fractions of the image) and a flip sign (+1 / -1)."""
    u = torch.rand(n, 5, generator=generator, device=device)
    area = scale[0] + (scale[1] - scale[0]) * u[:, 0]
    log_r = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[:, 1]
    r = torch.exp(log_r)
    w = torch.sqrt(area * r).clamp(max=1.0)
    h = torch.sqrt(area / r).clamp(max=1.0)
    left = (1 - w) * u[:, 2]
    top = (1 - h) * u[:, 3]
    flip = torch.where((u[:, 4] < 0.5) & hflip, -1.0, 1.0)
    return torch.stack([w, h, left, top, flip], dim=1)


def apply_crops(images: torch.Tensor, boxes: torch.Tensor, size: int, mode: str = "bilinear") -> torch.Tensor:
    """uint8 or float (N, 3, H, W) + boxes (N, 5) -> float (N, 3, size, size) in [0, 1]."""
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    boxes = boxes.to(x.device, torch.float32)
    w, h, left, top, flip = boxes.unbind(1)
    # affine map from output coords in [-1, 1] to input coords in [-1, 1] (align_corners=False)
    theta = torch.zeros(x.shape[0], 2, 3, device=x.device)
    theta[:, 0, 0] = w * flip
    theta[:, 0, 2] = 2 * left + w - 1
    theta[:, 1, 1] = h
    theta[:, 1, 2] = 2 * top + h - 1
    grid = F.affine_grid(theta, [x.shape[0], x.shape[1], size, size], align_corners=False)  # (N, S, S, 2)
    out = F.grid_sample(x, grid, mode=mode, padding_mode="border", align_corners=False)
    return out.clamp_(0, 1)  # bicubic overshoots


def random_resized_crop(
    images: torch.Tensor,
    size: int,
    scale: tuple[float, float],
    hflip: bool,
    generator: torch.Generator,
    global_batch: int | None = None,
    offset: int = 0,
    mode: str = "bilinear",
) -> torch.Tensor:
    """Draw boxes for the whole global batch, then crop this process's rows [offset, offset + n).
    -> float (n, 3, size, size) in [0, 1]."""
    n = images.shape[0]
    boxes = crop_boxes(global_batch or n, scale, hflip=hflip, generator=generator, device=generator.device)
    return apply_crops(images, boxes[offset : offset + n], size, mode)
