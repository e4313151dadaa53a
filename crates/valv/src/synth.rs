//! Synthetic patients for `valv synth`, `valv serve --demo`, tests and benchmarks.
//!
//! [`patient_bundle`] builds one patient's record as a FHIR R4 transaction Bundle: the patient, a
//! care unit (Organization), a physician (Practitioner), the CareTeam that links them (the care
//! relationship the access policy looks for), encounters with vital signs and a lab value,
//! diagnoses, prescriptions, procedures, allergies, immunizations, and sometimes a lab report and
//! a clinical note. Every resource is labelled `HTEST` (test health data) in `meta.security`.
//!
//! Nothing is real: names, streets and units come from built-in lists, identifiers use synthetic
//! systems or a form no resident's personnummer takes (see `personnummer`), phone numbers come from the
//! series the Swedish regulator PTS reserves for fiction, e-mail addresses use `example.com`.
//!
//! Deterministic on purpose: all randomness comes from a [`SynthRng`] seeded by the caller and the
//! current date is an argument, so a seed reproduces the same records byte for byte — tests can
//! assert on them and benchmark runs are comparable.

use serde_json::{json, Map, Value};

/// Medical record numbers of synthetic patients.
pub const MRN_SYSTEM: &str = "urn:valv:synthetic:mrn";
/// Swedish national identifier system (Inera's URI); the values are in a test range (day + 60).
pub const PERSONNUMMER_SYSTEM: &str = "http://electronichealth.se/identifier/personnummer";
/// Identifiers of the synthetic care units (stand-in for HSA-id, which is real and assigned).
pub const CARE_UNIT_SYSTEM: &str = "urn:valv:synthetic:care-unit";
/// Identifiers of the synthetic practitioners.
pub const PRACTITIONER_SYSTEM: &str = "urn:valv:synthetic:practitioner";

const LOINC: &str = "http://loinc.org";
const SNOMED: &str = "http://snomed.info/sct";
const RXNORM: &str = "http://www.nlm.nih.gov/research/umls/rxnorm";
const CVX: &str = "http://hl7.org/fhir/sid/cvx";
const UCUM: &str = "http://unitsofmeasure.org";
const OBSERVATION_CATEGORY: &str = "http://terminology.hl7.org/CodeSystem/observation-category";
const CONDITION_CLINICAL: &str = "http://terminology.hl7.org/CodeSystem/condition-clinical";
const CONDITION_VERIFICATION: &str = "http://terminology.hl7.org/CodeSystem/condition-ver-status";
const CONDITION_CATEGORY: &str = "http://terminology.hl7.org/CodeSystem/condition-category";
const ALLERGY_CLINICAL: &str = "http://terminology.hl7.org/CodeSystem/allergyintolerance-clinical";
const ALLERGY_VERIFICATION: &str =
    "http://terminology.hl7.org/CodeSystem/allergyintolerance-verification";
const ACT_CODE: &str = "http://terminology.hl7.org/CodeSystem/v3-ActCode";
const ACT_REASON: &str = "http://terminology.hl7.org/CodeSystem/v3-ActReason";
const PARTICIPATION_TYPE: &str = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType";
const INTERPRETATION: &str = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation";
const IDENTIFIER_TYPE: &str = "http://terminology.hl7.org/CodeSystem/v2-0203";
const ORGANIZATION_TYPE: &str = "http://terminology.hl7.org/CodeSystem/organization-type";
const DIAGNOSTIC_SECTION: &str = "http://terminology.hl7.org/CodeSystem/v2-0074";
const MARITAL_STATUS: &str = "http://terminology.hl7.org/CodeSystem/v3-MaritalStatus";
const COURSE_OF_THERAPY: &str =
    "http://terminology.hl7.org/CodeSystem/medicationrequest-course-of-therapy";
const PERFORMER_FUNCTION: &str = "http://terminology.hl7.org/CodeSystem/v2-0443";

/// How far back a synthetic record reaches: encounters and immunizations fall in these last days.
const RECORD_HORIZON_DAYS: i64 = 3652;

// ---------------------------------------------------------------------------------------------
// Randomness

/// A small deterministic PRNG (splitmix64), seeded by the caller, so the same seed gives the same
/// patients. Not for anything secret: it only has to be fast, portable and well spread.
#[derive(Debug, Clone)]
pub struct SynthRng {
    state: u64,
}

impl SynthRng {
    pub fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (0 when `n` is 0). Multiply-shift: the bias is below 2^-40 for our `n`.
    pub fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }

    /// Uniform in `lo..=hi` (`lo` when the range is empty).
    pub fn range(&mut self, lo: i64, hi: i64) -> i64 {
        if hi <= lo {
            return lo;
        }
        let span = hi.abs_diff(lo).saturating_add(1);
        lo.saturating_add_unsigned(self.below(span))
    }

    /// How many of something: uniform in `lo..=hi`.
    pub fn count(&mut self, lo: usize, hi: usize) -> usize {
        lo + self.index(hi.saturating_sub(lo).saturating_add(1))
    }

    /// True with the given chance in percent.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    /// Uniform in `[lo, hi)`.
    pub fn uniform(&mut self, lo: f64, hi: f64) -> f64 {
        let unit = (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        lo + (hi - lo) * unit
    }

    /// Uniform index into a collection of `len` items.
    pub fn index(&mut self, len: usize) -> usize {
        self.below(len as u64) as usize
    }

    /// One item of a built-in table (the tables are never empty; an empty one yields the default).
    pub fn pick<T: Copy + Default>(&mut self, items: &[T]) -> T {
        let i = self.index(items.len());
        items.get(i).copied().unwrap_or_default()
    }

    /// `k` distinct indices of `0..len` in random order (partial Fisher–Yates, O(len)).
    pub fn distinct(&mut self, len: usize, k: usize) -> Vec<usize> {
        let mut all: Vec<usize> = (0..len).collect();
        let k = k.min(len);
        for i in 0..k {
            let j = i + self.index(len - i);
            all.swap(i, j);
        }
        all.truncate(k);
        all
    }

    /// A random (version 4) UUID, lowercase 8-4-4-4-12.
    pub fn uuid(&mut self) -> String {
        let hi = (self.next_u64() & !0xF000) | 0x4000;
        let lo = (self.next_u64() & 0x3FFF_FFFF_FFFF_FFFF) | 0x8000_0000_0000_0000;
        format!(
            "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
            hi >> 32,
            (hi >> 16) & 0xFFFF,
            hi & 0xFFFF,
            lo >> 48,
            lo & 0xFFFF_FFFF_FFFF
        )
    }
}

// ---------------------------------------------------------------------------------------------
// Calendar (proleptic Gregorian, days since 1970-01-01; Howard Hinnant's algorithms)

fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = (month + 9).rem_euclid(12);
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// 0 = Sunday … 6 = Saturday (1970-01-01 was a Thursday).
fn weekday(days: i64) -> i64 {
    (days + 4).rem_euclid(7)
}

fn date_string(days: i64) -> String {
    let (y, m, d) = civil_from_days(days);
    format!("{y:04}-{m:02}-{d:02}")
}

fn age_years(birth: i64, day: i64) -> f64 {
    (day - birth) as f64 / 365.2425
}

/// A local wall-clock time in Sweden: a day and minutes after midnight.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Moment {
    day: i64,
    minute: i64,
}

impl Moment {
    fn at(day: i64, hour: i64, minute: i64) -> Self {
        Self { day, minute: 0 }.plus_minutes(hour * 60 + minute)
    }

    fn plus_minutes(self, minutes: i64) -> Self {
        let total = self.minute + minutes;
        Self {
            day: self.day + total.div_euclid(1440),
            minute: total.rem_euclid(1440),
        }
    }

    /// FHIR dateTime/instant with seconds and the Swedish offset of that day, so times read as
    /// local clinic hours rather than UTC.
    fn to_fhir(self) -> String {
        let offset = if is_summer_time(self.day) {
            "+02:00"
        } else {
            "+01:00"
        };
        format!(
            "{}T{:02}:{:02}:00{offset}",
            date_string(self.day),
            self.minute / 60,
            self.minute % 60
        )
    }
}

/// EU summer time: last Sunday of March to last Sunday of October. Whole days switch, so a night
/// visit on those two Sundays gets the other offset (still a valid instant, an hour off).
fn is_summer_time(days: i64) -> bool {
    let (year, _, _) = civil_from_days(days);
    let last_sunday = |month| {
        let d31 = days_from_civil(year, month, 31);
        d31 - weekday(d31)
    };
    days >= last_sunday(3) && days < last_sunday(10)
}

// ---------------------------------------------------------------------------------------------
// Built-in tables (kept one row per line for reading; rustfmt would put every field on its own)

#[rustfmt::skip]
const SWEDISH_FEMALE: &[&str] = &[
    "Anna", "Eva", "Maria", "Karin", "Kristina", "Lena", "Sara", "Emma", "Elin", "Ida", "Maja",
    "Alice", "Ella", "Wilma", "Astrid", "Ingrid", "Linnea", "Sofia", "Johanna", "Malin", "Elsa",
    "Frida", "Hanna", "Birgitta", "Margareta", "Ulla", "Signe", "Saga", "Ebba", "Klara",
];
#[rustfmt::skip]
const SWEDISH_MALE: &[&str] = &[
    "Erik", "Lars", "Karl", "Anders", "Johan", "Per", "Nils", "Mikael", "Oskar", "Lucas",
    "William", "Hugo", "Liam", "Axel", "Gustav", "Olof", "Sven", "Björn", "Magnus", "Fredrik",
    "Leo", "Elias", "Viktor", "Henrik", "Stefan", "Bengt", "Gunnar", "Arvid", "Ludvig", "Emil",
];
#[rustfmt::skip]
const INTERNATIONAL_FEMALE: &[&str] = &[
    "Fatima", "Amira", "Leila", "Yasmin", "Elena", "Aisha", "Mei", "Priya", "Ana", "Olga", "Noor",
    "Zainab", "Hiba", "Mariam", "Irina", "Lucía", "Chiara", "Amina", "Sana", "Julia",
];
#[rustfmt::skip]
const INTERNATIONAL_MALE: &[&str] = &[
    "Ali", "Mohammed", "Omar", "Ahmed", "Yusuf", "Daniel", "David", "Ivan", "Arjun", "Wei",
    "Carlos", "Hassan", "Mustafa", "Ibrahim", "Mateo", "Luca", "Dmitri", "Tariq", "Kofi", "Adam",
];
#[rustfmt::skip]
const SWEDISH_FAMILY: &[&str] = &[
    "Andersson", "Johansson", "Karlsson", "Nilsson", "Eriksson", "Larsson", "Olsson", "Persson",
    "Svensson", "Gustafsson", "Pettersson", "Jonsson", "Jansson", "Hansson", "Bengtsson",
    "Lindberg", "Lindqvist", "Lindström", "Berg", "Bergström", "Lundgren", "Sjöberg", "Holm",
    "Ekström", "Sandberg", "Forsberg", "Nyström", "Åberg", "Wallin", "Engström", "Dahl",
    "Hedlund", "Sundberg", "Falk", "Björk", "Lind",
];
#[rustfmt::skip]
const INTERNATIONAL_FAMILY: &[&str] = &[
    "Ali", "Mohammed", "Hassan", "Yilmaz", "Nguyen", "Kowalski", "Novak", "Müller", "García",
    "Rossi", "Petrović", "Ahmadi", "Hosseini", "Silva", "Kaya", "Chen", "Ibrahim", "Haddad",
    "Popescu", "Jovanović", "Said", "Abdi", "Kim", "Santos",
];
#[rustfmt::skip]
const STREETS: &[&str] = &[
    "Storgatan", "Drottninggatan", "Kungsgatan", "Skolgatan", "Kyrkogatan", "Järnvägsgatan",
    "Parkvägen", "Björkvägen", "Ekvägen", "Tallvägen", "Sjövägen", "Ängsvägen", "Villagatan",
    "Nygatan", "Lärkvägen", "Rosenvägen", "Lindvägen", "Solvägen", "Bäckvägen", "Granvägen",
    "Hantverkargatan", "Trädgårdsgatan", "Fabriksgatan", "Smedjegatan",
];

