// A small Markdown subset rendered straight into DOM nodes, for chat messages.
//
// Safe by construction rather than by sanitizing: text only ever reaches the
// page through text nodes (never innerHTML), elements come from a fixed list,
// and a link keeps its href only when it parses as an absolute http:, https:
// or mailto: URL; any other link or image (javascript:, data:, relative, ...)
// is shown as the literal text it was written as. Images are shown as links,
// so a message never makes the browser fetch anything.
//
// Blocks: paragraphs, fenced code (``` or ~~~, unterminated ones too, since a
// streaming reply is rendered as it grows), headings, lists, block quotes,
// tables, rules. Inline: code spans, **strong**, *em*, ~~strike~~, links,
// bare http(s) URLs, backslash escapes.

const SAFE_SCHEMES = new Set(["http:", "https:", "mailto:"]);
const MAX_DEPTH = 8; // nesting of quotes and inline spans; deeper is shown as text

/** Replace the children of `target` with `source` rendered as Markdown. */
export function renderMarkdown(source, target) {
  target.replaceChildren(...renderBlocks(String(source).replace(/\r\n?/g, "\n").split("\n"), 0));
}

/** The href to give a link, or null when the URL must not be followed. */
export function safeHref(url) {
  let parsed;
  try {
    parsed = new URL(url); // no base: relative URLs throw and are refused
  } catch {
    return null;
  }
  return SAFE_SCHEMES.has(parsed.protocol) ? parsed.href : null;
}

function el(tag, className) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  return node;
}

const FENCE = /^ {0,3}(`{3,}|~{3,})\s*([^\s`]*)/;
const HEADING = /^ {0,3}(#{1,6})(?:\s+(.*?))?\s*#*\s*$/;
const RULE = /^ {0,3}([-*_])(?:\s*\1){2,}\s*$/;
const LIST_ITEM = /^(\s*)([-*+]|\d{1,9}[.)])\s+(.*)$/;
const QUOTE = /^ {0,3}>\s?(.*)$/;
const TABLE_SEP = /^\s*\|?\s*:?-+:?\s*(\|\s*:?-+:?\s*)*\|?\s*$/;

function isBlockStart(line) {
  return (
    FENCE.test(line) || HEADING.test(line) || RULE.test(line) || LIST_ITEM.test(line) || QUOTE.test(line)
  );
}

function renderBlocks(lines, depth) {
  const out = [];
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    if (!line.trim()) {
      i++;
      continue;
    }
    const fence = line.match(FENCE);
    if (fence) {
      const close = new RegExp(`^ {0,3}${fence[1][0] === "`" ? "`" : "~"}{${fence[1].length},}\\s*$`);
      const body = [];
      for (i++; i < lines.length && !close.test(lines[i]); i++) body.push(lines[i]);
      i++; // the closing fence, or past the end while a reply still streams
      out.push(codeBlock(body.join("\n"), fence[2]));
      continue;
    }
    const heading = line.match(HEADING);
    if (heading) {
      // Message headings sit under the page's own h1/h2.
      const h = el(`h${Math.min(6, heading[1].length + 2)}`);
      renderInline(heading[2] || "", h, depth);
      out.push(h);
      i++;
      continue;
    }
    if (RULE.test(line)) {
      out.push(el("hr"));
      i++;
      continue;
    }
    if (QUOTE.test(line) && depth < MAX_DEPTH) {
      const inner = [];
      for (; i < lines.length && QUOTE.test(lines[i]); i++) inner.push(lines[i].match(QUOTE)[1]);
      const quote = el("blockquote");
      quote.append(...renderBlocks(inner, depth + 1));
      out.push(quote);
      continue;
    }
    if (LIST_ITEM.test(line)) {
      i = renderList(lines, i, out, depth);
      continue;
    }
    if (
      line.includes("|") &&
      i + 1 < lines.length &&
      TABLE_SEP.test(lines[i + 1]) &&
      lines[i + 1].includes("-")
    ) {
      i = renderTable(lines, i, out, depth);
      continue;
    }
    const para = [line];
    for (i++; i < lines.length && lines[i].trim() && !isBlockStart(lines[i]); i++) para.push(lines[i]);
    const p = el("p");
    renderInline(para.join("\n"), p, depth);
    out.push(p);
  }
  return out;
}

