"""Every method x every architecture, on tiny networks: step-0 identity, which parameters learn,
strict rebuild by the predictor's route, merge, and the adapter file's tensors."""
import copy

import pytest
import torch

from networks import ARCHITECTURES, INPUT_SHAPES, plans_manager
from nnunet_fseft.errors import InputError
from nnunet_fseft.network.anatomy import anatomy
from nnunet_fseft.network.parameters import count_parameters
from nnunet_fseft.sharing.adapter_file import safetensors_bytes, saved_buffers, trained_tensors
from nnunet_fseft.trainers import METHODS as ALL_METHODS
from nnunet_fseft.trainers.blackbox import nnUNetTrainerFSEFT_BlackBox
from nnunet_fseft.tuners import is_adapter_parameter, merge
from nnunet_fseft.tuners.registry import is_mergeable, merge_tuner, method as tuner_method

NOT_APPLICABLE = {  # (architecture, tuner): the sentence's gist
    ("primus", "conv_adapter"): "transformer encoder",
    ("primus", "med_adapter"): "transformer encoder",
    ("plain2d", "med_adapter"): "needs a 3D network",
}
# methods that change the foundation's network (black-box ones: test_blackbox.py)
METHODS = {m: t for m, t in ALL_METHODS.items() if not issubclass(t, nnUNetTrainerFSEFT_BlackBox)}
CASES = [(a, m) for a in ARCHITECTURES for m in METHODS if (a, METHODS[m].tuner) not in NOT_APPLICABLE]
REFUSED = [(a, m) for a in ARCHITECTURES for m in METHODS if (a, METHODS[m].tuner) in NOT_APPLICABLE]
MERGEABLE = [(a, m) for a, m in CASES if is_mergeable(METHODS[m].tuner)]


pytestmark = pytest.mark.usefixtures("single_thread")


def outputs(net, x):
    out = net(x)
    return list(out) if isinstance(out, (list, tuple)) else [out]


def adapted(arch: str, method: str, seed: int = 0):
    """(foundation, adapted copy, input): the same weights, the copy with the method applied."""
    torch.manual_seed(seed)
    factory = ARCHITECTURES[arch]
    foundation = factory().eval()
    net = METHODS[method].adapt(copy.deepcopy(foundation))
    return foundation, net, torch.randn(INPUT_SHAPES[factory])


