//! The R4 Patient compartment (CompartmentDefinition `patient`): which patients a resource
//! belongs to, found from its references without any store lookup.
//!
//! The table maps each resource type to the elements behind the compartment's search parameters
//! (e.g. Observation: `subject`, `performer`). The first patient found in table order owns the
//! resource: its data key seals the resource. Types absent from the table sit outside every
//! patient compartment and are sealed with the tenant key.

use crate::reference;
use serde_json::Value;

/// Element paths (dot-separated, arrays traversed implicitly) whose references place a resource
/// in a patient's compartment, in priority order.
const COMPARTMENT: &[(&str, &[&str])] = &[
    ("Account", &["subject"]),
    ("AdverseEvent", &["subject"]),
    ("AllergyIntolerance", &["patient", "recorder", "asserter"]),
    ("Appointment", &["participant.actor"]),
    ("AppointmentResponse", &["actor"]),
    ("AuditEvent", &["entity.what"]),
    ("Basic", &["subject", "author"]),
    ("BodyStructure", &["patient"]),
    ("CarePlan", &["subject", "activity.detail.performer"]),
    ("CareTeam", &["subject", "participant.member"]),
    ("ChargeItem", &["subject"]),
    ("Claim", &["patient", "payee.party"]),
    ("ClaimResponse", &["patient"]),
    ("ClinicalImpression", &["subject"]),
    ("Communication", &["subject", "sender", "recipient"]),
    ("CommunicationRequest", &["subject", "sender", "recipient", "requester"]),
    ("Composition", &["subject", "author", "attester.party"]),
    ("Condition", &["subject", "asserter"]),
    ("Consent", &["patient"]),
    ("Coverage", &["beneficiary", "policyHolder", "subscriber", "payor"]),
    ("CoverageEligibilityRequest", &["patient"]),
    ("CoverageEligibilityResponse", &["patient"]),
    ("DetectedIssue", &["patient"]),
    ("DeviceRequest", &["subject", "performer"]),
    ("DeviceUseStatement", &["subject"]),
    ("DiagnosticReport", &["subject"]),
    ("DocumentManifest", &["subject", "author", "recipient"]),
    ("DocumentReference", &["subject", "author"]),
    ("Encounter", &["subject"]),
    ("EnrollmentRequest", &["candidate"]),
    ("EpisodeOfCare", &["patient"]),
    ("ExplanationOfBenefit", &["patient", "payee.party"]),
    ("FamilyMemberHistory", &["patient"]),
    ("Flag", &["subject"]),
    ("Goal", &["subject"]),
    ("Group", &["member.entity"]),
    ("ImagingStudy", &["subject"]),
    ("Immunization", &["patient"]),
    ("ImmunizationEvaluation", &["patient"]),
    ("ImmunizationRecommendation", &["patient"]),
    ("Invoice", &["subject", "recipient"]),
    ("List", &["subject", "source"]),
    ("MeasureReport", &["subject"]),
    ("Media", &["subject"]),
    ("MedicationAdministration", &["subject", "performer.actor"]),
    ("MedicationDispense", &["subject", "receiver"]),
    ("MedicationRequest", &["subject"]),
    ("MedicationStatement", &["subject"]),
    ("MolecularSequence", &["patient"]),
    ("NutritionOrder", &["patient"]),
    ("Observation", &["subject", "performer"]),
    ("Person", &["link.target"]),
    ("Procedure", &["subject", "performer.actor"]),
    ("Provenance", &["target"]),
    ("QuestionnaireResponse", &["subject", "author"]),
    ("RelatedPerson", &["patient"]),
    ("RequestGroup", &["subject", "action.participant"]),
    ("ResearchSubject", &["individual"]),
    ("RiskAssessment", &["subject"]),
    ("Schedule", &["actor"]),
    ("ServiceRequest", &["subject", "performer"]),
    ("Specimen", &["subject"]),
    ("SupplyDelivery", &["patient"]),
    ("SupplyRequest", &["deliverTo"]),
    ("VisionPrescription", &["patient"]),
];

