"""Installing patchwatch puts one top-level package on a user's import path: `patchwatch`.

The repository keeps its folders (anomaly/, flows/, tasks/, storage/); they install as
patchwatch.anomaly, patchwatch.flows, ... so that PyPI's `tasks`, `storage` or `flows`, or a user's
own `flows/` folder, neither shadow patchwatch nor are shadowed by it.
"""
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def build_wheel(tmp_path):
    # built from a copy: setuptools writes build/ beside the sources
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    for folder in ("patchwatch", "anomaly", "flows", "tasks", "storage"):
        shutil.copytree(REPO / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path / "dist"), str(source)], check=True, capture_output=True, cwd=tmp_path)
    [wheel] = (tmp_path / "dist").glob("patchwatch-*.whl")
    return wheel


def test_the_wheel_installs_one_top_level_package_that_imports_outside_the_repository(tmp_path):
    wheel = build_wheel(tmp_path)
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert top_level == {"patchwatch"}
    for subpackage in ("anomaly", "flows", "tasks", "storage"):
        assert f"patchwatch/{subpackage}/__init__.py" in names

    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, capture_output=True)
    # a user's own flows/ folder in the working directory must not shadow patchwatch's
    (tmp_path / "flows").mkdir()
    (tmp_path / "flows" / "__init__.py").write_text("raise ImportError('the user flows package')\n")
    check = ("import patchwatch.flows.fit, patchwatch.tasks.scoring, patchwatch.storage.images, "
             "patchwatch.anomaly.engine, importlib.util as u; "
             "print(patchwatch.flows.fit.__file__); print(u.find_spec('anomaly'))")
    run = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, cwd=tmp_path,
                         env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"})
    assert run.returncode == 0, run.stderr
    installed_file, anomaly_spec = run.stdout.split()[:2]
    assert installed_file.startswith(str(site))
    assert anomaly_spec == "None"  # no generic top-level 'anomaly' package was installed
