"""The continual-learning experiment's verdict and reports (benchmarks/continual.py runs it).

`select_lambda` applies the issue's rule to the variants (chosen on held-out sets only, never
on test); `markdown` writes one run's report, `seed_summary` / `seed_markdown` pool the runs
of several seeds.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import List, Optional

from benchmarks import CompareError

DEFAULT_SEED = 42  # results of other seeds get a _seed<N> suffix

DEFAULT_LAMBDAS = (0.0, 1e-5, 1e-4, 3e-4, 1e-3)
MATCH_B = 0.01  # issue #7: EWC + replay within 1 point of plain finetuning on what half B teaches
FORGET_RATIO = 0.5  # ... while forgetting at most half of what plain finetuning forgets on A


def select_lambda(variants: List[dict]) -> Optional[dict]:
    """Choose the EWC lambda on the held-out sets only (never test) and check issue #7's target.

    Among the accepted ewc_replay variants whose B held-out accuracy is within MATCH_B of
    plain finetuning's, the one that forgets least on A held-out (ties: the smaller lambda,
    then the smaller replay ratio, whole buffer last). Returns {"ewc_lambda", "replay_ratio",
    "forgetting_a", "plain_forgetting_a", "b_heldout_gap", "target_met", "why"} or None when
    there is no plain or no EWC variant to compare.
    """
    plain = next((v for v in variants if v["variant"] == "plain"), None)
    ewc = [v for v in variants if v["variant"] == "ewc_replay" and v["after"]["a_heldout"] is not None]
    if plain is None or not ewc or plain["after"]["b_heldout"] is None:
        return None
    pb, pf = plain["after"]["b_heldout"], plain["forgetting_a"]

    def gap(v):
        return round(pb - v["after"]["b_heldout"], 6)

    ok = [v for v in ewc if v["accepted"] and gap(v) <= MATCH_B + 1e-9]
    if not ok:
        return {"ewc_lambda": None, "replay_ratio": None, "forgetting_a": None, "plain_forgetting_a": pf,
                "b_heldout_gap": None,
                "target_met": False, "why": f"no accepted EWC + replay variant within {MATCH_B * 100:g} point of "
                                            "plain finetuning on B held-out"}
    best = min(ok, key=lambda v: (v["forgetting_a"], v["ewc_lambda"], _ratio_key(v.get("replay_ratio"))))
    f = best["forgetting_a"]
    if pf <= 0:
        met, why = None, (f"plain finetuning forgot nothing on A held-out ({pf * 100:+.2f} pts): "
                          "there is no forgetting to halve")
    else:
        met = f <= FORGET_RATIO * pf
        why = (f"forgets {f * 100:+.2f} pts on A vs plain {pf * 100:+.2f} pts "
               f"({'at most' if met else 'more than'} half), B held-out {gap(best) * 100:+.2f} pts below plain")
    return {"ewc_lambda": best["ewc_lambda"], "replay_ratio": best.get("replay_ratio"), "forgetting_a": f,
            "plain_forgetting_a": pf,
            "b_heldout_gap": gap(best), "target_met": met, "why": why}


def _ratio_key(ratio: Optional[float]) -> float:
    return float("inf") if ratio is None else ratio


def ratio_text(ratio: Optional[float]) -> str:
    """A replay ratio as a table cell: "all" for the whole buffer."""
    return "all" if ratio is None else format(ratio, "g")


def result_stem(dataset: str, protocol: str, seed: int, quick: bool) -> str:
    """File name (no suffix) of one run's results; runs with another seed than the default sit beside it."""
    return (f"continual_{dataset}{'_skewed' if protocol == 'skewed' else ''}"
            f"{'' if seed == DEFAULT_SEED else f'_seed{seed}'}{'_quick' if quick else ''}")


def _variant_key(v: dict) -> tuple:
    return v["variant"], v["ewc_lambda"], v.get("replay_ratio")


def _mean(xs: List[Optional[float]]) -> Optional[float]:
    return None if any(x is None for x in xs) else round(sum(xs) / len(xs), 6)


