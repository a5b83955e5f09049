// Sluice through kafkajs, a pure JavaScript implementation of the Kafka protocol (independent of
// librdkafka, kafka-python and our own codec): admin, produce with keys, headers and
// compression, consumer groups with rebalancing and commits, idempotent and transactional
// producers, errors.

import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import { CompressionTypes, Kafka, logLevel } from 'kafkajs';

import { startBroker, topicName, waitFor } from './harness.mjs';

let broker;
let kafka;

before(async () => {
  // Tests create their groups one member at a time: no initial rebalance delay.
  broker = await startBroker({ cores: 2, args: ['--group-initial-rebalance-delay-ms', '0'] });
  kafka = new Kafka({
    clientId: 'sluice-js-tests',
    brokers: [broker.bootstrap],
    logLevel: logLevel.NOTHING,
    retry: { retries: 5, initialRetryTime: 100 },
  });
});

after(async () => {
  const exit = await broker?.stop();
  assert.equal(exit?.code, 0, `broker exit: ${JSON.stringify(exit)}`);
});

async function withAdmin(fn) {
  const admin = kafka.admin();
  await admin.connect();
  try {
    return await fn(admin);
  } finally {
    await admin.disconnect();
  }
}

// Consumes until `want` messages arrived (or the deadline), returning them in arrival order.
async function consumeN(consumer, topic, want, { fromBeginning = true } = {}) {
  const got = [];
  await consumer.subscribe({ topics: [topic], fromBeginning });
  await consumer.run({
    eachMessage: async ({ partition, message }) => {
      got.push({
        partition,
        offset: Number(message.offset),
        key: message.key?.toString(),
        value: message.value?.toString(),
        headers: Object.fromEntries(
          Object.entries(message.headers ?? {}).map(([k, v]) => [k, v?.toString()]),
        ),
      });
    },
  });
  await waitFor(`${want} messages from ${topic} (have ${got.length})`, () => got.length >= want, 60_000);
  return got;
}

test('admin creates, lists, describes and deletes topics', async () => {
  const t = topicName('js-admin');
  await withAdmin(async (admin) => {
    assert.equal(await admin.createTopics({ topics: [{ topic: t, numPartitions: 3 }], waitForLeaders: true }), true);
    // kafkajs answers false when the topic already exists (TOPIC_ALREADY_EXISTS).
    assert.equal(await admin.createTopics({ topics: [{ topic: t, numPartitions: 3 }] }), false);
    assert.ok((await admin.listTopics()).includes(t));
    const md = await admin.fetchTopicMetadata({ topics: [t] });
    assert.equal(md.topics[0].partitions.length, 3);
    for (const p of md.topics[0].partitions) assert.equal(p.partitionErrorCode, 0);
    const offsets = await admin.fetchTopicOffsets(t);
    assert.deepEqual(offsets.map((o) => [o.partition, o.high, o.low]).sort(),
      [[0, '0', '0'], [1, '0', '0'], [2, '0', '0']]);
    await admin.createPartitions({ topicPartitions: [{ topic: t, count: 5 }] });
    const md2 = await admin.fetchTopicMetadata({ topics: [t] });
    assert.equal(md2.topics[0].partitions.length, 5);
    await admin.deleteTopics({ topics: [t] });
    await waitFor(`${t} to disappear`, async () => !(await admin.listTopics()).includes(t));
  });
});

test('records keep their keys, values, headers and per-partition order, compressed or not', async () => {
  const t = topicName('js-roundtrip');
  await withAdmin((a) => a.createTopics({ topics: [{ topic: t, numPartitions: 3 }], waitForLeaders: true }));
  const producer = kafka.producer();
  await producer.connect();
  const sent = [];
  for (const compression of [CompressionTypes.None, CompressionTypes.GZIP]) {
    const messages = [];
    for (let i = 0; i < 150; i += 1) {
      const m = { key: `k${i % 7}`, value: `v-${compression}-${i}`, headers: { seq: String(sent.length) } };
      messages.push(m);
      sent.push(m);
    }
    const res = await producer.send({ topic: t, messages, acks: -1, compression });
    for (const r of res) assert.equal(r.errorCode, 0);
  }
  await producer.disconnect();

  const consumer = kafka.consumer({ groupId: topicName('js-g') });
  await consumer.connect();
  const got = await consumeN(consumer, t, sent.length);
  await consumer.disconnect();
  assert.equal(got.length, sent.length);
  // Every record once, with its key, value and header.
  const byValue = new Map(got.map((m) => [m.value, m]));
  assert.equal(byValue.size, sent.length);
  for (const s of sent) {
    const g = byValue.get(s.value);
    assert.ok(g, `missing ${s.value}`);
    assert.equal(g.key, s.key);
    assert.equal(g.headers.seq, s.headers.seq);
  }
  // Offsets within each partition are consecutive from 0 and records with one key share a
  // partition in send order.
  for (const p of [0, 1, 2]) {
    const offs = got.filter((m) => m.partition === p).map((m) => m.offset);
    assert.deepEqual(offs, offs.map((_, i) => i));
  }
  for (let k = 0; k < 7; k += 1) {
    const mine = got.filter((m) => m.key === `k${k}`);
    assert.equal(new Set(mine.map((m) => m.partition)).size, 1, `key k${k} spans partitions`);
    const seqs = mine.map((m) => Number(m.headers.seq));
    assert.deepEqual(seqs, [...seqs].sort((a, b) => a - b), `key k${k} out of order`);
  }
});

