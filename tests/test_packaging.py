"""The wheel a user installs contains every module and data file of the package."""

import os
import shutil
import subprocess
import sys
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# repository folder -> the package it becomes in the wheel (pyproject.toml's package-dir)
FOLDERS = {"sglang_sawint4": "sglang_sawint4", "kernels": "sglang_sawint4/kernels", "patches": "sglang_sawint4/patches"}


def _repo_files():
    """Every module and shipped data file under the package folders, by its path in the wheel."""
    out = set()
    for folder, target in FOLDERS.items():
        for dirpath, _, names in os.walk(os.path.join(ROOT, folder)):
            if "__pycache__" in dirpath:
                continue
            rel = os.path.relpath(dirpath, os.path.join(ROOT, folder))
            for n in names:
                if n.endswith((".py", ".txt")):
                    out.add(os.path.normpath(os.path.join(target, rel, n)).replace(os.sep, "/"))
    return out


def test_wheel_contains_every_module_and_data_file(tmp_path):
    # built from a clean copy: setuptools reuses a build/ folder left in the checkout
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "build", "*.egg-info")
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(os.path.join(ROOT, name), src / name)
    for folder in FOLDERS:
        shutil.copytree(os.path.join(ROOT, folder), src / folder, ignore=ignore)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(src)], check=True, capture_output=True, text=True)
    (wheel,) = [p for p in os.listdir(tmp_path) if p.endswith(".whl")]
    with zipfile.ZipFile(tmp_path / wheel) as z:
        names = set(z.namelist())
        entry_points = next(z.read(n).decode() for n in names if n.endswith("entry_points.txt"))
    missing = sorted(_repo_files() - names)
    assert not missing, f"not in the wheel: {missing}"
    assert "sglang_sawint4/data/calibration.txt" in names
    assert "sawint4 = sglang_sawint4.plugin:load" in entry_points  # SGLang's workers find the patches


def test_the_package_is_the_one_library():
    """No code reaches another file through sys.path: scripts and tests import the package."""
    offenders = []
    for folder in (*FOLDERS, "scripts", "tests"):
        for dirpath, _, names in os.walk(os.path.join(ROOT, folder)):
            for n in names:
                if n.endswith((".py", ".sh")):
                    path = os.path.join(dirpath, n)
                    text = open(path).read()
                    if "sys.path" + ".insert" in text:
                        offenders.append(os.path.relpath(path, ROOT))
    assert offenders == []
    scripts = [n for n in os.listdir(os.path.join(ROOT, "scripts")) if n.endswith(".py")]
    assert scripts == []  # every tool is python -m sglang_sawint4.<tool>
