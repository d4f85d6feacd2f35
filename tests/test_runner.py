"""The one subprocess runner and the one quiet context (nnunet_fseft/runner.py)."""
import os
import subprocess
import sys
import time

import pytest

from nnunet_fseft.runner import CommandFailed, command_env, quiet, run

LINES = "import sys\nfor i in range(40): print('line', i)\nprint('the cause', file=sys.stderr)\nsys.exit(3)"


def test_a_failed_command_is_named_with_its_last_lines(tmp_path):
    log = tmp_path / "log.txt"
    with pytest.raises(CommandFailed) as e:
        run(["python", "-c", LINES], log=str(log))
    message = str(e.value)
    assert message.startswith("python failed (exit 3): ") and f"(all of it in {log})" in message
    assert "line 39" in message and "the cause" in message and "line 0\n" not in message  # the tail only
    assert "line 0\n" in log.read_text() and "the cause" in log.read_text()  # the log has everything
    assert e.value.reason == "python failed: the cause"  # its last line: where a Python error is
    p = run(["python", "-c", LINES], check=False)
    assert p.returncode == 3 and p.stdout.count("line ") == 40 and p.peak_host_mib > 1


def test_planning_gets_a_usable_nnunet_n_proc_da_and_training_what_was_asked(monkeypatch):
    monkeypatch.setenv("nnUNet_n_proc_DA", "0")  # the README's advice for small CPU trainings, exported
    for planning in ("nnUNetv2_plan_and_preprocess", "/venv/bin/nnUNetv2_plan_experiment", "nnUNetv2_preprocess"):
        assert "nnUNet_n_proc_DA" not in command_env(planning)
    assert command_env("nnUNetv2_plan_and_preprocess", {"nnUNet_n_proc_DA": "3"})["nnUNet_n_proc_DA"] == "3"
    assert command_env("nnUNetv2_train")["nnUNet_n_proc_DA"] == "0"
    assert command_env("nnUNetv2_train", {"nnUNet_n_proc_DA": "2"})["nnUNet_n_proc_DA"] == "2"
    # and the value nnU-Net's planner then passes to torch.set_num_threads is valid
    check = ("import torch; from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA; "
             "torch.set_num_threads(get_allowed_n_proc_DA()); print(torch.get_num_threads())")
    out = subprocess.run([sys.executable, "-c", check], env=command_env("nnUNetv2_plan_and_preprocess"),
                         capture_output=True, text=True)
    assert out.returncode == 0 and int(out.stdout.split()[-1]) >= 1, out.stderr[-2000:]


def test_a_command_past_its_timeout_is_stopped(tmp_path):
    with pytest.raises(CommandFailed, match="timed out after 1 s") as e:
        run(["python", "-c", "print('started'); import time; time.sleep(60)"], timeout=1)
    assert e.value.reason == "python failed (timed out after 1 s)"


def running(pid: int) -> bool:
    """Whether process `pid` exists and is not a zombie waiting to be reaped."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads /proc")
def test_a_timeout_or_an_interruption_stops_the_workers_of_the_command_too():
    """nnU-Net's augmentation and preprocessing workers are its children: they hold the output
    pipe, so killing the command alone would leave them running and the runner waiting on them."""
    t0 = time.time()
    with pytest.raises(CommandFailed, match="timed out after 1 s"):
        run(["bash", "-c", "sleep 30 & sleep 30"], timeout=1)
    assert time.time() - t0 < 10

    workers = []

    def interrupt(line):  # as Ctrl-C would, which no longer reaches a command in a session of its own
        workers.append(int(line))
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(["bash", "-c", "sleep 30 & echo $!; sleep 30"], on_line=interrupt)
    deadline = time.time() + 5
    while running(workers[0]) and time.time() < deadline:
        time.sleep(0.1)
    assert not running(workers[0])


def test_a_variable_set_to_none_is_unset_and_the_command_runs_where_asked(tmp_path, monkeypatch):
    monkeypatch.setenv("FSEFT_TEST_VARIABLE", "set")
    show = "import os; print(os.environ.get('FSEFT_TEST_VARIABLE'), os.getcwd())"
    assert run(["python", "-c", show]).stdout.split() == ["set", os.getcwd()]
    out = run(["python", "-c", show], env={"FSEFT_TEST_VARIABLE": None}, cwd=str(tmp_path)).stdout
    assert out.split() == ["None", os.path.realpath(tmp_path)]


def test_quiet_sends_python_and_child_process_output_to_the_log(tmp_path, capfd):
    log = tmp_path / "log.txt"
    with quiet(str(log)):
        print("from python")
        print("from python's stderr", file=sys.stderr)
        os.system("echo from a child process")
    print("after")
    out, err = capfd.readouterr()
    assert "from" not in out + err and "after" in out
    assert log.read_text().splitlines() == ["from python", "from python's stderr", "from a child process"]
    with quiet():  # nowhere
        print("discarded")
    out, err = capfd.readouterr()
    assert "discarded" not in out + err


def test_quiet_restores_the_streams_after_an_error(tmp_path, capfd):
    with pytest.raises(ValueError):
        with quiet(str(tmp_path / "log.txt")):
            raise ValueError("inside")
    print("visible")
    assert "visible" in capfd.readouterr().out