#[derive(Clone, Copy, Default)]
struct City {
    name: &'static str,
    /// Range of the first three postal-code digits used in the city.
    postal_lo: i64,
    postal_hi: i64,
}

#[rustfmt::skip]
const CITIES: &[City] = &[
    City { name: "Uppsala",   postal_lo: 752, postal_hi: 757 },
    City { name: "Stockholm", postal_lo: 113, postal_hi: 118 },
    City { name: "Umeå",      postal_lo: 903, postal_hi: 907 },
    City { name: "Göteborg",  postal_lo: 411, postal_hi: 418 },
    City { name: "Malmö",     postal_lo: 211, postal_hi: 217 },
    City { name: "Linköping", postal_lo: 582, postal_hi: 589 },
    City { name: "Västerås",  postal_lo: 722, postal_hi: 725 },
    City { name: "Luleå",     postal_lo: 972, postal_hi: 977 },
];

/// The care units are a fixed cast (one per city above), so identifiers repeat across patients
/// and demo users can be placed in a unit that actually has patients.
#[derive(Clone, Copy, Default)]
struct CareUnit {
    id: &'static str,
    name: &'static str,
    city: usize,
    street: &'static str,
}

#[rustfmt::skip]
const CARE_UNITS: &[CareUnit] = &[
    CareUnit { id: "SYN-UNIT-01", name: "Vårdcentralen Ekbacken",      city: 0, street: "Ekbacksvägen 4" },
    CareUnit { id: "SYN-UNIT-02", name: "Vårdcentralen Solgläntan",    city: 1, street: "Solgläntan 12" },
    CareUnit { id: "SYN-UNIT-03", name: "Hälsocentralen Norrsken",     city: 2, street: "Norrskensvägen 9" },
    CareUnit { id: "SYN-UNIT-04", name: "Vårdcentralen Lindhöjden",    city: 3, street: "Lindhöjdsgatan 3" },
    CareUnit { id: "SYN-UNIT-05", name: "Vårdcentralen Kastanjen",     city: 4, street: "Kastanjegatan 21" },
    CareUnit { id: "SYN-UNIT-06", name: "Medicinmottagningen, Valvsjö sjukhus", city: 5, street: "Sjukhusvägen 1" },
    CareUnit { id: "SYN-UNIT-07", name: "Vårdcentralen Tallbacken",    city: 6, street: "Tallbacksgatan 7" },
    CareUnit { id: "SYN-UNIT-08", name: "Hälsocentralen Fjällbjörken", city: 7, street: "Björkstigen 15" },
];

/// Physicians per care unit; each is derived from (unit, slot) alone, so the same person shows up
/// whatever the caller's seed.
const PRACTITIONERS_PER_UNIT: u64 = 6;

const QUALIFICATIONS: &[&str] = &[
    "Specialist i allmänmedicin",
    "Legitimerad läkare",
    "Specialist i internmedicin",
];

#[derive(Clone, Copy, Default)]
struct Code {
    code: &'static str,
    display: &'static str,
}

const fn code(code: &'static str, display: &'static str) -> Code {
    Code { code, display }
}

#[derive(Clone, Copy, Default, PartialEq, Eq)]
enum EncounterClass {
    #[default]
    Ambulatory,
    Virtual,
    Emergency,
    Inpatient,
}

impl EncounterClass {
    fn coding(self) -> Value {
        let value = match self {
            Self::Ambulatory => code("AMB", "ambulatory"),
            Self::Virtual => code("VR", "virtual"),
            Self::Emergency => code("EMER", "emergency"),
            Self::Inpatient => code("IMP", "inpatient encounter"),
        };
        coding(ACT_CODE, value)
    }
}

#[derive(Clone, Copy, Default)]
struct EncounterType {
    code: Code,
    /// How the clinical note names the visit.
    swedish: &'static str,
    class: EncounterClass,
    /// Relative frequency.
    weight: u64,
}

#[rustfmt::skip]
const ENCOUNTER_TYPES: &[EncounterType] = {
    use EncounterClass::{Ambulatory, Emergency, Inpatient, Virtual};
    const fn t(c: Code, swedish: &'static str, class: EncounterClass, weight: u64) -> EncounterType {
        EncounterType { code: c, swedish, class, weight }
    }
    &[
        t(code("185349003", "Encounter for check up (procedure)"), "Hälsokontroll", Ambulatory, 25),
        t(code("390906007", "Follow-up encounter (procedure)"), "Återbesök", Ambulatory, 20),
        t(code("185345009", "Encounter for symptom (procedure)"), "Besök för symtom", Ambulatory, 20),
        t(code("185347001", "Encounter for problem (procedure)"), "Mottagningsbesök", Ambulatory, 10),
        t(code("448337001", "Telemedicine consultation with patient (procedure)"), "Videobesök", Virtual, 10),
        t(code("50849002", "Emergency room admission (procedure)"), "Akutbesök", Emergency, 10),
        t(code("183452005", "Emergency hospital admission (procedure)"), "Slutenvård", Inpatient, 5),
    ]
};

#[derive(Clone, Copy, Default, PartialEq, Eq)]
enum ObsKind {
    #[default]
    HeartRate,
    Systolic,
    Diastolic,
    Weight,
    Height,
    Glucose,
}

const OBS_KINDS: [ObsKind; 6] = [
    ObsKind::HeartRate,
    ObsKind::Systolic,
    ObsKind::Diastolic,
    ObsKind::Weight,
    ObsKind::Height,
    ObsKind::Glucose,
];

impl ObsKind {
    fn loinc(self) -> Code {
        match self {
            Self::HeartRate => code("8867-4", "Heart rate"),
            Self::Systolic => code("8480-6", "Systolic blood pressure"),
            Self::Diastolic => code("8462-4", "Diastolic blood pressure"),
            Self::Weight => code("29463-7", "Body weight"),
            Self::Height => code("8302-2", "Body height"),
            Self::Glucose => code("2339-0", "Glucose [Mass/volume] in Blood"),
        }
    }

    /// (human unit, UCUM code, decimals shown).
    fn unit(self) -> (&'static str, &'static str, u32) {
        match self {
            Self::HeartRate => ("beats/minute", "/min", 0),
            Self::Systolic | Self::Diastolic => ("mmHg", "mm[Hg]", 0),
            Self::Weight => ("kg", "kg", 1),
            Self::Height => ("cm", "cm", 1),
            Self::Glucose => ("mg/dL", "mg/dL", 0),
        }
    }

    fn is_lab(self) -> bool {
        self == Self::Glucose
    }

    /// Remarks a nurse might type next to this kind of measurement.
    fn remarks(self) -> &'static [&'static str] {
        match self {
            Self::HeartRate => &[
                "Oregelbunden rytm, EKG bokas.",
                "Mätt efter fem minuters vila.",
            ],
            Self::Systolic | Self::Diastolic => &[
                "Mätt sittande efter fem minuters vila, höger arm.",
                "Patienten nervös vid mätningen, kontrolleras igen vid nästa besök.",
                "Manuell mätning.",
            ],
            Self::Weight => &[
                "Vägd i lätt klädsel.",
                "Patienten uppger viktnedgång senaste månaden.",
            ],
            Self::Height => &["Mätt utan skor."],
            Self::Glucose => &["Icke fastande prov.", "Fastande sedan kvällen före."],
        }
    }
}

/// A medicine with the dosage text a Swedish prescriber would write.
#[derive(Clone, Copy, Default)]
struct Medicine {
    code: Code,
    dosage: &'static str,
    as_needed: bool,
    /// Not prescribed to a patient allergic to this SNOMED substance.
    allergen: Option<&'static str>,
}

const fn medicine(c: Code, dosage: &'static str, as_needed: bool) -> Medicine {
    Medicine {
        code: c,
        dosage,
        as_needed,
        allergen: None,
    }
}

#[rustfmt::skip]
mod medicines {
    use super::{code, medicine, Medicine};
    pub const METFORMIN: Medicine = medicine(code("860975", "24 HR Metformin hydrochloride 500 MG Extended Release Oral Tablet"), "1 tablett 2 gånger dagligen i samband med måltid", false);
    pub const LISINOPRIL: Medicine = medicine(code("314076", "lisinopril 10 MG Oral Tablet"), "1 tablett 1 gång dagligen", false);
    pub const AMLODIPINE: Medicine = medicine(code("197361", "amlodipine 5 MG Oral Tablet"), "1 tablett 1 gång dagligen", false);
    pub const HYDROCHLOROTHIAZIDE: Medicine = medicine(code("310798", "Hydrochlorothiazide 25 MG Oral Tablet"), "1 tablett på morgonen", false);
    pub const ALBUTEROL: Medicine = medicine(code("745679", "200 ACTUAT Albuterol 0.09 MG/ACTUAT Metered Dose Inhaler"), "1–2 inhalationer vid behov", true);
    pub const FLUTICASONE: Medicine = medicine(code("895994", "120 ACTUAT Fluticasone propionate 0.044 MG/ACTUAT Metered Dose Inhaler"), "2 inhalationer morgon och kväll", false);
    pub const ATORVASTATIN: Medicine = medicine(code("259255", "atorvastatin 80 MG Oral Tablet"), "1 tablett till kvällen", false);
    pub const WARFARIN: Medicine = medicine(code("855332", "Warfarin Sodium 5 MG Oral Tablet"), "Dosering enligt ordinationsschema efter PK-INR", false);
    pub const PENICILLIN_V: Medicine = Medicine { allergen: Some("373270004"), ..medicine(code("834061", "Penicillin V Potassium 250 MG Oral Tablet"), "4 tabletter 3 gånger dagligen i 10 dagar", false) };
    pub const ACETAMINOPHEN: Medicine = medicine(code("313782", "Acetaminophen 325 MG Oral Tablet"), "2 tabletter vid behov, högst 4 gånger per dygn", true);
    pub const IBUPROFEN: Medicine = Medicine { allergen: Some("387207008"), ..medicine(code("310965", "Ibuprofen 200 MG Oral Tablet"), "1–2 tabletter vid behov, högst 3 gånger per dygn", true) };
    pub const CETIRIZINE: Medicine = medicine(code("1014676", "cetirizine hydrochloride 5 MG Oral Tablet"), "1 tablett dagligen vid besvär", true);
}
use medicines::*;

