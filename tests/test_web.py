"""The chat page at / in a real browser: headless Chromium (Debian's `chromium` package) driven
by Playwright, against a live server of a tiny random model on 127.0.0.1."""

import json
import shutil
import time

import httpx
import pytest
import torch

# (a test dependency, as the browser is: the README's test command installs both)
from playwright import sync_api
from test_serve import KEY, _metric, _start

from llama2 import Llama, Transformer, get_preset

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
STEP_SECONDS = 0.01  # each engine step at least this long: an answer streams for a second or two
HOSTILE = '<script>window.pwned=1</script> and <img src=x onerror="window.pwned=2">'
STORED = {
    "conversations": [
        {
            "id": "stored",
            "title": "Stored chat",
            "created": 0,
            "messages": [
                {"role": "user", "content": "Show me <b>bold</b>"},
                {
                    "role": "assistant",
                    "content": f"{HOSTILE}\n\n**bold** and *it* and `x<y>`\n\n- one\n- two\n\n"
                    "```python\nprint('<script>')\n```",
                },
            ],
        }
    ],
    "current": "stored",
}


@pytest.fixture(scope="module")
def server(small_tokenizer):
    from llama2.serve.api import create_app

    torch.manual_seed(0)
    cfg = get_preset("micro")
    model = Transformer(cfg).eval()
    with torch.no_grad():  # (sharper logits: answers run long instead of ending at once)
        for p in model.parameters():
            if p.ndim == 2:
                p.mul_(4)
    model.register_forward_pre_hook(lambda *_: time.sleep(STEP_SECONDS))
    app = create_app(Llama(model, small_tokenizer, cfg), "micro", api_key=KEY, max_batch=2)
    srv, thread, base = _start(app)
    yield base
    srv.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def browser():
    assert shutil.which(CHROMIUM), f"no browser at {CHROMIUM}: apt-get install chromium"
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM)
        yield browser
        browser.close()


@pytest.fixture
def page(browser):
    """A page in a fresh browser context (its own, empty localStorage); JavaScript errors on
    it fail the test."""
    context = browser.new_context()
    page = context.new_page()
    errors = []
    page.on("pageerror", lambda e: errors.append(e))
    page.set_default_timeout(15_000)
    yield page
    context.close()
    assert not errors


def open_chat(page, base, key=KEY):
    """Load the page and type the API key into its settings (opened by /props' 401)."""
    page.goto(base + "/")
    page.fill("#api_key", key)
    page.press("#api_key", "Tab")  # (the change event: the page asks /props again)
    if key == KEY:
        sync_api.expect(page.locator("#model")).to_have_text("micro")


def send(page, text):
    page.fill("#input", text)
    page.press("#input", "Enter")


def answered(page):
    """Wait for the answer to end; its stored text."""
    sync_api.expect(page.locator("#send")).to_be_visible()
    store = json.loads(page.evaluate("localStorage.getItem('llama2-chat')"))
    current = next(c for c in store["conversations"] if c["id"] == store["current"])
    return current["messages"]


