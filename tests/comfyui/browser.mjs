// Drives ComfyUI's editor in a real headless Chromium for tests/comfyui/test_comfyui.py.
//
//   node browser.mjs '<json job>'   (prints one JSON result line on stdout)
//
// job: { url, chromium, outDir, workflows: [{name, path}], plot: {nodeType, set: {widget: value}, expectCount},
//        vue: {nodeType} }
// For each editor-format workflow: load it with app.loadGraphData and report the node types the editor does not
// know, nodes it flags with errors, any missing-node message on screen, and the missing models the editor lists in
// its Errors panel (opened from the "View details" toast) with their folder, URL and Download button, and which of
// the files its loaders name in properties.models show anywhere on screen. Then the sigma plot in the classic
// canvas renderer: put a plot node on the canvas, change its widgets through their callbacks, wait for the plot
// to redraw with the new schedule, screenshot it, and check that a 400 from the route shows its message. Then the
// same node in the Vue renderer ("Nodes 2.0"), changed with a real click on a widget button. Then (hooks) a
// ComfyUI MODEL linked to the sampler's union socket, and the remote node's right-click menu item.
// Needs the npm package playwright-core (found through NODE_PATH) and a system Chromium.
import fs from "node:fs";
import { createRequire } from "node:module";
import path from "node:path";

const { chromium } = createRequire(import.meta.url)("playwright-core"); // require() honours NODE_PATH

const job = JSON.parse(process.argv[2]);
const FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
               "--disable-component-update", "--disable-sync"];
const result = { consoleErrors: [], pageErrors: [], workflows: {}, plot: null };

function missingText() {
  // any visible element that talks about missing nodes (the dialog / error overlay the editor shows); the
  // missing-models list's own lines ("Missing Models") are models, not nodes, and are left to missingModelRows
  const hits = [];
  for (const el of document.querySelectorAll("body *")) {
    if (el.children.length || !el.offsetParent) continue;
    const text = el.textContent?.trim() ?? "";
    if (/\bmodels?\b/i.test(text) && !/node/i.test(text)) continue;
    if (/missing node|not found|missing.*(custom|node)|nodes? (are|is) missing/i.test(text)) hits.push(text.slice(0, 200));
  }
  return hits;
}

function missingModelRows() {
  // the rows of the Errors panel's "Missing Models" card (ComfyUI frontend 1.4x): each row shows the file name, the
  // folder it belongs in, a Download button where the frontend allows one (.safetensors/.ckpt/... from Hugging Face
  // or Civitai; never .gguf) and a Copy URL button; the URL itself is read from the frontend's missingModel store
  const pinia = document.querySelector("#vue-app")?.__vue_app__?.config.globalProperties.$pinia;
  const candidates = pinia?._s.get("missingModel")?.missingModelCandidates ?? [];
  return [...document.querySelectorAll('[data-testid="missing-model-locate"]')].filter((b) => b.offsetParent)
    .map((locate) => {
      const row = locate.closest("div.flex-col");
      const name = [...row.querySelectorAll("[title]")].map((e) => e.title).find((t) => t && t !== "Copy URL");
      const label = row.querySelector("span.block")?.textContent.trim() ?? "";  // "<folder>" or "<folder> · <size>"
      const candidate = candidates.find((c) => c.name === name);
      return { name, directory: label.split(" · ")[0],
               download: !!row.querySelector('[data-testid="missing-model-download"]'),
               copyUrl: !!row.querySelector('button[title="Copy URL"]'), url: candidate?.url ?? null };
    });
}

async function openMissingModels(page) {
  // a load with missing models shows a toast "N errors found" whose "View details" opens the Errors panel
  const details = page.getByRole("button", { name: /^view details$/i });
  if (!await details.isVisible().catch(() => false)) return [];
  await details.click();
  await page.waitForSelector('[data-testid="missing-model-locate"]', { timeout: 15000 }).catch(() => {});
  await page.waitForTimeout(300);
  return page.evaluate(missingModelRows);
}

async function closePanel(page) {
  // the right side panel stays open across loads (and would cover the canvas): its toggle closes it
  if (await page.locator('[data-testid="panel-tab-errors"]').isVisible().catch(() => false)) {
    await page.getByRole("button", { name: "Toggle properties panel" }).first().click();
    await page.locator('[data-testid="panel-tab-errors"]').waitFor({ state: "hidden", timeout: 10000 });
  }
}

function shownModels(names) {
  // the file names of properties.models that some visible element shows (the missing-models list, when open)
  const visible = [...document.querySelectorAll("body *")].filter((el) => el.offsetParent && !el.children.length)
    .map((el) => el.textContent ?? "").join("\n");
  return names.filter((name) => visible.includes(name));
}

async function waitForApp(page) {
  await page.waitForFunction(() => window.app?.graph && window.LiteGraph?.registered_node_types
                             && Object.keys(window.LiteGraph.registered_node_types).length > 50,
                             null, { timeout: 120000 });
}

