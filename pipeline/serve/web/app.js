// Digits in the browser: one page, two modes, found at start-up.
//   API mode: served by pipeline/serve/app.py at "/"; GET generate draws the grid, POST generate
//     (explicit z) the latent walk, GET metadata fills the footer.
//   Static mode (make web): no service answers "metadata", so the page loads metadata.json
//     and generator.onnx from its own folder and runs the model itself with onnxruntime-web
//     (WebAssembly). The seeded sampler is the service's, so a seed draws the same digits.
// All URLs are relative: the page works under any path prefix and on any static host.

import { interpolate, sampleLatents } from "./latents.js";

const SIDE = 28;
const PIXELS = SIDE * SIDE;
const COLS = 10; // a conditional model's digits cycle 0..9: one digit per column
const GRID_N = 3 * COLS;
const MAX_SEED = 2 ** 53 - 1; // the service's limit: the largest integer JSON keeps exact

const $ = (id) => document.getElementById(id);

/** What the page shows now; tests and curious readers find it at window.digits. */
const state = {
  mode: null, // "api" | "static"
  meta: null, // GET metadata's body
  seed: null, // the grid's seed (a number, once a draw succeeded)
  digit: null, // null: every digit in turn (conditional) or none (unconditional)
  grid: null, // {key, bytes: Uint8ClampedArray [n*784], floats: Float32Array | null}
  walk: null, // the same, for the walk's row
  draws: 0,
  firstDrawMs: null, // milliseconds from navigation to the first grid on screen
  sampleLatents,
};
window.digits = state;

/** An error whose message is written for the reader of the page. */
class ProblemError extends Error {}

// --------------------------------------------------------------------------- the two modes

/** The service's reply to a failed request, as one sentence. */
async function describe(response) {
  let detail = null;
  try {
    detail = (await response.json()).detail;
  } catch {
    // not JSON: the status line is all there is
  }
  let text = response.statusText || "no details";
  if (Array.isArray(detail)) {
    // FastAPI's 422: [{loc: ["query", "seed"], msg: "..."}, ...]
    text = detail.map((e) => `${(e.loc || []).slice(1).join(".") || "request"}: ${e.msg}`).join("; ");
  } else if (typeof detail === "string") {
    text = detail;
  }
  const retry = response.status === 429 || response.status === 503 ? " Try again in a moment." : "";
  return `The service refused the request (HTTP ${response.status}): ${text}.${retry}`;
}

/** fetch, with a network failure (service stopped, connection lost) told in words. */
async function reach(url, options) {
  try {
    return await fetch(url, options);
  } catch (error) {
    throw new ProblemError(`Could not reach the service (${error.message}); is it still running?`);
  }
}

/** API mode: the service draws; the page only shows. */
class ServiceBackend {
  constructor(meta) {
    this.meta = meta;
  }

  async generate({ n, seed, digit, z }) {
    let response;
    if (z) {
      const rows = [];
      for (let i = 0; i < n; i++) rows.push(Array.from(z.subarray(i * this.meta.latent_dim, (i + 1) * this.meta.latent_dim)));
      const body = { z: rows, format: "json", dtype: "uint8" };
      if (digit !== null) body.digit = digit;
      response = await reach("generate", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify(body),
      });
    } else {
      // The seed goes as typed: the service is the one judge of what it accepts.
      const query = new URLSearchParams({ n, seed, format: "json", dtype: "uint8" });
      if (digit !== null) query.set("digit", digit);
      response = await reach(`generate?${query}`);
    }
    if (!response.ok) throw new ProblemError(await describe(response));
    const body = await response.json();
    return { bytes: Uint8ClampedArray.from(body.images.flat(2)), floats: null };
  }
}

/** Static mode: onnxruntime-web runs generator.onnx in this tab. */
class LocalBackend {
  constructor(ort, session, meta) {
    this.ort = ort;
    this.session = session;
    this.meta = meta;
  }

  async generate({ n, seed, digit, z }) {
    const { latent_dim: dim, noise, conditional, num_classes: classes } = this.meta;
    const latents = z ?? sampleLatents(noise, n, dim, parseSeed(seed));
    const feeds = { z: new this.ort.Tensor("float32", latents, [n, dim]) };
    if (conditional) {
      const labels = BigInt64Array.from({ length: n }, (_, i) => BigInt(digit ?? i % classes));
      feeds.label = new this.ort.Tensor("int64", labels, [n]);
    }
    const { image } = await this.session.run(feeds);
    // As pipeline/inference/generator.py: clip to [0, 1]; bytes as numpy's rint(float32(x * 255)).
    const floats = image.data.map((x) => Math.min(1, Math.max(0, x)));
    const bytes = Uint8ClampedArray.from(floats, (x) => roundHalfEven(Math.fround(x * 255)));
    return { bytes, floats };
  }
}