def test_the_page_is_served_without_the_key_and_the_api_still_needs_it(server, small_tokenizer):
    from fastapi.testclient import TestClient

    from llama2.serve.api import create_app

    page = httpx.get(server + "/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "default-src 'self'" in page.headers["content-security-policy"]
    for name in ("chat.js", "api.js", "markdown.js", "storage.js", "style.css"):
        file = httpx.get(f"{server}/web/{name}")
        assert file.status_code == 200 and file.headers["cache-control"] == "no-cache"
    assert httpx.get(server + "/props").status_code == 401
    props = httpx.get(server + "/props", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert props == {
        "model": "micro",
        "max_model_len": 128,
        "defaults": {"temperature": 1.0, "top_p": 1.0, "max_tokens": 128},
    }
    cfg = get_preset("micro")
    llm = Llama(Transformer(cfg).eval(), small_tokenizer, cfg)
    with TestClient(create_app(llm, "micro", web=False)) as client:
        assert client.get("/").status_code == 404
        assert client.get("/web/chat.js").status_code == 404
        assert client.get("/props").json()["model"] == "micro"


def test_an_answer_streams_in_pieces_and_the_conversation_outlives_a_reload(server, page):
    open_chat(page, server)
    assert page.get_attribute("#temperature", "placeholder") == "server: 1"  # from /props
    assert page.get_attribute("#max_tokens", "placeholder") == "server: 128"
    page.fill("#system", "Answer briefly.")
    page.fill("#temperature", "0")
    page.fill("#max_tokens", "40")
    # every length the streaming answer's text takes, as the page renders it
    page.evaluate("""() => {
        window.lengths = [];
        new MutationObserver(() => {
            const body = document.querySelector('.message.streaming .body');
            if (body) window.lengths.push(body.textContent.length);
        }).observe(document.getElementById('messages'), {childList: true, subtree: true});
    }""")
    send(page, "hello")
    messages = answered(page)
    answer = messages[-1]["content"]
    lengths = page.evaluate("window.lengths")
    partial = {n for n in lengths if 0 < n < len(answer)}
    assert len(partial) >= 2, lengths  # seen growing, not arriving whole
    assert lengths == sorted(lengths)
    stats = page.locator(".message.assistant .stats").inner_text()
    assert "tokens/s" in stats and "40 tokens" in stats, stats
    # the page's request: its settings and the turn, as a client of the API would send them
    turns = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "hello"}]
    body = {"messages": turns, "temperature": 0, "max_tokens": 40}
    auth = {"Authorization": f"Bearer {KEY}"}
    direct = httpx.post(server + "/v1/chat/completions", json=body, headers=auth, timeout=60)
    assert answer == direct.json()["choices"][0]["message"]["content"]
    assert [m["role"] for m in messages] == ["user", "assistant"]

    page.reload()
    sync_api.expect(page.locator("#conversations li.active .title")).to_have_text("hello")
    sync_api.expect(page.locator(".message.user .body")).to_have_text("hello")
    assert answered(page)[-1]["content"] == answer


def test_stop_ends_the_answer_on_the_server(server, page):
    open_chat(page, server)
    page.fill("#temperature", "0")  # (its greedy answer runs to the end of the context)
    send(page, "hello")
    body = page.locator(".message.streaming .body")
    sync_api.expect(body).not_to_have_text("")  # streaming
    assert _metric(server, "llama2_running_requests") == 1
    page.click("#stop")
    sync_api.expect(page.locator(".message.assistant .stats")).to_contain_text("stopped")
    deadline = time.time() + 10
    while time.time() < deadline and _metric(server, "llama2_running_requests") > 0:
        time.sleep(0.05)
    assert _metric(server, "llama2_running_requests") == 0
    kept = answered(page)[-1]
    assert kept["content"] and kept["stats"]["finish"] == "stopped"


def test_model_output_shows_as_text_and_never_runs(server, page):
    page.add_init_script(f"localStorage.setItem('llama2-chat', {json.dumps(json.dumps(STORED))})")
    open_chat(page, server)
    answer = page.locator(".message.assistant .body")
    sync_api.expect(answer).to_contain_text(HOSTILE)
    assert page.locator(".message.user .body").inner_text() == "Show me <b>bold</b>"
    assert page.locator("#messages script, #messages img, #messages b").count() == 0
    assert [answer.locator(t).count() for t in ("strong", "em", "li", "pre code")] == [1, 1, 2, 1]
    assert answer.locator("pre code").inner_text() == "print('<script>')"

    # a streamed answer goes through the same renderer (the stream made up, split mid-tag)
    pieces = ["<scr", "ipt>window.pwned=3</scr", 'ipt><img src=x onerror="window.pwned=4">']
    events = [{"choices": [{"index": 0, "delta": {"content": p}}]} for p in pieces]
    sse = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"
    page.route(
        "**/v1/chat/completions",
        lambda route: route.fulfill(body=sse, content_type="text/event-stream"),
    )
    page.get_by_role("button", name="Regenerate").click()
    sync_api.expect(answer).to_have_text("".join(pieces))
    assert page.locator("#messages script, #messages img").count() == 0
    page.wait_for_timeout(200)  # (time for an image's error handler, were there one)
    assert page.evaluate("window.pwned") is None


