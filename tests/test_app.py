"""The web app (issue 7): unit tests of its file handling, and end-to-end tests in headless Chromium.

The browser tests start the app on a free localhost port in this process and drive Debian's Chromium
(``apt-get install -y chromium``) with Playwright. They fail, rather than skip, when Chromium or the app
extra is missing: CI installs both. The successful run saves a screenshot;
with ``IRISSEG_UPDATE_SCREENSHOT=1`` it refreshes the README's, ``docs/app.png``.
"""

from __future__ import annotations

import io
import os
import socket
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

from irisseg.errors import InputError

gr = pytest.importorskip("gradio", reason="the web app needs the 'app' extra: pip install -e '.[app]'")

from irisseg.app import (  # noqa: E402
    PRED_RGB,
    Session,
    SessionStore,
    build_app,
    example_task,
    render_slice,
    safe_extract_zip,
    stage_upload,
    upload_suffix,
)

CHROMIUM = Path("/usr/bin/chromium")
REPO = Path(__file__).resolve().parents[1]
UPLOAD_LIMIT_MB = 1


# ---------------------------------------------------------------------------------------------------
# fast unit tests
# ---------------------------------------------------------------------------------------------------
def test_sessions_have_separate_folders_removed_on_close(tmp_path):
    store = SessionStore(tmp_path / "root")
    a, b = store.get("a"), store.get("b")
    assert a.folder != b.folder and a.folder.is_dir() and b.folder.is_dir()
    assert store.get("a") is a
    (a.folder / "prediction.nii.gz").write_bytes(b"x")
    store.close("a")
    assert not a.folder.exists() and b.folder.is_dir() and len(store) == 1
    store.close("unknown")  # no error
    store.close_all()
    assert not b.folder.exists() and len(store) == 0
    own = SessionStore()
    folder = own.get("c").folder
    own.close_all()
    assert not folder.exists() and not own.root.exists()


def test_zip_with_parent_or_absolute_paths_refused(tmp_path):
    for bad in ("../evil.dcm", "a/../../evil.dcm", "/etc/evil.dcm"):
        archive = tmp_path / "bad.zip"
        with zipfile.ZipFile(archive, "w") as zf:
            zf.writestr("series/ok.dcm", b"1")
            zf.writestr(bad, b"2")
        dest = tmp_path / f"out{len(bad)}"
        with pytest.raises(InputError, match="unsafe path"):
            safe_extract_zip(archive, dest, max_bytes=2**20, name="upload")
        assert not (tmp_path / "evil.dcm").exists()
    good = tmp_path / "good.zip"
    with zipfile.ZipFile(good, "w") as zf:
        for i in range(3):
            zf.writestr(f"study/series/{i}.dcm", b"abc")
        zf.writestr("study/readme.txt", b"abc")
    folder = safe_extract_zip(good, tmp_path / "good", max_bytes=2**20)
    assert folder == tmp_path / "good" / "study" / "series"
    with pytest.raises(InputError, match="expands to more than"):
        safe_extract_zip(good, tmp_path / "small", max_bytes=5)
    (tmp_path / "notzip.zip").write_bytes(b"not a zip")
    with pytest.raises(InputError, match="not a readable zip"):
        safe_extract_zip(tmp_path / "notzip.zip", tmp_path / "nz", max_bytes=2**20)


def test_uploads_staged_under_fixed_names(tmp_path):
    session = Session(tmp_path / "session")
    session.folder.mkdir()
    upload = tmp_path / "gradio" / "..evil name;rm -rf.NII.GZ"
    upload.parent.mkdir()
    upload.write_bytes(b"data")
    staged, shown = stage_upload(upload, session, "query", "query", max_bytes=100)
    assert staged == session.folder / "inputs" / "query.nii.gz" and staged.read_bytes() == b"data"
    assert shown.startswith("query (")
    with pytest.raises(InputError, match="upload limit"):
        stage_upload(upload, session, "query", "query", max_bytes=2)
    assert upload_suffix("scan.MHA") == ".mha"
    with pytest.raises(InputError, match="unsupported file type"):
        upload_suffix("scan.mhd")


