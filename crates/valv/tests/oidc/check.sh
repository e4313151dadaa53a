#!/usr/bin/env bash
# Smoke test of provider.js, end to end, with nothing but bash, curl, openssl and node:
# a throwaway CA and certificate, the provider on a free port over HTTPS, discovery and JWKS,
# the authorization code flow with PKCE for alice by plain HTTP requests (cookies by hand),
# the code exchanged with the client secret, both tokens verified against the JWKS and printed,
# bob's login (no second factor), client_credentials, key rotation, /test/mint and /test/tamper.
#
#   bash check.sh            # after `npm ci --omit=dev --no-audit --no-fund` here
set -euo pipefail
cd "$(dirname "$0")"
[ -d node_modules/oidc-provider ] || { echo "run: npm ci --omit=dev --no-audit --no-fund" >&2; exit 1; }

T=$(mktemp -d)
PID=
cleanup() { [ -n "$PID" ] && kill "$PID" 2>/dev/null; wait 2>/dev/null; rm -rf "$T"; }
trap cleanup EXIT
fail() { echo "FAIL: $*" >&2; echo "--- provider stderr:" >&2; tail -n 30 "$T/stderr" >&2 || true; exit 1; }
ms() { date +%s%3N; }

# --- a CA and a certificate for localhost and 127.0.0.1 -------------------------------------------
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 -subj /CN=valv-test-ca \
  -keyout "$T/ca.key" -out "$T/ca.pem" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=localhost \
  -keyout "$T/key.pem" -out "$T/csr.pem" 2>/dev/null
printf 'subjectAltName=DNS:localhost,IP:127.0.0.1,IP:::1\nbasicConstraints=CA:FALSE\n' > "$T/ext"
openssl x509 -req -in "$T/csr.pem" -CA "$T/ca.pem" -CAkey "$T/ca.key" -CAcreateserial -days 1 \
  -extfile "$T/ext" -out "$T/cert.pem" 2>/dev/null

# --- start ----------------------------------------------------------------------------------------
REDIRECT=https://127.0.0.1:9/oidc/callback   # nothing listens there: we only read the Location
t0=$(ms)
PORT=0 TLS_CERT="$T/cert.pem" TLS_KEY="$T/key.pem" KEYS_FILE="$T/keys.json" \
  CLIENT_ID=valv CLIENT_SECRET=s3cret REDIRECT_URI=https://127.0.0.1/oidc/callback REDIRECT_URI_ANY_PORT=1 \
  RESOURCE=https://valv.test/fhir ACCESS_TOKEN_TTL=120 \
  node provider.js > "$T/stdout" 2> "$T/stderr" &
PID=$!
for _ in $(seq 1 100); do
  grep -q '^READY ' "$T/stdout" 2>/dev/null && break
  kill -0 "$PID" 2>/dev/null || fail "provider exited"
  sleep 0.05
done
ISSUER=$(sed -n 's/^READY //p' "$T/stdout")
[ -n "$ISSUER" ] || fail "no READY line"
[ "$(wc -l < "$T/stdout")" = 1 ] || fail "stdout has more than the READY line"
echo "started in $(( $(ms) - t0 )) ms: $ISSUER (keys in $T/keys.json)"

C=(curl -sS --cacert "$T/ca.pem")
# req METHOD URL [curl args...]: response headers in $T/h, body in $T/b, status in $STATUS
req() { local m=$1 u=$2; shift 2; STATUS=$("${C[@]}" -X "$m" -D "$T/h" -o "$T/b" -w '%{http_code}' "$@" "$u"); }
header() { tr -d '\r' < "$T/h" | sed -n "s/^$1: //Ip" | head -n1; }
cookie() { tr -d '\r' < "$T/h" | sed -n "s/^set-cookie: $1=\([^;]*\).*/\1/Ip" | grep -v '^$' | head -n1; }
# json EXPR: evaluate a JS expression over the parsed body `j`
json() { node -e "const j=JSON.parse(require('fs').readFileSync('$T/b','utf8'));const v=($1);console.log(typeof v==='string'?v:JSON.stringify(v))"; }

# --- discovery and JWKS ---------------------------------------------------------------------------
req GET "$ISSUER/.well-known/openid-configuration"
[ "$STATUS" = 200 ] || fail "discovery $STATUS"
cp "$T/b" "$T/discovery.json"
[ "$(json j.issuer)" = "$ISSUER" ] || fail "discovery issuer"
AUTH=$(json j.authorization_endpoint); TOKEN=$(json j.token_endpoint); JWKS=$(json j.jwks_uri)
echo "discovery: auth=$AUTH token=$TOKEN jwks=$JWKS"
echo "  code_challenge_methods_supported=$(json j.code_challenge_methods_supported) acr_values_supported=$(json j.acr_values_supported)"
echo "  id_token_signing_alg_values_supported=$(json j.id_token_signing_alg_values_supported)"
req GET "$JWKS"
[ "$STATUS" = 200 ] || fail "jwks $STATUS"
cp "$T/b" "$T/jwks.json"
echo "jwks: $(json 'j.keys.map(k=>k.kty+"/"+(k.alg||"-")+"/"+k.kid)')"
json 'j.keys.some(k=>k.d||k.p)' | grep -q false || fail "the JWKS publishes private key material"

