// A scriptable OpenID Connect provider for Valv's integration tests.
//
// It is the real `oidc-provider` package (panva/node-oidc-provider, pinned in package.json) with
// static test accounts, a form-less login that a plain HTTP client can drive, JWT access tokens
// for one API resource, and a few test-only endpoints (/test/*). Never expose it anywhere: the
// /test endpoints hand out tokens and rotate keys for anyone who asks.
//
//   npm ci --omit=dev --no-audit --no-fund      # once, in this directory
//   PORT=0 TLS_CERT=cert.pem TLS_KEY=key.pem REDIRECT_URI=https://127.0.0.1/oidc/callback \
//     REDIRECT_URI_ANY_PORT=1 KEYS_FILE=/tmp/op-keys.json node provider.js
//
// stdout carries exactly one line, `READY <issuer>`, once it listens; everything else goes to
// stderr. SIGTERM and SIGINT end it (exit 0); so does the end of stdin when EXIT_ON_STDIN_EOF=1.
//
// Environment (all optional):
//   PORT                 port on 127.0.0.1; 0 (the default) picks a free one, see the READY line
//   HOST                 address to listen on, default 127.0.0.1. When the issuer's host is
//                        `localhost` it also listens on [::1] at the same port if it can, so a client
//                        that resolves localhost to ::1 first still connects.
//   TLS_CERT, TLS_KEY    PEM certificate (chain) and key: serve HTTPS. Without both, plain HTTP.
//   ISSUER               default https://localhost:PORT (http:// without TLS); no trailing slash
//   CLIENT_ID            default valv
//   CLIENT_SECRET        default valv-secret
//   TOKEN_AUTH_METHOD    the client's token_endpoint_auth_method: client_secret_basic (default)
//                        or client_secret_post (oidc-provider allows exactly one per client)
//   REDIRECT_URI         Valv's callback URL; several may be given separated by spaces.
//                        Default https://127.0.0.1/oidc/callback
//   REDIRECT_URI_ANY_PORT=1  accept a redirect_uri that equals a registered one except for its
//                        port (as RFC 8252 does for loopback), so the provider can start before
//                        Valv has picked its port
//   POST_LOGOUT_REDIRECT_URI  optional, space separated, for RP-initiated logout (/session/end)
//   RESOURCE             the API resource indicator, default https://valv.test/fhir
//   AUDIENCE             `aud` of access tokens, default RESOURCE
//   RESOURCE_SCOPES      scopes the API knows, space separated, default "fhir"
//   ACCESS_TOKEN_TTL     access token lifetime in seconds, default 300
//   ID_TOKEN_TTL         ID token lifetime in seconds, default 300
//   AT_ALG               access token signing alg: RS256 (default), PS256, ES256 or EdDSA
//   ID_TOKEN_ALG         ID token signing alg, same choices, default RS256
//   KEYS_FILE            private JWKS ({"keys":[...]}). Read if it exists, else generated (an RSA
//                        2048, an EC P-256 and an Ed25519 key, in that order) and written (0600).
//                        Default: keys only in memory.
//   ACCOUNTS_FILE        JSON object {accountId: {claims...}} merged over the built-in accounts
//                        (alice, bob, carol); an account's amr/acr are its login's defaults
//   EXIT_ON_STDIN_EOF=1  exit when stdin closes (a test that spawns it with a piped stdin and dies
//                        takes the provider with it)
//   LOG_REQUESTS=1       one stderr line per request
//
// Authorization code flow without a browser (details in README.md):
//   1. GET  /auth?client_id&redirect_uri&response_type=code&scope=openid ...&state&nonce
//           &code_challenge&code_challenge_method=S256
//        -> 303 Location /interaction/<uid>; Set-Cookie _interaction=<uid> (Path=/interaction/<uid>)
//           and _interaction_resume=<uid> (Path=/auth/<uid>)
//   2. POST /interaction/<uid>/login  (Cookie: _interaction=<uid>)
//           application/x-www-form-urlencoded  login=alice  [amr=pwd,otp] [acr=...]
//        -> 303 Location <issuer>/auth/<uid>
//   3. GET  /auth/<uid>  (Cookie: _interaction_resume=<uid>)
//        -> 303 Location REDIRECT_URI?code=...&state=...&iss=...; Set-Cookie _session=...
//   4. POST /token  grant_type=authorization_code&code&redirect_uri&code_verifier, client secret
//        -> {access_token (JWT, aud=AUDIENCE), id_token, token_type, expires_in, scope}
//
// Test-only endpoints (JSON in, JSON out):
//   POST /test/rotate[?drop_old=1]  new RSA, EC and Ed25519 keys first, old ones kept (or dropped);
//                                   rewrites KEYS_FILE; JWKS and new tokens change at once
//   GET  /test/keys                 the private JWKS in use
//   POST /test/mint                 a JWT access token (or any JWT) with chosen claims/header/alg/key
//   POST /test/tamper               rewrite the id_token and/or access_token of the NEXT successful
//                                   token response (one shot), e.g. a wrong nonce or aud
//   GET  /test/config               the effective configuration (issuer, client, resource, ...)