function roundHalfEven(v) {
  const r = Math.round(v);
  return r - v === 0.5 && r % 2 !== 0 ? r - 1 : r;
}

/** Static mode checks the seed itself, in the service's words. */
function parseSeed(text) {
  const value = /^\d+$/.test(text) ? Number(text) : NaN;
  if (!(value <= MAX_SEED)) {
    throw new ProblemError(`seed: got ${JSON.stringify(text)}; allowed: an integer from 0 to ${MAX_SEED}.`);
  }
  return value;
}

const isJson = (response) => (response.headers.get("content-type") || "").startsWith("application/json");

async function connect() {
  let response = null;
  try {
    response = await fetch("metadata", { headers: { Accept: "application/json" } });
  } catch {
    // no server at all behind this page's origin: try the static files
  }
  if (response && isJson(response)) {
    if (!response.ok) throw new ProblemError(await describe(response)); // e.g. 503: no model
    state.mode = "api";
    return new ServiceBackend(await response.json());
  }
  const local = await fetch("metadata.json");
  if (!local.ok || !isJson(local)) {
    throw new ProblemError("Found neither the service (GET metadata) nor a static model (metadata.json) beside this page.");
  }
  const meta = await local.json();
  const [ort, model] = await Promise.all([import("./ort/ort.wasm.min.mjs"), fetch("generator.onnx")]);
  if (!model.ok) throw new ProblemError(`generator.onnx: HTTP ${model.status} ${model.statusText}`);
  // Threads need a cross-origin-isolated page, which a plain static host does not give.
  ort.env.wasm.numThreads = 1;
  ort.env.wasm.wasmPaths = new URL("ort/", import.meta.url).href;
  const bytes = new Uint8Array(await model.arrayBuffer());
  const session = await ort.InferenceSession.create(bytes, { executionProviders: ["wasm"] });
  state.mode = "static";
  return new LocalBackend(ort, session, meta);
}

// --------------------------------------------------------------------------- drawing

/** One canvas pixel per MNIST pixel, ten per row; empty cells stay black. */
function paint(canvas, bytes, n) {
  const rows = Math.ceil(n / COLS);
  canvas.width = COLS * SIDE;
  canvas.height = rows * SIDE;
  const context = canvas.getContext("2d", { willReadFrequently: true });
  const image = context.createImageData(canvas.width, canvas.height);
  const rgba = image.data;
  for (let p = 3; p < rgba.length; p += 4) rgba[p] = 255;
  for (let k = 0; k < n; k++) {
    const x0 = (k % COLS) * SIDE;
    const y0 = Math.floor(k / COLS) * SIDE;
    for (let y = 0; y < SIDE; y++) {
      for (let x = 0; x < SIDE; x++) {
        const value = bytes[k * PIXELS + y * SIDE + x];
        const p = ((y0 + y) * canvas.width + x0 + x) * 4;
        rgba[p] = rgba[p + 1] = rgba[p + 2] = value;
      }
    }
  }
  context.putImageData(image, 0, 0);
}

function showMessage(error) {
  const text = error instanceof ProblemError ? error.message : `Something went wrong: ${error.message || error}`;
  $("message").textContent = text;
  $("message").hidden = false;
  if (!(error instanceof ProblemError)) console.error(error);
}

function hideMessage() {
  $("message").hidden = true;
}

let backend = null;
let gridTicket = 0; // only the newest request may paint: replies can overtake each other

async function drawGrid() {
  const ticket = ++gridTicket;
  const seedText = $("seed").value.trim();
  const digit = state.digit;
  try {
    const result = await backend.generate({ n: GRID_N, seed: seedText, digit });
    if (ticket !== gridTicket) return;
    paint($("grid"), result.bytes, GRID_N);
    state.seed = Number(seedText);
    state.grid = { key: `${state.seed}/${digit}`, ...result };
    state.draws += 1;
    state.firstDrawMs ??= Math.round(performance.now());
    $("first-draw").textContent = `${state.firstDrawMs} ms after loading`;
    $("grid").dataset.key = state.grid.key;
    history.replaceState(null, "", `#seed=${state.seed}${digit === null ? "" : `&digit=${digit}`}`);
    hideMessage();
    drawWalk();
  } catch (error) {
    if (ticket === gridTicket) showMessage(error);
  }
}

