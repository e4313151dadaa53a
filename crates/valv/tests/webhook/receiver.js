// A webhook receiver for Valv's integration tests (not shipped): HTTPS with Node's own TLS, and
// the Standard Webhooks signature checked with Node's own crypto, independently of Valv's code.
//
// Environment: PORT (0: any), TLS_CERT and TLS_KEY (PEM files), SECRET (whsec_<base64>), OUT (a
// file: one JSON line per request received), FAIL_FIRST (answer 503 to that many correctly
// signed requests first). Prints "READY <port>" once listening; exits when stdin closes.
//
// Answers: 204 to a correctly signed, fresh (timestamp within 5 minutes) POST; 401 to a wrong or
// missing signature; 400 to a stale timestamp or a body that is not JSON; 503 while failing.

import { createServer } from 'node:https';
import { createHmac, timingSafeEqual } from 'node:crypto';
import { readFileSync, appendFileSync } from 'node:fs';

const secret = process.env.SECRET ?? '';
if (!secret.startsWith('whsec_')) throw new Error('SECRET must be whsec_<base64>');
const key = Buffer.from(secret.slice('whsec_'.length), 'base64');
let failFirst = Number(process.env.FAIL_FIRST ?? '0');

function signatureOk(id, timestamp, body, header) {
  const expected = createHmac('sha256', key).update(`${id}.${timestamp}.`).update(body).digest();
  return (header ?? '').split(' ').some((part) => {
    const [version, sig] = part.split(',');
    if (version !== 'v1' || !sig) return false;
    const given = Buffer.from(sig, 'base64');
    return given.length === expected.length && timingSafeEqual(given, expected);
  });
}

const server = createServer({ cert: readFileSync(process.env.TLS_CERT), key: readFileSync(process.env.TLS_KEY) }, (req, res) => {
  const chunks = [];
  let size = 0;
  req.on('data', (c) => {
    size += c.length;
    if (size > 1 << 20) req.destroy();
    else chunks.push(c);
  });
  req.on('end', () => {
    const body = Buffer.concat(chunks);
    const id = req.headers['webhook-id'];
    const timestamp = req.headers['webhook-timestamp'];
    const signed = req.method === 'POST' && !!id && !!timestamp && signatureOk(id, timestamp, body, req.headers['webhook-signature']);
    const fresh = Math.abs(Date.now() / 1000 - Number(timestamp)) <= 300;
    let json = null;
    try {
      json = JSON.parse(body.toString('utf8'));
    } catch {}
    let status = 204;
    if (!signed) status = 401;
    else if (!fresh || json === null) status = 400;
    else if (failFirst > 0) {
      failFirst -= 1;
      status = 503;
    }
    appendFileSync(process.env.OUT, JSON.stringify({ method: req.method, path: req.url, id, timestamp, contentType: req.headers['content-type'], signed, fresh, status, body: json }) + '\n');
    res.writeHead(status);
    res.end();
  });
});

server.listen(Number(process.env.PORT ?? '0'), '127.0.0.1', () => {
  console.log(`READY ${server.address().port}`);
});
process.stdin.on('end', () => process.exit(0));
process.stdin.resume();
