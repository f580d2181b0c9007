"""The study notebooks in a real browser: JupyterLab on 127.0.0.1 (token auth on), headless
Chromium driven by Playwright, Run > Run All Cells, then the ipywidgets controls and the
plotly figures must be on the page, and the trace viewer at the end of each notebook must
show a sample's coloured tokens. A screenshot per notebook is kept under tmp_path.

The lab serves temporary copies of notebooks/0*_*.ipynb whose parameters are overridden
to tiny values by papermill's parameterize (the `parameters` cell stays, an
`injected-parameters` cell follows it), so a notebook that lands later is covered too.
Data and figures go to temporary folders; the materialized models are shared read-only.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytestmark = [pytest.mark.browser, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("0*_*.ipynb"))
RUN_TIMEOUT_S = float(os.environ.get("THINKLAB_BROWSER_TIMEOUT", 900))  # per notebook; minutes on an idle 2-core machine

# Tiny sizes per notebook; a notebook not listed gets GENERIC, filtered to the names it has.
TINY = {
    "01_overthinking.ipynb": {"n_problems": 1, "n_samples": 2, "budgets": [8, None], "max_tokens": 16,
                              "answer_budget": 8, "n_boot": 50, "figure_formats": ["html"]},
    "02_temperature.ipynb": {"n_problems": 1, "n_samples": 2, "temperatures": [0.0, 1.0], "ks": [1, 2],
                             "max_tokens": 16, "n_boot": 50, "figure_formats": ["html"]},
    "03_quantization.ipynb": {"n_problems": 2, "formats": ["int8-wo"], "max_tokens": 16, "n_boot": 50,
                              "figure_formats": ["html"]},
    "04_moe_sparsity.ipynb": {"n_problems": 1, "top_k_values": [8, 16], "max_tokens": 16, "n_boot": 50,
                              "figure_formats": ["html"]},
}
GENERIC = {"n_problems": 2, "n_samples": 2, "max_tokens": 16, "n_boot": 50, "figure_formats": ["html"]}
WIDGET_CONTROLS = (".widget-dropdown, .widget-slider, .widget-hslider, .widget-select-multiple, .widget-select, "
                   ".widget-toggle-buttons, .widget-radio, .widget-checkbox")
PLOTLY = ".js-plotly-plot, .plotly"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _api(base: str, token: str, path: str, method: str = "GET"):
    request = urllib.request.Request(f"{base}{path}", method=method, headers={"Authorization": f"token {token}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        body = response.read()
        return json.loads(body) if body else None


def _tiny_copy(source: Path, target: Path) -> None:
    import nbformat
    from papermill.iorw import load_notebook_node
    from papermill.parameterize import parameterize_notebook

    from thinklab.batch import notebook_parameters

    known = notebook_parameters(source)
    wanted = TINY.get(source.name, {k: v for k, v in GENERIC.items() if k in known})
    unknown = set(wanted) - set(known)
    assert not unknown, f"{source.name} no longer has parameters {unknown}; update TINY in {__file__}"
    nb = parameterize_notebook(load_notebook_node(str(source)), wanted)
    nbformat.write(nb, str(target))


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A JupyterLab server on a free port of 127.0.0.1 with a random token; always stopped."""
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} not found: install Debian's chromium (`make browser`, or apt-get install chromium)")
    pytest.importorskip("playwright", reason="playwright is not installed (pip install -e '.[dev]')")
    from thinklab import models, paths

    work = tmp_path_factory.mktemp("lab")
    root = work / "notebooks"
    root.mkdir()
    for nb in NOTEBOOKS:
        _tiny_copy(nb, root / nb.name)
    data = work / "data"
    data.mkdir()
    models.resolve("default")  # materialized once under the real data/models/ (as the other slow tests do)
    (data / "models").symlink_to(paths.models_dir(), target_is_directory=True)
    settings = work / "settings" / "@jupyterlab" / "notebook-extension"
    settings.mkdir(parents=True)
    # every cell in the DOM (no windowing), so every figure and widget can be counted
    (settings / "tracker.jupyterlab-settings").write_text(json.dumps({"windowingMode": "none"}))
    announcements = work / "settings" / "@jupyterlab" / "apputils-extension"
    announcements.mkdir(parents=True)
    (announcements / "notification.jupyterlab-settings").write_text(json.dumps({"fetchNews": "false"}))

    env = dict(os.environ, THINKLAB_DATA=str(data), THINKLAB_FIGURES=str(work / "figures"), HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", JUPYTER_CONFIG_DIR=str(work / "config"),
               JUPYTER_RUNTIME_DIR=str(work / "runtime"), PYTHONUNBUFFERED="1")
    token, port = secrets.token_hex(24), _free_port()
    base = f"http://127.0.0.1:{port}"
    log_path = work / "jupyterlab.log"
    with open(log_path, "w") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "jupyterlab", "--no-browser", "--allow-root", "--ServerApp.ip=127.0.0.1",
             f"--ServerApp.port={port}", "--ServerApp.port_retries=0", f"--ServerApp.token={token}",
             f"--ServerApp.root_dir={root}", f"--LabApp.user_settings_dir={work / 'settings'}",
             f"--LabApp.workspaces_dir={work / 'workspaces'}"],
            cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                _api(base, token, "/api/status")
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"JupyterLab did not start; log:\n{log_path.read_text()[-3000:]}")
                time.sleep(0.5)
        with pytest.raises(urllib.error.HTTPError, match="403"):  # token authentication is on
            urllib.request.urlopen(f"{base}/api/status", timeout=10)
        yield {"base": base, "token": token, "root": root, "figures": work / "figures", "log": log_path}
    finally:
        _stop(server)