# --- the authorization code flow with PKCE, by hand -------------------------------------------------
# code_flow LOGIN: sets CODE_RESULT (the token response JSON in $T/token.json) and NONCE/STATE/VERIFIER
code_flow() {
  local login=$1 extra=${2:-}
  VERIFIER=$(openssl rand -base64 48 | tr '+/' '-_' | tr -d '=\n')
  CHALLENGE=$(printf %s "$VERIFIER" | openssl dgst -sha256 -binary | openssl base64 -A | tr '+/' '-_' | tr -d '=')
  STATE=$(openssl rand -hex 12); NONCE=$(openssl rand -hex 12)
  # 1. GET /auth -> 303 /interaction/<uid>, cookies _interaction and _interaction_resume
  req GET "$AUTH" -G --data-urlencode client_id=valv --data-urlencode response_type=code \
    --data-urlencode "redirect_uri=$REDIRECT" --data-urlencode "scope=openid profile email fhir" \
    --data-urlencode "state=$STATE" --data-urlencode "nonce=$NONCE" \
    --data-urlencode "code_challenge=$CHALLENGE" --data-urlencode code_challenge_method=S256
  [ "$STATUS" = 303 ] || fail "GET /auth: $STATUS $(cat "$T/b")"
  local loc interaction resume uid
  loc=$(header location); interaction=$(cookie _interaction); resume=$(cookie _interaction_resume)
  uid=${loc##*/}
  [ "$loc" = "/interaction/$uid" ] && [ "$interaction" = "$uid" ] && [ "$resume" = "$uid" ] \
    || fail "unexpected /auth answer: loc=$loc cookies=$interaction,$resume"
  # 2. POST /interaction/<uid>/login with the _interaction cookie -> 303 <issuer>/auth/<uid>
  req POST "$ISSUER/interaction/$uid/login" -H "Cookie: _interaction=$interaction" \
    --data-urlencode "login=$login" $extra
  [ "$STATUS" = 303 ] || fail "POST login: $STATUS $(cat "$T/b")"
  loc=$(header location)
  [ "$loc" = "$ISSUER/auth/$uid" ] || fail "login redirected to $loc"
  # 3. GET /auth/<uid> with the _interaction_resume cookie -> 303 REDIRECT?code&state&iss, cookie _session
  req GET "$loc" -H "Cookie: _interaction_resume=$resume"
  [ "$STATUS" = 303 ] || fail "resume: $STATUS $(cat "$T/b")"
  loc=$(header location); SESSION=$(cookie _session)
  case $loc in "$REDIRECT?"*) ;; *) fail "resume redirected to $loc";; esac
  [ -n "$SESSION" ] || fail "no _session cookie"
  local q=${loc#*\?}
  CODE=$(node -e "console.log(new URLSearchParams(process.argv[1]).get('code'))" "$q")
  local st iss
  st=$(node -e "console.log(new URLSearchParams(process.argv[1]).get('state'))" "$q")
  iss=$(node -e "console.log(new URLSearchParams(process.argv[1]).get('iss'))" "$q")
  [ "$st" = "$STATE" ] || fail "state came back as $st"
  [ "$iss" = "$ISSUER" ] || fail "iss came back as $iss"
  # 4. POST /token with HTTP Basic client authentication and the PKCE verifier
  req POST "$TOKEN" -u valv:s3cret --data-urlencode grant_type=authorization_code \
    --data-urlencode "code=$CODE" --data-urlencode "redirect_uri=$REDIRECT" --data-urlencode "code_verifier=$VERIFIER"
  [ "$STATUS" = 200 ] || fail "token: $STATUS $(cat "$T/b")"
  cp "$T/b" "$T/token.json"
}

