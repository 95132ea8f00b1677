"""The BYOL building blocks, each on its own: heads, loss, EMA target, tau, LARS groups, schedules,
augmentations, metrics, checkpoints."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from runner.ml.augment import PRESETS, affine_params, augment, eval_view, preset_for
from runner.ml.byol import BYOL, MLPHead, byol_loss, projection_std, tau_at
from runner.ml.checkpoint import atomic_save, safe_load
from runner.ml.metrics import apply_temperature, classification_metrics, fit_temperature, prior_loss
from runner.ml.models import Backbone
from runner.ml.optim import LARS, lars_for, scaled_lr, split_decay_groups, warmup_cosine


def small_byol(channels: int = 1) -> BYOL:
    return BYOL(Backbone("resnet18", channels), proj_hidden=64, proj_dim=16, pred_hidden=64)


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_the_resnets_are_torchvisions_weight_for_weight(arch):
    """Our ResNets (written here: importing torchvision costs a worker seconds) build torchvision's
    networks: the same seed gives the same weights under the same names, the same outputs (to the bit
    where no convolution's map is 2x2 or smaller; to float rounding at 64 px, where the last stage's
    are, which SmallMapConv2d computes as matrix products on the CPU), and the ImageNet weights files
    are found under torchvision's names."""
    import torchvision

    from runner.ml.models import IMAGENET_URLS, ResNet

    torch.manual_seed(0)
    ours = ResNet(arch).eval()
    torch.manual_seed(0)
    theirs = getattr(torchvision.models, arch)().eval()
    a, b = ours.state_dict(), theirs.state_dict()
    assert list(a) == list(b)
    assert all(torch.equal(a[k], b[k]) for k in a)
    with torch.no_grad():
        x = torch.randn(2, 3, 96, 96)  # the last stage's maps 3x3: PyTorch's convolutions throughout
        assert torch.equal(ours(x), theirs(x))
        x = torch.randn(2, 3, 64, 64)  # 2x2: the small-map path
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-4, atol=1e-5)
    assert IMAGENET_URLS[arch] == torchvision.models.get_model_weights(arch).DEFAULT.url


