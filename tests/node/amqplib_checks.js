// amqplib's view of the broker, for the cases amqplib's own test suite
// caught: the close handshakes, a queue deleted under its own consumer,
// direct reply-to RPC, CC/BCC routing and a quorum queue declaration.
// Usage: node amqplib_checks.js AMQP_URL; exits non-zero on the first failure.
'use strict';
const assert = require('node:assert/strict');
const amqp = require('amqplib');

const url = process.argv[2];
const unique = (p) => `${p}.${process.pid}.${Date.now()}.${Math.random().toString(16).slice(2)}`;
const watchdog = setTimeout(() => { console.error('timed out'); process.exit(2); }, 60000);

async function closeWithBufferedPublishes() {
  // amqplib writes what it buffered after its connection.close: a server
  // that hangs up at close-ok makes that write fail and the close reject.
  const conn = await amqp.connect(url);
  let failed = null;
  conn.on('error', (e) => { failed = e; });
  const ch = await conn.createChannel();
  const q = (await ch.assertQueue('', { exclusive: true })).queue;
  for (let i = 0; i < 2000; i++) ch.sendToQueue(q, Buffer.alloc(1024));
  await conn.close();
  assert.equal(failed, null, `connection error during close: ${failed}`);
  console.log('close with buffered publishes: ok');
}

async function deleteUnderOwnConsumer() {
  const conn = await amqp.connect(url);
  const ch = await conn.createChannel();
  const q = unique('node.delete');
  await ch.assertQueue(q, { autoDelete: false });
  let deleteOk = null;
  await new Promise((resolve, reject) => {
    ch.consume(q, (msg) => { if (msg === null) resolve(); }, { noAck: true })
      .then(() => ch.deleteQueue(q))
      .then((ok) => { deleteOk = ok; }, reject);
  });
  // The cancel came after the delete-ok: closing now loses nothing.
  await ch.close();
  assert.deepEqual(deleteOk, { messageCount: 0 });
  await conn.close();
  console.log('delete-ok before the cancel: ok');
}

async function directReplyTo() {
  const conn = await amqp.connect(url);
  const server = await conn.createChannel();
  const requests = (await server.assertQueue('', { exclusive: true })).queue;
  await server.consume(requests, (msg) => {
    server.sendToQueue(msg.properties.replyTo, Buffer.from(`re: ${msg.content}`));
  }, { noAck: true });
  const client = await conn.createChannel();
  const reply = new Promise((resolve) => {
    client.consume('amq.rabbitmq.reply-to', (msg) => resolve(msg), { noAck: true });
  });
  await new Promise((r) => setTimeout(r, 50));
  client.sendToQueue(requests, Buffer.from('ping'), { replyTo: 'amq.rabbitmq.reply-to' });
  const msg = await reply;
  assert.equal(msg.content.toString(), 're: ping');
  await conn.close();
  console.log('direct reply-to: ok');
}

async function ccAndBcc() {
  const conn = await amqp.connect(url);
  const ch = await conn.createChannel();
  const names = [];
  for (let i = 0; i < 3; i++) names.push((await ch.assertQueue('', { exclusive: true })).queue);
  await new Promise((resolve, reject) => {
    ch.sendToQueue(names[0], Buffer.from('m'), { CC: [names[1]], BCC: [names[2]] });
    ch.checkQueue(names[0]).then(resolve, reject);
  });
  for (const q of names) {
    const got = await ch.get(q, { noAck: true });
    assert.ok(got, `no copy in ${q}`);
    assert.deepEqual(got.properties.headers.CC, [names[1]]);
    assert.equal(got.properties.headers.BCC, undefined);
  }
  await conn.close();
  console.log('CC and BCC: ok');
}

async function quorumQueue() {
  const conn = await amqp.connect(url);
  const ch = await conn.createChannel();
  const q = unique('node.quorum');
  await ch.assertQueue(q, { durable: true, arguments: { 'x-queue-type': 'quorum' } });
  await ch.deleteQueue(q);
  await conn.close();
  console.log('quorum declare: ok');
}

(async () => {
  await closeWithBufferedPublishes();
  await deleteUnderOwnConsumer();
  await directReplyTo();
  await ccAndBcc();
  await quorumQueue();
  clearTimeout(watchdog);
})().catch((e) => { console.error(e); process.exit(1); });
