"""PyTorch reference: speed and memory of one DeepFill v1 training iteration (not a test).

The same iteration as `benchmarks/train_step.py` (jattn's JAX benchmark) with n_critic=1,
written in plain PyTorch (eager, float32, NCHW, CPU) so both can be timed side by side on
the same machine. An iteration is one critic update (generator forward without grad, both
WGAN critics on real and fake, WGAN-GP penalty with a double backward through both critics,
backward, Adam step) plus one generator update (generator forward, critics on the fake only,
losses, backward, Adam step). The model is the official v1 layout of
`specs/deepfill.md` (coarse-to-fine generator, contextual attention at rate 2 with fuse, local
and global critics), written from the spec: 3,601,542 generator and 7,072,770 critic
parameters at the official widths (cnum 32, critics 64, 256x256 images, 128x128 local crop).
Inputs are the ones `_batch` of train_step.py draws (the same NumPy seed): random images in
[-1, 1] and one (size/2 - 16)-square box hole per image; each image's local crop is the
size/2 box centred on its hole, clamped into the image (as `jattn.ops.masks.hole_boxes`).

Prints JSON lines: the setup; a float32 2048x2048 `torch.matmul` rate measured in the same
run; the parameter counts (this run's and the official widths'); then per batch size: the
median seconds per iteration after one warm-up iteration, images/s, the nominal rate and
its share of the matmul rate, the iteration's matmul/conv FLOPs as PyTorch counts them
(`torch.utils.flop_counter` formulas, forward and backward of both updates, traced on fake
tensors after the timed iterations, so no compute; skip with `--no-flop-count`; XLA's count
in train_step.py also includes elementwise ops), the process's peak RSS (taken before the
count) and whether the losses are finite.

Nominal rate: 256 GFLOP per image and iteration (the nominal figure of train_step.py),
scaled by (size/256)^2 * (cnum/32)^2 when a smaller size or width is run (field
`nominal_gflop_per_image` says which figure was used). The scaling is only indicative:
contextual attention's score and paste convolutions grow as size^4 * cnum, not
size^2 * cnum^2. The critics' width is 2 * cnum (64 at the official cnum 32) and the local
crop is size/2 (128 at 256).

    taskset -c 0 /tmp/torchvenv/bin/python benchmarks/torch_reference.py --batch 4 --threads 1
    /tmp/torchvenv/bin/python benchmarks/torch_reference.py --batch 4 --threads 2
    /tmp/torchvenv/bin/python benchmarks/torch_reference.py --size 64 --cnum 8 --batch 1  # smoke run
    /tmp/torchvenv/bin/python benchmarks/torch_reference.py --count-only  # parameter and FLOP counts, no compute

PyTorch is not a jattn dependency: run this from a separate virtualenv
(`python3 -m venv /tmp/torchvenv && /tmp/torchvenv/bin/pip install torch numpy`); it
imports nothing from jattn.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import resource
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

NOMINAL_GFLOP_PER_IMAGE = 256.0  # at 256x256, cnum 32 (as benchmarks/train_step.py)
OFFICIAL = {"size": 256, "cnum": 32}


# --------------------------------------------------------------------------- helpers


def _same_pads(n: int, k: int, s: int = 1, d: int = 1) -> tuple[int, int]:
    """TF 'SAME' zero padding (before, after) of one axis of length n."""
    eff = (k - 1) * d + 1
    out = -(-n // s)
    total = max((out - 1) * s + eff - n, 0)
    return total // 2, total - total // 2


def _conv_same(x, weight, bias, stride=1, dilation=1):
    k_h, k_w = weight.shape[-2:]
    ph = _same_pads(x.shape[-2], k_h, stride, dilation)
    pw = _same_pads(x.shape[-1], k_w, stride, dilation)
    if ph[0] == ph[1] and pw[0] == pw[1]:
        return F.conv2d(x, weight, bias, stride, (ph[0], pw[0]), dilation)
    x = F.pad(x, (pw[0], pw[1], ph[0], ph[1]))
    return F.conv2d(x, weight, bias, stride, 0, dilation)


def _tf1_nearest_align_corners_index(n_in: int, n_out: int) -> torch.Tensor:
    """Source rows of TF1 `resize_nearest_neighbor(align_corners=True)`: float32 scale,
    roundf (half away from zero), clamped."""
    scale = np.float32(n_in - 1) / np.float32(n_out - 1) if n_out > 1 else np.float32(0.0)
    src = (np.arange(n_out, dtype=np.float32) * np.float32(scale)).astype(np.float64)
    idx = np.minimum(np.floor(src + 0.5).astype(np.int64), n_in - 1)
    return torch.from_numpy(idx)


def resize_nearest_align_corners(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[N, C, H, W] -> [N, C, *size], picking the pixels TF1 picks."""
    rows = _tf1_nearest_align_corners_index(x.shape[-2], size[0])
    cols = _tf1_nearest_align_corners_index(x.shape[-1], size[1])
    return x.index_select(-2, rows).index_select(-1, cols)


