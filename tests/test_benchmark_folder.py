"""`nnunet-fseft benchmark`'s output folder and run environment, without training: one benchmark
per folder (another dataset, foundation, schedule or held-out set is refused), the user's files
kept, nothing left behind by a failure, a failed run recorded and retried while the others go on,
the zero-shot row left out only when the foundation knows no label, and transductive runs
adapting on the scans they are scored on (end to end: test_benchmark_e2e.py)."""
import json
import os

import pytest
import torch

from nnunet_fseft.environment import QUERY
from nnunet_fseft.errors import InputError
from nnunet_fseft.experiments.benchmark.output_folder import MANIFEST, OutputFolder, link_held_out
from nnunet_fseft.experiments.benchmark.protocol import run_env, run_order
from nnunet_fseft.experiments.benchmark.report import write_reports
from nnunet_fseft.experiments.benchmark.runs import benchmark, run_pending, zero_shot_scores
from nnunet_fseft.foundation.record import PLANS_KEY
from nnunet_fseft.runner import run
from nnunet_fseft.trainers import METHODS
from nnunet_fseft.training.transductive import query_images

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
    from nnunet_fseft.foundation.record import sha256
    from nnunet_fseft.datasets.kshot import kshot_splits
    held_out = kshot_splits([f"case_{i}" for i in range(4)], 1, 1, 0, 2)[0]["val"]
    OutputFolder(str(out), identity(foundation_sha256=sha256(str(model / "fold_all" / "checkpoint_final.pth")),
                                    held_out=held_out, schedule={"epochs": None, "iterations_per_epoch": None})).claim()
    before = sorted(os.listdir(out))
    with pytest.raises(InputError, match="holds a benchmark of another dataset"):
        benchmark(str(model), "602", [1], 1, ["LoRA"], 2, str(out))
    assert sorted(os.listdir(out)) == before and not (root / "nnUNet_preprocessed" / "Dataset602_B").exists()


def test_a_failed_benchmark_leaves_no_empty_log_and_no_folder(nnunet_folders, capsys):
    root, model = nnunet_folders
    with pytest.raises(InputError, match="not an nnU-Net checkpoint"):  # raised by adopt, after the folder is claimed
        benchmark(str(model), "601", [1], 1, ["LoRA"], 2, str(root / "bench"))
    assert not (root / "bench").exists()
    (root / "mine").mkdir()
    (root / "mine" / "notes.txt").write_text("mine")
    (root / "mine" / "results.csv").write_text("my results")  # moved aside when the folder is claimed ...
    with pytest.raises(InputError):
        benchmark(str(model), "601", [1], 1, ["LoRA"], 2, str(root / "mine"))
    # ... and back when nothing ran
    assert sorted(os.listdir(root / "mine")) == ["notes.txt", "results.csv"]
    assert (root / "mine" / "results.csv").read_text() == "my results"
    assert "Nothing ran, so results.csv moved back from the backups" in capsys.readouterr().out


def test_k_all_is_every_case_outside_the_held_out_set_and_a_bad_k_is_refused_before_any_work(nnunet_folders, capsys):
    root, model = nnunet_folders
    with pytest.raises(InputError, match="^-k 'abc' is not a number of support cases"):
        benchmark(str(model), "601", [1, "abc"], 1, ["LoRA"], 2, str(root / "bench"))
    assert not (root / "bench").exists()
    with pytest.raises(InputError, match="not an nnU-Net checkpoint"):  # adopt: after K is resolved and checked
        benchmark(str(model), "601", ["all"], 2, ["LoRA"], 2, str(root / "bench"))
    said = capsys.readouterr().out
    assert "Warning: K = 2 takes every one of the 2 cases outside the held-out set, so all 2 folds train" in said
    with pytest.raises(InputError, match="fewer than K"):
        benchmark(str(model), "601", ["all", 3], 1, ["LoRA"], 2, str(root / "bench"))


def test_a_folder_of_an_older_version_says_that_its_runs_are_retrained(nnunet_folders, capsys):
    root, model = nnunet_folders
    old = root / "old"
    old.mkdir()
    (old / "runs.jsonl").write_text('{"method": "LoRA", "K": 1, "repeat": 0}\n')  # and no benchmark.json
    (old / "report.md").write_text("its report")
    with pytest.raises(InputError, match="not an nnU-Net checkpoint"):
        benchmark(str(model), "601", [1], 1, ["LoRA"], 2, str(old))
    said = capsys.readouterr().out.splitlines()
    assert len([line for line in said if str(old) in line]) == 1, said
    line = next(line for line in said if str(old) in line)
    assert line.startswith(f"{old} was written by an older nnunet-fseft") and "Kept" not in line
    assert f"its runs are kept in {old / 'runs.jsonl'}.bak-" in line and "are retrained" in line
    assert sorted(os.listdir(old)) == ["report.md", "runs.jsonl"]  # nothing ran: as it was


