"""CPU smoke test of the causal language-model example (tiny config, a few steps)."""

import json
import os
import sys

import numpy as np
import pytest

from distrattention_jax import grouping

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "examples")
sys.path.insert(0, EXAMPLES)
import train_lm  # noqa: E402

TINY = ["--preset", "tiny", "--no-progress", "--contexts", "64",
        "--grid", "g2-greedy-b16,g3-greedy-b16,g2-lowrank-bseq,g2-lowrankfixed-bseq",
        "--finetune", "g2-greedy-b16",
        "--finetune-steps", "2", "--timing-reps", "1"]


def test_split_is_deterministic_and_by_file():
  root, paths = train_lm.stdlib_files()
  assert paths == sorted(paths) and all(p.endswith(".py") for p in paths)
  assert not any("site-packages" in p or "dist-packages" in p for p in paths)
  train, heldout, info = train_lm.load_data(5)
  assert info["heldout"]["files"] > 0 and info["train"]["files"] > 10 * info["heldout"]["files"]
  assert len(train) == info["train"]["bytes"] and len(heldout) == info["heldout"]["bytes"]
  a = train_lm.sample_batch(train, 3, 32, seed=0, step=7)
  assert a.shape == (3, 33) and np.array_equal(a, train_lm.sample_batch(train, 3, 32, 0, 7))


def test_settings_parse():
  assert train_lm.parse_setting("exact") is None
  s = train_lm.parse_setting("g4-lsh-bseq")
  assert (s["group_size"], s["grouping"], s["block"]) == (4, "lsh", "seq")
  assert dict(train_lm.options_for(s, 2048))["block_q"] == 2048
  assert dict(train_lm.options_for(train_lm.parse_setting("g2-greedy-b64"), 4096))[
      "block_q"] == 64
  with pytest.raises(ValueError, match="setting"):
    train_lm.parse_setting("greedy")


def test_train_compare_and_resume(tmp_path):
  out = str(tmp_path / "lm")
  summary = train_lm.main(TINY + ["--compare", "--out-dir", out])
  history = summary["train"]["history"]
  assert history["train_loss"][-1] < history["train_loss"][0] - 0.5  # the loss falls
  assert history["eval_loss"][-1] < history["eval_loss"][0]

  for name in ("summary.json", "compare.json", "compare.md", "checkpoint-exact.msgpack"):
    assert os.path.isfile(os.path.join(out, name)), name
  with open(os.path.join(out, "compare.json")) as f:
    table = json.load(f)
  rows = {r["setting"]: r for r in table["rows"]}
  expected = {"exact", "g2-greedy-b16", "exact (fine-tuned)", "g2-greedy-b16 (fine-tuned)"}
  if "lowrank" in grouping.grouping_names():  # the lowrank rows run once the library has it
    expected |= {"g2-lowrank-bseq", "g2-lowrankfixed-bseq"}
  assert set(rows) == expected
  exact = rows["exact"]
  assert exact["causality"]["strictly_causal"] and exact["causality"]["max_logit_change"] == 0
  # the per-block grouping sees rows after i in i's block; fixed maps see nothing later
  assert not rows["g2-greedy-b16"]["causality"]["strictly_causal"]
  if "g2-lowrankfixed-bseq" in rows:
    fixed = rows["g2-lowrankfixed-bseq"]["causality"]
    assert fixed["strictly_causal"] and fixed["max_logit_change"] == 0
    assert not rows["g2-lowrank-bseq"]["causality"]["strictly_causal"]
  for row in rows.values():
    assert row["ppl"]["64"] > 1 and 0.5 < row["ratio"]["64"] < 2
  assert rows["exact"]["speedup"]["64"] == pytest.approx(1.0)
  assert "group_size" in table["skipped"]["g3-greedy-b16"]  # a failing setting is skipped
  if "g2-lowrank-bseq" in table["skipped"]:  # the library has no lowrank grouping yet
    assert "lowrank" in table["skipped"]["g2-lowrank-bseq"]
  with open(os.path.join(out, "compare.md")) as f:
    md = f.read()
  assert "| exact | " in md and "strictly causal" in md

  # resume: continue the exact run from its checkpoint to 40 steps
  resumed = train_lm.main(TINY + ["--steps", "40", "--resume", "--out-dir", out])
  again = resumed["train"]["history"]
  assert again["step"][:len(history["step"])] == history["step"]
  assert again["train_loss"][:len(history["train_loss"])] == history["train_loss"]
  assert again["step"][-1] == 40