@pytest.mark.parametrize("cin,cout,size,stride,bias,layout,bf16", [
    (64, 96, 2, 1, False, "channels_last", False),   # a 2x2 map, same size out
    (32, 64, 4, 2, False, "channels_last", False),   # 4x4 in, 2x2 out: the first conv of a last stage
    (48, 48, 1, 1, True, "contiguous", False),       # 1x1 (32 px images), NCHW, with a bias
    (40, 24, 3, 2, False, "channels_last", False),   # 3x3 in, 2x2 out: an odd size
    (64, 64, 2, 1, False, "channels_last", True),    # under bf16 autocast
])
def test_a_small_map_convolution_is_pytorchs_convolution_in_value_gradient_and_layout(cin, cout, size, stride, bias, layout, bf16):
    """SmallMapConv2d computes a 3x3 convolution whose output map has at most 2x2 pixels as one matrix
    product on the CPU. It must be the same function as PyTorch's: the same output (shape, dtype,
    memory layout), the same gradients for input, weight and bias, to float rounding (bf16's where
    autocast asks for bf16); and the same module to everything that saves or loads one."""
    import torch.nn.functional as F

    from runner.ml.models import SmallMapConv2d

    torch.manual_seed(0)
    conv = SmallMapConv2d(cin, cout, 3, stride=stride, padding=1, bias=bias)
    x = torch.randn(3, cin, size, size)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    outs = {}
    for way in ("small-map", "pytorch"):
        xi = x.clone().requires_grad_()
        conv.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            y = conv(xi) if way == "small-map" else F.conv2d(xi, conv.weight, conv.bias, stride=stride, padding=1)
        assert y.is_contiguous(memory_format=fmt)
        (y.float() * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum().backward()
        outs[way] = (y, xi.grad, conv.weight.grad.clone(), None if conv.bias is None else conv.bias.grad.clone())
    (y, gx, gw, gb), (ry, rgx, rgw, rgb) = outs["small-map"], outs["pytorch"]
    assert y.shape == ry.shape and y.dtype == ry.dtype == (torch.bfloat16 if bf16 else torch.float32)
    tol = dict(rtol=2e-2, atol=2e-2) if bf16 else dict(rtol=1e-4, atol=1e-5)
    for ours, theirs in ((y, ry), (gx, rgx), (gw, rgw), (gb, rgb)):
        if theirs is not None:
            torch.testing.assert_close(ours.float(), theirs.float(), **tol)
    assert list(conv.state_dict()) == list(nn.Conv2d(cin, cout, 3, bias=bias).state_dict())


def test_a_small_map_convolution_leaves_larger_maps_to_pytorch_exactly():
    """At 3x3 output pixels and more, and for a 1x1 kernel, it is PyTorch's convolution to the bit."""
    import torch.nn.functional as F

    from runner.ml.models import SmallMapConv2d

    torch.manual_seed(0)
    conv = SmallMapConv2d(16, 16, 3, padding=1, bias=False)
    x = torch.randn(2, 16, 3, 3).to(memory_format=torch.channels_last)
    assert torch.equal(conv(x), F.conv2d(x, conv.weight, padding=1))
    one = SmallMapConv2d(16, 8, 1, bias=False)
    x = torch.randn(2, 16, 2, 2)
    assert torch.equal(one(x), F.conv2d(x, one.weight))


def test_bf16_byol_steps_on_tiny_images_repeat_to_the_bit():
    """run.precision: bf16 on the CPU: three BYOL steps from the same seed on 16 px images give the same
    weights to the bit, run after run. oneDNN's bf16 kernels for the last stages' 1x1 and 2x2 maps did
    not (seen in 4 identical runs of this step before SmallMapConv2d took those maps over)."""
    from runner.ml.augment import preset_for
    from runner.ml.config import PretrainSpec, RunSpec, TrainSettings
    from runner.ml.pretrain import make_method, pretrain_step
    from runner.ml.train import Context

    def weights_after_three_steps() -> torch.Tensor:
        torch.manual_seed(0)
        ctx = Context(torch.device("cpu"), RunSpec(device="cpu", precision="bf16"), None, 0, lambda *a, **k: None)
        settings = TrainSettings(pretrain=PretrainSpec(proj_hidden=256, proj_dim=64, pred_hidden=256))
        method = make_method("byol", Backbone("resnet18", 3), settings, 32, ctx)
        x = torch.randint(0, 256, (32, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
        aug1, aug2 = preset_for("auto", 3, "pretrain")
        g = torch.Generator().manual_seed(2)
        views = (ctx.view(x, aug1, 16, g), ctx.view(x, aug2, 16, g))
        for step in range(3):
            pretrain_step(method, method.model, ctx, views, 0.1, step + 1, 100)
        return torch.cat([p.detach().flatten() for p in method.model.parameters()])

    first = weights_after_three_steps()
    for _ in range(3):
        assert torch.equal(weights_after_three_steps(), first)


def test_heads_have_the_papers_shape():
    head = MLPHead(2048, 4096, 256)
    kinds = [type(m) for m in head.net]
    assert kinds == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    assert (head.net[0].in_features, head.net[0].out_features, head.net[3].out_features) == (2048, 4096, 256)
    model = BYOL(Backbone("resnet50", 3))
    assert model.online_projector.net[0].in_features == 2048
    assert (model.predictor.net[0].in_features, model.predictor.net[0].out_features, model.predictor.net[3].out_features) == (256, 4096, 256)


def test_one_channel_stem_sums_the_rgb_weights():
    torch.manual_seed(0)
    rgb = Backbone("resnet18", 3)
    torch.manual_seed(0)
    gray = Backbone("resnet18", 1)
    assert gray.net.conv1.weight.shape[1] == 1
    assert torch.allclose(gray.net.conv1.weight, rgb.net.conv1.weight.sum(1, keepdim=True))
    x = torch.rand(2, 1, 32, 32)
    rgb.eval(), gray.eval()
    assert torch.allclose(gray(x), rgb(x.repeat(1, 3, 1, 1)), atol=1e-4)  # gray input: same as repeating it


def test_loss_is_2_minus_2_cos_and_symmetric():
    p, z = torch.randn(8, 16), torch.randn(8, 16)
    cos = torch.nn.functional.cosine_similarity(p, z).mean()
    assert torch.isclose(byol_loss(p, z), 2 - 2 * cos)
    assert torch.isclose(byol_loss(p, p), torch.tensor(0.0), atol=1e-6)
    assert torch.isclose(byol_loss(p, -p), torch.tensor(4.0))
    model = small_byol().eval()
    v1, v2 = torch.rand(4, 1, 32, 32), torch.rand(4, 1, 32, 32)
    a, _ = model(v1, v2)
    b, _ = model(v2, v1)
    assert torch.isclose(a, b, atol=1e-5)  # swapping the views changes nothing: both directions summed


def test_target_gets_no_gradient_and_follows_the_online_net_by_ema():
    torch.manual_seed(0)
    model = small_byol()
    loss, _ = model(torch.rand(4, 1, 32, 32), torch.rand(4, 1, 32, 32))
    loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in model.target_parameters())
    assert all(p.grad is not None for p in model.online_encoder.parameters())
    with torch.no_grad():
        for p in model.online_parameters():
            p.add_(1.0)
    before = [p.clone() for p in model.target_parameters()]
    online = [p.clone() for p in model.online_parameters()]
    model.update_target(0.9)
    for t0, o, t1 in zip(before, online, model.target_parameters()):
        assert torch.allclose(t1, 0.9 * t0 + 0.1 * o, atol=1e-6)


def test_tau_goes_from_base_to_one_on_a_cosine():
    assert tau_at(0, 1000, 0.996) == pytest.approx(0.996)
    assert tau_at(1000, 1000, 0.996) == pytest.approx(1.0)
    assert tau_at(500, 1000, 0.996) == pytest.approx(1 - 0.004 * 0.5)
    taus = [tau_at(k, 100, 0.99) for k in range(101)]
    assert all(a <= b for a, b in zip(taus, taus[1:]))


def test_excluded_parameter_groups_are_exactly_biases_and_norms():
    model = small_byol()
    regular, excluded = split_decay_groups(model.trainable_modules())
    names = {id(p): n for n, p in model.named_parameters()}
    excluded_names = {names[id(p)] for p in excluded}
    expected = {n for n, p in model.named_parameters() if p.requires_grad and (n.endswith(".bias") or ".bn" in n
                or "downsample.1" in n or ".net.1." in n)}
    assert excluded_names == expected
    assert all(p.ndim >= 2 for p in regular)
    opt = lars_for(model.trainable_modules(), lr=0.1, weight_decay=1e-6)
    assert [g["exclude"] for g in opt.param_groups] == [False, True]
    assert opt.param_groups[1]["weight_decay"] == 0.0


def test_lars_scales_the_step_by_the_trust_ratio_and_skips_excluded():
    w = nn.Parameter(torch.full((4, 4), 2.0))  # ||w|| = 8
    b = nn.Parameter(torch.ones(4))
    opt = LARS([{"params": [w]}, {"params": [b], "exclude": True, "weight_decay": 0.0}], lr=1.0, momentum=0.0, weight_decay=0.0, eta=0.001)
    w.grad = torch.full((4, 4), 0.5)  # ||g|| = 2 -> trust 0.001 * 8 / 2 = 0.004
    b.grad = torch.full((4,), 0.5)
    opt.step()
    assert torch.allclose(w, torch.full((4, 4), 2.0 - 0.5 * 0.004))
    assert torch.allclose(b, torch.full((4,), 0.5))  # plain SGD step


def test_learning_rate_scales_warms_up_and_decays():
    assert scaled_lr(0.2, 512) == pytest.approx(0.4)
    lrs = [warmup_cosine(s, 100, 10, 1.0) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:])) and lrs[-1] < 0.01


