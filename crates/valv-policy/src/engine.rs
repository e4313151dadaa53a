//! The Cedar engine: the schema and default policies compiled into the binary, operators'
//! policies added or replacing defaults by `@id`, strict validation, and one evaluation per
//! decision. Any evaluation error is a denial: Cedar skips a policy that errors, which would let
//! a broken `forbid` fail open.

use crate::{Action, PolicyError};
use cedar_policy::{
    Authorizer, Context, Decision as CedarDecision, Entities, Entity, EntityId, EntityTypeName, EntityUid, PolicyId, PolicySet, Request,
    RestrictedExpression, Schema, ValidationMode, Validator,
};
use std::collections::{HashMap, HashSet};
use std::str::FromStr;
use std::sync::{Arc, RwLock};

pub const SCHEMA: &str = include_str!("../policies/valv.cedarschema");
pub const DEFAULT_POLICIES: &str = include_str!("../policies/default.cedar");

/// A policy file an operator supplies: its name (for messages) and text.
#[derive(Debug, Clone)]
pub struct PolicyFile {
    pub name: String,
    pub text: String,
}

/// What a policy says about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyInfo {
    pub id: String,
    pub reason: String,
    /// `break-glass` or `support` when the policy permits only under that grant.
    pub grant: Option<String>,
    /// `default` or the file it came from.
    pub origin: String,
    pub forbid: bool,
}

/// The facts a decision is evaluated on (the schema's `Valv::Facts`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Facts {
    pub patient_data: bool,
    pub care_active: bool,
    pub consultant: bool,
    pub self_access: bool,
    pub block: bool,
    pub consent_permit: bool,
    pub cross_org: bool,
    pub unverified: bool,
    pub break_glass: bool,
    pub break_glass_overrides_block: bool,
    pub support_grant: bool,
    pub has_scopes: bool,
    pub token_allows: bool,
    pub same_provider: bool,
    pub purpose: String,
    pub file_scan: String,
}

impl Facts {
    fn pairs(&self) -> Vec<(String, RestrictedExpression)> {
        let b = |k: &str, v: bool| (k.to_string(), RestrictedExpression::new_bool(v));
        vec![
            b("patient_data", self.patient_data),
            b("care_active", self.care_active),
            b("consultant", self.consultant),
            b("self_access", self.self_access),
            b("block", self.block),
            b("consent_permit", self.consent_permit),
            b("cross_org", self.cross_org),
            b("unverified", self.unverified),
            b("break_glass", self.break_glass),
            b("break_glass_overrides_block", self.break_glass_overrides_block),
            b("support_grant", self.support_grant),
            b("has_scopes", self.has_scopes),
            b("token_allows", self.token_allows),
            b("same_provider", self.same_provider),
            ("purpose".to_string(), RestrictedExpression::new_string(self.purpose.clone())),
            ("file_scan".to_string(), RestrictedExpression::new_string(self.file_scan.clone())),
        ]
    }

    /// The facts as `name=value` words, for explanations.
    pub fn describe(&self) -> Vec<String> {
        let flags = [
            ("patient_data", self.patient_data),
            ("care_active", self.care_active),
            ("consultant", self.consultant),
            ("self_access", self.self_access),
            ("block", self.block),
            ("consent_permit", self.consent_permit),
            ("cross_org", self.cross_org),
            ("unverified", self.unverified),
            ("break_glass", self.break_glass),
            ("break_glass_overrides_block", self.break_glass_overrides_block),
            ("support_grant", self.support_grant),
            ("has_scopes", self.has_scopes),
            ("token_allows", self.token_allows),
            ("same_provider", self.same_provider),
        ];
        let mut out: Vec<String> = flags.iter().map(|(k, v)| format!("{k}={v}")).collect();
        out.push(format!("purpose={}", self.purpose));
        if !self.file_scan.is_empty() {
            out.push(format!("file_scan={}", self.file_scan));
        }
        out
    }
}

/// What Cedar answered: permitted or not, and the ids of the policies that decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub permit: bool,
    /// Permits that applied (when permitted) or forbids that applied (when denied); empty when
    /// nothing permits.
    pub rules: Vec<String>,
    /// Set when evaluation failed; the verdict is then a denial.
    pub error: Option<String>,
}