def test_error_answers_say_what_went_wrong(server, page):
    open_chat(page, server, key="wrong")
    send(page, "hello")
    notice = page.locator("#notice")
    sync_api.expect(notice).to_contain_text("refused the API key (401)")
    assert answered(page) == []  # no empty answer kept; the message is back in the input box
    assert page.input_value("#input") == "hello"

    page.fill("#api_key", KEY)
    page.press("#api_key", "Tab")
    sync_api.expect(page.locator("#model")).to_have_text("micro")
    sync_api.expect(notice).to_be_hidden()
    page.click("#new-chat")
    send(page, "def main " * 100)  # past the model's 128 tokens
    sync_api.expect(notice).to_contain_text("too long for the model's context of 128 tokens")

    busy = {"error": {"message": "the queue is full", "type": "server_overloaded", "code": None}}
    page.route("**/v1/chat/completions", lambda r: r.fulfill(status=503, json=busy))
    page.click("#new-chat")
    send(page, "hi")
    sync_api.expect(notice).to_contain_text("The server is busy (503): the queue is full")


def test_conversations_rename_delete_export_import_and_edit(server, page):
    open_chat(page, server)
    page.fill("#max_tokens", "3")
    send(page, "first")
    answered(page)
    page.click("#new-chat")
    send(page, "second")
    answered(page)
    titles = page.locator("#conversations button.title")
    sync_api.expect(titles).to_have_text(["second", "first"])

    page.locator("#conversations li.active .rename-button").click()
    page.fill("#conversations input.rename", "renamed <i>x</i>")
    page.press("#conversations input.rename", "Enter")
    sync_api.expect(titles).to_have_text(["renamed <i>x</i>", "first"])
    sync_api.expect(page.locator("#title")).to_have_text("renamed <i>x</i>")

    titles.nth(1).click()  # switch
    sync_api.expect(page.locator(".message.user .body")).to_have_text("first")
    page.get_by_role("button", name="Edit", exact=True).click()
    page.fill(".message.user textarea.edit", "first, edited")
    page.get_by_role("button", name="Save & send").click()
    messages = answered(page)
    assert [m["content"] for m in messages][0] == "first, edited" and len(messages) == 2

    with page.expect_download() as download:
        page.click("#export")
    exported = json.loads(open(download.value.path()).read())
    assert exported["format"] == "llama2-chat" and len(exported["conversations"]) == 2

    page.once("dialog", lambda d: d.accept())
    page.locator("#conversations li.active .delete-button").click()
    sync_api.expect(titles).to_have_text(["renamed <i>x</i>"])
    page.set_input_files("#import", download.value.path())
    sync_api.expect(page.locator("#notice")).to_contain_text("Imported 2 conversation(s)")
    sync_api.expect(titles).to_have_text(["renamed <i>x</i>", "first", "renamed <i>x</i>"])
    sync_api.expect(page.locator(".message.user .body")).to_have_text("second")


def test_serve_no_web_turns_the_page_off(small_tokenizer, tmp_path, monkeypatch):
    """`llama2 serve --no-web` asks for no page; plain `llama2 serve` for one."""
    import llama2.serve.api
    from llama2 import save_hf
    from llama2.cli import main

    cfg = get_preset("micro")
    save_hf(tmp_path / "model", cfg, Transformer(cfg).state_dict(), small_tokenizer)
    calls = []
    monkeypatch.setattr(llama2.serve.api, "serve", lambda *a, **kw: calls.append(kw["web"]))
    main(["serve", str(tmp_path / "model"), "--no-web", "--no-compile"])
    main(["serve", str(tmp_path / "model"), "--no-compile"])
    assert calls == [False, True]
