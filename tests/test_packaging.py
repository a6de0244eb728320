"""A plain ``pip install`` of the wheel is enough for the library and the ``robustkd`` command.

The wheel is built from a copy of this tree. Its declared dependencies are checked against what
``robustkd/`` imports, and it is installed WITHOUT extras into a new virtual environment that sees
nothing of the development one except torch and torchvision (and what torch itself requires:
CUDA libraries, triton, sympy, …), exposed through a ``.pth`` file because installing them again
would copy gigabytes. Everything else the wheel declares, pip installs from the configured package
index; ``robustkd compare`` then runs there from a folder outside the checkout, on the teacher
shipped inside the wheel.
"""

from __future__ import annotations

import ast
import email.parser
import hashlib
import importlib.metadata as md
import json
import os
import re
import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.conftest import ROOT

TEACHER = "default_teacher.safetensors"
# the dashboard's UI toolkit: the library never imports it, and a plain install does not pull it
DASHBOARD_ONLY = {"streamlit"}
# what a plain copy of the tree leaves out: build outputs, caches, run folders, the venv
_SKIP_TOP = {".venv", ".git", "build", "dist", "runs", "test-artifacts", "node_modules"}
_SKIP_ANY = {"__pycache__", ".pytest_cache", ".ruff_cache", ".hypothesis", ".mypy_cache"}
# what pip prints when it cannot reach a package index (then the install test skips)
_OFFLINE = re.compile(
    r"NewConnectionError|Failed to establish a new connection|Temporary failure in name "
    r"resolution|Name or service not known|Network is unreachable|Max retries exceeded|"
    r"ConnectTimeoutError|ReadTimeoutError|ProxyError|SSLError|Could not fetch URL"
)


