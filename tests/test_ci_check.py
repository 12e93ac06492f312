"""The CI's check of the main job's printed table against the README's (.ci/check_readme_table.py)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("check_readme_table", ROOT / ".ci" / "check_readme_table.py")
check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(check)

README = """# x

```
| benchmark | metric | sft | rl |
|---|---|---|---|
| tiny | avg@1 | 37.6% | 44.6% |
```
"""
PRINTED = """[rl] done
Held-out evaluation (tiny):
| benchmark | metric | sft | rl |
|---|---|---|---|
| tiny | avg@1 | {sft} | {rl} |
| tiny | pass@1 | {sft} | {rl} |
"""


def run(tmp_path, sft: str, rl: str, readme: str = README) -> int:
    (tmp_path / "README.md").write_text(readme)
    (tmp_path / "log").write_text(PRINTED.format(sft=sft, rl=rl))
    return check.main(str(tmp_path / "README.md"), str(tmp_path / "log"))


def test_the_readme_table_itself_passes(capsys):
    rows = check.readme_table(str(ROOT / "README.md"))
    header, table = check.parse(rows)
    assert header == ["sft", "rl"] and ("tiny", "avg@1") in table
    log = "\n".join(rows)
    assert check.parse(log.splitlines()) == (header, table)


def test_identical_figures_pass(tmp_path, capsys):
    assert run(tmp_path, "37.6%", "44.6%") == 0
    assert "figures identical" in capsys.readouterr().out


def test_other_figures_pass_with_a_note_unless_exact_is_asked(tmp_path, capsys, monkeypatch):
    assert run(tmp_path, "41.5%", "47.0%") == 0
    assert "printed 41.5% -> 47.0%, README 37.6% -> 44.6%" in capsys.readouterr().out
    monkeypatch.setenv("LAMPO_EXACT_TABLE", "1")
    assert run(tmp_path, "41.5%", "47.0%") == 1


@pytest.mark.parametrize("sft, rl", [("44.6%", "44.6%"), ("50.0%", "44.6%")])
def test_rl_not_above_sft_fails(tmp_path, capsys, sft, rl):
    assert run(tmp_path, sft, rl) == 1
    assert "is not above" in capsys.readouterr().out


def test_a_missing_row_or_other_columns_fail(tmp_path, capsys):
    assert run(tmp_path, "37.6%", "44.6%", README.replace("avg@1", "avg@8")) == 1
    assert "no row tiny / avg@8" in capsys.readouterr().out
    assert run(tmp_path, "37.6%", "44.6%", README.replace("| sft | rl |", "| base | rl |")) == 1
