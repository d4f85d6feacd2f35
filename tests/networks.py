"""Tiny networks of every architecture nnU-Net builds, and plans that describe them.

Features 4, 8, 16 over three stages and 16^3 inputs keep every unit test fast on CPU."""
import copy

from dynamic_network_architectures.architectures.primus import Primus
from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
from torch import nn

from nnunet_fseft.foundation.record import PLANS_KEY
from nnunet_fseft.plans import PLANS_NAME


def _kwargs(dim: int, kernel_sizes=3, strides=(1, 2, 2)) -> dict:
    return dict(input_channels=1, n_stages=3, features_per_stage=(4, 8, 16),
                conv_op=nn.Conv3d if dim == 3 else nn.Conv2d, kernel_sizes=kernel_sizes, strides=strides,
                num_classes=3, n_conv_per_stage_decoder=1, conv_bias=True,
                norm_op=nn.InstanceNorm3d if dim == 3 else nn.InstanceNorm2d,
                norm_op_kwargs={"eps": 1e-5, "affine": True}, dropout_op=None, dropout_op_kwargs=None,
                nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True})


def plain3d(deep_supervision=True):
    return PlainConvUNet(n_conv_per_stage=2, deep_supervision=deep_supervision, **_kwargs(3))


def resenc3d(deep_supervision=True):
    return ResidualEncoderUNet(n_blocks_per_stage=(1, 2, 1), deep_supervision=deep_supervision, **_kwargs(3))


def plain2d(deep_supervision=True):
    return PlainConvUNet(n_conv_per_stage=2, deep_supervision=deep_supervision, **_kwargs(2))


# Thick slices, as nnU-Net plans them for anisotropic CT: in-plane-only kernels and strides first.
ANISOTROPIC = dict(kernel_sizes=((1, 3, 3), (3, 3, 3), (3, 3, 3)), strides=((1, 1, 1), (1, 2, 2), (2, 2, 2)))


def aniso_plain3d(deep_supervision=True):
    return PlainConvUNet(n_conv_per_stage=2, deep_supervision=deep_supervision, **_kwargs(3, **ANISOTROPIC))


def aniso_resenc3d(deep_supervision=True):
    return ResidualEncoderUNet(n_blocks_per_stage=(1, 2, 1), deep_supervision=deep_supervision,
                               **_kwargs(3, **ANISOTROPIC))


def primus(deep_supervision=True):
    # embed 48 = 4 heads x 12 (EVA's rotary embedding wants embed / heads divisible by 1.5 x 2)
    return Primus(1, 48, (4, 4, 4), 3, 2, 4, (16, 16, 16), init_values=0.1)


INPUT_SHAPES = {plain3d: (2, 1, 16, 16, 16), resenc3d: (2, 1, 16, 16, 16), plain2d: (2, 1, 32, 32),
                aniso_plain3d: (2, 1, 8, 16, 16), aniso_resenc3d: (2, 1, 8, 16, 16), primus: (2, 1, 16, 16, 16)}
ARCHITECTURES = {"plain3d": plain3d, "resenc3d": resenc3d, "plain2d": plain2d, "aniso_plain3d": aniso_plain3d,
                 "aniso_resenc3d": aniso_resenc3d, "primus": primus}

_CONV_ARCH = {
    "n_stages": 3, "features_per_stage": [4, 8, 16], "conv_op": "torch.nn.modules.conv.Conv3d",
    "kernel_sizes": [[3, 3, 3]] * 3, "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2]],
    "n_conv_per_stage_decoder": [1, 1], "conv_bias": True,
    "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d", "norm_op_kwargs": {"eps": 1e-05, "affine": True},
    "dropout_op": None, "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU",
    "nonlin_kwargs": {"inplace": True}}


def plans_manager(architecture: str) -> PlansManager:
    """Plans for a tiny 3d_fullres network: 'plain', 'resenc', or 'primus' (nnU-Net's Primus-S
    trainer recorded as the foundation's, as `nnunet-fseft adopt` would record it)."""
    arch = copy.deepcopy(_CONV_ARCH)
    if architecture == "resenc":
        arch["n_blocks_per_stage"] = [1, 2, 1]
        name = "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"
    else:
        arch["n_conv_per_stage"] = [2, 2, 2]
        name = "dynamic_network_architectures.architectures.unet.PlainConvUNet"
    plans = {"dataset_name": "Dataset999_Tiny", "plans_name": PLANS_NAME, "transpose_forward": [0, 1, 2],
             "transpose_backward": [0, 1, 2], "image_reader_writer": "SimpleITKIO",
             "configurations": {"3d_fullres": {
                 "data_identifier": "tiny", "preprocessor_name": "DefaultPreprocessor", "batch_size": 2,
                 "patch_size": [16, 16, 16] if architecture != "primus" else [32, 32, 32],
                 "median_image_size_in_voxels": [32, 32, 32], "spacing": [1, 1, 1],
                 "normalization_schemes": ["CTNormalization"], "use_mask_for_norm": [False],
                 "architecture": {"network_class_name": name, "arch_kwargs": arch,
                                  "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]},
                 "batch_dice": False}}}
    if architecture == "primus":
        plans[PLANS_KEY] = {"trainer": "nnUNet_Primus_S_Trainer", "configuration": "3d_fullres"}
    return PlansManager(plans)
