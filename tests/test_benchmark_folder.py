"""`nnunet-fseft benchmark`'s output folder and run environment, without training: one benchmark
per folder (another dataset, foundation, schedule or held-out set is refused), the user's files
kept, nothing left behind by a failure, and transductive runs adapting on the scans they are
scored on (end to end: test_benchmark_e2e.py)."""
import json
import os

import pytest
import torch

from nnunet_fseft.benchmark import MANIFEST, OutputFolder, benchmark, link_held_out, run_env
from nnunet_fseft.errors import InputError
from nnunet_fseft.trainers import METHODS
from nnunet_fseft.transductive import QUERY_ENV, query_images

DATASET_JSON = {"labels": {"background": 0, "spleen": 1}, "file_ending": ".nii.gz", "channel_names": {"0": "CT"},
                "numTraining": 4}


def identity(**changes):
    return {"dataset": "Dataset601_A", "foundation_sha256": "a" * 64,
            "schedule": {"epochs": "2", "iterations_per_epoch": "3"}, "held_out": ["case_0", "case_3"], **changes}


@pytest.fixture
def nnunet_folders(tmp_path, monkeypatch):
    """nnU-Net's three folders with two raw datasets of four (empty) cases each, and a model folder
    whose checkpoint is not one."""
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (tmp_path / var).mkdir()
        monkeypatch.setenv(var, str(tmp_path / var))
    for name in ("Dataset601_A", "Dataset602_B"):
        raw = tmp_path / "nnUNet_raw" / name
        (raw / "imagesTr").mkdir(parents=True)
        (raw / "labelsTr").mkdir()
        (raw / "dataset.json").write_text(json.dumps(DATASET_JSON))
        for i in range(4):
            (raw / "imagesTr" / f"case_{i}_0000.nii.gz").write_bytes(b"")
            (raw / "labelsTr" / f"case_{i}.nii.gz").write_bytes(b"")
    model = tmp_path / "nnUNet_results" / "Dataset600_F" / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    (model / "fold_all").mkdir(parents=True)
    (model / "plans.json").write_text("{}")
    (model / "dataset.json").write_text(json.dumps(DATASET_JSON))
    torch.save({"something": "else"}, model / "fold_all" / "checkpoint_final.pth")
    return tmp_path, model


def test_a_folder_of_another_benchmark_is_refused_in_one_sentence(tmp_path):
    OutputFolder(str(tmp_path / "out"), identity()).claim()
    for changed, words in [({"dataset": "Dataset602_B"}, "another dataset (Dataset601_A, not Dataset602_B)"),
                           ({"foundation_sha256": "b" * 64}, "another foundation"),
                           ({"schedule": {"epochs": None, "iterations_per_epoch": None}}, "another schedule"),
                           ({"held_out": ["case_1", "case_3"]}, "another set of held-out cases")]:
        with pytest.raises(InputError) as e:
            OutputFolder(str(tmp_path / "out"), identity(**changed))
        assert words in str(e.value) and "pass another -o" in str(e.value) and str(e.value).count(". ") == 0
    OutputFolder(str(tmp_path / "out"), identity())  # the same benchmark resumes


