// Opens a page of another origin in Debian's Chromium, as tests/tests/integration/dashboard.rs
// asks: the page (EVIL_URL, served by the test) sends state-changing requests to the gateway
// the ways a hostile page can without the gateway's consent (an auto-submitted form, a
// `no-cors` fetch) and sets its title to "sent" once both have gone. The test then checks,
// through the API, that the gateway refused them and nothing changed.
// Environment: EVIL_URL, CHROMIUM (default /usr/bin/chromium).
import { chromium } from "playwright-core";

const DEADLINE_MS = 30_000;
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  headless: true,
  args: ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"],
});
try {
  const page = await browser.newPage();
  await page.goto(process.env.EVIL_URL);
  await page.waitForFunction(() => document.title === "sent", null, { timeout: DEADLINE_MS });
  console.log("the page sent its requests");
} finally {
  await browser.close();
}
