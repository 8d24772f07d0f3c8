"""The web dashboard in headless Chromium (playwright driving the system Chromium) against a real server
with a collection, a job and a graph: every page loads and shows them, a collection is created from the
page, a search runs from the playground, a job's progress bar moves and its cancel button works, and the
page asks for an API key where the server has keys. One screenshot per page (copied to docs/img/ when
RETRIEVAL_UPDATE_SCREENSHOTS=1)."""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from tests.http.conftest import ensure_engines, slow_build_input, slow_job_params

CHROMIUM = os.environ.get("RETRIEVAL_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ROOT = Path(__file__).resolve().parents[2]


def _why_not() -> str | None:
    if not Path(CHROMIUM).exists():
        return f"no Chromium at {CHROMIUM} (CI installs it; or set RETRIEVAL_CHROMIUM)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install -e '.[dev]')"
    return None


pytestmark = [pytest.mark.skipif(_why_not() is not None, reason=_why_not() or ""),
              pytest.mark.slow]  # a browser start and page loads: about 25 s for the module


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from playwright.sync_api import sync_playwright

    pw = sync_playwright().start()
    ctx = pw.chromium.launch_persistent_context(str(tmp_path_factory.mktemp("chromium-profile")),
                                                executable_path=CHROMIUM, headless=True, args=ARGS,
                                                viewport={"width": 1280, "height": 800}, ignore_https_errors=True)
    yield ctx
    ctx.close()
    pw.stop()


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    folder = tmp_path_factory.mktemp("screenshots")
    yield folder
    if os.environ.get("RETRIEVAL_UPDATE_SCREENSHOTS") == "1":
        (ROOT / "docs" / "img").mkdir(exist_ok=True)
        for png in folder.glob("*.png"):
            shutil.copy(png, ROOT / "docs" / "img" / png.name)


@pytest.fixture(scope="module")
def world(grpc_client, hserver):
    """A collection with payloads, a graph with FastRP embeddings, a datastore, a cross-encoder index
    (with transformers) and finished jobs."""
    ensure_engines(grpc_client, hserver.data_dir.parent)
    rng = np.random.default_rng(3)
    for c in grpc_client.list_collections():
        if c["name"] in ("dash", "fromui"):
            grpc_client.drop_collection(c["name"])
    grpc_client.create_collection("dash", dimension=8, metric="l2")
    grpc_client.upsert("dash", ids=np.arange(200), vectors=rng.random((200, 8), dtype=np.float32),
                       payloads=[{"lang": ["en", "de", "fr"][i % 3], "n": i} for i in range(200)])
    grpc_client.create_payload_index("dash", "lang", "keyword")
    if "karate" not in [g["name"] for g in grpc_client.list_graphs()]:
        grpc_client.create_graph("karate", 34)
        grpc_client.append_edges("karate", rng.integers(0, 34, 78), rng.integers(0, 34, 78))
        grpc_client.run_fastrp("karate", dim=8, progress=False)
    return grpc_client


def _open(browser, url, hash_):
    page = browser.new_page()
    page.goto(f"{url}/#{hash_}")
    page.wait_for_selector(f"main[data-page='{hash_}'][data-ready='1']", timeout=20_000)
    return page


def test_collections_page_and_create(browser, hserver, world, shots):
    page = _open(browser, hserver.http_url, "collections")
    row = page.locator("tr", has_text="dash").first
    assert "200" in row.inner_text() and "lang:keyword" in row.inner_text()
    page.fill("#create input[name=name]", "fromui")
    page.fill("#create input[name=dimension]", "8")
    page.select_option("#create select[name=metric]", "cosine")
    page.click("#create button[type=submit]")
    page.wait_for_selector("td:text-is('fromui')", timeout=10_000)
    info = world.describe_collection("fromui")
    assert info["dimension"] == 8 and info["metric"] == "cosine"
    page.screenshot(path=str(shots / "collections.png"), full_page=True)
    page.close()


def test_point_browser(browser, hserver, world, shots):
    page = _open(browser, hserver.http_url, "points")
    page.select_option("#scroll select[name=collection]", "dash")
    page.fill("#scroll textarea[name=filter]", '{"must": [{"key": "lang", "equals": "de"}]}')
    page.click("#scroll button[type=submit]")
    page.wait_for_function("document.querySelector('#count').textContent.includes('67 points')", timeout=10_000)
    assert page.locator("#rows tbody tr").count() == 20
    page.locator("#rows tbody tr").first.click()
    page.wait_for_function("document.querySelector('#payload').textContent.includes('\"lang\": \"de\"')")
    assert '"id": 1' in page.inner_text("#payload")
    page.screenshot(path=str(shots / "points.png"), full_page=True)
    page.close()


def test_search_playground(browser, hserver, world, shots):
    page = _open(browser, hserver.http_url, "search")
    page.select_option("#search select[name=collection]", "dash")
    page.fill("#search input[name=point]", "7")
    page.click("#usepoint")
    page.wait_for_function("document.querySelector('#search textarea[name=vector]').value.startsWith('[')")
    page.fill("#search input[name=k]", "5")
    page.fill("#search textarea[name=filter]", '{"must": [{"key": "lang", "any_of": ["de", "fr"]}]}')
    page.click("#search button[type=submit]")
    page.wait_for_selector("#hits tbody tr", timeout=10_000)
    rows = page.locator("#hits tbody tr")
    assert rows.count() == 5
    first = rows.first.inner_text().split("\t")
    assert first[1].strip() == "7" and float(first[2]) == 0.0  # the point itself, at distance 0
    assert '"lang":"de"' in rows.first.inner_text()  # point 7's payload
    page.screenshot(path=str(shots / "search.png"), full_page=True)
    page.close()


def _width(page, job_id) -> float:
    style = page.get_attribute(f"[data-job='{job_id}'] > div", "style") or ""
    m = re.search(r"width:\s*([\d.]+)%", style)
    return float(m.group(1)) if m else 0.0


def test_jobs_progress_bar_moves_and_cancel(browser, hserver, world, shots, http):
    path = slow_build_input(hserver.data_dir.parent)
    job = http.post("/v1/jobs", json={"kind": "build_index", "params": slow_job_params(path, "dashslow")}).json()
    page = _open(browser, hserver.http_url, "jobs")
    page.wait_for_selector(f"[data-job='{job['id']}']", timeout=10_000)
    t_end = time.monotonic() + 30
    first = None
    while time.monotonic() < t_end:
        w = _width(page, job["id"])
        if w > 0 and first is None:
            first = w
        if first is not None and w > first:
            break
        time.sleep(0.2)
    assert first is not None and _width(page, job["id"]) > first, "the progress bar did not move"
    page.screenshot(path=str(shots / "jobs.png"), full_page=True)
    page.once("dialog", lambda d: d.accept())
    page.click(f"[data-cancel='{job['id']}']")
    page.wait_for_selector(f"[data-state='{job['id']}']:text-is('cancelled')", timeout=20_000)
    assert world.get_job(job["id"])["state"] == "cancelled"
    page.close()


def test_engines_page(browser, hserver, world, shots):
    page = _open(browser, hserver.http_url, "engines")
    row = page.locator("#graphs tbody tr", has_text="karate")
    assert "34" in row.inner_text() and "fastrp" in row.inner_text()
    row.click()
    assert '"name": "karate"' in page.inner_text("#detail")
    page.screenshot(path=str(shots / "engines.png"), full_page=True)
    page.close()


def test_status_page_charts(browser, hserver, world, shots, http):
    page = _open(browser, hserver.http_url, "status")
    assert "SERVING" in page.inner_text("#services")
    # traffic while the page samples the metrics: the request-rate chart rises above its baseline
    t_end = time.monotonic() + 20
    risen = "() => { const p = document.querySelector('#rate polyline'); if (!p) return false; " \
            "const xy = p.getAttribute('points').split(' '); " \
            "return xy.length >= 3 && xy.some((v) => Number(v.split(',')[1]) < 124); }"
    while time.monotonic() < t_end and not page.evaluate(risen):
        for _ in range(5):
            http.post("/v1/collections/dash/search", json={"vector": [0.5] * 8, "k": 3})
        page.wait_for_timeout(300)
    assert page.evaluate(risen), page.inner_html("#rate")
    assert page.locator("#latency polyline").count() == 1
    page.screenshot(path=str(shots / "status.png"), full_page=True)
    page.close()
    assert (shots / "status.png").stat().st_size > 10_000


def test_asks_for_the_api_key(browser, secure, keys):
    page = browser.new_page()
    page.goto(f"{secure.http_url}/#collections")
    page.wait_for_selector("#keyform:not([hidden])", timeout=20_000)
    assert "requires an API key" in page.inner_text("#keyerror")
    page.fill("#key", keys["ro"])
    page.click("#keyform button[type=submit]")
    page.wait_for_selector("main[data-page='collections'][data-ready='1']", timeout=20_000)
    assert page.is_hidden("#keyform") and page.is_hidden("#message")
    assert page.evaluate("sessionStorage.getItem('apiKey')") == keys["ro"]
    assert page.evaluate("localStorage.length") == 0  # the key stays in this tab's session
    page.close()
