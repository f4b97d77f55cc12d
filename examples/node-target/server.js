// An offload HTTP target in Express: the tutorial's work, one second per '.' in the message.
const crypto = require("node:crypto");
const express = require("express");

const SECRET = process.env.TARGET_SIGNING_SECRET;
const SECONDS_PER_DOT = Number(process.env.SECONDS_PER_DOT ?? "1");
const app = express();

function signedByOffload(body, header = "", tolerance = 300) {
  const fields = Object.fromEntries(header.split(",").map((part) => part.split("=", 2)));
  const expected = crypto.createHmac("sha256", SECRET).update(`${fields.t}.`).update(body).digest("hex");
  const fresh = Math.abs(Date.now() / 1000 - Number(fields.t)) < tolerance;
  return fresh && typeof fields.v1 === "string" && fields.v1.length === expected.length &&
    crypto.timingSafeEqual(Buffer.from(expected), Buffer.from(fields.v1));
}

app.post("/work", express.raw({ type: "application/json" }), async (req, res) => {
  if (!signedByOffload(req.body, req.get("Offload-Signature"))) {
    return res.status(401).json({ error: "bad signature" }); // 4xx: offload dead-letters the task
  }
  const task = JSON.parse(req.body);
  const payload = task.payload ?? {};
  if (task.attempt <= (payload.fail_attempts ?? 0)) { // to see retries: 503 retries it
    if (payload.retry_after !== undefined) res.set("Retry-After", String(payload.retry_after));
    return res.status(503).json({ error: "not yet" });
  }
  if (typeof payload.message !== "string") {
    return res.status(422).json({ error: "payload.message must be a string" });
  }
  const started = Date.now() / 1000;
  const dots = payload.message.split(".").length - 1;
  await new Promise((done) => setTimeout(done, dots * SECONDS_PER_DOT * 1000));
  res.json({ dots, started, finished: Date.now() / 1000, pid: process.pid });
});

app.listen(Number(process.env.PORT ?? 8000), process.env.HOST ?? "127.0.0.1");
