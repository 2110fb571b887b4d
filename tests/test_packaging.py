"""`python -m build` makes an sdist and a wheel that install and run, away from the checkout.

The checkout's files (those git tracks or would track) are copied aside and built
as `python -m build` builds them: the sdist first, then the wheel from the
unpacked sdist, so a file missing from the sdist breaks the wheel too. The wheel
goes into a fresh virtual environment that sees this interpreter's packages
(torch and the rest, nothing downloaded) but not parafill itself, and its
`parafill` command completes a line with the embedded model from another folder.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# parafill's own top-level names: the environment under test must get them from the wheel only.
OWN = {"lsp_server", "denoiser", "fim", "kernels", "training", "tools", "team_engine"}


def run(*args, **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=240, **kwargs)
    assert done.returncode == 0, f"{args}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def copy_of_the_checkout(dest: Path) -> Path:
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=REPO, capture_output=True, timeout=60)
    if listed.returncode != 0:
        pytest.skip("needs a git checkout to know which files are the project's")
    for name in filter(None, listed.stdout.decode().split("\0")):
        source = REPO / name
        if source.is_file():  # tracked but deleted in the working tree: not part of it now
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    return dest


def environment_without_parafill(venv: Path, packages: Path) -> Path:
    """A venv whose only extra path is a folder of links to this interpreter's packages, parafill's left out."""
    run(sys.executable, "-m", "venv", "--without-pip", venv)
    packages.mkdir()
    for folder in {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}:
        for entry in Path(folder).iterdir():
            name = entry.name
            if (name.lower().startswith(("parafill", "__editable__")) or name.endswith((".pth", ".egg-link"))
                    or name.split(".")[0] in OWN or (packages / name).exists()):
                continue
            (packages / name).symlink_to(entry)
    python = venv / "bin" / "python"
    site = run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip()
    (Path(site) / "host-packages.pth").write_text(f"{packages}\n", encoding="utf-8")
    return python


def test_the_built_wheel_installs_and_completes_with_the_embedded_model(tmp_path):
    source = copy_of_the_checkout(tmp_path / "src")
    dist = tmp_path / "dist"
    # --no-isolation: the build backend of this environment (the test extra has it), nothing downloaded.
    run(sys.executable, "-m", "build", "--no-isolation", "--outdir", dist, source)
    sdists, wheels = sorted(dist.glob("parafill-*.tar.gz")), sorted(dist.glob("parafill-*-py3-none-any.whl"))
    assert len(sdists) == 1 and len(wheels) == 1, sorted(p.name for p in dist.iterdir())

    python = environment_without_parafill(tmp_path / "venv", tmp_path / "host-packages")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "PIP_"))}
    env.update(PYTHONNOUSERSITE="1", OMP_NUM_THREADS="1")
    # pip checks the wheel's dependencies against what the environment sees; --no-index: no downloads.
    run(sys.executable, "-m", "pip", "--python", python, "install", "--no-index", "--no-cache-dir", "-q",
        wheels[0], env=env)

    work = tmp_path / "elsewhere"
    work.mkdir()
    where = run(python, "-c", "import lsp_server, denoiser; print(lsp_server.__file__); print(denoiser.__file__)",
                cwd=work, env=env).stdout.split()
    assert all(Path(p).is_relative_to(tmp_path / "venv") for p in where), where
    (work / "greet.py").write_text('def greet(name):\n    return "Hello, " + \n', encoding="utf-8")
    parafill = python.parent / "parafill"
    done = run(parafill, "complete", "greet.py:2:24", "--device", "cpu", "--min-confidence", "0", "--json",
               cwd=work, env=env)
    result = json.loads(done.stdout)
    assert result["model"] == "default_model" and result["device"] == "cpu"
    assert isinstance(result["raw"], str) and result["steps"] >= 1  # the model ran