def perturb(net, names=None):
    """Random values in the given parameters (default: the trainable ones), as if trained."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in net.named_parameters():
            if (p.requires_grad if names is None else n in names):
                p.add_(0.05 * torch.randn(p.shape, generator=g))


def one_sentence(message: str) -> bool:
    return message.count(". ") == 0 and message.endswith(".")


def head_output_module(net):
    return net.get_submodule(anatomy(net).head[-1])


@pytest.mark.parametrize("arch,method", CASES)
def test_step0_equals_the_foundation_and_the_adapters_run(arch, method):
    foundation, net, x = adapted(arch, method)
    with torch.no_grad():
        for got, ref in zip(outputs(net, x), outputs(foundation, x)):
            torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
        adapters = {n for n, _ in net.named_parameters() if is_adapter_parameter(n)}
        if adapters:  # an adapter that never runs would also give identity
            perturb(net, adapters)
            assert (outputs(net, x)[0] - outputs(foundation, x)[0]).abs().max() > 1e-4


@pytest.mark.parametrize("arch,method", REFUSED)
def test_combinations_that_make_no_sense_are_refused_in_one_sentence(arch, method):
    torch.manual_seed(0)
    with pytest.raises(InputError, match=NOT_APPLICABLE[(arch, METHODS[method].tuner)]) as e:
        METHODS[method].adapt(ARCHITECTURES[arch]())
    assert str(e.value).count(". ") == 0 and str(e.value).endswith(".")


def _expected_trainable(net, method, name) -> bool:
    """The intent of each method, written from parameter names and module types independently of
    nnunet_fseft.network.parameters."""
    module = net.get_submodule(name.rsplit(".", 1)[0])
    head = name.startswith(anatomy(net).head[-1]) or "seg_layers" in name
    groups = METHODS[method].trainable
    encoder = name.startswith(("encoder.", "eva.", "down_projection."))
    block = name[:-len(".conv.bias")] if name.endswith(".conv.bias") else None
    normalised = block is not None and "instancenorm" in type(getattr(net.get_submodule(block), "norm", None)).__name__.lower()
    checks = {"all": True, "head": head, "adapters": "fseft_" in name, "decoder": not encoder and "fseft_" not in name
              and name not in ("mask_token",),
              "encoder_bias": encoder and name.endswith(".bias") and "fseft_" not in name and not normalised,
              "encoder_norm": encoder and "fseft_" not in name and ("norm" in type(module).__name__.lower()),
              "last_stage": None}
    if "last_stage" in groups:
        return None  # checked by size in test_ft_last_trains_less_than_the_decoder
    return any(checks[g] for g in groups)


@pytest.mark.parametrize("arch,method", CASES)
def test_gradients_reach_exactly_the_intended_parameters(arch, method):
    _, net, x = adapted(arch, method)
    perturb(net)  # zero-initialised up-projections would otherwise stop the gradient
    net.train()
    sum(o.square().mean() for o in outputs(net, x)).backward()
    trainable = [n for n, p in net.named_parameters() if p.requires_grad]
    assert trainable
    for n, p in net.named_parameters():
        assert (p.grad is not None) == p.requires_grad, n
        expected = _expected_trainable(net, method, n)
        if expected is not None:
            assert p.requires_grad == expected, n
    assert any(p.grad.abs().sum() > 0 for n, p in net.named_parameters() if p.requires_grad and "fseft_" in n) \
        or not any("fseft_" in n for n in trainable)


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_bitfit_leaves_out_exactly_the_biases_that_cannot_change_the_output(arch):
    """A conv bias that an InstanceNorm follows is subtracted again with the channel's mean."""
    _, net, x = adapted(arch, "nnUNetTrainerFSEFT_BitFit")
    net.eval()
    before = outputs(net, x)
    encoder_biases = [n for n, _ in net.named_parameters() if n.startswith(("encoder.", "eva.", "down_projection."))
                      and n.endswith(".bias")]
    trained = {n for n, p in net.named_parameters() if p.requires_grad}
    left_out = [n for n in encoder_biases if n not in trained]
    assert arch == "primus" or left_out  # nnU-Net's conv blocks: conv (with bias), InstanceNorm
    kept = [n for n in encoder_biases if n in trained]
    moved_by = {}
    for n in left_out + kept:
        p = net.get_parameter(n)
        change = torch.randn_like(p)  # per channel: a LayerNorm cancels a shift shared by all channels
        with torch.no_grad():
            p.add_(change)
        after = outputs(net, x)
        with torch.no_grad():
            p.sub_(change)
        moved_by[n] = any(not torch.allclose(a, b, atol=1e-4) for a, b in zip(after, before))
    assert not any(moved_by[n] for n in left_out), [n for n in left_out if moved_by[n]]
    assert kept and any(moved_by[n] for n in kept)


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_ft_last_trains_less_than_the_decoder_and_more_than_the_head(arch):
    ft_last, decoder = (count_parameters(adapted(arch, m)[1])[0] for m in
                        ("nnUNetTrainerFSEFT_FTLast", "nnUNetTrainerFSEFT_DecoderFT"))
    net = adapted(arch, "nnUNetTrainerFSEFT_FullFT")[1]
    head = sum(p.numel() for n, p in net.named_parameters() if n.startswith(tuple(anatomy(net).head)))
    if arch == "primus":  # its decoder is sized by the number of classes: all of it is head
        assert head == ft_last == decoder == sum(p.numel() for p in net.up_projection.parameters())
    else:
        assert head < ft_last < decoder