def test_projection_std_tells_collapse_from_spread():
    spread = torch.randn(512, 64)
    assert projection_std(spread) == pytest.approx(1 / math.sqrt(64), rel=0.1)
    collapsed = torch.ones(512, 64) + 1e-4 * torch.randn(512, 64)
    assert projection_std(collapsed) < 0.01


def test_every_sample_of_a_batch_gets_its_own_crop_and_colour():
    g = torch.Generator().manual_seed(0)
    one = (torch.rand(1, 3, 64, 64) * 255).to(torch.uint8)
    batch = one.repeat(16, 1, 1, 1)  # sixteen copies of ONE image
    theta = affine_params(PRESETS["byol"][0], 16, g, torch.device("cpu"))
    assert len({tuple(t.flatten().round(decimals=4).tolist()) for t in theta}) == 16
    aug = PRESETS["byol"][0]
    no_geometry = aug.__class__(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), hflip=0.0, jitter_p=1.0, grayscale_p=0.0, blur_p=0.0)
    out = augment(batch, no_geometry, 64, g)
    means = out.mean(dim=(2, 3))  # per sample, per channel: colour differs with the same geometry
    assert len({tuple(m.round(decimals=3).tolist()) for m in means}) == 16
    out = augment(batch, aug, 32, g)
    assert out.shape == (16, 3, 32, 32)
    flat = out.flatten(1)
    assert (torch.cdist(flat, flat) + torch.eye(16) * 1e9).min() > 1e-3  # no two views alike


