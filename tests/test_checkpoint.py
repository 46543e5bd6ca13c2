"""Checkpoints: loaded without executing anything from the file, refused with one sentence when unreadable."""
import os
import subprocess
import sys

import pytest
import torch

from unet_pipeline.checkpoint import load_checkpoint
from unet_pipeline.errors import InputError
from unet_pipeline.model import UNet, UNetConfig
from tests.conftest import random_checkpoint

MODEL = UNetConfig(base_channels=4, depth=2, dropout=0.0)


class _RunsAShellCommand:
    """What an attacker pickles: unpickling calls os.system(command)."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def _hostile_checkpoint(path, marker):
    state = {"model": UNet(MODEL).state_dict(), "model_config": MODEL.to_dict(),
             "extra": _RunsAShellCommand(f"touch {marker}")}
    torch.save(state, path)
    return path


def test_a_crafted_checkpoint_runs_nothing_and_is_refused_with_the_object_named(tmp_path):
    marker = tmp_path / "PWNED"
    path = _hostile_checkpoint(tmp_path / "model.pt", marker)
    with pytest.raises(InputError, match=r"model.pt: not a checkpoint this package can load safely \(it holds a "
                                         r"Python object \((posix|os)\.system\)"):
        load_checkpoint(path)
    assert not marker.exists()


def test_predict_refuses_a_crafted_checkpoint_before_running_anything(tmp_path):
    marker = tmp_path / "PWNED"
    path = _hostile_checkpoint(tmp_path / "model.pt", marker)
    run = subprocess.run([sys.executable, "-m", "unet_pipeline.cli", "predict", "--raw", str(tmp_path / "raw"),
                          "--checkpoint", str(path), "--out", str(tmp_path / "p")], capture_output=True, text=True)
    assert run.returncode == 2 and not marker.exists()
    assert run.stderr.strip().splitlines()[-1].startswith("unet-pipeline predict: error: ")
    assert "Traceback" not in run.stderr


@pytest.mark.parametrize("content", [b"\x80\x04\x95" + b"\xff" * 64, b"\x80\x02}q\x00(X", b"PK\x03\x04broken", b""])
def test_a_damaged_or_foreign_file_is_one_sentence(tmp_path, content):
    path = tmp_path / "model.pt"
    path.write_bytes(content)
    with pytest.raises(InputError, match="model.pt: not a checkpoint this package can load safely"):
        load_checkpoint(path)


def test_a_genuine_checkpoint_loads_with_its_training_state(tmp_path):
    path = random_checkpoint(tmp_path / "m.pt", MODEL)
    state = load_checkpoint(path)
    assert state["model_config"] == MODEL.to_dict() and all(isinstance(v, torch.Tensor) for v in state["model"].values())


def test_a_full_disk_while_saving_names_the_checkpoint_and_keeps_the_old_one(tmp_path):
    # RLIMIT_FSIZE makes the write fail as a full disk would (EFBIG instead of ENOSPC), without root.
    path = random_checkpoint(tmp_path / "last.pt", MODEL)
    before = path.read_bytes()
    code = "\n".join([
        "import resource, sys, torch",
        "resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))",
        "from unet_pipeline.checkpoint import save_checkpoint",
        "try:",
        "    save_checkpoint(sys.argv[1], {'model': {'w': torch.zeros(100000)}, 'model_config': {}})",
        "except OSError as exc:",
        "    print(exc.filename, '|', exc.strerror)",
        "    sys.exit(3)",
    ])
    run = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True)
    assert run.returncode == 3, run.stderr[-2000:]
    assert run.stdout.startswith(f"{path} | File too large")
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]