test('a group splits partitions between two members and commits what they consumed', async () => {
  const t = topicName('js-group');
  const groupId = topicName('js-g2');
  await withAdmin((a) => a.createTopics({ topics: [{ topic: t, numPartitions: 4 }], waitForLeaders: true }));
  const producer = kafka.producer();
  await producer.connect();
  const N = 400;
  await producer.send({
    topic: t,
    acks: -1,
    messages: Array.from({ length: N }, (_, i) => ({ key: `k${i}`, value: `v${i}` })),
  });
  await producer.disconnect();

  const members = [kafka.consumer({ groupId }), kafka.consumer({ groupId })];
  const assigned = [new Set(), new Set()];
  const got = [];
  for (const [i, c] of members.entries()) {
    c.on(c.events.GROUP_JOIN, (e) => {
      assigned[i] = new Set((e.payload.memberAssignment[t] ?? []).map(Number));
    });
    await c.connect();
    await c.subscribe({ topics: [t], fromBeginning: true });
    await c.run({ eachMessage: async ({ partition, message }) => { got.push([i, partition, message.value.toString()]); } });
  }
  // Both members end up in one generation owning disjoint halves of the four partitions.
  await waitFor('both members assigned all partitions between them', () => assigned[0].size > 0 && assigned[1].size > 0
    && assigned[0].size + assigned[1].size === 4 && [...assigned[0]].every((p) => !assigned[1].has(p)), 60_000);
  await waitFor(`${N} records consumed (have ${got.length})`, () => new Set(got.map((g) => g[2])).size === N, 60_000);
  await Promise.all(members.map((c) => c.disconnect()));

  // Leaving commits what was consumed: every partition's committed offset is its end.
  await withAdmin(async (admin) => {
    const committed = await admin.fetchOffsets({ groupId, topics: [t] });
    const ends = await admin.fetchTopicOffsets(t);
    const end = new Map(ends.map((o) => [o.partition, o.high]));
    for (const p of committed[0].partitions) assert.equal(p.offset, end.get(p.partition), `partition ${p.partition}`);
    const described = await admin.describeGroups([groupId]);
    assert.equal(described.groups[0].errorCode, 0);
    assert.equal(described.groups[0].state, 'Empty');
    assert.equal(described.groups[0].protocolType, 'consumer');
  });
});

test('an idempotent producer writes each record once', async () => {
  const t = topicName('js-idem');
  await withAdmin((a) => a.createTopics({ topics: [{ topic: t, numPartitions: 1 }], waitForLeaders: true }));
  const producer = kafka.producer({ idempotent: true, maxInFlightRequests: 1 });
  await producer.connect();
  for (let i = 0; i < 20; i += 1) {
    const [r] = await producer.send({ topic: t, acks: -1, messages: [{ value: `m${i}` }, { value: `n${i}` }] });
    assert.equal(r.errorCode, 0);
    assert.equal(Number(r.baseOffset), 2 * i);
  }
  await producer.disconnect();
  await withAdmin(async (admin) => {
    const [o] = await admin.fetchTopicOffsets(t);
    assert.equal(o.high, '40');
  });
});

test('a produce to a topic that does not exist fails with UNKNOWN_TOPIC_OR_PARTITION when auto-creation is off', async () => {
  const producer = kafka.producer({ allowAutoTopicCreation: false, retry: { retries: 1, initialRetryTime: 50 } });
  await producer.connect();
  const t = topicName('js-missing');
  await assert.rejects(
    producer.send({ topic: t, messages: [{ value: 'x' }] }),
    (e) => {
      const types = [e.type, e.originalError?.type, e.cause?.type].filter(Boolean);
      assert.ok(types.includes('UNKNOWN_TOPIC_OR_PARTITION'), `${e.name}: ${e.message} ${types}`);
      return true;
    },
  );
  await producer.disconnect();
  await withAdmin(async (admin) => assert.ok(!(await admin.listTopics()).includes(t), 'the topic was created'));
  assert.equal(broker.exited(), null, 'the broker exited');
});

