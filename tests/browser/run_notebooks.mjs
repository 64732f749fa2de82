// Run notebooks in JupyterLab in headless Chromium, as a learner would, and report what went wrong.
//
//   node tests/browser/run_notebooks.mjs --url http://127.0.0.1:8888/ --token TOKEN \
//        [--screenshots DIR] [--timeout SECONDS] notebooks/00_start_here.ipynb ...
//
// Notebook paths are relative to the server's root. Run it against a server whose root is a COPY of
// the notebooks (tests/test_browser.py makes one): the script clears and re-runs every cell in the
// browser. It never saves (start the server with autosave off, as the test does), but the kernel's
// own side effects land in the server's root.
//
// For each notebook:
//   Step 1  read the committed notebook through the server's contents API: which code cells showed a
//           widget (an application/vnd.jupyter.widget-view+json output) when it was committed;
//   Step 2  open it in JupyterLab, wait for the kernel, then Edit > Clear Outputs of All Cells and
//           Run > Run All Cells (the menus a learner uses);
//   Step 3  wait until no prompt shows [*] and the kernel is idle;
//   Step 4  collect error and stderr outputs (JupyterLab renders both as
//           application/vnd.jupyter.stderr), "Error displaying widget" messages, and check that every
//           widget cell rendered ipywidgets (.jupyter-widgets elements) in its output;
//   Step 5  save a full-page screenshot (the viewport grown to the notebook's height), shut the
//           kernel down.
// Prints one PASS/FAIL line per notebook, then a JSON summary line; exits 1 on any failure, 2 on bad
// usage or when Chromium cannot start.
import { mkdirSync } from "node:fs";
import path from "node:path";
import { chromium } from "playwright-core";

const USAGE = "usage: node run_notebooks.mjs --url URL --token TOKEN [--screenshots DIR] [--timeout S] NOTEBOOK...";
const WIDGET_MIME = "application/vnd.jupyter.widget-view+json";
const MAX_SCREENSHOT_HEIGHT = 30000; // px; Chromium's captures get unreliable beyond this

function parseArgs(argv) {
  const opts = { url: null, token: "", screenshots: "screenshots", timeout: 600, notebooks: [] };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    const value = () => {
      if (i + 1 >= argv.length) throw new Error(`${a} needs a value`);
      return argv[++i];
    };
    if (a === "--url") opts.url = value();
    else if (a === "--token") opts.token = value();
    else if (a === "--screenshots") opts.screenshots = value();
    else if (a === "--timeout") opts.timeout = Number(value());
    else if (a.startsWith("--")) throw new Error(`unknown option ${a}`);
    else opts.notebooks.push(a);
  }
  if (!opts.url || opts.notebooks.length === 0) throw new Error("--url and at least one notebook are required");
  if (!(opts.timeout > 0)) throw new Error("--timeout must be a positive number of seconds");
  if (!opts.url.endsWith("/")) opts.url += "/";
  return opts;
}

async function api(opts, method, route) {
  const res = await fetch(new URL(route, opts.url), {
    method,
    headers: { Authorization: `token ${opts.token}` },
  });
  if (!res.ok) throw new Error(`${method} ${route}: HTTP ${res.status}`);
  return res.status === 204 ? null : res.json();
}

const encodePath = (p) => p.split("/").map(encodeURIComponent).join("/");

// Step 1: which cells (indices among all cells) showed a widget in the committed notebook.
async function expectedWidgetCells(opts, nbPath) {
  const model = await api(opts, "GET", `api/contents/${encodePath(nbPath)}?content=1&type=notebook`);
  const cells = model.content.cells;
  const widgetCells = [];
  cells.forEach((cell, i) => {
    const outputs = cell.cell_type === "code" ? cell.outputs || [] : [];
    if (outputs.some((o) => o.data && WIDGET_MIME in o.data)) widgetCells.push(i);
  });
  return { nCells: cells.length, widgetCells };
}

async function clickMenu(page, menu, item) {
  await page.locator(".lm-MenuBar-itemLabel", { hasText: new RegExp(`^${menu}$`) }).click();
  await page.locator(".lm-Menu-itemLabel", { hasText: new RegExp(`^${item}$`) }).first().click();
}

// The prompts of all code cells, e.g. ["[1]:", "[*]:", "[ ]:"].
const prompts = (page) =>
  page.$$eval(".jp-Notebook .jp-CodeCell .jp-InputArea-prompt", (els) => els.map((e) => e.textContent.trim()));

