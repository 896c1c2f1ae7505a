"""``pyro-sgmcmc continual-lora --quick`` end to end (tiny random Llama, three books),
and the committed records of the full run."""

from __future__ import annotations

import json
import math
import os

import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")

from pyro_sgmcmc.cli import main  # noqa: E402
from pyro_sgmcmc.experiments.continual_lora import METHODS  # noqa: E402

RESULTS = os.path.join(os.path.dirname(__file__), "..", "docs", "results", "continual_lora")


def _check_grid(rows, books, episodes):
    for m in METHODS:
        mine = [r for r in rows if r["method"] == m]
        if m == "single-episode AdamW":
            assert sorted((r["episode"], r["book_index"]) for r in mine) == [
                (j + 1, j) for j in range(books)
            ]
        else:  # every episode (0 = pretrained) x every book
            assert len(mine) == (episodes + 1) * books
            assert {(r["episode"], r["book_index"]) for r in mine} == {
                (t, j) for t in range(episodes + 1) for j in range(books)
            }
        assert all(math.isfinite(r["test_loss"]) and r["test_loss"] > 0 for r in mine)
    # episode 1 is one fit for the three online/offline methods (same data, prior, shuffles)
    first = {
        r["method"]: r["test_loss"] for r in rows if r["episode"] == 1 and r["book_index"] == 0
    }
    assert first["online AdamW"] == pytest.approx(first["online Laplace"], rel=1e-6)
    assert first["online AdamW"] == pytest.approx(first["offline AdamW"], rel=1e-6)


def test_quick_end_to_end(tmp_path, capsys):
    assert main(["continual-lora", "--quick", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "Figure 6" in out
    with open(tmp_path / "continual_lora.json") as f:
        data = json.load(f)
    assert data["settings"]["quick"] is True
    _check_grid(data["rows"], books=3, episodes=3)
    for name in ("continual_lora.csv", "continual_lora_books.png", "continual_lora_relative.png"):
        assert (tmp_path / name).stat().st_size > 0


@pytest.mark.skipif(
    not os.path.exists(os.path.join(RESULTS, "continual_lora.json")),
    reason="the full run's records are not committed",
)
def test_committed_full_run_records():
    with open(os.path.join(RESULTS, "continual_lora.json")) as f:
        data = json.load(f)
    assert data["settings"]["quick"] is False
    books = len(data["settings"]["books"])
    assert books >= 5
    _check_grid(data["rows"], books=books, episodes=books)