def _glorot_(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# --------------------------------------------------------------------------- contextual attention


def contextual_attention(f, b, mask=None, ksize=3, stride=1, rate=2, fuse_k=3, softmax_scale=10.0, fuse=True):
    """The official `inpaint_ops.contextual_attention` (specs/contextual_attention.md), NCHW.

    f, b: [B, C, H, W] (the same size); mask: [1 or B, 1, H, W], 1 = hole (one per image
    allowed, as jattn), or None. Returns (y [B, C, H, W], offsets [B, 2, H/r, W/r] int64).
    """
    if stride != 1 or f.shape != b.shape or f.shape[-2] % rate or f.shape[-1] % rate or fuse_k % 2 == 0:
        raise ValueError(
            "contextual_attention: needs stride 1, f and b of one shape, H and W divisible by rate, odd fuse_k"
        )
    batch, chans, height, width = f.shape
    r, big = rate, 2 * rate
    # 1. raw (2r x 2r) patches of full-resolution b at step r, TF SAME padding, for pasting
    ph, pw = _same_pads(height, big, r), _same_pads(width, big, r)
    raw = F.unfold(F.pad(b, (pw[0], pw[1], ph[0], ph[1])), big, stride=r)  # [B, C*K*K, L]
    # 2. downsample f, b, mask by 1/r (TF1 nearest, align corners)
    h, w = height // r, width // r
    f_d = resize_nearest_align_corners(f, (h, w)) if r > 1 else f
    b_d = resize_nearest_align_corners(b, (h, w)) if r > 1 else b
    n_patch = h * w
    raw = raw.view(batch, chans, big, big, n_patch).permute(0, 4, 1, 2, 3)  # [B, L, C, K, K]
    # 3. matching patches of downsampled b (SAME, stride 1), L2-normalised
    pad = _same_pads(h, ksize)[0]
    wpat = F.unfold(b_d, ksize, padding=pad).view(batch, chans, ksize, ksize, n_patch).permute(0, 4, 1, 2, 3)
    norm = wpat.square().sum(dim=(2, 3, 4), keepdim=True).sqrt().clamp_min(1e-4)
    wpat = wpat / norm  # [B, L, C, k, k]
    # 4. validity: 1 where the patch holds no hole pixel (zero padding outside counts as valid)
    if mask is None:
        mm = torch.ones(batch, n_patch, 1, 1, dtype=f.dtype)
    else:
        m_d = resize_nearest_align_corners(mask, (h, w)) if r > 1 else mask
        m_mean = F.avg_pool2d(m_d, ksize, stride=1, padding=pad, count_include_pad=True)
        mm = (m_mean == 0).to(f.dtype).reshape(m_d.shape[0], n_patch, 1, 1).expand(batch, -1, -1, -1)
    eye = torch.eye(fuse_k, dtype=f.dtype).view(1, 1, fuse_k, fuse_k)
    fpad = (fuse_k - 1) // 2
    ys, offsets = [], []
    grid_y = torch.arange(h).view(h, 1).expand(h, w)
    grid_x = torch.arange(w).view(1, w).expand(h, w)
    for i in range(batch):  # the official code loops over the batch
        # 5a. scores: channel q (patch), spatial p = (y, x)
        s = F.conv2d(f_d[i : i + 1], wpat[i], padding=pad)  # [1, L, h, w]
        if fuse:  # 5b. identity-kernel conv on the L x L score map, row-major then column-major
            s = F.conv2d(s.reshape(1, 1, n_patch, n_patch), eye, padding=fpad)
            s = s.view(h, w, h, w).permute(1, 0, 3, 2).reshape(1, 1, n_patch, n_patch)
            s = F.conv2d(s, eye, padding=fpad)
            s = s.view(w, h, w, h).permute(1, 0, 3, 2).reshape(1, n_patch, h, w)
        # 5c. mask, scaled softmax over patches, mask again
        s = s * mm[i]
        a = F.softmax(s * softmax_scale, dim=1) * mm[i]
        # 5d. offsets (for the flow picture only)
        with torch.no_grad():
            q = a.argmax(dim=1)[0]  # [h, w]
            offsets.append(torch.stack([q // w - grid_y, q % w - grid_x]))
        # 5e. paste with the raw patches: transposed conv, stride r, TF SAME, / 4
        if ph[0] == ph[1] and pw[0] == pw[1]:
            y = F.conv_transpose2d(a, raw[i], stride=r, padding=(ph[0], pw[0]))
        else:
            y = F.conv_transpose2d(a, raw[i], stride=r)[..., ph[0] : ph[0] + height, pw[0] : pw[0] + width]
        ys.append(y / 4.0)
    return torch.cat(ys, dim=0), torch.stack(offsets)


# --------------------------------------------------------------------------- models


class GenConv(nn.Module):
    """gen_conv: conv k x k, stride, dilation, TF SAME zero padding, bias, ELU (or ReLU / none)."""

    def __init__(self, cin, cout, k=3, stride=1, dilation=1, act="elu"):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride, 0, dilation)
        self.stride, self.dilation, self.act = stride, dilation, act

    def forward(self, x):
        x = _conv_same(x, self.conv.weight, self.conv.bias, self.stride, self.dilation)
        if self.act == "elu":
            return F.elu(x)
        if self.act == "relu":
            return F.relu(x)
        return x


class GenDeconv(GenConv):
    """gen_deconv: nearest 2x upsampling (an exact repeat), then gen_conv(cout, 3)."""

    def forward(self, x):
        return super().forward(F.interpolate(x, scale_factor=2, mode="nearest"))


class DeepFillV1Generator(nn.Module):
    """The official v1 `inpaint_net` (3,601,542 parameters at cnum 32)."""

    def __init__(self, cnum: int = 32):
        super().__init__()
        c = cnum
        L = [  # (name, cin, cout, k, stride (0: gen_deconv), dilation[, activation: default ELU])
            ("conv1", 5, c, 5, 1, 1),
            ("conv2_downsample", c, 2 * c, 3, 2, 1),
            ("conv3", 2 * c, 2 * c, 3, 1, 1),
            ("conv4_downsample", 2 * c, 4 * c, 3, 2, 1),
            ("conv5", 4 * c, 4 * c, 3, 1, 1),
            ("conv6", 4 * c, 4 * c, 3, 1, 1),
            ("conv7_atrous", 4 * c, 4 * c, 3, 1, 2),
            ("conv8_atrous", 4 * c, 4 * c, 3, 1, 4),
            ("conv9_atrous", 4 * c, 4 * c, 3, 1, 8),
            ("conv10_atrous", 4 * c, 4 * c, 3, 1, 16),
            ("conv11", 4 * c, 4 * c, 3, 1, 1),
            ("conv12", 4 * c, 4 * c, 3, 1, 1),
            ("conv13_upsample", 4 * c, 2 * c, 3, 0, 1),
            ("conv14", 2 * c, 2 * c, 3, 1, 1),
            ("conv15_upsample", 2 * c, c, 3, 0, 1),
            ("conv16", c, c // 2, 3, 1, 1),
            ("conv17", c // 2, 3, 3, 1, 1, None),
            # stage 2, conv branch
            ("xconv1", 5, c, 5, 1, 1),
            ("xconv2_downsample", c, c, 3, 2, 1),
            ("xconv3", c, 2 * c, 3, 1, 1),
            ("xconv4_downsample", 2 * c, 2 * c, 3, 2, 1),
            ("xconv5", 2 * c, 4 * c, 3, 1, 1),
            ("xconv6", 4 * c, 4 * c, 3, 1, 1),
            ("xconv7_atrous", 4 * c, 4 * c, 3, 1, 2),
            ("xconv8_atrous", 4 * c, 4 * c, 3, 1, 4),
            ("xconv9_atrous", 4 * c, 4 * c, 3, 1, 8),
            ("xconv10_atrous", 4 * c, 4 * c, 3, 1, 16),
            # stage 2, attention branch
            ("pmconv1", 5, c, 5, 1, 1),
            ("pmconv2_downsample", c, c, 3, 2, 1),
            ("pmconv3", c, 2 * c, 3, 1, 1),
            ("pmconv4_downsample", 2 * c, 4 * c, 3, 2, 1),
            ("pmconv5", 4 * c, 4 * c, 3, 1, 1),
            ("pmconv6", 4 * c, 4 * c, 3, 1, 1, "relu"),
            ("pmconv9", 4 * c, 4 * c, 3, 1, 1),
            ("pmconv10", 4 * c, 4 * c, 3, 1, 1),
            # merge
            ("allconv11", 8 * c, 4 * c, 3, 1, 1),
            ("allconv12", 4 * c, 4 * c, 3, 1, 1),
            ("allconv13_upsample", 4 * c, 2 * c, 3, 0, 1),
            ("allconv14", 2 * c, 2 * c, 3, 1, 1),
            ("allconv15_upsample", 2 * c, c, 3, 0, 1),
            ("allconv16", c, c // 2, 3, 1, 1),
            ("allconv17", c // 2, 3, 3, 1, 1, None),
        ]
        for name, cin, cout, k, stride, dil, *act in L:
            act = act[0] if act else "elu"
            if stride == 0:
                setattr(self, name, GenDeconv(cin, cout, k, 1, dil, act))
            else:
                setattr(self, name, GenConv(cin, cout, k, stride, dil, act))
        _glorot_(self)

    def _run(self, x, names):
        for n in names:
            x = getattr(self, n)(x)
        return x

    def forward(self, x_in, mask):
        """x_in: incomplete images [B, 3, H, W]; mask [1 or B, 1, H, W]. Returns (x1, x2, offsets)."""
        ones = torch.ones_like(x_in[:, :1])
        x = torch.cat([x_in, ones, ones * mask], dim=1)
        x = self._run(x, ["conv1", "conv2_downsample", "conv3", "conv4_downsample", "conv5", "conv6"])
        mask_s = resize_nearest_align_corners(mask, tuple(x.shape[-2:]))
        x = self._run(
            x,
            ["conv7_atrous", "conv8_atrous", "conv9_atrous", "conv10_atrous", "conv11", "conv12"]
            + ["conv13_upsample", "conv14", "conv15_upsample", "conv16", "conv17"],
        )
        x1 = torch.clamp(x, -1.0, 1.0)
        x = x1 * mask + x_in * (1.0 - mask)
        xnow = torch.cat([x, ones, ones * mask], dim=1)
        x_hallu = self._run(
            xnow,
            ["xconv1", "xconv2_downsample", "xconv3", "xconv4_downsample", "xconv5", "xconv6"]
            + ["xconv7_atrous", "xconv8_atrous", "xconv9_atrous", "xconv10_atrous"],
        )
        x = self._run(
            xnow, ["pmconv1", "pmconv2_downsample", "pmconv3", "pmconv4_downsample", "pmconv5", "pmconv6"]
        )
        x, offsets = contextual_attention(x, x, mask_s, 3, 1, rate=2)
        pm = self._run(x, ["pmconv9", "pmconv10"])
        x = torch.cat([x_hallu, pm], dim=1)
        x = self._run(
            x,
            ["allconv11", "allconv12", "allconv13_upsample", "allconv14", "allconv15_upsample"]
            + ["allconv16", "allconv17"],
        )
        x2 = torch.clamp(x, -1.0, 1.0)
        return x1, x2, offsets


class WGANCritic(nn.Module):
    """dis_conv stack (5x5, stride 2, TF SAME, bias, LeakyReLU 0.2), flatten, dense to 1."""

    def __init__(self, widths, in_size: int, cin: int = 3):
        super().__init__()
        convs, n = [], in_size
        for cout in widths:
            convs.append(nn.Conv2d(cin, cout, 5, 2, 0))
            cin, n = cout, -(-n // 2)
        self.convs = nn.ModuleList(convs)
        self.fc = nn.Linear(cin * n * n, 1)
        _glorot_(self)

    def forward(self, x):
        for conv in self.convs:
            x = F.leaky_relu(_conv_same(x, conv.weight, conv.bias, 2), 0.2)
        return self.fc(x.flatten(1))


class DeepFillV1Critics(nn.Module):
    """`discriminator_local` (64, 128, 256, 512 at cnum 64) on the local crop and
    `discriminator_global` (64, 128, 256, 256) on the whole image; 7,072,770 parameters
    at cnum 64, 128x128 crops and 256x256 images."""

    def __init__(self, cnum: int = 64, local_size: int = 128, size: int = 256):
        super().__init__()
        c = cnum
        self.discriminator_local = WGANCritic([c, 2 * c, 4 * c, 8 * c], local_size)
        self.discriminator_global = WGANCritic([c, 2 * c, 4 * c, 4 * c], size)


# --------------------------------------------------------------------------- losses and updates


def spatial_discount(height: int, width: int, gamma: float = 0.9) -> torch.Tensor:
    i = np.arange(height, dtype=np.float64)[:, None]
    j = np.arange(width, dtype=np.float64)[None, :]
    w = np.maximum(gamma ** np.minimum(i, height - i), gamma ** np.minimum(j, width - j))
    return torch.from_numpy(w.astype(np.float32)).view(1, 1, height, width)


def gradient_penalty(critic, real, fake, mask):
    """mean((sqrt(sum(grad^2 * mask)) - 1)^2) at x = real + a (fake - real), a ~ U(0, 1) per sample."""
    alpha = torch.rand(real.shape[0], 1, 1, 1)
    x = (real + alpha * (fake - real)).requires_grad_(True)
    (grad,) = torch.autograd.grad(critic(x).sum(), x, create_graph=True)
    slopes = (grad.square() * mask).sum(dim=(1, 2, 3)).sqrt()
    return (slopes - 1.0).square().mean()


def hole_boxes(mask: np.ndarray, crop: int) -> list[tuple[int, int]]:
    """Per image the (top, left) of a crop x crop box centred on the hole, clamped inside."""
    _, _, height, width = mask.shape
    boxes = []
    for m in mask[:, 0] > 0.5:
        rows, cols = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
        c2y = rows[0] + rows[-1] if rows.size else height - 1
        c2x = cols[0] + cols[-1] if cols.size else width - 1
        top = int(np.clip((c2y + 1 - crop) // 2, 0, height - crop))
        boxes.append((top, int(np.clip((c2x + 1 - crop) // 2, 0, width - crop))))
    return boxes


class Trainer:
    def __init__(self, size: int, cnum: int, batch: dict, loss_alpha: float = 1.2, gamma: float = 0.9):
        self.local = size // 2
        self.gen = DeepFillV1Generator(cnum)
        self.critics = DeepFillV1Critics(2 * cnum, self.local, size)
        self.opt_g = torch.optim.Adam(self.gen.parameters(), lr=1e-4, betas=(0.5, 0.9))
        self.opt_d = torch.optim.Adam(self.critics.parameters(), lr=1e-4, betas=(0.5, 0.9))
        self.g_params, self.d_params = list(self.gen.parameters()), list(self.critics.parameters())
        self.image = torch.from_numpy(batch["image"]).permute(0, 3, 1, 2).contiguous()
        self.mask = torch.from_numpy(batch["mask"]).permute(0, 3, 1, 2).contiguous()
        self.boxes = hole_boxes(batch["mask"].transpose(0, 3, 1, 2), self.local)
        self.discount = spatial_discount(self.local, self.local, gamma)
        self.alpha = loss_alpha

    def crop(self, t):
        n = self.local
        return torch.stack([t[i, :, y : y + n, x : x + n] for i, (y, x) in enumerate(self.boxes)])

    def critic_loss(self) -> torch.Tensor:
        image, mask = self.image, self.mask
        x_in = image * (1.0 - mask)
        with torch.no_grad():
            _, x2, _ = self.gen(x_in, mask)
        complete = x2 * mask + x_in * (1.0 - mask)
        pos_crop, complete_crop, mask_crop = self.crop(image), self.crop(complete), self.crop(mask)
        d_local = self.critics.discriminator_local(torch.cat([pos_crop, complete_crop]))
        d_global = self.critics.discriminator_global(torch.cat([image, complete]))
        pos_l, neg_l = d_local.chunk(2)
        pos_g, neg_g = d_global.chunk(2)
        d_loss_local, d_loss_global = (neg_l - pos_l).mean(), (neg_g - pos_g).mean()
        gp_local = gradient_penalty(self.critics.discriminator_local, pos_crop, complete_crop, mask_crop)
        gp_global = gradient_penalty(self.critics.discriminator_global, image, complete, mask)
        return d_loss_local + d_loss_global + 10.0 * (gp_local + gp_global)

    def generator_loss(self) -> torch.Tensor:
        image, mask, a = self.image, self.mask, self.alpha
        x_in = image * (1.0 - mask)
        x1, x2, _ = self.gen(x_in, mask)
        complete = x2 * mask + x_in * (1.0 - mask)
        pos_crop, x1_crop, x2_crop = self.crop(image), self.crop(x1), self.crop(x2)
        w = self.discount
        l1 = a * ((pos_crop - x1_crop).abs() * w).mean() + ((pos_crop - x2_crop).abs() * w).mean()
        keep = 1.0 - mask
        ae = (a * ((image - x1).abs() * keep).mean() + ((image - x2).abs() * keep).mean()) / keep.mean()
        g_local = -self.critics.discriminator_local(self.crop(complete)).mean()
        g_global = -self.critics.discriminator_global(complete).mean()
        return 0.001 * (g_global + g_local) + 1.2 * l1 + 1.2 * ae

    def _frozen_critics(self, frozen: bool) -> None:
        for p in self.critics.parameters():
            p.requires_grad_(not frozen)

    def critic_update(self) -> float:
        d_loss = self.critic_loss()
        self.opt_d.zero_grad(set_to_none=True)
        d_loss.backward(inputs=self.d_params)  # not into the penalty's interpolates
        self.opt_d.step()
        return float(d_loss.detach())

    def generator_update(self) -> float:
        self._frozen_critics(True)
        g_loss = self.generator_loss()
        self.opt_g.zero_grad(set_to_none=True)
        g_loss.backward(inputs=self.g_params)
        self.opt_g.step()
        self._frozen_critics(False)
        return float(g_loss.detach())

    def iteration(self) -> tuple[float, float]:
        return self.critic_update(), self.generator_update()

    def count_flops(self) -> dict:
        """Matmul / conv FLOPs of the two updates' forward and backward, on fake tensors
        (shapes only, no compute): the same ops as `critic_update` and `generator_update`."""
        from torch._subclasses.fake_tensor import FakeTensorMode

        out = {}
        updates = (("critic", self.critic_loss, self.d_params), ("generator", self.generator_loss, self.g_params))
        for name, loss_fn, params in updates:
            self._frozen_critics(name == "generator")
            with FakeTensorMode(allow_non_fake_inputs=True), _FlopCount() as counter:
                torch.autograd.grad(loss_fn(), params)
            self._frozen_critics(False)
            out[name] = counter.total
        return out


# --------------------------------------------------------------------------- benchmark


def _batch(batch: int, size: int):
    """The inputs of benchmarks/train_step.py's `_batch` (same seed and layout), NHWC."""
    rng = np.random.default_rng(0)
    image = rng.uniform(-1, 1, (batch, size, size, 3)).astype(np.float32)
    mask = np.zeros((batch, size, size, 1), np.float32)
    for i in range(batch):
        top, left = rng.integers(0, size // 2, 2)
        mask[i, top : top + size // 2 - 16, left : left + size // 2 - 16] = 1.0
    return {"image": image, "mask": mask}


def _matmul_rate(repeats: int) -> float:
    """GFLOP/s of a float32 2048^2 `torch.matmul`: the best of max(20, repeats) calls (as
    `train_step.py` measures jnp.matmul)."""
    n = 2048
    a = torch.from_numpy(np.random.default_rng(0).standard_normal((n, n)).astype(np.float32))
    torch.matmul(a, a)
    times = []
    for _ in range(max(20, repeats)):
        t0 = time.perf_counter()
        torch.matmul(a, a)
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / min(times) / 1e9


class _FlopCount(TorchDispatchMode):
    """Sums `torch.utils.flop_counter.flop_registry` (matmuls and convolutions, forward and
    backward) over the ATen ops run. `FlopCounterMode` itself cannot be used here: its
    module hooks reject the penalty's `autograd.grad` on a leaf input."""

    def __init__(self):
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.total += formula(*args, **kwargs, out_val=out)
        return out


def param_counts(size: int, cnum: int) -> dict:
    """Builds the modules (no forward) and counts their parameters."""
    gen = DeepFillV1Generator(cnum)
    critics = DeepFillV1Critics(2 * cnum, size // 2, size)
    return {
        "size": size,
        "cnum": cnum,
        "critic_cnum": 2 * cnum,
        "generator": _count(gen),
        "critic_local": _count(critics.discriminator_local),
        "critic_global": _count(critics.discriminator_global),
        "critics": _count(critics),
    }


def bench(batch: int, repeats: int, size: int, cnum: int, count_flops: bool) -> dict:
    torch.manual_seed(0)
    trainer = Trainer(size, cnum, _batch(batch, size))
    trainer.iteration()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        d_loss, g_loss = trainer.iteration()
        times.append(time.perf_counter() - t0)
    seconds = float(np.median(times))
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    nominal = NOMINAL_GFLOP_PER_IMAGE * (size / 256) ** 2 * (cnum / 32) ** 2
    result = {
        "batch": batch,
        "seconds_per_iteration": round(seconds, 3),
        "seconds_all": [round(t, 3) for t in times],
        "images_per_second": round(batch / seconds, 2),
        "nominal_gflop_per_image": round(nominal, 3),
        "nominal_gflops": round(nominal * batch / seconds, 1),
    }
    if count_flops:
        flops = trainer.count_flops()
        total = flops["critic"] + flops["generator"]
        result["torch_gflop_per_iteration"] = round(total / 1e9, 1)
        result["torch_gflop_critic_generator"] = [round(v / 1e9, 1) for v in flops.values()]
        result["torch_gflops"] = round(total / seconds / 1e9, 1)
    result["peak_rss_mb"] = round(peak_rss, 0)
    result["d_loss"], result["g_loss"] = d_loss, g_loss
    result["losses_finite"] = bool(math.isfinite(d_loss) and math.isfinite(g_loss))
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[4])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: all allowed CPUs)")
    parser.add_argument("--size", type=int, default=256, help="image size (official 256; a multiple of 8)")
    parser.add_argument("--cnum", type=int, default=32, help="generator width (official 32); critics get 2 * cnum")
    parser.add_argument("--no-flop-count", action="store_true", help="skip the FLOP count (fake tensors, no compute)")
    parser.add_argument("--count-only", action="store_true", help="print parameter and FLOP counts, then exit")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    if args.size % 8 or args.size <= 32 or args.cnum % 2:
        parser.error("--size must be a multiple of 8 above 32 (holes are size/2 - 16) and --cnum even")
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    torch.set_num_threads(args.threads or cpus)
    info = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpus_allowed": cpus,
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "size": args.size,
        "cnum": args.cnum,
        "critic_cnum": 2 * args.cnum,
        "local_size": args.size // 2,
    }
    print(json.dumps(info), flush=True)
    info["params"] = {"official": param_counts(OFFICIAL["size"], OFFICIAL["cnum"])}
    if (args.size, args.cnum) != (OFFICIAL["size"], OFFICIAL["cnum"]):
        info["params"]["this_run"] = param_counts(args.size, args.cnum)
    print(json.dumps({"params": info["params"]}), flush=True)
    if args.count_only:
        for batch in args.batch:
            flops = Trainer(args.size, args.cnum, _batch(batch, args.size)).count_flops()
            counts = {
                "batch": batch,
                "torch_gflop_critic_generator": [round(v / 1e9, 1) for v in flops.values()],
                "torch_gflop_per_iteration": round(sum(flops.values()) / 1e9, 1),
            }
            print(json.dumps(counts), flush=True)
    else:
        info["matmul_gflops"] = round(_matmul_rate(args.repeats), 1)
        print(json.dumps({"matmul_gflops_float32_2048": info["matmul_gflops"]}), flush=True)
        info["results"] = []
        for batch in args.batch:
            result = bench(batch, args.repeats, args.size, args.cnum, not args.no_flop_count)
            result["pct_of_matmul_nominal"] = round(100 * result["nominal_gflops"] / info["matmul_gflops"], 1)
            if "torch_gflops" in result:
                result["pct_of_matmul_torch_flops"] = round(100 * result["torch_gflops"] / info["matmul_gflops"], 1)
            info["results"].append(result)
            print(json.dumps(result), flush=True)
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
