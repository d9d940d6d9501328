"""The README tells the truth: its "own run" walkthrough runs as written, it stays short, and no pointer is dead."""

from __future__ import annotations

import importlib.util
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from flows.cli import main
from storage.sql import query
from storage.store import LineageStore
from tests.tasks.helpers import copy_run, write_queries

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
TINY = {"DDA_PROJECTION__K_IN": "4", "DDA_PROJECTION__K_OUT": "4", "DDA_INDEXING__PROGRESS": "false"}


def _spec_module(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


check_links = _spec_module("check_links", ROOT / "scripts" / "check_links.py")


def walkthrough() -> list[str]:
    """The command lines of the README's "On your own fine-tuning run" code block."""
    section = README.read_text().split("## On your own fine-tuning run", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block, "the walkthrough has no bash block"
    return [line for line in block.group(1).splitlines() if line.strip()]


@pytest.mark.usefixtures("prefect_server")
def test_every_command_of_the_own_run_walkthrough_runs_as_written(small_world, tmp_path, monkeypatch, capsys):
    """Each line of the walkthrough, its placeholders filled with a tiny model's run, exits 0; the last one
    (``dda watch --once`` after a new checkpoint) folds that checkpoint into every output's lineage."""
    for key, value in TINY.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(tmp_path)
    run = copy_run(small_world, tmp_path / "run", steps=1)
    outputs = write_queries(tmp_path / "outputs.jsonl", n=2)  # q0 with a correction, q1 without
    fill = {"train.jsonl": small_world.train_file, "BASE": small_world.base_model, "OUTPUT_DIR": str(run),
            "outputs.jsonl": str(outputs)}  # fmt: skip
    lines = walkthrough()
    assert shlex.split(lines[0], comments=True)[0] == "export"
    assert {shlex.split(line, comments=True)[1] for line in lines[1:]} >= {"ingest", "index", "attribute", "sql",
                                                                           "report", "watch"}  # fmt: skip
    for line in lines:
        words = [fill.get(w, w) for w in shlex.split(line, comments=True)]
        if words[0] == "export":
            name, value = words[1].split("=", 1)
            monkeypatch.setenv(name, value)
            continue
        assert words[0] == "dda", line
        if words[1:3] == ["watch", "--once"]:  # training saved another checkpoint meanwhile
            store = LineageStore.open(tmp_path / "lineage" / "store")
            assert query(store, "SELECT max(n_checkpoints) AS n FROM lineage").to_pylist() == [{"n": 1}]
            last = sorted(Path(small_world.run_dir).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
            shutil.copytree(last[-1], run / last[-1].name)
        capsys.readouterr()
        assert main([*words[1:], "--quiet"]) == 0, line
        if words[1] == "sql":
            assert capsys.readouterr().out.count("\n") >= 3, line  # a header and rows
    store = LineageStore.open(tmp_path / "lineage" / "store")
    folded = query(store, "SELECT query_id, max(n_checkpoints) AS n FROM lineage GROUP BY query_id").to_pylist()
    assert sorted((r["query_id"], r["n"]) for r in folded) == [("q0", 2), ("q1", 2)]  # both fine-tuned checkpoints
    assert (tmp_path / "lineage" / "report" / "report.html").is_file()


def test_the_readme_is_short_and_keeps_both_commands():
    text = README.read_text()
    assert len(text.encode()) <= 15_000
    assert "bash scripts/setup.sh && .venv/bin/dda demo" in text
    assert "bash scripts/setup.sh && bash scripts/check.sh" in text


def test_the_repository_has_no_dead_pointer():
    assert check_links.problems(ROOT) == []


def test_a_planted_dead_link_or_missing_document_is_found(tmp_path):
    """The check can fail: a link to a missing file, an anchor with no heading, and a document named in code."""
    md = ".md"  # the planted names are spelt apart: this file must pass the check itself
    doc, gone, design = f"docs/a{md}", f"docs/gone{md}", f"DESIGN{md}"
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    (tmp_path / "docs").mkdir()
    (tmp_path / doc).write_text(f"# Title\n\n## Real heading\n\n[ok](a{md}#real-heading)\n")
    (tmp_path / f"README{md}").write_text(f"[a]({doc}) [gone]({gone}) [bad]({doc}#nowhere)\n")
    (tmp_path / "mod.py").write_text(f'"""The math of {design} section 2; see {doc}."""\n')
    found = check_links.problems(tmp_path)
    assert len(found) == 3, found
    assert any(gone in f and f.startswith("README") for f in found)
    assert any("#nowhere" in f for f in found)
    assert any(f.startswith("mod.py") and design in f for f in found)
