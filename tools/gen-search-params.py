#!/usr/bin/env python3
"""Generates crates/valv-fhir/src/r4/search-params.txt from the R4 SearchParameter resources.

    python3 tools/gen-search-params.py PACKAGE_DIR > crates/valv-fhir/src/r4/search-params.txt

PACKAGE_DIR is an unpacked hl7.fhir.r4.examples@4.0.1 (its `SearchParameter-*.json` are the
R4 definitions; `.ci/run` unpacks it under target/ci-r4examples/package). Every parameter of
kind string, token, reference, date, number, quantity, uri or composite whose FHIRPath
expression is made of what Valv's paths express is written, one line per (type, parameter):

    Type<TAB>name<TAB>kind<TAB>paths<TAB>target<TAB>components

paths      '|'-separated element paths: names separated by '.', `name[x]` for any choice,
           `name[field=value]` keeping only elements whose `field` is `value`; '' for the
           resource itself (composites on the resource)
target     '-', or the one type a reference must point at (`.where(resolve() is X)`)
components '-', or for a composite `kind=path,path;kind=path` (paths relative to each element
           at `paths`), in the order of the value's `$`-separated parts

Left out, and listed on stderr: expressions with extensions, `[0]`, `exists()` and other
functions Valv's paths do not express, and the one `special` parameter.
"""
import glob
import json
import os
import re
import sys

KINDS = {"string", "token", "reference", "date", "number", "quantity", "uri", "composite"}


def element_of_type(name, type_name):
    """`value` as `Quantity` is the element `valueQuantity`."""
    return name + type_name[0].upper() + type_name[1:]


def translate(expr, base):
    """One '|' alternative of an expression for `base` -> (path, target) or None."""
    e = expr.strip()
    if e.startswith("(") and e.endswith(")"):
        e = e[1:-1].strip()
    m = re.fullmatch(r"(.+?) as (\w+)", e)
    if m:
        e = m.group(1).strip()
        e = e[:-len(e.split(".")[-1])] + element_of_type(e.split(".")[-1], m.group(2))
    e = re.sub(r"\.as\((\w+)\)", lambda m: "\x00" + m.group(1), e)
    e = re.sub(r"\.ofType\((\w+)\)", lambda m: "\x00" + m.group(1), e)
    target = None
    m = re.search(r"\.where\(resolve\(\) is (\w+)\)$", e)
    if m:
        target = m.group(1)
        e = e[: m.start()]
    e = re.sub(r"\.where\((\w+)='([^']*)'\)", lambda m: "[" + m.group(1) + "=" + m.group(2) + "]", e)
    if not (e == base or e.startswith(base + ".")):
        return None
    rest = e[len(base) + 1:] if e != base else ""
    # `.as(T)` after a name: the choice element of that type.
    while "\x00" in rest:
        i = rest.index("\x00")
        head = rest[:i]
        m = re.match(r"\w+", rest[i + 1:])
        name = re.split(r"[.\[]", head)[-1] if head else ""
        if not name:
            return None
        rest = head[: len(head) - len(name)] + element_of_type(name, m.group(0)) + rest[i + 1 + len(m.group(0)):]
    if re.search(r"[()\s]", rest) or "[0]" in rest:
        return None
    return rest, target


def choice_elements(pkg):
    """Every choice element of the R4 resources and data types (`Observation.effective`)."""
    out = set()
    for f in glob.glob(os.path.join(pkg, "StructureDefinition-*.json")):
        sd = json.load(open(f))
        if sd.get("derivation") != "specialization":
            continue
        for el in sd.get("snapshot", {}).get("element", []):
            if el["path"].endswith("[x]"):
                out.add(el["path"][:-3])
    return out


CHOICES = set()


def mark_choices(base, path):
    """`effective` on Observation is `effective[x]`: any of its typed elements."""
    if not path:
        return path
    segments = re.split(r"\.(?![^\[]*\])", path)
    for i in range(len(segments)):
        name = re.match(r"\w+", segments[i]).group(0)
        if base + "." + ".".join(re.sub(r"\[.*\]", "", x) for x in segments[: i + 1]) in CHOICES:
            segments[i] = name + "[x]" + segments[i][len(name):]
    return ".".join(segments)


def paths_for(expression, base):
    out, targets = [], set()
    for alt in expression.split(" | "):
        alt = alt.strip()
        if not re.match(r"\(?" + re.escape(base) + r"\b", alt):
            continue
        t = translate(alt, base)
        if t is None:
            return None, None
        out.append(mark_choices(base, t[0]))
        targets.add(t[1])
    if not out:
        return None, None
    # A target only when every alternative names the same one.
    target = targets.pop() if len(targets) == 1 else None
    return out, target


def relative_paths(expression):
    """A composite component's expression: relative to the composite's element."""
    out = []
    for alt in expression.split(" | "):
        t = translate("X." + alt.strip() if not alt.strip().startswith("(") else "(X." + alt.strip()[1:], "X")
        if t is None:
            return None
        out.append(t[0])
    return out


def main():
    pkg = sys.argv[1]
    sps = [json.load(open(f)) for f in sorted(glob.glob(os.path.join(pkg, "SearchParameter-*.json")))]
    core = [s for s in sps if s.get("url", "").startswith("http://hl7.org/fhir/SearchParameter/") and s.get("base")]
    by_url = {s["url"]: s for s in core}
    CHOICES.update(choice_elements(pkg))
    rows, skipped = [], []
    for s in core:
        kind, expression = s.get("type"), s.get("expression", "")
        if kind not in KINDS or not expression or "extension" in expression or s["code"].startswith("_"):
            skipped.append(f"{s['id']}: {kind} {expression[:80]}")
            continue
        for base in s["base"]:
            paths, target = paths_for(expression, base)
            if paths is None:
                skipped.append(f"{s['id']} on {base}: {expression[:80]}")
                continue
            components = "-"
            if kind == "composite":
                parts = []
                for c in s.get("component", []):
                    d = by_url.get(c["definition"])
                    rel = relative_paths(c["expression"])
                    if d is None or rel is None or d["type"] not in KINDS - {"composite"}:
                        parts = None
                        break
                    parts.append(d["type"] + "=" + ",".join(rel))
                if not parts:
                    skipped.append(f"{s['id']} on {base}: composite {expression[:60]}")
                    continue
                components = ";".join(parts)
            rows.append((base, s["code"], kind, "|".join(paths), target or "-", components))
    rows.sort()
    seen = set()
    for r in rows:
        if (r[0], r[1]) in seen:
            continue
        seen.add((r[0], r[1]))
        print("\t".join(r))
    for s in skipped:
        print("left out: " + s, file=sys.stderr)
    print(f"{len(seen)} parameters written, {len(skipped)} left out", file=sys.stderr)


main()
