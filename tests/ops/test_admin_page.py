"""The relay's admin page in a real headless Chromium (Debian's ``chromium``, driven by
Playwright): sign in with an admin token, see a member online, kill its agent, and see the
page turn it offline on its own — checked in the DOM and in the screenshots' pixels."""

from __future__ import annotations

import io
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from backhaul.devstack import DevStack
from tests.ops.helpers import api_base, connected, wait_status

pytestmark = pytest.mark.e2e

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
GREEN = (0x1E, 0x9E, 0x4A)
RED = (0xD6, 0x3A, 0x3A)


@pytest.fixture
def browser() -> Iterator[Any]:
    sync_api = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).exists():
        pytest.fail("chromium is not installed (bash tests/ops/setup.sh)")
    with sync_api.sync_playwright() as playwright:
        instance = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            yield instance
        finally:
            instance.close()


def dominant(png: bytes) -> tuple[int, int, int]:
    """The most frequent colour of a screenshot (the badge's fill, not its text)."""
    image = Image.open(io.BytesIO(png)).convert("RGB")
    colours = image.getcolors(image.width * image.height)
    assert colours is not None
    _count, colour = max(colours)
    return tuple(colour)  # type: ignore[return-value]


def near(colour: tuple[int, int, int], expected: tuple[int, int, int]) -> bool:
    return all(abs(a - b) <= 12 for a, b in zip(colour, expected, strict=True))


def test_member_goes_offline_on_the_live_page(
    ops_stack: DevStack, browser: Any, tmp_path: Path
) -> None:
    gateway_id, config_dir = ops_stack.enroll(name="webagent", allow=[api_base(ops_stack)])
    ops_stack.start_agent(config_dir, "webagent")
    wait_status(ops_stack, config_dir, connected)
    member_id = ops_stack.call("GET", f"/v1/gateways/{gateway_id}")["members"][0]["id"]
    ok_id = ops_stack.connection(gateway_id, api_base(ops_stack))
    denied_id = ops_stack.connection(gateway_id, "http://127.0.0.1:9/not-allowed/")
    with ops_stack.client() as client:
        for _ in range(3):
            assert client.get(f"/v1/connections/{ok_id}/invoke/hello").status_code == 200
        denied = client.get(f"/v1/connections/{denied_id}/invoke/x")
        assert denied.status_code == 502

    page = browser.new_context(ignore_https_errors=True, viewport={"width": 1280, "height": 900})
    tab = page.new_page()
    tab.goto(f"{ops_stack.relay_url}/admin")
    tab.wait_for_selector("#signin:not([hidden])")
    tab.fill("#token", ops_stack.admin_token)
    tab.click("#signin-form button[type=submit]")
    row = f"tr.member[data-member-id='{member_id}']"
    tab.wait_for_selector(f"{row}[data-state='online']", timeout=10_000)
    assert tab.evaluate("sessionStorage.getItem('backhaul.admin.token')") == ops_stack.admin_token
    assert tab.locator("#token").input_value() == ""
    text = tab.inner_text(row)
    assert "webagent" in text and "ms" in text  # name and RTT
    gateway_row = tab.inner_text(f"tr.gateway[data-gateway-id='{gateway_id}']")
    assert gateway_row.strip().endswith("4")  # four invokes in the last minute
    assert "Target not allowed" in tab.inner_text("#errors")
    before = tab.screenshot(path=str(tmp_path / "online.png"), full_page=True)
    online_badge = tab.locator(f"{row} .badge").screenshot()
    assert near(dominant(online_badge), GREEN), dominant(online_badge)

    ops_stack.stop_process("webagent", sig=signal.SIGKILL)
    tab.wait_for_selector(f"{row}[data-state='offline']", timeout=15_000)
    after = tab.screenshot(path=str(tmp_path / "offline.png"), full_page=True)
    offline_badge = tab.locator(f"{row} .badge").screenshot()
    assert near(dominant(offline_badge), RED), dominant(offline_badge)
    assert before != after
    assert tab.inner_text(f"{row} .badge") == "offline"
    # The page stays signed in across a reload of the tab, and signs out on request.
    tab.reload()
    tab.wait_for_selector(f"{row}[data-state='offline']")
    tab.click("#signout")
    tab.wait_for_selector("#signin:not([hidden])")
    assert tab.evaluate("sessionStorage.getItem('backhaul.admin.token')") is None
    page.close()


def test_page_refuses_non_admins_and_is_locked_down(ops_stack: DevStack, browser: Any) -> None:
    _user_id, user_token = ops_stack.create_user("viewer")
    response = httpx.get(f"{ops_stack.relay_url}/admin", verify=ops_stack.tls())
    assert response.status_code == 200
    csp = response.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
    overview = httpx.get(
        f"{ops_stack.relay_url}/v1/admin/overview",
        verify=ops_stack.tls(),
        headers={"Authorization": f"Bearer {user_token}"},
    )
    assert overview.status_code == 403
    page = browser.new_context(ignore_https_errors=True)
    tab = page.new_page()
    tab.goto(f"{ops_stack.relay_url}/admin")
    for token, message in ((user_token, "not an admin"), ("bh_wrong", "does not accept")):
        tab.fill("#token", token)
        tab.click("#signin-form button[type=submit]")
        # (no wait_for_function: the page's CSP forbids the eval it would need)
        tab.locator("#signin-error", has_text=message).wait_for(timeout=10_000)
        assert not tab.is_visible("#dashboard")
    page.close()