/// Types outside the R4 Patient compartment whose elements can still name a patient: their
/// resources are that patient's data too (owner found the same way, first path first). R4
/// reference targets: Task.for/focus/owner/requester/restriction.recipient (Any, Patient),
/// Binary.securityContext (Any), Device.patient, Contract.subject/signer.party (Any, Patient),
/// GuidanceResponse.subject, VerificationResult.target (Any), Linkage.item.resource (Any),
/// MessageHeader.focus (Any). A Bundle is owned by the first patient it names anywhere.
const BEYOND_COMPARTMENT: &[(&str, &[&str])] = &[
    ("Binary", &["securityContext"]),
    ("Contract", &["subject", "signer.party"]),
    ("Device", &["patient"]),
    ("GuidanceResponse", &["subject"]),
    ("Linkage", &["item.resource"]),
    ("MessageHeader", &["focus"]),
    ("Task", &["for", "focus", "owner", "requester", "restriction.recipient"]),
    ("VerificationResult", &["target"]),
];

/// True if resources of this type can belong to a patient compartment.
pub fn is_compartment_type(resource_type: &str) -> bool {
    resource_type == "Patient" || COMPARTMENT.iter().any(|(t, _)| *t == resource_type)
}

/// True if resources of this type can be a patient's data: the compartment's types and those
/// beyond it that can name a patient (see [`patients`]).
pub fn is_patient_data_type(resource_type: &str) -> bool {
    is_compartment_type(resource_type) || resource_type == "Bundle" || BEYOND_COMPARTMENT.iter().any(|(t, _)| *t == resource_type)
}

/// The element paths that place a resource of this type with a patient, in priority order.
pub fn owner_paths(resource_type: &str) -> Option<&'static [&'static str]> {
    COMPARTMENT.iter().chain(BEYOND_COMPARTMENT).find(|(t, _)| *t == resource_type).map(|(_, p)| *p)
}

/// The ids of every patient whose compartment holds this resource, owner first, no duplicates.
/// A Patient is in its own compartment (`own_id`), never in another patient's through `link`.
pub fn patients(resource_type: &str, own_id: &str, resource: &Value) -> Vec<String> {
    if resource_type == "Patient" {
        return vec![own_id.to_string()];
    }
    if resource_type == "Bundle" {
        let mut refs = Vec::new();
        reference::collect_references(resource, &mut refs);
        return local_patients(refs);
    }
    let Some(paths) = owner_paths(resource_type) else {
        return Vec::new();
    };
    let mut refs = Vec::new();
    for path in paths {
        for value in crate::search::values_at(resource, path) {
            reference::collect_references(value, &mut refs);
        }
    }
    local_patients(refs)
}

/// The ids of the local Patient references among `refs`, in order, without duplicates.
fn local_patients(refs: Vec<&str>) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for r in refs {
        if let Some(local) = reference::parse(r) {
            if local.resource_type == "Patient" && !out.contains(&local.id) {
                out.push(local.id);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn observation_subject_owns() {
        let obs = json!({"resourceType":"Observation","subject":{"reference":"Patient/p1"},
            "performer":[{"reference":"Practitioner/x"},{"reference":"Patient/p2"}]});
        assert_eq!(patients("Observation", "o", &obs), vec!["p1".to_string(), "p2".to_string()]);
    }

    #[test]
    fn non_patient_reference_is_not_a_compartment() {
        let obs = json!({"resourceType":"Observation","subject":{"reference":"Group/g"}});
        assert!(patients("Observation", "o", &obs).is_empty());
        assert!(patients("Organization", "o", &json!({})).is_empty());
        assert!(!is_compartment_type("Organization"));
    }

    #[test]
    fn types_beyond_the_compartment_that_name_a_patient_are_theirs() {
        let task = json!({"resourceType":"Task","for":{"reference":"Patient/p2"},"owner":{"reference":"Practitioner/x"}});
        assert_eq!(patients("Task", "t", &task), vec!["p2".to_string()]);
        let device = json!({"resourceType":"Device","patient":{"reference":"Patient/p3"}});
        assert_eq!(patients("Device", "d", &device), vec!["p3".to_string()]);
        assert!(patients("Device", "d", &json!({"resourceType":"Device"})).is_empty());
        let bundle = json!({"resourceType":"Bundle","type":"document","entry":[{"resource":{"resourceType":"Composition","subject":{"reference":"Patient/p4"}}}]});
        assert_eq!(patients("Bundle", "b", &bundle), vec!["p4".to_string()]);
        assert!(is_patient_data_type("Task") && is_patient_data_type("Binary") && !is_compartment_type("Task"));
        assert!(!is_patient_data_type("Organization"));
    }

    #[test]
    fn patient_is_its_own_compartment() {
        let p = json!({"resourceType":"Patient","link":[{"other":{"reference":"Patient/other"}}]});
        assert_eq!(patients("Patient", "me", &p), vec!["me".to_string()]);
    }
}