def test_presets_are_asymmetric_and_gray_presets_leave_hue_alone():
    v1, v2 = PRESETS["byol"]
    assert (v1.blur_p, v2.blur_p, v1.solarize_p, v2.solarize_p) == (1.0, 0.1, 0.0, 0.2)
    for name in ("xray", "ct"):
        a, b = PRESETS[name]
        assert a.hue == b.hue == a.saturation == b.saturation == 0.0 and a.gamma > 0
        assert (a.blur_p, b.blur_p, a.solarize_p, b.solarize_p) == (1.0, 0.1, 0.0, 0.2)
    assert preset_for("auto", 1, "pretrain") == PRESETS["xray"]
    assert preset_for("auto", 3, "pretrain") == PRESETS["byol"]
    g = torch.Generator().manual_seed(1)
    gray = (torch.rand(8, 1, 40, 40) * 255).to(torch.uint8)
    assert augment(gray, PRESETS["xray"][1], 32, g).shape == (8, 1, 32, 32)
    with pytest.raises(ValueError, match="unknown augmentation preset"):
        preset_for("sepia", 3, "pretrain")


def test_eval_view_is_deterministic_and_normalized():
    x = (torch.rand(4, 1, 48, 48) * 255).to(torch.uint8)
    a, b = eval_view(x, 32), eval_view(x, 32)
    assert torch.equal(a, b) and a.shape == (4, 1, 32, 32)
    assert abs(float(a.mean())) < 1.5


def test_metrics_on_hand_made_predictions():
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    p1 = np.array([0.1, 0.2, 0.3, 0.6, 0.4, 0.7, 0.8, 0.9])
    probs = np.stack([1 - p1, p1], 1)
    m = classification_metrics(probs, labels, positive=1)
    # predicted positive: 0.6 (neg), 0.7, 0.8, 0.9 -> TP 3, FN 1 (0.4), TN 3, FP 1
    assert m["accuracy"] == 0.75 and m["sensitivity"] == 0.75 and m["specificity"] == 0.75
    assert m["confusion_matrix"] == [[3, 1], [1, 3]]
    # AUROC: of 16 (pos, neg) pairs, 15 ranked right (0.4 < 0.6 is the one wrong pair)
    assert m["auroc"] == pytest.approx(15 / 16)
    assert m["loss"] == pytest.approx(-np.mean(np.log([0.9, 0.8, 0.7, 0.4, 0.4, 0.7, 0.8, 0.9])))
    assert m["balanced_accuracy"] == 0.75
    assert prior_loss(np.array([0, 1, 1, 1]), labels, 2) == pytest.approx(-(4 * np.log(0.25) + 4 * np.log(0.75)) / 8)
    three = classification_metrics(np.eye(3)[[0, 1, 2, 2]] * 0.9 + 0.1 / 3, np.array([0, 1, 2, 1]))
    assert three["auroc"] is not None and "sensitivity" not in three and three["accuracy"] == 0.75


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
@pytest.mark.filterwarnings("ignore:A single label was found")  # scikit-learn's own, on a one-class draw
@settings(max_examples=60, deadline=None)
@given(st.integers(2, 4), st.integers(0, 2**31 - 1), st.integers(3, 40), st.booleans())
def test_metrics_equal_sklearns_on_random_predictions(k, seed, n, ties):
    """The numpy metrics against scikit-learn's (the reference), ties in the scores included."""
    from sklearn.metrics import balanced_accuracy_score, confusion_matrix, roc_auc_score

    rng = np.random.default_rng(seed)
    labels = rng.integers(0, k, n)
    logits = rng.normal(size=(n, k))
    if ties:
        logits = np.round(logits)
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    m = classification_metrics(probs, labels, positive=1 if k == 2 else None)
    pred = probs.argmax(1)
    assert m["confusion_matrix"] == confusion_matrix(labels, pred, labels=list(range(k))).tolist()
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(labels, pred))
    present = np.unique(labels)
    if len(present) < 2:
        assert m["auroc"] is None
    elif k == 2:
        assert m["auroc"] == pytest.approx(roc_auc_score(labels == 1, probs[:, 1]))
    else:
        ref = np.mean([roc_auc_score(labels == c, probs[:, c]) for c in present])
        assert m["auroc"] == pytest.approx(ref)
        if len(present) == k:
            assert m["auroc"] == pytest.approx(roc_auc_score(labels, probs, multi_class="ovr"))