import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as http from 'node:http';
import * as https from 'node:https';
import * as path from 'node:path';

import Provider, { errors } from 'oidc-provider';

// oidc-provider prints its notices with console.info; stdout is reserved for the READY line.
console.info = (...args) => console.error(...args);
console.log = (...args) => console.error(...args);

const env = process.env;
const int = (name, dflt) => {
  const v = env[name];
  if (v === undefined || v === '') return dflt;
  const n = Number(v);
  if (!Number.isInteger(n)) throw new Error(`${name} must be an integer, got ${v}`);
  return n;
};
const list = (v) => (v || '').split(/\s+/).filter(Boolean);

const SIGNING_ALGS = ['RS256', 'PS256', 'ES256', 'EdDSA'];
const cfg = {
  host: env.HOST || '127.0.0.1',
  port: int('PORT', 0),
  tlsCert: env.TLS_CERT || '',
  tlsKey: env.TLS_KEY || '',
  clientId: env.CLIENT_ID || 'valv',
  clientSecret: env.CLIENT_SECRET || 'valv-secret',
  tokenAuthMethod: env.TOKEN_AUTH_METHOD || 'client_secret_basic',
  redirectUris: list(env.REDIRECT_URI || 'https://127.0.0.1/oidc/callback'),
  redirectAnyPort: env.REDIRECT_URI_ANY_PORT === '1',
  postLogoutRedirectUris: list(env.POST_LOGOUT_REDIRECT_URI),
  resource: env.RESOURCE || 'https://valv.test/fhir',
  resourceScopes: env.RESOURCE_SCOPES || 'fhir',
  accessTokenTtl: int('ACCESS_TOKEN_TTL', 300),
  idTokenTtl: int('ID_TOKEN_TTL', 300),
  atAlg: env.AT_ALG || 'RS256',
  idTokenAlg: env.ID_TOKEN_ALG || 'RS256',
  keysFile: env.KEYS_FILE || '',
  accountsFile: env.ACCOUNTS_FILE || '',
};
cfg.audience = env.AUDIENCE || cfg.resource;
for (const [name, alg] of [['AT_ALG', cfg.atAlg], ['ID_TOKEN_ALG', cfg.idTokenAlg]]) {
  if (!SIGNING_ALGS.includes(alg)) throw new Error(`${name} must be one of ${SIGNING_ALGS.join(', ')}`);
}
if (!['client_secret_basic', 'client_secret_post'].includes(cfg.tokenAuthMethod)) {
  throw new Error('TOKEN_AUTH_METHOD must be client_secret_basic or client_secret_post');
}
if ((cfg.tlsCert === '') !== (cfg.tlsKey === '')) throw new Error('give both TLS_CERT and TLS_KEY, or neither');

// ---------------------------------------------------------------------------------------------
// Accounts

