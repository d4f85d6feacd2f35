"""What users trained before the package moved into sub-packages still predicts: a LoRA model
folder and its adapter file written by the flat layout (tests/data/before_layout, see its
README) give the probabilities that layout predicted, through nnU-Net's own predictor and
through `nnunet-fseft import`."""
import os
import shutil

import numpy as np
import pytest

from helpers import PREDICT_ON_CPU, nnunet_folders, run

DATA = os.path.join(os.path.dirname(__file__), "data", "before_layout")
CASE = "SynthCTB_006"


def predicted_probabilities(model_folder, out):
    run(["nnUNetv2_predict_from_modelfolder", "-i", os.path.join(DATA, "imagesTs"), "-o", out, "-m", model_folder,
         "-f", "0", *PREDICT_ON_CPU, "--save_probabilities"])
    return np.load(os.path.join(out, f"{CASE}.npz"))["probabilities"]


@pytest.mark.e2e
def test_a_model_folder_and_an_adapter_file_of_the_flat_layout_predict_as_they_did(tmp_path, monkeypatch):
    nnunet_folders(tmp_path, monkeypatch)
    expected = np.load(os.path.join(DATA, f"expected_{CASE}.npz"))["probabilities"]
    assert expected.shape[0] == 3 and 0 < expected[2].mean() < 1  # pancreas, and spleen from the foundation's row
    # copies: nothing may be written into the test data
    lora = shutil.copytree(os.path.join(DATA, "lora"), tmp_path / "nnUNetTrainerFSEFT_LoRA__FSEFTPlans__3d_fullres")
    foundation = shutil.copytree(os.path.join(DATA, "foundation"),
                                 tmp_path / "nnUNetTrainerFSEFT_Pretrain__nnUNetPlans_cpu_tiny__3d_fullres")
    adapter = shutil.copy(os.path.join(DATA, "lora.safetensors"), tmp_path / "lora.safetensors")
    shutil.copy(os.path.join(DATA, "lora.safetensors.json"), tmp_path / "lora.safetensors.json")

    # float32 sums in another order (threads, CPU kernels) moved 92 of 98,304 values by up to 5e-5 on one
    # fresh install; a different prediction would move them by far more
    np.testing.assert_allclose(predicted_probabilities(lora, tmp_path / "pred_folder"), expected, atol=2e-4)

    imported = tmp_path / "imported" / "nnUNetTrainerFSEFT_LoRA__FSEFTPlans__3d_fullres"
    run(["nnunet-fseft", "import", adapter, "--foundation", foundation, "-o", imported])
    np.testing.assert_allclose(predicted_probabilities(imported, tmp_path / "pred_imported"), expected, atol=2e-4)