/// The target of a request as Cedar sees it.
#[derive(Debug, Clone, Copy)]
pub enum Target<'a> {
    Type(&'a str),
    Area(&'a str),
}

pub struct Engine {
    schema: Schema,
    policies: PolicySet,
    info: Vec<PolicyInfo>,
    authorizer: Authorizer,
    /// Entities per distinct role set (the user entity is named by its roles: policies speak of
    /// roles, never of individual users).
    entities: RwLock<HashMap<Vec<String>, Arc<Entities>>>,
    type_name: EntityTypeName,
    area_name: EntityTypeName,
    fact_name: EntityTypeName,
    user_name: EntityTypeName,
    action_uids: Vec<(Action, EntityUid)>,
    administer: EntityUid,
    change_fact: EntityUid,
    /// Verdicts already evaluated. A verdict depends only on the role set, action, target and
    /// facts (policies and entities are fixed for the engine's life), and Cedar's evaluation of
    /// two dozen policies costs ~27 µs where a lookup costs well under one.
    verdicts: RwLock<HashMap<VerdictKey, Verdict>>,
}

/// What a verdict depends on.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct VerdictKey {
    roles: Vec<String>,
    action: Option<Action>,
    area: bool,
    target: String,
    facts: Facts,
}

/// Verdicts held at most; the cache starts afresh when full (distinct keys are few in practice:
/// role sets x actions x types x fact combinations actually met).
const MAX_VERDICTS: usize = 65_536;

fn type_name(s: &str) -> Result<EntityTypeName, PolicyError> {
    EntityTypeName::from_str(s).map_err(|e| PolicyError::Schema(e.to_string()))
}

fn uid(t: &EntityTypeName, id: &str) -> EntityUid {
    EntityUid::from_type_name_and_id(t.clone(), EntityId::new(id))
}

impl Engine {
    /// The default policies alone.
    pub fn with_defaults() -> Result<Engine, PolicyError> {
        Engine::new(&[], false)
    }

    /// Defaults (unless `replace_defaults`) plus `files`; a file's policy whose `@id` names a
    /// default replaces it. Every policy needs a unique `@id`; the set must validate strictly.
    pub fn new(files: &[PolicyFile], replace_defaults: bool) -> Result<Engine, PolicyError> {
        let (schema, _) = Schema::from_cedarschema_str(SCHEMA).map_err(|e| PolicyError::Schema(e.to_string()))?;
        let mut chosen: Vec<(PolicyInfo, cedar_policy::Policy)> = Vec::new();
        let mut sources = Vec::new();
        if !replace_defaults {
            sources.push(("default".to_string(), DEFAULT_POLICIES.to_string()));
        }
        sources.extend(files.iter().map(|f| (f.name.clone(), f.text.clone())));
        for (origin, text) in &sources {
            let set = PolicySet::from_str(text).map_err(|e| PolicyError::Parse { file: origin.clone(), message: parse_message(&e) })?;
            let mut seen_here = HashSet::new();
            for p in set.policies() {
                let id = p.annotation("id").ok_or_else(|| PolicyError::Parse { file: origin.clone(), message: format!("a policy has no @id annotation: {}", first_line(&p.to_string())) })?;
                if !seen_here.insert(id.to_string()) {
                    return Err(PolicyError::Parse { file: origin.clone(), message: format!("@id(\"{id}\") appears twice") });
                }
                let info = PolicyInfo {
                    id: id.to_string(),
                    reason: p.annotation("reason").unwrap_or("").to_string(),
                    grant: p.annotation("grant").map(str::to_string),
                    origin: origin.clone(),
                    forbid: p.effect() == cedar_policy::Effect::Forbid,
                };
                let policy = p.new_id(PolicyId::new(id));
                chosen.retain(|(i, _)| i.id != info.id);
                chosen.push((info, policy));
            }
        }
        let mut policies = PolicySet::new();
        let mut info = Vec::new();
        for (i, p) in chosen {
            policies.add(p).map_err(|e| PolicyError::Parse { file: i.origin.clone(), message: e.to_string() })?;
            info.push(i);
        }
        let result = Validator::new(schema.clone()).validate(&policies, ValidationMode::Strict);
        if !result.validation_passed() {
            let errors: Vec<String> = result.validation_errors().map(|e| format!("{}: {e}", e.policy_id())).collect();
            return Err(PolicyError::Invalid(errors.join("; ")));
        }
        let action_name = type_name("Valv::Action")?;
        let action_uids = Action::ALL.iter().map(|a| (*a, uid(&action_name, a.cedar_name()))).collect();
        Ok(Engine {
            administer: uid(&action_name, "administer"),
            change_fact: uid(&action_name, "changeFact"),
            schema,
            policies,
            info,
            authorizer: Authorizer::new(),
            entities: RwLock::new(HashMap::new()),
            type_name: type_name("Valv::ResourceType")?,
            area_name: type_name("Valv::AdminArea")?,
            fact_name: type_name("Valv::AccessFact")?,
            user_name: type_name("Valv::User")?,
            action_uids,
            verdicts: RwLock::new(HashMap::new()),
        })
    }

