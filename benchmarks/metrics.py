"""Metrics of the DIET vs SLM360 benchmark (benchmarks/compare.py), as plain functions.

Kept free of Rasa so they can be unit-tested on hand-made inputs and recomputed from the
saved JSON (benchmarks/report.py). Definitions follow ../shared/baselines/README.md:

* intent accuracy takes the top *non-fallback* intent: when FallbackClassifier put
  `nlu_fallback` on top, the next intent of `intent_ranking` is the prediction;
* accuracy after fallback counts a message whose top intent is `nlu_fallback` as wrong;
* macro F1 is sklearn's `f1_score(average="macro")` over the union of gold and predicted
  labels (sklearn's default), with 0 for a label that is never predicted;
* entity micro F1 counts a predicted entity as correct only when (start, end, label) all
  equal a gold entity of the same message (exact span, character offsets);
* out-of-scope recall is the share of out-of-scope messages whose top intent is `nlu_fallback`;
* ECE uses 15 equal-width confidence bins over the top non-fallback intent's confidence.

`summarize` and `summarize_valid` turn the evaluation process's raw parses
(benchmarks/_rasa_eval.py) into the metrics and per-message records a result saves.
"""
from __future__ import annotations

import math
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np

# One ECE for the benchmark and the model's own calibration report (slm360_rasa has no Rasa import).
from slm360_rasa.train.calibration import ECE_BINS, expected_calibration_error, reliability_bins  # noqa: F401

from benchmarks.datasets import Dataset, eval_splits

FALLBACK_INTENT = "nlu_fallback"  # rasa.shared.constants.DEFAULT_NLU_FALLBACK_INTENT_NAME

Span = Tuple[int, int, str]  # (start, end, label), end exclusive


def top_non_fallback(parse: Mapping) -> Tuple[Optional[str], float]:
    """Name and confidence of the best intent that is not `nlu_fallback`.

    `parse` is the dict returned by `Agent.parse_message`. FallbackClassifier puts
    `nlu_fallback` first in `intent_ranking` and keeps the classifier's ranking below it,
    so the first other entry is what the classifier predicted. (None, 0.0) if there is none.
    """
    ranking = parse.get("intent_ranking") or []
    for entry in ranking:
        name = entry.get("name")
        if name and name != FALLBACK_INTENT:
            return name, float(entry.get("confidence") or 0.0)
    # Some classifiers set `intent` without a ranking.
    intent = parse.get("intent") or {}
    name = intent.get("name")
    if name and name != FALLBACK_INTENT:
        return name, float(intent.get("confidence") or 0.0)
    return None, 0.0


def accuracy(y_true: Sequence, y_pred: Sequence) -> float:
    """Share of positions where y_pred equals y_true (nan for empty inputs)."""
    _same_length(y_true, y_pred)
    if not y_true:
        return float("nan")
    return sum(t == p for t, p in zip(y_true, y_pred)) / len(y_true)


def macro_f1(y_true: Sequence[str], y_pred: Sequence[Optional[str]]) -> float:
    """Unweighted mean of per-label F1 over gold and predicted labels (sklearn).

    A missing prediction (None) is mapped to a label of its own so it counts as wrong.
    """
    from sklearn.metrics import f1_score

    _same_length(y_true, y_pred)
    if not y_true:
        return float("nan")
    y_pred = ["<none>" if p is None else p for p in y_pred]
    return float(f1_score(list(y_true), y_pred, average="macro", zero_division=0))