const ACR_MFA = 'urn:valv:mfa';
const ACR_PWD = 'urn:valv:pwd';
const accounts = {
  alice: {
    preferred_username: 'alice',
    name: 'Alice Andersson',
    given_name: 'Alice',
    family_name: 'Andersson',
    email: 'alice@valv.test',
    email_verified: true,
    roles: ['physician'],
    groups: ['physician'],
    units: ['cardiology'],
    amr: ['pwd', 'otp'],
    acr: ACR_MFA,
  },
  bob: {
    preferred_username: 'bob',
    name: 'Bob Berg',
    given_name: 'Bob',
    family_name: 'Berg',
    email: 'bob@valv.test',
    email_verified: true,
    roles: ['nurse'],
    groups: ['nurse'],
    units: ['cardiology'],
    amr: ['pwd'],
    acr: ACR_PWD,
  },
  // Signs in with a hardware key but holds no role and no unit: maps to nothing in Valv.
  carol: {
    preferred_username: 'carol',
    name: 'Carol Claesson',
    given_name: 'Carol',
    family_name: 'Claesson',
    email: 'carol@valv.test',
    email_verified: true,
    roles: [],
    groups: [],
    units: [],
    amr: ['pwd', 'hwk'],
    acr: ACR_MFA,
  },
};
if (cfg.accountsFile) {
  Object.assign(accounts, JSON.parse(fs.readFileSync(cfg.accountsFile, 'utf8')));
}
// Claims copied from the account into every access token (besides iss, sub, aud, exp, ...).
const TOKEN_CLAIMS = ['preferred_username', 'name', 'email', 'roles', 'groups', 'units'];

const USER_CLAIMS = {
  openid: ['sub', 'acr', 'amr', 'roles', 'groups', 'units'],
  profile: ['preferred_username', 'name', 'given_name', 'family_name'],
  email: ['email', 'email_verified'],
};
const acrValues = [...new Set([ACR_PWD, ACR_MFA, ...Object.values(accounts).map((a) => a.acr).filter(Boolean)])];

async function findAccount(_ctx, id) {
  const a = accounts[id];
  if (!a) return undefined;
  return {
    accountId: id,
    async claims() {
      const { amr, acr, ...claims } = a; // amr/acr come from the login, not from here
      return { sub: id, ...claims };
    },
  };
}

// ---------------------------------------------------------------------------------------------
// Keys

const b64u = (buf) => Buffer.from(buf).toString('base64url');

function thumbprint(jwk) {
  const members = { RSA: ['e', 'kty', 'n'], EC: ['crv', 'kty', 'x', 'y'], OKP: ['crv', 'kty', 'x'] }[jwk.kty];
  const canonical = JSON.stringify(Object.fromEntries(members.map((m) => [m, jwk[m]])));
  return crypto.createHash('sha256').update(canonical).digest('base64url');
}

function generateKey(kind) {
  let pair;
  if (kind === 'RSA') pair = crypto.generateKeyPairSync('rsa', { modulusLength: 2048 });
  else if (kind === 'EC') pair = crypto.generateKeyPairSync('ec', { namedCurve: 'P-256' });
  else pair = crypto.generateKeyPairSync('ed25519');
  const jwk = pair.privateKey.export({ format: 'jwk' });
  jwk.use = 'sig';
  if (kind === 'EC') jwk.alg = 'ES256';
  jwk.kid = thumbprint(jwk);
  return jwk;
}
const generateKeySet = () => ['RSA', 'EC', 'OKP'].map(generateKey);

function writeKeys(keys) {
  if (!cfg.keysFile) return;
  const tmp = `${cfg.keysFile}.${process.pid}.tmp`;
  fs.mkdirSync(path.dirname(path.resolve(cfg.keysFile)), { recursive: true });
  fs.writeFileSync(tmp, `${JSON.stringify({ keys }, null, 2)}\n`, { mode: 0o600 });
  fs.renameSync(tmp, cfg.keysFile);
}

function loadKeys() {
  if (cfg.keysFile && fs.existsSync(cfg.keysFile)) {
    const { keys } = JSON.parse(fs.readFileSync(cfg.keysFile, 'utf8'));
    if (!Array.isArray(keys) || !keys.length) throw new Error(`${cfg.keysFile}: no keys`);
    for (const k of keys) if (!k.kid) k.kid = thumbprint(k);
    return keys;
  }
  const keys = generateKeySet();
  writeKeys(keys);
  return keys;
}

let keys = loadKeys();