def test_render_slice_keeps_physical_aspect_and_overlay():
    image = np.zeros((10, 20), np.float32)
    mask = np.zeros((10, 20), bool)
    mask[3:7, 5:15] = True
    rgb = render_slice(image, (0.0, 1.0), (4.0, 1.0), [(mask, PRED_RGB, 1.0)], size=80)
    assert rgb.shape == (80, 40, 3) and rgb.dtype == np.uint8  # 40 mm tall, 20 mm wide
    assert tuple(rgb[40, 20]) == PRED_RGB and tuple(rgb[0, 0]) == (0, 0, 0)


# ---------------------------------------------------------------------------------------------------
# the app in a real browser
# ---------------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    """The app (starter model, CPU) served on a free localhost port, with a 1 MB upload limit."""
    from irisseg.app import launch

    # a closed tab is noticed within about a second (Gradio's default heartbeat is 15 s)
    os.environ["GRADIO_HEARTBEAT_INTERVAL"] = "1"
    demo = launch(host="127.0.0.1", port=_free_port(), model="starter", device="cpu",
                  max_upload_mb=UPLOAD_LIMIT_MB, block=False)
    yield demo
    demo.close()
    demo.irisseg_store.close_all()
    os.environ.pop("GRADIO_HEARTBEAT_INTERVAL", None)


def _session_with(store, name: str) -> Path:
    """The one session folder holding ``name``."""
    folders = [f for f in store.folders().values() if (f / name).exists()]
    assert len(folders) == 1, store.folders()
    return folders[0]


