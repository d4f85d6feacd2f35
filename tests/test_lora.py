"""LoRA injection on nnU-Net's dynamic networks (PlainConvUNet, ResidualEncoderUNet; 3D and 2D).

Tiny networks (tests/networks.py) keep every test fast on CPU.
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from networks import INPUT_SHAPES, plain2d, plain3d, resenc3d
from nnunet_fseft.network.anatomy import CONV_TYPES
from nnunet_fseft.network.parameters import count_parameters
from nnunet_fseft.tuners import inject
from nnunet_fseft.tuners.lora import LoRA, LoRAConv3d, METHOD, lora_weight

LORA_TYPES = (LoRA,)


pytestmark = pytest.mark.usefixtures("single_thread")


def inject_lora(net, rank, alpha):
    return inject(net, METHOD, rank=rank, alpha=alpha)


NETWORKS = pytest.mark.parametrize("factory", [plain3d, resenc3d, plain2d], ids=["plain3d", "resenc3d", "plain2d"])


def make(factory, seed=0):
    torch.manual_seed(seed)
    net = factory()
    x = torch.randn(INPUT_SHAPES[factory])
    return net, x


def as_list(out):
    return list(out) if isinstance(out, (list, tuple)) else [out]


def head_module_ids(net: nn.Module) -> set:
    """Every module reachable under a `seg_layers` name, whatever alias reaches it."""
    return {id(m) for name, m in net.named_modules(remove_duplicate=False) if ".seg_layers." in f".{name}."}


def non_head_convs(net: nn.Module) -> dict:
    """id -> module for every distinct conv / transposed conv outside the head."""
    head = head_module_ids(net)
    return {id(m): m for _, m in net.named_modules(remove_duplicate=False)
            if isinstance(m, CONV_TYPES) and id(m) not in head}


def executed_modules(net: nn.Module, x: torch.Tensor) -> dict:
    """id -> module for every module object whose forward ran during `net(x)`."""
    ran = {}

    def record(mod, inp, out):
        ran[id(mod)] = mod  # returns None: the output is left alone

    handles = [m.register_forward_hook(record) for m in net.modules()]
    try:
        with torch.no_grad():
            net(x)
    finally:
        for h in handles:
            h.remove()
    return ran


def own_lora_A(m: nn.Module) -> list:
    return [n for n, _ in m.named_parameters(recurse=False) if "lora_A" in n]


def trainer_lora():
    # imported lazily: pulls in nnU-Net's trainer
    from nnunet_fseft.trainers import nnUNetTrainerFSEFT_LoRA
    return nnUNetTrainerFSEFT_LoRA


# ----------------------------------------------------------------------------------------------
# 1. Step-0 identity
# ----------------------------------------------------------------------------------------------

@NETWORKS
def test_injected_network_computes_the_foundation_function_at_step_0(factory):
    net, x = make(factory)
    foundation = copy.deepcopy(net)
    names = inject_lora(net, rank=4, alpha=8.0)
    assert names, "nothing was adapted"
    net.eval()
    foundation.eval()
    with torch.no_grad():
        got, ref = as_list(net(x)), as_list(foundation(x))
    assert len(got) == len(ref) == 2  # deep supervision: one output per decoder stage
    for g, r in zip(got, ref):
        assert g.shape == r.shape
        torch.testing.assert_close(g, r, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------------------
# 2. Every convolution of the forward path is adapted exactly once
# ----------------------------------------------------------------------------------------------

@NETWORKS
def test_every_encoder_conv_is_adapted_exactly_once_and_the_decoder_is_left_alone(factory):
    net, x = make(factory)
    net.eval()
    convs_before = {id(m): m for m in net.encoder.modules() if isinstance(m, CONV_TYPES)}  # FSEFT: the encoder
    aliased_names = [n for n, m in net.named_modules(remove_duplicate=False) if id(m) in convs_before]
    # the traps are really there: convs are reachable under several names
    assert len(aliased_names) > len(convs_before)
    assert net.decoder.encoder is net.encoder

    names = inject_lora(net, rank=4, alpha=8.0)

    # one name per distinct non-head conv, each naming a distinct adapted module
    assert len(names) == len(convs_before)
    adapted = [net.get_submodule(n) for n in names]
    assert len({id(m) for m in adapted}) == len(names)
    assert {id(m) for m in adapted} == set(convs_before)
    assert all(isinstance(m, LORA_TYPES) for m in adapted)

    # what actually runs in forward: every non-head conv is a LoRA conv, and every one of them runs
    ran = executed_modules(net, x)
    head = head_module_ids(net)
    ran_convs = {i: m for i, m in ran.items() if isinstance(m, CONV_TYPES) and i not in head}
    assert set(convs_before) < set(ran_convs)
    not_adapted = [type(m).__name__ for i, m in ran_convs.items() if i in convs_before and not isinstance(m, LORA_TYPES)]
    assert not_adapted == []
    decoder = [m for i, m in ran_convs.items() if i not in convs_before]
    assert decoder and not any(isinstance(m, LORA_TYPES) for m in decoder)

    # the head is trained in full, not adapted
    head_convs = [m for m in net.decoder.seg_layers]
    assert head_convs and all(type(m) in (nn.Conv2d, nn.Conv3d) for m in head_convs)  # plain, not LoRA
    assert not any("fseft_" in n for n, _ in net.decoder.seg_layers.named_parameters())

    # exactly one A (and one B) per adapted module, and as many A tensors as adapted modules
    for m in net.modules():
        assert len(own_lora_A(m)) <= 1
    for m in adapted:
        assert own_lora_A(m) == ["fseft_lora_A"]
    assert sum(1 for n, _ in net.named_parameters() if n.endswith("fseft_lora_A")) == len(names)
    assert sum(1 for n, _ in net.named_parameters() if n.endswith("fseft_lora_B")) == len(names)

    # `.conv` and `.all_modules[0]` are one and the same LoRA module
    blocks = [m for m in net.encoder.modules() if hasattr(m, "conv") and hasattr(m, "all_modules")]
    assert blocks
    for b in blocks:
        assert b.conv is b.all_modules[0]
        assert isinstance(b.conv, LORA_TYPES)
    assert net.decoder.encoder is net.encoder

    # the decoder's transposed convs are not adapted (the layer itself is tested below)
    assert len(net.decoder.transpconvs) == 2
    assert not any(isinstance(t, LORA_TYPES) for t in net.decoder.transpconvs)

    if factory is resenc3d:  # the 1x1x1 skip projections are adapted too
        skips = [m for n, m in net.encoder.named_modules() if ".skip." in f".{n}." and isinstance(m, CONV_TYPES)]
        assert len(skips) == 2
        assert all(isinstance(m, LoRAConv3d) and m.kernel_size == (1, 1, 1) for m in skips)


@NETWORKS
def test_second_injection_adds_nothing(factory):
    net, x = make(factory)
    net.eval()
    first = inject_lora(net, rank=4, alpha=8.0)
    with torch.no_grad():  # nonzero B, so a second adapter stacked on top would change the output
        for n, p in net.named_parameters():
            if n.endswith("fseft_lora_B"):
                p.normal_(0, 0.1)
        before = [o.clone() for o in as_list(net(x))]
    n_params = count_parameters(net)[1]
    keys = list(net.state_dict())

    second = inject_lora(net, rank=4, alpha=8.0)

    assert first and second == []
    assert count_parameters(net)[1] == n_params
    assert list(net.state_dict()) == keys
    for m in net.modules():
        assert len(own_lora_A(m)) <= 1
    with torch.no_grad():
        after = as_list(net(x))
    for a, b in zip(after, before):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------------------------
# 3. Freezing through the trainer's classmethod
# ----------------------------------------------------------------------------------------------

@NETWORKS
def test_adapt_trains_only_adapters_and_head(factory):
    cls = trainer_lora()
    net, _ = make(factory)
    returned = cls.adapt(net)
    assert returned is net

    named = list(net.named_parameters())
    expected_trainable = {n for n, _ in named if "fseft_" in n or ".seg_layers." in f".{n}"}
    actually_trainable = {n for n, p in named if p.requires_grad}
    assert actually_trainable == expected_trainable
    assert any("fseft_" in n for n in actually_trainable)
    assert any(".seg_layers." in f".{n}" for n in actually_trainable)
    assert len(actually_trainable) < len(named)  # something is frozen

    # hyper-parameters come from the trainer class
    assert all(p.shape[0] == cls.rank for n, p in named if n.endswith("fseft_lora_A"))

    trainable, total = count_parameters(net)
    assert total == sum(p.numel() for _, p in named)
    assert trainable == sum(p.numel() for n, p in named if n in expected_trainable)
    assert 0 < trainable < total


# ----------------------------------------------------------------------------------------------
# 4. Training moves the adapters and the head only
# ----------------------------------------------------------------------------------------------

@NETWORKS
def test_training_updates_adapters_and_leaves_frozen_weights_bit_identical(factory):
    cls = trainer_lora()
    net, x = make(factory)
    foundation = copy.deepcopy(net)
    cls.adapt(net)
    frozen = {n: p.detach().clone() for n, p in net.named_parameters() if not p.requires_grad}
    assert frozen
    lora_modules = [m for m in net.modules() if isinstance(m, LORA_TYPES)]
    assert lora_modules

    torch.manual_seed(1)
    with torch.no_grad():
        targets = [torch.randn_like(o) for o in as_list(net(x))]
    optimizer = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-2)
    net.train()
    for step in range(3):
        optimizer.zero_grad()
        loss = sum(F.mse_loss(o, t) for o, t in zip(as_list(net(x)), targets))
        loss.backward()
        if step == 0:
            for m in lora_modules:
                assert m.fseft_lora_B.grad is not None and m.fseft_lora_B.grad.abs().sum() > 0
                # B is zero at step 0, so A cannot receive a gradient yet
                assert m.fseft_lora_A.grad is None or torch.count_nonzero(m.fseft_lora_A.grad) == 0
            for n, p in net.named_parameters():
                if not p.requires_grad:
                    assert p.grad is None, n
        optimizer.step()

    for n, p in net.named_parameters():
        if n in frozen:
            assert torch.equal(p.detach(), frozen[n]), f"frozen parameter {n} changed"
    for m in lora_modules:
        assert torch.count_nonzero(m.fseft_lora_B) > 0
        assert not torch.equal(lora_weight(m), m.weight)

    net.eval()
    foundation.eval()
    with torch.no_grad():
        diffs = [(a - b).abs().max().item() for a, b in zip(as_list(net(x)), as_list(foundation(x)))]
    assert max(diffs) > 1e-3
