"""What the test modules share besides fixtures (those are in conftest.py): the datasets'
constants, the one way to run a command, and the checks of a command's output."""
import glob
import os

FOUNDATION_ID, TARGET_ID, BASE_TARGET_ID = "100", "501", "503"
# The foundation's four organs (liver 1, spleen 2, kidney_left 3, kidney_right 4) under other names
# and in another order: zero-shot matching must find every one and map each to its own channel.
BASE_TARGET_ORGANS = ["spleen", "liver", "kidney_right", "kidney_left"]
BASE_TARGET_LABELS = {"background": 0, "lien": 1, "Liver": 2, "Kidney_R": 3, "left kidney": 4}
FOUNDATION_TO_BASE_TARGET = {0: 0, 1: 2, 2: 1, 3: 4, 4: 3}  # foundation label -> target label
# Small CPU trainings. (Planning commands are given a usable nnUNet_n_proc_DA by the runner.)
TRAIN_ENV = {"nnUNet_n_proc_DA": "0", "nnUNet_fseft_epochs": "2", "nnUNet_fseft_iters_per_epoch": "3"}


def run(args, env=None, check=True, timeout=900):
    """Runs a command of this environment through the library's runner; returns the finished
    process (stdout and stderr together in .stdout). A failure raises CommandFailed with the
    output's last lines, unless check is False."""
    from nnunet_fseft.runner import run as run_command
    return run_command(args, env=env, check=check, timeout=timeout)


def fails_with(args, text, env=None):
    """The command stops with exit code 2 and exactly one `error:` line, which contains `text`."""
    p = run(args, env=env, check=False)
    assert p.returncode == 2, p.stdout[-2000:]
    errors = [line for line in p.stdout.splitlines() if ": error: " in line]
    assert len(errors) == 1 and text in errors[0], p.stdout[-2000:]
    return errors[0]


def images(workspace):
    """The target's unlabelled test images."""
    return workspace / "nnUNet_raw" / "Dataset501_SynthCTB" / "imagesTs"


def segmentations(folder):
    """The two predicted segmentations in a folder, as arrays."""
    import SimpleITK as sitk
    files = sorted(glob.glob(os.path.join(folder, "*.nii.gz")))
    assert len(files) == 2, files
    return [sitk.GetArrayFromImage(sitk.ReadImage(f)) for f in files]


WITHOUT_PLUGIN = """
import os, sys
if __name__ == "__main__":  # nnU-Net's spawned preprocessing workers import this file again
    # nnU-Net as a colleague without nnunet-fseft has it: our package cannot be imported, and
    # nnU-Net searches no folder of ours for trainers.
    for name in list(sys.modules):
        if name.startswith("nnunet_fseft"):
            del sys.modules[name]
    sys.modules["nnunet_fseft"] = None
    os.environ["nnUNet_extTrainer"] = os.pathsep.join(
        p for p in os.environ.get("nnUNet_extTrainer", "").split(os.pathsep) if "nnunet_fseft" not in p)
    from nnunetv2.inference.predict_from_raw_data import predict_entry_point_modelfolder
    sys.argv = ["nnUNetv2_predict_from_modelfolder"] + sys.argv[1:]
    predict_entry_point_modelfolder()
"""
