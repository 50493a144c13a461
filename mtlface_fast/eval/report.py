"""The evaluation report: JSON (everything, machine-readable) and a Markdown summary (the tables)."""
from __future__ import annotations

import json
import math
import os
from typing import Dict, List

from ..checkpoint import atomic_write


def _clean(x):
    """JSON-safe copy: numpy scalars/arrays to Python, non-finite floats to the strings 'inf'/'-inf'/'nan'."""
    import numpy as np
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, np.ndarray):
        return _clean(x.tolist())
    if isinstance(x, np.generic):
        return _clean(x.item())
    if isinstance(x, float) and not math.isfinite(x):
        return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")
    return x


def write_json(path: str, report: Dict) -> str:
    text = json.dumps(_clean(report), indent=2, allow_nan=False) + "\n"
    return atomic_write(path, lambda tmp: open(tmp, "w").write(text))


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.2f}"


def markdown(report: Dict) -> str:
    """The summary tables of a report made by :func:`mtlface_fast.eval.runner.evaluate`."""
    out: List[str] = ["# MTLFace evaluation", ""]
    m = report.get("model", {})
    out.append(f"Model: {m.get('source', '?')} ({', '.join(f'{k}={v}' for k, v in m.get('config', {}).items())}).  ")
    run = report.get("run", {})
    out.append(f"Device {run.get('device')}, dtype {run.get('dtype')}, flip TTA {'on' if run.get('flip') else 'off'}, "
               f"batch {run.get('batch_size')}; {run.get('images_encoded', 0)} image(s) encoded in "
               f"{run.get('encode_seconds', 0):.1f} s ({run.get('images_per_second', 0):.1f} img/s).")
    out.append("")
    ver = report.get("verification", {})
    if ver:
        fars = sorted({k for v in ver.values() for k in v.get("tar_at_far", {})}, key=float, reverse=True)
        out += ["## Verification (LFW protocol: threshold chosen on the other folds)", "",
                "| pair list | pairs used | excluded | folds | accuracy % | std % | "
                + " | ".join(f"TAR@FAR={f} %" for f in fars) + (" | " if fars else "") + "AUC | EER % |",
                "|---|---:|---:|---:|---:|---:|" + "---:|" * len(fars) + "---:|---:|"]
        for name, v in ver.items():
            tars = " | ".join(_pct(v.get("tar_at_far", {}).get(f)) for f in fars)
            auc = v.get("auc")
            out.append(f"| {name} | {v['n_pairs']} | {v['pairs']['n_excluded']} | {len(v['fold_accuracies'])} | "
                       f"{_pct(v['accuracy'])} | {_pct(v['std'])} | " + (tars + " | " if fars else "")
                       + f"{'-' if auc is None else f'{auc:.4f}'} | {_pct(v.get('eer'))} |")
        for name, v in ver.items():
            if v["pairs"]["n_excluded"]:
                p = v["pairs"]
                out.append(f"\n{name}: {p['n_excluded']} of {p['n_total']} pairs excluded "
                           f"({p['n_missing_files']} missing and {p.get('n_unreadable_files', 0)} unreadable image "
                           f"file(s); listed with their lines in the JSON report).")
            if v.get("by_age_gap", {}).get("bins"):
                b = v["by_age_gap"]
                out.append(f"\n{name}, accuracy by labelled age gap (years; each pair judged by its fold's threshold"
                           f"{'; ' + str(b['n_unknown']) + ' pair(s) without both ages' if b['n_unknown'] else ''}):\n")
                out.append("| age gap | " + " | ".join(b["bins"]) + " |")
                out.append("|---|" + "---:|" * len(b["bins"]))
                out.append("| pairs | " + " | ".join(str(x["n_pairs"]) for x in b["bins"].values()) + " |")
                out.append("| accuracy % | " + " | ".join(_pct(x["accuracy"]) for x in b["bins"].values()) + " |")
            if v.get("tar_skipped"):
                out.append(f"\n{name}: TAR@FAR {', '.join(v['tar_skipped'])} not reported ({v['n_impostor']} impostor "
                           f"pairs cannot resolve them).")
        out.append("")
    idn = report.get("identification", {})
    if idn:
        out += ["## Identification (closed set, ranked by identity)", "",
                "| split | probes | identified | gallery images | identities | rank-1 % | rank-5 % | rank-10 % |",
                "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for name, v in idn.items():
            out.append(f"| {name} | {v['n_probes']} | {v['n_identified']} | {v['n_gallery']} | {v['n_identities']} | "
                       f"{_pct(v['rank1'])} | {_pct(v['rank'].get('5'))} | {_pct(v['rank'].get('10'))} |")
        out.append("")
    age = report.get("age")
    if age:
        cs = age.get("cumulative_score", {})
        out += ["## Age estimation", "", "| images | MAE (years) | group accuracy % | group head % | "
                + " | ".join(f"CS@{k} %" for k in cs) + " |",
                "|---:|---:|---:|---:|" + "---:|" * len(cs),
                f"| {age['n']} | {age['mae']:.2f} | {_pct(age['group_accuracy'])} | "
                f"{_pct(age.get('group_accuracy_head'))} | " + " | ".join(_pct(v) for v in cs.values()) + " |", ""]
    syn = report.get("synthesis")
    if syn:
        G = syn["age_group"]
        labels = syn.get("group_labels", [str(g) for g in range(G)])
        out += ["## Synthesis", "",
                f"{syn['n_faces']} face(s) x {G} age groups. Identity preservation (cosine real vs aged) "
                f"{syn['identity_cosine_mean']:.4f} (min {syn['identity_cosine_min']:.4f}); age accuracy "
                f"{_pct(syn['age_accuracy'])} %.", "",
                "| target group | " + " | ".join(labels) + " |", "|---|" + "---:|" * G,
                "| identity cosine | " + " | ".join(f"{v:.3f}" for v in syn["identity_cosine_per_group"]) + " |",
                "| estimated age | " + " | ".join(f"{v:.1f}" for v in syn["mean_age_per_group"]) + " |",
                "| age accuracy % | " + " | ".join(_pct(v) for v in syn["age_accuracy_per_group"]) + " |", ""]
    failed = report.get("unreadable_images", {})
    if failed:
        out += [f"{len(failed)} image(s) could not be read and were excluded (see the JSON report).", ""]
    files = report.get("files", {})
    if files:
        out += ["Files: " + ", ".join(f"[{k}]({os.path.basename(v)})" for k, v in files.items()), ""]
    return "\n".join(out)


def write_markdown(path: str, report: Dict) -> str:
    text = markdown(report)
    return atomic_write(path, lambda tmp: open(tmp, "w").write(text))
