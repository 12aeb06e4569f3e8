"""The Gradio demo in a real browser: Debian's headless Chromium driven by Playwright.

The app is started on the toy world on 127.0.0.1 at a free port; the test opens the HED tab,
uploads an image, types a prompt, asks for two images and presses Generate, then checks what
came back: the condition preview and every generated image have the generation size, and the
condition and images served to the page are exactly the command-line generator's for the same
inputs and seed. A
screenshot is kept in test-artifacts/app.png.

Nothing is installed or downloaded at test time: Playwright's Python package drives
/usr/bin/chromium (CI installs it with apt); the test is skipped only when that file is absent.
"""
from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import OFFLINE_ENV, REPO_ROOT

CHROMIUM = Path("/usr/bin/chromium")
# Without the background-networking flags Chromium's own connections (updates, sync, QUIC
# probes) are refused by a closed network and slow the page down.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SCREENSHOT = REPO_ROOT / "test-artifacts" / "app.png"

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason=f"{CHROMIUM} is absent: install Debian's chromium (apt-get install chromium); "
           "the test never downloads a browser",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def app_url(toy_world: Path, tmp_path: Path):
    """The demo on the toy world at http://127.0.0.1:<free port>/, stopped after the test."""
    port = free_port()
    log_path = tmp_path / "app.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [sys.executable, "inference/app.py", "--toy", str(toy_world), "--host", "127.0.0.1", "--port", str(port)],
            # One thread: the toy models are too small to gain from more, and on a busy machine
            # the threads' spin-waits make each step many times slower.
            cwd=REPO_ROOT, env={**os.environ, **OFFLINE_ENV, "OMP_NUM_THREADS": "1"}, stdout=log,
            stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 240
        while True:
            if process.poll() is not None:
                pytest.fail(f"the app exited with code {process.returncode}:\n{log_path.read_text()[-5000:]}")
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the app did not answer on {url} within 240 s:\n{log_path.read_text()[-5000:]}")
            time.sleep(1)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def image_sizes(page, selector: str) -> list[list[int]]:
    return page.eval_on_selector_all(selector, "images => images.map(i => [i.naturalWidth, i.naturalHeight])")


def test_demo_in_chromium_generates_images_of_the_right_size(app_url: str, toy_world: Path, tmp_path: Path):
    import torch
    from playwright.sync_api import sync_playwright

    from inference import generate
    from utils.data import load_dataset_any

    # A 150x100 photo: at the toy resolution (shorter side 64) everything comes back 96x64.
    upload = tmp_path / "upload.png"
    load_dataset_any(str(toy_world / "datasets" / "MultiGen-20M_train"), "train")[0]["image"].convert("RGB").resize(
        (150, 100)).save(upload)
    prompt = "a green circle in front of a sky"

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch_persistent_context(
            tempfile.mkdtemp(dir=tmp_path), executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1280, "height": 1100})
        try:
            page = browser.new_page()
            page.goto(app_url, wait_until="domcontentloaded")
            page.get_by_role("tab", name="SoftEdge (HED)").click()
            page.locator("#hed-input input[type=file]").set_input_files(str(upload))
            page.wait_for_selector("#hed-condition img", timeout=120_000)
            page.wait_for_function("() => { const i = document.querySelector('#hed-condition img');"
                                   " return i && i.complete && i.naturalWidth > 0; }")
            assert image_sizes(page, "#hed-condition img") == [[96, 64]]

            page.locator("#hed-prompt textarea").fill(prompt)
            number_of_images = page.locator("#hed-num-images input[type=number]")
            number_of_images.fill("2")
            number_of_images.press("Tab")
            page.locator("#hed-run").click()
            page.wait_for_function(
                "() => { const images = document.querySelectorAll('#hed-output-conditions img');"
                " return images.length == 2 && [...images].every(i => i.complete && i.naturalWidth > 0); }",
                timeout=180_000)
            SCREENSHOT.parent.mkdir(exist_ok=True)
            page.screenshot(path=str(SCREENSHOT), full_page=True)
            assert image_sizes(page, "#hed-output img") == [[96, 64], [96, 64]]
            assert image_sizes(page, "#hed-output-conditions img") == [[96, 64], [96, 64]]

            def served(selector: str) -> list[np.ndarray]:
                sources = page.eval_on_selector_all(selector, "images => images.map(i => i.src)")
                return [np.asarray(Image.open(io.BytesIO(page.request.get(src).body())).convert("RGB"))
                        for src in sources]

            served_images, [served_condition] = served("#hed-output img"), served("#hed-condition img")
        finally:
            browser.close()

    # The demo's defaults are the generator's (seed 42, 20 UniPC steps, CFG 7.5): same condition, same images.
    out = tmp_path / "cli"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the app (OMP_NUM_THREADS=1): same threads, same float sums
    try:
        generate.main(["--toy", str(toy_world), "--task", "hed", "--image", str(upload), "--prompt", prompt,
                       "--num_images", "2", "--output_dir", str(out)])
    finally:
        torch.set_num_threads(threads)
    np.testing.assert_array_equal(served_condition, np.asarray(Image.open(out / "conditions" / "upload.png")))
    for k, image in enumerate(served_images):
        np.testing.assert_array_equal(image, np.asarray(Image.open(out / "images" / f"upload_{k}.png")))
