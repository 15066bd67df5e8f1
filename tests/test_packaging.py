"""Packaging checks: what an editable install hides but a wheel would lose."""

from __future__ import annotations

import fnmatch
import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PACKAGE_DIRS: dict[str, str] = PYPROJECT["tool"]["setuptools"]["package-dir"]


def _source_dir(package: str) -> Path:
    """Maps a dotted package name to its folder through [tool.setuptools.package-dir]."""
    parts = package.split(".")
    for cut in range(len(parts), 0, -1):
        prefix = ".".join(parts[:cut])
        if prefix in PACKAGE_DIRS:
            return ROOT / PACKAGE_DIRS[prefix] / Path(*parts[cut:])
    return ROOT / Path(*parts)


def _packages_on_disk() -> set[str]:
    found = set()
    for top, folder in PACKAGE_DIRS.items():
        base = ROOT / folder
        for init in base.rglob("__init__.py"):
            rel = init.parent.relative_to(base)
            found.add(".".join([top, *rel.parts]))
    return found


def test_packaging_lists_every_package_on_disk() -> None:
    listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
    missing = _packages_on_disk() - listed
    assert not missing, (
        f"add these to [tool.setuptools] packages in pyproject.toml or a wheel will lack them: {missing}"
    )


def test_packaging_listed_packages_exist() -> None:
    for package in PYPROJECT["tool"]["setuptools"]["packages"]:
        assert (_source_dir(package) / "__init__.py").is_file(), f"{package} is listed but has no __init__.py"


def _package_files(folder: Path) -> list[Path]:
    """Non-Python files of one package, descending into plain folders but not into sub-packages or caches."""
    files = []
    for path in folder.iterdir():
        if path.is_dir():
            if path.name != "__pycache__" and not (path / "__init__.py").exists():
                files.extend(_package_files(path))
        elif path.suffix not in (".py", ".pyc"):
            files.append(path)
    return files


def test_packaging_data_files_match_package_data_patterns() -> None:
    """Every non-Python file inside a package must be matched by package-data, or installed copies lose it."""
    patterns: dict[str, list[str]] = PYPROJECT["tool"]["setuptools"]["package-data"]
    unmatched = []
    for package in PYPROJECT["tool"]["setuptools"]["packages"]:
        folder = _source_dir(package)
        globs = patterns.get(package, [])
        for path in _package_files(folder):
            rel = path.relative_to(folder).as_posix()
            if not any(fnmatch.fnmatch(rel, g) for g in globs):
                unmatched.append(str(path.relative_to(ROOT)))
    assert not unmatched, f"files a wheel would leave out (extend [tool.setuptools.package-data]): {unmatched}"


def test_packaging_no_generic_top_level_packages_installed() -> None:
    """`sandbox`, `train` and `ui` install only under the thyme name."""
    code = "import importlib.util as u; print([n for n in ('sandbox', 'train', 'ui') if u.find_spec(n)])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", check=True)
    assert out.stdout.strip() == "[]"


def test_packaging_import_thyme_does_not_import_torch() -> None:
    code = "import sys, thyme; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", check=True)
    assert out.stdout.strip() == "False"


# `pip install` of a distribution name, with or without extras: `pip install 'NAME[server]'`, `pip install NAME`.
_PIP_INSTALL_NAME = re.compile(r"""pip install\s+(?:-U\s+)?['"]?([A-Za-z][\w.-]*)(\[[\w,]+\])?""")
# Files a user reads for install lines, and source files whose errors tell users what to install.
_INSTALL_LINE_FILES = ["README.md", "docs/*.md", "thyme/**/*.py", "sandbox/**/*.py", "train/**/*.py", "ui/**/*.py"]
# Other projects the docs tell users to install by their own names.
_OTHER_PROJECTS = {
    "torch", "lmms-eval", "filelock", "matplotlib", "math-verify", "vllm", "sglang", "flash-attn", "chromium",
}  # fmt: skip


def _install_lines() -> list[tuple[str, str]]:
    found = []
    for pattern in _INSTALL_LINE_FILES:
        for path in sorted(ROOT.glob(pattern)):
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
                for match in _PIP_INSTALL_NAME.finditer(line):
                    found.append((f"{path.relative_to(ROOT)}:{number}", match.group(1)))
    return found


def test_packaging_distribution_name_is_not_the_taken_pypi_name() -> None:
    """`thyme` on PyPI is an unrelated hydrodynamics package: `pip install 'thyme[server]'` installs THAT."""
    name = PYPROJECT["project"]["name"]
    assert name != "thyme"
    extras = PYPROJECT["project"]["optional-dependencies"]
    self_refs = [dep for deps in extras.values() for dep in deps if dep.split("[")[0] in ("thyme", name)]
    assert self_refs and all(dep.startswith(name + "[") for dep in self_refs), self_refs


def test_packaging_docs_install_lines_name_the_distribution() -> None:
    """Every `pip install NAME` line in the docs and in error hints names our distribution or another project."""
    name = PYPROJECT["project"]["name"]
    lines = _install_lines()
    ours = [where for where, installed in lines if installed == name]
    wrong = [f"{where}: {installed}" for where, installed in lines if installed not in {name, *_OTHER_PROJECTS}]
    assert not wrong, f"install lines that do not name {name!r} (or a known other project): {wrong}"
    assert len(ours) >= 5, ours  # README, docs and the server/openai/ui hints