MEASURED = {"wall_s": 1.0, "peak_gpu_mib": None, "peak_host_mib": 100.0, "trainable": 10, "total": 100,
            "adapter_bytes": 40, "per_label": {"spleen": {"dice": 0.5, "sensitivity": 0.6, "specificity": 0.9}}}


def test_a_failed_run_is_recorded_reported_and_retried_while_the_others_go_on(tmp_path, capsys):
    """Our own train step stubbed: a real command that fails as nnUNetv2_train does when the trainer
    stops on a non-finite loss (its error on the last line)."""
    folder = OutputFolder(str(tmp_path / "out"), identity())
    folder.claim()
    splits = [{"train": ["case_1"], "val": ["case_0", "case_3"]}]
    todo = [("LoRA", 1, 0, 0), ("BitFit", 1, 0, 0)]
    ran = []

    def one_run(fails):
        def step(m, k, r, f):
            ran.append(m)
            if m in fails:
                run(["python", "-c", "raise SystemExit('RuntimeError: the training loss is nan')"])
            return MEASURED
        return step

    rows = run_pending(folder, todo, splits, "cpu", one_run(fails={"LoRA"}))
    assert ran == ["LoRA", "BitFit"]
    said = capsys.readouterr().out
    assert "[1/2] LoRA K=1 repeat 0 failed: python failed: RuntimeError: the training loss is nan" in said
    recorded = [json.loads(line) for line in open(tmp_path / "out" / "runs.jsonl")]
    assert [(r["method"], r.get("failed")) for r in recorded] == \
        [("LoRA", "python failed: RuntimeError: the training loss is nan"), ("BitFit", None)]
    result = write_reports(folder, rows, None, [1], ["LoRA", "BitFit"])
    assert [r["method"] for r in result["runs"]] == ["BitFit"] and [r["method"] for r in result["failed"]] == ["LoRA"]
    report = (tmp_path / "out" / "report.md").read_text()
    # per K: Dice, sd over cases (none without per-case scores), sensitivity, specificity; then the costs
    assert "| LoRA | failed | - | - | - | - | - | - | - | - |" in report
    assert "| BitFit | 0.500 (1 run) | - | 0.600 | 0.900 | 10 |" in report
    assert "- LoRA K=1 repeat 0 (fold 0): python failed: RuntimeError: the training loss is nan" in report
    assert [r["method"] for r in csv_rows(tmp_path / "out" / "results.csv")] == ["BitFit"]

    ran.clear()  # the benchmark again: the failed run is retried, the finished one kept
    rows = run_pending(folder, todo, splits, "cpu", one_run(fails=set()))
    assert ran == ["LoRA"]
    said = capsys.readouterr().out
    assert "[1/2] LoRA K=1 repeat 0 (fold 0), failed earlier (python failed: RuntimeError: the training loss is " \
           "nan): retried" in said and "[2/2] BitFit K=1 repeat 0: done earlier, skipped" in said
    result = write_reports(folder, rows, None, [1], ["LoRA", "BitFit"])
    assert [r["method"] for r in result["runs"]] == ["LoRA", "BitFit"] and result["failed"] == []
    assert "failed" not in (tmp_path / "out" / "report.md").read_text()


def test_runs_go_in_the_order_of_k_asked_and_keep_the_fold_numbers_of_the_splits():
    """`-k 5 1` runs K = 5 first (a device run asked for K = 5 first and got only K = 1 when the K
    values were sorted); each run keeps the fold that `folds` wrote for its K, whatever the order."""
    from nnunet_fseft.experiments.benchmark.protocol import folds
    cases = [f"case_{i}" for i in range(12)]
    splits = folds([1, 5], 2, cases, 4)
    todo = run_order([5, 1], 2, ["LoRA", "FullFT"])
    assert [(m, k, r) for m, k, r, f in todo][:4] == [("LoRA", 5, 0), ("FullFT", 5, 0), ("LoRA", 5, 1), ("FullFT", 5, 1)]
    assert [len(splits[f]["train"]) for m, k, r, f in todo] == [k for m, k, r, f in todo]
    assert sorted({f for *_, f in todo}) == [0, 1, 2, 3] and run_order([1, 5, 5], 2, ["LoRA"]) == run_order([1, 5], 2, ["LoRA"])
    assert {f for m, k, r, f in run_order([1, 5], 2, ["LoRA"]) if k == 5} == {f for m, k, r, f in todo if k == 5}


def csv_rows(path):
    import csv
    with open(path) as f:
        return list(csv.DictReader(f))