async function addPlotNode(page, nodeType) {
  // an empty graph with one plot node at a known place, at zoom 1
  await page.evaluate(async (nodeType) => {
    await window.app.loadGraphData({ last_node_id: 0, last_link_id: 0, nodes: [], links: [], groups: [],
                                    config: {}, extra: {}, version: 0.4 }, true, false, null);
    const node = window.LiteGraph.createNode(nodeType);
    node.pos = [200, 120];
    window.app.graph.add(node);
    window.app.canvas.ds.scale = 1;
    window.app.canvas.ds.offset = [0, 0];
    window.app.canvas.setDirty(true, true);
  }, nodeType);
}

async function waitForPlot(page, count) {
  // the plot has drawn a schedule (of `count` sigmas, when given); returns that count
  await page.waitForFunction((n) => {
    const c = document.querySelector("canvas.auraflow-sigma-plot");
    return c?.dataset.state === "ok" && (n === null || Number(c.dataset.count) === n);
  }, count ?? null, { timeout: 30000 });
  return page.evaluate(() => Number(document.querySelector("canvas.auraflow-sigma-plot").dataset.count));
}

const browser = await chromium.launch({ executablePath: job.chromium, args: FLAGS, headless: true });
try {
  const page = await browser.newPage({ viewport: { width: 1400, height: 900 } });
  page.on("console", (msg) => { if (msg.type() === "error") result.consoleErrors.push(msg.text().slice(0, 500)); });
  page.on("pageerror", (err) => result.pageErrors.push(String(err).slice(0, 500)));
  // a fresh user folder would open the template browser over the canvas on first load
  await page.request.post(new URL("api/settings/Comfy.TutorialCompleted", job.url).href, { data: true });
  await page.goto(job.url, { waitUntil: "domcontentloaded", timeout: 120000 });
  await waitForApp(page);
  result.extensions = await page.evaluate(() => (window.app.extensions ?? []).map((e) => e.name));

  for (const wf of job.workflows) {
    const data = JSON.parse(fs.readFileSync(wf.path, "utf8"));
    const report = await page.evaluate(async (data) => {
      const types = [...new Set((data.nodes ?? []).map((n) => n.type))];
      const unknown = types.filter((t) => !window.LiteGraph.registered_node_types[t]);
      await window.app.loadGraphData(data, true, false, null);
      await new Promise((r) => setTimeout(r, 1500));
      const nodes = window.app.graph.nodes;
      return {
        types, unknown,
        fileNodes: (data.nodes ?? []).length,
        loadedNodes: nodes.length,
        brokenNodes: nodes.filter((n) => n.has_errors || !window.LiteGraph.registered_node_types[n.type])
          .map((n) => `${n.id}:${n.type}`),
      };
    }, data);
    report.missingText = await page.evaluate(missingText);
    report.models = (data.nodes ?? []).flatMap((n) => (n.properties?.models ?? []).map((m) => m.name));
    report.missingModels = await openMissingModels(page);
    report.shownModels = await page.evaluate(shownModels, report.models);
    await page.screenshot({ path: path.join(job.outDir, `workflow-${wf.name}.png`) });
    result.workflows[wf.name] = report;
    // close any dialog and the panel so the next load starts clean
    await page.keyboard.press("Escape");
    await closePanel(page);
  }

  if (job.plot) {
    const { nodeType, set, expectCount } = job.plot;
    await addPlotNode(page, nodeType);
    const plot = page.locator("canvas.auraflow-sigma-plot");
    const before = await waitForPlot(page, null);
    await page.evaluate(({ nodeType, set }) => {
      const node = window.app.graph.nodes.find((n) => n.type === nodeType);
      for (const [name, value] of Object.entries(set)) {
        const w = node.widgets.find((x) => x.name === name);
        w.value = value;
        w.callback?.(value, window.app.canvas, node);
      }
      window.app.canvas.setDirty(true, true);
    }, { nodeType, set });
    await waitForPlot(page, expectCount);
    await page.waitForTimeout(300);
    await plot.screenshot({ path: path.join(job.outDir, "sigma-plot.png") });
    await page.screenshot({ path: path.join(job.outDir, "sigma-plot-page.png") });
    // the error path: a 400 from the route must show its message in place of the plot. Widgets clamp their
    // values, so the 400 is answered here for the next request instead of by the pack.
    await page.route("**/auraflow/sigmas?*", (route) => route.fulfill({
      status: 400, contentType: "application/json",
      body: JSON.stringify({ error: "shift=99.0 is out of range; allowed: 0.0..10.0" }) }), { times: 1 });
    await page.evaluate((nodeType) => {
      const node = window.app.graph.nodes.find((n) => n.type === nodeType);
      const w = node.widgets.find((x) => x.name === "denoise");
      w.value = 0.5;
      w.callback?.(0.5, window.app.canvas, node);
    }, nodeType);
    await page.waitForFunction(() => document.querySelector("canvas.auraflow-sigma-plot")?.dataset.state === "error",
                               null, { timeout: 30000 });
    await page.waitForTimeout(300);
    await plot.screenshot({ path: path.join(job.outDir, "sigma-plot-error.png") });
    const box = await plot.boundingBox();
    const serialized = await page.evaluate((nodeType) => {
      const node = window.app.graph.nodes.find((n) => n.type === nodeType);
      return { widgets_values: node.serialize().widgets_values, widgetNames: node.widgets.map((w) => w.name) };
    }, nodeType);
    result.plot = { before, after: expectCount, box, ...serialized };
  }

  if (job.hooks) {
    // the sampler's model socket takes a ComfyUI MODEL (a union type); the remote node's right-click menu comes
    // from the extension's getNodeMenuItems hook, collected by the frontend as for its own menu
    await page.evaluate(async () => {
      await window.app.loadGraphData({ last_node_id: 0, last_link_id: 0, nodes: [], links: [], groups: [],
                                      config: {}, extra: {}, version: 0.4 }, true, false, null);
    });
    result.hooks = await page.evaluate(() => {
      const g = window.app.graph;
      const make = (type, pos) => {
        const node = window.LiteGraph.createNode(type);
        node.pos = pos;
        g.add(node);
        return node;
      };
      const ckpt = make("CheckpointLoaderSimple", [40, 300]);
      const sampler = make("AuraFlowSampler", [500, 300]);
      const remote = make("AuraFlowRemoteGenerate", [200, 120]);
      window.app.canvas.ds.scale = 1;
      window.app.canvas.ds.offset = [0, 0];
      window.app.canvas.setDirty(true, true);
      const slot = sampler.inputs.findIndex((i) => i.name === "model");
      const clipLink = ckpt.connect(1, sampler, slot); // CLIP: refused
      const modelLink = ckpt.connect(0, sampler, slot); // MODEL: accepted
      const labels = (node) => window.app.collectNodeMenuItems(node).filter(Boolean).map((i) => i.content);
      return { socketType: sampler.inputs[slot].type, clipLinked: !!clipLink, modelLinked: !!modelLink,
               remoteMenu: labels(remote), samplerMenu: labels(sampler),
               title: (() => {
                 const r = window.app.canvas.canvas.getBoundingClientRect();
                 return [r.x + remote.pos[0] + 30, r.y + remote.pos[1] - window.LiteGraph.NODE_TITLE_HEIGHT / 2];
               })() };
    });
    // a real right-click on the remote node's title opens the menu with the extension's item
    const [tx, ty] = result.hooks.title;
    await page.mouse.click(tx, ty, { button: "right" });
    await page.waitForTimeout(500);
    result.hooks.menuShown = await page.evaluate(() => [...document.querySelectorAll("body *")].some(
      (el) => !el.children.length && el.offsetParent && /Set remote API key/.test(el.textContent ?? "")));
    await page.screenshot({ path: path.join(job.outDir, "node-menu.png") });
    await page.keyboard.press("Escape");
    await page.evaluate(async () => {  // an empty graph again: the page restores the last one after a reload
      await window.app.loadGraphData({ last_node_id: 0, last_link_id: 0, nodes: [], links: [], groups: [],
                                      config: {}, extra: {}, version: 0.4 }, true, false, null);
    });
  }

  if (job.vue) {
    // the Vue node renderer ("Nodes 2.0"), driven as a person would: click the steps widget's "+" button
    await page.request.post(new URL("api/settings/Comfy.VueNodes.Enabled", job.url).href, { data: true });
    await page.reload({ waitUntil: "domcontentloaded" });
    await waitForApp(page);
    await addPlotNode(page, job.vue.nodeType);
    const before = await waitForPlot(page, null);
    const stepsRow = page.locator('[data-testid="node-widget"]').filter({
      has: page.locator('[data-testid="widget-layout-field-label"]', { hasText: /^steps$/ }) });
    await stepsRow.locator("button").last().click();
    const after = await waitForPlot(page, before + 1);
    await page.waitForTimeout(300);
    await page.locator("canvas.auraflow-sigma-plot").screenshot({ path: path.join(job.outDir, "sigma-plot-vue.png") });
    await page.screenshot({ path: path.join(job.outDir, "sigma-plot-vue-page.png") });
    result.vue = { before, after };
  }
} catch (err) {
  result.failure = String(err?.stack ?? err).slice(0, 2000);
  try {
    const page = browser.contexts()[0]?.pages()[0];
    await page?.screenshot({ path: path.join(job.outDir, "failure.png") });
    result.failureDom = await page?.evaluate(() => [...document.querySelectorAll("canvas.auraflow-sigma-plot")]
      .map((c) => ({ ...c.dataset, visible: !!c.offsetParent })));
  } catch {}
} finally {
  await browser.close();
}
process.stdout.write(JSON.stringify(result) + "\n");