def entity_micro_f1(gold: Sequence[Iterable[Span]], pred: Sequence[Iterable[Span]]) -> Dict[str, float]:
    """Micro precision/recall/F1 of exact (start, end, label) entity matches, per message.

    Duplicate spans within one message count once (two extractors may emit the same span).
    P, R or F1 is 0 when its denominator is 0 but the other side is not; F1 is nan when
    there are neither gold nor predicted entities at all (nothing to measure).
    """
    _same_length(gold, pred)
    tp = n_gold = n_pred = 0
    for g, p in zip(gold, pred):
        gs = {(int(s), int(e), str(lab)) for s, e, lab in g}
        ps = {(int(s), int(e), str(lab)) for s, e, lab in p}
        tp += len(gs & ps)
        n_gold += len(gs)
        n_pred += len(ps)
    if n_gold == 0 and n_pred == 0:
        return {"precision": float("nan"), "recall": float("nan"), "f1": float("nan"),
                "tp": 0, "n_gold": 0, "n_pred": 0}
    precision = tp / n_pred if n_pred else 0.0
    recall = tp / n_gold if n_gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "tp": tp, "n_gold": n_gold, "n_pred": n_pred}


def oos_recall(top_intents: Sequence[Optional[str]]) -> float:
    """Share of out-of-scope messages whose top intent is `nlu_fallback` (nan for none)."""
    if not top_intents:
        return float("nan")
    return sum(t == FALLBACK_INTENT for t in top_intents) / len(top_intents)


def percentile(values: Sequence[float], q: float) -> float:
    """q-th percentile with linear interpolation (numpy's default); nan for no values."""
    if len(values) == 0:
        return float("nan")
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def bits_to_str(flags: Iterable[bool]) -> str:
    """Pack booleans as a '0'/'1' string: compact in JSON and readable."""
    return "".join("1" if f else "0" for f in flags)


def str_to_bits(s: str) -> List[bool]:
    """Inverse of bits_to_str; raises ValueError on any character other than 0/1."""
    bad = set(s) - {"0", "1"}
    if bad:
        raise ValueError(f"not a 0/1 flag string: unexpected characters {sorted(bad)}")
    return [c == "1" for c in s]


def finite_or_none(x: Optional[float], ndigits: int = 6) -> Optional[float]:
    """Round a float for JSON; nan/inf/None become None (JSON has no nan)."""
    if x is None:
        return None
    x = float(x)
    if math.isnan(x) or math.isinf(x):
        return None
    return round(x, ndigits)


def mcnemar_p(a_only: int, b_only: int) -> float:
    """Exact two-sided McNemar p-value: the probability, if both systems were equally accurate,
    of a split of the discordant messages (right for one system only) at least this uneven.
    Binomial(a_only + b_only, 1/2), both tails, capped at 1; 1.0 when nothing is discordant."""
    n, k = a_only + b_only, min(a_only, b_only)
    if n == 0:
        return 1.0
    # Exact integer sum, then one division: no underflow for thousands of discordant pairs.
    tail = sum(math.comb(n, i) for i in range(k + 1))
    return min(1.0, 2 * tail / 2 ** n)