// The walk goes from the grid's first row (seed s) to the first row of seed s + 1: at 0 it
// shows exactly the grid's first ten digits, each in the same style as its neighbours.
let walkBusy = false;
let walkAgain = false;

async function drawWalk() {
  if (walkBusy) {
    walkAgain = true; // the slider moves faster than the model: draw only its latest position
    return;
  }
  walkBusy = true;
  try {
    do {
      walkAgain = false;
      const { seed, digit } = state;
      const { noise, latent_dim: dim } = backend.meta;
      const other = seed < MAX_SEED ? seed + 1 : seed - 1;
      const t = Number($("walk").value) / 100;
      const from = sampleLatents(noise, COLS, dim, seed);
      const to = sampleLatents(noise, COLS, dim, other);
      const z = new Float32Array(COLS * dim);
      for (let k = 0; k < COLS; k++) {
        const row = (a) => a.subarray(k * dim, (k + 1) * dim);
        z.set(interpolate(noise, row(from), row(to), t), k * dim);
      }
      const result = await backend.generate({ n: COLS, digit, z });
      paint($("walk-canvas"), result.bytes, COLS);
      $("walk-from").textContent = seed;
      $("walk-to").textContent = other;
      state.walk = { key: `${seed}/${digit}/${t}`, z, ...result };
      $("walk-canvas").dataset.key = state.walk.key;
    } while (walkAgain);
  } catch (error) {
    showMessage(error);
  } finally {
    walkBusy = false;
  }
}

// --------------------------------------------------------------------------- controls

function randomSeed() {
  return crypto.getRandomValues(new Uint32Array(1))[0];
}

function selectDigit(digit) {
  state.digit = digit;
  for (const button of $("digits").children) {
    button.setAttribute("aria-pressed", String(button.dataset.digit === String(digit ?? "all")));
  }
}

function buildDigitButtons(classes) {
  const group = $("digits");
  const add = (label, digit) => {
    const button = document.createElement("button");
    button.type = "button";
    button.textContent = label;
    button.dataset.digit = String(digit ?? "all");
    button.addEventListener("click", () => {
      selectDigit(digit);
      drawGrid();
    });
    group.append(button);
  };
  add("all", null);
  for (let d = 0; d < classes; d++) add(String(d), d);
  group.hidden = false;
}

/** The seed and digit asked for in the address (#seed=7&digit=7), else a random seed. */
function readLocation() {
  const asked = new URLSearchParams(location.hash.slice(1));
  const digit = asked.get("digit");
  const classes = backend.meta.num_classes;
  if (backend.meta.conditional) {
    selectDigit(digit !== null && /^\d+$/.test(digit) && Number(digit) < classes ? Number(digit) : null);
  }
  $("seed").value = asked.get("seed") ?? randomSeed();
}

function showMetadata(meta) {
  const props = meta.metadata || {};
  $("meta-preset").textContent = props.preset || "–";
  $("meta-run").textContent = props.mlflow_run_id || "–";
  $("meta-date").textContent = props.export_date || "–";
  const model = meta.conditional ? `conditional on ${meta.num_classes} digits` : "unconditional";
  $("mode").textContent =
    state.mode === "api"
      ? `Drawn by the service (onnxruntime on the server); model ${model}, ${meta.noise} noise of ${meta.latent_dim} dimensions.`
      : `Drawn in this browser (onnxruntime-web, WebAssembly) from generator.onnx; model ${model}, ${meta.noise} noise of ${meta.latent_dim} dimensions.`;
  document.body.dataset.mode = state.mode;
}

async function start() {
  try {
    backend = await connect();
  } catch (error) {
    $("mode").textContent = "Not connected.";
    showMessage(error);
    return;
  }
  state.meta = backend.meta;
  showMetadata(backend.meta);
  if (backend.meta.conditional) buildDigitButtons(backend.meta.num_classes);
  readLocation();
  window.addEventListener("hashchange", () => {
    readLocation(); // a link or an edited address: #seed=7&digit=7
    drawGrid();
  });
  $("seed-form").addEventListener("submit", (event) => {
    event.preventDefault();
    drawGrid();
  });
  $("new").addEventListener("click", () => {
    $("seed").value = randomSeed();
    drawGrid();
  });
  $("walk").addEventListener("input", () => {
    if (state.seed !== null) drawWalk();
  });
  await drawGrid();
}

start();
