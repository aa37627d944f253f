// Opens a `florence eval` report.html in headless Chromium (Debian's, /usr/bin/chromium),
// checks that it rendered (the metrics and captions tables have their rows, every thumbnail and
// the loss plot decoded, no request left the page), and saves a screenshot.
//
//   npm install --prefix tools/eval
//   node tools/eval/screenshot.mjs report/report.html docs/eval-report.png
import { chromium } from "playwright-core";
import { pathToFileURL } from "node:url";

const [report, out] = process.argv.slice(2);
if (!report || !out) {
  console.error("usage: node screenshot.mjs REPORT.html OUT.png");
  process.exit(2);
}
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run"],
});
const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
const external = [];
page.on("request", (r) => { if (!r.url().startsWith("file:") && !r.url().startsWith("data:")) external.push(r.url()); });
await page.goto(pathToFileURL(report).href, { waitUntil: "load" });
const state = await page.evaluate(() => ({
  models: document.querySelectorAll("#metrics tbody tr").length,
  rows: document.querySelectorAll("#captions tbody tr").length,
  images: [...document.images].map((i) => ({ alt: i.alt, ok: i.complete && i.naturalWidth > 0 })),
}));
// Sorting: a click on a metric heading reorders the models without error.
await page.click("#metrics th:nth-child(2)");
await page.screenshot({ path: out, fullPage: true });
await browser.close();

const broken = state.images.filter((i) => !i.ok).map((i) => i.alt);
console.log(JSON.stringify({ ...state, images: state.images.length, broken, external }));
if (state.models === 0 || state.rows === 0 || broken.length || external.length) {
  console.error("the report did not render as expected");
  process.exit(1);
}
