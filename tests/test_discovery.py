"""nnU-Net finds our trainers right after pip install, also beside a user's own trainers."""
import os

from helpers import run

FIND = ("from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name as f; "
        "print([f(n).__module__ for n in {names!r}])")


def find(names, env, cwd):
    return run(["python", "-c", FIND.format(names=names)], env=env, cwd=cwd).stdout.strip().splitlines()[-1]


def test_found_beside_the_users_own_trainers(tmp_path):
    mine = tmp_path / "my_trainers"
    mine.mkdir()
    (mine / "my_trainer.py").write_text(
        "from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer\n"
        "class MyOwnTrainer(nnUNetTrainer):\n    pass\n")
    out = find(["MyOwnTrainer", "nnUNetTrainerFSEFT_LoRA"], {"nnUNet_extTrainer": str(mine)}, tmp_path)
    assert out == "['my_trainer', 'nnunet_fseft.trainers.peft']"


def test_env_prints_the_export_line():
    out = run(["nnunet-fseft", "env"]).stdout
    assert "export nnUNet_extTrainer=" in out and os.path.join("nnunet_fseft", "nnunet_ext") in out


IDENTITY = ("import nnunet_fseft.trainers as t\n"
            "from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name as f\n"
            "for name, cls in t.METHODS.items():\n"
            "    found = f(name)\n"
            "    print('FOUND', name, found is cls, found is getattr(t, name, None))\n")


def test_every_method_is_found_with_no_user_action_as_the_class_python_imports(tmp_path):
    """With nothing exported, nnUNetv2_train -tr NAME and `from nnunet_fseft.trainers import NAME`
    give the same class for every method: none is missing from the discovery folder, shadowed by
    one of nnU-Net's, or imported twice (a copy would fail isinstance checks, share no class state)."""
    from nnunet_fseft.trainers import METHODS
    p = run(["python", "-c", IDENTITY], env={"nnUNet_extTrainer": None}, cwd=tmp_path)
    found = [line.split() for line in p.stdout.splitlines() if line.startswith("FOUND ")]
    assert [name for _, name, *_ in found] == list(METHODS) and len(METHODS) > 10
    assert all(same == "True" and exported == "True" for _, _, same, exported in found), found