/// Prescribed without a diagnosis in the record (pain, allergy season).
const GENERAL_MEDICINES: &[Medicine] = &[ACETAMINOPHEN, IBUPROFEN, CETIRIZINE];

#[derive(Clone, Copy, Default)]
struct Problem {
    code: Code,
    swedish: &'static str,
    chronic: bool,
    min_age: f64,
    medicines: &'static [Medicine],
}

#[rustfmt::skip]
const PROBLEMS: &[Problem] = {
    const CHRONIC: bool = true;
    const ACUTE: bool = false;
    const fn p(c: Code, swedish: &'static str, chronic: bool, min_age: f64, medicines: &'static [Medicine]) -> Problem {
        Problem { code: c, swedish, chronic, min_age, medicines }
    }
    &[
        p(code(DIABETES, "Diabetes mellitus type 2 (disorder)"), "Typ 2-diabetes", CHRONIC, 30.0, &[METFORMIN]),
        p(code(HYPERTENSION, "Hypertensive disorder, systemic arterial (disorder)"), "Hypertoni", CHRONIC, 30.0, &[LISINOPRIL, AMLODIPINE, HYDROCHLOROTHIAZIDE]),
        p(code("195662009", "Acute viral pharyngitis (disorder)"), "Akut viral faryngit", ACUTE, 1.0, &[ACETAMINOPHEN]),
        p(code("43878008", "Streptococcal sore throat (disorder)"), "Streptokocktonsillit", ACUTE, 2.0, &[PENICILLIN_V]),
        p(code("444814009", "Viral sinusitis (disorder)"), "Viral sinuit", ACUTE, 2.0, &[ACETAMINOPHEN]),
        p(code("10509002", "Acute bronchitis (disorder)"), "Akut bronkit", ACUTE, 0.0, &[]),
        p(code("195967001", "Asthma (disorder)"), "Astma", CHRONIC, 3.0, &[ALBUTEROL, FLUTICASONE]),
        p(code("61582004", "Allergic rhinitis (disorder)"), "Allergisk rinit", CHRONIC, 3.0, &[CETIRIZINE]),
        p(code("55822004", "Hyperlipidemia (disorder)"), "Hyperlipidemi", CHRONIC, 35.0, &[ATORVASTATIN]),
        p(code("49436004", "Atrial fibrillation (disorder)"), "Förmaksflimmer", CHRONIC, 50.0, &[WARFARIN]),
        p(code("239873007", "Osteoarthritis of knee (disorder)"), "Knäledsartros", CHRONIC, 45.0, &[ACETAMINOPHEN, IBUPROFEN]),
        p(code("68566005", "Urinary tract infectious disease (disorder)"), "Urinvägsinfektion", ACUTE, 5.0, &[]),
        p(code("35489007", "Depressive disorder (disorder)"), "Depression", CHRONIC, 16.0, &[]),
        p(code("37796009", "Migraine (disorder)"), "Migrän", CHRONIC, 10.0, &[IBUPROFEN]),
        p(code("279039007", "Low back pain (finding)"), "Ländryggssmärta", ACUTE, 16.0, &[IBUPROFEN]),
        p(code("40930008", "Hypothyroidism (disorder)"), "Hypotyreos", CHRONIC, 20.0, &[]),
        p(code("13645005", "Chronic obstructive lung disease (disorder)"), "KOL", CHRONIC, 45.0, &[ALBUTEROL]),
    ]
};

// Clinical and verification statuses (the same codes in Condition's and AllergyIntolerance's systems).
const ACTIVE: Code = code("active", "Active");
const RESOLVED: Code = code("resolved", "Resolved");
const CONFIRMED: Code = code("confirmed", "Confirmed");
const ENCOUNTER_DIAGNOSIS: Code = code("encounter-diagnosis", "Encounter Diagnosis");
const NATIONAL_ID: Code = code("NI", "National unique individual identifier");

/// SNOMED codes the vital-sign values depend on.
const DIABETES: &str = "44054006";
const HYPERTENSION: &str = "38341003";

#[derive(Clone, Copy, Default)]
struct ProcedureKind {
    code: Code,
    min_age: f64,
}

#[rustfmt::skip]
const PROCEDURES: &[ProcedureKind] = &[
    ProcedureKind { code: code("430193006", "Medication Reconciliation (procedure)"), min_age: 0.0 },
    ProcedureKind { code: code("171207006", "Depression screening (procedure)"), min_age: 12.0 },
    ProcedureKind { code: code("29303009", "Electrocardiographic procedure (procedure)"), min_age: 18.0 },
    ProcedureKind { code: code("399208008", "Plain chest X-ray (procedure)"), min_age: 0.0 },
    ProcedureKind { code: code("73761001", "Colonoscopy (procedure)"), min_age: 50.0 },
    ProcedureKind { code: code("162676008", "Brief general examination (procedure)"), min_age: 0.0 },
    ProcedureKind { code: code("117015009", "Throat culture (procedure)"), min_age: 2.0 },
];

const HIVES: Code = code("247472004", "Wheal (finding)");
const SKIN_ERUPTION: Code = code("271807003", "Eruption of skin (disorder)");
const ANAPHYLAXIS: Code = code("39579001", "Anaphylaxis (disorder)");
const COUGH: Code = code("49727002", "Cough (finding)");
const SNEEZING: Code = code("76067001", "Sneezing (finding)");
const ITCHING: Code = code("418290006", "Itching (finding)");
const DYSPNEA: Code = code("267036007", "Dyspnea (finding)");
const ABDOMINAL_PAIN: Code = code("21522001", "Abdominal pain (finding)");
const NAUSEA: Code = code("422587007", "Nausea (finding)");

#[derive(Clone, Copy, Default)]
struct Allergen {
    code: Code,
    category: &'static str,
    reactions: &'static [Code],
}

#[rustfmt::skip]
const ALLERGENS: &[Allergen] = &[
    Allergen { code: code("762952008", "Peanut (substance)"), category: "food", reactions: &[HIVES, ANAPHYLAXIS, ITCHING] },
    Allergen { code: code("256277009", "Grass pollen (substance)"), category: "environment", reactions: &[SNEEZING, COUGH, ITCHING] },
    Allergen { code: code("260147004", "House dust mite (organism)"), category: "environment", reactions: &[SNEEZING, COUGH, DYSPNEA] },
    Allergen { code: code("264287008", "Animal dander (substance)"), category: "environment", reactions: &[SNEEZING, HIVES, DYSPNEA] },
    Allergen { code: code("3718001", "Cow's milk (substance)"), category: "food", reactions: &[ABDOMINAL_PAIN, SKIN_ERUPTION, NAUSEA] },
    Allergen { code: code("102263004", "Eggs (edible) (substance)"), category: "food", reactions: &[HIVES, ABDOMINAL_PAIN, NAUSEA] },
    Allergen { code: code("111088007", "Latex (substance)"), category: "environment", reactions: &[HIVES, ITCHING, ANAPHYLAXIS] },
    Allergen { code: code("288328004", "Bee venom (substance)"), category: "environment", reactions: &[HIVES, ANAPHYLAXIS] },
    Allergen { code: code("373270004", "Penicillin -class of antibiotic- (substance)"), category: "medication", reactions: &[SKIN_ERUPTION, HIVES, ANAPHYLAXIS] },
    Allergen { code: code("387207008", "Ibuprofen (substance)"), category: "medication", reactions: &[SKIN_ERUPTION, DYSPNEA, ABDOMINAL_PAIN] },
];

#[derive(Clone, Copy, Default)]
struct Vaccine {
    code: Code,
    min_age_days: i64,
    max_age_days: i64,
    /// First year the vaccine was in use.
    since_year: i64,
}

const YEAR: i64 = 365;
const NO_LIMIT: i64 = 200 * YEAR;

#[rustfmt::skip]
const VACCINES: &[Vaccine] = {
    const fn v(c: Code, min_age_days: i64, max_age_days: i64, since_year: i64) -> Vaccine {
        Vaccine { code: c, min_age_days, max_age_days, since_year }
    }
    &[
        v(code("08", "Hep B, adolescent or pediatric"), 0, 18 * YEAR, 1990),
        v(code("20", "DTaP"), 60, 7 * YEAR, 1996),
        v(code("10", "IPV"), 60, 7 * YEAR, 1990),
        v(code("03", "MMR"), 18 * 30, 12 * YEAR, 1982),
        v(code("62", "HPV, quadrivalent"), 10 * YEAR, 26 * YEAR, 2012),
        v(code("140", "Influenza, seasonal, injectable, preservative free"), 183, NO_LIMIT, 2005),
        v(code("208", "COVID-19, mRNA, LNP-S, PF, 30 mcg/0.3 mL dose"), 12 * YEAR, NO_LIMIT, 2021),
        v(code("113", "Td (adult) preservative free"), 18 * YEAR, NO_LIMIT, 1990),
        v(code("133", "Pneumococcal conjugate PCV 13"), 65 * YEAR, NO_LIMIT, 2010),
        v(code("187", "zoster vaccine recombinant"), 50 * YEAR, NO_LIMIT, 2018),
    ]
};

const NOTE_COMPLAINTS: &[&str] = &[
    "Söker för trötthet sedan några veckor.",
    "Kommer på planerad kontroll, mår i stort sett bra.",
    "Söker för hosta och halsont sedan fyra dagar.",
    "Besväras av huvudvärk, värre på eftermiddagarna.",
    "Uppföljning av tidigare insatt behandling.",
    "Ont i ländryggen efter lyft, ingen utstrålning.",
];
const NOTE_FINDINGS: &[&str] = &[
    "Allmäntillstånd gott. Cor: regelbunden rytm, inga blåsljud. Pulm: normala andningsljud.",
    "Opåverkad. Svalg lätt rodnat, inga beläggningar. Inga förstorade lymfkörtlar.",
    "Allmäntillstånd gott. Buk mjuk och oöm. Neurologiskt utan anmärkning.",
];
const NOTE_PLANS: &[&str] = &[
    "Fortsatt behandling enligt ordination. Återbesök om tre månader.",
    "Egenvårdsråd givna. Hör av sig vid försämring.",
    "Provtagning inför nästa besök. Telefonkontakt när svaren kommit.",
];

// ---------------------------------------------------------------------------------------------
// Bundle assembly

/// Collects transaction entries; each resource gets a fresh `urn:uuid:` fullUrl that other
/// entries use as their reference (the server resolves them on commit).
struct Entries {
    entries: Vec<Value>,
}