def _wait_removed(folder: Path, seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while folder.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not folder.exists(), f"{folder} still exists {seconds} s after its tab closed"


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: the browser tests need Debian's Chromium (apt-get install -y chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the browser tests need the playwright package: pip install -e '.[apptest]'")
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                     args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        yield chromium
        chromium.close()


def test_upload_limit_is_enforced(server):
    import httpx

    url = server.local_url.rstrip("/")
    assert server.max_file_size == UPLOAD_LIMIT_MB * 2**20
    big = io.BytesIO(b"0" * (UPLOAD_LIMIT_MB * 2**20 + 4096))
    r = httpx.post(f"{url}/gradio_api/upload", files={"files": ("big.nii.gz", big)}, timeout=30)
    assert r.status_code == 413
    r = httpx.post(f"{url}/gradio_api/upload", files={"files": ("small.nii.gz", io.BytesIO(b"0" * 100))}, timeout=30)
    assert r.status_code == 200


def _load_example_and_run(page, expect):
    page.click("#load-example")
    expect(page.locator("#status")).to_contain_text("example loaded", timeout=60_000)
    page.locator("#strategy").get_by_text("one-shot", exact=False).first.click()
    page.click("#run")
    expect(page.locator("#status")).to_contain_text("Done", timeout=90_000)
    expect(page.locator("#view-axial img")).to_be_visible(timeout=30_000)
    expect(page.locator("#support-axial img")).to_be_visible(timeout=30_000)
    expect(page.locator("#metrics")).to_contain_text("Dice", timeout=30_000)


def test_example_one_shot_overlay_download(server, browser, tmp_path):
    from playwright.sync_api import expect

    from irisseg.incontext import load_model
    from irisseg.io import read_volume
    from irisseg.metrics import dice

    page = browser.new_page(viewport={"width": 1400, "height": 1000}, accept_downloads=True)
    page.goto(server.local_url, wait_until="domcontentloaded", timeout=60_000)
    _load_example_and_run(page, expect)
    src = page.locator("#view-axial img").get_attribute("src")
    assert src  # the overlay image is served
    with page.expect_download(timeout=30_000) as info:
        page.click("#download")
    saved = tmp_path / "prediction.nii.gz"
    info.value.save_as(saved)
    assert info.value.suggested_filename == "prediction.nii.gz"

    ex = example_task(load_model("starter"))
    pred = read_volume(saved)
    assert pred.shape == ex.query.shape
    np.testing.assert_allclose(pred.spacing, ex.query.spacing, atol=1e-4)
    np.testing.assert_allclose(pred.origin, ex.query.origin, atol=1e-3)
    np.testing.assert_allclose(pred.direction, ex.query.direction, atol=1e-5)
    score = dice(pred.array > 0, ex.reference.array > 0)
    assert score > 0.3, score
    # The README's screenshot is refreshed only on request, so a test run leaves the checkout clean.
    shot = REPO / "docs" / "app.png" if os.environ.get("IRISSEG_UPDATE_SCREENSHOT") else tmp_path / "app.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    assert "local" not in server.irisseg_store.folders()  # every handler saw its browser session
    folder = _session_with(server.irisseg_store, "prediction.nii.gz")
    page.close()
    _wait_removed(folder)  # the tab's files go when it closes


def test_corrupt_upload_shows_error_then_example_runs(server, browser):
    from playwright.sync_api import expect

    other = browser.new_page()  # a second user, idle meanwhile
    other.goto(server.local_url, wait_until="domcontentloaded", timeout=60_000)
    expect(other.locator("#status")).to_contain_text("Upload files")
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(server.local_url, wait_until="domcontentloaded", timeout=60_000)
    page.locator("#query-file input[type=file]").set_input_files(
        {"name": "x.nii.gz", "mimeType": "application/gzip", "buffer": b"not a nifti"})
    # the upload is done when its download link appears (Gradio may lay the name out as "x.nii .gz")
    expect(page.locator("#query-file a[href$='x.nii.gz']")).to_have_count(1, timeout=30_000)
    page.click("#run")
    status = page.locator("#status")
    expect(status).to_contain_text("Error", timeout=30_000)
    expect(status).to_contain_text("x.nii.gz")
    assert "/tmp" not in status.inner_text()  # server paths are not shown
    _load_example_and_run(page, expect)  # the app still serves this page
    folder = _session_with(server.irisseg_store, "prediction.nii.gz")  # only this user's session has it
    expect(other.locator("#status")).to_contain_text("Upload files")  # the other user sees none of it
    assert other.locator("#view-axial img").count() == 0
    page.close()
    _wait_removed(folder)
    other.close()


def test_similar_cases_tab_searches_the_index(tmp_path):
    """With --index the app serves a search endpoint: ranked hits from the index, one-line errors."""
    import torch
    from gradio_client import Client, handle_file

    from irisseg.data.synthetic import generate_dataset
    from irisseg.models.embedding import EmbeddingConfig, EmbeddingNet
    from irisseg.retrieval import build_index

    data = generate_dataset(tmp_path / "data", "findings", 6, shape=16, seed=4)
    torch.manual_seed(0)
    EmbeddingNet(EmbeddingConfig(channels=(4, 8), embedding_dim=16,
                                 extra={"retrieval": {"grid": [16, 16, 16]}})).save(tmp_path / "run" / "best")
    build_index(tmp_path / "run", data, tmp_path / "index")
    store = SessionStore(tmp_path / "sessions")
    demo = build_app(index=tmp_path / "index", store=store)
    assert demo.irisseg_store is store  # the store given, even while it is empty (no stray temporary folder)
    port = _free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        query = data / "imagesTr" / "case_0002_0000.nii.gz"
        status, table = client.predict([handle_file(str(query))], 3, api_name="/search")
        assert status.startswith("3 similar case")
        assert [row[0] for row in table["data"]] == [1, 2, 3]
        assert table["data"][0][1] == "case_0002" and table["data"][0][2] == pytest.approx(1.0, abs=1e-3)
        bad = tmp_path / "notes.txt"
        bad.write_text("not an image")
        status, _ = client.predict([handle_file(str(bad))], 3, api_name="/search")
        assert "unsupported file type" in status and "\n" not in status.strip()
    finally:
        demo.close()
