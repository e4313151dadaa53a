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

/// True if resources of this type can belong to a patient compartment.
pub fn is_compartment_type(resource_type: &str) -> bool {
    resource_type == "Patient" || COMPARTMENT.iter().any(|(t, _)| *t == resource_type)
}

/// The ids of every patient whose compartment holds this resource, owner first, no duplicates.
/// A Patient is in its own compartment (`own_id`), never in another patient's through `link`.
pub fn patients(resource_type: &str, own_id: &str, resource: &Value) -> Vec<String> {
    if resource_type == "Patient" {
        return vec![own_id.to_string()];
    }
    let Some((_, paths)) = COMPARTMENT.iter().find(|(t, _)| *t == resource_type) else {
        return Vec::new();
    };
    let mut out: Vec<String> = Vec::new();
    for path in *paths {
        let mut refs = Vec::new();
        for value in crate::search::values_at(resource, path) {
            reference::collect_references(value, &mut refs);
        }
        for r in refs {
            if let Some(local) = reference::parse(r) {
                if local.resource_type == "Patient" && !out.contains(&local.id) {
                    out.push(local.id);
                }
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
    fn patient_is_its_own_compartment() {
        let p = json!({"resourceType":"Patient","link":[{"other":{"reference":"Patient/other"}}]});
        assert_eq!(patients("Patient", "me", &p), vec!["me".to_string()]);
    }
}
