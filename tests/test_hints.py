"""What the tool tells users to run exists: every `dvc repro <stage>` names a stage of dvc.yaml, every
`python -m <module>` a module of this project, and no comment cites a file this repository does not have."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT

STAGES = set(yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"])
SOURCES = sorted([*ROOT.glob("pipeline/**/*.py"), *ROOT.glob("stages/*.py"), ROOT / "README.md",
                  *ROOT.glob("conf/**/*.yaml"), ROOT / "pyproject.toml"])


def _text(path):
    return path.read_text()


def test_every_dvc_repro_hint_names_a_stage():
    bad = []
    for path in SOURCES:
        for name in re.findall(r"dvc repro(?: -f| --force)? ([a-z_][\w-]*)[`)]", _text(path)):
            if name not in STAGES:
                bad.append(f"{path.relative_to(ROOT)}: dvc repro {name}")
    assert not bad, f"hints that name no stage of dvc.yaml ({sorted(STAGES)}): {bad}"


def test_every_python_m_hint_names_a_module():
    bad = []
    for path in SOURCES:
        for module in re.findall(r"python3? -m ((?:pipeline|stages)[\w.]*)", _text(path)):
            rel = module.replace(".", "/")
            if not ((ROOT / f"{rel}.py").is_file() or (ROOT / rel / "__main__.py").is_file()
                    or (ROOT / rel / "__init__.py").is_file()):
                bad.append(f"{path.relative_to(ROOT)}: python -m {module}")
    assert not bad, bad


def test_commands_the_cli_advertises_exist():
    from pipeline.__main__ import main

    advertised = set()
    for path in SOURCES:
        advertised |= set(re.findall(r"(?:python -m pipeline|llama3-pipeline) ([a-z][a-z-]*[a-z])\b", _text(path)))
    for command in sorted(advertised):
        with pytest.raises(SystemExit) as e:
            main([command, "--help"])
        assert e.value.code == 0, f"`python -m pipeline {command}` is advertised but does not exist"


def test_no_comment_cites_a_file_outside_the_repository():
    cited = re.compile(r"(REFERENCE\.md|reference/[\w.-]+\.md|stack-recipes\.md|STYLE\.md)")
    bad = [f"{p.relative_to(ROOT)}: {m}" for p in [*SOURCES, *ROOT.glob("tests/*.py")] if p != ROOT / "tests/test_hints.py"
           for m in cited.findall(_text(p)) if not (ROOT / m).is_file()]
    assert not bad, bad


def test_console_script_usage_names_itself():
    out = subprocess.run([sys.executable, "-m", "pipeline", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert out.stdout.startswith("usage: python -m pipeline ")
    exe = Path(sys.executable).parent / "llama3-pipeline"  # installed beside the interpreter by `pip install -e .`
    assert exe.is_file(), "the llama3-pipeline console script is not installed (pip install -e .)"
    out = subprocess.run([str(exe), "--help"], cwd=ROOT, capture_output=True, text=True)
    assert out.stdout.startswith("usage: llama3-pipeline "), out.stdout[:200]


def test_one_line_errors_stay_one_line_when_output_is_not_a_terminal(tmp_path):
    """CI logs and DVC's output are not terminals: rich would wrap a long error at 80 columns."""
    deep = tmp_path / ("a-rather-long-directory-name-" * 4) / "params.yaml"
    out = subprocess.run([sys.executable, "-m", "pipeline", "validate", "--params", str(deep)], cwd=ROOT,
                         capture_output=True, text=True, env={"COLUMNS": "80", "PATH": "/usr/bin:/bin"})
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode == 1 and len(lines) == 1, out.stderr
    assert lines[0].startswith("error: ") and str(deep) in lines[0] and len(lines[0]) > 120
