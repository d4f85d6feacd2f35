"""nnU-Net finds our trainers right after pip install, also beside a user's own trainers."""
import os
import subprocess
import sys

from conftest import run

FIND = ("from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name as f; "
        "print([f(n).__module__ for n in {names!r}])")


def find(names, env, cwd):
    p = subprocess.run([sys.executable, "-c", FIND.format(names=names)], env=env, cwd=cwd,
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    return p.stdout.strip().splitlines()[-1]


def test_found_with_no_user_action(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "nnUNet_extTrainer"}
    out = find(["nnUNetTrainerFSEFT_LoRA", "nnUNetTrainerFSEFT_FullFT"], env, tmp_path)
    # the class found is the package's own, not a copy imported under another name
    assert out == "['nnunet_fseft.trainers.peft', 'nnunet_fseft.trainers.peft']"


def test_found_beside_the_users_own_trainers(tmp_path):
    mine = tmp_path / "my_trainers"
    mine.mkdir()
    (mine / "my_trainer.py").write_text(
        "from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer\n"
        "class MyOwnTrainer(nnUNetTrainer):\n    pass\n")
    env = {**os.environ, "nnUNet_extTrainer": str(mine)}
    out = find(["MyOwnTrainer", "nnUNetTrainerFSEFT_LoRA"], env, tmp_path)
    assert out == "['my_trainer', 'nnunet_fseft.trainers.peft']"


def test_env_prints_the_export_line():
    out = run(["nnunet-fseft", "env"]).stdout
    assert "export nnUNet_extTrainer=" in out and os.path.join("nnunet_fseft", "nnunet_ext") in out


def test_trainers_importable_from_python():
    from nnunet_fseft.trainers import nnUNetTrainerFSEFT, nnUNetTrainerFSEFT_LoRA
    assert issubclass(nnUNetTrainerFSEFT_LoRA, nnUNetTrainerFSEFT)
