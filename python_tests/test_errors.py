"""Bad input gets a ValueError/TypeError naming the argument, with expected and actual."""

import os

import pytest
import torch

from dia_fused import DIALSTM, DIASE, BackendUnavailableError, dia_step, ops
from dia_fused.testing import random_step_inputs


@pytest.fixture
def unit():
    return DIALSTM(8, reduction=2)


@pytest.mark.parametrize(
    "x, exc, words",
    [
        (torch.randn(2, 8, 4), ValueError, ["x", "4-D", "3-D"]),
        (torch.randn(2, 6, 4, 4), ValueError, ["x", "8 channels", "(2, 6, 4, 4)"]),
        (torch.ones(2, 8, 4, 4, dtype=torch.int64), TypeError, ["x", "floating", "int64"]),
        ([1.0, 2.0], TypeError, ["x", "torch.Tensor", "list"]),
        (torch.randn(2, 8, 0, 4), ValueError, ["x", "H*W >= 1"]),
    ],
)
def test_bad_x(unit, x, exc, words):
    with pytest.raises(exc) as info:
        unit(x)
    for word in words:
        assert word in str(info.value)


def test_state_of_wrong_shape_dtype_device_or_batch(unit):
    x = torch.randn(2, 8, 3, 3)
    good = torch.zeros(1, 2, 8)
    with pytest.raises(
        ValueError,
        match=r"state h: expected shape \(num_cells, N, C\) = \(1, 2, 8\), got \(1, 3, 8\)",
    ):
        unit(x, (torch.zeros(1, 3, 8), good))  # state from another batch size
    with pytest.raises(
        TypeError, match=r"state c: expected dtype torch.float32 .* got torch.float64"
    ):
        unit(x, (good, good.double()))
    with pytest.raises(ValueError, match=r"state h: expected a 3-D tensor, got 2-D"):
        unit(x, (torch.zeros(2, 8), good))
    with pytest.raises(TypeError, match=r"state: expected a tuple \(h, c\) or None, got Tensor"):
        unit(x, good)
    with pytest.raises(ValueError, match=r"state h: expected device cpu .*, got meta"):
        unit(x, (torch.zeros(1, 2, 8, device="meta"), good))


def test_identity_mismatch_is_never_broadcast(unit):
    x = torch.randn(2, 8, 3, 3)
    with pytest.raises(
        ValueError, match=r"identity: expected the shape of x \(2, 8, 3, 3\), got \(1, 8, 3, 3\)"
    ):
        unit(x, identity=torch.randn(1, 8, 3, 3))
    with pytest.raises(
        TypeError, match=r"identity: expected the dtype of x \(torch.float32\), got torch.float16"
    ):
        unit(x, identity=torch.randn(2, 8, 3, 3).half())
    with pytest.raises(ValueError, match=r"identity: expected the shape of x"):
        DIASE(8, reduction=2)(x, identity=torch.randn(2, 8, 1, 1))


@pytest.mark.parametrize(
    "kwargs, exc, pattern",
    [
        ({"reduction": 9}, ValueError, r"reduction: expected a ratio <= channels \(8\), got 9"),
        ({"reduction": 0}, ValueError, r"reduction: expected an int >= 1, got 0"),
        ({"reduction": 2.5}, TypeError, r"reduction: expected an int, got float"),
        ({"num_cells": 0}, ValueError, r"num_cells: expected an int >= 1, got 0"),
        ({"dropout": 1.0}, ValueError, r"dropout: expected a probability in \[0, 1\), got 1.0"),
        (
            {"cell_activation": "gelu"},
            ValueError,
            r"cell_activation: expected one of \('sigmoid', 'tanh', 'relu'\), got 'gelu'",
        ),
        (
            {"backend": "cudnn"},
            ValueError,
            r"backend: expected one of \('auto', 'reference', 'triton', 'cuda'\), got 'cudnn'",
        ),
    ],
)
def test_bad_constructor_arguments(kwargs, exc, pattern):
    with pytest.raises(exc, match=pattern):
        DIALSTM(8, **kwargs)


def test_relu_flag_must_be_bool(unit):
    with pytest.raises(TypeError, match="relu: expected a bool or None, got str"):
        unit(torch.randn(1, 8, 2, 2), relu="yes")


def test_functional_step_checks_weights_and_masks():
    inputs = random_step_inputs(2, 8, 2, 2, reduction=2, num_cells=2, dropout_p=0.5)
    x, h, c, w = inputs.args()
    with pytest.raises(
        ValueError, match=r"weights: expected 8 \+ 4\*\(num_cells-1\) tensors, got 7"
    ):
        dia_step(x, h, c, w[:7])
    bad = list(w)
    bad[2] = torch.randn(32, 3)
    with pytest.raises(
        ValueError,
        match=r"weight w_ih.0.seq.2.weight: expected shape \(32, 4\) for C=8, got \(32, 3\)",
    ):
        dia_step(x, h, c, bad)
    with pytest.raises(
        ValueError, match=r"dropout_masks: expected shape \(1, 2, 8\), got \(1, 3, 8\)"
    ):
        dia_step(x, h, c, w, dropout_masks=torch.ones(1, 3, 8))
    with pytest.raises(ValueError, match=r"activation: expected one of"):
        dia_step(x, h, c, w, activation="swish")


def test_backend_asked_by_name_that_cannot_run_says_why(unit, monkeypatch):
    monkeypatch.delenv(ops.ENV_BACKEND, raising=False)
    with pytest.raises(BackendUnavailableError, match=r"backend='cuda' cannot run on cpu: .+"):
        DIALSTM(8, backend="cuda")(torch.randn(1, 8, 2, 2))


def test_environment_variable_sets_what_auto_means_and_an_explicit_name_wins(monkeypatch):
    monkeypatch.setenv(ops.ENV_BACKEND, "reference")
    assert DIALSTM(8).resolved_backend("cpu") == "reference"
    DIALSTM(8)(torch.randn(1, 8, 2, 2))
    with pytest.raises(BackendUnavailableError, match=r"backend='cuda' cannot run on cpu"):
        DIALSTM(8, backend="cuda")(torch.randn(1, 8, 2, 2))  # not overridden by the variable
    monkeypatch.setenv(ops.ENV_BACKEND, "bogus")
    with pytest.raises(
        ValueError, match=r"DIA_FUSED_BACKEND: expected one of \('auto', 'reference'"
    ):
        DIALSTM(8)(torch.randn(1, 8, 2, 2))
    assert DIALSTM(8, backend="reference").resolved_backend("cpu") == "reference"


def test_auto_never_picks_the_triton_interpreter_on_cpu(monkeypatch):
    monkeypatch.delenv(ops.ENV_BACKEND, raising=False)
    assert ops.resolve_backend("auto", "cpu") == "reference"


def test_settings_read_the_environment_as_os_environ_does(monkeypatch):
    """settings.raw reads os.environ's backing dict (see its docstring): the same answers as
    os.environ.get, unset and empty alike, a change seen at the next read, and a plain dict in
    place of os.environ (as some test harnesses install) read through get()."""
    from dia_fused import settings

    name = "DIA_FUSED_TEST_VARIABLE"
    monkeypatch.delenv(name, raising=False)
    assert settings.raw(name) is None
    for value, expected in (("block_n=32", "block_n=32"), ("", None), ("é,x", "é,x")):
        monkeypatch.setenv(name, value)
        assert settings.raw(name) == expected == (os.environ.get(name) or None)
    monkeypatch.delenv(name)
    assert settings.raw(name) is None
    monkeypatch.setattr(os, "environ", {name: "tile=256"})
    assert settings.raw(name) == "tile=256"