    /// The policies in force, in order.
    pub fn policies(&self) -> &[PolicyInfo] {
        &self.info
    }

    pub fn policy(&self, id: &str) -> Option<&PolicyInfo> {
        self.info.iter().find(|p| p.id == id)
    }

    /// The entity store for one role set: the user, their roles, every resource type with its
    /// classes, and the admin areas. Built once per role set.
    fn entities_for(&self, roles: &[String]) -> Result<Arc<Entities>, PolicyError> {
        let mut key = roles.to_vec();
        key.sort();
        key.dedup();
        if let Some(e) = self.entities.read().ok().and_then(|m| m.get(&key).cloned()) {
            return Ok(e);
        }
        let role_name = type_name("Valv::Role")?;
        let class_name = type_name("Valv::ResourceClass")?;
        let mut all = Vec::new();
        let role_uids: HashSet<EntityUid> = key.iter().map(|r| uid(&role_name, r)).collect();
        all.extend(role_uids.iter().map(|r| Entity::new_no_attrs(r.clone(), HashSet::new())));
        all.push(Entity::new_no_attrs(self.user_uid(&key), role_uids));
        for (class, parent) in crate::classes::CLASS_TREE {
            let parents = parent.iter().map(|p| uid(&class_name, p)).collect();
            all.push(Entity::new_no_attrs(uid(&class_name, class), parents));
        }
        for t in valv_fhir::r4::resource_types() {
            let parents = HashSet::from([uid(&class_name, crate::classes::class_of(t))]);
            all.push(Entity::new_no_attrs(uid(&self.type_name, t), parents));
        }
        for k in crate::change::FactKind::ALL {
            all.push(Entity::new_no_attrs(uid(&self.fact_name, k.name()), HashSet::new()));
        }
        let entities = Arc::new(Entities::from_entities(all, Some(&self.schema)).map_err(|e| PolicyError::Schema(e.to_string()))?);
        if let Ok(mut m) = self.entities.write() {
            m.insert(key, entities.clone());
        }
        Ok(entities)
    }

    fn user_uid(&self, sorted_roles: &[String]) -> EntityUid {
        uid(&self.user_name, &format!("roles:{}", sorted_roles.join(",")))
    }

    /// Evaluates one request on `facts`.
    pub fn evaluate(&self, roles: &[String], action: Option<Action>, target: Target<'_>, facts: &Facts) -> Verdict {
        let mut sorted = roles.to_vec();
        sorted.sort();
        sorted.dedup();
        let (area, name) = match target {
            Target::Type(t) => (false, t),
            Target::Area(a) => (true, a),
        };
        let key = VerdictKey { roles: sorted, action, area, target: name.to_string(), facts: facts.clone() };
        if let Some(v) = self.verdicts.read().ok().and_then(|m| m.get(&key).cloned()) {
            return v;
        }
        match self.try_evaluate(roles, action, target, facts) {
            Ok(v) => {
                if v.error.is_none() {
                    if let Ok(mut m) = self.verdicts.write() {
                        if m.len() >= MAX_VERDICTS {
                            m.clear();
                        }
                        m.insert(key, v.clone());
                    }
                }
                v
            }
            Err(e) => Verdict { permit: false, rules: vec!["policy-error".into()], error: Some(e.to_string()) },
        }
    }

    /// [`Engine::evaluate`] without the verdict cache: the cost of a fact combination met for
    /// the first time (benchmarks).
    pub fn evaluate_uncached(&self, roles: &[String], action: Option<Action>, target: Target<'_>, facts: &Facts) -> Verdict {
        self.try_evaluate(roles, action, target, facts).unwrap_or_else(|e| Verdict { permit: false, rules: vec!["policy-error".into()], error: Some(e.to_string()) })
    }

