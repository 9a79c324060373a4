"""What accelerate replaces, it honours (issue 22): the LSTM's Linears read as their forward sees
them (prune, old-style weight_norm), the pooling and activation it computes checked (a replaced one
refused, naming it), a module swapped after accelerate planned again, hooks on the modules it
bypasses still firing, and a torch.compile wrapper refused with what to do."""

import pytest
import torch
import torch.nn.utils.prune
from torch import nn

import dia_fused
import official_dianet as official
from dia_fused.accelerate import fused_stages
from dia_fused.testing import randomise_norms

pytorchcv = pytest.importorskip("pytorchcv", reason="pip install --no-deps pytorchcv==0.0.74")


@pytest.fixture(autouse=True)
def cuda_calls_harmless(monkeypatch):
    """The official Attention stages call `.cuda()` on their zero state (a no-op on the CPU)."""
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *args, **kwargs: self)


def official_resnet():
    torch.manual_seed(0)
    return randomise_norms(official.ResNet(11, 10, "Bottleneck", pool=2))


def pytorchcv_resnet():
    from pytorchcv.models.diaresnet_cifar import diaresnet20_cifar10

    torch.manual_seed(0)
    model = diaresnet20_cifar10()
    model.features.final_pool = nn.AdaptiveAvgPool2d(1)
    return randomise_norms(model)


SOURCES = {
    "official": (official_resnet, lambda m: m.layer2.lstm.w_ih[0].seq[0]),
    "pytorchcv": (
        pytorchcv_resnet,
        lambda m: m.features.stage2.unit1.attention.lstm.x_amps.amp1.fc1,
    ),
}


def _prune(linear):
    torch.nn.utils.prune.l1_unstructured(linear, "weight", amount=0.5)


def _weight_norm(linear):
    with pytest.warns(FutureWarning):
        torch.nn.utils.weight_norm(linear)


@pytest.mark.parametrize("transform", [_prune, _weight_norm], ids=["prune", "weight_norm"])
@pytest.mark.parametrize("source", list(SOURCES))
def test_lstm_weights_read_through_forward_pre_hooks(source, transform):
    """Two SGD steps, source and accelerated: equal outputs at each (the weight a pre-hook
    computes changes with its parameters; the old code kept the first and failed or drifted)."""
    make, linear_of = SOURCES[source]
    models = []
    for _ in range(2):
        model = make().train()
        transform(linear_of(model))
        models.append(model)
    source_model, model = models
    dia_fused.accelerate(model, backend="reference")
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.5) for m in models]
    x = torch.randn(2, 3, 8, 8)
    for _ in range(2):
        outs = []
        for m, opt in zip(models, optimizers):
            torch.manual_seed(3)
            out = m(x)
            opt.zero_grad()
            out.square().mean().backward()
            opt.step()
            outs.append(out.detach())
        torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-5)
    assert fused_stages(model)


def test_replaced_activation_and_pooling_are_refused_naming_the_module():
    for attr, module, name in (
        ("relu", nn.Identity(), r"model.layer1.relu: expected nn.ReLU"),
        ("GlobalAvg", nn.AdaptiveMaxPool2d(1), r"model.layer1.GlobalAvg: expected nn.Adaptive"),
    ):
        model = official_resnet()
        setattr(model.layer1, attr, module)
        with pytest.raises(ValueError, match=name):
            dia_fused.accelerate(model)
        assert fused_stages(model) == []
    model = pytorchcv_resnet()
    model.features.stage3.unit2.activ = nn.Identity()
    with pytest.raises(ValueError, match=r"model.features.stage3.unit2.activ: expected nn.ReLU"):
        dia_fused.accelerate(model)
    model = pytorchcv_resnet()
    model.features.stage1.unit1.attention.pool = nn.AdaptiveMaxPool2d(1)
    with pytest.raises(ValueError, match=r"stage1.unit1.attention.pool: expected nn.AdaptiveAvg"):
        dia_fused.accelerate(model)
    # replaced after accelerate: the next forward plans again and refuses it
    model = dia_fused.accelerate(official_resnet())
    model.layer3.relu = nn.Identity()
    with pytest.raises(ValueError, match=r"model.layer3.relu: expected nn.ReLU"):
        model(torch.randn(2, 3, 8, 8))


def test_lstm_swapped_after_accelerate_is_planned_again():
    from pytorchcv.models.diaresnet import DIAAttention

    x = torch.randn(2, 3, 8, 8)
    source, model = pytorchcv_resnet().eval(), pytorchcv_resnet().eval()
    dia_fused.accelerate(model, backend="reference")
    for m in (source, model):
        torch.manual_seed(5)
        two_cells = DIAAttention(16, 16, num_layers=2).eval()  # one per stage, shared
        for unit in m.features.stage1.children():
            unit.attention = two_cells
    with torch.no_grad():
        torch.testing.assert_close(model(x), source(x), rtol=1e-5, atol=1e-5)
    source, model = official_resnet().eval(), official_resnet().eval()
    dia_fused.accelerate(model, backend="reference")
    for m in (source, model):
        torch.manual_seed(6)
        m.layer2.lstm, m.layer2.nlayers = official.LSTMCell(128, 128, 2).eval(), 2
    with torch.no_grad():
        torch.testing.assert_close(model(x), source(x), rtol=1e-5, atol=1e-5)


def test_forward_hooks_on_bypassed_modules_fire_as_without_accelerate():
    x = torch.randn(2, 3, 8, 8)
    for make, hooked in (
        (official_resnet, lambda m: (m.layer1.lstm, m.layer2.GlobalAvg)),
        (pytorchcv_resnet, lambda m: (m.features.stage1.unit1.attention.lstm,)),
    ):
        counts = []
        outs = []
        for accelerated in (False, True):
            model = make().eval()
            if accelerated:
                dia_fused.accelerate(model, backend="reference")
            seen = []
            for module in hooked(model):
                module.register_forward_hook(lambda m, i, o: seen.append(type(m).__name__))
            with torch.no_grad():
                outs.append(model(x))
            counts.append(seen)
        assert counts[1] == counts[0] and len(counts[0]) > 0
        torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)


def test_a_torch_compile_wrapper_is_refused_with_what_to_do():
    with pytest.raises(
        TypeError,
        match=r"call accelerate on the model before torch.compile .*"
        r"or pass m._orig_mod",
    ):
        dia_fused.accelerate(torch.compile(official_resnet()))