// The key and alg a JWT is signed with: the first key usable for `alg`, as oidc-provider picks.
function keyFor(alg, kid) {
  const kty = { RS: 'RSA', PS: 'RSA', ES: 'EC', Ed: 'OKP' }[alg.slice(0, 2)];
  return keys.find((k) => k.kty === kty && (kid === undefined || k.kid === kid)
    && (k.alg === undefined || k.alg === alg) && (kty !== 'EC' || k.crv === 'P-256'));
}

function signJwt(header, payload, alg, key) {
  const input = `${b64u(JSON.stringify(header))}.${b64u(JSON.stringify(payload))}`;
  let sig;
  const bits = alg.slice(2);
  if (alg === 'none') sig = Buffer.alloc(0);
  else if (alg.startsWith('HS')) sig = crypto.createHmac(`sha${bits}`, key).update(input).digest();
  else if (alg.startsWith('RS')) sig = crypto.sign(`sha${bits}`, Buffer.from(input), key);
  else if (alg.startsWith('PS')) {
    sig = crypto.sign(`sha${bits}`, Buffer.from(input), {
      key, padding: crypto.constants.RSA_PKCS1_PSS_PADDING, saltLength: Number(bits) / 8,
    });
  } else if (alg === 'ES256') sig = crypto.sign('sha256', Buffer.from(input), { key, dsaEncoding: 'ieee-p1363' });
  else if (alg === 'EdDSA' || alg === 'Ed25519') sig = crypto.sign(null, Buffer.from(input), key);
  else throw new Error(`cannot sign with alg ${alg}`);
  return `${input}.${b64u(sig)}`;
}

// ---------------------------------------------------------------------------------------------
// The provider. Rebuilt on key rotation; the in-memory adapter's storage is module-wide, so
// sessions, interactions, codes and grants survive the swap.

let issuer;
let provider;
let handler;
let tamper = null; // one-shot rewrite of the next token response

function accountTokenClaims(accountId, amr, acr) {
  const a = accounts[accountId];
  if (!a) return {};
  const out = {};
  for (const c of TOKEN_CLAIMS) if (a[c] !== undefined) out[c] = a[c];
  out.amr = amr ?? a.amr;
  out.acr = acr ?? a.acr;
  return out;
}

function buildProvider() {
  const p = new Provider(issuer, {
    clients: [{
      client_id: cfg.clientId,
      client_secret: cfg.clientSecret,
      redirect_uris: cfg.redirectUris,
      post_logout_redirect_uris: cfg.postLogoutRedirectUris,
      grant_types: ['authorization_code', 'refresh_token', 'client_credentials'],
      response_types: ['code'],
      token_endpoint_auth_method: cfg.tokenAuthMethod,
      id_token_signed_response_alg: cfg.idTokenAlg,
    }],
    jwks: { keys },
    findAccount,
    claims: USER_CLAIMS,
    acrValues,
    conformIdTokenClaims: false, // the ID token carries the scope's claims (roles, units, ...)
    pkce: { required: () => true }, // S256 is the only method oidc-provider 9 supports
    features: {
      devInteractions: { enabled: false },
      clientCredentials: { enabled: true },
      introspection: { enabled: true },
      revocation: { enabled: true },
      resourceIndicators: {
        enabled: true,
        defaultResource: async () => cfg.resource,
        useGrantedResource: async () => true,
        getResourceServerInfo: async (_ctx, resourceIndicator) => {
          if (resourceIndicator !== cfg.resource) throw new errors.InvalidTarget();
          return {
            scope: cfg.resourceScopes,
            audience: cfg.audience,
            accessTokenTTL: cfg.accessTokenTtl,
            accessTokenFormat: 'jwt',
            jwt: { sign: { alg: cfg.atAlg } },
          };
        },
      },
    },
    extraTokenClaims: async (ctx, token) => {
      if (!token.accountId) return undefined; // client_credentials: the client is the subject
      const src = ctx?.oidc?.entities?.AuthorizationCode ?? ctx?.oidc?.entities?.RefreshToken;
      return accountTokenClaims(token.accountId, src?.amr, src?.acr);
    },
    // No consent screen: grant whatever the (single, first-party) client asks for.
    loadExistingGrant: async (ctx) => {
      const { oidc } = ctx;
      const grantId = oidc.result?.consent?.grantId || oidc.session.grantIdFor(oidc.client.clientId);
      let grant = grantId ? await oidc.provider.Grant.find(grantId) : undefined;
      grant ||= new oidc.provider.Grant({ clientId: oidc.client.clientId, accountId: oidc.session.accountId });
      grant.addOIDCScope([...oidc.requestParamOIDCScopes].join(' '));
      grant.addOIDCClaims([...oidc.requestParamClaims]);
      for (const [indicator, rs] of Object.entries(oidc.resourceServers)) {
        grant.addResourceScope(indicator, [...oidc.requestParamScopes].filter((s) => rs.scopes.has(s)).join(' '));
      }
      await grant.save();
      return grant;
    },
    ttl: {
      AccessToken: cfg.accessTokenTtl,
      ClientCredentials: cfg.accessTokenTtl,
      IdToken: cfg.idTokenTtl,
      AuthorizationCode: 60,
      Interaction: 600,
      Session: 3600,
      Grant: 3600,
      RefreshToken: 3600,
    },
    clientBasedCORS: () => false,
    renderError: async (ctx, out) => {
      ctx.type = 'json';
      ctx.body = out;
    },
  });

  if (cfg.redirectAnyPort) {
    const allowed = p.Client.prototype.redirectUriAllowed;
    p.Client.prototype.redirectUriAllowed = function redirectUriAllowed(value) {
      if (allowed.call(this, value)) return true;
      const u = URL.parse(value);
      if (!u) return false;
      u.port = '';
      return allowed.call(this, u.href);
    };
  }

  p.use(testRoutes);
  p.use(async (ctx, next) => { // post-processing of the token endpoint for /test/tamper
    await next();
    if (tamper && ctx.oidc?.route === 'token' && ctx.status === 200 && ctx.body?.access_token) {
      const t = tamper;
      tamper = null;
      for (const which of ['id_token', 'access_token']) {
        if (t[which] && ctx.body[which]) ctx.body[which] = reSign(ctx.body[which], t[which]);
      }
    }
  });
  p.on('server_error', (_ctx, err) => console.error('server_error', err));
  return p;
}