# verify TOKEN_JSON_FIELD: check a JWT's signature against the JWKS fetched over HTTPS, print it
cat > "$T/verify.mjs" <<'EOF'
import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
const [jwt, jwksFile] = process.argv.slice(2);
const [h, p, s] = jwt.split('.');
const header = JSON.parse(Buffer.from(h, 'base64url'));
const claims = JSON.parse(Buffer.from(p, 'base64url'));
const jwk = JSON.parse(fs.readFileSync(jwksFile, 'utf8')).keys.find((k) => k.kid === header.kid);
if (!jwk) { console.log(JSON.stringify({ header, claims, verified: false, why: 'kid not in JWKS' })); process.exit(0); }
const key = crypto.createPublicKey({ key: jwk, format: 'jwk' });
const data = Buffer.from(`${h}.${p}`); const sig = Buffer.from(s, 'base64url');
const opts = {
  RS256: ['sha256', key], PS256: ['sha256', { key, padding: crypto.constants.RSA_PKCS1_PSS_PADDING, saltLength: 32 }],
  ES256: ['sha256', { key, dsaEncoding: 'ieee-p1363' }], EdDSA: [null, key],
}[header.alg];
const verified = !!opts && crypto.verify(opts[0], data, opts[1], sig);
console.log(JSON.stringify({ header, claims, verified }, null, 2));
EOF
verify() { node "$T/verify.mjs" "$1" "$T/jwks.json"; }
claim() { node -e "const o=JSON.parse(process.argv[1]);console.log(JSON.stringify($2))" "$1"; }

t1=$(ms)
code_flow alice
echo "code flow for alice: $(( $(ms) - t1 )) ms (4 requests)"
AT=$(node -e "console.log(JSON.parse(require('fs').readFileSync('$T/token.json','utf8')).access_token)")
IDT=$(node -e "console.log(JSON.parse(require('fs').readFileSync('$T/token.json','utf8')).id_token)")
echo "token response: $(node -e "const j=JSON.parse(require('fs').readFileSync('$T/token.json','utf8'));for(const k of ['access_token','id_token'])j[k]=j[k].slice(0,20)+'...';console.log(JSON.stringify(j))")"
ID=$(verify "$IDT"); ACC=$(verify "$AT")
echo "--- ID token (alice)"; echo "$ID"
echo "--- access token (alice)"; echo "$ACC"
check() { [ "$(claim "$1" "$2")" = "$3" ] || fail "$4: $(claim "$1" "$2") != $3"; }
check "$ID" o.verified true "ID token signature"
check "$ID" o.claims.iss "\"$ISSUER\"" "ID token iss"
check "$ID" o.claims.aud '"valv"' "ID token aud"
check "$ID" o.claims.nonce "\"$NONCE\"" "ID token nonce"
check "$ID" o.claims.amr '["pwd","otp"]' "ID token amr"
check "$ID" o.claims.acr '"urn:valv:mfa"' "ID token acr"
check "$ID" o.claims.roles '["physician"]' "ID token roles"
check "$ID" o.claims.units '["cardiology"]' "ID token units"
check "$ID" o.claims.preferred_username '"alice"' "ID token preferred_username"
check "$ACC" o.verified true "access token signature"
check "$ACC" o.header.typ '"at+jwt"' "access token typ"
check "$ACC" o.claims.aud '"https://valv.test/fhir"' "access token aud"
check "$ACC" o.claims.iss "\"$ISSUER\"" "access token iss"
check "$ACC" o.claims.sub '"alice"' "access token sub"
check "$ACC" o.claims.amr '["pwd","otp"]' "access token amr"
check "$ACC" o.claims.roles '["physician"]' "access token roles"
check "$ACC" o.claims.units '["cardiology"]' "access token units"
check "$ACC" o.claims.scope '"fhir"' "access token scope"
check "$ACC" 'o.claims.exp-o.claims.iat' 120 "access token lifetime"

# The code is single use, and a wrong verifier or secret is refused.
req POST "$TOKEN" -u valv:s3cret --data-urlencode grant_type=authorization_code \
  --data-urlencode "code=$CODE" --data-urlencode "redirect_uri=$REDIRECT" --data-urlencode "code_verifier=$VERIFIER"
[ "$STATUS" = 400 ] && [ "$(json j.error)" = invalid_grant ] || fail "code reuse: $STATUS $(cat "$T/b")"
# A request without PKCE is refused at /auth (error redirected to the client).
req GET "$AUTH" -G --data-urlencode client_id=valv --data-urlencode response_type=code \
  --data-urlencode "redirect_uri=$REDIRECT" --data-urlencode scope=openid --data-urlencode state=x
case $(header location) in *error=invalid_request*) ;; *) fail "no-PKCE request: $STATUS $(header location)";; esac
echo "code reuse refused; request without PKCE refused"

