"""The chat page at / (chatserver.web, api/page.py) in a real browser.

Playwright drives Debian's Chromium (/usr/bin/chromium; `make test` installs it
when absent, Playwright never downloads a browser of its own) against a real
server with the real model and a real Redis, so a session outlives the server
restart the last test does. Each test gets a fresh browser context (empty
localStorage), and fails on any uncaught error in the page.

Screenshots (360 px phone, dark; desktop, light) are written to
load_tests/results/tmp/web/ on every run; docs/ keeps the ones the README shows.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from playwright.async_api import Browser, Page, WebSocketRoute, async_playwright, expect

from chatserver.api.page import CSP, static_files
from load_tests.server import free_port
from tests.serverproc import EXACT_FLAGS, ServerProcess, generations, wait_no_generations

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")
# No sandbox (root in a container), no GPU, and nothing that phones home.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = REPO / "load_tests" / "results" / "tmp" / "web"
SERVER_FLAGS = (*EXACT_FLAGS, "--log-level", "warning", "--session-ttl", "900")
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 360, "height": 740}
REPLY_TIMEOUT_MS = 60_000

expect.set_options(timeout=15_000)


class ChatServer:
    """The server the page talks to, on a port of its own that survives a restart."""

    def __init__(self, redis_url: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.flags = (*SERVER_FLAGS, "--redis-url", redis_url)
        self.proc: ServerProcess | None = None

    def start(self) -> None:
        self.proc = ServerProcess(*self.flags, port=self.port).wait_ready()

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()


@pytest.fixture(scope="module")
def chat_server(redis_url: str) -> Iterator[ChatServer]:
    server = ChatServer(redis_url)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def chromium_path() -> str:
    """Debian's Chromium; missing is a failure, not a skip: `make test` installs it."""
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: run `make test` or `bash .ci/ensure-chromium.sh`")
    return str(CHROMIUM)


@pytest.fixture(scope="module")
async def browser(chromium_path: str) -> AsyncIterator[Browser]:
    async with async_playwright() as pw:
        chromium = await pw.chromium.launch(executable_path=chromium_path, args=CHROMIUM_ARGS)
        yield chromium
        await chromium.close()


@dataclass
class Tab:
    """A page and what it did that a test should know: dialogs, errors, /ws frames received."""

    page: Page
    dialogs: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    frames: list[dict[str, Any]] = field(default_factory=list)

    def frames_of(self, kind: str) -> list[dict[str, Any]]:
        return [f for f in self.frames if f.get("type") == kind]


@asynccontextmanager
async def open_tab(
    browser: Browser, *, viewport: dict[str, int] = DESKTOP, color_scheme: str = "light"
) -> AsyncIterator[Tab]:
    """A fresh context (empty storage); fails the test on an uncaught page error."""
    context = await browser.new_context(viewport=viewport, color_scheme=color_scheme)
    context.set_default_timeout(15_000)
    tab = Tab(await context.new_page())

    async def on_dialog(dialog: Any) -> None:
        tab.dialogs.append(dialog.message)
        await dialog.dismiss()

    def on_websocket(ws: Any) -> None:
        ws.on("framereceived", lambda payload: tab.frames.append(json.loads(payload)))

    tab.page.on("dialog", on_dialog)
    tab.page.on("pageerror", lambda exc: tab.errors.append(str(exc)))
    tab.page.on("websocket", on_websocket)
    try:
        yield tab
        assert not tab.errors, f"uncaught errors in the page: {tab.errors}"
    finally:
        await context.close()


@asynccontextmanager
async def chat_tab(browser: Browser, server: ChatServer, *, max_tokens: int) -> AsyncIterator[Tab]:
    """A fresh tab on the page, connected, with replies capped at `max_tokens`."""
    async with open_tab(browser) as tab:
        await load(tab, server)
        await set_settings(tab.page, max_tokens=max_tokens)
        yield tab


async def load(tab: Tab, server: ChatServer) -> None:
    await tab.page.goto(server.url + "/")
    await expect(tab.page.locator("#conn")).to_have_attribute("data-state", "ready")


