"""docs/web-chat.png: the chat page of `llama2 serve`, as headless Chromium shows it.

    python docs/make_screenshot.py [--out docs/web-chat.png] [--chromium /usr/bin/chromium]

The server runs on 127.0.0.1 with a tiny random model (micro shapes, Llama 2's tokenizer); its
text is noise, so the conversation shown is an example loaded into the page's storage, as an
imported export would be. Needs `pip install playwright` and Debian's `chromium` package.
"""

from __future__ import annotations

import argparse
import json
import socket
import threading
import time
from pathlib import Path

import torch

from llama2 import Llama, Tokenizer, Transformer, get_preset
from llama2.serve.api import create_app

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "tests" / "fixtures" / "ggml-vocab-llama-spm.gguf"
ANSWER = """Read it with the standard library's `csv` module: `DictReader` gives each row as a \
dict keyed by the header.

```python
import csv

with open("people.csv", newline="") as f:
    for row in csv.DictReader(f):
        print(row["name"], int(row["age"]))
```

A few things to keep in mind:
- open the file with `newline=""`, as the **csv** docs ask;
- every field comes back as a *string*: convert numbers yourself;
- for large files, this reads one row at a time."""
EXAMPLE = {
    "conversations": [
        {
            "id": "example",
            "title": "Example: reading a CSV file",
            "created": 0,
            "messages": [
                {"role": "user", "content": "How do I read a CSV file in Python?"},
                {"role": "assistant", "content": ANSWER},
            ],
        },
        {"id": "b", "title": "Release notes draft", "created": 0, "messages": []},
        {"id": "c", "title": "SQL query review", "created": 0, "messages": []},
    ],
    "current": "example",
}
SETTINGS = {"system": "You are a concise assistant for our engineering team."}


def start_server(name: str) -> tuple[object, str]:
    import uvicorn

    cfg = get_preset("micro", vocab_size=32000)
    torch.manual_seed(0)
    llm = Llama(Transformer(cfg).eval(), Tokenizer.from_file(TOKENIZER), cfg)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = create_app(llm, name)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    return server, f"http://127.0.0.1:{port}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "web-chat.png")
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    args = ap.parse_args()
    from playwright.sync_api import expect, sync_playwright

    server, base = start_server("chat")
    stored = {"llama2-chat": EXAMPLE, "llama2-chat-settings": SETTINGS}
    setup = "".join(
        f"localStorage.setItem({json.dumps(k)}, {json.dumps(json.dumps(v))});"
        for k, v in stored.items()
    )
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=args.chromium)
            page = browser.new_page(viewport={"width": 1180, "height": 680})
            page.add_init_script(setup)
            page.goto(base + "/")
            expect(page.locator("#model")).to_have_text("chat")
            page.click("#settings-toggle")
            page.fill("#input", "And write one, from a list of dicts?")
            page.screenshot(path=str(args.out))
            browser.close()
    finally:
        server.should_exit = True
    print(f"{args.out}: {args.out.stat().st_size // 1024} KiB")


if __name__ == "__main__":
    main()
