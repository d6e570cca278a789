"""Smoke tests of the ViT example (a few steps, tiny model) and its data-parallel mode."""

import json
import os
import subprocess
import sys

import pytest

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "examples")
sys.path.insert(0, EXAMPLES)
import train_vit  # noqa: E402

TINY = ["--width", "32", "--depth", "1", "--heads", "2", "--batch-size", "32",
        "--no-progress"]


def test_compare_writes_summary_and_plot_and_loss_decreases(tmp_path):
  out = str(tmp_path / "out")
  summary = train_vit.main(["--compare", "--epochs", "3", "--max-steps", "60",
                            "--out-dir", out] + TINY)
  assert os.path.isfile(os.path.join(out, "summary.json"))
  assert os.path.getsize(os.path.join(out, "curves.png")) > 1000
  with open(os.path.join(out, "summary.json")) as f:
    on_disk = json.load(f)
  assert [r["attention"] for r in on_disk["runs"]] == ["exact", "distr"]
  for run in summary["runs"]:
    assert run["train_loss"][-1] < run["train_loss"][0]
    assert 0.0 <= run["final_test_accuracy"] <= 1.0


def test_resume_continues_from_checkpoint(tmp_path):
  out = str(tmp_path / "out")
  first = train_vit.main(["--epochs", "1", "--out-dir", out] + TINY)
  assert first["runs"][0]["steps"] == 44  # 1437 training images // 32
  second = train_vit.main(["--epochs", "2", "--resume", "--out-dir", out] + TINY)
  run = second["runs"][0]
  assert run["steps"] == 88 and len(run["train_loss"]) == 2
  assert run["train_loss"][0] == pytest.approx(first["runs"][0]["train_loss"][0])


def test_cifar10_needs_its_folder(tmp_path):
  with pytest.raises(FileNotFoundError, match="CIFAR-10"):
    train_vit.main(["--dataset", "cifar10", "--data-dir", str(tmp_path / "nope")] + TINY)
  (tmp_path / "data_batch_1").write_bytes(b"not a pickle")
  with pytest.raises((ValueError, FileNotFoundError), match="CIFAR-10"):
    train_vit.main(["--dataset", "cifar10", "--data-dir", str(tmp_path)] + TINY)


def test_data_parallel_matches_single_device(tmp_path):
  """Two fake CPU devices (a fresh process): same losses as one device."""
  code = (
      "import json, sys; sys.path.insert(0, %r); import train_vit; "
      "a = train_vit.main(sys.argv[1:] + ['--devices', '1', '--out-dir', %r]); "
      "b = train_vit.main(sys.argv[1:] + ['--devices', '2', '--out-dir', %r]); "
      "print('LOSSES', json.dumps([a['runs'][0]['train_loss'], b['runs'][0]['train_loss']]))"
  ) % (EXAMPLES, str(tmp_path / "one"), str(tmp_path / "two"))
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
             PYTHONPATH=os.path.dirname(EXAMPLES))
  result = subprocess.run([sys.executable, "-c", code, "--epochs", "1", "--max-steps", "8",
                           "--attention", "distr"] + TINY, capture_output=True, text=True,
                          env=env, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  line = [l for l in result.stdout.splitlines() if l.startswith("LOSSES")][0]
  one, two = json.loads(line[len("LOSSES"):])
  assert one == pytest.approx(two, rel=1e-4)