@pytest.mark.parametrize("arch,method", CASES)
def test_frozen_parameters_do_not_change_and_trained_ones_do(arch, method):
    _, net, x = adapted(arch, method)
    perturb(net)  # so that every trained tensor gets a gradient (zero-initialised branches block it)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    # no weight decay: it would move every tensor that has a gradient, even a zero one
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-2, weight_decay=0)
    net.train()
    for _ in range(3):
        opt.zero_grad()
        sum(o.square().mean() for o in outputs(net, x)).backward()
        opt.step()
    for n, p in net.named_parameters():
        changed = not torch.equal(before[n], p.detach())
        assert changed == p.requires_grad, f"{n}: requires_grad={p.requires_grad}, changed={changed}"


PLANS_CASES = [(a, m) for a in ("plain", "resenc", "primus") for m in METHODS
               if (("primus" if a == "primus" else "plain3d"), METHODS[m].tuner) not in NOT_APPLICABLE]


@pytest.mark.parametrize("arch,method", PLANS_CASES)
def test_the_predictor_rebuilds_the_trained_network_and_loads_it_strictly(arch, method):
    """nnUNetPredictor calls TRAINER.build_network_architecture(..., enable_deep_supervision=False) and
    load_state_dict(strict) on the trainer's checkpoint (Primus: the foundation's Primus-S trainer)."""
    pm = plans_manager(arch)
    cm = pm.get_configuration("3d_fullres")
    trainer = METHODS[method]
    torch.manual_seed(0)
    trained = trainer.build_network_architecture(pm, cm, 1, 3, enable_deep_supervision=True)
    perturb(trained)
    rebuilt = trainer.build_network_architecture(pm, cm, 1, 3, enable_deep_supervision=False)
    rebuilt.load_state_dict(trained.state_dict())
    if arch == "primus":
        assert type(rebuilt).__name__ == "Primus"
    x = torch.randn(1, 1, *cm.patch_size)
    with torch.no_grad():
        torch.testing.assert_close(outputs(rebuilt.eval(), x)[0], outputs(trained.eval(), x)[0])


@pytest.mark.parametrize("arch,method", MERGEABLE)
def test_merge_gives_the_same_logits_from_a_plain_network(arch, method):
    foundation, net, x = adapted(arch, method)
    perturb(net)
    with torch.no_grad():
        want = outputs(net, x)
    merge_tuner(net, METHODS[method].tuner)
    assert not any(is_adapter_parameter(k) for k in net.state_dict())
    plain = copy.deepcopy(foundation)
    plain.load_state_dict(net.state_dict())  # strict: the merged weights are a plain network's
    assert {type(m) for m in plain.modules()} == {type(m) for m in foundation.modules()}
    with torch.no_grad():
        for got, ref in zip(outputs(plain, x), want):
            torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_only_linear_methods_are_mergeable():
    assert {m for m in METHODS if not is_mergeable(METHODS[m].tuner)} == {
        "nnUNetTrainerFSEFT_AdaptFormer", "nnUNetTrainerFSEFT_AdaptFormer_DecoderFT", "nnUNetTrainerFSEFT_ConvAdapter",
        "nnUNetTrainerFSEFT_ConvAdapterParallel", "nnUNetTrainerFSEFT_MedAdapter",
        "nnUNetTrainerFSEFT_MedAdapter_DecoderFT"}


@pytest.mark.parametrize("tuner", ["adaptformer", "conv_adapter", "med_adapter"])
def test_merging_a_non_linear_method_is_refused_in_one_sentence_and_changes_nothing(tuner):
    name = next(m for m, t in METHODS.items() if t.tuner == tuner)
    _, net, _ = adapted("plain3d", name)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(InputError, match=rf"{tuner_method(tuner).name} adds non-linear branches.*cannot be merged") as e:
        merge(net, tuner_method(tuner))
    assert one_sentence(str(e.value))
    after = net.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("arch,method", CASES)
