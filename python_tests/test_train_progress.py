"""The trainer's progress report without a terminal (a log file, a scheduler's job, nohup): a line
every --print-freq steps with images/s, loss, accuracy and ETA; and the --help text."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from dia_fused.train.cli import build_parser, parse_args

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LINE = re.compile(
    r"^(Train 1|Test 1): \[(\d+)/(\d+)\] (\d+\.\d) images/s \| loss (\d+\.\d{4}) "
    r"top1 (\d+\.\d\d) \| ETA (\d+:\d\d:\d\d)$"
)


def test_progress_lines_when_stdout_is_not_a_terminal(tmp_path):
    # 48 train images in batches of 8: 6 steps, a line after steps 2, 4, 6; 9 test images
    # (a fifth, rounded down) in batches of 4: 3 steps, a line after step 2
    cmd = [
        sys.executable,
        "-m",
        "dia_fused.train",
        "-a",
        "dia_resnet",
        "--depth",
        "8",
        "-d",
        "synthetic",
        "--synthetic-size",
        "48",
        "--synthetic-classes",
        "10",
        "--epochs",
        "1",
        "--train-batch",
        "8",
        "--test-batch",
        "4",
        "--print-freq",
        "2",
        "--device",
        "cpu",
        "--manualSeed",
        "3",
        "-c",
        str(tmp_path / "run"),
    ]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("DIA_FUSED_BACKEND", None)
    proc = subprocess.run(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    matches = [LINE.match(line) for line in proc.stdout.splitlines()]
    found = [(m.group(1), int(m.group(2)), int(m.group(3))) for m in matches if m]
    assert found == [("Train 1", 2, 6), ("Train 1", 4, 6), ("Train 1", 6, 6), ("Test 1", 2, 3)], (
        proc.stdout
    )
    for m in filter(None, matches):
        assert float(m.group(4)) > 0 and float(m.group(5)) > 0, m.group(0)
    last_train = next(m for m in matches if m and m.group(1) == "Train 1" and m.group(2) == "6")
    assert last_train.group(7) == "0:00:00"  # nothing left after the last step
    assert "\r" not in proc.stdout and "it/s" not in proc.stderr  # no tqdm bar without a terminal


def test_print_freq_must_be_positive():
    with pytest.raises(SystemExit):
        parse_args(["--print-freq", "0"])


def test_help_states_each_default_once_and_documents_every_option():
    parser = build_parser()
    text = parser.format_help()
    assert "(default: None)" not in text and "(default: False)" not in text
    formatter = parser._get_formatter()
    for action in parser._actions:
        if action.dest == "help":
            continue
        assert action.help, f"{action.option_strings}: no help text"
        help_text = formatter._get_help_string(action)
        assert help_text.count("default:") <= 1, (action.option_strings, help_text)
        if action.option_strings[-1] in (
            "--epochs",
            "--learning-rate",
            "--test-batch",
            "--print-freq",
        ):
            assert help_text.endswith("(default: %(default)s)"), help_text
