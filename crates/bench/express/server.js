// The stack offload is compared with: RabbitMQ's "Work Queues" new_task.js behind an Express
// route, as a team would first write it, with publisher confirms so that its 202 means what
// offload's does. `node server.js <port>`; AMQP_URL and QUEUE (an existing queue) from the
// environment. GET /health answers once the channel is open.
'use strict';

const crypto = require('crypto');
const amqp = require('amqplib');
const express = require('express');

async function main() {
  const port = Number(process.argv[2]);
  const queue = process.env.QUEUE;
  if (!port || !queue) {
    throw new Error('usage: QUEUE=<queue> AMQP_URL=<url> node server.js <port>');
  }
  const connection = await amqp.connect(process.env.AMQP_URL || 'amqp://localhost');
  const channel = await connection.createConfirmChannel();
  await channel.checkQueue(queue);

  const app = express();
  app.use(express.json());
  app.get('/health', (_req, res) => res.send('ok'));
  app.post('/tasks', (req, res) => {
    const id = crypto.randomUUID();
    const body = Buffer.from(JSON.stringify({ id, kind: req.body.kind, payload: req.body.payload }));
    channel.sendToQueue(queue, body, { persistent: true, messageId: id }, (err) => {
      if (err) {
        res.status(503).json({ error: 'not confirmed' });
      } else {
        res.status(202).json({ id, status: 'queued' });
      }
    });
  });
  app.listen(port, '127.0.0.1');
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