const kernelStatus = (page) =>
  page.$eval(".jp-Notebook-ExecutionIndicator", (e) => e.getAttribute("data-status")).catch(() => null);

async function waitFor(what, predicate, deadline, intervalMs = 500) {
  while (Date.now() < deadline) {
    if (await predicate()) return;
    await new Promise((r) => setTimeout(r, intervalMs));
  }
  throw new Error(`timed out waiting for ${what}`);
}

// Step 4: what the notebook shows once it has run.
function collectOutputs(widgetCells) {
  const cells = [...document.querySelectorAll(".jp-Notebook .jp-Cell")];
  const text = (e) => {
    const t = (e.textContent || "").trim();
    return t.length <= 800 ? t : `${t.slice(0, 300)}\n...\n${t.slice(-500)}`; // a traceback ends with its error
  };
  const errors = [];
  cells.forEach((cell, i) => {
    for (const e of cell.querySelectorAll('.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]')) {
      errors.push({ cell: i, text: text(e) });
    }
    for (const e of cell.querySelectorAll(".jp-OutputArea-output")) {
      if (/Error displaying widget/.test(e.textContent || "")) errors.push({ cell: i, text: text(e) });
    }
  });
  const widgets = widgetCells.map((i) => {
    const cell = cells[i];
    const n = cell ? cell.querySelectorAll(".jp-OutputArea-output .jupyter-widgets").length : 0;
    const kinds = cell
      ? [...new Set([...cell.querySelectorAll(".jp-OutputArea-output [class*='widget-']")]
          .flatMap((e) => [...e.classList].filter((c) => c.startsWith("widget-"))))].slice(0, 8)
      : [];
    return { cell: i, rendered: n > 0, elements: n, kinds };
  });
  const executed = cells.filter((c) => c.classList.contains("jp-CodeCell")).map((c) => {
    const p = c.querySelector(".jp-InputArea-prompt");
    return p ? p.textContent.trim() : "";
  });
  return {
    cellsInDom: cells.length,
    codeCells: executed.length,
    notRun: executed.filter((p) => !/^\[\d+\]:?$/.test(p)).length,
    errors,
    widgets,
    allWidgetElements: document.querySelectorAll(".jp-OutputArea-output .jupyter-widgets").length,
  };
}

async function screenshot(page, file) {
  // JupyterLab scrolls the notebook inside a panel: grow the viewport until the panel needs no scroll.
  const { extra } = await page.$eval(".jp-NotebookPanel .jp-WindowedPanel-outer", (outer) => ({
    extra: outer.scrollHeight - outer.clientHeight,
  }));
  const vp = page.viewportSize();
  const height = Math.min(vp.height + Math.max(0, extra) + 40, MAX_SCREENSHOT_HEIGHT);
  await page.setViewportSize({ width: vp.width, height });
  await page.waitForTimeout(1500); // relayout and paint
  await page.locator(".jp-NotebookPanel .jp-WindowedPanel-outer").evaluate((e) => e.scrollTo(0, 0));
  await page.screenshot({ path: file, fullPage: true });
  await page.setViewportSize(vp);
  return height;
}

async function shutdownKernel(opts, nbPath) {
  const sessions = await api(opts, "GET", "api/sessions");
  for (const s of sessions.filter((s) => s.path === nbPath)) await api(opts, "DELETE", `api/sessions/${s.id}`);
}

