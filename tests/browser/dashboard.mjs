// Drives Debian's Chromium through offload's dashboard, as tests/tests/integration/dashboard.rs
// asks: it submits tasks and sees the counts move, sees a failing task become dead, is refused
// a retry with a read-only key, retries it with an admin key and sees it succeed, discards
// another, pauses and resumes a kind and charts it alone, cancels a waiting task, pauses and resumes a
// schedule, checks the page with axe-core on a desktop and a phone-sized viewport, and writes
// screenshots.
// Every wait is on a condition with a deadline. Exits non-zero with the reason on failure.
//
// Environment: OFFLOAD_URL (the gateway), OFFLOAD_ADMIN_KEY, OFFLOAD_READ_KEY, SCREENSHOTS
// (a directory), CHROMIUM (default /usr/bin/chromium).
import { mkdirSync, readFileSync } from "node:fs";
import { chromium } from "playwright-core";

const base = process.env.OFFLOAD_URL;
const adminKey = process.env.OFFLOAD_ADMIN_KEY;
const readKey = process.env.OFFLOAD_READ_KEY;
const shots = process.env.SCREENSHOTS;
const DEADLINE_MS = 30_000;
const axeSource = readFileSync(new URL("./node_modules/axe-core/axe.min.js", import.meta.url), "utf8");

function fail(message) {
  throw new Error(message);
}

const step = (text) => console.log(`step: ${text}`);

