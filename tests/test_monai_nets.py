"""MedNeXt and Swin-UNETR (MONAI's layers in nnU-Net's U-Net anatomy): built by nnU-Net from plans, deep
supervision at the plans' scales, where each method goes, what it trains, and that each starts as the foundation."""
import pytest
import torch

from nnunet_fseft.errors import InputError
from nnunet_fseft.network.anatomy import anatomy, cancelled_biases
from nnunet_fseft.network.parameters import count_parameters, parameter_groups
from nnunet_fseft.plans.presets import ARCHITECTURES, divisible_patch, preset
from nnunet_fseft.trainers import METHODS

pytestmark = pytest.mark.usefixtures("single_thread")


def build(arch, preset_name=None, channels=1, classes=3, dims=3, deep_supervision=True):
    """The network nnU-Net builds from the plans `nnunet-fseft plans --arch` writes."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    spec = ARCHITECTURES[arch]()
    kwargs = dict(spec["kwargs"], **(preset(preset_name).get(spec["preset_key"], {}) if preset_name else {}))
    strides = [[1] * dims] + [[2] * dims for _ in range(spec["levels"])]
    torch.manual_seed(0)
    return get_network_from_plans(spec["network"], dict(kwargs, strides=strides, n_stages=len(strides)), [],
                                  channels, classes, deep_supervision=deep_supervision)


TINY = {"mednext-s": (1, 32), "swin-unetr": (1, 64)}  # batch, patch side (Swin: 1/32 of it must be > 1 voxel)


def inputs(arch, channels=1):
    torch.manual_seed(1)
    batch, side = TINY[arch]
    return torch.randn(batch + 1, channels, side, side, side)


@pytest.mark.parametrize("arch", list(TINY))
def test_deep_supervision_outputs_are_at_the_scales_nnunet_derives_from_the_strides(arch):
    import numpy as np
    net = build(arch, "cpu_tiny", channels=4)
    x = inputs(arch, 4)
    strides = ARCHITECTURES[arch]()["levels"]
    scales = list(1 / np.cumprod(np.vstack([[1, 1, 1]] + [[2, 2, 2]] * strides), axis=0))[:-1]  # nnU-Net's rule
    out = net(x)
    assert [tuple(o.shape[2:]) for o in out] == [tuple(int(x.shape[2] * s) for s in sc) for sc in scales]
    net.decoder.deep_supervision = False  # what nnU-Net's set_deep_supervision_enabled sets
    with torch.no_grad():
        full = net.eval()(x)
    assert full.shape == (x.shape[0], 3, *x.shape[2:])
    # the full-resolution output is the same with and without deep supervision (no norm keeps running stats)
    assert torch.allclose(full, out[0].detach(), atol=1e-5)


def test_plans_with_other_strides_are_refused_in_one_sentence():
    from nnunet_fseft.network.nets.mednext import MedNeXtUNet
    with pytest.raises(InputError, match=r"strides .*`nnunet-fseft plans --arch mednext-s`"):
        MedNeXtUNet(1, 2, [[1, 1, 1], [2, 2, 2], [1, 2, 2], [2, 2, 2], [2, 2, 2]])


def test_patch_sizes_round_to_what_the_network_divides():
    assert divisible_patch([44, 60, 30], 4) == [48, 64, 32]  # MedNeXt: multiples of 16, at least 32
    assert divisible_patch([128, 112, 20], 5) == [128, 128, 64]  # Swin-UNETR: of 32, at least 64


def sites(net, method):
    before = {n for n, _ in net.named_parameters()}
    METHODS[method].adapt(net)
    return sorted({n.split(".fseft_")[0] for n, _ in net.named_parameters() if n not in before})


def test_the_conv_adapter_goes_after_each_of_mednexts_nine_stages_and_lora_on_its_encoder_convs():
    assert sites(build("mednext-s", "cpu_tiny"), "nnUNetTrainerFSEFT_ConvAdapter") == sorted(
        [f"encoder.stages.{i}" for i in range(5)] + [f"decoder.stages.{i}" for i in range(4)])
    lora = sites(build("mednext-s", "cpu_tiny"), "nnUNetTrainerFSEFT_LoRA")
    assert "encoder.stages.1.entry.conv1" in lora and "encoder.stages.1.entry.res_conv" in lora
    assert all(s.startswith("encoder.") for s in lora)


def test_swin_lora_is_on_the_attention_projections_and_adaptformer_beside_each_mlp():
    lora = sites(build("swin-unetr", "cpu_tiny"), "nnUNetTrainerFSEFT_LoRA")
    assert lora and {s.rsplit(".", 1)[-1] for s in lora} == {"qkv", "proj"}
    assert all(".attn." in s and s.startswith("encoder.swinViT.") for s in lora)
    adaptformer = sites(build("swin-unetr", "cpu_tiny"), "nnUNetTrainerFSEFT_AdaptFormer")
    assert len(adaptformer) == 4 and all(s.endswith(".mlp") for s in adaptformer)  # depths (1, 1, 1, 1)
    for refused in ("nnUNetTrainerFSEFT_ConvAdapter", "nnUNetTrainerFSEFT_MedAdapter"):
        with pytest.raises(InputError, match="transformer encoder: use LoRA or AdaptFormer"):
            METHODS[refused].adapt(build("swin-unetr", "cpu_tiny"))


@pytest.mark.parametrize("arch,method", [("mednext-s", "nnUNetTrainerFSEFT_ConvAdapter"),
                                         ("mednext-s", "nnUNetTrainerFSEFT_ConvAdapterParallel"),
                                         ("mednext-s", "nnUNetTrainerFSEFT_MedAdapter"),
                                         ("mednext-s", "nnUNetTrainerFSEFT_AdaptFormer"),
                                         ("mednext-s", "nnUNetTrainerFSEFT_LoRA"),
                                         ("swin-unetr", "nnUNetTrainerFSEFT_LoRA"),
                                         ("swin-unetr", "nnUNetTrainerFSEFT_AdaptFormer")])
def test_an_adapted_network_starts_as_the_foundation(arch, method):
    net, x = build(arch, "cpu_tiny").eval(), inputs(arch)
    net.decoder.deep_supervision = False
    with torch.no_grad():
        want = net(x)
        got = METHODS[method].adapt(net)(x)
    assert torch.equal(got, want)


def test_a_swin_adapter_file_leaves_out_the_index_tables_the_foundation_rebuilds():
    """Swin-UNETR's relative_position_index tables (int64, built from the window size) made a LoRA file of
    73 k parameters weigh 7.5 MB; the file now holds what LoRA trains, and the foundation plus it rebuilds
    the adapted network exactly."""
    import copy
    from safetensors.torch import load
    from nnunet_fseft.sharing.adapter_file import safetensors_bytes, trained_tensors
    method = METHODS["nnUNetTrainerFSEFT_LoRA"]
    foundation = build("swin-unetr", "cpu_tiny").eval()
    foundation.decoder.deep_supervision = False
    net = method.adapt(copy.deepcopy(foundation))
    with torch.no_grad():
        for p in net.parameters():
            if p.requires_grad:
                p.add_(0.01 * torch.randn_like(p))
    tensors = load(safetensors_bytes(trained_tensors(net), {}))
    assert not any("relative_position_index" in n for n in tensors)
    assert set(tensors) == {n for n, p in net.named_parameters() if p.requires_grad}  # Swin has no BatchNorm
    rebuilt = method.adapt(copy.deepcopy(foundation))
    with torch.no_grad():
        for n, p in rebuilt.named_parameters():
            if n in tensors:
                p.copy_(tensors[n])
        x = inputs("swin-unetr")
        assert torch.equal(rebuilt(x), net(x))


@pytest.mark.parametrize("arch,limit", [("mednext-s", 0.15), ("swin-unetr", 0.15)])
def test_at_the_published_sizes_lora_and_the_conv_adapter_train_at_most_15_percent(arch, limit):
    for method in ("nnUNetTrainerFSEFT_LoRA", "nnUNetTrainerFSEFT_ConvAdapter", "nnUNetTrainerFSEFT_ConvAdapterParallel"):
        if arch == "swin-unetr" and "ConvAdapter" in method:
            continue  # refused (above)
        trainable, total = count_parameters(METHODS[method].adapt(build(arch, channels=4, classes=4)))
        assert 0 < trainable <= limit * total, (method, trainable, total)


def test_bitfit_leaves_out_the_biases_mednexts_per_channel_groupnorm_cancels():
    net = build("mednext-s", "cpu_tiny")
    cancelled = cancelled_biases(net)
    assert "encoder.stages.0.blocks.0.conv1.bias" in cancelled and "encoder.stages.0.blocks.0.conv3.bias" not in cancelled
    groups = parameter_groups(net)
    assert not groups["encoder_bias"] & cancelled
    assert {"encoder.stages.0.blocks.0.norm.weight", "encoder.stages.0.blocks.0.norm.bias"} <= groups["encoder_norm"]
    assert anatomy(net).head == [f"decoder.seg_layers.{i}" for i in range(4)]


def test_swin_layernorms_count_for_affine_norm_and_its_decoder_holds_every_conv():
    net = build("swin-unetr", "cpu_tiny")
    groups = parameter_groups(net)
    assert any(".norm1." in n for n in groups["encoder_norm"])
    assert all(n.startswith("decoder.") for n in groups["decoder"])
    assert not any(n.startswith("decoder.") for n in groups["encoder_bias"])


def test_without_monai_the_plans_say_which_install_line_to_run(monkeypatch):
    import sys
    from nnunet_fseft.network.nets.mednext import MedNeXtUNet
    monkeypatch.setitem(sys.modules, "monai", None)  # as if it were not installed
    monkeypatch.setitem(sys.modules, "monai.networks.nets", None)
    with pytest.raises(InputError, match=r'pip install "nnunet-fseft\[monai\]"'):
        MedNeXtUNet(1, 2, [[1, 1, 1]] + [[2, 2, 2]] * 4)
