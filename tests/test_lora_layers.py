"""LoRA layers on their own (each equals its layer with the merged weight), and adapted networks
rebuilt and loaded strictly by the predictor's route."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from networks import plans_manager
from nnunet_fseft.tuners import Site, adapt
from nnunet_fseft.tuners.lora import LoRAConv2d, LoRAConv3d, LoRAConvTranspose2d, LoRAConvTranspose3d, METHOD
from test_lora import trainer_lora

# ----------------------------------------------------------------------------------------------
# 5. The predictor's path: build_network_architecture on the class rebuilds the same keys
# ----------------------------------------------------------------------------------------------

def _managers(arch):
    pm = plans_manager(arch)
    return pm, pm.get_configuration("3d_fullres")


ARCHS = pytest.mark.parametrize("arch", ["plain", "resenc"])


@ARCHS
def test_build_network_architecture_rebuilds_a_strictly_loadable_network(arch, tmp_path):
    cls = trainer_lora()
    pm, cm = _managers(arch)
    torch.manual_seed(0)
    trained = cls.build_network_architecture(pm, cm, 1, 3, enable_deep_supervision=False)
    assert any("fseft_lora_B" in k for k in trained.state_dict())
    with torch.no_grad():  # stands in for training: every tensor moves, B becomes nonzero
        for p in trained.parameters():
            p.add_(0.05 * torch.randn_like(p))
    torch.save(trained.state_dict(), tmp_path / "checkpoint.pth")

    torch.manual_seed(123)
    rebuilt = cls.build_network_architecture(pm, cm, 1, 3, enable_deep_supervision=False)
    assert type(rebuilt) is type(trained)
    x = torch.randn(1, 1, 16, 16, 16)
    trained.eval()
    rebuilt.eval()
    with torch.no_grad():
        assert not torch.allclose(rebuilt(x), trained(x), atol=1e-4)

    result = rebuilt.load_state_dict(torch.load(tmp_path / "checkpoint.pth", weights_only=True), strict=True)
    assert list(result.missing_keys) == [] and list(result.unexpected_keys) == []
    with torch.no_grad():
        out = rebuilt(x)
        assert isinstance(out, torch.Tensor)  # deep supervision off, as the predictor asks
        torch.testing.assert_close(out, trained(x), atol=1e-5, rtol=0)
    assert ({n for n, p in rebuilt.named_parameters() if p.requires_grad}
            == {n for n, p in trained.named_parameters() if p.requires_grad})


@ARCHS
def test_foundation_state_dict_loads_into_adapted_network(arch):
    """Adapters keep the foundation's keys: only adapter tensors are missing, nothing is unexpected."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    cls = trainer_lora()
    pm, cm = _managers(arch)
    torch.manual_seed(0)
    foundation = nnUNetTrainer.build_network_architecture(pm, cm, 1, 3, enable_deep_supervision=False)
    torch.manual_seed(1)
    adapted = cls.build_network_architecture(pm, cm, 1, 3, enable_deep_supervision=False)
    result = adapted.load_state_dict(foundation.state_dict(), strict=False)
    assert list(result.unexpected_keys) == []
    adapter_keys = {k for k in adapted.state_dict() if "fseft_" in k}
    assert adapter_keys and set(result.missing_keys) == adapter_keys
    x = torch.randn(1, 1, 16, 16, 16)
    foundation.eval()
    adapted.eval()
    with torch.no_grad():
        torch.testing.assert_close(adapted(x), foundation(x), atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------------------
# 6. The weight-space form, checked against functional convolutions
# ----------------------------------------------------------------------------------------------

DIMS = pytest.mark.parametrize("dim", [3, 2])


def _adapt_single(module, rank, alpha):
    m = module
    adapt(METHOD, Site(m, None, None), rank=rank, alpha=alpha)
    with torch.no_grad():
        m.fseft_lora_B.normal_()
    return m


LAYERS = {(False, 3): (nn.Conv3d, F.conv3d, LoRAConv3d), (False, 2): (nn.Conv2d, F.conv2d, LoRAConv2d),
          (True, 3): (nn.ConvTranspose3d, F.conv_transpose3d, LoRAConvTranspose3d),
          (True, 2): (nn.ConvTranspose2d, F.conv_transpose2d, LoRAConvTranspose2d)}


@DIMS
@pytest.mark.parametrize("transposed", [False, True], ids=["conv", "transposed"])
def test_lora_layer_equals_its_layer_with_merged_weight(dim, transposed):
    torch.manual_seed(0)
    conv_cls, fn, lora_cls = LAYERS[transposed, dim]
    rank, alpha = 2, 6.0
    channels, size = ((5, 3), 6) if transposed else ((3, 5), 10)
    m = _adapt_single(conv_cls(*channels, kernel_size=3, stride=2, padding=1, bias=True), rank, alpha)
    assert type(m) is lora_cls
    A, B, W = m.fseft_lora_A, m.fseft_lora_B, m.weight
    # conv weights are (out, in, k...), transposed ones (in, out, k...): B spans the first dim, A the rest
    assert A.shape == (rank, 3 * 3 ** dim) and B.shape == (5, rank)
    x = torch.randn((1, channels[0]) + (size,) * dim)
    with torch.no_grad():
        merged = W + (alpha / rank) * (B @ A).view_as(W)
        expected = fn(x, merged, m.bias, stride=2, padding=1)
        got = m(x)
        plain = fn(x, W, m.bias, stride=2, padding=1)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert (got - plain).abs().max() > 1e-2  # B really contributes
    if transposed:
        assert got.shape[2:] == (11,) * dim
        # output_size selects the output padding, as for nn.ConvTranspose
        with torch.no_grad():
            got_sized = m(x, output_size=[12] * dim)
            expected_sized = fn(x, merged, m.bias, stride=2, padding=1, output_padding=1)
        assert got_sized.shape[2:] == (12,) * dim
        torch.testing.assert_close(got_sized, expected_sized, atol=1e-5, rtol=0)