    fn try_evaluate(&self, roles: &[String], action: Option<Action>, target: Target<'_>, facts: &Facts) -> Result<Verdict, PolicyError> {
        let entities = self.entities_for(roles)?;
        let mut key = roles.to_vec();
        key.sort();
        key.dedup();
        let action_uid = match action {
            Some(a) => self.action_uids.iter().find(|(x, _)| *x == a).map(|(_, u)| u.clone()).ok_or_else(|| PolicyError::Schema("unknown action".into()))?,
            None => self.administer.clone(),
        };
        let resource = match target {
            Target::Type(t) => uid(&self.type_name, t),
            Target::Area(a) => uid(&self.area_name, a),
        };
        let context = Context::from_pairs(facts.pairs()).map_err(|e| PolicyError::Evaluation(e.to_string()))?;
        let request = Request::new(self.user_uid(&key), action_uid, resource, context, None).map_err(|e| PolicyError::Evaluation(e.to_string()))?;
        Ok(self.verdict_of(&request, &entities))
    }

    /// Evaluates a change of an access fact of `kind` (uncached: such writes are rare, and
    /// their facts vary more than a read's).
    pub fn evaluate_change(&self, roles: &[String], kind: crate::change::FactKind, facts: &crate::change::ChangeFacts) -> Verdict {
        self.try_evaluate_change(roles, kind, facts).unwrap_or_else(|e| Verdict { permit: false, rules: vec!["policy-error".into()], error: Some(e.to_string()) })
    }

    fn try_evaluate_change(&self, roles: &[String], kind: crate::change::FactKind, f: &crate::change::ChangeFacts) -> Result<Verdict, PolicyError> {
        let entities = self.entities_for(roles)?;
        let mut key = roles.to_vec();
        key.sort();
        key.dedup();
        let b = |k: &str, v: bool| (k.to_string(), RestrictedExpression::new_bool(v));
        let pairs = vec![
            b("widening", f.widening),
            b("narrowing", f.narrowing),
            b("self_widening", f.self_widening),
            b("care_active", f.care_active),
            b("self_access", f.self_access),
            b("same_provider", f.same_provider),
            b("explicit_scope", f.explicit_scope),
            b("has_scopes", f.has_scopes),
            b("token_allows", f.token_allows),
            ("purpose".to_string(), RestrictedExpression::new_string(f.purpose.clone())),
        ];
        let context = Context::from_pairs(pairs).map_err(|e| PolicyError::Evaluation(e.to_string()))?;
        let request = Request::new(self.user_uid(&key), self.change_fact.clone(), uid(&self.fact_name, kind.name()), context, None).map_err(|e| PolicyError::Evaluation(e.to_string()))?;
        Ok(self.verdict_of(&request, &entities))
    }

    fn verdict_of(&self, request: &Request, entities: &Entities) -> Verdict {
        let response = self.authorizer.is_authorized(request, &self.policies, entities);
        let errors: Vec<String> = response.diagnostics().errors().map(|e| e.to_string()).collect();
        if !errors.is_empty() {
            return Verdict { permit: false, rules: vec!["policy-error".into()], error: Some(errors.join("; ")) };
        }
        let mut rules: Vec<String> = response.diagnostics().reason().map(|id| id.to_string()).collect();
        rules.sort();
        Verdict { permit: response.decision() == CedarDecision::Allow, rules, error: None }
    }

    /// Checks a request's context against the schema (tests and `valv policy validate`).
    pub fn check_context(&self, action: Action, facts: &Facts) -> Result<(), PolicyError> {
        let action_uid = uid(&type_name("Valv::Action")?, action.cedar_name());
        let context = Context::from_pairs(facts.pairs()).map_err(|e| PolicyError::Evaluation(e.to_string()))?;
        Request::new(self.user_uid(&[]), action_uid, uid(&self.type_name, "Observation"), context, Some(&self.schema))
            .map(|_| ())
            .map_err(|e| PolicyError::Evaluation(e.to_string()))
    }
}

/// Cedar's parse error with the place it points at.
fn parse_message(e: &cedar_policy::ParseErrors) -> String {
    let mut out = e.to_string();
    for err in e.iter() {
        let detail = err.to_string();
        if !out.contains(&detail) {
            out.push_str(": ");
            out.push_str(&detail);
        }
    }
    out
}

fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or("").chars().take(80).collect()
}
