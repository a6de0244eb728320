"""Distillation losses: feature overhaul (Heo et al., ICCV 2019), Hinton KD, NAD attention,
variance alignment, and the salt-and-pepper input noise used while distilling.

Teacher tensors are targets: every loss detaches them, so gradients reach only the student
side (student features, logits and the connectors).

Every batch loss takes optional per-sample ``weights`` (1 keep, 0 leave out): the loss is then
the mean over the kept samples, exactly as if the batch held only those, without indexing
by a mask (which would make the host wait for the GPU every step).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustkd.errors import ConfigError

__all__ = [
    "Connector",
    "FeatureDistiller",
    "attention_map",
    "bn_margin",
    "logit_kd_loss",
    "nad_loss",
    "overhaul_loss",
    "salt_and_pepper",
    "stage_weights",
    "variance_alignment_loss",
    "weighted_mean",
]


class Connector(nn.Module):
    """A 1×1 convolution (no bias) and batch norm mapping student channels to teacher channels."""

    def __init__(self, student_channels: int, teacher_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(student_channels, teacher_channels, 1, bias=False)
        self.bn = nn.BatchNorm2d(teacher_channels)
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")
        nn.init.ones_(self.bn.weight)
        nn.init.zeros_(self.bn.bias)

    def forward(self, x: Tensor, size: Sequence[int] | None = None) -> Tensor:
        """Map ``x`` to teacher channels; average-pool to ``size`` (H, W) when that differs."""
        out = self.bn(self.conv(x))
        if size is not None and tuple(out.shape[-2:]) != tuple(size):
            out = F.adaptive_avg_pool2d(out, tuple(int(s) for s in size))
        return out


def bn_margin(bn: nn.BatchNorm2d) -> Tensor:
    """Per-channel E[x | x < 0] for a pre-activation x ~ N(β, γ²), or −3|γ| when P(x < 0) ≤ 1e-3."""
    c = bn.num_features
    device = next((t.device for t in (bn.weight, bn.running_mean) if t is not None), None)
    if bn.weight is not None:
        gamma = bn.weight.detach().to(torch.float64)
    else:
        gamma = torch.ones(c, dtype=torch.float64, device=device)
    if bn.bias is not None:
        beta = bn.bias.detach().to(torch.float64)
    else:
        beta = torch.zeros(c, dtype=torch.float64, device=device)
    std = gamma.abs()
    positive = std > 0
    safe_std = torch.where(positive, std, torch.ones_like(std))
    z = beta / safe_std
    prob_negative = torch.special.ndtr(-z)  # P(x < 0)
    pdf = torch.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)
    truncated_mean = beta - std * pdf / prob_negative.clamp_min(1e-300)
    margin = torch.where(prob_negative > 1e-3, truncated_mean, -3.0 * std)
    # γ = 0: x = β exactly, so the mean of the negative part is β itself when β < 0.
    degenerate = torch.where(beta < 0, beta, torch.zeros_like(beta))
    margin = torch.where(positive, margin, degenerate)
    return margin.to(torch.float32)


def weighted_mean(per_sample: Tensor, weights: Tensor | None) -> Tensor:
    """Mean of (N,) values; with ``weights``, Σ wᵢxᵢ / Σ wᵢ (0 when every weight is 0)."""
    if weights is None:
        return per_sample.mean()
    w = weights.to(per_sample.dtype)
    return (per_sample * w).sum() / w.sum().clamp_min(1.0)


def overhaul_loss(
    student_feat: Tensor,
    teacher_feat: Tensor,
    margin: Tensor | None = None,
    weights: Tensor | None = None,
) -> Tensor:
    """Margin-based partial L2 between (N, C, H, W) features, summed and divided by N."""
    if student_feat.shape != teacher_feat.shape:
        raise ConfigError(
            f"Student and teacher features must have the same shape for the overhaul loss; "
            f"got {tuple(student_feat.shape)} and {tuple(teacher_feat.shape)}."
        )
    target = teacher_feat.detach()
    if margin is not None:
        channels = target.shape[1]
        if margin.numel() != channels:
            raise ConfigError(
                f"The margin needs one value per teacher channel ({channels}); "
                f"got {margin.numel()}."
            )
        m = margin.detach().to(device=target.device, dtype=target.dtype).reshape(1, channels, 1, 1)
        target = torch.maximum(target, m)
    mask = (student_feat > target) | (target > 0)
    sq = (student_feat - target).pow(2) * mask.to(student_feat.dtype)
    if weights is None:
        return sq.sum() / student_feat.shape[0]
    return weighted_mean(sq.flatten(1).sum(1), weights)


def stage_weights(n: int) -> list[float]:
    """Overhaul stage weights 2^-(n-1-i) for i = 0 … n-1, e.g. [1/4, 1/2, 1] for three stages."""
    if n < 0:
        raise ConfigError(f"The number of stages cannot be negative; got {n}.")
    return [2.0 ** -(n - 1 - i) for i in range(n)]


def logit_kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float = 4.0,
    weights: Tensor | None = None,
) -> Tensor:
    """Hinton KD: KL(softmax(t/T) ‖ softmax(s/T)) · T², averaged over the batch."""
    if not temperature > 0:
        raise ConfigError(f"The distillation temperature must be positive; got {temperature}.")
    log_p_student = F.log_softmax(student_logits / temperature, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits.detach() / temperature, dim=1)
    if weights is None:
        kl = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
    else:
        per_sample = F.kl_div(log_p_student, log_p_teacher, reduction="none", log_target=True)
        kl = weighted_mean(per_sample.sum(1), weights)
    return kl * temperature**2


def attention_map(feat: Tensor, p: float = 2.0) -> Tensor:
    """NAD attention: Σ_c |F_c|^p as an (N, H·W) map with unit L2 norm per sample."""
    return F.normalize(feat.abs().pow(p).sum(dim=1).flatten(1), p=2.0, dim=1, eps=1e-8)


def nad_loss(
    student_feat: Tensor, teacher_feat: Tensor, p: float = 2.0, weights: Tensor | None = None
) -> Tensor:
    """MSE between student and teacher attention maps (student pooled to the teacher's H×W)."""
    size = tuple(teacher_feat.shape[-2:])
    if tuple(student_feat.shape[-2:]) != size:
        student_feat = F.adaptive_avg_pool2d(student_feat, size)
    s_map, t_map = attention_map(student_feat, p), attention_map(teacher_feat.detach(), p)
    if weights is None:
        return F.mse_loss(s_map, t_map)
    return weighted_mean((s_map - t_map).pow(2).mean(1), weights)


def variance_alignment_loss(
    student_feat: Tensor, teacher_feat: Tensor, weights: Tensor | None = None
) -> Tensor:
    """Mean squared gap between per-channel batch variances of spatially pooled features."""
    if student_feat.shape[:2] != teacher_feat.shape[:2]:
        raise ConfigError(
            f"Variance alignment needs features with the same batch size and channels "
            f"(map the student through a Connector first); got {tuple(student_feat.shape)} "
            f"and {tuple(teacher_feat.shape)}."
        )

    def channel_variance(feat: Tensor) -> Tensor:
        pooled = feat.flatten(2).mean(dim=2) if feat.dim() > 2 else feat
        if weights is None:
            return pooled.var(dim=0, unbiased=False)
        w = weights.to(pooled.dtype)[:, None]
        total = w.sum().clamp_min(1.0)
        mean = (pooled * w).sum(0) / total
        return ((pooled - mean).pow(2) * w).sum(0) / total

    diff = channel_variance(student_feat) - channel_variance(teacher_feat.detach())
    return diff.pow(2).mean()


def salt_and_pepper(
    x: Tensor,
    rate: float,
    low: Tensor | float,
    high: Tensor | float,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Set each pixel (all channels alike) to ``low`` or ``high`` with probability rate/2 each."""
    if not 0.0 <= rate <= 1.0:
        raise ConfigError(f"The salt-and-pepper rate must lie between 0 and 1; got {rate}.")
    if x.dim() < 3:
        raise ConfigError(
            f"Salt-and-pepper noise needs images shaped (C, H, W) or (N, C, H, W); "
            f"got {tuple(x.shape)}."
        )
    if rate == 0:
        return x
    channels = x.shape[-3]
    mask_shape = list(x.shape)
    mask_shape[-3] = 1
    # Drawn where the generator lives (the GPU's own when training there: no host copy).
    where = generator.device if generator is not None else x.device
    u = torch.rand(mask_shape, generator=generator, dtype=torch.float64, device=where)
    u = u.to(x.device)
    pepper = u < rate / 2
    salt = (u >= rate / 2) & (u < rate)

    def as_channel_values(value: Tensor | float, name: str) -> Tensor:
        t = torch.as_tensor(value).to(device=x.device, dtype=x.dtype)
        if t.numel() == 1:
            return t.reshape(())
        if t.numel() != channels:
            raise ConfigError(
                f"The {name} value needs one entry per channel ({channels}); got {t.numel()}."
            )
        return t.reshape(channels, 1, 1)

    out = torch.where(pepper, as_channel_values(low, "low"), x)
    return torch.where(salt, as_channel_values(high, "high"), out)


class FeatureDistiller(nn.Module):
    """Overhaul feature distillation over several stages: one Connector and margin per stage."""

    def __init__(
        self,
        student_channels: Sequence[int],
        teacher_channels: Sequence[int],
        margins: Sequence[Tensor | None] | None = None,
    ) -> None:
        super().__init__()
        if len(student_channels) != len(teacher_channels):
            raise ConfigError(
                f"The student and teacher need the same number of distilled stages; "
                f"got {len(student_channels)} and {len(teacher_channels)}."
            )
        if not student_channels:
            raise ConfigError("Feature distillation needs at least one stage.")
        if margins is not None and len(margins) != len(teacher_channels):
            raise ConfigError(
                f"Give one margin per stage ({len(teacher_channels)}); got {len(margins)}."
            )
        self.connectors = nn.ModuleList(
            Connector(s, t) for s, t in zip(student_channels, teacher_channels, strict=True)
        )
        self.num_stages = len(teacher_channels)
        self.weights = stage_weights(self.num_stages)
        for i, channels in enumerate(teacher_channels):
            margin = None if margins is None else margins[i]
            if margin is not None:
                margin = torch.as_tensor(margin, dtype=torch.float32).detach().clone().flatten()
                if margin.numel() != channels:
                    raise ConfigError(
                        f"The margin of stage {i + 1} needs {channels} values, one per teacher "
                        f"channel; got {margin.numel()}."
                    )
            self.register_buffer(f"margin{i}", margin)

    def margin(self, i: int) -> Tensor | None:
        """The margin buffer of stage ``i`` (None when the stage has no margin)."""
        return getattr(self, f"margin{i}")

    def _check(self, student_feats: Sequence[Tensor], teacher_feats: Sequence[Tensor]) -> None:
        if not len(student_feats) == len(teacher_feats) == self.num_stages:
            raise ConfigError(
                f"Feature distillation expects {self.num_stages} student and teacher features; "
                f"got {len(student_feats)} and {len(teacher_feats)}."
            )

    def connected(
        self, student_feats: Sequence[Tensor], teacher_feats: Sequence[Tensor]
    ) -> list[Tensor]:
        """The student features mapped by each stage's Connector to the teacher's shape."""
        self._check(student_feats, teacher_feats)
        return [
            conn(s, size=t.shape[-2:])
            for conn, s, t in zip(self.connectors, student_feats, teacher_feats, strict=True)
        ]

    def forward(
        self,
        student_feats: Sequence[Tensor],
        teacher_feats: Sequence[Tensor],
        weights: Tensor | None = None,
    ) -> Tensor:
        """Σ_i w_i · overhaul_loss(connector_i(s_i), t_i, margin_i) / 1000 (per-sample
        ``weights`` as in every loss here)."""
        mapped = self.connected(student_feats, teacher_feats)
        total = mapped[0].new_zeros(())
        for i, (s, t) in enumerate(zip(mapped, teacher_feats, strict=True)):
            total = total + self.weights[i] * overhaul_loss(s, t, self.margin(i), weights)
        return total / 1000.0