impl Entries {
    fn add(&mut self, rng: &mut SynthRng, mut resource: Value) -> String {
        let full_url = format!("urn:uuid:{}", rng.uuid());
        let resource_type = resource
            .get("resourceType")
            .and_then(Value::as_str)
            .unwrap_or("Basic")
            .to_string();
        set(
            &mut resource,
            "meta",
            json!({ "security": [coding(ACT_REASON, code("HTEST", "test health data"))] }),
        );
        // Moved into place rather than interpolated: json! would deep-copy the resource.
        let mut entry = Map::new();
        entry.insert("fullUrl".to_string(), Value::String(full_url.clone()));
        entry.insert("resource".to_string(), resource);
        entry.insert(
            "request".to_string(),
            json!({"method": "POST", "url": resource_type}),
        );
        self.entries.push(Value::Object(entry));
        full_url
    }
}

fn set(target: &mut Value, key: &str, value: Value) {
    if let Some(map) = target.as_object_mut() {
        map.insert(key.to_string(), value);
    }
}

fn reference(full_url: &str) -> Value {
    json!({ "reference": full_url })
}

/// A Coding.
fn coding(system: &str, code: Code) -> Value {
    json!({ "system": system, "code": code.code, "display": code.display })
}

/// A CodeableConcept for a clinical code, with the display as text for people to read.
fn concept(system: &str, code: Code) -> Value {
    json!({ "coding": [coding(system, code)], "text": code.display })
}

/// A CodeableConcept from FHIR's own terminology (statuses, categories), coding only.
fn codeable(system: &str, code: Code) -> Value {
    json!({ "coding": [coding(system, code)] })
}

fn period(start: Moment, end: Moment) -> Value {
    json!({ "start": start.to_fhir(), "end": end.to_fhir() })
}

/// The people and places every resource of the bundle points at.
struct Cast {
    patient: String,
    organization: String,
    practitioner: String,
}

struct Person {
    female: bool,
    given: Vec<&'static str>,
    family: &'static str,
    birth: i64,
    adult_height_cm: f64,
    adult_bmi: f64,
    diabetic: bool,
    hypertensive: bool,
}

struct ObservationMade {
    kind: ObsKind,
    url: String,
    value: f64,
    at: Moment,
}

struct Visit {
    url: String,
    kind: EncounterType,
    start: Moment,
    end: Moment,
    observations: Vec<ObservationMade>,
}

struct Diagnosis {
    problem: Problem,
    url: String,
    visit: usize,
}

/// One patient's transaction Bundle (serde_json::Value) with `urn:uuid:` fullUrls and references,
/// every entry `request: {method: "POST", url: "<Type>"}`.
/// `today` is (year, month, day) passed in (no clock reading inside).
pub fn patient_bundle(rng: &mut SynthRng, today: (i32, u32, u32)) -> Value {
    let today = days_from_civil(i64::from(today.0), i64::from(today.1), i64::from(today.2));
    let mut out = Entries {
        entries: Vec::with_capacity(64),
    };

    let unit_index = rng.index(CARE_UNITS.len());
    let unit = CARE_UNITS.get(unit_index).copied().unwrap_or_default();
    let slot = rng.below(PRACTITIONERS_PER_UNIT);
    let mut person = new_person(rng, today);
    let problems = choose_problems(rng, &person, today);
    person.diabetic = problems.iter().any(|p| p.code.code == DIABETES);
    person.hypertensive = problems.iter().any(|p| p.code.code == HYPERTENSION);
    let allergens = choose_allergens(rng);

    let organization = out.add(rng, organization_resource(unit, unit_index));
    let practitioner = out.add(rng, practitioner_resource(unit_index, slot));
    let patient_json = patient_resource(rng, &person, unit, &organization, &practitioner, today);
    let patient = out.add(rng, patient_json);
    let cast = Cast {
        patient,
        organization,
        practitioner,
    };

    let plan = plan_visits(rng, &person, today);
    let care_start = plan.first().map_or(today, |(start, _, _)| start.day);
    out.add(rng, care_team_resource(&cast, unit, care_start));

    let mut visits = Vec::with_capacity(plan.len());
    for (start, end, kind) in plan {
        let url = out.add(rng, encounter_resource(&cast, kind, start, end));
        let mut visit = Visit {
            url,
            kind,
            start,
            end,
            observations: Vec::new(),
        };
        add_observations(rng, &mut out, &cast, &person, &mut visit);
        visits.push(visit);
    }

    let diagnoses = add_conditions(rng, &mut out, &cast, &person, &problems, &visits, today);
    add_medication_requests(rng, &mut out, &cast, &diagnoses, &allergens, &visits);
    add_procedures(rng, &mut out, &cast, &person, &visits);
    add_allergies(rng, &mut out, &cast, &allergens, &visits);
    add_immunizations(rng, &mut out, &cast, &person, today);
    if rng.chance(50) {
        add_diagnostic_report(rng, &mut out, &cast, &visits);
    }
    if rng.chance(30) {
        add_document_reference(rng, &mut out, &cast, unit, &person, &diagnoses, &visits);
    }

    let mut bundle = json!({ "resourceType": "Bundle", "type": "transaction" });
    set(&mut bundle, "entry", Value::Array(out.entries));
    bundle
}

// ---------------------------------------------------------------------------------------------
// People and places

fn new_person(rng: &mut SynthRng, today: i64) -> Person {
    let female = rng.chance(50);
    let swedish = rng.chance(75);
    let given_pool = match (swedish, female) {
        (true, true) => SWEDISH_FEMALE,
        (true, false) => SWEDISH_MALE,
        (false, true) => INTERNATIONAL_FEMALE,
        (false, false) => INTERNATIONAL_MALE,
    };
    let given_count = if swedish && rng.chance(40) { 2 } else { 1 };
    let given = rng
        .distinct(given_pool.len(), given_count)
        .into_iter()
        .filter_map(|i| given_pool.get(i).copied())
        .collect();
    let family = rng.pick(if swedish {
        SWEDISH_FAMILY
    } else {
        INTERNATIONAL_FAMILY
    });
    let adult_height_cm = if female {
        rng.uniform(153.0, 180.0)
    } else {
        rng.uniform(165.0, 195.0)
    };
    Person {
        female,
        given,
        family,
        birth: birth_day(rng, today),
        adult_height_cm,
        adult_bmi: rng.uniform(19.0, 32.0),
        diabetic: false,
        hypertensive: false,
    }
}

/// Ages 0–94, weighted roughly like a primary-care list (more adults than children or very old).
fn birth_day(rng: &mut SynthRng, today: i64) -> i64 {
    let (lo, hi) = match rng.below(100) {
        0..=17 => (0, 17),
        18..=52 => (18, 44),
        53..=77 => (45, 64),
        _ => (65, 94),
    };
    let years = rng.range(lo, hi);
    today - years * 365 - years / 4 - rng.range(0, 364)
}

/// A personnummer-shaped test identifier, twelve digits as Inera's systems store it. The birth day
/// is written plus 60 (the samordningsnummer convention), a form no resident's personnummer ever
/// takes, so a synthetic patient can never be mistaken for, or merged with, a registered
/// resident; the check digit is valid so validators accept it. Real samordningsnummer do exist
/// (for non-residents), so this is a test range by convention, not a guarantee: a caller that
/// needs one should use Skatteverket's published test personnummer instead.
fn personnummer(rng: &mut SynthRng, birth: i64, female: bool) -> String {
    let (year, month, day) = civil_from_days(birth);
    // The last digit of the birth number is even for women, odd for men.
    let sex_digit = rng.range(0, 4) * 2 + i64::from(!female);
    let birth_number = rng.range(1, 99) * 10 + sex_digit;
    let ten = format!(
        "{:02}{month:02}{:02}{birth_number:03}",
        year.rem_euclid(100),
        day + 60
    );
    format!(
        "{year:04}{month:02}{:02}{birth_number:03}{}",
        day + 60,
        luhn_check_digit(&ten)
    )
}

/// Luhn (modulus 10, weights 2,1,2,…) over the digits, as Skatteverket defines the check digit.
fn luhn_check_digit(digits: &str) -> u32 {
    let sum: u32 = digits
        .chars()
        .filter_map(|c| c.to_digit(10))
        .enumerate()
        .map(|(i, d)| {
            let p = if i % 2 == 0 { d * 2 } else { d };
            p / 10 + p % 10
        })
        .sum();
    (10 - sum % 10) % 10
}

/// Lowercase ASCII for e-mail local parts ("Åberg" -> "aberg").
fn ascii_fold(name: &str) -> String {
    name.chars()
        .flat_map(char::to_lowercase)
        .filter_map(|c| match c {
            'a'..='z' => Some(c),
            'å' | 'ä' | 'á' | 'à' => Some('a'),
            'ö' | 'ó' | 'ø' => Some('o'),
            'é' | 'è' => Some('e'),
            'ü' | 'ú' => Some('u'),
            'í' => Some('i'),
            'ć' | 'č' => Some('c'),
            _ => None,
        })
        .collect()
}

/// Numbers from the mobile series PTS reserves for fiction (070-174 06 05 … 070-174 06 99).
fn fiction_mobile(rng: &mut SynthRng) -> String {
    format!("+46 70 174 06 {:02}", rng.range(5, 99))
}

/// Numbers from the Stockholm series PTS reserves for fiction (08-465 004 00 … 08-465 004 99).
fn fiction_landline(last_two: u64) -> String {
    format!("+46 8 465 004 {:02}", last_two % 100)
}

fn postal_code(rng: &mut SynthRng, city: City) -> String {
    format!(
        "{:03} {:02}",
        rng.range(city.postal_lo, city.postal_hi),
        rng.range(0, 99)
    )
}

fn patient_resource(
    rng: &mut SynthRng,
    person: &Person,
    unit: CareUnit,
    organization: &str,
    practitioner: &str,
    today: i64,
) -> Value {
    let city = CITIES.get(unit.city).copied().unwrap_or_default();
    let mrn = format!("SYN{:014}", rng.below(100_000_000_000_000));
    let pnr = personnummer(rng, person.birth, person.female);
    let mut line = format!("{} {}", rng.pick(STREETS), rng.range(1, 120));
    if rng.chance(40) {
        line.push_str(&format!(
            " lgh {}",
            rng.range(10, 16) * 100 + rng.range(1, 4)
        ));
    }
    let postal = postal_code(rng, city);
    let given_text = person.given.join(" ");
    let mut telecom =
        vec![json!({"system": "phone", "value": fiction_mobile(rng), "use": "mobile", "rank": 1})];
    let age_now = age_years(person.birth, today);
    if age_now >= 16.0 && rng.chance(60) {
        let first = person.given.first().copied().unwrap_or("patient");
        let email = format!(
            "{}.{}{}@example.com",
            ascii_fold(first),
            ascii_fold(person.family),
            rng.range(1, 99)
        );
        telecom.push(json!({"system": "email", "value": email, "use": "home"}));
    }
    let mut patient = json!({
        "resourceType": "Patient",
        "identifier": [
            {
                "use": "usual",
                "type": codeable(IDENTIFIER_TYPE, code("MR", "Medical record number")),
                "system": MRN_SYSTEM,
                "value": mrn,
            },
            {
                "use": "official",
                "type": codeable(IDENTIFIER_TYPE, NATIONAL_ID),
                "system": PERSONNUMMER_SYSTEM,
                "value": pnr,
            }
        ],
        "active": true,
        "name": [{
            "use": "official",
            "text": format!("{given_text} {}", person.family),
            "family": person.family,
            "given": person.given,
        }],
        "telecom": telecom,
        "gender": if person.female { "female" } else { "male" },
        "birthDate": date_string(person.birth),
        "address": [{
            "use": "home",
            "type": "physical",
            "line": [line],
            "city": city.name,
            "postalCode": postal,
            "country": "SE",
        }],
        "generalPractitioner": [reference(practitioner)],
        "managingOrganization": reference(organization),
    });
    if age_now >= 18.0 {
        let status = rng.pick(&[
            code("M", "Married"),
            code("S", "Never Married"),
            code("D", "Divorced"),
            code("W", "Widowed"),
        ]);
        set(
            &mut patient,
            "maritalStatus",
            codeable(MARITAL_STATUS, status),
        );
    }
    patient
}