def test_checkpoints_are_atomic_and_load_without_pickle(tmp_path):
    path = tmp_path / "c.pt"
    atomic_save({"w": torch.ones(3), "step": 7}, path)
    assert safe_load(path)["step"] == 7
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(Exception, match="Weights only load failed|Unsupported global"):
        safe_load(tmp_path / "evil.pt")


def test_temperature_scaling_calms_an_overconfident_model_without_changing_its_predictions():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 400)
    right = rng.random(400) < 0.8  # 80% right, always 99% sure
    pred = np.where(right, labels, 1 - labels)
    probs = np.where(np.eye(2)[pred] == 1, 0.99, 0.01)
    t = fit_temperature(probs, labels)
    calm = apply_temperature(probs, t)
    assert t > 2
    assert (calm.argmax(1) == probs.argmax(1)).all()
    nll = lambda p: -np.log(p[np.arange(400), labels]).mean()  # noqa: E731
    assert nll(calm) < nll(probs) - 0.3
    # the best single confidence for 80% accuracy is 0.8
    assert calm.max(1).mean() == pytest.approx(0.8, abs=0.02)


def test_the_second_view_blurs_exactly_its_share_of_the_batch():
    g = torch.Generator().manual_seed(3)
    x = (torch.rand(40, 1, 48, 48) * 255).to(torch.uint8)
    plain = PRESETS["xray"][1].__class__(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), hflip=0.0, jitter_p=0.0,
                                         brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0, gamma=0.0, grayscale_p=0.0,
                                         blur_p=0.0, blur_sigma=(5.0, 8.0))  # 1-1.7 px at 48 px
    from dataclasses import replace

    a = augment(x, plain, 48, g)
    b = augment(x, replace(plain, blur_p=0.1), 48, g)
    changed = ((a - b).abs().flatten(1).max(1).values > 1e-4).sum()
    assert int(changed) == 4
    c = augment(x, replace(plain, blur_p=1.0), 48, g)
    assert int(((a - c).abs().flatten(1).max(1).values > 1e-4).sum()) == 40