async def set_settings(page: Page, *, max_tokens: int, temperature: float = 0) -> None:
    settings = page.locator("#settings")
    if not await settings.evaluate("el => el.open"):
        await settings.locator("summary").click()
    await page.get_by_label("Temperature").fill(str(temperature))
    await page.get_by_label("Max tokens per reply").fill(str(max_tokens))


async def send(page: Page, text: str) -> None:
    await expect(page.locator("#send")).to_be_enabled()
    await page.get_by_label("Message", exact=True).fill(text)
    await page.get_by_label("Message", exact=True).press("Enter")


async def wait_streaming_text(page: Page) -> None:
    """Reply text is on the page while the reply is still being written."""
    await page.wait_for_function(
        """() => {
            const body = document.querySelector('.msg.assistant[data-state="streaming"] .body');
            return body !== null && body.textContent.trim().length > 0;
        }""",
        timeout=REPLY_TIMEOUT_MS,
    )


async def wait_reply(page: Page, state: str = "done") -> None:
    await expect(page.locator(".msg.assistant").last).to_have_attribute(
        "data-state", state, timeout=REPLY_TIMEOUT_MS
    )


async def get_json(url: str) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as http:
        async with http.get(url) as r:
            return r.status, await r.json()


def screenshot_path(name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS / name


# --- the files ------------------------------------------------------------------------


async def test_page_and_static_files_are_served_with_a_strict_policy(
    chat_server: ChatServer,
) -> None:
    assert set(static_files()) == {"app.js", "markdown.js", "style.css", "icon.svg"}
    async with aiohttp.ClientSession() as http:
        async with http.get(chat_server.url + "/") as r:
            assert r.status == 200
            assert r.content_type == "text/html"
            assert r.headers["Content-Security-Policy"] == CSP
            assert "connect-src 'self'" in CSP and "script-src 'self'" in CSP
            page = await r.text()
        # Everything the page loads comes from this server.
        assert not re.search(r"""(src|href)=["'](https?:)?//""", page)
        async with http.get(chat_server.url + "/static/app.js") as r:
            assert r.status == 200
            assert r.content_type == "text/javascript"
            assert r.headers["X-Content-Type-Options"] == "nosniff"
        for path in ("/static/__init__.py", "/static/index.html", "/static/..%2Fapi%2Fpage.py"):
            async with http.get(chat_server.url + path) as r:
                assert r.status == 404, path
                assert (await r.json())["error"]["code"] == "not_found"


# --- chatting -------------------------------------------------------------------------


async def test_reply_streams_into_the_page_with_its_speed(
    chat_server: ChatServer, browser: Browser
) -> None:
    async with chat_tab(browser, chat_server, max_tokens=60) as tab:
        page = tab.page
        prompt = page.get_by_label("Message", exact=True)
        await prompt.fill("first line")
        await prompt.press("Shift+Enter")  # a new line, not a send
        await expect(prompt).to_have_value("first line\n")
        await expect(page.locator(".msg")).to_have_count(0)

        await send(page, "Write a Python function that adds two numbers.")
        await wait_streaming_text(page)
        await expect(prompt).to_be_editable()  # the next message can be typed meanwhile
        await expect(page.locator("#stop")).to_be_visible()
        await wait_reply(page)

        assert len(tab.frames_of("token")) >= 2
        done = tab.frames_of("done")[-1]
        n = done["usage"]["completion_tokens"]
        reply = page.locator(".msg.assistant").last
        await expect(reply.locator(".metrics")).to_have_text(
            re.compile(rf"^TTFT \d+ ms · \d+\.\d tok/s · {n} tokens")
        )
        await expect(reply.locator(".who")).to_have_text("Assistant")
        await expect(page.locator(".msg.user .who")).to_have_text("You")
        await expect(page.locator(".msg.user .body")).to_have_text(
            "Write a Python function that adds two numbers."
        )
        await expect(page.locator("#send")).to_be_visible()
        await expect(page.locator("#stop")).to_be_hidden()
        await page.screenshot(path=screenshot_path("web-chat-desktop.png"))


async def test_stop_ends_the_reply_and_its_generation(
    chat_server: ChatServer, browser: Browser
) -> None:
    async with chat_tab(browser, chat_server, max_tokens=400) as tab:
        page = tab.page
        await send(page, "Tell me a long story about a dragon who learns to fly.")
        await wait_streaming_text(page)
        assert await generations(chat_server.proc) == 1
        await page.get_by_role("button", name="Stop").click()
        await wait_reply(page, "stopped")
        await expect(page.locator(".msg.assistant").last.locator(".meta")).to_contain_text(
            "Stopped"
        )
        await wait_no_generations(chat_server.proc)
        done = tab.frames_of("done")[-1]
        assert done["finish_reason"] == "cancelled"
        assert done["usage"]["completion_tokens"] < 400

        # The server kept the partial reply marked cancelled; a reload shows it so.
        session_id = await page.evaluate("localStorage.getItem('chatserver.session')")
        status, body = await get_json(f"{chat_server.url}/v1/sessions/{session_id}")
        assert status == 200 and body["messages"][-1]["cancelled"] is True
        await page.reload()
        await wait_reply(page, "stopped")

        # Escape in the message box stops a reply too (keyboard only).
        await expect(page.locator("#conn")).to_have_attribute("data-state", "ready")
        await send(page, "Tell me another long story, about a knight.")
        await wait_streaming_text(page)
        await page.get_by_label("Message", exact=True).press("Escape")
        await wait_reply(page, "stopped")
        await wait_no_generations(chat_server.proc)


async def test_reload_shows_the_history_and_delete_removes_the_chat(
    chat_server: ChatServer, browser: Browser
) -> None:
    async with chat_tab(browser, chat_server, max_tokens=12) as tab:
        page = tab.page
        await send(page, "Name a colour.")
        await wait_reply(page)
        bodies = page.locator(".msg .body")
        shown = await bodies.all_inner_texts()
        assert len(shown) == 2 and shown[0] == "Name a colour." and shown[1]
        session_id = await page.evaluate("localStorage.getItem('chatserver.session')")

        await page.reload()
        await expect(bodies).to_have_text(shown)
        chats = page.locator("#sessions li")
        await expect(chats).to_have_count(1)
        await expect(chats.locator(".session-open")).to_have_text("Name a colour.")
        await expect(chats.locator(".session-open")).to_have_attribute("aria-current", "page")

        await page.get_by_role("button", name="New chat").click()
        await expect(page.locator(".msg")).to_have_count(0)
        await expect(chats.locator(".session-open")).not_to_have_attribute("aria-current", "page")
        await chats.locator(".session-open").click()  # back to it from the list
        await expect(bodies).to_have_text(shown)

        await page.get_by_role("button", name="Delete chat: Name a colour.").click()
        await expect(chats).to_have_count(0)
        await expect(page.locator(".msg")).to_have_count(0)
        status, body = await get_json(f"{chat_server.url}/v1/sessions/{session_id}")
        assert status == 404 and body["error"]["code"] == "session_not_found"
        await page.reload()
        await expect(page.locator("#conn")).to_have_attribute("data-state", "ready")
        await expect(page.locator(".msg")).to_have_count(0)
        await expect(chats).to_have_count(0)


HOSTILE = (
    "<img src=x onerror=alert(1)> and [x](javascript:alert(1))\n"
    "<script>alert(2)</script> [y](JaVaScRiPt:window.pwned=1) ![z](javascript:alert(3))\n"
    '<a href="javascript:alert(4)">a</a> <iframe src="javascript:alert(5)"></iframe>\n'
    "[z]( javascript:alert(6)) [w](data:text/html,<script>alert(7)</script>)\n"
    "\n"
    "```html\n"
    "<b onmouseover=alert(8)>code</b>\n"
    "```"
)
INJECTED = "img, script, iframe, object, embed, b, a[href^='javascript' i], a[href^='data' i]"

RENDER_CASES = """async (cases) => {
    const { renderMarkdown } = await import("/static/markdown.js");
    return cases.map((source) => {
        const div = document.createElement("div");
        renderMarkdown(source, div);
        return {
            text: div.textContent,
            tags: [...div.querySelectorAll("*")].map((e) => e.tagName.toLowerCase()),
            hrefs: [...div.querySelectorAll("a")].map((a) => a.getAttribute("href")),
        };
    });
}"""


async def test_hostile_markdown_renders_as_text(chat_server: ChatServer, browser: Browser) -> None:
    async with chat_tab(browser, chat_server, max_tokens=8) as tab:
        page = tab.page
        await send(page, HOSTILE)
        await wait_reply(page)

        async def check_rendered_as_text() -> None:
            user = page.locator(".msg.user .body")
            await expect(user).to_contain_text("<img src=x onerror=alert(1)>")
            await expect(user).to_contain_text("[x](javascript:alert(1))")
            await expect(user).to_contain_text("<script>alert(2)</script>")
            await expect(user.locator("pre code")).to_have_text("<b onmouseover=alert(8)>code</b>")
            await expect(page.locator("#messages").locator(INJECTED)).to_have_count(0)
            await expect(user.locator("a")).to_have_count(0)
            await user.click()  # nothing to follow, nothing to run
            await user.locator("pre").hover()
            assert await page.evaluate("window.pwned") is None
            assert tab.dialogs == []

        await check_rendered_as_text()  # as echoed when sent
        await page.reload()
        await check_rendered_as_text()  # as loaded back from the session history

        # The same renderer draws the model's tokens: Markdown works, hostile input does not.
        results = await page.evaluate(
            RENDER_CASES,
            [
                HOSTILE,
                "**bold**, *em*, `<i>x</i>` and [ok](https://example.com/a?b=1)",
                "# Title\n\n- one\n- two\n\n1. first\n\n> quoted <u>u</u>",
                "| a | b |\n|---|---|\n| <img src=x> | `c` |",
                "[x](javascript:alert(1)) ![i](https://example.com/i.png) http://e.org/p.",
            ],
        )
        hostile, inline, blocks, table, links = results
        assert set(hostile["tags"]) <= {"p", "pre", "code"}
        assert "<img src=x onerror=alert(1)>" in hostile["text"] and hostile["hrefs"] == []
        assert inline["tags"] == ["p", "strong", "em", "code", "a"]
        assert inline["hrefs"] == ["https://example.com/a?b=1"]
        assert "<i>x</i>" in inline["text"]
        assert blocks["tags"] == ["h3", "ul", "li", "li", "ol", "li", "blockquote", "p"]
        assert "<u>u</u>" in blocks["text"]
        assert table["tags"] == ["div", "table", "thead", "tr", "th", "th", "tbody", "tr"] + [
            "td",
            "td",
            "code",
        ]
        assert "<img src=x>" in table["text"]
        # javascript: stays text; an image becomes a link (nothing is fetched); a bare URL links.
        assert links["hrefs"] == ["https://example.com/i.png", "http://e.org/p"]
        assert links["text"].startswith("[x](javascript:alert(1)) i http://e.org/p.")
        assert tab.dialogs == []


async def test_phone_width_dark_theme_and_keyboard(
    chat_server: ChatServer, browser: Browser
) -> None:
    async with open_tab(browser, viewport=PHONE, color_scheme="dark") as tab:
        page = tab.page
        await load(tab, chat_server)
        menu = page.get_by_role("button", name="Chats")
        sidebar = page.locator("#sidebar")
        await expect(sidebar).to_be_hidden()  # out of the way at phone width
        await menu.focus()
        await page.keyboard.press("Enter")
        await expect(menu).to_have_attribute("aria-expanded", "true")
        await expect(sidebar).to_be_visible()
        await expect(page.get_by_role("button", name="New chat")).to_be_focused()
        await set_settings(page, max_tokens=40)
        await page.keyboard.press("Escape")
        await expect(sidebar).to_be_hidden()
        await expect(menu).to_be_focused()

        await send(page, "Write a haiku about the sea.")
        await wait_reply(page)
        sizes = await page.evaluate(
            """() => ({
                page: document.documentElement.scrollWidth,
                messages: document.getElementById("messages").scrollWidth,
                background: getComputedStyle(document.body).backgroundColor,
            })"""
        )
        assert sizes["page"] <= PHONE["width"] and sizes["messages"] <= PHONE["width"]
        assert sizes["background"] == "rgb(15, 17, 21)"  # the dark palette
        send_box = await page.locator("#send").bounding_box()
        assert send_box is not None and send_box["x"] + send_box["width"] <= PHONE["width"]
        await page.screenshot(path=screenshot_path("web-chat-phone.png"))


async def test_busy_rate_limited_and_not_ready_are_shown_and_waited_out(
    chat_server: ChatServer, browser: Browser
) -> None:
    """The refusals are injected into the socket so that their retry_after values are exact;
    the server's own refusals are tested in test_admission.py and test_rate_limits.py."""
    refusals: list[tuple[str, int | None]] = [
        ("server_busy", 2),
        ("rate_limited", 1),
        ("not_ready", None),
    ]

    def route(ws: WebSocketRoute) -> None:
        server = ws.connect_to_server()

        def from_page(message: str | bytes) -> None:
            frame = json.loads(message)
            if frame.get("type") != "chat" or not refusals:
                server.send(message)
                return
            code, retry_after = refusals.pop(0)
            error = {"type": "error", "id": frame["id"], "code": code, "message": code}
            if retry_after is not None:
                error["retry_after"] = retry_after
            ws.send(json.dumps(error))

        ws.on_message(from_page)

    async with open_tab(browser) as tab:
        page = tab.page
        await page.route_web_socket(lambda url: "/ws" in url, route)
        await load(tab, chat_server)
        await set_settings(page, max_tokens=8)
        banner = page.locator("#banner")
        send_button = page.locator("#send")
        prompt = page.get_by_label("Message", exact=True)

        await send(page, "Hello")
        await expect(banner).to_contain_text("The server is busy. You can send again in 2 s.")
        await expect(send_button).to_be_disabled()
        await expect(prompt).to_have_value("Hello")  # given back, to send again
        await expect(page.locator(".msg.user").last).to_have_attribute("data-state", "failed")
        await expect(page.locator(".msg.user").last).to_contain_text("the server is busy")
        await expect(send_button).to_be_enabled(timeout=5_000)
        await expect(banner).to_be_hidden()

        await prompt.press("Enter")
        await expect(banner).to_contain_text("(rate limited). You can send again in 1 s.")
        await expect(send_button).to_be_enabled(timeout=5_000)

        await prompt.press("Enter")
        await expect(page.locator(".msg.user").last).to_contain_text("the model is still loading")
        await expect(page.locator("#conn")).to_have_attribute("data-state", "ready")
        await expect(send_button).to_be_enabled()

        await prompt.press("Enter")  # the server answers this one
        await wait_reply(page)
        await expect(page.locator(".msg.user[data-state='failed']")).to_have_count(3)
        await expect(page.locator(".msg.assistant")).to_have_count(1)


async def test_unauthorized_asks_for_a_key_and_sends_it_first(
    chat_server: ChatServer, browser: Browser
) -> None:
    """The page's side of the auth contract in app.js, against a socket that plays the server's.

    The server has no API keys yet, so the check is injected: a socket must open with
    {"type": "auth", "api_key": "right"}, else it gets `unauthorized` and is closed with 4401.
    """
    sockets: list[list[str]] = []  # the types of the frames each socket sent

    def route(ws: WebSocketRoute) -> None:
        server = ws.connect_to_server()
        sent: list[str] = []
        sockets.append(sent)
        authed = False

        async def refuse(frame_id: str | None, message: str) -> None:
            ws.send(
                json.dumps(
                    {"type": "error", "id": frame_id, "code": "unauthorized", "message": message}
                )
            )
            await ws.close(code=4401, reason="unauthorized")

        async def from_page(message: str | bytes) -> None:
            nonlocal authed
            frame = json.loads(message)
            sent.append(frame.get("type"))
            if frame.get("type") == "auth":
                if frame.get("api_key") == "right":
                    authed = True
                else:
                    await refuse("auth", "wrong API key")
            elif authed:
                server.send(message)
            else:
                await refuse(frame.get("id"), "this server needs an API key")

        ws.on_message(from_page)

    async with open_tab(browser) as tab:
        page = tab.page
        await page.route_web_socket(lambda url: "/ws" in url, route)
        await load(tab, chat_server)
        await set_settings(page, max_tokens=8)
        dialog = page.get_by_role("dialog", name="API key needed")

        await send(page, "Hello")
        await expect(dialog).to_be_visible()
        await expect(page.locator(".msg.user").last).to_contain_text("an API key is needed")
        await expect(page.get_by_label("API key", exact=True)).to_be_focused()
        await page.get_by_label("API key", exact=True).fill("wrong")
        await page.get_by_role("button", name="Use key").click()
        await expect(dialog).to_be_visible()  # asked again
        await expect(dialog).to_contain_text("wrong API key")
        await page.get_by_label("API key", exact=True).fill("right")
        await page.keyboard.press("Enter")
        await expect(dialog).to_be_hidden()
        await expect(page.locator("#conn")).to_have_attribute("data-state", "ready")

        await expect(page.get_by_label("Message", exact=True)).to_have_value("Hello")
        await page.get_by_label("Message", exact=True).press("Enter")
        await wait_reply(page)
        assert await page.evaluate("sessionStorage.getItem('chatserver.apiKey')") == "right"
        assert await page.evaluate("localStorage.getItem('chatserver.apiKey')") is None
        assert sockets[0] == ["chat"]  # no key yet: no auth frame
        assert sockets[-1] == ["auth", "chat"]


async def test_wrong_api_key_is_refused_and_a_right_one_works(browser: Browser) -> None:
    """The auth contract end to end: a server started with --api-key, the page asking for it."""
    proc = await asyncio.to_thread(
        lambda: ServerProcess(*SERVER_FLAGS, "--api-key", "right-key").wait_ready()
    )
    try:
        async with open_tab(browser) as tab:
            page = tab.page
            await page.goto(proc.url + "/")
            await set_settings(page, max_tokens=8)
            dialog = page.get_by_role("dialog", name="API key needed")

            await send(page, "Hello")  # refused: the socket has sent no key
            await expect(dialog).to_be_visible()
            await expect(page.locator(".msg.user").last).to_contain_text("an API key is needed")
            await page.get_by_label("API key", exact=True).fill("wrong-key")
            await page.get_by_role("button", name="Use key").click()
            await expect(dialog).to_be_visible()  # asked again
            await expect(dialog).to_contain_text("not valid")
            await page.get_by_label("API key", exact=True).fill("right-key")
            await page.keyboard.press("Enter")
            await expect(dialog).to_be_hidden()
            await expect(page.locator("#conn")).to_have_attribute("data-state", "ready")

            await expect(page.get_by_label("Message", exact=True)).to_have_value("Hello")
            await page.get_by_label("Message", exact=True).press("Enter")
            await wait_reply(page)
            auth_frames = [f for f in tab.frames if f.get("id") == "auth"]
            assert [f["code"] for f in auth_frames] == ["unauthorized"]  # the wrong key's

            # A reload keeps the key for the tab: the socket resumes the chat after its
            # auth frame, and the history comes over HTTP with the key.
            await page.reload()
            await expect(page.locator("#conn")).to_have_attribute("data-state", "ready")
            await expect(page.locator(".msg")).to_have_count(2)
            await expect(dialog).to_be_hidden()
            status, _ = await get_json(f"{proc.url}/v1/models")
            assert status == 401  # while the key-less HTTP client is refused
    finally:
        await asyncio.to_thread(proc.stop)


async def test_server_restart_shows_reconnecting_then_continues(
    chat_server: ChatServer, browser: Browser
) -> None:
    """Runs last: it replaces the module's server with a new one on the same port."""
    async with chat_tab(browser, chat_server, max_tokens=12) as tab:
        page = tab.page
        await send(page, "Hello! Who are you?")
        await wait_reply(page)
        session_id = await page.evaluate("localStorage.getItem('chatserver.session')")
        conn = page.locator("#conn")

        await asyncio.to_thread(chat_server.stop)
        await expect(conn).to_have_attribute("data-state", "reconnecting")
        await expect(conn).to_contain_text("Reconnecting")
        await expect(page.locator("#send")).to_be_disabled()
        await asyncio.to_thread(chat_server.start)  # same port, same Redis
        await expect(conn).to_have_attribute("data-state", "ready", timeout=30_000)

        await send(page, "What can you do?")
        await wait_reply(page)
        await expect(page.locator(".msg")).to_have_count(4)
        assert await page.evaluate("localStorage.getItem('chatserver.session')") == session_id
        status, body = await get_json(f"{chat_server.url}/v1/sessions/{session_id}")
        assert status == 200
        assert [m["content"] for m in body["messages"] if m["role"] == "user"] == [
            "Hello! Who are you?",
            "What can you do?",
        ]