def test_adapter_tensors_plus_the_foundation_rebuild_the_same_network(arch, method):
    from safetensors.torch import load
    foundation, net, x = adapted(arch, method)
    perturb(net)
    tensors = load(safetensors_bytes(trained_tensors(net), {"method": method}))
    assert set(tensors) == {n for n, p in net.named_parameters() if p.requires_grad} | set(saved_buffers(net))
    rebuilt = METHODS[method].adapt(copy.deepcopy(foundation))
    own = {**dict(rebuilt.named_parameters()), **dict(rebuilt.named_buffers())}
    with torch.no_grad():
        for n, t in tensors.items():
            own[n].copy_(t)
        for got, ref in zip(outputs(rebuilt, x), outputs(net, x)):
            assert torch.equal(got, ref)


def test_med_adapter_stages_interact():
    """Each Med-Adapter after the first mixes in the previous stage's adapter features."""
    _, net, x = adapted("plain3d", "nnUNetTrainerFSEFT_MedAdapter")
    perturb(net)
    outputs(net, x)[0].square().mean().backward()
    interactions = [p for n, p in net.named_parameters() if ".interaction." in n and n.endswith("weight")]
    assert len(interactions) == len(anatomy(net).encoder_stages) - 1
    assert all(p.grad.abs().sum() > 0 for p in interactions)
    assert all(a.features is None for a in net.modules() if hasattr(a, "features"))  # nothing is held between calls


@pytest.mark.parametrize("arch", ["plain3d", "resenc3d", "plain2d"])
def test_parallel_adapters_meet_the_stage_output_at_its_resolution_on_odd_sizes(arch):
    """Strided 1x1x1 and depthwise branches beside strided stages give exactly the stage's output
    shape, also where a stage's output size is odd (inputs 20^3 / 36^2: stage sizes 20, 10, 5 / 36, 18, 9)."""
    for method in ("nnUNetTrainerFSEFT_ConvAdapterParallel", "nnUNetTrainerFSEFT_AdaptFormer"):
        _, net, _ = adapted(arch, method)
        shape = list(INPUT_SHAPES[ARCHITECTURES[arch]])
        shape[2:] = [s + 4 for s in shape[2:]]
        x = torch.randn(shape)
        sites, hooks = [], []  # per adapted module: its input, its output and its branch's output shapes
        for module in net.modules():
            branches = [m for n, m in module.named_children() if is_adapter_parameter(n)]
            if branches:
                seen = {}
                sites.append(seen)
                hooks.append(module.register_forward_hook(
                    lambda m, i, o, seen=seen: seen.update(input=i[0].shape[2:], output=o.shape)))
                hooks.append(branches[0].register_forward_hook(lambda m, i, o, seen=seen: seen.update(branch=o.shape)))
        with torch.no_grad():
            out = outputs(net, x)[0]
        for h in hooks:
            h.remove()
        assert out.shape[2:] == x.shape[2:]
        assert sites and all(seen["branch"] == seen["output"] for seen in sites), method
        strided = [seen for seen in sites if seen["output"][2:] != seen["input"]]
        assert strided, f"{method}: no branch beside a strided stage"
        assert any(n % 2 for seen in strided for n in seen["output"][2:]), f"{method}: no odd-sized stage output"


def test_primus_lora_sits_on_attention_and_mlp_linears_only():
    _, net, _ = adapted("primus", "nnUNetTrainerFSEFT_LoRA")
    adapted_layers = {n.rsplit(".", 1)[0] for n, _ in net.named_parameters() if "lora_A" in n}
    assert adapted_layers and all(".attn." in n or ".mlp." in n for n in adapted_layers)
    assert len(adapted_layers) == 7 * len(net.eva.blocks)  # q, k, v, proj, fc1_g, fc1_x, fc2
