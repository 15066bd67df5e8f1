"""Rollout scripts: one trajectory for every rollout, or several per prompt handed out in turn within a batch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from thyme.errors import ConfigError
from thyme.train.rollout_script import RolloutScript

SHIPPED = Path(__file__).resolve().parents[2] / "train" / "examples" / "data" / "rl_script.json"


def test_the_kth_rollout_of_a_prompt_replays_trajectory_k_mod_n():
    script = RolloutScript(SHIPPED)
    trajectories = json.loads(SHIPPED.read_text(encoding="utf-8"))["trajectories"]
    batch = ["shapes_red"] * 5 + ["shapes_green"] * 2
    assigned = script.assign(batch)
    red, green = trajectories["shapes_red"], trajectories["shapes_green"]
    assert assigned == [red[0], red[1], red[2], red[3], red[0], green[0], green[1]]
    assigned[0].append("changed")  # callers get copies: the next batch replays the file's text
    assert script.assign(["shapes_red"])[0] == red[0]


def test_a_single_trajectory_script_serves_every_rollout(readme_script: Path):
    segments = json.loads(readme_script.read_text(encoding="utf-8"))["segments"]
    assert RolloutScript(readme_script).assign(["a", "b"]) == [segments, segments]


def test_rollout_script_errors_name_the_problem(tmp_path: Path):
    with pytest.raises(ConfigError, match="has no trajectories for item 'cat'.*'shapes_green', 'shapes_red'"):
        RolloutScript(SHIPPED).assign(["cat"])
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"trajectories": {"x": [["ok"], []]}}), encoding="utf-8")
    with pytest.raises(ConfigError, match="trajectories of 'x' must be a non-empty list of lists of text segments"):
        RolloutScript(bad)
    with pytest.raises(ConfigError, match="cannot read rollout script"):
        RolloutScript(tmp_path / "missing.json")