async function api(method, path, body) {
  const response = await fetch(base + path, {
    method,
    headers: { authorization: `Bearer ${adminKey}`, "content-type": "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const json = response.status === 204 ? null : await response.json();
  if (!response.ok) fail(`${method} ${path}: ${response.status} ${JSON.stringify(json)}`);
  return json;
}

// Polls `probe` until it returns a truthy value; fails with `what` at the deadline.
async function until(what, probe) {
  const end = Date.now() + DEADLINE_MS;
  let last;
  while (Date.now() < end) {
    last = await probe();
    if (last) return last;
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
  fail(`timed out waiting for ${what}`);
}

const count = async (page, id) => Number((await page.textContent(`#${id}`)).replace(/,/g, ""));
const rowText = (page, table, id) =>
  page.evaluate(([table, id]) => document.querySelector(`#${table} tr[data-id="${id}"]`)?.textContent ?? null, [table, id]);
const statusOf = (page, id) =>
  page.evaluate((id) => document.querySelector(`#recent tr[data-id="${id}"] .status`)?.textContent ?? null, id);

async function accessible(page, label) {
  await page.evaluate(axeSource);
  const result = await page.evaluate(() =>
    // eslint-disable-next-line no-undef
    axe.run(document, { runOnly: { type: "tag", values: ["wcag2a", "wcag2aa", "wcag21a", "wcag21aa", "best-practice"] } }),
  );
  if (result.violations.length > 0) {
    const found = result.violations.map((v) => `${v.id} (${v.impact}): ${v.help} at ${v.nodes.map((n) => n.target.join(" ")).join(", ")}`);
    fail(`axe found ${result.violations.length} problems on the ${label} page:\n${found.join("\n")}`);
  }
  step(`axe: no violations on the ${label} page (${result.passes.length} rules passed)`);
}

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  headless: true,
  args: ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"],
});
try {
  mkdirSync(shots, { recursive: true });

  step("without a key the page asks for a login");
  const anonymous = await browser.newContext();
  // Headless Chromium has nobody to ask for the login, so the challenge ends the navigation.
  const refused = await (await anonymous.newPage()).goto(`${base}/`).then(
    (response) => `HTTP ${response.status()}`,
    (error) => error.message,
  );
  if (!/ERR_INVALID_AUTH_CREDENTIALS/.test(refused)) fail(`GET / without a key: ${refused}`);
  await anonymous.close();

  const foreign = [];
  const context = await browser.newContext({
    httpCredentials: { username: "operator", password: adminKey },
    viewport: { width: 1280, height: 900 },
  });
  context.on("request", (request) => {
    if (!request.url().startsWith(base)) foreign.push(request.url());
  });
  const page = await context.newPage();
  const errors = [];
  page.on("pageerror", (error) => errors.push(error.message));
  page.on("console", (message) => message.type() === "error" && errors.push(`${message.text()} (${message.location().url})`));
  await page.goto(`${base}/`);

  step("the page shows the broker connected and task status live");
  await until("the broker badge to say connected", async () => (await page.textContent("#broker-state")) === "connected");
  await until("the events badge to say live", async () => (await page.textContent("#events-state")) === "live");
  const before = await until("the totals to be shown", async () => {
    const succeeded = await count(page, "total-succeeded");
    return Number.isFinite(succeeded) ? { succeeded, submitted: await count(page, "total-submitted") } : null;
  });
  await until("a worker to be shown connected", async () => (await count(page, "workers")) >= 1);

  step("submitted tasks move the counts and appear as succeeded");
  const ids = [];
  for (let n = 0; n < 5; n++) ids.push((await api("POST", "/tasks", { kind: "sleep", payload: { message: `task ${n}` } })).id);
  await until("the succeeded count to grow by 5", async () => (await count(page, "total-succeeded")) >= before.succeeded + 5);
  if ((await count(page, "total-submitted")) < before.submitted + 5) fail("the submitted count did not grow by 5");
  for (const id of ids) await until(`task ${id} to show succeeded`, async () => (await statusOf(page, id)) === "succeeded");

  step("a failing task becomes dead, with its reason");
  const dead = (await api("POST", "/tasks", { kind: "fails-first-run" })).id;
  const deadRow = await until("the failing task in the dead table", () => rowText(page, "dead", dead));
  if (!deadRow.includes("max_attempts") || !deadRow.includes("the first run fails")) fail(`dead row says: ${deadRow}`);
  await until("the dead count to show it", async () => (await count(page, "depth-dead")) >= 1);

  step("a read-only key may look but its retry is refused, and the task stays dead");
  const reader = await browser.newContext({ httpCredentials: { username: "viewer", password: readKey } });
  const readerPage = await reader.newPage();
  await readerPage.goto(`${base}/`);
  await until("the reader to see the dead task", () => rowText(readerPage, "dead", dead));
  await readerPage.click(`button[aria-label="Retry task ${dead}"]`);
  await until("the refusal to be shown", async () => /Could not retry/.test(await readerPage.textContent("#notice")));
  await reader.close();
  if ((await api("GET", `/tasks/${dead}`)).status !== "dead") fail("a read-only key retried a task");

  step("opened as http://user:key@host/, the page works as with any other login");
  const inUrl = await browser.newContext();
  const inUrlPage = await inUrl.newPage();
  const inUrlErrors = [];
  inUrlPage.on("pageerror", (error) => inUrlErrors.push(error.message));
  await inUrlPage.goto(`${base.replace("://", `://viewer:${encodeURIComponent(readKey)}@`)}/`);
  await until("the page opened with credentials in its URL to show the broker connected", async () => (await inUrlPage.textContent("#broker-state")) === "connected");
  await until("it to list the dead task", () => rowText(inUrlPage, "dead", dead));
  const inUrlNotice = await inUrlPage.textContent("#notice");
  if (/credentials/i.test(inUrlNotice) || inUrlErrors.length > 0) fail(`opened with credentials in its URL: ${inUrlNotice} ${inUrlErrors.join("; ")}`);
  await inUrl.close();

  step("retry from the page: the task runs again and succeeds");
  await page.click(`button[aria-label="Retry task ${dead}"]`);
  await until("the notice that it is queued again", async () => /queued again/.test(await page.textContent("#notice")));
  await until("the retried task to show succeeded", async () => (await statusOf(page, dead)) === "succeeded");
  await until("the dead table to drop it", async () => (await rowText(page, "dead", dead)) === null);

  step("discard from the page, after saying yes: the task leaves the dead-letter queue");
  const doomed = (await api("POST", "/tasks", { kind: "fails-first-run" })).id;
  await until("the second failing task in the dead table", () => rowText(page, "dead", doomed));
  page.once("dialog", (dialog) => dialog.accept());
  await page.click(`button[aria-label="Discard task ${doomed}"]`);
  await until("the notice that it is discarded", async () => /is discarded/.test(await page.textContent("#notice")));
  const gone = await fetch(`${base}/dead/${doomed}`, { headers: { authorization: `Bearer ${adminKey}` } });
  if (gone.status !== 404) fail(`GET /dead/${doomed} after the discard answered ${gone.status}`);

  step("pause a kind from the page: its tasks wait; resume it: they run");
  const kindRow = (name) => page.evaluate((name) => document.querySelector(`#kinds tr[data-kind="${name}"]`)?.textContent ?? null, name);
  await until("the sleep kind in the kinds table", async () => /running/.test((await kindRow("sleep")) ?? ""));
  await page.click('button[aria-label="Pause kind sleep"]');
  await until("the notice that it is paused", async () => /is paused/.test(await page.textContent("#notice")));
  await until("the kind shown paused", async () => /paused/.test((await kindRow("sleep")) ?? ""));
  const waiting = (await api("POST", "/tasks", { kind: "sleep", payload: { message: "while paused" } })).id;
  await until("the waiting task on the kind's queue", async () => (await api("GET", "/kinds")).kinds.some((k) => k.kind === "sleep" && k.ready >= 1));
  if ((await api("GET", `/tasks/${waiting}`)).status !== "queued") fail("a task of a paused kind did not wait");
  step("cancel a waiting task from the page: it ends cancelled, and is counted");
  const cancelledBefore = await count(page, "total-cancelled");
  const unwanted = (await api("POST", "/tasks", { kind: "sleep", payload: { message: "never mind" } })).id;
  await until("the unwanted task to show queued", async () => (await statusOf(page, unwanted)) === "queued");
  await page.click(`button[aria-label="Cancel task ${unwanted}"]`);
  await until("the notice that it is cancelled", async () => /is cancelled/.test(await page.textContent("#notice")));
  await until("the task to show cancelled", async () => (await statusOf(page, unwanted)) === "cancelled");
  await until("the cancelled count to grow", async () => (await count(page, "total-cancelled")) >= (cancelledBefore || 0) + 1);
  await page.selectOption("#depth-kind", "sleep");
  await until("the chart to show the kind alone", async () => /Ready \(sleep\)/.test(await page.textContent("#depth-legend")));
  await page.click('button[aria-label="Resume kind sleep"]');
  await until("the notice that it is resumed", async () => /is resumed/.test(await page.textContent("#notice")));
  await until("the waiting task to show succeeded", async () => (await statusOf(page, waiting)) === "succeeded");
  if ((await api("GET", `/tasks/${unwanted}`)).status !== "cancelled") fail("a cancelled task ran once its kind resumed");
  await page.selectOption("#depth-kind", "");

  step("a schedule shows its next tick and its last task; pause and resume it from the page");
  const scheduleRow = (name) =>
    page.evaluate((name) => {
      const row = document.querySelector(`#schedules tr[data-schedule="${name}"]`);
      if (!row) return null;
      const link = row.querySelector("td.id a");
      return {
        text: row.textContent,
        next: row.querySelector("td.next")?.textContent,
        task: link ? link.title : null,
        status: row.querySelector(".status")?.textContent ?? null,
      };
    }, name);
  await api("PUT", "/schedules/dashboard-tick", { task: { kind: "sleep", payload: { message: "tick" } }, every: "1s" });
  const ticking = await until("the schedule's last task to show succeeded", async () => {
    const row = await scheduleRow("dashboard-tick");
    return row && row.status === "succeeded" && /every 1s/.test(row.text) && /running/.test(row.text) && row.next !== "–" ? row : null;
  });
  const made = (await api("GET", "/schedules/dashboard-tick")).recent.map((task) => task.id);
  if (!made.includes(ticking.task)) fail(`the page's last task ${ticking.task} is not one the schedule made: ${made}`);
  await page.click('button[aria-label="Pause schedule dashboard-tick"]');
  await until("the notice that the schedule is paused", async () => /Schedule dashboard-tick is paused/.test(await page.textContent("#notice")));
  const paused = await until("the schedule shown paused, with no next tick", async () => {
    const row = await scheduleRow("dashboard-tick");
    return row && /paused/.test(row.text) && row.next === "–" ? row : null;
  });
  if (!(await api("GET", "/schedules/dashboard-tick")).paused) fail("the page's Pause did not pause the schedule");
  await page.click('button[aria-label="Resume schedule dashboard-tick"]');
  await until("the notice that the schedule is resumed", async () => /Schedule dashboard-tick is resumed/.test(await page.textContent("#notice")));
  await until("a new tick's task after the resume, succeeded", async () => {
    const row = await scheduleRow("dashboard-tick");
    return row && /running/.test(row.text) && row.task !== paused.task && row.status === "succeeded";
  });

  await accessible(page, "desktop");
  await page.screenshot({ path: `${shots}/dashboard-desktop.png`, fullPage: true });

  step("on a phone-sized viewport nothing is wider than the screen");
  await page.setViewportSize({ width: 390, height: 844 });
  const overflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
  if (overflow > 0) fail(`the page is ${overflow}px wider than a 390px screen`);
  await accessible(page, "phone");
  await page.screenshot({ path: `${shots}/dashboard-phone.png`, fullPage: true });

  step("a deleted schedule leaves the page");
  await api("DELETE", "/schedules/dashboard-tick");
  await until("the schedule gone from the page", async () => (await scheduleRow("dashboard-tick")) === null);

  if (foreign.length > 0) fail(`the page asked other hosts: ${foreign.join(", ")}`);
  if (errors.length > 0) fail(`the page logged errors: ${errors.join("; ")}`);
  console.log(`dashboard: all checks passed; screenshots in ${shots}`);
} finally {
  await browser.close();
}