function codeBlock(text, lang) {
  const pre = el("pre");
  const code = el("code");
  if (/^[\w+#.-]{1,32}$/.test(lang)) {
    code.className = `language-${lang}`;
    pre.dataset.lang = lang; // shown as a caption by the stylesheet
  }
  code.textContent = text;
  pre.append(code);
  return pre;
}

function renderList(lines, i, out, depth) {
  const first = lines[i].match(LIST_ITEM);
  const ordered = /\d/.test(first[2]);
  const list = el(ordered ? "ol" : "ul");
  if (ordered && parseInt(first[2], 10) !== 1) list.start = parseInt(first[2], 10);
  let item = null;
  let text = [];
  const flush = () => {
    if (item) renderInline(text.join("\n"), item, depth);
  };
  for (; i < lines.length; i++) {
    const line = lines[i];
    const m = line.match(LIST_ITEM);
    if (m && /\d/.test(m[2]) === ordered) {
      flush();
      item = el("li");
      list.append(item);
      // A nested item keeps its marker as text, since nesting is flattened.
      text = [m[1].length >= 2 ? `${m[2]} ${m[3]}` : m[3]];
    } else if (line.trim() && /^\s/.test(line) && !FENCE.test(line)) {
      text.push(line.trim()); // a continuation line of the item
    } else if (!line.trim() && i + 1 < lines.length && LIST_ITEM.test(lines[i + 1])) {
      continue; // a blank line between items (a "loose" list)
    } else {
      break;
    }
  }
  flush();
  out.push(list);
  return i;
}

function splitRow(line) {
  let row = line.trim();
  if (row.startsWith("|")) row = row.slice(1);
  if (row.endsWith("|") && !row.endsWith("\\|")) row = row.slice(0, -1);
  return row.split(/(?<!\\)\|/).map((cell) => cell.trim());
}

function renderTable(lines, i, out, depth) {
  const wrap = el("div", "table-wrap"); // scrolls sideways on narrow screens
  const table = el("table");
  const head = el("thead");
  const headRow = el("tr");
  for (const cell of splitRow(lines[i])) {
    const th = el("th");
    th.scope = "col";
    renderInline(cell, th, depth);
    headRow.append(th);
  }
  head.append(headRow);
  const body = el("tbody");
  for (i += 2; i < lines.length && lines[i].includes("|") && lines[i].trim(); i++) {
    const tr = el("tr");
    for (const cell of splitRow(lines[i])) {
      const td = el("td");
      renderInline(cell, td, depth);
      tr.append(td);
    }
    body.append(tr);
  }
  table.append(head, body);
  wrap.append(table);
  out.push(wrap);
  return i;
}

// One regex, alternatives in priority order; exec() finds the leftmost match.
const INLINE = new RegExp(
  [
    String.raw`\\([\\\x60*_{}\[\]()#+\-.!~|<>])`, // 1: backslash escape
    String.raw`(\x60+)([\s\S]*?[^\x60])\2(?!\x60)`, // 2, 3: code span
    String.raw`\*\*([^\s*](?:[\s\S]*?[^\s])?)\*\*`, // 4: strong
    String.raw`(?<![\p{L}\p{N}_])__([^\s_](?:[\s\S]*?[^\s])?)__(?![\p{L}\p{N}_])`, // 5: strong
    String.raw`\*([^\s*](?:[\s\S]*?[^\s*])?)\*`, // 6: em
    String.raw`(?<![\p{L}\p{N}_])_([^\s_](?:[\s\S]*?[^\s_])?)_(?![\p{L}\p{N}_])`, // 7: em
    String.raw`~~([^\s~](?:[\s\S]*?[^\s])?)~~`, // 8: strike
    // 9, 10, 11: link or image: [text](url "title")
    String.raw`(!?)\[([^\[\]\n]*)\]\(\s*<?([^\s()<>]*(?:\([^\s()<>]*\)[^\s()<>]*)*)>?(?:\s+"[^"\n]*")?\s*\)`,
    String.raw`(https?:\/\/[^\s<>"'\x60()]*[^\s<>"'\x60().,;:!?*_~])`, // 12: bare URL
  ].join("|"),
  "gu",
);

function renderInline(text, parent, depth, inLink = false) {
  if (depth >= MAX_DEPTH) {
    parent.append(document.createTextNode(text));
    return;
  }
  const re = new RegExp(INLINE.source, INLINE.flags); // own lastIndex per call
  let last = 0;
  let m;
  while ((m = re.exec(text)) !== null) {
    if (m.index > last) parent.append(document.createTextNode(text.slice(last, m.index)));
    last = re.lastIndex;
    parent.append(inlineNode(m, depth, inLink));
  }
  if (last < text.length) parent.append(document.createTextNode(text.slice(last)));
}

function inlineNode(m, depth, inLink) {
  if (m[1] !== undefined) return document.createTextNode(m[1]);
  if (m[2] !== undefined) {
    const code = el("code");
    const body = m[3];
    code.textContent =
      body.length > 2 && body.startsWith(" ") && body.endsWith(" ") ? body.slice(1, -1) : body;
    return code;
  }
  const wrapped = [
    [m[4], "strong"],
    [m[5], "strong"],
    [m[6], "em"],
    [m[7], "em"],
    [m[8], "del"],
  ].find(([inner]) => inner !== undefined);
  if (wrapped) {
    const node = el(wrapped[1]);
    renderInline(wrapped[0], node, depth + 1, inLink);
    return node;
  }
  if (m[10] !== undefined) {
    const href = inLink ? null : safeHref(m[11]); // no link inside a link
    if (href === null) return document.createTextNode(m[0]); // shown as written
    const a = link(href);
    const label = m[9] === "!" ? m[10] || m[11] : m[10];
    if (m[9] === "!") a.title = "image (not loaded)";
    if (label) renderInline(label, a, depth + 1, true);
    else a.textContent = m[11];
    return a;
  }
  const href = inLink ? null : safeHref(m[12]);
  if (href === null) return document.createTextNode(m[12]);
  const a = link(href);
  a.textContent = m[12];
  return a;
}

function link(href) {
  const a = el("a");
  a.href = href;
  a.target = "_blank";
  a.rel = "noopener noreferrer nofollow";
  return a;
}
