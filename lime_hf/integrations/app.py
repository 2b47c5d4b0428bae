"""A small web page for guided generation with a saved LIME / LIME+1 model (`lime-hf app MODEL_DIR`).

Type a prompt, pick or edit the guide tag of each generated step, and see the generated tokens coloured by their
tag, with the tag spaCy finds in the output beside the asked one. Standard library only: `http.server` serves
one HTML page (plain JavaScript) and two JSON routes,

    GET  /api/model      -> {"name", "metadata_shift", "fields": {field: labels}}
    POST /api/generate   {"prompt", "guide": {field: [label or "", ...]}, "max_new_tokens"}
                         -> {"text", "tokens": [{"token", "fed", "asked", "found"}, ...]}  (400: {"error"})

Requests are served one at a time (`HTTPServer`): a model generates for one prompt at a time anyway.
"""

from __future__ import annotations

import json
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

from ..configuration_lime import RESERVED_LABELS
from ..modeling_lime import LimeForCausalLM
from ..tagged_generation import generate_with_tags
from ..tokenization_lime import LimeTokenizer

MAX_NEW_TOKENS = 64  # what one request may ask for: the page is for looking, not for long texts
DEFAULT_PROMPT = "Emma was"

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>LIME guided generation</title>
<style>
  body { font: 15px/1.45 system-ui, sans-serif; margin: 24px; color: #222; max-width: 1100px; }
  h1 { font-size: 20px; margin: 0 0 4px; }
  .model { color: #555; margin-bottom: 16px; }
  label { font-weight: 600; margin-right: 6px; }
  input[type=text] { width: 420px; font: inherit; padding: 4px 6px; }
  input[type=number] { width: 56px; font: inherit; padding: 3px; }
  button { font: inherit; padding: 4px 14px; margin-left: 8px; }
  table.guide { border-collapse: collapse; margin: 12px 0; }
  table.guide td, table.guide th { border: 1px solid #ccc; padding: 2px 6px; text-align: center; }
  table.guide select { font: inherit; max-width: 96px; }
  #text { font-size: 18px; margin: 14px 0 6px; white-space: pre-wrap; }
  #tokens { display: flex; flex-wrap: wrap; gap: 6px; margin: 8px 0; }
  .token { border-radius: 5px; padding: 3px 6px; min-width: 34px; text-align: center; }
  .token .piece { font: 16px/1.3 ui-monospace, monospace; white-space: pre; display: block; }
  .token .tags { font-size: 11px; display: block; color: #333; }
  .miss { outline: 2px solid #c0392b; }
  .error { color: #c0392b; font-weight: 600; margin: 8px 0; }
  .note { color: #555; font-size: 13px; }
</style>
</head>
<body>
<h1>LIME guided generation</h1>
<div class="model" id="model">loading the model...</div>
<div>
  <label for="prompt">Prompt</label><input type="text" id="prompt">
  <label for="steps" style="margin-left:12px">Steps</label><input type="number" id="steps" min="1" max="64" value="6">
  <button id="generate">Generate</button>
</div>
<div id="guide-area"></div>
<div id="error" class="error"></div>
<div id="text"></div>
<div id="tokens"></div>
<div class="note" id="legend"></div>
<script>
let model = null;

function colour(field, tag) {  // the tag's place in the inventory, spread round the colour wheel
  const index = model.fields[field].indexOf(tag);
  return index < 0 ? "#e4e4e4" : `hsl(${(index * 137.5) % 360}, 70%, 82%)`;
}

function fieldNames() {  // pos first: the field most people guide
  return Object.keys(model.fields).sort((a, b) => (b === "pos") - (a === "pos"));
}

function guideTable() {
  const area = document.getElementById("guide-area");
  area.innerHTML = "";
  if (!model.metadata_shift) {
    area.innerHTML = '<p class="note">A LIME model (shift 0) tags what it writes itself: it takes no guidance.</p>';
    return;
  }
  const steps = Number(document.getElementById("steps").value);
  const table = document.createElement("table");
  table.className = "guide";
  let head = "<tr><th>step</th>";
  for (let i = 0; i < steps; i++) head += `<th>${i + 1}</th>`;
  table.innerHTML = head + "</tr>";
  for (const field of fieldNames()) {
    const labels = model.fields[field];
    const row = document.createElement("tr");
    row.innerHTML = `<th>${field}</th>`;
    for (let i = 0; i < steps; i++) {
      const select = document.createElement("select");
      select.id = `guide-${field}-${i}`;
      select.dataset.field = field;
      select.add(new Option("(none)", ""));
      for (const label of labels) select.add(new Option(label, label));
      const cell = document.createElement("td");
      cell.appendChild(select);
      row.appendChild(cell);
    }
    table.appendChild(row);
  }
  area.appendChild(table);
}

function guide() {
  const result = {};
  for (const field of Object.keys(model.fields)) {
    const chosen = [...document.querySelectorAll(`select[data-field="${field}"]`)].map(s => s.value);
    while (chosen.length && !chosen[chosen.length - 1]) chosen.pop();
    if (chosen.length) result[field] = chosen;
  }
  return result;
}

async function generate() {
  document.getElementById("error").textContent = "";
  const response = await fetch("/api/generate", {
    method: "POST",
    headers: {"Content-Type": "application/json"},
    body: JSON.stringify({
      prompt: document.getElementById("prompt").value,
      guide: model.metadata_shift ? guide() : {},
      max_new_tokens: Number(document.getElementById("steps").value),
    }),
  });
  const answer = await response.json();
  if (!response.ok) { document.getElementById("error").textContent = answer.error; return; }
  document.getElementById("text").textContent = answer.text;
  const tokens = document.getElementById("tokens");
  tokens.innerHTML = "";
  const field = fieldNames()[0];
  answer.tokens.forEach((token, step) => {
    const box = document.createElement("div");
    const asked = token.asked[field];
    box.className = "token" + (asked && asked !== token.found[field] ? " miss" : "");
    box.id = `token-${step}`;
    box.style.background = colour(field, token.found[field]);
    box.title = fieldNames().map(f => `${f}: fed ${token.fed[f]}, spaCy ${token.found[f]}`).join("\\n");
    const piece = document.createElement("span");
    piece.className = "piece";
    piece.textContent = token.token;
    const tags = document.createElement("span");
    tags.className = "tags";
    tags.textContent = (asked ? `asked ${asked} · ` : "") + `spaCy ${token.found[field]}`;
    box.append(piece, tags);
    tokens.appendChild(box);
  });
  const guided = answer.tokens.filter(t => t.asked[field]);
  const agree = guided.filter(t => t.asked[field] === t.found[field]).length;
  document.getElementById("legend").textContent =
    `Colour: the ${field} tag spaCy finds in the output. ` +
    (guided.length ? `spaCy finds the asked tag on ${agree} of ${guided.length} guided tokens (misses outlined).` : "");
}

async function start() {
  model = await (await fetch("/api/model")).json();
  const kind = model.metadata_shift ? "LIME+1 (guidable)" : "LIME";
  document.getElementById("model").textContent = `${model.name}: ${kind}, fields ${fieldNames().join(", ")}`;
  document.getElementById("prompt").value = model.prompt;
  guideTable();
  document.getElementById("steps").addEventListener("change", guideTable);
  document.getElementById("generate").addEventListener("click", generate);
  document.body.dataset.ready = "1";
}
start();
</script>
</body>
</html>
"""


class AppHandler(BaseHTTPRequestHandler):
    """The page and its two JSON routes; the server holds `model`, `tokenizer` and `name`."""

    server: AppServer

    def do_GET(self) -> None:
        if self.path == "/":
            self.reply(HTTPStatus.OK, PAGE.encode("utf-8"), "text/html; charset=utf-8")
        elif self.path == "/api/model":
            config = self.server.model.config
            fields = {
                field: [label for label in labels if label not in RESERVED_LABELS]
                for field, labels in self.server.tokenizer.metadata_fields.items()
            }
            self.reply_json(
                HTTPStatus.OK,
                {
                    "name": self.server.name,
                    "metadata_shift": config.metadata_shift,
                    "fields": fields,
                    "prompt": DEFAULT_PROMPT,
                },
            )
        else:
            self.reply_json(HTTPStatus.NOT_FOUND, {"error": f"no page {self.path}"})

    def do_POST(self) -> None:
        if self.path != "/api/generate":
            self.reply_json(HTTPStatus.NOT_FOUND, {"error": f"no route {self.path}"})
            return
        try:
            request = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
            prompt, guide, steps = parse_request(request)
            sequence = generate_with_tags(
                self.server.model, self.server.tokenizer, prompt, guide, max_new_tokens=steps, do_sample=False
            )[0]
        except ValueError as error:  # a bad request: empty prompt, unknown label, guidance for LIME, ...
            self.reply_json(HTTPStatus.BAD_REQUEST, {"error": str(error)})
            return
        self.reply_json(HTTPStatus.OK, sequence)

    def reply_json(self, status: HTTPStatus, body: dict[str, Any]) -> None:
        self.reply(status, json.dumps(body).encode("utf-8"), "application/json")

    def reply(self, status: HTTPStatus, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the terminal shows the address, not every request."""


def parse_request(request: Any) -> tuple[str, dict[str, list[str]], int]:
    """The prompt, the guidance (empty steps between asked ones stay unguided) and the step count of a request."""
    if not isinstance(request, dict):
        raise ValueError("The request must be a JSON object.")
    prompt = request.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("The prompt is empty: type the text to continue.")
    steps = request.get("max_new_tokens", 8)
    if not isinstance(steps, int) or not 1 <= steps <= MAX_NEW_TOKENS:
        raise ValueError(f"Steps must be a whole number from 1 to {MAX_NEW_TOKENS}, got {steps!r}.")
    guide = request.get("guide") or {}
    if not isinstance(guide, dict) or not all(isinstance(labels, list) for labels in guide.values()):
        raise ValueError("`guide` must map each field to a list of labels, one per step.")
    if any(not label for labels in guide.values() for label in labels):
        # A step left empty between asked ones: guidance is a contiguous schedule, so say so.
        raise ValueError("Guidance must be contiguous: pick a tag for every step up to the last guided one.")
    return prompt, {field: list(labels) for field, labels in guide.items() if labels}, steps


class AppServer(HTTPServer):
    """An `HTTPServer` that holds the model, its tokenizer and the name to show."""

    def __init__(self, address: tuple[str, int], model: LimeForCausalLM, tokenizer: LimeTokenizer, name: str):
        super().__init__(address, AppHandler)
        self.model, self.tokenizer, self.name = model, tokenizer, name


def serve(
    model: LimeForCausalLM,
    tokenizer: LimeTokenizer,
    host: str = "127.0.0.1",
    port: int = 8765,
    name: str = "model",
) -> None:
    """Serve the page until interrupted (Ctrl-C)."""
    server = AppServer((host, port), model, tokenizer, name)
    print(f"Serving {name} on http://{server.server_address[0]}:{server.server_address[1]}/ (Ctrl-C stops)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
