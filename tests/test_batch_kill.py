"""Killing `thinklab batch` kills its work: no pool worker or Jupyter kernel outlives it.

A toy notebook waits for a release file, so the sweep can be SIGKILLed mid-run. Every
process the sweep starts inherits a unique marker in its environment; after the kill,
none may be left within a few seconds. The rerun then executes every set again and its
index points at its own executions, not at notebooks an orphan went on to write.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import nbformat
import polars as pl
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]

PARAMETERS = '''tag = "x"  # set label
release = ""  # the cell below waits until this file exists
'''
BODY = '''import os, time
from pathlib import Path
Path(release).with_name(f"{tag}.started").write_text(str(os.getpid()))
deadline = time.time() + 120
while not Path(release).exists() and time.time() < deadline:
    time.sleep(0.1)
worker = os.getppid()
batch = int(open(f"/proc/{worker}/stat").read().rsplit(")", 1)[1].split()[1])
print(f"kernel {os.getpid()} worker {worker} batch {batch}")
'''

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not sys.platform.startswith("linux"),
                                                     reason="the parent-death signal and /proc are Linux's")]


def _marked(marker: str) -> dict[int, str]:
    """pid -> command line of every live process whose environment holds `marker`."""
    found = {}
    needle = marker.encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                continue  # a zombie is dead; only its exit status waits for a parent
            if needle in (entry / "environ").read_bytes():
                found[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, IndexError):
            continue
    return found


def _wait(condition, timeout: float, step: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(step)
    return condition()


@pytest.fixture
def sweep(tmp_path, monkeypatch):
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    params = nbformat.v4.new_code_cell(PARAMETERS)
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell(BODY)]
    nbformat.write(nb, tmp_path / "sleepy.ipynb")
    release = tmp_path / "flags" / "release"
    release.parent.mkdir()
    path = tmp_path / "sleepy.yaml"
    path.write_text(yaml.safe_dump({"notebook": "sleepy.ipynb", "parameters": {"release": str(release)},
                                    "sets": [{"name": "a", "tag": "a"}, {"name": "b", "tag": "b"}]}))
    marker = f"THINKLAB_KILL_TEST={uuid.uuid4().hex}"
    env = {**os.environ, "THINKLAB_KILL_TEST": marker.split("=", 1)[1], "THINKLAB_DATA": str(tmp_path / "data"),
           "THINKLAB_FIGURES": str(tmp_path / "figures"),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "lib"), os.environ.get("PYTHONPATH")]))}
    yield path, release, marker, env
    for pid in _marked(marker):  # only if the test failed: never leave its processes behind
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _batch(path: Path, env: dict, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "thinklab.cli", "batch", str(path), "--workers", "2"],
                            cwd=path.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def test_sigkill_of_batch_leaves_no_worker_or_kernel_and_rerun_owns_its_index(sweep):
    path, release, marker, env = sweep
    out = path.parent / "out" / "sleepy"
    first = _batch(path, env)
    started = [release.with_name(f"{tag}.started") for tag in ("a", "b")]
    assert _wait(lambda: all(f.exists() for f in started), 180), first.stderr.read() if first.poll() is not None else "no start"
    work = _marked(marker)
    kernels = [pid for pid, cmd in work.items() if "ipykernel" in cmd]
    assert len(kernels) == 2 and len(work) >= 5, work  # the batch, two workers, two kernels (and helpers)

    # a second batch of the same sweep is refused while the first lives
    second = _batch(path, env)
    _, err = second.communicate(timeout=60)
    assert second.returncode == 2 and err.count("\n") == 1 and "in use by a running `thinklab batch`" in err, err

    os.kill(first.pid, signal.SIGKILL)
    first.wait(timeout=10)
    assert _wait(lambda: not _marked(marker), 5), f"survived the batch: {_marked(marker)}"
    leftovers = list(out.glob(".*.tmp-*"))
    assert leftovers, "the killed executions left no partial notebook to clean up"

    # the rerun executes both sets itself; an orphan released now would race it
    release.write_text("go")
    rerun = _batch(path, env)
    stdout, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err
    index = pl.read_parquet(out / "index.parquet")
    assert index["status"].to_list() == ["ok", "ok"] and index["action"].to_list() == ["ran", "ran"]
    assert index["runs"].to_list() == [1, 1]  # the killed invocation finished nothing
    for row in index.iter_rows(named=True):
        executed = nbformat.read(row["notebook"], as_version=4)
        printed = "".join(o.get("text", "") for c in executed.cells if c.cell_type == "code" for o in c.get("outputs", []))
        assert f"batch {rerun.pid}" in printed, printed  # this execution, not an orphan's
        assert json.loads(row["parameters"])["tag"] == row["set"]
    assert not list(out.glob(".*.tmp-*")), "temporary files of the killed run were not removed"
    assert not _marked(marker)
