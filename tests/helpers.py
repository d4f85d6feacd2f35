"""What the test modules share besides fixtures (those are in conftest.py): the datasets'
constants, the one way to run a command, and the checks of a command's output."""
import glob
import os

FOUNDATION_ID, TARGET_ID, BASE_TARGET_ID = "100", "501", "503"
# Brain-tumour MRI (nnunet-fseft synth --task brats): a region-based foundation on the source
# population (BraTS-2021-like) and a target from the shifted one (BraTS-Africa-like)
BRATS_FOUNDATION_ID, BRATS_TARGET_ID = "300", "301"
# The foundation's four organs (liver 1, spleen 2, kidney_left 3, kidney_right 4) under other names
# and in another order: zero-shot matching must find every one and map each to its own channel.
BASE_TARGET_ORGANS = ["spleen", "liver", "kidney_right", "kidney_left"]
BASE_TARGET_LABELS = {"background": 0, "lien": 1, "Liver": 2, "Kidney_R": 3, "left kidney": 4}
FOUNDATION_TO_BASE_TARGET = {0: 0, 1: 2, 2: 1, 3: 4, 4: 3}  # foundation label -> target label
# What every command a test runs gets exported: nnUNet_n_proc_DA=0, as the README advises for
# small CPU runs, so each command must cope with it (nnUNetv2_plan_and_preprocess included: its
# planner cannot take 0; the runner gives planning a usable value). Given to the commands only,
# never set in os.environ: a unit test sees the same environment whichever tests ran before it.
COMMAND_ENV = {"nnUNet_n_proc_DA": "0"}
# Small CPU trainings
TRAIN_ENV = {**COMMAND_ENV, "nnUNet_fseft_epochs": "2", "nnUNet_fseft_iters_per_epoch": "3"}
# For tests that segment with nnUNetv2_predict themselves and never read a fold's validation: nnU-Net's
# validation after training costs about 10 s a training on 2 cores (its spawned export and scoring workers)
TRAIN_ENV_NO_VALIDATION = {**TRAIN_ENV, "nnUNet_fseft_final_validation": "0"}
# nnUNetv2_predict on two 32^3 scans: no mirroring, and one worker each for preprocessing and export
# (nnU-Net's 3 + 3 spawned workers each import torch and nnU-Net: 5 s of a 15 s prediction on 2 cores)
PREDICT_ON_CPU = ["-device", "cpu", "--disable_tta", "-npp", "1", "-nps", "1"]


def run(args, env=None, check=True, timeout=900, cwd=None):
    """Runs a command of this environment (nnunet-fseft, nnUNetv2_*, python) in the folder `cwd`
    through the library's runner, with COMMAND_ENV and `env` exported (a None value unsets a
    variable); returns the finished process (stdout and stderr together in .stdout). A failure
    raises CommandFailed with the output's last lines, unless check is False."""
    from nnunet_fseft.runner import run as run_command
    return run_command(args, env={**COMMAND_ENV, **(env or {})}, check=check, timeout=timeout, cwd=cwd)


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


def tree(folder):
    """Every path below `folder` (relative to it): None for a folder, the target for a link, the
    bytes of each file. What a refusal, or a command that only reads, must leave as it was."""
    found = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = os.path.join(root, name)
            key = os.path.relpath(path, folder)
            if os.path.islink(path):
                found[key] = "-> " + os.readlink(path)
            elif name in dirs:
                found[key] = None
            else:
                with open(path, "rb") as f:
                    found[key] = f.read()
    return found


def nnunet_folders(root, monkeypatch):
    """nnU-Net's three folders under `root`, exported for this test and the commands it runs."""
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (root / var).mkdir(exist_ok=True)
        monkeypatch.setenv(var, str(root / var))
    return root