def paired_accuracy_difference(correct_a: Sequence[bool], correct_b: Sequence[bool], n_boot: int = 10_000,
                               seed: int = 0) -> Dict[str, float]:
    """How sure is "B is more accurate than A" on the same test messages?

    Returns the accuracy difference B - A, its 95 % interval from a paired bootstrap (the
    messages are resampled, each keeping both systems' outcomes; seeded, so the report is
    reproducible), the discordant counts and the exact McNemar p-value.
    """
    _same_length(correct_a, correct_b)
    a = np.asarray(correct_a, dtype=bool)
    b = np.asarray(correct_b, dtype=bool)
    n = len(a)
    if n == 0:
        raise ValueError("no messages to compare")
    d = b.astype(np.int8) - a.astype(np.int8)  # (n,) per-message difference in {-1, 0, 1}
    rng = np.random.default_rng(seed)
    sums = np.empty(n_boot, dtype=np.int64)
    step = max(1, 2_000_000 // n)  # resamples per batch: bounded memory for large test sets
    for i in range(0, n_boot, step):
        idx = rng.integers(0, n, size=(min(step, n_boot - i), n))  # (batch, n) resampled message indices
        sums[i:i + len(idx)] = d[idx].sum(axis=1)
    lo, hi = np.percentile(sums / n, [2.5, 97.5])
    a_only, b_only = int((a & ~b).sum()), int((b & ~a).sum())
    return {"n": n, "difference": float(d.mean()), "ci95_low": float(lo), "ci95_high": float(hi),
            "a_only": a_only, "b_only": b_only, "mcnemar_p": mcnemar_p(a_only, b_only)}


def _same_length(a: Sequence, b: Sequence) -> None:
    if len(a) != len(b):
        raise ValueError(f"inputs differ in length: {len(a)} vs {len(b)}")


def fallback_outcome(in_conf: Sequence[float], in_correct: Sequence[bool], oos_conf: Sequence[float],
                     threshold: float) -> Dict[str, float]:
    """What FallbackClassifier with `threshold` (ambiguity check off) would give.

    Its rule is `confidence < threshold -> nlu_fallback` on the classifier's top intent, so
    from the recorded top non-fallback confidences: in-scope accuracy (a fallback counts as
    wrong), the in-scope fallback rate and the out-of-scope recall (share that falls back).
    """
    _same_length(in_conf, in_correct)
    ic = np.asarray(in_conf, dtype=np.float64)
    ok = np.asarray(in_correct, dtype=bool)
    oc = np.asarray(oos_conf, dtype=np.float64)
    keep = ic >= threshold
    return {"threshold": float(threshold),
            "accuracy": float((ok & keep).mean()) if len(ic) else float("nan"),
            "fallback_rate_in_scope": float((~keep).mean()) if len(ic) else float("nan"),
            "oos_recall": float((oc < threshold).mean()) if len(oc) else float("nan")}


def choose_fallback_threshold(in_conf: Sequence[float], in_correct: Sequence[bool], oos_conf: Sequence[float],
                              max_accuracy_drop: float = 0.01) -> Dict[str, float]:
    """The FallbackClassifier threshold with the highest out-of-scope recall whose in-scope
    accuracy is at most `max_accuracy_drop` below the accuracy without fallback.

    Meant for validation splits (valid + oos_valid); apply the result to test with
    `fallback_outcome`. Candidates are 0 and the midpoints between distinct recorded
    confidences (every threshold between two neighbours gives the same outcome, and a
    midpoint does not sit on a rounded confidence). Ties go to the lowest threshold.
    """
    _same_length(in_conf, in_correct)
    if not len(in_conf) or not len(oos_conf):
        raise ValueError("need in-scope and out-of-scope validation messages to choose a threshold")
    values = np.unique(np.concatenate([np.asarray(in_conf, np.float64), np.asarray(oos_conf, np.float64)]))
    candidates = np.concatenate([[0.0], (values[:-1] + values[1:]) / 2, [values[-1] + 1e-6]])
    base = fallback_outcome(in_conf, in_correct, oos_conf, 0.0)["accuracy"]
    best = None
    for t in candidates:
        out = fallback_outcome(in_conf, in_correct, oos_conf, float(t))
        if out["accuracy"] >= base - max_accuracy_drop - 1e-12 and (best is None or out["oos_recall"] > best["oos_recall"]):
            best = out
    best["accuracy_without_fallback"] = base
    best["max_accuracy_drop"] = max_accuracy_drop
    return best


# ---------------------------------------------------------------------------- raw parses -> result records


def split_results(ds: Dataset, raw: dict) -> List[list]:
    """The raw parses cut into the lists of `eval_splits(ds)`, in the same order."""
    out, pos = [], 0
    for split in eval_splits(ds):
        out.append(raw["results"][pos:pos + len(split)])
        pos += len(split)
    return out


def top_intent(r: dict) -> Tuple[Optional[str], float]:
    """Top non-fallback intent and its confidence of one raw parse from _rasa_eval.py."""
    return top_non_fallback({"intent": {"name": r["intent"], "confidence": r["confidence"]},
                               "intent_ranking": [{"name": a, "confidence": b} for a, b in r["ranking"]]})


def summarize_valid(ds: Dataset, raw: dict) -> dict:
    """Per-message records of the validation splits: gold, top non-fallback intent and its
    confidence (in-scope `valid`), confidence (`oos_valid`). Empty dict when there are none."""
    _, _, valid_results, oos_valid_results = split_results(ds, raw)
    out = {}
    if ds.valid:
        top = [top_intent(r) for r in valid_results]
        out["valid_per_message"] = {
            "n": len(top), "gold": [e.intent for e in ds.valid], "pred": [t[0] for t in top],
            "confidence": [round(t[1], 4) for t in top],
            "accuracy": finite_or_none(accuracy([e.intent for e in ds.valid], [t[0] for t in top]))}
    if ds.oos_valid:
        out["oos_valid_per_message"] = {"n": len(oos_valid_results),
                                        "confidence": [round(top_intent(r)[1], 4) for r in oos_valid_results]}
    return out


def summarize(ds: Dataset, raw: dict) -> Tuple[dict, dict, Optional[dict], list]:
    """Metrics, compact per-message records, OOS records and reliability bins from raw parses."""
    n = len(ds.test)
    results, oos_results, _, _ = split_results(ds, raw)
    gold = [e.intent for e in ds.test]
    pred, conf = [], []
    for r in results:
        name, c = top_intent(r)
        pred.append(name)
        conf.append(c)
    # Rounded as stored in per_message, so ECE recomputed from the JSON is exactly this one.
    conf = [round(c, 4) for c in conf]
    correct = [p == g for p, g in zip(pred, gold)]
    fallback = [r["intent"] == FALLBACK_INTENT for r in results]
    lat = [round(r["latency_ms"], 3) for r in results]  # as stored: P50/P99 recompute exactly
    has_entities = any(e.entities for e in ds.train) or any(e.entities for e in ds.test)
    ent = entity_micro_f1([e.entities for e in ds.test], [[tuple(x) for x in r["entities"]] for r in results]) \
        if has_entities else None
    labels = sorted(set(gold) | {p for p in pred if p is not None})
    index = {name: i for i, name in enumerate(labels)}
    metrics = {
        "n_test": n,
        "accuracy": accuracy(gold, pred),
        "macro_f1": macro_f1(gold, pred),
        "entity_micro_f1": ent["f1"] if ent else None,
        "entity_precision": ent["precision"] if ent else None,
        "entity_recall": ent["recall"] if ent else None,
        "fallback_rate_in_scope": sum(fallback) / n if n else None,
        "accuracy_after_fallback": sum(c and not f for c, f in zip(correct, fallback)) / n if n else None,
        "ece": expected_calibration_error(conf, correct),
        "mean_confidence": sum(conf) / n if n else None,
        "parse_p50_ms": percentile(lat, 50),
        "parse_p99_ms": percentile(lat, 99),
        "parse_mean_ms": sum(lat) / n if n else None,
        "n_oos": None, "oos_recall": None,
    }
    metrics = {k: (finite_or_none(v) if isinstance(v, float) else v) for k, v in metrics.items()}
    per_message = {
        "labels": labels,
        "gold": [index[g] for g in gold],
        "pred": [index[p] if p is not None else -1 for p in pred],
        "confidence": conf,
        "correct": bits_to_str(correct),
        "fallback": bits_to_str(fallback),
        "latency_ms": lat,
    }
    if ent:
        per_message["entity_counts"] = {k: ent[k] for k in ("tp", "n_gold", "n_pred")}
    oos = None
    if ds.oos is not None:
        top = [r["intent"] for r in oos_results]
        metrics["n_oos"] = len(top)
        metrics["oos_recall"] = finite_or_none(oos_recall(top))
        oos = {"fallback": bits_to_str(t == FALLBACK_INTENT for t in top),
               "confidence": [round(top_non_fallback({"intent_ranking": [{"name": a, "confidence": b}
                                                                            for a, b in r["ranking"]]})[1], 4)
                              for r in oos_results],
               "latency_ms": [round(r["latency_ms"], 3) for r in oos_results]}
    reliability = [{k: (finite_or_none(v, 4) if isinstance(v, float) else v) for k, v in b.items()}
                   for b in reliability_bins(conf, correct)]
    return metrics, per_message, oos, reliability