function setProvider() {
  provider = buildProvider();
  handler = provider.callback();
}

// ---------------------------------------------------------------------------------------------
// Interactions (login) and /test routes, run before oidc-provider's own routes.

const html = (s) => String(s).replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);

async function readBody(ctx) {
  const chunks = [];
  for await (const c of ctx.req) chunks.push(c);
  const raw = Buffer.concat(chunks).toString('utf8');
  if ((ctx.get('content-type') || '').includes('application/json')) return raw ? JSON.parse(raw) : {};
  return Object.fromEntries(new URLSearchParams(raw));
}

function loginPage(ctx, uid, prompt, message) {
  ctx.type = 'html';
  ctx.body = `<!doctype html><title>Sign in</title>
<p>${html(message || `prompt: ${prompt}`)}</p>
<form method="post" action="/interaction/${html(uid)}/login">
<input name="login" placeholder="alice"> <input name="password" type="password">
<button>Sign in</button></form>
<form method="post" action="/interaction/${html(uid)}/abort"><button>Cancel</button></form>`;
}

const csv = (v) => (v === undefined || v === '' ? undefined : String(v).split(/[\s,]+/).filter(Boolean));

async function interactionRoute(ctx, uid, action) {
  let details;
  try {
    details = await provider.interactionDetails(ctx.req, ctx.res);
  } catch (err) {
    ctx.status = 400;
    ctx.body = { error: 'invalid_request', error_description: `interaction: ${err.error_description || err.message} (send the _interaction cookie)` };
    return;
  }
  if (details.uid !== uid) {
    ctx.status = 400;
    ctx.body = { error: 'invalid_request', error_description: 'interaction uid and _interaction cookie differ' };
    return;
  }
  const prompt = details.prompt.name;
  let result;
  if (ctx.method === 'GET' && action === undefined) {
    loginPage(ctx, uid, prompt);
    return;
  }
  if (ctx.method !== 'POST') {
    ctx.status = 405;
    return;
  }
  const body = await readBody(ctx);
  if (action === 'login') {
    const id = body.login;
    if (!accounts[id]) {
      ctx.status = 401;
      loginPage(ctx, uid, prompt, `unknown user ${id ?? ''}`);
      return;
    }
    result = {
      login: {
        accountId: id,
        amr: csv(body.amr) ?? accounts[id].amr,
        acr: body.acr || accounts[id].acr,
        remember: body.remember !== 'false',
      },
    };
  } else if (action === 'confirm') {
    // Only reached if a consent prompt is ever raised (loadExistingGrant grants everything).
    const grant = details.grantId
      ? await provider.Grant.find(details.grantId)
      : new provider.Grant({ accountId: details.session.accountId, clientId: details.params.client_id });
    const d = details.prompt.details;
    if (d.missingOIDCScope) grant.addOIDCScope(d.missingOIDCScope.join(' '));
    if (d.missingOIDCClaims) grant.addOIDCClaims(d.missingOIDCClaims);
    for (const [indicator, scopes] of Object.entries(d.missingResourceScopes || {})) {
      grant.addResourceScope(indicator, scopes.join(' '));
    }
    result = { consent: { grantId: await grant.save() } };
  } else if (action === 'abort') {
    result = { error: 'access_denied', error_description: 'End-User aborted interaction' };
  } else {
    ctx.status = 404;
    return;
  }
  const returnTo = await provider.interactionResult(ctx.req, ctx.res, result, { mergeWithLastSubmission: false });
  ctx.status = 303;
  ctx.redirect(returnTo);
}