fn organization_resource(unit: CareUnit, unit_index: usize) -> Value {
    let city = CITIES.get(unit.city).copied().unwrap_or_default();
    json!({
        "resourceType": "Organization",
        "identifier": [{"use": "official", "system": CARE_UNIT_SYSTEM, "value": unit.id}],
        "active": true,
        "type": [codeable(ORGANIZATION_TYPE, code("prov", "Healthcare Provider"))],
        "name": unit.name,
        "telecom": [{
            "system": "phone",
            "value": fiction_landline(unit_index as u64 * 10),
            "use": "work",
        }],
        "address": [{
            "use": "work",
            "line": [unit.street],
            "city": city.name,
            "postalCode": format!("{:03} 10", city.postal_lo),
            "country": "SE",
        }],
    })
}

/// The physician in `slot` of a unit, derived from a private seed so staff stay the same whatever
/// seed the caller uses.
fn practitioner_resource(unit_index: usize, slot: u64) -> Value {
    let mut rng = SynthRng::new(0x5EED_CA57_0000_0000 ^ ((unit_index as u64) << 8) ^ slot);
    let female = rng.chance(55);
    let swedish = rng.chance(70);
    let given_pool = match (swedish, female) {
        (true, true) => SWEDISH_FEMALE,
        (true, false) => SWEDISH_MALE,
        (false, true) => INTERNATIONAL_FEMALE,
        (false, false) => INTERNATIONAL_MALE,
    };
    let given = rng.pick(given_pool);
    let family = rng.pick(if swedish {
        SWEDISH_FAMILY
    } else {
        INTERNATIONAL_FAMILY
    });
    json!({
        "resourceType": "Practitioner",
        "identifier": [{
            "use": "official",
            "system": PRACTITIONER_SYSTEM,
            "value": format!("SYN-PR-{:02}{:02}", unit_index + 1, slot + 1),
        }],
        "active": true,
        "name": [{
            "use": "official",
            "text": format!("{given} {family}"),
            "family": family,
            "given": [given],
            "prefix": ["Dr."],
        }],
        "telecom": [{
            "system": "phone",
            "value": fiction_landline(unit_index as u64 * 10 + slot + 1),
            "use": "work",
        }],
        "gender": if female { "female" } else { "male" },
        "qualification": [{"code": {"text": rng.pick(QUALIFICATIONS)}}],
    })
}

fn care_team_resource(cast: &Cast, unit: CareUnit, start_day: i64) -> Value {
    json!({
        "resourceType": "CareTeam",
        "status": "active",
        "name": format!("Fast vårdkontakt, {}", unit.name),
        "subject": reference(&cast.patient),
        "period": {"start": date_string(start_day)},
        "participant": [{
            "role": [concept(SNOMED, code("309343006", "Physician (occupation)"))],
            "member": reference(&cast.practitioner),
            "onBehalfOf": reference(&cast.organization),
        }],
        "managingOrganization": [reference(&cast.organization)],
    })
}

// ---------------------------------------------------------------------------------------------
// Encounters and observations

fn pick_encounter_type(rng: &mut SynthRng) -> EncounterType {
    let total: u64 = ENCOUNTER_TYPES.iter().map(|t| t.weight).sum();
    let mut roll = rng.below(total);
    for t in ENCOUNTER_TYPES {
        if roll < t.weight {
            return *t;
        }
        roll -= t.weight;
    }
    EncounterType::default()
}

/// 2–6 visits within the record horizon (never before birth, never after today), in time order;
/// planned visits fall on weekdays in office hours, emergencies at any time.
fn plan_visits(
    rng: &mut SynthRng,
    person: &Person,
    today: i64,
) -> Vec<(Moment, Moment, EncounterType)> {
    let first_day = person.birth.max(today - RECORD_HORIZON_DAYS);
    let count = rng.count(2, 6);
    let mut visits = Vec::with_capacity(count);
    for _ in 0..count {
        let kind = pick_encounter_type(rng);
        let mut day = rng.range(first_day, today);
        let planned = matches!(
            kind.class,
            EncounterClass::Ambulatory | EncounterClass::Virtual
        );
        if planned {
            let back = match weekday(day) {
                6 => 1,
                0 => 2,
                _ => 0,
            };
            if day - back >= first_day {
                day -= back;
            }
        }
        let (start, end) = visit_times(rng, kind.class, day, today);
        visits.push((start, end, kind));
    }
    visits.sort_by_key(|(start, _, _)| *start);
    visits
}

fn visit_times(
    rng: &mut SynthRng,
    class: EncounterClass,
    day: i64,
    today: i64,
) -> (Moment, Moment) {
    match class {
        EncounterClass::Ambulatory | EncounterClass::Virtual => {
            let start = Moment::at(day, rng.range(8, 15), rng.range(0, 3) * 15);
            (start, start.plus_minutes(rng.pick(&[15, 20, 30, 45, 60])))
        }
        EncounterClass::Emergency => {
            // Starts before 16:00 and lasts at most six hours, so it ends on the same day.
            let start = Moment::at(day, rng.range(0, 15), rng.range(0, 11) * 5);
            (start, start.plus_minutes(rng.range(60, 360)))
        }
        EncounterClass::Inpatient => {
            let start = Moment::at(day, rng.range(6, 20), rng.range(0, 11) * 5);
            let discharge_day = (day + rng.range(1, 6)).min(today);
            let end = if discharge_day > day {
                Moment::at(discharge_day, rng.range(10, 13), rng.range(0, 3) * 15)
            } else {
                start.plus_minutes(120)
            };
            (start, end)
        }
    }
}

fn encounter_resource(cast: &Cast, kind: EncounterType, start: Moment, end: Moment) -> Value {
    json!({
        "resourceType": "Encounter",
        "status": "finished",
        "class": kind.class.coding(),
        "type": [concept(SNOMED, kind.code)],
        "subject": reference(&cast.patient),
        "participant": [{
            "type": [codeable(PARTICIPATION_TYPE, code("PPRF", "primary performer"))],
            "period": period(start, end),
            "individual": reference(&cast.practitioner),
        }],
        "period": period(start, end),
        "serviceProvider": reference(&cast.organization),
    })
}

/// 2–6 distinct measurements; blood pressure comes as a pair, as it is taken.
fn choose_observation_kinds(rng: &mut SynthRng) -> Vec<ObsKind> {
    let count = rng.count(2, 6);
    let mut kinds: Vec<ObsKind> = rng
        .distinct(OBS_KINDS.len(), count)
        .into_iter()
        .filter_map(|i| OBS_KINDS.get(i).copied())
        .collect();
    let has = |kinds: &[ObsKind], k| kinds.contains(&k);
    let missing = match (
        has(&kinds, ObsKind::Systolic),
        has(&kinds, ObsKind::Diastolic),
    ) {
        (true, false) => Some(ObsKind::Diastolic),
        (false, true) => Some(ObsKind::Systolic),
        _ => None,
    };
    if let Some(partner) = missing {
        if let Some(slot) = kinds
            .iter()
            .position(|k| !matches!(k, ObsKind::Systolic | ObsKind::Diastolic))
        {
            if let Some(kind) = kinds.get_mut(slot) {
                *kind = partner;
            }
        }
    }
    kinds
}

/// A plausible value for the person's age and conditions.
fn measure(rng: &mut SynthRng, kind: ObsKind, person: &Person, age: f64) -> f64 {
    let child = age < 12.0;
    match kind {
        ObsKind::HeartRate if age < 1.0 => rng.uniform(110.0, 160.0),
        ObsKind::HeartRate if child => rng.uniform(75.0, 120.0),
        ObsKind::HeartRate => rng.uniform(55.0, 95.0),
        ObsKind::Systolic if child => rng.uniform(90.0, 115.0),
        ObsKind::Systolic if person.hypertensive => rng.uniform(135.0, 172.0),
        ObsKind::Systolic => rng.uniform(104.0, 138.0),
        ObsKind::Diastolic if child => rng.uniform(55.0, 75.0),
        ObsKind::Diastolic if person.hypertensive => rng.uniform(84.0, 104.0),
        ObsKind::Diastolic => rng.uniform(62.0, 86.0),
        ObsKind::Height => height_cm(person, age) + rng.uniform(-0.8, 0.8),
        ObsKind::Weight => {
            let h = height_cm(person, age) / 100.0;
            let bmi = if age < 18.0 {
                15.5 + (person.adult_bmi - 22.0) * 0.2
            } else {
                person.adult_bmi
            };
            let extra = if person.diabetic { 3.0 } else { 0.0 };
            (bmi + extra) * h * h * rng.uniform(0.97, 1.03)
        }
        ObsKind::Glucose if person.diabetic => rng.uniform(115.0, 240.0),
        ObsKind::Glucose => rng.uniform(72.0, 106.0),
    }
}

/// A crude growth curve: 50 cm at birth, 75 cm at one year, linear to adult height at 18.
fn height_cm(person: &Person, age: f64) -> f64 {
    if age < 1.0 {
        50.0 + 25.0 * age.max(0.0)
    } else if age < 18.0 {
        75.0 + (person.adult_height_cm - 75.0) * (age - 1.0) / 17.0
    } else {
        person.adult_height_cm
    }
}

fn quantity_value(value: f64, decimals: u32) -> Value {
    if decimals == 0 {
        json!(value.round() as i64)
    } else {
        json!((value * 10.0).round() / 10.0)
    }
}

