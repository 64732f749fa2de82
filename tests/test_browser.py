"""The notebooks run in a real browser: JupyterLab in headless Chromium, every cell, no error output,
widgets rendered (tests/browser/run_notebooks.mjs does the browser part; screenshots land in
tests/browser/screenshots/).

Opt-in (minutes, and it needs Chromium and Node):
    apt-get install -y chromium && npm ci --prefix tests/browser
    python -m pytest -m browser tests/test_browser.py
QLEARN_BROWSER_NOTEBOOKS="00_start_here.ipynb 01_number_formats.ipynb" picks a subset (names in notebooks/).
The server's root is a temporary copy of notebooks/, so the committed notebooks never change; qlearn
comes from the environment (installed editable) as in the lab.
"""

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BROWSER_DIR = ROOT / "tests" / "browser"
SCRIPT = BROWSER_DIR / "run_notebooks.mjs"
SCREENSHOTS = BROWSER_DIR / "screenshots"
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
PER_NOTEBOOK_TIMEOUT_S = 600

# JupyterLab settings for the run: every cell in the DOM (the screenshot and the checks see all of
# them), no blank screen after the last cell, no autosave (nothing is written back), no news prompt.
LAB_SETTINGS = {
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none",
                                                                   "scrollPastEnd": False},
    "@jupyterlab/docmanager-extension/plugin.jupyterlab-settings": {"autosave": False},
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {"fetchNews": "false",
                                                                       "checkForUpdates": False},
}


def _missing_tools() -> list[str]:
    """What must be installed before the browser check can run, each with the command that fixes it."""
    missing = []
    if not Path(CHROMIUM).exists():
        missing.append(f"Chromium ({CHROMIUM}): apt-get install -y chromium")
    if shutil.which("node") is None:
        missing.append("Node.js (node): apt-get install -y nodejs npm")
    if not (BROWSER_DIR / "node_modules" / "playwright-core").is_dir():
        missing.append("playwright-core (tests/browser/node_modules): npm ci --prefix tests/browser")
    return missing


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _notebooks() -> list[str]:
    chosen = os.environ.get("QLEARN_BROWSER_NOTEBOOKS", "").replace(",", " ").split()
    names = [Path(n).name for n in chosen] or sorted(p.name for p in (ROOT / "notebooks").glob("*.ipynb"))
    unknown = [n for n in names if not (ROOT / "notebooks" / n).is_file()]
    assert not unknown, f"QLEARN_BROWSER_NOTEBOOKS names notebooks not in notebooks/: {unknown}"
    return names


def _wait_until_up(url: str, token: str, server: subprocess.Popen, log: Path, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    request = urllib.request.Request(url + "api/status", headers={"Authorization": f"token {token}"})
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"jupyter lab exited with {server.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(request, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"jupyter lab did not answer on {url} within {timeout_s:.0f} s:\n{log.read_text()[-3000:]}")


@pytest.mark.browser
def test_notebooks_run_in_jupyterlab_in_headless_chromium(tmp_path):
    missing = _missing_tools()
    assert not missing, "the browser check needs:\n  " + "\n  ".join(missing)
    notebooks = _notebooks()

    # The server's root: a copy of notebooks/ (run there, never saved back).
    root = tmp_path / "root"
    shutil.copytree(ROOT / "notebooks", root / "notebooks", ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
    settings = tmp_path / "settings"
    for name, values in LAB_SETTINGS.items():
        (settings / name).parent.mkdir(parents=True, exist_ok=True)
        (settings / name).write_text(json.dumps(values))

    token, port = secrets.token_hex(16), _free_port()
    url = f"http://127.0.0.1:{port}/"
    env = dict(os.environ, JUPYTER_RUNTIME_DIR=str(tmp_path / "runtime"))
    # The kernel runs `python` from PATH: make it this environment's.
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    log = tmp_path / "jupyter.log"
    with open(log, "w") as log_file:
        server = subprocess.Popen(
            [sys.executable, "-m", "jupyter", "lab", "--no-browser", f"--port={port}", "--ip=127.0.0.1",
             f"--ServerApp.token={token}", f"--ServerApp.root_dir={root}", "--ServerApp.port_retries=0",
             f"--LabApp.user_settings_dir={settings}", f"--LabApp.workspaces_dir={tmp_path / 'workspaces'}",
             "--allow-root"],
            cwd=root, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    try:
        _wait_until_up(url, token, server, log)
        command = ["node", str(SCRIPT), "--url", url, "--token", token, "--screenshots", str(SCREENSHOTS),
                   "--timeout", str(PER_NOTEBOOK_TIMEOUT_S)] + [f"notebooks/{n}" for n in notebooks]
        run = subprocess.run(command, check=False, cwd=ROOT, capture_output=True, text=True,
                             timeout=PER_NOTEBOOK_TIMEOUT_S * len(notebooks) + 120)
        lines = run.stdout.strip().splitlines()
        report = "\n".join(line for line in lines if not line.startswith("{"))  # the PASS/FAIL lines
        print(report)
        assert run.returncode == 0, (f"run_notebooks.mjs exited with {run.returncode}:\n{report}\n"
                                     f"{run.stderr[-3000:]}\n(screenshots in {SCREENSHOTS})")
        summary = json.loads(lines[-1])
        assert summary["ok"] and [r["notebook"] for r in summary["results"]] == [
            f"notebooks/{n}" for n in notebooks]
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
