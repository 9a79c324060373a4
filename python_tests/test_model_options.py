"""create_model's error for an option the model does not take names the option and the model (not
the internal builder it would have reached), with the closest option names."""

import pytest

from dia_fused.models import create_model


@pytest.mark.parametrize(
    "name, option, expected",
    [
        ("dia_resnet20", "bogus", r"create_model\('dia_resnet20'\): unknown option 'bogus' "),
        ("dia_resnet20", "reducton", "unknown option 'reducton'; did you mean 'reduction'"),
        ("dia_wrn16_4", "dropot", "did you mean 'dropout'"),
        ("dia_resnext50_32x4d", "bogus", r"create_model\('dia_resnext50_32x4d'\)"),
        ("dia_resnext29_8x32", "bogus", r"create_model\('dia_resnext29_8x32'\)"),
    ],
)
def test_unknown_option_names_the_option_and_the_model(name, option, expected):
    with pytest.raises(TypeError, match=expected) as err:
        create_model(name, **{option: 1})
    message = str(err.value)
    assert "cifar_" not in message and "imagenet_" not in message  # no internal builder
    assert "reduction" in message  # the options the model does take are listed
    assert "num_classes" not in message.split("options of")[1]  # create_model's own argument


def test_the_options_each_family_takes_still_build():
    create_model("dia_resnext29_8x32", num_classes=100, widen_factor=4, reduction=8)
    create_model("dia_resnext50_32x4d", num_classes=10)
    create_model("dia_wrn16_4", dropout=0.1)
    create_model("dia_resnet20", block="basic", backend="reference")
