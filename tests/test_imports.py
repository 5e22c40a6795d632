"""Importing wsr_med changes nothing global: a light top-level import, no MLflow or matplotlib imported by the
networks and data, no matplotlib backend switch, no environment edits."""

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

import wsr_med


def python(code: str, **env: str) -> None:
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, **env})
    assert result.returncode == 0, result.stderr[-3000:]


def test_import_wsr_med_loads_nothing_heavy():
    python("import sys, wsr_med\n"
           "loaded = {'torch', 'monai', 'mlflow', 'matplotlib'} & {m.split('.')[0] for m in sys.modules}\n"
           "assert not loaded, loaded")


ARROWS = {  # what each room may import (DESIGN: networks and data know nothing of MLflow, plots or the bundle)
    "networks": {"torch", "monai", "numpy"},
    "data": {"torch", "monai", "numpy", "pydicom", "PIL", "scipy", "sklearn", "nibabel"},
    "runs.py": {"torch", "filelock"},
}


@pytest.mark.parametrize("room", sorted(ARROWS))
def test_imports_follow_the_design_arrows(room):
    """``import monai`` itself loads mlflow, ignite and matplotlib (MONAI's own eager imports); wsr_med's
    networks, data and run folder add none of their own."""
    root = Path(wsr_med.__file__).parent
    files = [root / room] if room.endswith(".py") else sorted((root / room).glob("*.py"))
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else [])
            for name in names:
                top = name.split(".")[0]
                assert top in ARROWS[room] | {"wsr_med", "__future__"} or top in sys.stdlib_module_names, f"{path.name}: {name}"
                if top == "wsr_med":
                    assert name.split(".")[1] in {"networks", "data", "errors", "files", "settings"}, f"{path.name}: {name}"


def test_nothing_below_the_command_imports_it():
    """The command (cli.py) sits on top: the pipelines and workflows it calls never import it back."""
    root = Path(wsr_med.__file__).parent
    for path in [*root.glob("pipelines/*.py"), *root.glob("workflows/*.py"), *root.glob("handlers/*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                assert node.module != "wsr_med.cli", f"{path.relative_to(root)} imports wsr_med.cli"
            if isinstance(node, ast.Import):
                assert all(a.name != "wsr_med.cli" for a in node.names), f"{path.relative_to(root)} imports wsr_med.cli"


def test_bundle_configs_reach_every_subpackage_through_one_import():
    """Every ``wsr_med.<module>.<name>`` the bundle configs call resolves after ``import wsr_med`` alone (the configs
    import nothing else of the package)."""
    import re

    from wsr_med.workflows import BUNDLE

    text = "".join(p.read_text() for p in (BUNDLE / "configs").glob("*.json"))
    names = sorted(set(re.findall(r"wsr_med(?:\.[A-Za-z_]\w*)+", text)))
    assert len(names) > 10, names
    python("import wsr_med\n" + "".join(f"assert callable({n}) or isinstance({n}, str), '{n}'\n" for n in names))


@pytest.mark.parametrize("backend", ["pdf", "svg"])
def test_plots_leave_matplotlib_backend_and_environment_alone(tmp_path, backend):
    python("import os, matplotlib, monai, mlflow  # their own import-time settings are theirs\n"
           "before, env = matplotlib.get_backend(), dict(os.environ)\n"
           "from wsr_med.metrics import plot_reliability\n"
           "from wsr_med.tracking import check_reachable, sqlite_uri\n"
           f"plot_reliability({{'reliability': {{'count': [1, 1], 'accuracy': [0.2, 0.9]}}, 'ece': 0.1}}, r'{tmp_path}/r.png')\n"
           f"check_reachable(sqlite_uri(r'{tmp_path}/m.db'))\n"
           "assert matplotlib.get_backend() == before, matplotlib.get_backend()\n"
           "assert dict(os.environ) == env, set(os.environ.items()) ^ set(env.items())",
           MPLBACKEND=backend)
    assert (tmp_path / "r.png").stat().st_size > 1000
