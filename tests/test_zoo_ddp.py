"""Data-parallel training under torchrun: two CPU processes (gloo) on a tiny copy task."""

import json
import os
import subprocess
import sys

from fastattn.zoo import checkpoint
from tests.zoo_helpers import TINY_COPY


def test_two_processes_train_and_rank_zero_writes_the_checkpoint_once(tmp_path):
    out = tmp_path / "ddp"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "-m", "fastattn", "train", "copy", *TINY_COPY, "--epochs", "1", "--device", "cpu", "--out", str(out),
    ]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    finished = subprocess.run(command, capture_output=True, text=True, timeout=300, env=environment)
    output = finished.stdout + finished.stderr
    assert finished.returncode == 0, output
    # 96 examples in batches of 16: 6 batches, 3 for each rank
    assert "rank 0 of 2: finished after 3 steps (epochs)" in output
    assert "rank 1 of 2: finished after 3 steps (epochs)" in output
    assert output.count("checkpoint saved:") == 1, output
    assert sorted(path.name for path in out.iterdir() if path.name.startswith((".", "checkpoint"))) == ["checkpoint.pt"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["processes"] == 2 and metrics["steps"] == 3 and metrics["epochs_completed"] == 1
    saved = checkpoint.load(out / "checkpoint.pt")
    assert saved["progress"]["batch"] == 0 and saved["progress"]["epoch"] == 1
