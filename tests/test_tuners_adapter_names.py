"""Adapter files written before the one injection loop still import: every method creates exactly the
adapter tensors (names and shapes) that its old injector created at commit c160fab (LoRA and
AdaptFormer: those in the encoder, where they have been since).

tests/data/adapter_names_c160fab.json was written once by running the old injectors (with the old
trainer classes' hyper-parameters) on the tiny networks of tests/networks.py; it is not regenerated."""
import json
import os

import pytest
import torch

from networks import ARCHITECTURES
from nnunet_fseft.errors import InputError
from nnunet_fseft.trainers import METHODS
from nnunet_fseft.tuners import is_adapter_parameter

with open(os.path.join(os.path.dirname(__file__), "data", "adapter_names_c160fab.json")) as f:
    OLD = {arch: methods for arch, methods in json.load(f).items() if not arch.startswith("_")}

CASES = [(arch, method) for arch in OLD for method in OLD[arch]]
# Since issue 12 these adapt the encoder only, as FSEFT does: their old files' encoder tensors are
# still named and shaped as before, and the decoder's are no longer made (such a file is refused).
ENCODER_ONLY_SINCE = {"nnUNetTrainerFSEFT_LoRA", "nnUNetTrainerFSEFT_AdaptFormer"}
ENCODER = ("encoder.", "decoder.encoder.", "eva.", "down_projection.")  # the decoder holds the encoder too

pytestmark = pytest.mark.usefixtures("single_thread")


def test_the_snapshot_covers_every_injecting_method_of_that_time():
    # the adapter methods of c160fab; a method added since has no old files to import
    assert {m for methods in OLD.values() for m in methods} == {
        "nnUNetTrainerFSEFT_LoRA", "nnUNetTrainerFSEFT_AdaptFormer", "nnUNetTrainerFSEFT_ConvAdapter",
        "nnUNetTrainerFSEFT_ConvAdapterParallel", "nnUNetTrainerFSEFT_MedAdapter"}
    assert all(m in METHODS for m in OLD["plain3d"])


@pytest.mark.parametrize("arch,method", CASES)
def test_each_method_creates_the_adapter_tensors_its_old_injector_created(arch, method):
    torch.manual_seed(0)
    network = ARCHITECTURES[arch]()
    if OLD[arch][method] is None:  # the old injector refused this network; the new one must too
        with pytest.raises(InputError):
            METHODS[method].adapt(network)
        return
    METHODS[method].adapt(network)
    new = {k: list(v.shape) for k, v in network.state_dict().items() if is_adapter_parameter(k)}
    old = OLD[arch][method]
    if method in ENCODER_ONLY_SINCE:
        old = {k: v for k, v in old.items() if k.startswith(ENCODER)}
        assert old and len(old) < len(OLD[arch][method]) or arch == "primus"
    assert new == old
