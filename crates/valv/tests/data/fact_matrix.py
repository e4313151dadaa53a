#!/usr/bin/env python3
"""Writes fact-matrix.csv: the writes to access facts tests/it/facts.rs runs against the server.

Every default role x every kind of access fact (consent, care-team, provider, organization) x a
change that widens or narrows access x whose access (the writer's own, or another person's). The
expected outcome is worked out here from docs/ACCESS.md (§2 roles, §4.6 changes of access facts),
by a small model of the world written independently of the Rust and Cedar code, so the two can
disagree.

The world (built by the test): provider A (hospital A, ward A), provider B (hospital B, ward B).
Each staff writer (physician, nurse, assistant, external specialist, registrar) has a Practitioner
"pw" and the units ward A and an own unit "w" (part of hospital A); the external specialist has no
unit. "po" is another Practitioner. The admin, auditor, support and the two service keys have no
Practitioner and no unit; the patient writer acts on their own record. Per case a fresh patient
(the patient writer: their own) is set up as the case says, then the writer makes one write:

  consent  widen self:   block against pw (clinical data); the write sets it inactive
           widen other:  block against po; set inactive
           narrow self:  a new block against pw
           narrow other: a new block against po
  care     widen self:   team {po}; a new team {pw}
           widen other:  team {pw}; a new team {po}
           narrow self:  team {pw, po}; the team rewritten as {po}
           narrow other: team {pw, po}; rewritten as {pw}
  provider widen self:   managed by B, team {pw, po}; the record moved to A
           widen other:  managed by A, team {pw, po}; moved to B
           narrow self:  no provider, team {pw, po}; assigned to B
           narrow other: no provider, team {pw, po}; assigned to A
  organization  self, for a writer with units: their own unit w (part of hospital A) moved
                under hospital B (widen) or taken out of the tree (narrow); otherwise a fresh
                unit: one with no parent put under hospital A (widen), or one under hospital A
                taken out of the tree (narrow)
"""

import csv
import sys
from pathlib import Path

ROLES = ["physician", "nurse", "assistant", "external_specialist", "registrar", "patient", "support", "admin", "auditor",
         "service", "service_wildcard"]
FACTS = ["consent", "care-team", "provider", "organization"]
STAFF = {"physician", "nurse", "assistant", "external_specialist", "registrar"}
TYPE_OF = {"consent": "Consent", "care-team": "CareTeam", "provider": "Patient", "organization": "Organization"}


def setup(fact, direction, subject):
    """(team before, team after, blocks before, blocks after, provider before, provider after)."""
    team, blocks, prov = {"pw", "po"}, set(), "A"
    after_team, after_blocks, after_prov = None, None, None
    if fact == "consent":
        who = "pw" if subject == "self" else "po"
        if direction == "widen":
            blocks, after_blocks = {who}, set()
        else:
            after_blocks = {who}
    elif fact == "care-team":
        if direction == "widen":
            team = {"po"} if subject == "self" else {"pw"}
            after_team = team | ({"pw"} if subject == "self" else {"po"})
        else:
            after_team = {"po"} if subject == "self" else {"pw"}
    elif fact == "provider":
        if direction == "widen":
            prov, after_prov = ("B", "A") if subject == "self" else ("A", "B")
        else:
            prov, after_prov = None, ("B" if subject == "self" else "A")
    after_team = team if after_team is None else after_team
    after_blocks = blocks if after_blocks is None else after_blocks
    after_prov = prov if fact != "provider" else after_prov
    return team, after_team, blocks, after_blocks, prov, after_prov


def may_patient_data(role, in_care, cross_org, same_provider, rtype):
    """The resource-level permit to write rtype (CareTeam, Consent, Patient) of the patient."""
    if role in STAFF and cross_org:
        return False  # cross-provider-consent (no permit consent in these setups)
    if role == "physician":
        return in_care
    if role == "nurse":
        return in_care and rtype != "Consent"
    if role == "assistant":
        return in_care and rtype in ("CareTeam", "Patient")
    if role == "registrar":
        return same_provider
    if role == "patient":
        return rtype == "Consent"
    return role in ("service", "service_wildcard")


def access(role, has_unit, team, blocks, prov):
    """What the writer may do on the patient in a world state, as far as facts decide it."""
    cross = has_unit and prov is not None and prov != "A"
    if role in ("physician", "nurse", "assistant") and "pw" in team and not cross:
        can = {"administrative"}
        if role != "assistant" and "pw" not in blocks:
            can.add("clinical")
        return can
    if role == "registrar" and has_unit and not cross:
        return {"administrative"}
    # External specialists only as consultants (never in these teams); others by no fact.
    return set()


def outcome(role, fact, direction, subject):
    rtype = TYPE_OF[fact]
    has_unit = role in STAFF and role != "external_specialist"
    if fact == "organization":
        if role not in ("admin", "service", "service_wildcard"):
            return "deny"  # Reference data is written by admins and services only
        if role == "service_wildcard":
            return "deny"  # changing a fact needs a scope naming the type
        return "permit"  # no units: nothing of theirs moves
    if role == "patient":
        # The writer's own record, kept as it is (managed by A, no team of theirs); only consents
        # are theirs to write, and a consent never changes what a patient sees of their own record.
        return "permit" if rtype == "Consent" else "deny"
    team, after_team, blocks, after_blocks, prov, after_prov = setup(fact, direction, subject)
    me = "pw" if role in STAFF else None
    in_care = me in team if me else False
    cross_org = has_unit and prov is not None and prov != "A"
    same = has_unit and (prov is None or prov == "A")
    same_after = has_unit and (after_prov is None or after_prov == "A")
    if not may_patient_data(role, in_care, cross_org, same, rtype):
        return "deny"
    widening = bool(after_team - team) or bool(blocks - after_blocks) or (prov is not None and prov != after_prov)
    narrowing = bool(team - after_team) or bool(after_blocks - blocks) or (after_prov is not None and prov != after_prov)
    # The writer's own access grows (whatever the change does to others).
    before = access(role, has_unit, team, blocks, prov)
    after = access(role, has_unit, after_team, after_blocks, after_prov)
    if after - before:
        return "deny"
    if role == "registrar":
        return "permit" if same and (same_after or prov is not None) else "deny"
    if role == "physician":
        return "permit" if fact in ("consent", "care-team") and in_care and narrowing and not widening else "deny"
    if role == "service":
        return "permit"
    return "deny"


def main():
    out = Path(__file__).with_name("fact-matrix.csv")
    rows = []
    for role in ROLES:
        for fact in FACTS:
            for direction in ["widen", "narrow"]:
                for subject in ["self", "other"]:
                    rows.append([len(rows) + 1, role, fact, direction, subject, outcome(role, fact, direction, subject)])
    with out.open("w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["case", "role", "fact", "direction", "subject", "expected"])
        w.writerows(rows)
    permits = sum(1 for r in rows if r[-1] == "permit")
    print(f"wrote {len(rows)} cases ({permits} permit) to {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
