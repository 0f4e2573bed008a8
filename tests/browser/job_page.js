// Opens a video job's page in Debian's headless Chromium while the job is
// still running, waits until the page itself (live, by server-sent events,
// without a reload) shows every rendition done with its link and player,
// and prints what it saw as JSON: the states at first paint and at the end.
// Usage: node job_page.js URL SCREENSHOT.png
const { chromium } = require('playwright-core');

(async () => {
  const [url, screenshot] = process.argv.slice(2);
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  });
  try {
    const page = await browser.newPage();
    let reloads = 0;
    page.on('framenavigated', (f) => { if (f === page.mainFrame()) reloads += 1; });
    await page.goto(url);
    const states = () => page.$$eval('tr[data-part]', (rows) =>
      Object.fromEntries(rows.map((r) => [r.dataset.part, r.dataset.state])));
    const first = await states();
    await page.waitForSelector('#notification', { timeout: 120000 });
    const last = await states();
    const links = await page.$$eval('a.file', (as) => as.map((a) => a.getAttribute('href')));
    const videos = await page.$$eval('video', (vs) => vs.map((v) => ({
      rendition: v.dataset.rendition,
      src: v.getAttribute('src'),
      track: v.querySelector('track') && v.querySelector('track').getAttribute('src'),
    })));
    const notification = await page.textContent('#notification');
    await page.screenshot({ path: screenshot, fullPage: true });
    console.log(JSON.stringify({ first, last, links, videos, notification, navigations: reloads }));
  } finally {
    await browser.close();
  }
})().catch((e) => { console.error(e); process.exit(1); });