def _stop(server: subprocess.Popen) -> None:
    """Stop the server and every kernel it started (they share its process group)."""
    if server.poll() is None:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(server.pid, signal.SIGKILL)  # kernels left behind by a server that did not exit cleanly
    except ProcessLookupError:
        pass
    server.wait(10)


@pytest.fixture(scope="module")
def browser(lab):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield chromium
        finally:
            chromium.close()


def _prompts(page) -> list[str]:
    return page.evaluate("""() => [...document.querySelectorAll(
        '.jp-NotebookPanel:not(.lm-mod-hidden) .jp-CodeCell .jp-InputPrompt')].map(e => e.textContent.trim())""")


def _kernel_status(page) -> str:
    return page.evaluate("""() => { const e = document.querySelector(
        '.jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook-ExecutionIndicator');
        return e ? e.getAttribute('data-status') : 'missing'; }""")


def _accept_dialogs(page) -> bool:
    """Accept any modal JupyterLab shows (e.g. "Select Kernel" for a notebook it has not seen)."""
    dialogs = page.locator(".jp-Dialog .jp-mod-accept")
    if dialogs.count() == 0:
        return False
    dialogs.first.click()
    page.wait_for_timeout(1000)
    return True


def _run_all(page) -> None:
    page.get_by_role("menuitem", name="Run", exact=True).click()
    page.get_by_role("menuitem", name="Run All Cells", exact=True).click()


def _run_all_and_wait(page, timeout_s: float, shot: Path) -> list[str]:
    """Run > Run All Cells, then wait until the kernel is idle with no cell queued or running."""
    _run_all(page)
    deadline, stable = time.monotonic() + timeout_s, 0
    while time.monotonic() < deadline:
        time.sleep(2)
        prompts, status = _prompts(page), _kernel_status(page)
        started = any(p not in ("[ ]:", "") for p in prompts)
        if not started and _accept_dialogs(page):  # a modal swallowed the click: run again
            _run_all(page)
            continue
        if started and status == "idle" and not any("*" in p for p in prompts):
            stable += 1
            if stable >= 3:  # idle over three polls: not just between two cells
                return prompts
        else:
            stable = 0
    page.screenshot(path=str(shot))
    raise AssertionError(f"Run All did not finish in {timeout_s:.0f} s; prompts {prompts}, kernel {status}")


