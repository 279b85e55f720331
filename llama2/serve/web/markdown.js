// A small Markdown subset rendered as DOM nodes: paragraphs (line breaks kept), fenced code
// blocks, inline code, bold, italic, headings and lists. Model output only ever becomes text
// nodes (createTextNode / textContent), never HTML: an answer holding <script> or
// <img onerror=...> shows those characters and runs nothing.

const FENCE = /^\s*(```|~~~)\s*([\w+#.-]*)\s*$/;
const BULLET = /^\s*[-*+]\s+(.*)$/;
const NUMBERED = /^\s*(\d{1,9})[.)]\s+(.*)$/;
const HEADING = /^\s*(#{1,6})\s+(.*?)\s*#*\s*$/;

export function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function isWordChar(c) {
  return c !== undefined && /[\p{L}\p{N}_]/u.test(c);
}

// Where the emphasis opened at `start` by `mark` closes, or -1. An underscore inside a word
// (snake_case) is no emphasis.
function closing(text, start, mark) {
  const from = start + mark.length;
  if (text[from] === undefined || /\s/.test(text[from])) return -1;
  if (mark[0] === "_" && isWordChar(text[start - 1])) return -1;
  let end = text.indexOf(mark, from + 1);
  while (end !== -1) {
    const after = text[end + mark.length];
    const boundary = mark[0] !== "_" || !isWordChar(after);
    if (!/\s/.test(text[end - 1]) && boundary && !(mark.length === 1 && after === mark)) {
      return end;
    }
    end = text.indexOf(mark, end + 1);
  }
  return -1;
}

// `text` appended to `parent` with `code`, **bold** / __bold__ and *italic* / _italic_.
export function renderInline(parent, text) {
  let plain = "";
  const flush = () => {
    if (plain) parent.appendChild(document.createTextNode(plain));
    plain = "";
  };
  let i = 0;
  while (i < text.length) {
    const c = text[i];
    if (c === "`") {
      const end = text.indexOf("`", i + 1);
      if (end > i + 1) {
        flush();
        parent.appendChild(el("code", null, text.slice(i + 1, end)));
        i = end + 1;
        continue;
      }
    }
    if (c === "*" || c === "_") {
      const mark = text[i + 1] === c ? c + c : c;
      const end = closing(text, i, mark);
      if (end !== -1) {
        flush();
        const node = el(mark.length === 2 ? "strong" : "em");
        renderInline(node, text.slice(i + mark.length, end));
        parent.appendChild(node);
        i = end + mark.length;
        continue;
      }
    }
    plain += c;
    i += 1;
  }
  flush();
}

function codeBlock(code, language) {
  const block = el("div", "code-block");
  const bar = el("div", "code-bar");
  bar.appendChild(el("span", "code-language", language || "code"));
  const copy = el("button", "code-copy", "Copy");
  copy.type = "button";
  copy.addEventListener("click", () => copyText(code, copy));
  bar.appendChild(copy);
  const pre = el("pre");
  pre.appendChild(el("code", null, code));
  block.append(bar, pre);
  return block;
}

async function copyText(text, button) {
  try {
    await navigator.clipboard.writeText(text);
    button.textContent = "Copied";
  } catch {
    // (no clipboard outside a secure context: select the code for Ctrl+C instead)
    const range = document.createRange();
    range.selectNodeContents(button.parentNode.nextSibling);
    getSelection().removeAllRanges();
    getSelection().addRange(range);
    button.textContent = "Selected";
  }
  setTimeout(() => (button.textContent = "Copy"), 1500);
}

function startsBlock(line) {
  return FENCE.test(line) || HEADING.test(line) || BULLET.test(line) || NUMBERED.test(line);
}

// `text` rendered into `target` (its children replaced). A fence still open (an answer being
// streamed) runs to the end.
export function renderMarkdown(target, text) {
  target.replaceChildren();
  const lines = text.replace(/\r\n?/g, "\n").split("\n");
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    const fence = FENCE.exec(line);
    if (fence) {
      const body = [];
      for (i += 1; i < lines.length && lines[i].trim() !== fence[1]; i += 1) body.push(lines[i]);
      i += 1;
      target.appendChild(codeBlock(body.join("\n"), fence[2]));
      continue;
    }
    if (!line.trim()) {
      i += 1;
      continue;
    }
    const heading = HEADING.exec(line);
    if (heading) {
      const node = el(`h${Math.min(heading[1].length + 2, 6)}`);
      renderInline(node, heading[2]);
      target.appendChild(node);
      i += 1;
      continue;
    }
    const pattern = BULLET.test(line) ? BULLET : NUMBERED.test(line) ? NUMBERED : null;
    if (pattern) {
      const list = el(pattern === BULLET ? "ul" : "ol");
      if (pattern === NUMBERED) list.start = Number(NUMBERED.exec(line)[1]);
      for (let m; i < lines.length && (m = pattern.exec(lines[i])); i += 1) {
        const item = el("li");
        renderInline(item, m[m.length - 1]);
        list.appendChild(item);
      }
      target.appendChild(list);
      continue;
    }
    const paragraph = [];
    for (; i < lines.length && lines[i].trim() && !startsBlock(lines[i]); i += 1) {
      paragraph.push(lines[i]);
    }
    const node = el("p");
    renderInline(node, paragraph.join("\n"));
    target.appendChild(node);
  }
}