def test_compiled_augmentation_makes_the_same_views_as_eager():
    """run.compile also compiles the augmentation's pixel work; the random draws stay eager, so the
    compiled views equal the eager ones up to float rounding (inductor fuses the passes)."""
    from runner.ml import augment as A

    images = torch.randint(0, 256, (8, 3, 40, 40), dtype=torch.uint8)
    # view 2: every colour op, blur on a random subset, solarize; the views written channels_last, as
    # the networks read them (under compilation the colour matrices and the blur are pointwise sums)
    view = A.PRESETS["byol"][1]
    eager = A.augment(images, view, 32, torch.Generator().manual_seed(3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fallback to eager would warn: it must not happen here
        compiled = A.augment(images, view, 32, torch.Generator().manual_seed(3), compiled=True, channels_last=True)
    assert compiled.shape == eager.shape == (8, 3, 32, 32)
    assert compiled.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(compiled, eager, atol=1e-4), (compiled - eager).abs().max()
    # the blur alone, every sample with its own sigma, reflected borders: shifted sums == convolution
    x, sigma = torch.rand(4, 3, 20, 20), torch.tensor([0.3, 0.8, 1.5, 2.0])
    eager = A.gaussian_blur(x, sigma, 2.0)
    compiled = torch.compile(A.gaussian_blur, dynamic=False)(x, sigma, 2.0)
    assert torch.allclose(compiled, eager, atol=1e-5) and not torch.allclose(eager, x, atol=1e-2)


class _HostReads(torch.overrides.TorchFunctionMode):
    """Records every call that makes the host wait for the device on CUDA: a value read back (item,
    float, bool, cpu, ...), a tensor made from host values (a blocking copy), a linalg call that
    checks for errors, a boolean-mask index or nonzero (its size lives on the device)."""

    WAITS = {"item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy", "nonzero", "argwhere",
             "tensor", "as_tensor", "new_tensor", "linalg_inv", "inv", "linalg_solve", "masked_select", "unique"}

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", str(func))
        if name in self.WAITS or (name == "__getitem__" and any(
                isinstance(a, torch.Tensor) and a.dtype == torch.bool for a in args[1:] if not isinstance(a, tuple))):
            self.calls.append(name)
        return func(*args, **(kwargs or {}))


def test_a_pretraining_step_never_waits_for_the_device():
    """The host must queue step k+1 while the device runs step k: one read-back or blocking copy per
    step (a constant made from a list, a linalg error check) idles a GPU for the host's launch time.
    The data path (batch indices, gather, both views) and the step (forward, backward, LARS, EMA) are
    run under a recorder of every call that would wait on CUDA."""
    from runner.ml.config import PretrainSpec, RunSpec, SimSiamSpec, TrainSettings
    from runner.ml.pretrain import make_method, pretrain_step
    from runner.ml.train import Context, IndexStream, take

    probe = _HostReads()
    with probe:
        float(torch.ones(2).sum())
        torch.ones(2).new_tensor([1.0])
    assert probe.calls == ["__float__", "new_tensor"]  # the recorder does see waits

    dev = torch.device("cpu")
    ctx = Context(device=dev, run=RunSpec(), task_dir=None, seed=0, emit=lambda *a, **k: None)
    images = torch.randint(0, 256, (24, 3, 40, 40), dtype=torch.uint8)
    stream, g = IndexStream(24, 8, 0, dev), torch.Generator().manual_seed(0)
    settings = TrainSettings(pretrain=PretrainSpec(proj_hidden=64, proj_dim=16, pred_hidden=64),
                             simsiam=SimSiamSpec(proj_dim=32, pred_hidden=8))
    aug1, aug2 = PRESETS["byol"]
    for name in ("byol", "simsiam"):  # every pretraining method's step, with its post-step update
        method = make_method(name, Backbone("resnet18", 3), settings, 8, ctx)
        for k in range(3):  # the first step makes the cached constants and the optimizer state
            recorder = _HostReads() if k else None
            with recorder or warnings.catch_warnings():
                x = take(images, stream.batch_at(k), dev)
                views = (ctx.view(x, aug1, 32, g), ctx.view(x, aug2, 32, g))
                loss, z1, _ = pretrain_step(method, method.model, ctx, views, 0.1, k, 100)
            if recorder:
                assert recorder.calls == [], (name, recorder.calls)
    assert views[0].is_contiguous(memory_format=torch.channels_last) and torch.isfinite(loss)


def test_background_checkpoints_are_snapshots_written_in_order(tmp_path):
    """Training goes on while a checkpoint is written: what lands on disk is the state at save(),
    not a mix with later in-place updates; the last save wins; a failed write is raised."""
    from runner.ml.checkpoint import CheckpointWriter, host_copy

    w = torch.zeros(1 << 20)
    state = {"model": {"w": w}, "opt": [{"m": w * 0}], "step": 1}
    snap = host_copy(state)
    assert snap["model"]["w"].data_ptr() != w.data_ptr() and snap["step"] == 1 and isinstance(snap["opt"], list)
    path = tmp_path / "checkpoint.pt"
    with CheckpointWriter() as ckpt:
        ckpt.save({"w": w, "step": 1}, path)
        w.add_(1)  # the next optimizer step, at once
        ckpt.save({"w": w, "step": 2}, path)
        w.add_(1)
    got = safe_load(path)
    assert got["step"] == 2 and torch.equal(got["w"], torch.ones(1 << 20))
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]  # no temporary file left
    with pytest.raises(FileNotFoundError):
        with CheckpointWriter() as ckpt:
            ckpt.save({"w": w}, tmp_path / "no-such-dir" / "checkpoint.pt")


def test_sigterm_during_a_checkpoint_write_leaves_no_partial_file_and_stays_sigterm(tmp_path, monkeypatch):
    """SIGTERM (SystemExit(143) in the worker) can land anywhere: mid-write of a checkpoint (the temp file
    is removed, the previous checkpoint stays), or between making the writer thread and starting it (the
    exit stays 143; it was `RuntimeError: cannot join thread before it is started`, exit 1)."""
    import threading

    from runner.ml.checkpoint import CheckpointWriter

    path = tmp_path / "checkpoint.pt"
    atomic_save({"step": 1}, path)

    def torn_save(obj, f):  # noqa: ANN001
        f.write(b"half a checkpoint")
        raise SystemExit(143)

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(SystemExit):
        atomic_save({"step": 2}, path)
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"] and safe_load(path) == {"step": 1}

    def signalled_start(self):  # noqa: ANN001
        raise SystemExit(143)

    monkeypatch.setattr(threading.Thread, "start", signalled_start)
    with pytest.raises(SystemExit) as e:
        with CheckpointWriter() as ckpt:
            ckpt.save({"step": torch.tensor(3)}, path)
    assert e.value.code == 143
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


def test_a_control_backbone_is_built_again_to_the_bit_from_its_initialisation_or_refused(tmp_path):
    """A random-init control's model.pt keeps the generator state its network came from (a few KB), not
    the network (43 MB for resnet18): built again it is the same to the bit; a recipe that builds
    another network (a changed generator state, as another PyTorch's initialisation would be) is
    refused with the command that retrains it, never scored."""
    from runner.ml.saved import ModelFileError, rebuild_recipe, rebuilt_backbone, state_digest

    torch.manual_seed(7)
    torch.rand(3)  # the worker's generator is somewhere in its sequence when the control is built
    state = torch.get_rng_state()
    net = Backbone("resnet18", 1)
    recipe = rebuild_recipe(state, None, None, net.state_dict())
    atomic_save({"rebuild": recipe}, tmp_path / "m.pt")
    saved = {"kind": "random-linear", "task": "0123456789abcdef", "arch": "resnet18", "in_channels": 1,
             "rebuild": safe_load(tmp_path / "m.pt", "cpu")["rebuild"]}
    torch.manual_seed(123)  # the caller's generator: neither used nor moved by building it again
    before = torch.get_rng_state()
    again = rebuilt_backbone(saved)
    assert torch.equal(torch.get_rng_state(), before)
    assert state_digest(again.state_dict()) == state_digest(net.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), net.state_dict().values()))
    assert (tmp_path / "m.pt").stat().st_size < 100_000
    other = dict(saved, rebuild=dict(saved["rebuild"], rng_state=torch.manual_seed(8).get_state()))
    with pytest.raises(ModelFileError, match=r"not the network the task scored: rerun the task .*--retry 01234567"):
        rebuilt_backbone(other)