# --- bob: a password only ---------------------------------------------------------------------------
code_flow bob
ACC=$(verify "$(node -e "console.log(JSON.parse(require('fs').readFileSync('$T/token.json','utf8')).access_token)")")
ID=$(verify "$(node -e "console.log(JSON.parse(require('fs').readFileSync('$T/token.json','utf8')).id_token)")")
check "$ACC" o.claims.amr '["pwd"]' "bob access token amr"
check "$ID" o.claims.amr '["pwd"]' "bob ID token amr"
check "$ACC" o.claims.roles '["nurse"]' "bob roles"
echo "bob: amr=$(claim "$ACC" o.claims.amr) acr=$(claim "$ACC" o.claims.acr) roles=$(claim "$ACC" o.claims.roles)"
# alice again, choosing at login to have used only a password (step-up tests)
code_flow alice "--data-urlencode amr=pwd --data-urlencode acr=urn:valv:pwd"
ACC=$(verify "$(node -e "console.log(JSON.parse(require('fs').readFileSync('$T/token.json','utf8')).access_token)")")
check "$ACC" o.claims.amr '["pwd"]' "alice amr override"
check "$ACC" o.claims.acr '"urn:valv:pwd"' "alice acr override"
echo "alice with amr=pwd at login: amr=$(claim "$ACC" o.claims.amr) acr=$(claim "$ACC" o.claims.acr)"

# --- client_credentials -----------------------------------------------------------------------------
req POST "$TOKEN" -u valv:s3cret --data-urlencode grant_type=client_credentials --data-urlencode scope=fhir
[ "$STATUS" = 200 ] || fail "client_credentials: $STATUS $(cat "$T/b")"
ACC=$(verify "$(json j.access_token)")
check "$ACC" o.claims.sub '"valv"' "client_credentials sub"
check "$ACC" o.claims.aud '"https://valv.test/fhir"' "client_credentials aud"
echo "client_credentials: $(claim "$ACC" o.claims)"

# --- /test/mint: a token signed with the real key but the wrong audience -------------------------------
req POST "$ISSUER/test/mint" -H 'content-type: application/json' -d '{"login":"bob","claims":{"aud":"https://elsewhere"},"ttl":-60}'
[ "$STATUS" = 200 ] || fail "mint: $STATUS $(cat "$T/b")"
ACC=$(verify "$(json j.token)")
check "$ACC" o.verified true "minted signature"
check "$ACC" o.claims.aud '"https://elsewhere"' "minted aud"
[ "$(claim "$ACC" 'o.claims.exp < Date.now()/1000')" = true ] || fail "minted exp"
req POST "$ISSUER/test/mint" -H 'content-type: application/json' -d '{"key":"foreign"}'
check "$(verify "$(json j.token)")" o.verified false "foreign-key token must not verify"
echo "mint: real-key token with wrong aud and past exp verifies; foreign-key token does not"

# --- /test/tamper: the next token response carries an ID token with a wrong nonce --------------------
req POST "$ISSUER/test/tamper" -H 'content-type: application/json' -d '{"id_token":{"claims":{"nonce":"not-yours"}}}'
code_flow alice
ID=$(verify "$(node -e "console.log(JSON.parse(require('fs').readFileSync('$T/token.json','utf8')).id_token)")")
check "$ID" o.verified true "tampered ID token signature"
check "$ID" o.claims.nonce '"not-yours"' "tampered nonce"
echo "tamper: next ID token re-signed with nonce=not-yours"

# --- rotation ---------------------------------------------------------------------------------------
OLD_KID=$(claim "$(verify "$AT")" o.header.kid)
req POST "$ISSUER/test/rotate"
[ "$STATUS" = 200 ] || fail "rotate: $STATUS"
echo "rotate: $(cat "$T/b")"
req GET "$JWKS"; cp "$T/b" "$T/jwks.json"
echo "jwks after rotation: $(json 'j.keys.map(k=>k.kty+"/"+k.kid)')"
[ "$(json j.keys.length)" = 6 ] || fail "old keys should stay published"
node -e "const k=JSON.parse(require('fs').readFileSync('$T/keys.json','utf8')).keys;if(k.length!==6||!k[0].d)process.exit(1)" \
  || fail "KEYS_FILE not rewritten with 6 private keys"
code_flow alice
NEW=$(verify "$(node -e "console.log(JSON.parse(require('fs').readFileSync('$T/token.json','utf8')).access_token)")")
check "$NEW" o.verified true "post-rotation signature"
[ "$(claim "$NEW" o.header.kid)" != "$OLD_KID" ] || fail "new token still uses the old kid"
check "$(verify "$AT")" o.verified true "old token still verifies against the rotated JWKS"
echo "after rotation: new tokens kid=$(claim "$NEW" o.header.kid), old kid $OLD_KID still published"
req POST "$ISSUER/test/rotate?drop_old=1"
req GET "$JWKS"; cp "$T/b" "$T/jwks.json"
[ "$(json j.keys.length)" = 3 ] || fail "drop_old should leave 3 keys"
check "$(verify "$AT")" o.verified false "old token after drop_old"
echo "rotate?drop_old=1: 3 keys left, tokens of the dropped keys no longer verify"

# --- SIGTERM ----------------------------------------------------------------------------------------
kill -TERM "$PID"; wait "$PID" && rc=0 || rc=$?
PID=
[ "$rc" = 0 ] || fail "exit status after SIGTERM: $rc"
echo "PASS (total $(( $(ms) - t0 )) ms)"
