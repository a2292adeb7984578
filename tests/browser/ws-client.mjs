// A standard graphql-transport-ws client, unmodified: graphql-ws's own `createClient`
// over the `ws` package. The end-to-end tests run it against a live Chartline API.
//
//   node ws-client.mjs --url ws://127.0.0.1:PORT/graphql [--token T]
//        --subscribe QUERY [--subscribe QUERY ...]
//        [--probe QUERY --http http://127.0.0.1:PORT/graphql --probe-token T]
//        [--count N] [--timeout-ms MS]
//
// Prints one JSON line per event: {"connected":true} once the connection is
// acknowledged; {"sub":i,"payload":{...},"probe":{...}} for every `next` (with the
// result of the probe query, sent right after the notification arrived, when given);
// {"complete":i}; {"closed":code,"reason":"..."} when the server closes the socket.
// Exits 0 after N `next` messages (or when every subscription completed), 1 on timeout.
import { createClient } from 'graphql-ws';
import WebSocket from 'ws';

const args = process.argv.slice(2);
const opt = { subscribe: [], count: Infinity, timeoutMs: 20000 };
for (let i = 0; i < args.length; i += 2) {
  const [key, value] = [args[i], args[i + 1]];
  if (key === '--url') opt.url = value;
  else if (key === '--token') opt.token = value;
  else if (key === '--subscribe') opt.subscribe.push(value);
  else if (key === '--probe') opt.probe = value;
  else if (key === '--http') opt.http = value;
  else if (key === '--probe-token') opt.probeToken = value;
  else if (key === '--count') opt.count = Number(value);
  else if (key === '--timeout-ms') opt.timeoutMs = Number(value);
  else { console.error('unknown option ' + key); process.exit(2); }
}
const print = (line) => process.stdout.write(JSON.stringify(line) + '\n');

const client = createClient({
  url: opt.url,
  webSocketImpl: WebSocket,
  connectionParams: opt.token ? { Authorization: 'Bearer ' + opt.token } : {},
  retryAttempts: 0,
  lazy: false,
  on: {
    connected: () => print({ connected: true }),
    closed: (event) => print({ closed: event.code, reason: String(event.reason || '') }),
  },
});

async function probe() {
  if (!opt.probe) return undefined;
  const response = await fetch(opt.http, {
    method: 'POST',
    headers: { 'Content-Type': 'application/json', Authorization: 'Bearer ' + opt.probeToken },
    body: JSON.stringify({ query: opt.probe }),
  });
  return (await response.json()).data;
}

let received = 0;
let open = opt.subscribe.length;
const finish = (code) => { client.dispose(); setTimeout(() => process.exit(code), 50); };
setTimeout(() => { print({ timeout: true, received }); finish(1); }, opt.timeoutMs);

opt.subscribe.forEach((query, sub) => {
  client.subscribe({ query }, {
    next: async (payload) => {
      received += 1;
      // `seq` is the arrival order (the probe's round trip may reorder the printing).
      const line = { seq: received, sub, payload };
      const result = await probe().catch((e) => ({ probeError: String(e) }));
      if (result !== undefined) line.probe = result;
      print(line);
      if (received >= opt.count) finish(0);
    },
    error: (error) => {
      print({ sub, error: Array.isArray(error) ? error : String(error.message || error.reason || error) });
      open -= 1;
      if (open === 0) finish(0);
    },
    complete: () => {
      print({ complete: sub });
      open -= 1;
      if (open === 0) finish(0);
    },
  });
});