// Rewrite a JWT's header/claims and sign it again; see /test/mint for the options.
function reSign(jwt, opts) {
  const [h, c] = jwt.split('.');
  const header = JSON.parse(Buffer.from(h, 'base64url'));
  const claims = JSON.parse(Buffer.from(c, 'base64url'));
  return mint({ ...opts, baseHeader: header, baseClaims: claims }).token;
}

const merged = (base, over) => {
  const out = { ...base };
  for (const [k, v] of Object.entries(over || {})) {
    if (v === null) delete out[k];
    else out[k] = v;
  }
  return out;
};

// POST /test/mint options:
//   login    account whose claims go into the token (default alice; null for none)
//   ttl      seconds until exp (default ACCESS_TOKEN_TTL; negative = already expired)
//   claims   merged over the defaults; a null value removes the claim
//   header   merged over {alg, typ: "at+jwt", kid}; a null value removes the member
//   alg      RS256 (default), RS384, RS512, PS256..PS512, ES256, EdDSA, HS256..HS512, none
//   key      "current" (default: the provider's first key for alg), a kid from the JWKS, or
//            "foreign" (a fresh key the JWKS does not hold; the header still names the current kid)
//   hmac_secret  HS*: the secret; default the current RSA public key in PEM (alg confusion)
function mint(opts = {}) {
  const alg = opts.alg || 'RS256';
  const now = Math.floor(Date.now() / 1000);
  const login = opts.login === undefined ? 'alice' : opts.login;
  const ttl = opts.ttl ?? cfg.accessTokenTtl;
  const baseClaims = opts.baseClaims ?? {
    ...(login ? accountTokenClaims(login) : {}),
    jti: crypto.randomBytes(16).toString('base64url'),
    sub: login || cfg.clientId,
    iat: now,
    exp: now + ttl,
    scope: cfg.resourceScopes,
    client_id: cfg.clientId,
    iss: issuer,
    aud: cfg.audience,
  };
  if (opts.baseClaims && opts.ttl !== undefined) baseClaims.exp = now + ttl;
  const claims = merged(baseClaims, opts.claims);

  let key;
  let kid;
  if (alg === 'none') {
    kid = undefined;
  } else if (alg.startsWith('HS')) {
    const rsa = keyFor('RS256');
    key = opts.hmac_secret ?? crypto.createPublicKey({ key: rsa, format: 'jwk' }).export({ type: 'spki', format: 'pem' });
    kid = rsa.kid;
  } else {
    const current = keyFor(alg);
    if (!current) throw new Error(`no key in the JWKS for ${alg}`);
    if (opts.key === 'foreign') {
      const foreign = generateKey(current.kty);
      key = crypto.createPrivateKey({ key: foreign, format: 'jwk' });
      kid = current.kid;
    } else {
      const jwk = opts.key && opts.key !== 'current' ? keyFor(alg, opts.key) : current;
      if (!jwk) throw new Error(`no key with kid ${opts.key} for ${alg}`);
      key = crypto.createPrivateKey({ key: jwk, format: 'jwk' });
      kid = jwk.kid;
    }
  }
  const header = merged(merged(opts.baseHeader ?? { typ: 'at+jwt' }, { alg, kid }), opts.header);
  return { token: signJwt(header, claims, alg, key), header, claims };
}