@pytest.mark.parametrize("notebook", [nb.name for nb in NOTEBOOKS])
def test_notebook_runs_in_jupyterlab(lab, browser, notebook, tmp_path):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    try:
        page.goto(f"{lab['base']}/lab/tree/{notebook}?reset&token={lab['token']}", timeout=120_000)
        page.wait_for_selector(".jp-NotebookPanel:not(.lm-mod-hidden) .jp-CodeCell", timeout=120_000)
        page.wait_for_selector(".jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook-ExecutionIndicator[data-status='idle']",
                               timeout=180_000)  # the kernel has started
        page.wait_for_timeout(3000)
        _accept_dialogs(page)
        t0 = time.monotonic()
        prompts = _run_all_and_wait(page, RUN_TIMEOUT_S, tmp_path / f"{Path(notebook).stem}-timeout.png")
        elapsed = time.monotonic() - t0
        page.wait_for_timeout(2000)  # let the last plotly/widget views attach
        page.screenshot(path=str(tmp_path / f"{Path(notebook).stem}-end.png"))

        errors = page.evaluate("""() => [...document.querySelectorAll(
            '.jp-NotebookPanel:not(.lm-mod-hidden) .jp-OutputArea-output')]
            .map(e => e.textContent).filter(t => t.includes('Traceback (most recent call last)'))""")
        assert not errors, f"{notebook} raised:\n{errors[0][-3000:]}"
        assert all(p.startswith("[") and p[1:-2].isdigit() for p in prompts), f"cells left unexecuted: {prompts}"

        panel = page.locator(".jp-NotebookPanel:not(.lm-mod-hidden)")
        n_widgets = panel.locator(".jupyter-widgets").count()
        n_controls = panel.locator(WIDGET_CONTROLS).count()
        n_plotly = panel.locator(".js-plotly-plot").count()
        assert n_widgets > 0 and n_controls > 0, f"no ipywidgets controls rendered in {notebook}"
        assert n_plotly > 0, f"no plotly figure rendered in {notebook}"
        assert panel.locator(".js-plotly-plot .main-svg").count() > 0, "plotly figures have no drawn SVG"

        # the trace viewer at the end: the newest run's first sample, coloured tokens with hover titles, escaped
        tokens = panel.locator(".tl-view .tl-text .tl-tok")
        assert tokens.count() > 0, f"the trace viewer showed no tokens in {notebook}"
        assert all(tokens.nth(i).get_attribute("title") for i in range(min(5, tokens.count())))
        panel.locator(".tl-view").first.scroll_into_view_if_needed()
        page.screenshot(path=str(tmp_path / f"{Path(notebook).stem}-viewer.png"))

        figure = panel.locator(".js-plotly-plot").first
        figure.scroll_into_view_if_needed()
        page.screenshot(path=str(tmp_path / f"{Path(notebook).stem}-figure.png"))
        panel.locator(WIDGET_CONTROLS).first.scroll_into_view_if_needed()
        shot = tmp_path / f"{Path(notebook).stem}.png"
        page.screenshot(path=str(shot))
        assert shot.stat().st_size > 10_000
        print(f"{notebook}: ran all {len(prompts)} code cells in {elapsed:.0f} s; {n_controls} widget controls, "
              f"{n_plotly} plotly figures; screenshots in {tmp_path}")
    finally:
        page.close()
        for kernel in _api(lab["base"], lab["token"], "/api/kernels") or []:  # free the model's memory
            try:
                _api(lab["base"], lab["token"], f"/api/kernels/{kernel['id']}", method="DELETE")
            except OSError:
                pass
        for session in _api(lab["base"], lab["token"], "/api/sessions") or []:
            try:
                _api(lab["base"], lab["token"], f"/api/sessions/{session['id']}", method="DELETE")
            except OSError:
                pass
