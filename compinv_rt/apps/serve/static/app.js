// compinv-rt playground: a static page over the HTTP API (no build step, no dependencies).
// Every call goes to this server (relative URLs) with the bearer token typed in the header, if any.
// Optional request fields (quality, attention, stream) are sent only when the server's
// /openapi.json lists them in GenerateRequest, so the page works with older and newer servers.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const COLORS = ["#ff3b30", "#0a84ff", "#34c759", "#ff9f0a", "#bf5af2", "#00c7be"];
  const STOP = new Set(("a an the and or of on in at to with by for from into onto near next " +
    "photo picture image painting render style front behind left right top bottom over under " +
    "is are its his her their this that").split(" "));
  const OPTIONAL = ["quality", "attention", "stream"];

  const state = {
    features: { quality: false, attention: false, stream: false },
    boxes: [],          // {phrase, box: [x0, y0, x1, y1]} normalized
    drag: null,         // the box being drawn: {x, y, x1, y1}
    abort: null,        // AbortController of the running generate request
    timer: null,
  };

  class ApiError extends Error {
    constructor(status, message) { super(message); this.status = status; }
  }

  // --- API ------------------------------------------------------------------------------

  function authHeaders(extra = {}) {
    const token = $("token").value.trim();
    return token ? { ...extra, Authorization: `Bearer ${token}` } : extra;
  }

  async function errorOf(resp) {
    let message = `${resp.status} ${resp.statusText}`;
    try {
      const body = await resp.json();
      if (body && typeof body.error === "string") message = body.error;
    } catch (_) { /* not JSON: keep the status line */ }
    if (resp.status === 401) message += " — type the server's token at the top right";
    return new ApiError(resp.status, message);
  }

  async function api(method, path, { json, form, signal } = {}) {
    const init = { method, headers: authHeaders(), signal };
    if (json !== undefined) {
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(json);
    } else if (form !== undefined) {
      init.body = form;
    }
    const resp = await fetch(path, init);
    if (!resp.ok) throw await errorOf(resp);
    return resp;
  }

  function showError(err) {
    const box = $("error");
    // A stream's error event comes after a 200: no status worth showing then
    const status = err instanceof ApiError && err.status >= 400 ? ` ${err.status}` : "";
    const text = `Error${status}: ${err.message || err}`;
    box.textContent = text;
    box.hidden = false;
  }

  function clearError() { $("error").hidden = true; $("error").textContent = ""; }

  // --- what the server offers -------------------------------------------------------------

  function enumOf(prop) {
    if (!prop) return null;
    if (Array.isArray(prop.enum)) return prop.enum;
    for (const alt of prop.anyOf || prop.oneOf || []) {
      if (Array.isArray(alt.enum)) return alt.enum;
      if (alt.const !== undefined) return [alt.const];
    }
    return null;
  }

  function limitSelect(select, allowed) {
    if (!allowed) return;
    for (const opt of [...select.options]) opt.hidden = opt.disabled = !allowed.includes(opt.value);
  }

  function applyNumber(input, prop) {
    if (!prop) return;
    if (prop.maximum !== undefined) input.max = prop.maximum;
    if (prop.default !== undefined) input.value = prop.default ?? "";
  }

  function applySchema(props) {
    for (const name of OPTIONAL) state.features[name] = name in props;
    applyNumber($("n"), props.n);
    applyNumber($("steps"), props.steps);
    applyNumber($("guidance"), props.guidance);
    applyNumber($("seed"), props.seed);
    // With quality presets an empty steps field means the preset's steps.
    $("steps").placeholder = state.features.quality ? "preset" : "";
    limitSelect($("spatial"), enumOf(props.spatial));
    limitSelect($("quality"), enumOf(props.quality));
    const note = "this server does not offer it yet";
    $("quality").disabled = !state.features.quality;
    $("quality").title = state.features.quality ? "" : note;
    $("attention").disabled = !state.features.attention;
    $("attention").parentElement.title = state.features.attention ? "" : note;
    document.body.dataset.features = OPTIONAL.filter((f) => state.features[f]).join(" ");
  }

  async function detectFeatures() {
    try {
      const schema = await (await api("GET", "openapi.json")).json();
      const props = (schema.components?.schemas?.GenerateRequest?.properties) || {};
      applySchema(props);
    } catch (err) {
      applySchema({});  // the plain request: prompt, seed, steps, layout...
    }
  }

  async function loadHealth() {
    try {
      const h = await (await api("GET", "health")).json();
      const model = h.model?.name || h.model?.path || "model";
      $("server").textContent = `${model} · ${h.backend} · batch ≤ ${h.max_batch} · queue ${h.queue_depth}`;
    } catch (err) {
      $("server").textContent = `server unreachable (${err.message})`;
    }
  }

  // --- concepts ---------------------------------------------------------------------------

  function conceptRow(c) {
    const label = document.createElement("label");
    label.className = "check";
    const box = document.createElement("input");
    box.type = "checkbox";
    box.value = c.name;
    box.name = "concept";
    const token = document.createElement("code");
    token.textContent = c.token;
    token.title = "insert into the prompt";
    token.addEventListener("click", (ev) => { ev.preventDefault(); insertToken(c.token); box.checked = true; });
    label.append(box, ` ${c.name} `, token, ` ${c.vectors} vector(s)`);
    return label;
  }

  async function loadConcepts() {
    const list = $("concepts");
    try {
      const { concepts } = await (await api("GET", "v1/concepts")).json();
      const checked = new Set(selectedConcepts());
      list.replaceChildren(...concepts.map(conceptRow));
      for (const box of list.querySelectorAll("input")) box.checked = checked.has(box.value);
      if (!concepts.length) list.replaceChildren(el("span", { className: "muted", textContent: "none served" }));
    } catch (err) {
      list.textContent = "";
      const span = document.createElement("span");
      span.className = "muted";
      span.textContent = err.status === 401 ? "needs the token" : "could not list the concepts";
      list.append(span);
      if (err.status !== 401) showError(err);
    }
  }

  function selectedConcepts() {
    return [...document.querySelectorAll("#concepts input:checked")].map((b) => b.value);
  }

  function insertToken(token) {
    const p = $("prompt");
    if (!p.value.includes(token)) p.value = `${p.value.trimEnd()} ${token}`.trim();
    refreshPhrases();
  }

  async function uploadConcept() {
    clearError();
    const name = $("upload-name").value.trim();
    const emb = $("upload-embeddings").files[0];
    const art = $("upload-artifact").files[0];
    if (!/^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$/.test(name)) {
      return showError("a concept name is 1-64 letters, digits, _ or - (starting with a letter or digit)");
    }
    if (!emb || !art) return showError("choose both files: embeddings.safetensors and artifact.json");
    const form = new FormData();
    form.append("embeddings", emb, emb.name);
    form.append("artifact", art, art.name);
    try {
      const info = await (await api("PUT", `v1/concepts/${encodeURIComponent(name)}`, { form })).json();
      $("upload").open = false;
      await loadConcepts();
      insertToken(info.token);
      const box = document.querySelector(`#concepts input[value="${CSS.escape(info.name)}"]`);
      if (box) box.checked = true;
    } catch (err) {
      showError(err);
    }
  }

  // --- the layout canvas --------------------------------------------------------------------

  // The server's heuristic (spatial/layouts.py concept_phrases): "a red star and a blue circle on
  // grass" -> "red star", "blue circle". Offered first, then single words and concept tokens.
  const SPLIT = /,|\band\b|\bwith\b|\bnext to\b|\bbeside\b|\bin front of\b|\bbehind\b/;
  const TRAIL = /\b(on|in|at|under|against|over|above|below|lying|near|by)\b.*$/;
  const LEAD = /^((a|an|the|one|some|two|photo|picture|image|drawing|painting|of)\s+)+/;

  function promptPhrases() {
    const text = $("prompt").value.toLowerCase();
    const parts = text.split(SPLIT).map((p) => p.trim().replace(/\s+/g, " ").replace(TRAIL, "").trim().replace(LEAD, "").trim());
    const tokens = text.match(/<[^<>\s]+>/g) || [];
    const words = text.replace(/<[^<>\s]+>/g, " ").match(/[a-z][a-z'-]*/g) || [];
    return [...new Set([...parts.filter(Boolean), ...tokens, ...words.filter((w) => !STOP.has(w))])];
  }

  function refreshPhrases() {
    const list = $("phrases");
    list.replaceChildren(...promptPhrases().map((p) => Object.assign(document.createElement("option"), { value: p })));
  }

  function nextPhrase() {
    const used = new Set(state.boxes.map((b) => b.phrase));
    return promptPhrases().find((p) => !used.has(p)) || "";
  }

  function canvasPoint(ev) {
    const r = $("canvas").getBoundingClientRect();
    const clamp = (v) => Math.min(1, Math.max(0, v));
    return [clamp((ev.clientX - r.left) / r.width), clamp((ev.clientY - r.top) / r.height)];
  }

  function drawBox(ctx, box, color, label) {
    const { width: w, height: h } = ctx.canvas;
    const [x0, y0, x1, y1] = box;
    ctx.lineWidth = Math.max(2, w / 160);
    ctx.strokeStyle = color;
    ctx.fillStyle = `${color}22`;
    ctx.fillRect(x0 * w, y0 * h, (x1 - x0) * w, (y1 - y0) * h);
    ctx.strokeRect(x0 * w, y0 * h, (x1 - x0) * w, (y1 - y0) * h);
    if (!label) return;
    ctx.font = `${Math.round(w / 22)}px system-ui, sans-serif`;
    const pad = w / 80;
    const tw = ctx.measureText(label).width + 2 * pad;
    const th = w / 22 + pad;
    ctx.fillStyle = color;
    ctx.fillRect(x0 * w, y0 * h, tw, th);
    ctx.fillStyle = "#fff";
    ctx.textBaseline = "top";
    ctx.fillText(label, x0 * w + pad, y0 * h + pad / 2);
  }

  function drawCanvas() {
    const canvas = $("canvas");
    const ctx = canvas.getContext("2d");
    ctx.clearRect(0, 0, canvas.width, canvas.height);
    state.boxes.forEach((b, i) => drawBox(ctx, b.box, COLORS[i % COLORS.length], b.phrase || "?"));
    const d = state.drag;
    if (d) drawBox(ctx, normBox(d), "#444", "");
  }

  function normBox(d) {
    return [Math.min(d.x, d.x1), Math.min(d.y, d.y1), Math.max(d.x, d.x1), Math.max(d.y, d.y1)];
  }

  function layoutKind() { return document.querySelector('input[name="layout-kind"]:checked').value; }

  function onPointerDown(ev) {
    if (layoutKind() !== "boxes") return;
    const [x, y] = canvasPoint(ev);
    state.drag = { x, y, x1: x, y1: y };
    $("canvas").setPointerCapture(ev.pointerId);
  }

  function onPointerMove(ev) {
    if (!state.drag) return;
    [state.drag.x1, state.drag.y1] = canvasPoint(ev);
    drawCanvas();
  }

  function onPointerUp() {
    const d = state.drag;
    state.drag = null;
    if (!d) return;
    const box = normBox(d);
    if (box[2] - box[0] < 0.02 || box[3] - box[1] < 0.02) return drawCanvas();  // a click, not a box
    state.boxes.push({ phrase: nextPhrase(), box: box.map((v) => Math.round(v * 1000) / 1000) });
    if ($("spatial").value === "none") $("spatial").value = "bias";  // a layout needs a spatial mode
    renderBoxes();
  }

  function boxRow(b, i) {
    const li = document.createElement("li");
    const swatch = document.createElement("span");
    swatch.className = "swatch";
    swatch.style.background = COLORS[i % COLORS.length];
    const phrase = document.createElement("input");
    Object.assign(phrase, { type: "text", value: b.phrase, placeholder: "a phrase of the prompt" });
    phrase.setAttribute("list", "phrases");
    phrase.setAttribute("aria-label", `phrase of box ${i + 1}`);
    phrase.className = "phrase";
    phrase.addEventListener("input", () => { b.phrase = phrase.value; drawCanvas(); });
    const coords = document.createElement("span");
    coords.className = "coords";
    coords.textContent = b.box.map((v) => v.toFixed(2)).join(",");
    const del = document.createElement("button");
    Object.assign(del, { type: "button", textContent: "✕", title: "remove this box" });
    del.addEventListener("click", () => { state.boxes.splice(i, 1); renderBoxes(); });
    li.append(swatch, phrase, coords, del);
    return li;
  }

  function renderBoxes() {
    $("boxes").replaceChildren(...state.boxes.map(boxRow));
    drawCanvas();
  }

  function layoutString() {
    const clean = (p) => p.replace(/[;=]/g, " ").trim().replace(/\s+/g, " ");
    const bad = state.boxes.findIndex((b) => !clean(b.phrase));
    if (bad >= 0) throw new Error(`box ${bad + 1} has no phrase: give it a word of the prompt`);
    return state.boxes.map((b) => `${clean(b.phrase)}=${b.box.map((v) => v.toFixed(3)).join(",")}`).join(";");
  }

  function onLayoutKind() {
    const auto = layoutKind() === "auto";
    $("canvas").classList.toggle("disabled", auto);
    $("canvas-hint").textContent = auto
      ? "auto: the server predicts the boxes; they are drawn over each image."
      : "Drag on the canvas to draw a box; give it a phrase of the prompt.";
    if (auto && $("spatial").value === "none") $("spatial").value = "bias";
  }

  // --- generate -------------------------------------------------------------------------------

  function intValue(id) {
    const v = Number($(id).value);
    if ($(id).value.trim() === "" || !Number.isInteger(v)) throw new Error(`${id} must be a whole number`);
    return v;
  }

  function requestBody() {
    const body = {
      prompt: $("prompt").value, negative_prompt: $("negative").value, n: intValue("n"),
      seed: intValue("seed"), guidance: Number($("guidance").value), concepts: selectedConcepts(),
    };
    if ($("steps").value.trim() !== "" || !state.features.quality) body.steps = intValue("steps");
    const spatial = $("spatial").value;
    if (spatial !== "none") {
      body.spatial = spatial;
      if (layoutKind() === "auto") body.layout = "auto";
      else if (state.boxes.length) body.layout = layoutString();
    }
    if (state.features.quality) body.quality = $("quality").value;
    if (state.features.attention) body.attention = $("attention").checked;
    if (state.features.stream) body.stream = true;
    return body;
  }

  function setBusy(busy) {
    const button = $("generate");
    button.textContent = busy ? "Cancel" : "Generate";
    button.classList.toggle("busy", busy);
    document.body.dataset.busy = busy ? "true" : "false";
    clearInterval(state.timer);
    const bar = $("progress");
    if (!busy) return;
    bar.removeAttribute("value");  // indeterminate until the first progress event
    const started = performance.now();
    state.timer = setInterval(() => {
      if (!bar.hasAttribute("value")) $("progress-text").textContent = `${((performance.now() - started) / 1000).toFixed(1)} s`;
    }, 200);
  }

  function setProgress(step, total) {
    const bar = $("progress");
    bar.max = total;
    bar.value = step;
    $("progress-text").textContent = `step ${step} / ${total}`;
  }

  function parseEvent(block) {
    let event = "message";
    const data = [];
    for (const line of block.split("\n")) {
      if (line.startsWith("event:")) event = line.slice(6).trim();
      else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
    }
    return { event, data: data.length ? JSON.parse(data.join("\n")) : null };
  }

  async function readStream(resp) {
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      buffer += decoder.decode(value || new Uint8Array(), { stream: !done });
      buffer = buffer.replace(/\r\n|\r(?!$)/g, "\n");  // a "\r" at the end may be half of "\r\n"
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const { event, data } = parseEvent(buffer.slice(0, cut));
        buffer = buffer.slice(cut + 2);
        if (event === "progress") {
          setProgress(data.step, data.total);
          document.body.dataset.progressEvents = String(Number(document.body.dataset.progressEvents || 0) + 1);
        }
        else if (event === "result") return data;
        else if (event === "error") throw new ApiError(resp.status, data?.error || "generation failed");
      }
      if (done) throw new Error("the server closed the stream before the result");
    }
  }

  async function postGenerate(body, signal) {
    let resp;
    try {
      resp = await api("POST", "v1/generate", { json: body, signal });
    } catch (err) {
      // A server without an optional field says "<field>: unknown field": retry without them.
      const unknown = err.status === 400 && OPTIONAL.some((f) => f in body && err.message.includes(`${f}: unknown field`));
      if (!unknown) throw err;
      for (const f of OPTIONAL) { state.features[f] = false; delete body[f]; }
      resp = await api("POST", "v1/generate", { json: body, signal });
    }
    const type = resp.headers.get("content-type") || "";
    return type.startsWith("text/event-stream") ? readStream(resp) : resp.json();
  }

  async function generate(ev) {
    ev.preventDefault();
    if (state.abort) { state.abort.abort(); return; }  // the button is Cancel while running
    clearError();
    let body;
    try { body = requestBody(); } catch (err) { return showError(err); }
    state.abort = new AbortController();
    setBusy(true);
    try {
      const result = await postGenerate(body, state.abort.signal);
      const steps = result.images[0]?.sidecar?.settings?.steps ?? body.steps;
      if (steps) setProgress(steps, steps);
      addToGallery(result);
    } catch (err) {
      if (err.name === "AbortError") showError("cancelled");
      else showError(err);
      $("progress").value = 0;
      $("progress-text").textContent = "";
    } finally {
      state.abort = null;
      setBusy(false);
    }
  }

  // --- the gallery ------------------------------------------------------------------------------

  function el(tag, props = {}, ...children) {
    const node = Object.assign(document.createElement(tag), props);
    node.append(...children);
    return node;
  }

  function overlayLayout(frame, img, layout) {
    if (!layout || !Array.isArray(layout.concepts)) return;
    const canvas = el("canvas", { className: "layout", width: 512, height: 512 });
    canvas.dataset.source = layout.source || "";
    const draw = () => {
      canvas.width = 512;
      canvas.height = Math.round(512 * (img.naturalHeight || 1) / (img.naturalWidth || 1));
      const ctx = canvas.getContext("2d");
      layout.concepts.forEach((c, i) => {
        for (const b of c.boxes || []) drawBox(ctx, b, COLORS[i % COLORS.length], c.phrase);
      });
    };
    img.complete ? draw() : img.addEventListener("load", draw);
    frame.append(canvas);
  }

  // The server's grid (schemas.Attention): the image, then one tile per token, row by row in
  // min(n + 1, 6) columns. Each tile is cut out and labelled with its token; if the grid's size does
  // not divide that way, the grid is shown whole.
  function heatmapTiles(img, tokens, into) {
    const n = tokens.length + 1;
    const cols = Math.min(n, 6);
    const rows = Math.ceil(n / cols);
    const w = img.naturalWidth / cols;
    const h = img.naturalHeight / rows;
    if (!tokens.length || !Number.isInteger(w) || !Number.isInteger(h)) return;
    const tiles = tokens.map((t, k) => {
      const canvas = el("canvas", { width: w, height: h });
      const [r, c] = [Math.floor((k + 1) / cols), (k + 1) % cols];
      canvas.getContext("2d").drawImage(img, c * w, r * h, w, h, 0, 0, w, h);
      return el("figure", { className: "tile", title: t }, canvas, el("figcaption", { textContent: t }));
    });
    into.replaceChildren(...tiles);
  }

  function heatmap(attention) {
    const tokens = attention.tokens || [];
    const img = el("img", { src: `data:image/png;base64,${attention.png_base64}`, alt: "attention heatmaps per token" });
    const tiles = el("div", { className: "tiles" }, ...tokens.map((t) => el("span", { className: "chip", textContent: t })));
    const whole = el("details", {}, el("summary", { textContent: "the whole grid" }), img);
    img.complete ? heatmapTiles(img, tokens, tiles) : img.addEventListener("load", () => heatmapTiles(img, tokens, tiles));
    return el("div", { className: "heatmap" }, el("div", { className: "label", textContent: "attention per token" }), tiles, whole);
  }

  function meta(side, batch, seconds) {
    const s = side.settings || {};
    const parts = [`seed ${side.seed}`, s.steps && `${s.steps} steps`, s.scheduler,
      batch && `batch ${batch}`, seconds !== undefined && `${seconds.toFixed(1)} s`];
    const layout = side.spatial?.layout;
    if (side.spatial?.mode && side.spatial.mode !== "none") parts.push(`spatial ${side.spatial.mode}`);
    if (layout?.source) parts.push(`layout: ${layout.source === "explicit" ? "your boxes" : `predicted (${layout.source})`}`);
    return parts.filter(Boolean).join(" · ");
  }

  function imageCard(image, batch, seconds) {
    const side = image.sidecar || {};
    const src = `data:image/png;base64,${image.png_base64}`;
    const img = el("img", { className: "result", src, alt: side.prompt || "generated image" });
    const frame = el("div", { className: "frame" }, img);
    overlayLayout(frame, img, side.spatial?.layout);
    const left = el("div", { className: "side" }, frame,
      el("div", { className: "meta", textContent: meta(side, batch, seconds) }),
      el("a", { href: src, download: side.image || `compinv_${side.seed}.png`, textContent: "download PNG" }));
    const right = el("div", { className: "side" });
    if (image.attention) right.append(heatmap(image.attention));
    right.append(el("details", { className: "sidecar" },
      el("summary", { textContent: "sidecar (JSON)" }),
      el("pre", { textContent: JSON.stringify(side, null, 2) })));
    const card = el("article", { className: "card" }, left, right);
    return card;
  }

  function addToGallery(result) {
    const gallery = $("gallery");
    gallery.querySelector(".empty")?.remove();
    const cards = result.images.map((im, i) => imageCard(im, result.batch_sizes?.[i], result.seconds));
    gallery.prepend(...cards);
    document.body.dataset.generated = String(Number(document.body.dataset.generated || 0) + cards.length);
  }

  // --- start ------------------------------------------------------------------------------------

  function wire() {
    const canvas = $("canvas");
    canvas.addEventListener("pointerdown", onPointerDown);
    canvas.addEventListener("pointermove", onPointerMove);
    canvas.addEventListener("pointerup", onPointerUp);
    canvas.addEventListener("pointercancel", () => { state.drag = null; drawCanvas(); });
    $("form").addEventListener("submit", generate);
    $("prompt").addEventListener("input", refreshPhrases);
    $("prompt").addEventListener("keydown", (ev) => {
      if (ev.key === "Enter" && (ev.ctrlKey || ev.metaKey)) $("form").requestSubmit();
    });
    $("seed-random").addEventListener("click", () => { $("seed").value = Math.floor(Math.random() * 2 ** 31); });
    $("clear-boxes").addEventListener("click", () => { state.boxes = []; renderBoxes(); });
    $("upload-button").addEventListener("click", uploadConcept);
    for (const r of document.querySelectorAll('input[name="layout-kind"]')) r.addEventListener("change", onLayoutKind);
    $("token").value = sessionStorage.getItem("compinv-token") || "";
    $("token").addEventListener("change", () => {
      sessionStorage.setItem("compinv-token", $("token").value.trim());
      clearError();
      loadConcepts();
    });
  }

  async function start() {
    wire();
    refreshPhrases();
    drawCanvas();
    setBusy(false);
    await Promise.all([detectFeatures(), loadHealth(), loadConcepts()]);
    document.body.dataset.ready = "true";
  }

  start();
})();