def _copy_ignore(folder: str, names: list[str]) -> set[str]:
    skip = {n for n in names if n in _SKIP_ANY or n.endswith(".egg-info")}
    if Path(folder).resolve() == ROOT:
        skip |= _SKIP_TOP & set(names)
    return skip


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel built from a clean copy of the tree (no stale build/ or egg-info of ours)."""
    base = tmp_path_factory.mktemp("packaging")
    src = base / "src"
    shutil.copytree(ROOT, src, ignore=_copy_ignore, symlinks=True)
    out = base / "wheel"
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation"]
    proc = subprocess.run(
        [*cmd, "--disable-pip-version-check", "-q", str(src), "-w", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (whl,) = out.glob("robustkd-*.whl")
    return whl


def _metadata(whl: Path) -> email.message.Message:
    with zipfile.ZipFile(whl) as zf:
        (name,) = [n for n in zf.namelist() if n.endswith(".dist-info/METADATA")]
        return email.parser.Parser().parsestr(zf.read(name).decode())


def _core_requirements(whl: Path) -> dict[str, Requirement]:
    """Requires-Dist without an extra: what a plain ``pip install`` brings."""
    reqs = [Requirement(r) for r in _metadata(whl).get_all("Requires-Dist") or []]
    return {
        canonicalize_name(r.name): r
        for r in reqs
        if r.marker is None or "extra" not in str(r.marker)
    }


def _library_imports() -> dict[str, set[str]]:
    """Third-party top-level modules that ``robustkd/`` imports (lazy imports included) → files."""
    found: dict[str, set[str]] = {}
    for path in sorted((ROOT / "robustkd").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top != "robustkd" and top not in sys.stdlib_module_names:
                    found.setdefault(top, set()).add(str(path.relative_to(ROOT)))
    return found


def _distributions_of_imports() -> dict[str, set[str]]:
    """Distribution (canonical name) → the library files importing it, from the dev venv."""
    owners = md.packages_distributions()
    by_dist: dict[str, set[str]] = {}
    for module, files in _library_imports().items():
        dists = owners.get(module)
        assert dists, (
            f"{module} (imported by {', '.join(sorted(files))}) is not installed here: add the "
            "distribution that provides it to pyproject.toml and requirements.txt"
        )
        for dist in dists:
            by_dist.setdefault(canonicalize_name(dist), set()).update(files)
    return by_dist


def test_wheel_holds_the_library_and_the_shipped_teacher_only(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        packaged = zf.read(f"robustkd/_assets/{TEACHER}")
    tops = {n.split("/")[0] for n in names}
    assert tops == {"robustkd", next(t for t in tops if t.endswith(".dist-info"))}, tops
    for folder in ("app", "pages", "tests", "assets", "bench"):
        assert not any(n.startswith(folder + "/") for n in names), folder
    shipped = (ROOT / "assets" / TEACHER).read_bytes()
    assert hashlib.sha256(packaged).digest() == hashlib.sha256(shipped).digest()
    # every module of the library made it in (the package list in pyproject.toml is explicit)
    sources = {p.relative_to(ROOT).as_posix() for p in (ROOT / "robustkd").rglob("*.py")}
    assert sources <= set(names), sorted(sources - set(names))


def test_declared_dependencies_match_the_library_imports(wheel: Path) -> None:
    core = _core_requirements(wheel)
    imported = _distributions_of_imports()
    dashboard = sorted(DASHBOARD_ONLY & set(imported))
    assert not dashboard, f"the library imports {dashboard}: {imported.get(dashboard[0])}"
    missing = {d: sorted(f) for d, f in imported.items() if d not in core}
    assert not missing, f"imported by the library, not a dependency of a plain install: {missing}"
    unused = sorted(set(core) - set(imported))
    assert not unused, f"declared but never imported by robustkd/: {unused}"
    assert "plotly" in core  # robustkd compare writes Plotly figures
    assert not DASHBOARD_ONLY & set(core), "the dashboard's toolkit is an extra, not core"
    extras = _metadata(wheel).get_all("Provides-Extra") or []
    assert "app" in extras


def test_requirements_txt_installs_every_core_dependency(wheel: Path) -> None:
    pinned = set()
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            pinned.add(canonicalize_name(Requirement(line).name))
    assert set(_core_requirements(wheel)) <= pinned
    assert pinned >= {"torch", "torchvision", "streamlit"}


# ---- a new virtual environment with the plain wheel -------------------------------------------


def _closure(roots: list[str]) -> set[str]:
    """Installed distributions that ``roots`` need (markers and requested extras evaluated)."""
    seen: dict[str, set[str]] = {}
    todo: list[tuple[str, frozenset[str]]] = [(r, frozenset()) for r in roots]
    while todo:
        name, extras = todo.pop()
        dist = md.distribution(name)
        key = canonicalize_name(dist.metadata["Name"])
        new = ({""} | set(extras)) - seen.get(key, set())
        if not new:
            continue
        seen.setdefault(key, set()).update(new)
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in new):
                todo.append((req.name, frozenset(req.extras)))
    return set(seen)


def _expose(dists: set[str], folder: Path) -> None:
    """Symlink exactly these installed distributions (code and .dist-info) into ``folder``."""
    folder.mkdir()
    for name in sorted(dists):
        dist = md.distribution(name)
        if not dist.files:
            pytest.skip(f"{name} was installed without a RECORD: cannot tell its files apart")
        base = Path(dist.locate_file(""))
        tops = {Path(str(f)).parts[0] for f in dist.files} - {"..", "__pycache__"}
        for top in tops:
            link = folder / top
            if not link.exists() and (base / top).exists():
                link.symlink_to(base / top)


@pytest.fixture(scope="module")
def plain_env(wheel: Path, tmp_path_factory: pytest.TempPathFactory):
    """A new venv with the wheel installed without extras; removed afterwards (a few 100 MB)."""
    base = tmp_path_factory.mktemp("plain-install")
    exposed = base / "torch-only"
    # torchvision alone: its numpy and pillow must come from the wheel's own declarations
    _expose(_closure(["torch"]) | {"torchvision"}, exposed)
    env_dir = base / "venv"
    venv.EnvBuilder(with_pip=False, symlinks=True).create(env_dir)
    python = env_dir / "bin" / "python"
    site = subprocess.check_output(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True
    ).strip()
    (Path(site) / "torch_from_the_dev_env.pth").write_text(f"{exposed}\n")
    pip = [sys.executable, "-m", "pip", "--python", str(python), "--disable-pip-version-check"]
    try:
        proc = subprocess.run(
            [*pip, "install", "--no-input", "--no-compile", "--retries", "2", str(wheel)],
            capture_output=True,
            text=True,
            timeout=600,
        )
        log = proc.stdout + proc.stderr
        if proc.returncode != 0 and _OFFLINE.search(log):
            pytest.skip(f"no package index reachable for the wheel's dependencies: {log[-600:]}")
        assert proc.returncode == 0, log
        check = subprocess.run([*pip, "check"], capture_output=True, text=True, timeout=120)
        assert check.returncode == 0, check.stdout + check.stderr
        yield python
    finally:
        shutil.rmtree(env_dir, ignore_errors=True)


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["PYTHONNOUSERSITE"] = "1"
    return env


def test_plain_install_runs_compare_on_the_packaged_teacher(
    plain_env: Path, tmp_path: Path
) -> None:
    """What a user gets from ``pip install robustkd``: the whole library imports (lazy imports
    too), no top-level ``app`` and no Streamlit, and ``robustkd compare`` writes its report and
    figures, from a folder outside the checkout."""
    probe = (
        "import importlib, importlib.util, pkgutil, sys\n"
        "import robustkd\n"
        "for m in pkgutil.walk_packages(robustkd.__path__, 'robustkd.'):\n"
        "    if m.name not in ('robustkd._assets', 'robustkd.__main__'):\n"
        "        importlib.import_module(m.name)\n"
        "import captum.attr, plotly.offline, scipy.io  # robustkd's lazy imports\n"
        "assert 'streamlit' not in sys.modules, 'the library imported streamlit'\n"
        "assert importlib.util.find_spec('app') is None, 'a top-level app package is installed'\n"
        "from robustkd.models.checkpoints import DEFAULT_TEACHER\n"
        "print(DEFAULT_TEACHER)\n"
    )
    proc = subprocess.run(
        [plain_env, "-c", probe],
        cwd=tmp_path,
        env=_clean_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    teacher = Path(proc.stdout.strip().splitlines()[-1])
    env_dir = plain_env.parent.parent.resolve()
    assert teacher.is_file() and env_dir in teacher.resolve().parents, teacher
    assert teacher.resolve().parent.name == "_assets" and ROOT not in teacher.resolve().parents

    out = tmp_path / "run"
    robustkd = plain_env.parent / "robustkd"
    cmd = [str(robustkd), "compare", "--preset", "fashion-badnets-quick", "--methods", "scratch"]
    cmd += ["--epochs", "1", "--distill-size", "200", "--trusted-size", "50", "--test-size", "100"]
    proc = subprocess.run(
        [*cmd, "--device", "cpu", "--quiet", "--out", str(out)],
        cwd=tmp_path,
        env=_clean_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    config = json.loads((out / "config.json").read_text())
    assert Path(config["teacher"]) == teacher  # the packaged one: no --teacher given
    assert (out / "report.json").is_file() and (out / "report.md").is_file()
    figures = sorted(p.name for p in (out / "figures").glob("*.html"))
    assert figures and (out / "figures" / "plotly.min.js").is_file(), figures
