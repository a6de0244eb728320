"""Distillation losses: hand-computed values on tiny tensors, Monte-Carlo margins, noise stats."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robustkd.errors import ConfigError
from robustkd.models import create_model
from robustkd.training.losses import (
    Connector,
    FeatureDistiller,
    attention_map,
    bn_margin,
    logit_kd_loss,
    nad_loss,
    overhaul_loss,
    salt_and_pepper,
    stage_weights,
    variance_alignment_loss,
    weighted_mean,
)


def _row(*values: float) -> torch.Tensor:
    """A 1×1×1×W feature map."""
    return torch.tensor(values).reshape(1, 1, 1, -1)


# ---------------------------------------------------------------- overhaul loss


# position 0: student above a positive target → (2-1)² = 1
# position 1: student below a negative target (s < t ≤ 0) → not counted
# position 2: positive target, student below it → (0.5-3)² = 6.25
# position 3: student above a negative target → (-0.2+0.5)² = 0.09
STUDENT = _row(2.0, -2.0, 0.5, -0.2)
TEACHER = _row(1.0, -1.0, 3.0, -0.5)


def test_overhaul_loss_by_hand_without_margin() -> None:
    assert overhaul_loss(STUDENT, TEACHER).item() == pytest.approx(1 + 6.25 + 0.09)


def test_overhaul_loss_by_hand_with_margin() -> None:
    # margin -0.3: targets [1, -0.3, 3, -0.3]; position 1 still s < t ≤ 0, position 3 → 0.1²
    loss = overhaul_loss(STUDENT, TEACHER, torch.tensor([-0.3]))
    assert loss.item() == pytest.approx(1 + 6.25 + 0.01)
    # margin 0 clamps the teacher at 0: position 3 then has s < t = 0 and drops out
    assert overhaul_loss(STUDENT, TEACHER, torch.tensor([0.0])).item() == pytest.approx(7.25)


def test_overhaul_margin_is_per_channel() -> None:
    student = torch.tensor([-1.0, -1.0]).reshape(1, 2, 1, 1)
    teacher = torch.tensor([-3.0, -3.0]).reshape(1, 2, 1, 1)
    # channel 0: target max(-3, -2) = -2 < s → 1²; channel 1: target max(-3, -0.5) > s → dropped
    loss = overhaul_loss(student, teacher, torch.tensor([-2.0, -0.5]))
    assert loss.item() == pytest.approx(1.0)


def test_overhaul_loss_is_a_per_sample_sum() -> None:
    two = overhaul_loss(torch.cat([STUDENT, STUDENT]), torch.cat([TEACHER, TEACHER]))
    assert two.item() == pytest.approx(7.34)


def test_overhaul_loss_rejects_mismatched_shapes() -> None:
    with pytest.raises(ConfigError):
        overhaul_loss(torch.zeros(1, 2, 3, 3), torch.zeros(1, 3, 3, 3))
    with pytest.raises(ConfigError):
        overhaul_loss(STUDENT, TEACHER, torch.zeros(2))


# ---------------------------------------------------------------- BN margin


def test_bn_margin_matches_monte_carlo() -> None:
    bn = nn.BatchNorm2d(4)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.0, 2.0, -0.5, 0.7]))
        bn.bias.copy_(torch.tensor([0.5, -1.0, 0.2, 1.5]))
    margin = bn_margin(bn)
    assert margin.shape == (4,) and margin.dtype == torch.float32
    gen = torch.Generator().manual_seed(0)
    for c in range(4):
        x = bn.bias[c].item() + abs(bn.weight[c].item()) * torch.randn(200_000, generator=gen)
        expected = x[x < 0].mean().item()
        assert margin[c].item() == pytest.approx(expected, rel=0.02)
        assert margin[c].item() < 0


def test_bn_margin_falls_back_to_three_sigma() -> None:
    bn = nn.BatchNorm2d(3)
    with torch.no_grad():
        # P(x < 0) = Φ(-4) ≈ 3e-5 and Φ(-10/1.5) ≈ 1e-11: both below 1e-3
        bn.weight.copy_(torch.tensor([1.0, -1.5, 1.0]))
        bn.bias.copy_(torch.tensor([4.0, 10.0, 2.0]))
    margin = bn_margin(bn)
    assert margin[0].item() == pytest.approx(-3.0)
    assert margin[1].item() == pytest.approx(-4.5)
    # Φ(-2) ≈ 0.023 > 1e-3: the truncated mean, not -3
    z = 2.0
    phi = math.exp(-z * z / 2) / math.sqrt(2 * math.pi)
    cdf = 0.5 * math.erfc(z / math.sqrt(2))
    assert margin[2].item() == pytest.approx(2.0 - phi / cdf, rel=1e-5)


def test_bn_margin_is_finite_for_zero_gamma() -> None:
    bn = nn.BatchNorm2d(2)
    with torch.no_grad():
        bn.weight.zero_()
        bn.bias.copy_(torch.tensor([-1.0, 1.0]))
    assert bn_margin(bn).tolist() == pytest.approx([-1.0, 0.0])


# ---------------------------------------------------------------- stage weights


def test_stage_weights() -> None:
    assert stage_weights(3) == [0.25, 0.5, 1.0]
    assert stage_weights(1) == [1.0]
    assert stage_weights(4) == [0.125, 0.25, 0.5, 1.0]


# ---------------------------------------------------------------- logit KD


def test_logit_kd_is_zero_for_identical_logits() -> None:
    torch.manual_seed(0)
    logits = torch.randn(5, 10)
    assert logit_kd_loss(logits, logits.clone()).item() == pytest.approx(0.0, abs=1e-6)


def test_logit_kd_by_hand() -> None:
    # T = 2: teacher softmax([2 ln 3, 0] / 2) = [3/4, 1/4]; student softmax(0, 0) = [1/2, 1/2]
    teacher = torch.tensor([[2 * math.log(3.0), 0.0], [1.0, 2.0]])
    student = torch.tensor([[0.0, 0.0], [1.0, 2.0]])  # second row identical: KL 0
    kl = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    expected = kl * 2.0**2 / 2  # × T², batch mean over 2 rows
    assert logit_kd_loss(student, teacher, temperature=2.0).item() == pytest.approx(expected)


def test_logit_kd_matches_kl_div() -> None:
    torch.manual_seed(1)
    s, t = torch.randn(8, 10), torch.randn(8, 10)
    ref = F.kl_div(F.log_softmax(s / 4, 1), F.softmax(t / 4, 1), reduction="batchmean") * 16
    assert logit_kd_loss(s, t).item() == pytest.approx(ref.item(), rel=1e-5)
    with pytest.raises(ConfigError):
        logit_kd_loss(s, t, temperature=0.0)


# ---------------------------------------------------------------- NAD attention


def test_attention_map_by_hand_and_unit_norm() -> None:
    feat = torch.tensor([[1.0, 2.0], [2.0, 0.0]]).reshape(1, 2, 1, 2)
    # Σ_c F_c² = [1 + 4, 4 + 0] = [5, 4], normalised by √41
    expected = torch.tensor([[5.0, 4.0]]) / math.sqrt(41.0)
    torch.testing.assert_close(attention_map(feat), expected)
    torch.manual_seed(0)
    maps = attention_map(torch.randn(3, 8, 5, 5))
    assert maps.shape == (3, 25)
    torch.testing.assert_close(maps.norm(dim=1), torch.ones(3))


def test_nad_loss_is_scale_invariant_and_resizes() -> None:
    torch.manual_seed(0)
    teacher = torch.randn(2, 4, 4, 4)
    assert nad_loss(3.0 * teacher, teacher).item() == pytest.approx(0.0, abs=1e-10)
    # an 8×8 student whose 2×2 blocks repeat the teacher pools back to it exactly
    student = teacher.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    assert nad_loss(student, teacher).item() == pytest.approx(0.0, abs=1e-10)
    assert nad_loss(torch.randn(2, 4, 4, 4), teacher).item() > 1e-4


def test_nad_loss_by_hand() -> None:
    # attention maps [1, 0] and [0, 1]: MSE = (1 + 1) / 2
    assert nad_loss(_row(1.0, 0.0), _row(0.0, 1.0)).item() == pytest.approx(1.0)


# ---------------------------------------------------------------- variance alignment


def test_variance_alignment_by_hand() -> None:
    student = torch.zeros(2, 2, 2, 2)
    teacher = torch.zeros(2, 2, 2, 2)
    student[0, 0] = torch.tensor([[0.0, 2.0], [0.0, 2.0]])  # pooled 1
    student[1, 0] = 3.0  # pooled 3 → channel 0 variance 1
    teacher[0, 1] = 2.0
    teacher[1, 1] = torch.tensor([[-4.0, 0.0], [0.0, -4.0]])  # pooled -2 → channel 1 variance 4
    # student variances [1, 0], teacher [0, 4] → ((1-0)² + (0-4)²) / 2
    assert variance_alignment_loss(student, teacher).item() == pytest.approx(8.5)
    assert variance_alignment_loss(teacher, teacher).item() == 0.0
    with pytest.raises(ConfigError):
        variance_alignment_loss(torch.zeros(2, 3, 2, 2), teacher)


# ---------------------------------------------------------------- salt and pepper


LOW = torch.tensor([-1.0, -2.0, -3.0])
HIGH = torch.tensor([1.5, 2.5, 3.5])


def _noisy(seed: int, x: torch.Tensor, rate: float = 0.5) -> torch.Tensor:
    return salt_and_pepper(x, rate, LOW, HIGH, generator=torch.Generator().manual_seed(seed))


def test_salt_and_pepper_statistics_and_channels() -> None:
    torch.manual_seed(0)
    x = torch.rand(8, 3, 64, 64) * 0.5 + 0.25  # never equal to a low or high value
    before = x.clone()
    out = _noisy(0, x)
    assert torch.equal(x, before)  # not modified in place
    is_low = out == LOW.view(1, 3, 1, 1)
    is_high = out == HIGH.view(1, 3, 1, 1)
    for c in range(1, 3):  # the same pixel positions in every channel
        assert torch.equal(is_low[:, c], is_low[:, 0])
        assert torch.equal(is_high[:, c], is_high[:, 0])
    assert is_low[:, 0].float().mean().item() == pytest.approx(0.25, abs=0.02)
    assert is_high[:, 0].float().mean().item() == pytest.approx(0.25, abs=0.02)
    untouched = ~(is_low | is_high)
    assert torch.equal(out[untouched], x[untouched])


def test_salt_and_pepper_is_reproducible() -> None:
    x = torch.full((4, 3, 16, 16), 0.5)
    assert torch.equal(_noisy(7, x), _noisy(7, x))
    assert not torch.equal(_noisy(7, x), _noisy(8, x))


def test_salt_and_pepper_edge_rates_and_scalars() -> None:
    x = torch.full((2, 1, 8, 8), 0.5)
    assert torch.equal(salt_and_pepper(x, 0.0, 0.0, 1.0), x)
    full = salt_and_pepper(x, 1.0, 0.0, 1.0, generator=torch.Generator().manual_seed(0))
    assert ((full == 0.0) | (full == 1.0)).all()
    for rate in (1.5, -0.1):
        with pytest.raises(ConfigError):
            salt_and_pepper(x, rate, 0.0, 1.0)


# ---------------------------------------------------------------- connector and distiller


def test_connector_shapes_and_init() -> None:
    torch.manual_seed(0)
    conn = Connector(16, 32)
    x = torch.randn(2, 16, 8, 8)
    assert conn(x).shape == (2, 32, 8, 8)
    assert conn(x, size=(4, 4)).shape == (2, 32, 4, 4)
    assert conn(x, size=torch.Size([8, 8])).shape == (2, 32, 8, 8)
    assert (conn.bn.weight == 1).all() and (conn.bn.bias == 0).all()
    assert conn.conv.bias is None
    big = Connector(64, 256)  # kaiming fan_out: std √(2 / 256)
    assert big.conv.weight.std().item() == pytest.approx(math.sqrt(2 / 256), rel=0.05)


def _identity_distiller(channels: list[int]) -> FeatureDistiller:
    distiller = FeatureDistiller(channels, channels)
    with torch.no_grad():
        for conn in distiller.connectors:
            c = conn.conv.weight.shape[0]
            conn.conv.weight.copy_(torch.eye(c).reshape(c, c, 1, 1))
            conn.bn.running_mean.zero_()
            conn.bn.running_var.fill_(1.0)
            conn.bn.eps = 0.0
    return distiller.eval()


def test_distiller_is_zero_for_identical_features() -> None:
    torch.manual_seed(0)
    feats = [torch.randn(2, 4, 8, 8), torch.randn(2, 8, 4, 4)]
    distiller = _identity_distiller([4, 8])
    assert distiller(feats, [f.clone() for f in feats]).item() == pytest.approx(0.0, abs=1e-10)
    assert distiller([f + 1.0 for f in feats], feats).item() > 0


def test_distiller_weights_stages_and_divides_by_1000() -> None:
    torch.manual_seed(0)
    margins = [torch.full((6,), -0.5), None, torch.full((10,), -1.0)]
    distiller = FeatureDistiller([3, 4, 5], [6, 8, 10], margins)
    student = [torch.randn(2, 3, 8, 8), torch.randn(2, 4, 4, 4), torch.randn(2, 5, 2, 2)]
    teacher = [torch.randn(2, 6, 4, 4), torch.randn(2, 8, 4, 4), torch.randn(2, 10, 2, 2)]
    mapped = distiller.connected(student, teacher)
    assert [m.shape for m in mapped] == [t.shape for t in teacher]
    expected = (
        0.25 * overhaul_loss(mapped[0], teacher[0], margins[0])
        + 0.5 * overhaul_loss(mapped[1], teacher[1])
        + 1.0 * overhaul_loss(mapped[2], teacher[2], margins[2])
    ) / 1000
    assert distiller(student, teacher).item() == pytest.approx(expected.item(), rel=1e-5)
    assert torch.equal(distiller.state_dict()["margin2"], margins[2])


def test_distiller_validates_lengths() -> None:
    with pytest.raises(ConfigError):
        FeatureDistiller([3, 4], [6])
    with pytest.raises(ConfigError):
        FeatureDistiller([3], [6], [torch.zeros(5)])
    distiller = FeatureDistiller([3, 4], [6, 8])
    with pytest.raises(ConfigError):
        distiller([torch.zeros(1, 3, 2, 2)], [torch.zeros(1, 6, 2, 2)])


def test_distiller_gradients_and_training_reduce_the_loss() -> None:
    torch.manual_seed(0)
    distiller = FeatureDistiller([4, 8], [8, 16])
    teacher = [torch.randn(4, 8, 8, 8).requires_grad_(), torch.randn(4, 16, 4, 4)]
    student = [torch.randn(4, 4, 8, 8, requires_grad=True), torch.randn(4, 8, 4, 4)]
    distiller(student, teacher).backward()
    assert student[0].grad is not None and student[0].grad.abs().sum() > 0
    assert teacher[0].grad is None  # the teacher is a target, not trained
    assert distiller.connectors[0].conv.weight.grad is not None

    # 20 Adam steps on a fixed pair bring the loss to about a third (seeds 0-2: 0.32-0.33)
    student = [s.detach().requires_grad_() for s in student]
    opt = torch.optim.Adam([*student, *distiller.parameters()], lr=0.1)
    first = None
    for _ in range(20):
        opt.zero_grad()
        loss = distiller(student, teacher)
        first = loss.item() if first is None else first
        loss.backward()
        opt.step()
    assert distiller(student, teacher).item() < 0.5 * first


def test_distiller_on_the_default_models_with_bn_margins() -> None:
    torch.manual_seed(0)
    teacher = create_model("small-cnn").eval()
    student = create_model("small-cnn-student")

    def stage_outputs(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
        feats: list[torch.Tensor] = []
        hooks = [
            getattr(model, name).register_forward_hook(lambda m, i, o: feats.append(o))
            for name in model.feature_layers
        ]
        model(x)
        for h in hooks:
            h.remove()
        return feats

    margins = [bn_margin(getattr(teacher, name)[-2]) for name in teacher.feature_layers]
    distiller = FeatureDistiller([16, 32, 64], [32, 64, 128], margins)
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        t_feats = stage_outputs(teacher, x)
    s_feats = stage_outputs(student, x)
    loss = distiller(s_feats, t_feats)
    assert loss.ndim == 0 and torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    assert student.block1[0].weight.grad is not None


# ---------------------------------------------------------------- per-sample weights


def _kept_pairs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    s = torch.randn(6, 4, 5, 5, generator=g)
    t = torch.randn(6, 4, 5, 5, generator=g)
    keep = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 1.0])
    return s, t, keep


def test_weighted_losses_equal_the_losses_on_the_kept_samples() -> None:
    s, t, keep = _kept_pairs()
    k = keep.bool()
    margin = torch.full((4,), -0.5)
    assert torch.allclose(overhaul_loss(s, t, margin, keep), overhaul_loss(s[k], t[k], margin))
    sl, tl = s.flatten(1)[:, :10], t.flatten(1)[:, :10]
    assert torch.allclose(logit_kd_loss(sl, tl, 4.0, keep), logit_kd_loss(sl[k], tl[k], 4.0))
    assert torch.allclose(nad_loss(s, t, weights=keep), nad_loss(s[k], t[k]))
    assert torch.allclose(
        variance_alignment_loss(s, t, keep), variance_alignment_loss(s[k], t[k]), atol=1e-6
    )


def test_weighted_losses_keep_gradients_off_the_left_out_samples() -> None:
    s, t, keep = _kept_pairs()
    s.requires_grad_(True)
    overhaul_loss(s, t, None, keep).backward()
    assert s.grad is not None
    assert torch.all(s.grad[~keep.bool()] == 0) and s.grad[keep.bool()].abs().sum() > 0


def test_weighted_mean_of_nothing_kept_is_zero() -> None:
    values = torch.tensor([1.0, 2.0, 3.0])
    assert weighted_mean(values, torch.zeros(3)).item() == 0.0
    assert weighted_mean(values, None).item() == pytest.approx(2.0)
    assert weighted_mean(values, torch.tensor([0.0, 1.0, 1.0])).item() == pytest.approx(2.5)
