"""The package as users get it: a wheel and an sdist built from the tree, the wheel installed into a
fresh venv outside the repository, its commands run from another directory.

The fresh venv borrows the test venv's third-party packages through a .pth line (torch and the rest
are not downloaded again), but not mlsm: the editable install's hook is a .pth file of that
site-packages, and a path listed in a .pth is not itself scanned for .pth files.
"""

import subprocess
import sys
import sysconfig
import tarfile
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    # No --wheel/--sdist: build makes the sdist, then the wheel from the unpacked sdist in a temporary
    # folder, so the wheel proves the sdist complete and nothing is built inside the repository.
    proc = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(ROOT)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def test_the_wheel_holds_the_packages_under_their_installed_names(dist):
    (wheel,) = dist.glob("mlsm-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for module in ("mlsm/cli.py", "mlsm/core/config.py", "mlsm/pipeline/extract.py", "mlsm/pipeline/active_set.py",
                   "mlsm/trainer/train.py"):
        assert module in names, module
    assert not [n for n in names if n.startswith(("pipeline/", "trainer/", "tests/", "bench/"))]
    assert any(n.endswith("entry_points.txt") for n in names)


def test_the_sdist_holds_the_repository_layout(dist):
    (sdist,) = dist.glob("mlsm-*.tar.gz")
    names = tarfile.open(sdist).getnames()
    for path in ("pyproject.toml", "README.md", "pipeline/extract.py", "trainer/train.py", "mlsm/core/config.py"):
        assert any(n.endswith("/" + path) for n in names), path


def test_the_wheel_installs_into_a_fresh_venv_and_its_commands_run_elsewhere(dist, tmp_path):
    (wheel,) = dist.glob("mlsm-*.whl")
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    py = env_dir / "bin" / "python"
    site = Path(subprocess.check_output([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                        text=True).strip())
    (site / "borrowed_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    proc = subprocess.run([py, "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = subprocess.run([py, "-c", "import mlsm.pipeline.extract as m, mlsm.trainer.train; print(m.__file__)"],
                           cwd=elsewhere, capture_output=True, text=True)
    assert where.returncode == 0, where.stderr[-3000:]
    assert Path(where.stdout.strip()).is_relative_to(site), where.stdout  # the wheel's copy, not the repository
    for args in (["--help"], ["corpus", "--help"], ["extract", "--help"]):
        run = subprocess.run([env_dir / "bin" / "mlsm", *args], cwd=elsewhere, capture_output=True, text=True)
        assert run.returncode == 0, run.stderr[-3000:]
        assert "Usage: mlsm" in run.stdout
    assert "--worker-index" in run.stdout and "--precision" in run.stdout  # options built from the configs