fn add_observations(
    rng: &mut SynthRng,
    out: &mut Entries,
    cast: &Cast,
    person: &Person,
    visit: &mut Visit,
) {
    let age = age_years(person.birth, visit.start.day);
    for (i, kind) in choose_observation_kinds(rng).into_iter().enumerate() {
        let value = measure(rng, kind, person, age);
        let at = visit.start.plus_minutes(5 + 2 * i as i64).min(visit.end);
        let (unit, ucum, decimals) = kind.unit();
        let category = if kind.is_lab() {
            code("laboratory", "Laboratory")
        } else {
            VITAL_SIGNS
        };
        let shown = quantity_value(value, decimals);
        let mut observation = json!({
            "resourceType": "Observation",
            "status": "final",
            "category": [codeable(OBSERVATION_CATEGORY, category)],
            "code": concept(LOINC, kind.loinc()),
            "subject": reference(&cast.patient),
            "encounter": reference(&visit.url),
            "effectiveDateTime": at.to_fhir(),
            "performer": [reference(&cast.practitioner)],
            "valueQuantity": {"value": shown, "unit": unit, "system": UCUM, "code": ucum},
        });
        if kind == ObsKind::Glucose {
            let high = value.round() > 99.0;
            let flag = if high {
                code("H", "High")
            } else {
                code("N", "Normal")
            };
            set(
                &mut observation,
                "interpretation",
                json!([codeable(INTERPRETATION, flag)]),
            );
            set(
                &mut observation,
                "referenceRange",
                json!([{
                    "low": {"value": 70, "unit": unit, "system": UCUM, "code": ucum},
                    "high": {"value": 99, "unit": unit, "system": UCUM, "code": ucum},
                }]),
            );
        }
        if rng.chance(6) {
            set(
                &mut observation,
                "note",
                json!([{"time": at.to_fhir(), "text": rng.pick(kind.remarks())}]),
            );
        }
        let url = out.add(rng, observation);
        visit.observations.push(ObservationMade {
            kind,
            url,
            value,
            at,
        });
    }
}

// ---------------------------------------------------------------------------------------------
// Clinical statements

/// 1–3 distinct problems the person is old enough to have (acute infections fit every age).
fn choose_problems(rng: &mut SynthRng, person: &Person, today: i64) -> Vec<Problem> {
    let age = age_years(person.birth, today);
    let eligible: Vec<Problem> = PROBLEMS
        .iter()
        .copied()
        .filter(|p| p.min_age <= age)
        .collect();
    let count = rng.count(1, 3);
    rng.distinct(eligible.len(), count)
        .into_iter()
        .filter_map(|i| eligible.get(i).copied())
        .collect()
}

fn choose_allergens(rng: &mut SynthRng) -> Vec<Allergen> {
    let count = match rng.below(100) {
        0..=59 => 0,
        60..=89 => 1,
        _ => 2,
    };
    rng.distinct(ALLERGENS.len(), count)
        .into_iter()
        .filter_map(|i| ALLERGENS.get(i).copied())
        .collect()
}

/// Visits at which the person was at least `min_age`; the last visit if none was.
fn visits_from_age(visits: &[Visit], person: &Person, min_age: f64) -> Vec<usize> {
    let fitting: Vec<usize> = visits
        .iter()
        .enumerate()
        .filter(|(_, v)| age_years(person.birth, v.start.day) >= min_age)
        .map(|(i, _)| i)
        .collect();
    if fitting.is_empty() {
        visits.len().checked_sub(1).into_iter().collect()
    } else {
        fitting
    }
}

fn add_conditions(
    rng: &mut SynthRng,
    out: &mut Entries,
    cast: &Cast,
    person: &Person,
    problems: &[Problem],
    visits: &[Visit],
    today: i64,
) -> Vec<Diagnosis> {
    let mut diagnoses = Vec::with_capacity(problems.len());
    for problem in problems {
        let candidates = visits_from_age(visits, person, problem.min_age);
        let Some(index) = candidates.get(rng.index(candidates.len())).copied() else {
            continue;
        };
        let Some(visit) = visits.get(index) else {
            continue;
        };
        let recorded = visit.start;
        let onset_day = if problem.chronic {
            (recorded.day - rng.range(0, 365)).max(person.birth)
        } else {
            (recorded.day - rng.range(0, 4)).max(person.birth)
        };
        let abated_day = recorded.day + rng.range(7, 21);
        let resolved = !problem.chronic && abated_day <= today;
        let clinical_status = if resolved { RESOLVED } else { ACTIVE };
        let mut condition = json!({
            "resourceType": "Condition",
            "clinicalStatus": codeable(CONDITION_CLINICAL, clinical_status),
            "verificationStatus": codeable(CONDITION_VERIFICATION, CONFIRMED),
            "category": [codeable(CONDITION_CATEGORY, ENCOUNTER_DIAGNOSIS)],
            "code": concept(SNOMED, problem.code),
            "subject": reference(&cast.patient),
            "encounter": reference(&visit.url),
            "onsetDateTime": date_string(onset_day),
            "recordedDate": recorded.to_fhir(),
            "recorder": reference(&cast.practitioner),
        });
        if resolved {
            set(
                &mut condition,
                "abatementDateTime",
                json!(date_string(abated_day)),
            );
        }
        let url = out.add(rng, condition);
        diagnoses.push(Diagnosis {
            problem: *problem,
            url,
            visit: index,
        });
    }
    diagnoses
}

/// 0–3 prescriptions: medicines for the diagnoses first (with the diagnosis as reason), then
/// common over-the-counter ones; never a medicine the patient is allergic to.
fn add_medication_requests(
    rng: &mut SynthRng,
    out: &mut Entries,
    cast: &Cast,
    diagnoses: &[Diagnosis],
    allergens: &[Allergen],
    visits: &[Visit],
) {
    let tolerated = |m: &Medicine| !allergens.iter().any(|a| Some(a.code.code) == m.allergen);
    let mut candidates: Vec<(Medicine, Option<&Diagnosis>)> = Vec::new();
    for diagnosis in diagnoses {
        for medicine in diagnosis.problem.medicines.iter().filter(|m| tolerated(m)) {
            if !candidates
                .iter()
                .any(|(m, _)| m.code.code == medicine.code.code)
            {
                candidates.push((*medicine, Some(diagnosis)));
            }
        }
    }
    for medicine in GENERAL_MEDICINES.iter().filter(|m| tolerated(m)) {
        if !candidates
            .iter()
            .any(|(m, _)| m.code.code == medicine.code.code)
        {
            candidates.push((*medicine, None));
        }
    }
    let wanted = rng.count(0, 3);
    for i in rng.distinct(candidates.len(), wanted) {
        let Some((medicine, diagnosis)) = candidates.get(i).copied() else {
            continue;
        };
        let visit_index = diagnosis.map_or_else(|| rng.index(visits.len()), |d| d.visit);
        let Some(visit) = visits.get(visit_index) else {
            continue;
        };
        let long_term = diagnosis.is_some_and(|d| d.problem.chronic);
        let course = if long_term {
            code("continuous", "Continuous long term therapy")
        } else {
            code("acute", "Short course (acute) therapy")
        };
        let mut request = json!({
            "resourceType": "MedicationRequest",
            "status": if long_term { "active" } else { "completed" },
            "intent": "order",
            "medicationCodeableConcept": concept(RXNORM, medicine.code),
            "subject": reference(&cast.patient),
            "encounter": reference(&visit.url),
            "authoredOn": visit.end.to_fhir(),
            "requester": reference(&cast.practitioner),
            "courseOfTherapyType": codeable(COURSE_OF_THERAPY, course),
            "dosageInstruction": [{"text": medicine.dosage, "asNeededBoolean": medicine.as_needed}],
        });
        if let Some(d) = diagnosis {
            set(&mut request, "reasonReference", json!([reference(&d.url)]));
        }
        out.add(rng, request);
    }
}

fn add_procedures(
    rng: &mut SynthRng,
    out: &mut Entries,
    cast: &Cast,
    person: &Person,
    visits: &[Visit],
) {
    let wanted = rng.count(0, 2);
    for i in rng.distinct(PROCEDURES.len(), wanted) {
        let Some(kind) = PROCEDURES.get(i).copied() else {
            continue;
        };
        let candidates: Vec<&Visit> = visits
            .iter()
            .filter(|v| age_years(person.birth, v.start.day) >= kind.min_age)
            .collect();
        let Some(visit) = candidates.get(rng.index(candidates.len())) else {
            continue;
        };
        let done = visit.start.plus_minutes(10).min(visit.end);
        out.add(
            rng,
            json!({
                "resourceType": "Procedure",
                "status": "completed",
                "code": concept(SNOMED, kind.code),
                "subject": reference(&cast.patient),
                "encounter": reference(&visit.url),
                "performedDateTime": done.to_fhir(),
                "performer": [{"actor": reference(&cast.practitioner)}],
            }),
        );
    }
}

fn add_allergies(
    rng: &mut SynthRng,
    out: &mut Entries,
    cast: &Cast,
    allergens: &[Allergen],
    visits: &[Visit],
) {
    for allergen in allergens {
        let Some(visit) = visits.get(rng.index(visits.len())) else {
            continue;
        };
        let reaction = rng.pick(allergen.reactions);
        let severe = reaction.code == ANAPHYLAXIS.code;
        let severity = if severe {
            "severe"
        } else {
            rng.pick(&["mild", "moderate"])
        };
        out.add(
            rng,
            json!({
                "resourceType": "AllergyIntolerance",
                "clinicalStatus": codeable(ALLERGY_CLINICAL, ACTIVE),
                "verificationStatus": codeable(ALLERGY_VERIFICATION, CONFIRMED),
                "type": "allergy",
                "category": [allergen.category],
                "criticality": if severe { "high" } else { "low" },
                "code": concept(SNOMED, allergen.code),
                "patient": reference(&cast.patient),
                "encounter": reference(&visit.url),
                "recordedDate": visit.start.to_fhir(),
                "recorder": reference(&cast.practitioner),
                "reaction": [{"manifestation": [concept(SNOMED, reaction)], "severity": severity}],
            }),
        );
    }
}

/// 1–3 vaccinations the person could have had within the record horizon (the pediatric hepatitis
/// B dose fits newborns, influenza everyone older than six months, so there is always one).
fn add_immunizations(
    rng: &mut SynthRng,
    out: &mut Entries,
    cast: &Cast,
    person: &Person,
    today: i64,
) {
    let horizon = today - RECORD_HORIZON_DAYS;
    let windows: Vec<(Vaccine, i64, i64)> = VACCINES
        .iter()
        .filter_map(|v| {
            let from = (person.birth + v.min_age_days)
                .max(horizon)
                .max(days_from_civil(v.since_year, 1, 1));
            let until = (person.birth + v.max_age_days).min(today);
            (from <= until).then_some((*v, from, until))
        })
        .collect();
    let wanted = rng.count(1, 3);
    for i in rng.distinct(windows.len(), wanted) {
        let Some((vaccine, from, until)) = windows.get(i).copied() else {
            continue;
        };
        let at = Moment::at(
            rng.range(from, until),
            rng.range(8, 15),
            rng.range(0, 11) * 5,
        );
        let lot = format!("SYN{:05}", rng.below(100_000));
        out.add(
            rng,
            json!({
                "resourceType": "Immunization",
                "status": "completed",
                "vaccineCode": concept(CVX, vaccine.code),
                "patient": reference(&cast.patient),
                "occurrenceDateTime": at.to_fhir(),
                "primarySource": true,
                "lotNumber": lot,
                "performer": [{
                    "function": codeable(PERFORMER_FUNCTION, code("AP", "Administering Provider")),
                    "actor": reference(&cast.practitioner),
                }],
            }),
        );
    }
}