// Consumes `topic` from the start in a fresh group until `last` arrives (partition 0 only, so in
// order), returning every value seen: whatever a consumer of that isolation level was given
// before `last` is all it will ever be given up to there.
async function consumeUntil(topic, last, { readUncommitted }) {
  const consumer = kafka.consumer({ groupId: topicName('js-txn-g'), readUncommitted, maxWaitTimeInMs: 200 });
  await consumer.connect();
  try {
    const got = [];
    await consumer.subscribe({ topics: [topic], fromBeginning: true });
    await consumer.run({ eachMessage: async ({ message }) => { got.push(message.value.toString()); } });
    await waitFor(`${last} from ${topic} (have ${got})`, () => got.includes(last), 60_000);
    return got;
  } finally {
    await consumer.disconnect();
  }
}

test('a transactional producer commits and aborts as read_committed and read_uncommitted consumers see it', async () => {
  const t = topicName('js-txn');
  const group = topicName('js-txn-offsets');
  await withAdmin((a) => a.createTopics({ topics: [{ topic: t, numPartitions: 1 }], waitForLeaders: true }));
  const producer = kafka.producer({
    transactionalId: topicName('js-tid'), idempotent: true, maxInFlightRequests: 1,
  });
  await producer.connect();
  try {
    let txn = await producer.transaction();
    await txn.send({ topic: t, messages: ['c1-0', 'c1-1', 'c1-2'].map((value) => ({ value, partition: 0 })) });
    // Offsets sent to the transaction become the group's with its commit.
    await txn.sendOffsets({ consumerGroupId: group, topics: [{ topic: t, partitions: [{ partition: 0, offset: '3' }] }] });
    await txn.commit();
    txn = await producer.transaction();
    await txn.send({ topic: t, messages: ['ab-0', 'ab-1'].map((value) => ({ value, partition: 0 })) });
    await txn.sendOffsets({ consumerGroupId: group, topics: [{ topic: t, partitions: [{ partition: 0, offset: '5' }] }] });
    await txn.abort();
    txn = await producer.transaction();
    await txn.send({ topic: t, messages: ['c2-0', 'c2-1'].map((value) => ({ value, partition: 0 })) });
    await txn.commit();
  } finally {
    await producer.disconnect();
  }

  assert.deepEqual(await consumeUntil(t, 'c2-1', { readUncommitted: false }),
    ['c1-0', 'c1-1', 'c1-2', 'c2-0', 'c2-1']);
  assert.deepEqual(await consumeUntil(t, 'c2-1', { readUncommitted: true }),
    ['c1-0', 'c1-1', 'c1-2', 'ab-0', 'ab-1', 'c2-0', 'c2-1']);
  await withAdmin(async (admin) => {
    // 3 records + COMMIT, 2 + ABORT, 2 + COMMIT.
    const [o] = await admin.fetchTopicOffsets(t);
    assert.equal(o.high, '10');
    // The committed offset is the first transaction's; the aborted one's 5 was dropped.
    const [committed] = await admin.fetchOffsets({ groupId: group, topics: [t] });
    assert.deepEqual(committed.partitions.map((p) => [p.partition, p.offset]), [[0, '3']]);
  });
});

test('a second producer with the same transactional id fences the first', async () => {
  const t = topicName('js-fence');
  const tid = topicName('js-fence-tid');
  await withAdmin((a) => a.createTopics({ topics: [{ topic: t, numPartitions: 1 }], waitForLeaders: true }));
  const opts = { transactionalId: tid, idempotent: true, maxInFlightRequests: 1, retry: { retries: 2, initialRetryTime: 50 } };
  const zombie = kafka.producer(opts);
  const fresh = kafka.producer(opts);
  await zombie.connect();
  try {
    const old = await zombie.transaction();
    await old.send({ topic: t, messages: [{ value: 'zombie', partition: 0 }] });
    // InitProducerId for the same id aborts the zombie's open transaction and bumps the epoch.
    await fresh.connect();
    const txn = await fresh.transaction();
    await txn.send({ topic: t, messages: [{ value: 'fresh', partition: 0 }] });
    await txn.commit();
    await assert.rejects(old.commit(), (e) => {
      const types = [e.type, e.originalError?.type, e.cause?.type].filter(Boolean);
      assert.ok(types.some((ty) => /INVALID_PRODUCER_EPOCH|PRODUCER_FENCED/.test(ty)), `${e.name}: ${e.message} ${types}`);
      return true;
    });
  } finally {
    await zombie.disconnect();
    await fresh.disconnect();
  }
  assert.deepEqual(await consumeUntil(t, 'fresh', { readUncommitted: false }), ['fresh']);
  assert.deepEqual(await consumeUntil(t, 'fresh', { readUncommitted: true }), ['zombie', 'fresh']);
});
