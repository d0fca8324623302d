// AuraFlow editor extension: a small plot of the sigma schedule on the AuraFlow Sampler node.
//
// The schedule is computed by the pack's engine on the server (GET /auraflow/sigmas, nodes/routes.py), so the
// plot shows exactly the sigmas the sampler will run: same scheduler formulas, shift, denoise and the samplers
// that drop the penultimate sigma. It is re-fetched (debounced) whenever scheduler, steps, shift, denoise or
// the sampler changes. The plot is a DOM widget holding a <canvas>, so it draws in both the classic canvas and
// the Vue ("Nodes 2.0") node renderers, and it is never serialized into workflows or prompts. It is added through
// the frontend's extension hooks (nodeCreated, loadedGraphNode); no LiteGraph prototype is patched.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const ROUTE = "/auraflow/sigmas";
const PLOT_WIDGET = "auraflow_sigma_plot";
const PLOT_HEIGHT = 120;
const DEBOUNCE_MS = 150;
// widget name -> query parameter; the sampler widget is "sampler_name" on the sampler node, "sampler" elsewhere
const PARAMS = [
  ["scheduler", "scheduler"],
  ["steps", "steps"],
  ["shift", "shift"],
  ["denoise", "denoise"],
  ["sampler_name", "sampler"],
  ["sampler", "sampler"],
];
const COLORS = { background: "#16181d", grid: "#2c313a", axis: "#596273", line: "#4fc3f7", dot: "#ffd166",
                 text: "#c8ccd4", error: "#ff6b6b" };

// obj[name] (a node's or widget's own method) runs as before (if there was one), then after.apply(this, args); the
// original's result is returned
function chainAfter(obj, name, after) {
  const original = obj[name];
  obj[name] = function (...args) {
    const result = original?.apply(this, args);
    after.apply(this, args);
    return result;
  };
}

function wantsPlot(node) {
  const type = node?.constructor?.comfyClass ?? node?.type ?? "";
  const names = new Set((node?.widgets ?? []).map((w) => w.name));
  return type.startsWith("AuraFlow") && names.has("scheduler") && names.has("steps");
}

function queryFor(node) {
  const params = new URLSearchParams();
  for (const [widgetName, param] of PARAMS) {
    const widget = node.widgets?.find((w) => w.name === widgetName);
    if (widget && widget.value !== undefined && widget.value !== null && !params.has(param)) {
      params.set(param, String(widget.value));
    }
  }
  return params.toString();
}

function drawPlot(canvas, state) {
  const dpr = window.devicePixelRatio || 1;
  const width = Math.max(40, canvas.clientWidth || canvas.parentElement?.clientWidth || 200);
  const height = Math.max(40, canvas.clientHeight || PLOT_HEIGHT);
  if (canvas.width !== Math.round(width * dpr) || canvas.height !== Math.round(height * dpr)) {
    canvas.width = Math.round(width * dpr);
    canvas.height = Math.round(height * dpr);
  }
  const ctx = canvas.getContext("2d");
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.fillStyle = COLORS.background;
  ctx.fillRect(0, 0, width, height);
  ctx.font = "10px sans-serif";
  ctx.textBaseline = "top";

  if (state.error) {
    ctx.fillStyle = COLORS.error;
    wrapText(ctx, state.error, 6, 6, width - 12, 12);
    return;
  }
  const sigmas = state.sigmas;
  if (!sigmas) {
    ctx.fillStyle = COLORS.text;
    ctx.fillText("computing schedule…", 6, 6);
    return;
  }
  const left = 28, right = 6, top = 16, bottom = 14;
  const plotW = width - left - right, plotH = height - top - bottom;
  const maxSigma = Math.max(1, ...sigmas);
  const x = (i) => left + (sigmas.length > 1 ? (i / (sigmas.length - 1)) * plotW : 0);
  const y = (s) => top + (1 - s / maxSigma) * plotH;

  ctx.strokeStyle = COLORS.grid;
  ctx.lineWidth = 1;
  for (const s of [0.25, 0.5, 0.75]) {
    ctx.beginPath();
    ctx.moveTo(left, y(s * maxSigma));
    ctx.lineTo(left + plotW, y(s * maxSigma));
    ctx.stroke();
  }
  ctx.strokeStyle = COLORS.axis;
  ctx.beginPath();
  ctx.moveTo(left, top);
  ctx.lineTo(left, top + plotH);
  ctx.lineTo(left + plotW, top + plotH);
  ctx.stroke();
  ctx.fillStyle = COLORS.text;
  ctx.textAlign = "right";
  ctx.fillText(maxSigma.toFixed(maxSigma === 1 ? 0 : 2), left - 3, top - 5);
  ctx.fillText("0", left - 3, top + plotH - 5);
  ctx.textAlign = "left";
  const steps = Math.max(0, sigmas.length - 1);
  const first = sigmas.length ? sigmas[0] : 0;
  const last = sigmas.length > 1 ? sigmas[sigmas.length - 2] : first;
  ctx.fillText(`σ  ${steps} steps  ${first.toFixed(3)} → ${last.toFixed(4)} → 0`, left + 2, 2);
  if (!sigmas.length) return;

  ctx.strokeStyle = COLORS.line;
  ctx.lineWidth = 2;
  ctx.beginPath();
  sigmas.forEach((s, i) => (i ? ctx.lineTo(x(i), y(s)) : ctx.moveTo(x(i), y(s))));
  ctx.stroke();
  if (sigmas.length <= 60) {
    ctx.fillStyle = COLORS.dot;
    for (let i = 0; i < sigmas.length; i++) {
      ctx.beginPath();
      ctx.arc(x(i), y(sigmas[i]), 2, 0, 2 * Math.PI);
      ctx.fill();
    }
  }
}

