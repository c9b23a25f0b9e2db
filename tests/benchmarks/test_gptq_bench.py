"""benchmarks/gptq.py: the per-layer factor comparison (on shapes divided down) and a whole model's calibration both
ways, in child processes, written as sections; the two ways must give the same int8 model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import gptq


def test_the_layers_and_a_models_calibration_are_measured_and_written(tmp_path: Path, stories_hf: Path) -> None:
    out = tmp_path / "bench.md"
    gptq.main(["--shapes", "wq, wk, wv, wo", "--divide", "32", "--rounds", "1", "--calibrate", str(stories_hf),
               "--write", str(out)])
    text = out.read_text()
    assert "## GPTQ per layer of the 7B shape divided by 32" in text
    row = next(line for line in text.splitlines() if line.startswith("| wq, wk, wv, wo (128 x 128) |"))
    assert row.count(" s |") >= 2 and "×**" in row
    assert "## GPTQ calibration of hf: layers sharing an input together or one at a time" in text
    layers = json.loads((stories_hf / "config.json").read_text())["num_hidden_layers"]
    together = next(line for line in text.splitlines() if line.startswith("| together |"))
    alone = next(line for line in text.splitlines() if line.startswith("| one at a time |"))
    assert together.split(" | ")[1] == str(4 * layers + 1) and alone.split(" | ")[1] == str(7 * layers + 1)
    assert "Both ways gave the same int8 model (hash " in text and "GPTQ's time **" in text
    assert "--write" not in text and "--divide 32" in text


def test_nothing_to_measure_is_a_usage_error() -> None:
    with pytest.raises(SystemExit):
        gptq.main(["--shapes"])