async function runNotebook(browser, opts, nbPath) {
  const t0 = Date.now();
  const deadline = t0 + opts.timeout * 1000;
  const result = { notebook: nbPath, ok: false, seconds: null, problems: [], pageErrors: [] };
  const { nCells, widgetCells } = await expectedWidgetCells(opts, nbPath);
  result.widgetCellsExpected = widgetCells;

  const page = await browser.newPage({ viewport: { width: 1400, height: 900 } });
  page.on("pageerror", (e) => result.pageErrors.push(String(e.message).slice(0, 300)));
  try {
    // Step 2: open, wait for all cells and an idle kernel.
    const url = new URL(`lab/tree/${encodePath(nbPath)}`, opts.url);
    url.searchParams.set("token", opts.token);
    url.searchParams.set("reset", "");
    await page.goto(url.href, { waitUntil: "domcontentloaded", timeout: 120000 });
    await waitFor(`the notebook's ${nCells} cells`, async () =>
      (await page.locator(".jp-NotebookPanel .jp-Notebook .jp-Cell").count()) === nCells, deadline);
    await waitFor("the kernel to start", async () => (await kernelStatus(page)) === "idle", deadline);
    await page.keyboard.press("Control+b").catch(() => {}); // hide the file browser for the screenshot
    await page.locator(".jp-NotebookPanel .jp-Notebook").click({ position: { x: 5, y: 5 } }).catch(() => {});

    await clickMenu(page, "Edit", "Clear Outputs of All Cells");
    await waitFor("cleared prompts", async () => (await prompts(page)).every((p) => !/\d/.test(p)), deadline);
    const tRun = Date.now();
    await clickMenu(page, "Run", "Run All Cells");

    // Step 3: [*] appears, then no [*] is left and the kernel is idle (twice in a row, 1 s apart).
    await waitFor("the run to start", async () =>
      (await prompts(page)).some((p) => p.includes("*") || /\d/.test(p)), deadline, 200);
    let quiet = 0;
    await waitFor("all cells to finish", async () => {
      const busy = (await prompts(page)).some((p) => p.includes("*")) || (await kernelStatus(page)) !== "idle";
      quiet = busy ? 0 : quiet + 1;
      return quiet >= 2;
    }, deadline, 1000);
    result.runSeconds = Math.round((Date.now() - tRun) / 100) / 10;
    await page.waitForTimeout(1000); // let widget views render

    // Step 4
    const seen = await page.evaluate(collectOutputs, widgetCells);
    Object.assign(result, { cells: seen.cellsInDom, codeCells: seen.codeCells, notRun: seen.notRun,
      widgets: seen.widgets, allWidgetElements: seen.allWidgetElements, errors: seen.errors });
    for (const e of seen.errors) {
      const lines = e.text.split("\n").filter((l) => l.trim() && !/^-+$/.test(l.trim()));
      const line = /Traceback/.test(e.text) ? lines[lines.length - 1] : lines[0]; // the error, or the first line
      result.problems.push(`cell ${e.cell}: error output: ${(line || "").slice(0, 200)}`);
    }
    for (const w of seen.widgets) if (!w.rendered) result.problems.push(`cell ${w.cell}: no widget rendered`);
    if (seen.notRun > 0) result.problems.push(`${seen.notRun} code cells did not run`);

    // Step 5
    mkdirSync(opts.screenshots, { recursive: true });
    result.screenshot = path.join(opts.screenshots, `${path.basename(nbPath, ".ipynb")}.png`);
    result.screenshotHeight = await screenshot(page, result.screenshot);
  } catch (e) {
    result.problems.push(String(e.message || e).split("\n")[0]);
    try {
      mkdirSync(opts.screenshots, { recursive: true });
      result.screenshot = path.join(opts.screenshots, `${path.basename(nbPath, ".ipynb")}.failed.png`);
      await page.screenshot({ path: result.screenshot });
    } catch {}
  } finally {
    await page.close({ runBeforeUnload: false });
    await shutdownKernel(opts, nbPath).catch((e) => result.problems.push(`kernel shutdown: ${e.message}`));
  }
  result.seconds = Math.round((Date.now() - t0) / 100) / 10;
  result.ok = result.problems.length === 0;
  return result;
}

async function main() {
  let opts;
  try {
    opts = parseArgs(process.argv.slice(2));
  } catch (e) {
    console.error(`${e.message}\n${USAGE}`);
    return 2;
  }
  const executablePath = process.env.CHROMIUM || "/usr/bin/chromium";
  const args = ["--disable-dev-shm-usage"];
  if (process.getuid && process.getuid() === 0) args.push("--no-sandbox"); // Chromium refuses root otherwise
  let browser;
  try {
    browser = await chromium.launch({ executablePath, headless: true, args });
  } catch (e) {
    console.error(`cannot start Chromium at ${executablePath} (apt-get install -y chromium): ${e.message}`);
    return 2;
  }
  const results = [];
  try {
    for (const nb of opts.notebooks) {
      const r = await runNotebook(browser, opts, nb);
      results.push(r);
      const w = r.widgets ? `, widgets ${r.widgets.filter((x) => x.rendered).length}/${r.widgets.length}` : "";
      console.log(`${r.ok ? "PASS" : "FAIL"} ${nb} (${r.seconds} s, run ${r.runSeconds ?? "-"} s${w}, ` +
        `screenshot ${r.screenshot ?? "-"})${r.ok ? "" : "\n  " + r.problems.join("\n  ")}`);
    }
  } finally {
    await browser.close();
  }
  const failed = results.filter((r) => !r.ok).map((r) => r.notebook);
  console.log(JSON.stringify({ ok: failed.length === 0, failed, results }));
  return failed.length ? 1 : 0;
}

process.exitCode = await main();