function wrapText(ctx, text, x, y, maxWidth, lineHeight) {
  let line = "";
  for (const word of String(text).split(/\s+/)) {
    const next = line ? `${line} ${word}` : word;
    if (ctx.measureText(next).width > maxWidth && line) {
      ctx.fillText(line, x, y);
      y += lineHeight;
      line = word;
    } else {
      line = next;
    }
  }
  if (line) ctx.fillText(line, x, y);
}

function addSigmaPlot(node) {
  const canvas = document.createElement("canvas");
  canvas.className = "auraflow-sigma-plot";
  canvas.style.width = "100%";
  canvas.style.height = `${PLOT_HEIGHT}px`;
  canvas.style.display = "block";
  canvas.dataset.state = "loading";
  const state = { query: null, sigmas: null, error: null, seq: 0, timer: null };

  const widget = node.addDOMWidget(PLOT_WIDGET, "auraflow-sigma-plot", canvas, {
    serialize: false,
    hideOnZoom: false,
    getValue: () => undefined,
    setValue: () => {},
    getMinHeight: () => PLOT_HEIGHT + 4,
    getMaxHeight: () => PLOT_HEIGHT + 4,
  });
  widget.serialize = false; // keeps it out of widgets_values as well as out of the API prompt

  const redraw = () => drawPlot(canvas, state);

  async function refresh() {
    const query = queryFor(node);
    if (query === state.query) return;
    state.query = query;
    const seq = ++state.seq;
    canvas.dataset.state = "loading";
    try {
      const response = await api.fetchApi(`${ROUTE}?${query}`);
      let body = null;
      try {
        body = await response.json();
      } catch {
        body = null;
      }
      if (seq !== state.seq) return; // a newer request is on its way
      if (response.ok && Array.isArray(body?.sigmas)) {
        state.sigmas = body.sigmas;
        state.error = null;
        canvas.dataset.state = "ok";
        canvas.dataset.count = String(body.sigmas.length);
      } else {
        state.sigmas = null;
        state.error = body?.error ?? `sigma schedule unavailable (HTTP ${response.status} from ${ROUTE}; ` +
          "is the AuraFlow pack loaded on this server?)";
        canvas.dataset.state = "error";
      }
    } catch (err) {
      if (seq !== state.seq) return;
      state.sigmas = null;
      state.error = `sigma schedule unavailable: ${err?.message ?? err}`;
      canvas.dataset.state = "error";
    }
    redraw();
  }

  const schedule = () => {
    clearTimeout(state.timer);
    state.timer = setTimeout(refresh, DEBOUNCE_MS);
  };

  for (const [widgetName] of PARAMS) {
    const w = node.widgets?.find((x) => x.name === widgetName);
    if (w) chainAfter(w, "callback", schedule);
  }

  // values can also change without a widget callback (workflow load, undo, links): check on every draw
  chainAfter(node, "onDrawForeground", function () {
    if (queryFor(this) !== state.query) schedule();
  });
  chainAfter(node, "onRemoved", () => {
    clearTimeout(state.timer);
    state.seq++;
    resizeObserver?.disconnect();
  });

  const resizeObserver = typeof ResizeObserver === "function" ? new ResizeObserver(redraw) : null;
  resizeObserver?.observe(canvas);
  redraw();
  schedule();
  node.auraflowSchedulePlot = schedule; // a loaded workflow sets the widgets afterwards: loadedGraphNode re-asks
  return widget;
}

app.registerExtension({
  name: "AuraFlow.SigmaPlot",
  nodeCreated(node) {
    if (!wantsPlot(node)) return;
    addSigmaPlot(node);
    const size = node.computeSize?.();
    if (size) node.setSize?.([Math.max(node.size[0], size[0]), Math.max(node.size[1], size[1])]);
  },
  loadedGraphNode(node) {
    node.auraflowSchedulePlot?.();
  },
});