const LAB: Code = code("LAB", "Laboratory");
const LAB_REPORT: Code = code("11502-2", "Laboratory report");
const VITAL_SIGNS: Code = code("vital-signs", "Vital Signs");
const VITAL_SIGNS_PANEL: Code = code(
    "85353-1",
    "Vital signs, weight, height, head circumference, oxygen saturation and BMI panel",
);

/// A lab report for a visit with a glucose value, otherwise a vital-signs panel report.
fn add_diagnostic_report(rng: &mut SynthRng, out: &mut Entries, cast: &Cast, visits: &[Visit]) {
    let with_lab: Vec<&Visit> = visits
        .iter()
        .filter(|v| v.observations.iter().any(|o| o.kind.is_lab()))
        .collect();
    let (visit, lab) = match with_lab.get(rng.index(with_lab.len())) {
        Some(v) => (*v, true),
        None => match visits.get(rng.index(visits.len())) {
            Some(v) => (v, false),
            None => return,
        },
    };
    let results: Vec<&ObservationMade> = visit
        .observations
        .iter()
        .filter(|o| o.kind.is_lab() == lab)
        .collect();
    let (Some(first), Some(last)) = (results.first(), results.last()) else {
        return;
    };
    let mut report = json!({
        "resourceType": "DiagnosticReport",
        "status": "final",
        "subject": reference(&cast.patient),
        "encounter": reference(&visit.url),
        "effectiveDateTime": first.at.to_fhir(),
        "issued": last.at.max(visit.end).plus_minutes(30).to_fhir(),
        "performer": [reference(&cast.organization)],
        "resultsInterpreter": [reference(&cast.practitioner)],
        "result": results.iter().map(|o| reference(&o.url)).collect::<Vec<_>>(),
    });
    if lab {
        let elevated = results.iter().any(|o| o.value.round() > 99.0);
        let conclusion = if elevated {
            "Förhöjt glukos, bedöms tillsammans med klinisk bild."
        } else {
            "Glukos inom referensintervallet."
        };
        set(
            &mut report,
            "category",
            json!([codeable(DIAGNOSTIC_SECTION, LAB)]),
        );
        set(&mut report, "code", concept(LOINC, LAB_REPORT));
        set(&mut report, "conclusion", json!(conclusion));
    } else {
        set(
            &mut report,
            "category",
            json!([codeable(OBSERVATION_CATEGORY, VITAL_SIGNS)]),
        );
        set(&mut report, "code", concept(LOINC, VITAL_SIGNS_PANEL));
    }
    out.add(rng, report);
}

/// A short visit note in Swedish, as UTF-8 plain text in the attachment.
fn add_document_reference(
    rng: &mut SynthRng,
    out: &mut Entries,
    cast: &Cast,
    unit: CareUnit,
    person: &Person,
    diagnoses: &[Diagnosis],
    visits: &[Visit],
) {
    let index = rng.index(visits.len());
    let Some(visit) = visits.get(index) else {
        return;
    };
    let assessment = diagnoses
        .iter()
        .find(|d| d.visit == index)
        .map_or("Inga nya fynd.", |d| d.problem.swedish);
    let patient_name = format!("{} {}", person.given.join(" "), person.family);
    let note = format!(
        "{kind}, {date}\nVårdenhet: {unit}\nPatient: {patient_name}\n\n\
         Anamnes: {complaint}\nStatus: {finding}\nBedömning: {assessment}\nÅtgärd: {plan}\n",
        kind = visit.kind.swedish,
        date = date_string(visit.start.day),
        unit = unit.name,
        complaint = rng.pick(NOTE_COMPLAINTS),
        finding = rng.pick(NOTE_FINDINGS),
        plan = rng.pick(NOTE_PLANS),
    );
    let written = visit.end.plus_minutes(15);
    out.add(
        rng,
        json!({
            "resourceType": "DocumentReference",
            "status": "current",
            "docStatus": "final",
            "type": concept(LOINC, code("11506-3", "Progress note")),
            "subject": reference(&cast.patient),
            "date": written.to_fhir(),
            "author": [reference(&cast.practitioner)],
            "custodian": reference(&cast.organization),
            "description": "Besöksanteckning",
            "content": [{"attachment": {
                "contentType": "text/plain; charset=utf-8",
                "language": "sv",
                "data": base64_encode(note.as_bytes()),
                "size": note.len(),
                "title": "Besöksanteckning",
                "creation": written.to_fhir(),
            }}],
            "context": {
                "encounter": [reference(&visit.url)],
                "period": period(visit.start, visit.end),
            },
        }),
    );
}

// ---------------------------------------------------------------------------------------------
// Encoding

