#!/usr/bin/env python3
"""Holds a critest run (ginkgo's JSON report) against e2e/critest/expected.tsv.

expected.tsv: one spec a line, `name<TAB>pass|fail|skip<TAB>reason` (the reason says why a spec
does not pass; empty for passes). Exit status 1 when an expected pass did not pass, or a spec is
missing from the run or from the file; specs that newly pass are listed ("update
expected.tsv") without failing. With --record, the file is rewritten from the run, keeping the
reasons it had and marking new non-passes "new: <first line of the failure>".

Usage: compare.py EXPECTED.tsv REPORT.json [--record]
"""
import json
import sys

STATES = {"passed": "pass", "failed": "fail", "skipped": "skip", "pending": "skip",
          "panicked": "fail", "interrupted": "fail", "aborted": "fail", "timedout": "fail"}


def results(report_path):
    out = {}
    for suite in json.load(open(report_path)):
        for s in suite.get("SpecReports") or []:
            if s.get("LeafNodeType") != "It":
                continue
            name = " ".join(list(s.get("ContainerHierarchyTexts") or []) + [s["LeafNodeText"]])
            name = " ".join(name.split())
            msg = ((s.get("Failure") or {}).get("Message") or "").strip().splitlines()
            out[name] = (STATES.get(s.get("State"), "fail"), msg[0][:160] if msg else "")
    return out


def expected(path):
    out = {}
    try:
        lines = open(path).read().splitlines()
    except FileNotFoundError:
        return out
    for line in lines:
        if not line.strip() or line.startswith("#"):
            continue
        parts = line.split("\t")
        out[parts[0]] = (parts[1], parts[2] if len(parts) > 2 else "")
    return out


def main():
    exp_path, report_path = sys.argv[1], sys.argv[2]
    record = "--record" in sys.argv[3:]
    got, want = results(report_path), expected(exp_path)
    counts = {}
    for state, _ in got.values():
        counts[state] = counts.get(state, 0) + 1
    print("critest: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
          + f" of {len(got)} specs")
    if record:
        with open(exp_path, "w") as f:
            f.write("# CRI validation suite: what berth passes. name<TAB>pass|fail|skip<TAB>why not\n")
            for name in sorted(got):
                state, msg = got[name]
                reason = "" if state == "pass" else (
                    want.get(name, ("", ""))[1] or ("new: " + msg if msg else "new"))
                f.write(f"{name}\t{state}\t{reason}\n")
        print(f"critest: wrote {exp_path}")
        return 0
    bad = []
    for name, (state, reason) in sorted(want.items()):
        if name not in got:
            bad.append(f"missing from the run: {name}")
        elif state == "pass" and got[name][0] != "pass":
            bad.append(f"expected to pass, {got[name][0]}: {name}: {got[name][1]}")
    for name in sorted(got):
        if name not in want:
            bad.append(f"not in expected.tsv ({got[name][0]}): {name}")
    newly = [n for n in sorted(want) if want[n][0] != "pass" and got.get(n, ("",))[0] == "pass"]
    for n in newly:
        print(f"critest: now passes, update expected.tsv: {n}")
    for b in bad:
        print(f"critest: {b}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
