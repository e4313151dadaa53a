#!/usr/bin/env python3
"""Writes access-matrix.csv: the authorization cases tests/it/access.rs runs against the server.

Each row is one request by one person (or key) on one patient's data, with the outcome the
access rules in docs/ACCESS.md give. The expected outcome is worked out here, by a model written
from that document rather than from the Rust or Cedar code, so the two can disagree. The choice
of rows is random but seeded: run it again and the table is the same.

The world (built by the test): care provider A with unit A (every staff user belongs to it except
the external specialist, who has no unit), care provider B, and one patient per combination of
  provider   same (managed by provider A) | other (provider B)
  relation   active | expired | none | consultant   (a CareTeam naming every staff member)
  consent    none | permit (share with provider A) | deny (root deny: a block for all staff)
             | withdrawn (a permit, then set inactive)
  block      yes (a Consent denying this user by their Practitioner) | no
each holding an Observation, a MedicationRequest and an Encounter. Physicians and nurses have a
twin who has broken the glass on every patient (break_glass = yes); for other roles break-glass is
refused, so their break_glass = yes rows expect what the rule without it gives.
"""

import csv
import itertools
import random
import sys
from pathlib import Path

STAFF = ["physician", "nurse", "assistant", "external_specialist"]
RELATIONS = ["active", "expired", "none", "consultant"]
CONSENTS = ["none", "permit", "deny", "withdrawn"]
ACTIONS = ["read", "search", "history", "create", "update", "delete"]
TYPES = ["Observation", "MedicationRequest", "Encounter", "Patient"]
READ_LIKE = {"read", "search", "history"}
CLINICAL = {"Observation", "MedicationRequest"}  # ClinicalData
ORDERS = {"MedicationRequest"}
ADMINISTRATIVE = {"Encounter", "Patient"}
CLINICAL_PURPOSES = {"TREAT", "ETREAT", "CAREMGT"}
DEFAULT_PURPOSE = {"physician": "TREAT", "nurse": "TREAT", "assistant": "TREAT", "external_specialist": "TREAT",
                   "patient": "PATRQT", "auditor": "HCOMPL", "support": "HSYSADMIN", "admin": "HSYSADMIN",
                   "service": "HOPERAT"}
SERVICE_SCOPES = "system/Observation.rs"


def staff_outcome(role, relation, provider, consent, block, break_glass, action, rtype, purpose):
    read = action in READ_LIKE
    in_care = relation in ("active", "consultant")
    bg = break_glass == "yes" and role in ("physician", "nurse")
    clinical_purpose = purpose in CLINICAL_PURPOSES
    permits = []
    if role == "physician" and in_care and clinical_purpose:
        permits.append("clinical-read" if read else "clinical-write-physician")
    if role == "nurse" and in_care and clinical_purpose:
        if read:
            permits.append("clinical-read")
        elif rtype not in ORDERS:
            permits.append("clinical-write-nurse")
    if role == "assistant" and in_care and rtype in ADMINISTRATIVE:
        permits.append("assistant-administrative")
    if role == "external_specialist" and relation == "consultant" and read:
        permits.append("consultant-read")
    if bg and read:
        permits.append("break-glass-read")
    if bg and not read and role == "physician" and rtype in CLINICAL:
        permits.append("break-glass-write")
    # Forbids. The external specialist has no unit, so no provider to compare: never cross-org.
    blocked = block == "yes" or consent == "deny"
    cross_org = provider == "other" and role != "external_specialist"
    consent_permit = consent == "permit" and role != "external_specialist"  # the permit names provider A
    if blocked and not bg:  # break-glass overrides a block (the default setting)
        return "deny"
    if cross_org and not consent_permit and not bg:
        return "deny"
    return "permit" if permits else "deny"


def outcome(row):
    role, action, rtype = row["role"], row["action"], row["type"]
    purpose = row["purpose"] or DEFAULT_PURPOSE[role]
    if role in STAFF:
        return staff_outcome(role, row["relation"], row["provider"], row["consent"], row["block"],
                             row["break_glass"], action, rtype, purpose)
    if role == "patient":
        return "permit" if row["relation"] == "self" and action in READ_LIKE else "deny"
    if role == "service":  # scopes system/Observation.rs: read and search (history reads)
        return "permit" if rtype == "Observation" and action in READ_LIKE else "deny"
    return "deny"  # admin, auditor, support without a grant: no patient data


def row(role, relation, provider, consent, block, break_glass, action, rtype, purpose=""):
    return {"role": role, "relation": relation, "provider": provider, "consent": consent, "block": block,
            "break_glass": break_glass, "action": action, "type": rtype, "purpose": purpose}


def allowed_request(action, rtype):
    # A Patient is neither created nor deleted in the matrix: a new patient has no relation yet,
    # and deleting one would remove the scenario under later rows.
    return not (rtype == "Patient" and action in ("create", "delete"))


def rows():
    rng = random.Random(20261124)
    out = []
    scenarios = list(itertools.product(["same", "other"], RELATIONS, CONSENTS, ["no", "yes"]))
    requests = [(a, t) for a in ACTIONS for t in TYPES if allowed_request(a, t)]
    # Every staff role on every scenario: a read of clinical data, and one random request.
    for role in STAFF:
        for (provider, relation, consent, block) in scenarios:
            out.append(row(role, relation, provider, consent, block, "no", "read", "Observation"))
            action, rtype = rng.choice(requests)
            bg = rng.choice(["no", "yes"])
            out.append(row(role, relation, provider, consent, block, bg, action, rtype))
    # Break-glass across the scenarios that keep clinicians out.
    for role in ("physician", "nurse"):
        for (provider, relation, consent, block) in scenarios:
            if relation in ("none", "expired") or block == "yes" or consent == "deny":
                action, rtype = rng.choice(requests)
                out.append(row(role, relation, provider, consent, block, "yes", action, rtype))
    # Every request once for a physician in care, and for the nurse (orders differ).
    for role in ("physician", "nurse", "assistant"):
        for action, rtype in requests:
            out.append(row(role, "active", "same", "none", "no", "no", action, rtype))
    # Purpose of use: clinical access needs a treatment purpose.
    for purpose in ("TREAT", "ETREAT", "CAREMGT", "HPAYMT", "HOPERAT", "HRESCH"):
        out.append(row("physician", "active", "same", "none", "no", "no", "read", "Observation", purpose))
        out.append(row("nurse", "active", "same", "none", "no", "no", "search", "Observation", purpose))
    # The patient: their own record (self) or another's (none).
    for relation in ("self", "none"):
        for action, rtype in requests:
            out.append(row("patient", relation, "same", "none", "no", "no", action, rtype))
    # People and keys with no patient data, and a scoped service key.
    for role in ("admin", "auditor", "support", "service"):
        for action, rtype in requests:
            provider, relation, consent, block = rng.choice(scenarios)
            out.append(row(role, relation, provider, consent, block, "no", action, rtype))
    for i, r in enumerate(out):
        r["case"] = str(i + 1)
        r["expected"] = outcome(r)
    return out


def main():
    path = Path(__file__).with_name("access-matrix.csv")
    fields = ["case", "role", "relation", "provider", "consent", "block", "break_glass", "action", "type", "purpose", "expected"]
    data = rows()
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, lineterminator="\n")
        w.writeheader()
        w.writerows(data)
    permits = sum(r["expected"] == "permit" for r in data)
    print(f"wrote {len(data)} cases ({permits} permit, {len(data) - permits} deny) to {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
