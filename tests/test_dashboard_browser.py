"""The dashboard in a real browser: Debian's chromium driven by Playwright, against a real
mosquitto, two simulated bins and `smartbin dashboard` run as a process.

Without chromium (or the playwright package) these tests skip; in CI they fail.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sqlite3
import time
from pathlib import Path

import pytest

from bin_controller.sitelog import SITELOG_NAME
from tests.broker import Broker, mosquitto_binary
from tests.conftest import REPO
from tests.dashboard_support import (
    PASSWORD,
    VIEWER_PASSWORD,
    DashboardProcess,
    SimBin,
    retained_counts,
)

# A bin id with HTML in it: the pages must show it as text, never as markup.
BINS = ("bin-a", "lab<i>2")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]
ARRIVAL_LIMIT_MS = 1000.0
WAIT_MS = 15000  # polling limit for what a page shows (not a speed assertion)


def _missing(what: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{what} is missing in CI (./dev test installs it)")
    pytest.skip(f"{what} is not available")


def chromium() -> str:
    found = shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(found).exists():
        _missing("Debian's chromium")
    return found


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("the playwright package")
    executable = chromium()
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def world(tmp_path_factory, demo):
    """A broker, two bins with a few items each, and the dashboard."""
    mosquitto_binary()
    tmp = tmp_path_factory.mktemp("dash")
    broker = Broker(tmp / "broker")
    broker.start()
    bins = {}
    dashboard = None
    try:
        # Started first, so its history (the charts) has every item.
        dashboard = DashboardProcess(tmp / "dashboard", broker.port)
        for i, bin_id in enumerate(BINS):
            bins[bin_id] = SimBin(broker.port, demo, tmp / f"state{i}", bin_id, seed=i + 1)
            bins[bin_id].drop(6 + 4 * i)
        yield {"broker": broker, "bins": bins, "dashboard": dashboard, "tmp": tmp}
    finally:
        if dashboard is not None:
            assert dashboard.stop() == 0, "".join(dashboard.stderr)[-2000:]
        for b in bins.values():
            b.close()
        broker.stop()


def login(context, url: str, password: str = PASSWORD):
    page = context.new_page()
    page.goto(url + "login")
    page.fill("#password", password)
    with page.expect_navigation():
        page.click("button[type=submit]")
    return page


def shot(page, name: str, tmp: Path) -> None:
    folder = REPO / "docs" if os.environ.get("SMARTBIN_SCREENSHOTS") == "1" else tmp
    page.screenshot(path=str(folder / name), full_page=True)


def row_counts(page, bin_id: str) -> dict[str, int]:
    row = page.locator("#fleet tbody tr").filter(has=page.get_by_role("link", name=bin_id,
                                                                        exact=True))
    return {b: int(row.locator(f"td.count-{b}").inner_text())
            for b in ("recyclable", "kitchen", "hazardous", "other", "total")}


def wait_until(predicate, timeout: float = WAIT_MS / 1000) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


# ---------------------------------------------------------------------- tests


def test_fleet_page_shows_every_bin_with_its_retained_counts(browser, world):
    d = world["dashboard"]
    context = browser.new_context(viewport={"width": 1400, "height": 700})
    page = login(context, d.url)
    assert page.url == d.url
    page.wait_for_selector("#fleet tbody tr >> nth=1", timeout=WAIT_MS)
    retained = retained_counts(world["broker"].port, list(BINS))
    for bin_id in BINS:
        want = {k: retained[bin_id][k] for k in ("recyclable", "kitchen", "hazardous",
                                                  "other", "total")}
        assert want["total"] > 0
        page.wait_for_function(
            "([id, total]) => [...document.querySelectorAll('#fleet tbody tr')].some(r => "
            "r.dataset.bin === id && r.querySelector('td.count-total').textContent == total)",
            arg=[bin_id, str(want["total"])], timeout=WAIT_MS)
        assert row_counts(page, bin_id) == want
    # The id with HTML in it is text: no <i> element was made from it.
    assert page.locator("#fleet tbody i").count() == 0
    assert page.get_by_role("link", name="lab<i>2", exact=True).count() == 1
    # Filters: text and online/offline.
    page.fill("#filter", "bin-a")
    assert page.locator("#fleet tbody tr").count() == 1
    page.fill("#filter", "")
    page.select_option("#status", "offline")
    assert page.locator("#fleet tbody tr").count() == 0
    page.select_option("#status", "all")
    page.click("th[data-key=total]")  # sort by total, ascending: bin-a has fewer items
    assert page.locator("#fleet tbody tr").first.get_attribute("data-bin") == "bin-a"
    page.click("th[data-key=total]")
    assert page.locator("#fleet tbody tr").first.get_attribute("data-bin") == "lab<i>2"
    context.close()


def test_a_new_item_reaches_an_open_page_within_a_second(browser, world):
    d, sim = world["dashboard"], world["bins"]["bin-a"]
    context = browser.new_context()
    page = login(context, d.url)
    page.wait_for_selector("#live.online", timeout=WAIT_MS)
    before = sim.simulation.events[-1].seq
    sim.drop(1)
    seq = sim.simulation.events[-1].seq
    assert seq == before + 1
    page.wait_for_function(
        "seq => window.__smartbinItems.some(i => i.bin === 'bin-a' && i.seq === seq)",
        arg=seq, timeout=WAIT_MS)
    got = page.evaluate("seq => window.__smartbinItems.find(i => i.seq === seq && "
                        "i.bin === 'bin-a')", seq)
    # The bin's commit time (its clock) to the page's receipt (the page's clock): one machine.
    latency_ms = got["received"] - got["time"] * 1000
    assert 0 <= latency_ms < ARRIVAL_LIMIT_MS, latency_ms
    # And the row shows it.
    page.wait_for_function(
        "n => document.querySelector('tr[data-bin=\"bin-a\"] td.count-total').textContent == n",
        arg=str(len(sim.simulation.events)), timeout=WAIT_MS)
    context.close()


def test_a_review_label_set_in_the_page_reaches_the_bin(browser, world):
    d, sim = world["dashboard"], world["bins"]["bin-a"]
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    page = login(context, d.url)
    page.goto(d.url + "bin/bin-a")
    page.wait_for_selector("#contamination", timeout=WAIT_MS)
    before = page.inner_text("#contamination")
    page.select_option("#review-filter", "0")  # all recent items
    page.wait_for_selector("#review .item", timeout=WAIT_MS)
    # An item that did not go to the hazardous compartment, labelled as a new hazardous
    # thing: it landed in the wrong compartment, so contamination rises.
    card = page.locator("#review .item").filter(
        has_not=page.locator("span.dot.bg-hazardous")).first
    seq = int(card.get_attribute("data-seq"))
    card.locator("input[type=text]").fill("button cell")
    card.locator("select").select_option("hazardous")
    card.locator("button.set-label").click()
    page.wait_for_function("() => document.querySelector('#review-reply').textContent"
                           ".includes('label #')", timeout=WAIT_MS)
    assert "ok" in page.inner_text("#review-reply"), page.inner_text("#review-reply")
    with sqlite3.connect(sim.state / SITELOG_NAME) as db:
        row = db.execute("SELECT verdict, label, bin FROM reviews WHERE seq = ?",
                         (seq,)).fetchone()
    assert row == ("corrected", "button cell", "hazardous")
    page.wait_for_function(
        "before => document.querySelector('#contamination').textContent !== before",
        arg=before, timeout=WAIT_MS)
    assert page.inner_text("#contamination").endswith("%")
    # The photo of a review item came from the bin (cmd/review_photo) and is a picture.
    img = card.locator("img")
    page.wait_for_function("img => img.complete && img.naturalWidth > 0",
                           arg=img.element_handle(), timeout=WAIT_MS)
    page.wait_for_function("() => document.querySelector('#chart-hours canvas')",
                           timeout=WAIT_MS)
    page.wait_for_timeout(3500)  # the charts redraw a few seconds after a change
    shot(page, "dashboard-bin.png", world["tmp"])
    # The fleet page shows the new contamination figure too.
    page.goto(d.url)
    page.wait_for_function("() => document.querySelector('tr[data-bin=\"bin-a\"] "
                           "td.contamination')?.textContent.endsWith('%')", timeout=WAIT_MS)
    page.set_viewport_size({"width": 1400, "height": 360})
    shot(page, "dashboard-fleet.png", world["tmp"])
    context.close()


def test_pause_button_gets_its_reply_and_pauses_the_bin(browser, world):
    d, sim = world["dashboard"], world["bins"]["bin-a"]
    context = browser.new_context()
    page = login(context, d.url)
    page.goto(d.url + "bin/bin-a")
    page.wait_for_selector("#paused", timeout=WAIT_MS)
    page.click("button[data-cmd=pause]")
    page.wait_for_function("() => document.querySelector('#reply').textContent"
                           ".startsWith('pause: ok')", timeout=WAIT_MS)
    wait_until(lambda: sim.loop.status()["paused"] is True)
    page.wait_for_function("() => document.querySelector('#paused').textContent === 'yes'",
                           timeout=WAIT_MS)
    page.click("button[data-cmd=resume]")
    page.wait_for_function("() => document.querySelector('#reply').textContent"
                           ".startsWith('resume: ok')", timeout=WAIT_MS)
    wait_until(lambda: sim.loop.status()["paused"] is False)
    # A command the bin does not know (teach, until the bin has it) shows the bin's error
    # or its reply: whatever comes back is shown.
    page.click("button[data-cmd=teach]")
    page.wait_for_function("() => /^teach: (ok|error)/.test("
                           "document.querySelector('#reply').textContent)", timeout=WAIT_MS)
    context.close()


def test_wrong_password_missing_csrf_and_read_only_are_refused(browser, world):
    d, sim = world["dashboard"], world["bins"]["bin-a"]
    context = browser.new_context()
    page = context.new_page()
    page.goto(d.url + "login")
    page.fill("#password", "not the password")
    with page.expect_response(lambda r: r.url == d.url + "login"
                              and r.request.method == "POST") as answer:
        page.click("button[type=submit]")
    assert answer.value.status == 401
    assert page.inner_text("#login-error") == "Wrong password."
    assert page.locator("#password").count() == 1
    # Logged in, a POST without the CSRF token is refused and changes nothing.
    page = login(context, d.url)
    pause = d.url + "api/bins/bin-a/cmd/pause"
    status = page.evaluate("""async url => (await fetch(url, {method: 'POST', body: '{}',
        headers: {'Content-Type': 'application/json'}})).status""", pause)
    assert status == 403
    assert sim.loop.status()["paused"] is False
    context.close()
    # The read-only login sees the bins, and every action is refused even with its token.
    context = browser.new_context()
    page = login(context, d.url, VIEWER_PASSWORD)
    page.wait_for_selector("#fleet tbody tr", timeout=WAIT_MS)
    assert page.inner_text("#who") == "read-only"
    reply = page.evaluate("""async url => {
        const s = await (await fetch('/api/session')).json();
        const r = await fetch(url, {method: 'POST', body: '{}', headers: {
            'Content-Type': 'application/json', 'X-CSRF-Token': s.csrf}});
        return [r.status, await r.json()];
    }""", pause)
    assert reply[0] == 403 and "read-only" in reply[1]["error"]
    assert sim.loop.status()["paused"] is False
    page.goto(d.url + "bin/bin-a")
    page.wait_for_selector("#paused", timeout=WAIT_MS)
    assert page.locator("button[data-cmd=pause]").is_disabled()
    context.close()


def test_pages_load_nothing_from_elsewhere_and_stay_small(browser, world):
    """Offline: every request of the pages goes to the dashboard itself; the first load of
    the bin page (the larger one) stays well under 500 KB."""
    d = world["dashboard"]
    context = browser.new_context()
    page = login(context, d.url)
    sizes: dict[str, int] = {}
    elsewhere: list[str] = []

    def seen(response) -> None:
        if not response.url.startswith(d.url):
            elsewhere.append(response.url)
        elif "/api/stream" not in response.url:
            # A response still streaming has no body yet.
            with contextlib.suppress(Exception):
                sizes[response.url] = len(response.body())

    page.on("response", seen)
    page.goto(d.url + "bin/" + "bin-a")
    page.wait_for_selector("#chart-hours canvas", timeout=WAIT_MS)
    page.wait_for_selector("#review .item img, #review .empty", timeout=WAIT_MS)
    assert not elsewhere
    assert any(u.endswith("uPlot.iife.min.js") for u in sizes)
    total = sum(sizes.values())
    print(f"bin page first load: {total} bytes in {len(sizes)} responses")
    assert total < 500_000, json.dumps(sizes, indent=1)
    context.close()
