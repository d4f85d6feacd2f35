"""The one injection loop's own rules (nnunet_fseft/tuners/__init__.py) and the conv geometry it reads."""
import pytest
from torch import nn

from nnunet_fseft.errors import InputError
from nnunet_fseft.network.anatomy import conv_geometry
from nnunet_fseft.tuners import Method
from nnunet_fseft.tuners.lora import LoRA


def test_a_method_whose_hyperparameter_has_a_default_is_a_programming_error():
    """The trainer class is the one place a hyper-parameter's value is written."""
    def with_default(site, *, rank: int, alpha: float = 8.0) -> dict:
        return {}

    with pytest.raises(TypeError, match=r"with_default gives alpha a default"):
        Method(lambda network, a: [], LoRA, with_default)


def test_a_methods_hyperparameters_are_the_keyword_only_arguments_of_its_additions():
    def additions(site, *, rank: int, alpha: float) -> dict:
        return {}

    assert Method(lambda network, a: [], LoRA, additions).hyperparameters == ("rank", "alpha")


def test_a_block_without_a_convolution_is_bad_input_not_a_crash():
    # `nnunet-fseft params` reports an InputError as "not applicable"; any other error is a traceback
    with pytest.raises(InputError, match=r"holds no convolution"):
        conv_geometry(nn.Sequential(nn.LeakyReLU()))
