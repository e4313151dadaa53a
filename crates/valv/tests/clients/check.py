"""Real FHIR client libraries against a running Valv (run by tests/it/clients.rs).

fhirpy (Beda Software) and fhirclient (SMART on FHIR's client-py), as installed by .ci/run in
a venv, use the server the way their users would: count(), sort(), include(), patch() and
get_or_create() of fhirpy, and a search through fhirclient's models. Each check prints one line;
the first failure raises, so the process exits non-zero with the reason.

Environment: VALV_URL (the FHIR base), VALV_TOKEN (a bearer credential), VALV_CA (the server's
certificate, PEM), VALV_PATIENT (a Patient id with four Observations dated 2021..2024).
"""

import os
import sys

from fhirpy import SyncFHIRClient
from fhirclient import client as smart_client
from fhirclient.models.patient import Patient

url, token, ca, patient = (os.environ[k] for k in ("VALV_URL", "VALV_TOKEN", "VALV_CA", "VALV_PATIENT"))


def check(what, ok, detail=""):
    print(f"{'ok' if ok else 'FAILED'}: {what} {detail}".rstrip())
    if not ok:
        sys.exit(1)


fp = SyncFHIRClient(url, authorization=f"Bearer {token}", requests_config={"verify": ca})
observations = fp.resources("Observation").search(patient=patient)

count = observations.count()
check("fhirpy count()", count == 4, f"-> {count}")

dates = [o["effectiveDateTime"] for o in observations.sort("-date").fetch()]
check("fhirpy sort('-date')", dates == sorted(dates, reverse=True) and len(dates) == 4, f"-> {dates}")

bundle = observations.include("Observation", "subject").fetch_raw()
modes = sorted((e["search"]["mode"], e["resource"]["resourceType"]) for e in bundle["entry"])
check("fhirpy include('Observation', 'subject')", modes.count(("include", "Patient")) == 1 and modes.count(("match", "Observation")) == 4, f"-> {modes}")

patched = fp.patch("Patient", patient, active=True)
check("fhirpy patch(active=True)", patched["active"] is True and fp.reference("Patient", patient).to_resource()["active"] is True)

made, created = fp.resources("Patient").search(identifier="urn:clients|42").get_or_create(
    fp.resource("Patient", identifier=[{"system": "urn:clients", "value": "42"}], name=[{"family": "Created"}]))
again, created_again = fp.resources("Patient").search(identifier="urn:clients|42").get_or_create(
    fp.resource("Patient", identifier=[{"system": "urn:clients", "value": "42"}], name=[{"family": "Twice"}]))
check("fhirpy get_or_create() twice", created and not created_again and made.id == again.id, f"-> {made.id} {again.id}")

smart = smart_client.FHIRClient(settings={"app_id": "valv-check", "api_base": url})
smart.server.session.verify = ca
smart.server.session.headers["Authorization"] = f"Bearer {token}"
found = Patient.where(struct={"_id": patient}).perform_resources(smart.server)
check("fhirclient Patient.where(_id).perform_resources()", len(found) == 1 and found[0].name[0].family == "Clients", f"-> {[p.id for p in found]}")
