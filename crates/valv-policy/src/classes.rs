//! Resource classes: the groups policies speak of instead of listing FHIR types one by one.
//! `PatientData` holds every type of the R4 Patient compartment, split into `Administrative`
//! (demographics, encounters, scheduling, care teams) and `ClinicalData` (`Orders` and the rest);
//! `Consent` sits directly under `PatientData`; types beyond the compartment that can name a
//! patient (Task, Device, Binary, … see `valv_fhir::compartment`) are `Clinical` too; other types are `Reference`
//! (organisations, practitioners, locations, medications); `AuditEvent` is `Audit`.

/// `(class, parent)` pairs: the class tree.
pub const CLASS_TREE: &[(&str, Option<&str>)] = &[
    ("PatientData", None),
    ("Administrative", Some("PatientData")),
    ("ClinicalData", Some("PatientData")),
    ("Orders", Some("ClinicalData")),
    ("Clinical", Some("ClinicalData")),
    ("Reference", None),
    ("Audit", None),
];

const ADMINISTRATIVE: &[&str] = &[
    "Patient", "RelatedPerson", "Person", "Encounter", "EpisodeOfCare", "Appointment", "AppointmentResponse", "CareTeam", "Flag",
];
const ORDERS: &[&str] = &["MedicationRequest", "ServiceRequest", "DeviceRequest", "NutritionOrder", "VisionPrescription", "CommunicationRequest"];

/// The class a resource type belongs to directly.
pub fn class_of(resource_type: &str) -> &'static str {
    if resource_type == "AuditEvent" {
        "Audit"
    } else if resource_type == "Consent" {
        "PatientData"
    } else if ADMINISTRATIVE.contains(&resource_type) {
        "Administrative"
    } else if ORDERS.contains(&resource_type) {
        "Orders"
    } else if valv_fhir::compartment::is_patient_data_type(resource_type) {
        "Clinical"
    } else {
        "Reference"
    }
}

/// Whether `resource_type` is `class` or lies under it.
pub fn is_in(resource_type: &str, class: &str) -> bool {
    if resource_type == class {
        return true;
    }
    let mut at = Some(class_of(resource_type));
    while let Some(c) = at {
        if c == class {
            return true;
        }
        at = CLASS_TREE.iter().find(|(n, _)| *n == c).and_then(|(_, p)| *p);
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes() {
        assert_eq!(class_of("Observation"), "Clinical");
        assert_eq!(class_of("MedicationRequest"), "Orders");
        assert_eq!(class_of("Encounter"), "Administrative");
        assert_eq!(class_of("Organization"), "Reference");
        assert!(is_in("MedicationRequest", "PatientData"));
        assert!(is_in("Consent", "PatientData"));
        assert!(!is_in("Practitioner", "PatientData"));
        assert!(is_in("Observation", "Observation"));
    }
}