def test_the_users_files_are_kept_and_ours_replaced(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.csv").write_text("my own results")
    (out / "report.md").write_text("my own report")
    (out / "log.txt").write_text("my own log")
    folder = OutputFolder(str(out), identity())
    kept = folder.claim()
    assert sorted(open(b).read() for b in kept) == ["my own log", "my own report", "my own results"]
    assert all(os.path.basename(b).split(".bak-")[0] in ("results.csv", "report.md", "log.txt") for b in kept)
    for text in ("first", "second"):  # what the benchmark wrote itself is replaced without a backup
        with open(folder.replace("report.md"), "w") as f:
            f.write(text)
        folder.wrote("report.md")
    folder.save()
    assert len([f for f in os.listdir(out) if f.startswith("report.md")]) == 2  # ours and the user's backup
    (out / "report.md").write_text("edited by the user")  # changed since: kept too
    with open(OutputFolder(str(out), identity()).replace("report.md"), "w") as f:
        f.write("third")
    assert sorted(open(out / f).read() for f in os.listdir(out) if f.startswith("report.md")) == \
        ["edited by the user", "my own report", "third"]


def test_a_benchmark_json_we_did_not_write_is_refused(tmp_path):
    (tmp_path / MANIFEST).write_text('{"my": "settings"}')
    with pytest.raises(InputError, match="was not written by `nnunet-fseft benchmark`"):
        OutputFolder(str(tmp_path), identity())
    assert (tmp_path / MANIFEST).read_text() == '{"my": "settings"}'


def test_benchmark_refuses_another_datasets_folder_before_any_work(nnunet_folders):
    root, model = nnunet_folders
    out = root / "bench"
    from nnunet_fseft.foundation import sha256
    from nnunet_fseft.kshot import kshot_splits
    held_out = kshot_splits([f"case_{i}" for i in range(4)], 1, 1, 0, 2)[0]["val"]
    OutputFolder(str(out), identity(foundation_sha256=sha256(str(model / "fold_all" / "checkpoint_final.pth")),
                                    held_out=held_out, schedule={"epochs": None, "iterations_per_epoch": None})).claim()
    before = sorted(os.listdir(out))
    with pytest.raises(InputError, match="holds a benchmark of another dataset"):
        benchmark(str(model), "602", [1], 1, ["LoRA"], 2, str(out))
    assert sorted(os.listdir(out)) == before and not (root / "nnUNet_preprocessed" / "Dataset602_B").exists()


def test_a_failed_benchmark_leaves_no_empty_log_and_no_folder(nnunet_folders):
    root, model = nnunet_folders
    with pytest.raises(InputError, match="not an nnU-Net checkpoint"):  # raised by adopt, after the folder is claimed
        benchmark(str(model), "601", [1], 1, ["LoRA"], 2, str(root / "bench"))
    assert not (root / "bench").exists()
    (root / "mine").mkdir()
    (root / "mine" / "notes.txt").write_text("mine")
    with pytest.raises(InputError):
        benchmark(str(model), "601", [1], 1, ["LoRA"], 2, str(root / "mine"))
    assert os.listdir(root / "mine") == ["notes.txt"]


def test_transductive_runs_adapt_on_exactly_the_held_out_scans(nnunet_folders, monkeypatch):
    root, _ = nnunet_folders
    raw = root / "nnUNet_raw" / "Dataset601_A"
    images = {f"case_{i}": [str(raw / "imagesTr" / f"case_{i}_0000.nii.gz")] for i in range(4)}
    (raw / "imagesTs").mkdir()
    (raw / "imagesTs" / "other_0000.nii.gz").write_bytes(b"")  # unlabelled scans that are not scored
    held_out = link_held_out(images, ["case_1", "case_3"], str(root / "bench" / "held_out"))
    assert sorted(os.listdir(held_out)) == ["case_1_0000.nii.gz", "case_3_0000.nii.gz"]
    assert link_held_out(images, ["case_1", "case_3"], held_out) == held_out  # the same folder again: kept

    env = run_env(METHODS["nnUNetTrainerFSEFT_SpatialAdapterTI"], "cpu", held_out)
    assert env[QUERY_ENV] == os.path.abspath(held_out) and env["nnUNet_n_proc_DA"] == "0"
    assert QUERY_ENV not in run_env(METHODS["nnUNetTrainerFSEFT_SpatialAdapter"], "cpu", held_out)
    # what the transductive trainer reads (its on_train_start): the held-out scans, not imagesTs
    monkeypatch.setenv(QUERY_ENV, env[QUERY_ENV])
    queries = query_images("Dataset601_A", ".nii.gz")
    assert sorted(os.path.basename(files[0]) for files in queries) == ["case_1_0000.nii.gz", "case_3_0000.nii.gz"]
    monkeypatch.delenv(QUERY_ENV)
    assert [os.path.basename(f[0]) for f in query_images("Dataset601_A", ".nii.gz")] == ["other_0000.nii.gz"]