/// Standard base64 with padding (RFC 4648 §4), for attachment data.
fn base64_encode(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b0 = chunk.first().copied().unwrap_or(0);
        let b1 = chunk.get(1).copied();
        let b2 = chunk.get(2).copied();
        let n =
            (u32::from(b0) << 16) | (u32::from(b1.unwrap_or(0)) << 8) | u32::from(b2.unwrap_or(0));
        let sextet = |shift: u32| char::from(ALPHABET[((n >> shift) & 63) as usize]);
        out.push(sextet(18));
        out.push(sextet(12));
        out.push(if b1.is_some() { sextet(6) } else { '=' });
        out.push(if b2.is_some() { sextet(0) } else { '=' });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{HashMap, HashSet};

    const TODAY: (i32, u32, u32) = (2025, 6, 15);

    const DATE_KEYS: &[&str] = &[
        "birthDate",
        "effectiveDateTime",
        "onsetDateTime",
        "abatementDateTime",
        "recordedDate",
        "authoredOn",
        "occurrenceDateTime",
        "performedDateTime",
        "issued",
        "date",
        "creation",
        "start",
        "end",
        "time",
    ];

    fn entries(bundle: &Value) -> &[Value] {
        bundle["entry"]
            .as_array()
            .map(Vec::as_slice)
            .expect("entry array")
    }

    fn type_of(entry: &Value) -> &str {
        entry["resource"]["resourceType"]
            .as_str()
            .expect("resourceType")
    }

    fn is_uuid_v4(s: &str) -> bool {
        let b = s.as_bytes();
        b.len() == 36
            && b.iter().enumerate().all(|(i, c)| match i {
                8 | 13 | 18 | 23 => *c == b'-',
                _ => c.is_ascii_digit() || (b'a'..=b'f').contains(c),
            })
            && b[14] == b'4'
            && b"89ab".contains(&b[19])
    }

    fn digits(s: &str) -> bool {
        !s.is_empty() && s.bytes().all(|c| c.is_ascii_digit())
    }

    /// `YYYY-MM-DD` or `YYYY-MM-DDThh:mm:ss+hh:mm`, with a real calendar date.
    fn is_fhir_date(s: &str) -> bool {
        let date_ok = s.len() >= 10
            && digits(&s[0..4])
            && &s[4..5] == "-"
            && digits(&s[5..7])
            && &s[7..8] == "-"
            && digits(&s[8..10])
            && {
                let (y, m, d): (i64, i64, i64) = (
                    s[0..4].parse().unwrap_or(0),
                    s[5..7].parse().unwrap_or(0),
                    s[8..10].parse().unwrap_or(0),
                );
                (1..=12).contains(&m) && civil_from_days(days_from_civil(y, m, d)) == (y, m, d)
            };
        let time_ok = s.len() == 10
            || (s.len() == 25
                && &s[10..11] == "T"
                && digits(&s[11..13])
                && &s[13..14] == ":"
                && digits(&s[14..16])
                && &s[16..17] == ":"
                && digits(&s[17..19])
                && (&s[19..] == "+01:00" || &s[19..] == "+02:00"));
        date_ok && time_ok
    }

    /// Walks every value: nothing empty, every reference local and resolvable, every date valid
    /// and not after today.
    fn check_values(value: &Value, key: &str, urls: &HashSet<String>, today: &str, path: &str) {
        match value {
            Value::String(s) => {
                assert!(!s.is_empty(), "empty string at {path}");
                if key == "reference" {
                    assert!(
                        s.starts_with("urn:uuid:"),
                        "non-local reference {s} at {path}"
                    );
                    assert!(urls.contains(s), "dangling reference {s} at {path}");
                }
                if DATE_KEYS.contains(&key) {
                    assert!(is_fhir_date(s), "bad date {s} at {path}");
                    assert!(&s[..10] <= today, "date {s} after today at {path}");
                }
            }
            Value::Array(items) => {
                assert!(!items.is_empty(), "empty array at {path}");
                for item in items {
                    check_values(item, key, urls, today, path);
                }
            }
            Value::Object(map) => {
                assert!(!map.is_empty(), "empty object at {path}");
                for (k, v) in map {
                    check_values(v, k, urls, today, &format!("{path}.{k}"));
                }
            }
            Value::Null => panic!("null at {path}"),
            Value::Bool(_) | Value::Number(_) => {}
        }
    }

    fn check_bundle(bundle: &Value, today: (i32, u32, u32)) {
        let today_str = format!("{:04}-{:02}-{:02}", today.0, today.1, today.2);
        assert_eq!(bundle["resourceType"], "Bundle");
        assert_eq!(bundle["type"], "transaction");
        let entries = entries(bundle);

        let mut urls = HashSet::new();
        let mut type_by_url = HashMap::new();
        for e in entries {
            let url = e["fullUrl"].as_str().expect("fullUrl");
            assert!(
                url.starts_with("urn:uuid:") && is_uuid_v4(&url[9..]),
                "bad fullUrl {url}"
            );
            assert!(urls.insert(url.to_string()), "duplicate fullUrl {url}");
            type_by_url.insert(url.to_string(), type_of(e).to_string());
            assert_eq!(e["request"]["method"], "POST");
            assert_eq!(e["request"]["url"].as_str(), Some(type_of(e)));
            assert!(e["resource"].get("id").is_none(), "id on a POSTed resource");
            assert_eq!(e["resource"]["meta"]["security"][0]["code"], "HTEST");
        }
        check_values(bundle, "", &urls, &today_str, "Bundle");

        let mut counts: HashMap<&str, usize> = HashMap::new();
        for e in entries {
            *counts.entry(type_of(e)).or_default() += 1;
        }
        let count = |t: &str| counts.get(t).copied().unwrap_or(0);
        let within = |t: &str, lo: usize, hi: usize| {
            assert!(
                (lo..=hi).contains(&count(t)),
                "{t}: {} not in {lo}..={hi}",
                count(t)
            );
        };
        within("Patient", 1, 1);
        within("Organization", 1, 1);
        within("Practitioner", 1, 1);
        within("CareTeam", 1, 1);
        within("Encounter", 2, 6);
        within("Condition", 1, 3);
        within("MedicationRequest", 0, 3);
        within("Procedure", 0, 2);
        within("AllergyIntolerance", 0, 2);
        within("Immunization", 1, 3);
        within("DiagnosticReport", 0, 1);
        within("DocumentReference", 0, 1);
        assert_eq!(counts.values().sum::<usize>(), entries.len());

        let target = |r: &Value| {
            type_by_url
                .get(r["reference"].as_str().unwrap_or(""))
                .cloned()
                .unwrap_or_default()
        };
        let mut per_encounter: HashMap<String, usize> = HashMap::new();
        let patient = entries
            .iter()
            .find(|e| type_of(e) == "Patient")
            .expect("patient");
        let birth = patient["resource"]["birthDate"]
            .as_str()
            .expect("birthDate")
            .to_string();
        let (by, bm, bd) = (
            birth[0..4].parse::<i64>().unwrap_or(0),
            birth[5..7].parse().unwrap_or(0),
            birth[8..10].parse().unwrap_or(0),
        );
        let age = age_years(
            days_from_civil(by, bm, bd),
            days_from_civil(i64::from(today.0), i64::from(today.1), i64::from(today.2)),
        );
        assert!((0.0..110.0).contains(&age), "implausible age {age}");
        assert_eq!(
            target(&patient["resource"]["managingOrganization"]),
            "Organization"
        );
        let ids = patient["resource"]["identifier"]
            .as_array()
            .expect("identifiers");
        assert!(ids.iter().any(|i| i["system"] == MRN_SYSTEM));
        assert!(ids.iter().any(|i| i["system"] == PERSONNUMMER_SYSTEM));

        for e in entries {
            let r = &e["resource"];
            match type_of(e) {
                "Observation" => {
                    *per_encounter
                        .entry(
                            r["encounter"]["reference"]
                                .as_str()
                                .unwrap_or("")
                                .to_string(),
                        )
                        .or_default() += 1;
                    assert_eq!(target(&r["encounter"]), "Encounter");
                    assert_eq!(target(&r["subject"]), "Patient");
                    assert_eq!(r["status"], "final");
                    assert_eq!(r["code"]["coding"][0]["system"], LOINC);
                    assert_eq!(
                        r["category"][0]["coding"][0]["system"],
                        OBSERVATION_CATEGORY
                    );
                    assert_eq!(r["valueQuantity"]["system"], UCUM);
                    assert!(r["valueQuantity"]["value"]
                        .as_f64()
                        .is_some_and(|v| v > 0.0));
                }
                "Encounter" => {
                    let start = r["period"]["start"].as_str().expect("start");
                    let end = r["period"]["end"].as_str().expect("end");
                    assert!(start[..10] >= *birth && start[..10] <= end[..10]);
                    assert_eq!(target(&r["serviceProvider"]), "Organization");
                    assert_eq!(target(&r["participant"][0]["individual"]), "Practitioner");
                }
                "CareTeam" => {
                    assert_eq!(target(&r["subject"]), "Patient");
                    assert_eq!(target(&r["participant"][0]["member"]), "Practitioner");
                    assert_eq!(target(&r["managingOrganization"][0]), "Organization");
                }
                "Condition" => {
                    assert!(r["onsetDateTime"]
                        .as_str()
                        .is_some_and(|d| d[..10] >= *birth));
                    assert_eq!(r["code"]["coding"][0]["system"], SNOMED);
                }
                "MedicationRequest" => {
                    assert_eq!(r["intent"], "order");
                    assert_eq!(target(&r["requester"]), "Practitioner");
                }
                "Immunization" => {
                    assert_eq!(r["status"], "completed");
                    assert!(r["occurrenceDateTime"]
                        .as_str()
                        .is_some_and(|d| d[..10] >= *birth));
                }
                "DiagnosticReport" => {
                    for result in r["result"].as_array().expect("results") {
                        assert_eq!(target(result), "Observation");
                    }
                }
                _ => {}
            }
        }
        assert_eq!(
            per_encounter.len(),
            count("Encounter"),
            "an encounter without observations"
        );
        assert!(
            per_encounter.values().all(|n| (2..=6).contains(n)),
            "observations per encounter: {per_encounter:?}"
        );
    }

    #[test]
    fn same_seed_gives_identical_bundles() {
        let (mut a, mut b) = (SynthRng::new(42), SynthRng::new(42));
        for _ in 0..5 {
            assert_eq!(patient_bundle(&mut a, TODAY), patient_bundle(&mut b, TODAY));
        }
    }

    #[test]
    fn different_seeds_differ() {
        let a = patient_bundle(&mut SynthRng::new(1), TODAY);
        let b = patient_bundle(&mut SynthRng::new(2), TODAY);
        assert_ne!(a, b);
        let mut rng = SynthRng::new(1);
        let first = patient_bundle(&mut rng, TODAY);
        assert_ne!(
            first,
            patient_bundle(&mut rng, TODAY),
            "consecutive patients repeat"
        );
    }

    #[test]
    fn bundles_are_well_formed() {
        let mut rng = SynthRng::new(7);
        for _ in 0..400 {
            check_bundle(&patient_bundle(&mut rng, TODAY), TODAY);
        }
    }

    #[test]
    fn awkward_todays_still_give_valid_dates() {
        for today in [
            (2024, 2, 29),
            (2000, 1, 1),
            (2031, 12, 31),
            (2025, 3, 30),
            (2025, 10, 26),
        ] {
            let mut rng = SynthRng::new(u64::from(today.1) * 31 + u64::from(today.2));
            for _ in 0..100 {
                check_bundle(&patient_bundle(&mut rng, today), today);
            }
        }
    }

    /// Generation is linear in the number of patients (no timing assertion, just volume), and
    /// MRNs do not repeat at this scale.
    #[test]
    fn a_thousand_patients() {
        let mut rng = SynthRng::new(1000);
        let mut resources = 0;
        let mut mrns = HashSet::new();
        for _ in 0..1000 {
            let bundle = patient_bundle(&mut rng, TODAY);
            resources += entries(&bundle).len();
            let mrn = entries(&bundle)
                .iter()
                .find(|e| type_of(e) == "Patient")
                .and_then(|e| e["resource"]["identifier"][0]["value"].as_str())
                .expect("mrn")
                .to_string();
            assert!(mrns.insert(mrn), "MRN repeated");
        }
        assert!(
            (20_000..50_000).contains(&resources),
            "{resources} resources"
        );
    }

    #[test]
    fn occasional_notes_are_present_and_decode() {
        let mut rng = SynthRng::new(99);
        let (mut documents, mut observation_notes) = (0, 0);
        for _ in 0..200 {
            let bundle = patient_bundle(&mut rng, TODAY);
            for e in entries(&bundle) {
                let r = &e["resource"];
                if type_of(e) == "DocumentReference" {
                    documents += 1;
                    let attachment = &r["content"][0]["attachment"];
                    assert!(attachment["contentType"]
                        .as_str()
                        .is_some_and(|c| c.starts_with("text/plain")));
                    let data = attachment["data"].as_str().expect("data");
                    let text = String::from_utf8(base64_decode(data)).expect("utf-8 note");
                    assert!(text.contains("Bedömning: "), "{text}");
                    assert_eq!(attachment["size"].as_u64(), Some(text.len() as u64));
                }
                if type_of(e) == "Observation" && r.get("note").is_some() {
                    observation_notes += 1;
                }
            }
        }
        assert!((20..=100).contains(&documents), "{documents} documents");
        assert!(
            observation_notes > 10,
            "{observation_notes} observation notes"
        );
    }

    #[test]
    fn personnummer_is_valid_and_in_the_test_range() {
        let mut rng = SynthRng::new(5);
        for _ in 0..2000 {
            let birth = rng.range(-20_000, 20_000);
            let female = rng.chance(50);
            let pnr = personnummer(&mut rng, birth, female);
            assert!(pnr.len() == 12 && digits(&pnr), "{pnr}");
            let (y, m, d) = civil_from_days(birth);
            assert_eq!(&pnr[..8], format!("{y:04}{m:02}{:02}", d + 60));
            let day: u32 = pnr[6..8].parse().expect("day");
            assert!((61..=91).contains(&day));
            let sex_digit: u32 = pnr[10..11].parse().expect("sex digit");
            assert_eq!(matches!(sex_digit, 0 | 2 | 4 | 6 | 8), female);
            // Luhn over the ten-digit form including the check digit sums to a multiple of 10.
            assert_eq!(
                luhn_check_digit(&pnr[2..11]),
                pnr[11..12].parse::<u32>().expect("check")
            );
        }
        // Skatteverket's worked example: 640823-323 has check digit 4.
        assert_eq!(luhn_check_digit("640823323"), 4);
    }

    #[test]
    fn base64_matches_rfc4648_vectors() {
        for (plain, encoded) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64_encode(plain.as_bytes()), encoded);
        }
        let all: Vec<u8> = (0..=255).collect();
        assert_eq!(base64_decode(&base64_encode(&all)), all);
    }

    #[test]
    fn calendar_round_trips() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
        assert_eq!(
            weekday(days_from_civil(2025, 6, 15)),
            0,
            "2025-06-15 is a Sunday"
        );
        for day in -800_000..800_000 {
            let (y, m, d) = civil_from_days(day);
            assert_eq!(days_from_civil(y, m, d), day);
        }
        assert!(is_summer_time(days_from_civil(2025, 3, 30)));
        assert!(!is_summer_time(days_from_civil(2025, 3, 29)));
        assert!(is_summer_time(days_from_civil(2025, 10, 25)));
        assert!(!is_summer_time(days_from_civil(2025, 10, 26)));
    }

    #[test]
    fn uuids_are_version_4() {
        let mut rng = SynthRng::new(0);
        let uuids: HashSet<String> = (0..10_000).map(|_| rng.uuid()).collect();
        assert_eq!(uuids.len(), 10_000);
        assert!(uuids.iter().all(|u| is_uuid_v4(u)));
    }

    #[test]
    fn rng_helpers_stay_in_range() {
        let mut rng = SynthRng::new(3);
        for _ in 0..10_000 {
            assert!((2..=6).contains(&rng.range(2, 6)));
            assert!((1..=3).contains(&rng.count(1, 3)));
            assert!(rng.below(7) < 7);
        }
        assert_eq!(rng.range(5, 5), 5);
        assert_eq!(rng.below(0), 0);
        let picked = rng.distinct(10, 4);
        assert_eq!(picked.len(), 4);
        assert_eq!(picked.iter().collect::<HashSet<_>>().len(), 4);
        assert_eq!(rng.distinct(3, 10).len(), 3);
        assert_eq!(rng.pick::<&str>(&[]), "");
    }

    fn base64_decode(text: &str) -> Vec<u8> {
        let value = |c: u8| match c {
            b'A'..=b'Z' => u32::from(c - b'A'),
            b'a'..=b'z' => u32::from(c - b'a') + 26,
            b'0'..=b'9' => u32::from(c - b'0') + 52,
            b'+' => 62,
            b'/' => 63,
            _ => 0,
        };
        let mut out = Vec::new();
        for chunk in text.as_bytes().chunks(4) {
            let n = chunk.iter().fold(0, |acc, c| (acc << 6) | value(*c));
            let pads = chunk.iter().filter(|c| **c == b'=').count();
            let bytes = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
            out.extend_from_slice(&bytes[..3 - pads]);
        }
        out
    }
}