def test_weights_kept_in_bf16_read_back_to_the_bit_and_refuse_what_is_not_rounded():
    """run.weights: bf16 keeps each float tensor's rounded value exactly (any shape, a 0-d one too);
    other tensors as they are; a network not rounded first is refused (its file would hold another
    network than the one scored); a codec this version does not know is named."""
    import io

    from runner.ml.weights import pack, round_, unpack

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.Linear(5, 2))
    net[1].running_var.mul_(1e-30)  # values near bf16's smallest: still exact after rounding
    with pytest.raises(ValueError, match="not rounded to bf16"):
        pack(net.state_dict(), "bf16")
    round_(net, "bf16")
    state = {**net.state_dict(), "scalar": torch.tensor(-2.5)}
    buf = io.BytesIO()
    torch.save(pack(state, "bf16"), buf)
    buf.seek(0)
    back = unpack(torch.load(buf, weights_only=True))
    assert list(back) == list(state)
    for k, t in state.items():
        assert back[k].dtype == t.dtype and back[k].shape == t.shape and torch.equal(back[k], t), k
    assert back["1.num_batches_tracked"].dtype == torch.int64
    assert pack(state, "fp32") is state and unpack(state) is state  # fp32 files: the state dict as it is
    with pytest.raises(ValueError, match="stored as 'zstd-9'"):
        unpack({"codec": "zstd-9", "tensors": {}})
