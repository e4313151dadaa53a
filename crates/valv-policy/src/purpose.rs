//! HL7 v3 PurposeOfUse codes a request may declare (`X-Purpose-Of-Use`), and each role's default.

/// The codes Valv accepts (HL7 v3 ActReason, PurposeOfUse branch).
pub const CODES: &[&str] = &[
    "TREAT", "ETREAT", "BTG", "ERTREAT", "CAREMGT", "CLINTRCH", "CLINTRL", "HPAYMT", "CLMATTCH", "COVAUTH", "COVERAGE", "ELIGDET", "ELIGVER",
    "ENROLLM", "REMITADV", "HOPERAT", "HCOMPL", "HACCRED", "HDECD", "HDIRECT", "HLEGAL", "HOUTCOMS", "HPRGRP", "HQUALIMP", "HSYSADMIN",
    "MEMADMIN", "PATADMIN", "PATSFTY", "PERFMSR", "RECORDMGT", "TRAIN", "HMARKT", "HRESCH", "PATRQT", "FAMRQT", "PWATRNY", "SUPNWK",
    "PUBHLTH", "DISASTER", "THREAT", "FRAUD", "GOV", "SYSDEV", "HTEST",
];

pub fn is_known(code: &str) -> bool {
    CODES.contains(&code)
}

/// The purpose assumed when a request declares none: the first of the caller's roles that has one.
pub fn default_for(roles: &[String]) -> &'static str {
    for r in roles {
        match r.as_str() {
            "physician" | "nurse" | "assistant" | "external_specialist" => return "TREAT",
            "patient" => return "PATRQT",
            "registrar" => return "PATADMIN",
            "auditor" => return "HCOMPL",
            "support" | "admin" => return "HSYSADMIN",
            "service" => return "HOPERAT",
            _ => {}
        }
    }
    "HOPERAT"
}