def seed_summary(out_dir: Path, dataset: str, protocol: str, quick: bool) -> Optional[dict]:
    """Pool the runs of one dataset and protocol made with different --seed values.

    One seed moves A and B held-out accuracy by single examples (0.2 points of 500), the size
    of the differences the target is about; the mean over seeds is what the verdict should
    rest on. Reads every `result_stem(dataset, protocol, <seed>, quick)` JSON in `out_dir`, keeps
    the update variants that every seed ran, averages each variant's accuracies and forgetting,
    and applies `select_lambda` (the same rule as one run's) to the means. Writes
    `<stem>_across_seeds.json` and `.md` and returns the summary, or None with fewer than two
    seeds. Runs whose recipe differs (epochs, update epochs, B held-out share) are an error:
    pooling them would average different experiments.
    """
    base = result_stem(dataset, protocol, DEFAULT_SEED, False)
    pattern = re.compile(re.escape(base) + r"(?:_seed(-?\d+))?" + ("_quick" if quick else "") + r"\.json")
    runs = []
    for path in sorted(out_dir.glob(f"{base}*.json")):
        if pattern.fullmatch(path.name):
            r = json.loads(path.read_text(encoding="utf-8"))
            if r.get("schema") == "slm360-continual/1" and r.get("protocol", "iid") == protocol:
                runs.append(r)
    runs.sort(key=lambda r: r["seed"])
    if len(runs) < 2:
        return None

    def recipe(r):
        return (r["half_a_model"]["epochs"], sorted({v["epochs"] for v in r["variants"]}), r.get("b_heldout_share"))
    if len({json.dumps(recipe(r)) for r in runs}) > 1:
        raise CompareError(f"{out_dir}: the {base} runs of seeds {[r['seed'] for r in runs]} differ in epochs or "
                             "B held-out share; re-run them with the same options before pooling")
    common = [_variant_key(v) for v in runs[0]["variants"]
              if all(any(_variant_key(w) == _variant_key(v) for w in r["variants"]) for r in runs[1:])]
    pooled = []
    for key in common:
        per = [next(w for w in r["variants"] if _variant_key(w) == key) for r in runs]
        after = {s: _mean([v["after"][s] for v in per]) for s in ("a_heldout", "b_heldout", "test")}
        pooled.append({"variant": key[0], "ewc_lambda": key[1], "replay_ratio": key[2],
                       "accepted": all(v["accepted"] for v in per), "after": after,
                       "forgetting_a": _mean([v["forgetting_a"] for v in per]),
                       "gain_b": _mean([v["gain_b"] for v in per]),
                       "seconds": round(sum(v["seconds"] for v in per) / len(per), 1),
                       "per_seed": [{"seed": r["seed"], "forgetting_a": v["forgetting_a"], "after": v["after"],
                                     "accepted": v["accepted"]} for r, v in zip(runs, per)]})
    before = {s: _mean([r["half_a_model"]["accuracy"][s] for r in runs]) for s in ("a_heldout", "b_heldout", "test")}
    summary = {"schema": "slm360-continual-seeds/1", "dataset": dataset, "protocol": protocol, "quick": quick,
               "seeds": [r["seed"] for r in runs], "split": runs[0]["split"], "half_a_before": before,
               "variants": pooled, "selection": select_lambda(pooled)}
    stem = out_dir / f"{result_stem(dataset, protocol, DEFAULT_SEED, quick)}_across_seeds"
    stem.with_suffix(".json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    stem.with_suffix(".md").write_text(seed_markdown(summary), encoding="utf-8")
    summary["files"] = {"json": str(stem.with_suffix(".json")), "md": str(stem.with_suffix(".md"))}  # not saved
    return summary


def _acc(x: Optional[float]) -> str:
    return "n/a" if x is None else format(x, ".4f")


def _pts(x: Optional[float], suffix: str = "") -> str:
    """An accuracy difference in points (+1.20), or n/a."""
    return "n/a" if x is None else format(100 * x, "+.2f") + suffix


def seed_markdown(s: dict) -> str:
    """The across-seeds summary as Markdown: per-seed figures and their means."""
    seeds = ", ".join(str(x) for x in s["seeds"])
    b = s["half_a_before"]
    L = [f"# Continual learning on {s['dataset']}, {len(s['seeds'])} seeds"
         f"{' (QUICK MODE: not benchmark figures)' if s['quick'] else ''}", "",
         f"Protocol: {s['protocol']}. Seeds {seeds}: each seed draws its own halves, held-out sets and training "
         "order. Per-seed reports: the `continual_*` files beside this one.", "",
         f"Half-A models, mean: A held-out {_acc(b['a_heldout'])}, B held-out {_acc(b['b_heldout'])}, "
         f"test {_acc(b['test'])}.", "",
         f"| update on B | EWC lambda | replay ratio | forgetting on A, pts (seeds {seeds}) | mean | "
         "B held-out (per seed) | mean | test, mean | guard accepted |", "|---|---|---|---|---|---|---|---|---|"]
    for v in s["variants"]:
        lam = "-" if v["ewc_lambda"] is None else f"{v['ewc_lambda']:g}"
        ratio = "-" if v["variant"] == "plain" else ratio_text(v["replay_ratio"])
        n_ok = sum(p["accepted"] for p in v["per_seed"])
        guard = "off" if v["variant"] == "plain" else f"{n_ok}/{len(v['per_seed'])}"
        per_a = " / ".join(_pts(p["forgetting_a"]) for p in v["per_seed"])
        per_b = " / ".join(_acc(p["after"]["b_heldout"]) for p in v["per_seed"])
        L.append(f"| {v['variant']} | {lam} | {ratio} | {per_a} | **{_pts(v['forgetting_a'])}** | {per_b} | "
                 f"**{_acc(v['after']['b_heldout'])}** | {_acc(v['after']['test'])} | {guard} |")
    if s.get("selection"):
        L += ["", _verdict(s["selection"], "On the means (same rule as one run: held-out sets only, test not used)")]
    L += ["", "Forgetting = A held-out accuracy before the update minus after (positive = forgotten).", ""]
    return "\n".join(L)



def _verdict(sel: dict, how: str) -> str:
    """One sentence: the EWC + replay setting `how` chose, and issue #7's target against it."""
    chosen = ("none" if sel["ewc_lambda"] is None else
              f"lambda {sel['ewc_lambda']:g}, replay ratio {ratio_text(sel.get('replay_ratio'))}")
    state = {True: "met", False: "MISSED", None: "not measurable"}[sel["target_met"]]
    return (f"{how}: **{chosen}**. Target (at most half of plain's forgetting, B within {MATCH_B * 100:g} point): "
            f"**{state}**: {sel['why']}.")


def markdown(r: dict) -> str:
    """The result as a Markdown report."""
    s, a = r["split"], r["half_a_model"]

    sk = r.get("skew")
    proto = ("Protocol: skewed update (half B keeps all examples of "
             f"{len(sk['focus_intents'])} focus intents, at most {sk['rest']} of each other intent)."
             if sk else "Protocol: halves drawn alike (stratified by intent).")
    L = [f"# Continual learning on {r['dataset']}{' (QUICK MODE: not benchmark figures)' if r['quick'] else ''}", "",
         proto, "",
         f"Machine: {r['machine'].get('cpu')} ({r['machine'].get('cores_usable')} cores). Seed {r['seed']}. "
         f"Half A: {s['half_a']} examples ({s['a_heldout']} of them held out by the model); half B: {s['half_b']} "
         f"({s['b_heldout']} held out, {s['b_train']} trained on). Test: {s['test']}.", "",
         f"Half-A model: {a['epochs']} epochs in {a['train_s']} s; "
         f"accuracy A held-out {_acc(a['accuracy']['a_heldout'])}, "
         f"B held-out {_acc(a['accuracy']['b_heldout'])}, test {_acc(a['accuracy']['test'])}.", "",
         "| update on B | EWC lambda | replayed per epoch | epochs | time s | A held-out | forgetting on A | "
         "B held-out | test | guard |", "|---|---|---|---|---|---|---|---|---|---|"]
    for v in r["variants"]:
        lam = "-" if v["ewc_lambda"] is None else f"{v['ewc_lambda']:g}"
        guard = "off" if v["guard"]["max_forgetting"] is None else ("accepted" if v["accepted"] else "REFUSED")
        per = v.get("replay_per_epoch", v["n_replay"])
        replayed = str(per) if per == v["n_replay"] else f"{per} of {v['n_replay']}"
        if v.get("replay_ratio") is not None:  # a ratio that reaches the buffer's size replays all of it
            replayed += f" (ratio {v['replay_ratio']:g})"
        L.append(f"| {v['variant']} | {lam} | {replayed} | {v['epochs']} | {v['seconds']} | "
                 f"{_acc(v['after']['a_heldout'])} | "
                 f"{_pts(v['forgetting_a'], ' pts')} | "
                 f"{_acc(v['after']['b_heldout'])} | {_acc(v['after']['test'])} | {guard} |")
    d = r.get("diet")
    if d:
        L.append(f"| DIET `--finetune` (anchor) | - | - | {d['epochs']} x {d['epoch_fraction']:g} | "
                 f"{d['finetune_s']} | "
                 f"{_acc(d['after']['a_heldout'])} | "
                 f"{_pts(d['forgetting_a'], ' pts')} | "
                 f"{_acc(d['after']['b_heldout'])} | {_acc(d['after']['test'])} | - |")
        L += ["", f"DIET half-A model ({d['epochs']} epochs, {d['n_half_a_trained']} examples: half A less the "
              f"A held-out ones) in {d['train_s']} s: A held-out {_acc(d['before']['a_heldout'])}, "
              f"B held-out {_acc(d['before']['b_heldout'])}, test {_acc(d['before']['test'])}."]
    if r.get("selection"):
        L += ["", _verdict(r["selection"], "Chosen on the held-out sets (least forgetting on A held-out among the "
                           f"accepted EWC + replay updates within {MATCH_B * 100:g} point of plain finetuning on B "
                           "held-out; test not used)")]
    L += ["", "Forgetting = A held-out accuracy before the update minus after (positive = forgotten). "
          "The accuracies after a refused update are those of the candidate the guard refused.", ""]
    return "\n".join(L)