async function testRoute(ctx, name) {
  if (name === 'config' && ctx.method === 'GET') {
    ctx.body = {
      issuer,
      client_id: cfg.clientId,
      token_endpoint_auth_method: cfg.tokenAuthMethod,
      redirect_uris: cfg.redirectUris,
      redirect_uri_any_port: cfg.redirectAnyPort,
      resource: cfg.resource,
      audience: cfg.audience,
      resource_scopes: cfg.resourceScopes,
      access_token_ttl: cfg.accessTokenTtl,
      at_alg: cfg.atAlg,
      id_token_alg: cfg.idTokenAlg,
      acr_values: acrValues,
      accounts: Object.keys(accounts),
      kids: keys.map((k) => k.kid),
    };
  } else if (name === 'keys' && ctx.method === 'GET') {
    ctx.body = { keys };
  } else if (name === 'rotate' && ctx.method === 'POST') {
    const previous = keys.map((k) => k.kid);
    const fresh = generateKeySet();
    keys = ctx.query.drop_old === '1' ? fresh : [...fresh, ...keys];
    writeKeys(keys);
    setProvider();
    ctx.body = { kids: keys.map((k) => k.kid), current: fresh.map((k) => k.kid), previous };
  } else if (name === 'mint' && ctx.method === 'POST') {
    try {
      ctx.body = mint(await readBody(ctx));
    } catch (err) {
      ctx.status = 400;
      ctx.body = { error: 'invalid_request', error_description: err.message };
    }
  } else if (name === 'tamper' && ctx.method === 'POST') {
    tamper = await readBody(ctx);
    ctx.body = { armed: tamper };
  } else {
    ctx.status = 404;
    ctx.body = { error: 'not_found' };
  }
}

async function testRoutes(ctx, next) {
  let m = /^\/interaction\/([^/]+)(?:\/(login|confirm|abort))?\/?$/.exec(ctx.path);
  if (m) return interactionRoute(ctx, m[1], m[2]);
  m = /^\/test\/([a-z]+)$/.exec(ctx.path);
  if (m) return testRoute(ctx, m[1]);
  return next();
}

// ---------------------------------------------------------------------------------------------
// Server

const tls = cfg.tlsCert ? { cert: fs.readFileSync(cfg.tlsCert), key: fs.readFileSync(cfg.tlsKey) } : null;
const onRequest = (req, res) => {
  if (env.LOG_REQUESTS === '1') {
    const t0 = Date.now();
    res.on('finish', () => console.error(`${req.method} ${req.url} -> ${res.statusCode} ${Date.now() - t0}ms`));
  }
  handler(req, res);
};
const makeServer = () => (tls ? https.createServer(tls, onRequest) : http.createServer(onRequest));
const listen = (server, host, port) => new Promise((resolve, reject) => {
  server.once('error', reject);
  server.listen(port, host, () => { server.off('error', reject); resolve(server.address().port); });
});

const servers = [makeServer()];
const port = await listen(servers[0], cfg.host, cfg.port);
issuer = (env.ISSUER || `${tls ? 'https' : 'http'}://localhost:${port}`).replace(/\/$/, '');
if (new URL(issuer).hostname === 'localhost' && cfg.host === '127.0.0.1') {
  const v6 = makeServer();
  try {
    await listen(v6, '::1', port);
    servers.push(v6);
  } catch (err) {
    console.error(`not listening on [::1]:${port}: ${err.code || err.message}`);
  }
}
setProvider();

const stop = () => {
  for (const s of servers) s.close();
  process.exit(0);
};
process.on('SIGTERM', stop);
process.on('SIGINT', stop);
if (env.EXIT_ON_STDIN_EOF === '1') {
  process.stdin.on('end', stop);
  process.stdin.on('close', stop);
  process.stdin.resume();
}

process.stdout.write(`READY ${issuer}\n`);