def test_zero_shot_is_left_out_only_when_the_foundation_knows_no_label(nnunet_folders, capsys):
    """No label matched: no row, nothing cached. Any other error (here: no splits file) is raised,
    also over a null that an older version cached, and nothing is cached."""
    root, _ = nnunet_folders
    folder = OutputFolder(str(root / "bench"), identity())
    folder.claim()
    plans = {PLANS_KEY: {"labels": {"background": 0, "liver": 1}}}
    assert zero_shot_scores(folder, "Dataset601_A", plans, DATASET_JSON, "cpu") is None
    assert "zero-shot: none (no label of Dataset601_A is a class the foundation knows)" in capsys.readouterr().out
    assert not (root / "bench" / "zero_shot.json").exists()

    plans = {PLANS_KEY: {"labels": {"background": 0, "Spleen": 1}}}
    (root / "nnUNet_preprocessed" / "Dataset601_A").mkdir()
    (root / "nnUNet_preprocessed" / "Dataset601_A" / "FSEFTPlans.json").write_text(json.dumps(plans))
    (root / "nnUNet_preprocessed" / "Dataset601_A" / "dataset.json").write_text(json.dumps(DATASET_JSON))
    (root / "bench" / "zero_shot.json").write_text("null")
    with pytest.raises(InputError, match="splits_final.json does not exist"):
        zero_shot_scores(folder, "Dataset601_A", plans, DATASET_JSON, "cpu")
    assert (root / "bench" / "zero_shot.json").read_text() == "null"  # not replaced by another None


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
    assert env[QUERY] == os.path.abspath(held_out) and env["nnUNet_n_proc_DA"] == "0"
    assert env["nnUNet_fseft_final_validation"] == "0"  # nnUNetv2_predict segments the held-out scans next
    assert QUERY not in run_env(METHODS["nnUNetTrainerFSEFT_SpatialAdapter"], "cpu", held_out)
    # what the transductive trainer reads (its on_train_start): the held-out scans, not imagesTs
    monkeypatch.setenv(QUERY, env[QUERY])
    queries = query_images("Dataset601_A", ".nii.gz")
    assert sorted(os.path.basename(files[0]) for files in queries) == ["case_1_0000.nii.gz", "case_3_0000.nii.gz"]
    monkeypatch.delenv(QUERY)
    assert [os.path.basename(f[0]) for f in query_images("Dataset601_A", ".nii.gz")] == ["other_0000.nii.gz"]


def test_a_benchmark_runs_a_users_subclass_by_its_class_name(tmp_path, monkeypatch):
    """Our methods by their short names; a user's variant of one (benchmarks/lr_sweep.py writes such
    variants) by its full class name, from a folder on nnUNet_extTrainer; nnU-Net's own trainer is
    not a method."""
    from nnunet_fseft.experiments.benchmark.protocol import method_trainers
    (tmp_path / "my_variants.py").write_text(
        "from nnunet_fseft.trainers import nnUNetTrainerFSEFT_LoRA\n\n"
        "class MyLoRA_lr1e3(nnUNetTrainerFSEFT_LoRA):\n    learning_rate = 1e-3\n")
    monkeypatch.setenv("nnUNet_extTrainer", os.pathsep.join([str(tmp_path), os.environ.get("nnUNet_extTrainer", "")]))
    found = method_trainers(["LoRA", "MyLoRA_lr1e3", "TargetOnly", "Start"])
    assert found["LoRA"] is METHODS["nnUNetTrainerFSEFT_LoRA"]
    assert found["TargetOnly"].__name__ == "nnUNetTrainerFSEFT_TargetOnly"  # the paper's target-only row
    assert found["Start"].__name__ == "nnUNetTrainerFSEFT_Start"
    assert found["MyLoRA_lr1e3"].__name__ == "MyLoRA_lr1e3" and found["MyLoRA_lr1e3"].learning_rate == 1e-3
    for bad in ("nnUNetTrainer", "Nope"):
        with pytest.raises(InputError, match=f"Unknown method '{bad}'"):
            method_trainers([bad])


def test_the_report_says_when_the_foundation_names_an_organ_it_does_not_segment(tmp_path):
    """Zero-shot Dice below UNLEARNED_DICE on a label the foundation knows: the report says the task is a
    novel-organ one for this foundation; above it, the report says nothing of the kind."""
    from nnunet_fseft.experiments.benchmark.protocol import UNLEARNED_DICE, unlearned_labels
    folder = OutputFolder(str(tmp_path / "out"), identity())
    folder.claim()
    rows = [{"method": "BitFit", "K": 1, "repeat": 0, "fold": 0, "support": ["case_1"], **MEASURED,
             "device": "cpu", "machine": {}, "versions": {}}]
    write_reports(folder, rows, {"spleen": UNLEARNED_DICE / 2}, [1], ["BitFit"])
    said = ("The foundation names spleen but does not segment it (zero-shot Dice 0.025, below 0.05): for it this "
            "is a novel-organ task, whatever the label's name.")
    assert said in (tmp_path / "out" / "report.md").read_text()
    write_reports(folder, rows, {"spleen": 0.8}, [1], ["BitFit"])
    assert "does not segment" not in (tmp_path / "out" / "report.md").read_text()
    assert unlearned_labels({"spleen": 0.0, "liver": 0.9, "stomach": 0.01}) == \
        "names spleen, stomach but does not segment them (zero-shot Dice 0.000, 0.010, below 0.05)"
    assert unlearned_labels(None) == ""
