// Load time of the webserver's pages in headless Chromium (playwright-core, the system's
// chromium): the asset graph, agrifm_embedding_grid's page, its partitions view, one
// partition. A page counts as loaded when the network is idle (no GraphQL request for
// 500 ms) and no loading spinner is left; each page is loaded twice (cold, warm).
//   NODE_PATH=/tmp/pw/node_modules node bench/ui_timing.js http://127.0.0.1:3000 'key'
const { chromium } = require('playwright-core');
(async () => {
  const [base, key] = process.argv.slice(2);
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking',
           '--disable-component-update', '--no-first-run'],
  });
  const asset = '/assets/agrifm_embedding_grid';
  const pages = {
    asset_graph: '/asset-groups',
    grid_asset_page: asset,
    grid_partitions: asset + '?view=partitions',
    one_partition: asset + '?view=partitions&partition=' + encodeURIComponent(key),
  };
  const out = {};
  for (const [name, path] of Object.entries(pages)) {
    out[name] = [];
    for (let i = 0; i < 2; i++) {
      const page = await browser.newPage();
      const t = Date.now();
      let ok = true;
      try {
        await page.goto(base + path, { waitUntil: 'networkidle', timeout: 300000 });
        await page.waitForFunction(
          () => !document.querySelector('[class*="Spinner"], [data-testid*="spinner"], [role="progressbar"]'),
          null, { timeout: 300000 });
      } catch (e) { ok = false; }
      out[name].push(ok ? (Date.now() - t) / 1000 : 'timeout>300s');
      await page.close();
    }
  }
  await browser.close();
  console.log(JSON.stringify(out));
})();
