"""``mtlface-fast eval``: measure a model the way the papers report it, on the data the user has.

Tasks (any combination; each needs its own input):

  --pairs LIST          verification on a pair list (repeatable; NAME=LIST names it): ECAF image_pairs,
                        LFW pairs.txt, CALFW/CPLFW pairs, 'left right label' lines (any benchmark, e.g.
                        CACD-VS exported), or an insightface .bin (agedb_30.bin, calfw.bin, ...).
                        10-fold accuracy (threshold from the other folds), TAR@FAR, AUC, EER, ROC PNG.
  --identify LIST       identification on 'path id [age] [role]' lines: rank-1 and CMC over a split
                        (--split loo | role | age), optionally with the gallery augmented by synthesized ages.
  --ages LABELS         age estimation against labels ('path age' lines or a JSON such as ECAF data.json):
                        MAE, group accuracy, cumulative score.
  --synthesis IMAGES    synthesis quality on faces (files or folders): identity cosine real vs aged, age
                        accuracy of the estimator on the outputs, PNG contact sheet.

Writes <out>/report.json (everything, with every excluded pair and its line) and <out>/summary.md.
Without --weights the model is a seeded random initialization (said plainly in the report).
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..demo import group_labels
from ..loading import add_model_arguments
from .age import age_metrics, read_age_labels
from .embed import DTYPES, Embedder, resolve_device
from .identification import SPLITS, cmc_png, cosine_matrix, identification_metrics, read_identity_list, split_probe_gallery
from .pairs import FORMATS, extract_bin, format_missing, read_pairs
from .report import write_json, write_markdown
from .synthesis import contact_sheet, synthesis_metrics
from .verification import DEFAULT_FARS, accuracy_by_gap, roc_curve, roc_png, verification_metrics

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def _named(specs: Sequence[str]) -> List[Tuple[str, str]]:
    """``NAME=PATH`` or ``PATH`` -> (name, path); names default to the file stem, made unique."""
    out, seen = [], set()
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or os.sep in name:
            name, path = os.path.splitext(os.path.basename(spec))[0], spec
        base, k = name, 2
        while name in seen:
            name, k = f"{base}_{k}", k + 1
        seen.add(name)
        out.append((name, path))
    return out


def image_files(specs: Sequence[str]) -> List[str]:
    """Image files from a list of files and folders (folders: their images, sorted, not recursive)."""
    files = []
    for s in specs:
        if os.path.isdir(s):
            found = sorted(os.path.join(s, f) for f in os.listdir(s) if f.lower().endswith(IMAGE_EXTS))
            if not found:
                raise ValueError(f"--synthesis folder {s} holds no images ({', '.join(IMAGE_EXTS)})")
            files += found
        elif os.path.isfile(s):
            files.append(s)
        else:
            raise FileNotFoundError(f"--synthesis: no such file or folder: {s}")
    return files


def _synthesize(model, emb: Embedder, x: torch.Tensor):
    """Every age group of a batch: (aged images (B, G, 3, S, S) clamped to [-1, 1], embeddings (B, G, D),
    estimated ages (B, G)), on the embedder's device."""
    with torch.inference_mode(), emb.autocast():
        aged = model.synthesize_all_ages(x).float().clamp_(-1, 1)
    B, G = aged.shape[:2]
    e, a, _ = emb.encode_tensor(aged.flatten(0, 1))
    return aged, e.view(B, G, -1), a.view(B, G)


def _norm(path: str) -> str:
    return os.path.normpath(os.path.abspath(path))


def _batches(n: int, size: int):
    return [(i, min(i + size, n)) for i in range(0, n, size)]


def evaluate(model, *, pairs: Sequence[Tuple[str, str]] = (), root: Optional[str] = None, pairs_format: str = "auto",
             n_folds: int = 10, lfw_ext: str = ".jpg", identify: Optional[str] = None, identify_root: Optional[str] = None,
             split: str = "loo", split_age: float = 18.0, augment_gallery: bool = False,
             ages: Optional[str] = None, ages_root: Optional[str] = None, synthesis: Sequence[str] = (),
             sheet_rows: int = 8, out: str = "eval_out", batch_size: int = 64, flip: Optional[bool] = None,
             dtype: str = "fp32",
             workers: int = 4, progress: bool = True, cache: Optional[str] = None, fars=DEFAULT_FARS,
             source: str = "", log=print) -> Dict:
    """Run the requested evaluations with ``model`` (already on its device) and write the reports.

    Returns the report dict (also written to ``<out>/report.json``; the tables go to ``<out>/summary.md``).
    """
    if not (pairs or identify or ages or synthesis):
        raise ValueError("nothing to evaluate: give --pairs, --identify, --ages and/or --synthesis")
    if isinstance(sheet_rows, bool) or not isinstance(sheet_rows, int) or sheet_rows < 0:
        raise ValueError(f"sheet_rows must be an int >= 0, got {sheet_rows!r}")
    device = next(model.parameters()).device
    G = model.config["age_group"]
    emb = Embedder(model, device, batch_size=batch_size, flip=flip, dtype=dtype, workers=workers, progress=progress)
    if cache:
        n = emb.load_cache(cache)
        log(f"embedding cache {cache}: {n} entr{'y' if n == 1 else 'ies'} reused")
    report: Dict = dict(model=dict(source=source, config=model.config, cls=type(model).__name__),
                        run=dict(device=str(device), dtype=dtype, flip=emb.flip, batch_size=batch_size,
                                 torch=torch.__version__, python=platform.python_version(),
                                 argv=sys.argv[1:]),
                        verification={}, identification={}, files={})
    t_start = time.perf_counter()

    labels_map: Optional[Dict[str, float]] = None
    if ages:  # read first: verification reports accuracy by the pairs' labelled age gap
        labels_map, age_info = read_age_labels(ages, root=ages_root)
        norm_ages = {_norm(p): a for p, a in labels_map.items()}

    # -- verification ------------------------------------------------------------------------------------------
    curves = {}
    for name, path in pairs:
        if path.lower().endswith(".bin"):  # insightface verification bin: unpack once under <out>/bins/
            path = extract_bin(path, os.path.join(out, "bins", name))
            pl = read_pairs(path, fmt="paths", n_folds=n_folds)
        else:
            pl = read_pairs(path, root=root, fmt=pairs_format, n_folds=n_folds, ext=lfw_ext)
        msg = format_missing(pl)
        if msg:
            log(msg)
        enc = emb.encode_paths(pl.images(), desc=f"{name}")
        index = {p: i for i, p in enumerate(enc["paths"])}
        keep = [k for k, p in enumerate(pl.pairs) if p.left in index and p.right in index]
        unreadable = [(p.line, q, emb.failed[q]) for p in pl.pairs for q in (p.left, p.right) if q in emb.failed]
        if unreadable:
            log(f"{path}: {len(pl.pairs) - len(keep)} more pair(s) excluded, {len(unreadable)} unreadable image(s):")
            for line, q, why in unreadable[:20]:
                log(f"  line {line}: {q} ({why})")
        if not keep:
            raise ValueError(f"pair list {path}: no pair left to evaluate (every pair has a missing or unreadable image)")
        left = enc["embedding"][[index[pl.pairs[k].left] for k in keep]]
        right = enc["embedding"][[index[pl.pairs[k].right] for k in keep]]
        scores = (left.astype(np.float64) * right).sum(1)
        labels = pl.labels[keep]
        folds = pl.folds[keep]
        if np.unique(folds).size < 2:
            raise ValueError(f"pair list {path}: {len(keep)} usable pair(s) do not fill 2 folds; cross-validation "
                             f"needs more pairs")
        m = verification_metrics(scores, labels, folds=folds, fars=fars)
        summary = pl.summary()
        summary["n_excluded"] += len(pl.pairs) - len(keep)
        summary["unreadable"] = [dict(line=ln, path=q, reason=why) for ln, q, why in unreadable]
        summary["n_unreadable_files"] = len({q for _, q, _ in unreadable})
        m["pairs"] = summary
        if labels_map:
            a_l = [norm_ages.get(_norm(pl.pairs[k].left), np.nan) for k in keep]
            a_r = [norm_ages.get(_norm(pl.pairs[k].right), np.nan) for k in keep]
            gaps = np.abs(np.asarray(a_l, dtype=np.float64) - np.asarray(a_r, dtype=np.float64))
            if np.isfinite(gaps).any():
                m["by_age_gap"] = accuracy_by_gap(scores, labels, gaps, folds,
                                                  dict(zip(np.unique(folds).tolist(), m["thresholds"])))
        report["verification"][name] = m
        if m.get("n_genuine") and m.get("n_impostor"):
            fpr, tpr, _ = roc_curve(scores, labels)
            curves[name] = (fpr, tpr)
            m["roc"] = _thin_roc(fpr, tpr)
        tars = ", ".join(f"TAR@FAR={k} {100 * v:.2f}%" for k, v in m.get("tar_at_far", {}).items())
        log(f"{name}: accuracy {100 * m['accuracy']:.2f}% +- {100 * m['std']:.2f} on {m['n_pairs']} pairs "
            f"({summary['n_excluded']} excluded){'; ' + tars if tars else ''}")
    if curves:
        report["files"]["roc"] = roc_png(os.path.join(out, "roc.png"), curves, title="ROC (verification)")

    # -- identification ----------------------------------------------------------------------------------------
    if identify:
        lst = read_identity_list(identify, root=identify_root)
        for line, p in lst.missing[:20]:
            log(f"{identify}: line {line}: missing image {p} (excluded)")
        if lst.missing:
            log(f"{identify}: {len(lst.missing)} missing image(s) excluded")
        enc = emb.encode_paths(lst.paths, desc="identify")
        ok = [i for i, p in enumerate(lst.paths) if p not in emb.failed]
        if len(ok) < len(lst.paths):
            log(f"{identify}: {len(lst.paths) - len(ok)} unreadable image(s) excluded")
            for f in ("paths", "ids", "ages", "roles", "lines"):
                setattr(lst, f, [getattr(lst, f)[i] for i in ok])
        index = {p: i for i, p in enumerate(enc["paths"])}
        E = enc["embedding"][[index[p] for p in lst.paths]]
        probe, gallery, exclude = split_probe_gallery(lst, split, split_age)
        ids = np.asarray(lst.ids)
        sim = cosine_matrix(E[probe], E[gallery])
        base = dict(split=split, split_age=split_age if split == "age" else None, source=identify,
                    n_missing=len(lst.missing), missing=[dict(line=ln, path=p) for ln, p in lst.missing])
        m = identification_metrics(sim, ids[probe], ids[gallery], exclude=exclude)
        report["identification"][split] = {**base, **m}
        log(f"identification ({split}): rank-1 {100 * m['rank1']:.2f}% over {m['n_identified']} probe(s), "
            f"{m['n_identities']} identities ({m['n_unmatched']} probe(s) without a gallery match)")
        if augment_gallery:
            gal_paths = [lst.paths[i] for i in gallery]
            aged_embs = []
            step = max(1, batch_size // G) if device.type == "cuda" else max(1, min(4, batch_size))
            bar = _bar(progress, len(gal_paths), "synthesize gallery")
            for a, b in _batches(len(gal_paths), step):
                _, x = emb.load_images(gal_paths[a:b])
                if x is None or x.size(0) != b - a:
                    raise ValueError("a gallery image became unreadable during synthesis")
                _, e, _ = _synthesize(model, emb, x.to(device))
                aged_embs.append(e.cpu().numpy())
                bar.update(b - a)
            bar.close()
            aged = np.concatenate(aged_embs)                          # (Ng, G, D)
            g_all = np.concatenate([E[gallery], aged.reshape(-1, aged.shape[-1])])
            g_src = np.concatenate([gallery, np.repeat(gallery, G)])  # source image of each gallery entry
            sim = cosine_matrix(E[probe], g_all)
            ex = (probe[:, None] == g_src[None, :]) if split == "loo" else None
            m = identification_metrics(sim, ids[probe], ids[g_src], exclude=ex)
            report["identification"][f"{split}+synthesized"] = {**base, **m, "gallery_augmented": True}
            log(f"identification ({split}, gallery + {G} synthesized ages each): rank-1 {100 * m['rank1']:.2f}%")

    if report["identification"]:
        report["files"]["cmc"] = cmc_png(os.path.join(out, "cmc.png"),
                                         {k: v["cmc"] for k, v in report["identification"].items()},
                                         title="CMC (identification)")

    # -- age estimation ---------------------------------------------------------------------------------------
    if ages:
        present = [p for p in labels_map if os.path.isfile(p)]
        missing = [p for p in labels_map if not os.path.isfile(p)]
        if missing:
            log(f"{ages}: {len(missing)} labelled image(s) not found, excluded (first: {missing[0]})")
        if not present:
            raise ValueError(f"{ages}: none of the {len(labels_map)} labelled images exists; check --ages-root")
        enc = emb.encode_paths(present, desc="ages")
        true = np.array([labels_map[p] for p in enc["paths"]])
        m = age_metrics(enc["age"], true, G, group_logits=enc["group_logits"])
        m.update(age_info, n_missing=len(missing), missing=missing,
                 n_unreadable=len(present) - len(enc["paths"]))
        report["age"] = m
        log(f"age: MAE {m['mae']:.2f} years, group accuracy {100 * m['group_accuracy']:.2f}% on {m['n']} image(s)")

    # -- synthesis ---------------------------------------------------------------------------------------------
    if synthesis:
        files = image_files(synthesis)
        step = max(1, batch_size // G) if device.type == "cuda" else max(1, min(4, batch_size))
        reals, ageds, aged_ages, sheet_src, sheet_aged, sheet_names = [], [], [], [], [], []
        bar = _bar(progress, len(files), "synthesis")
        t0 = time.perf_counter()
        for a, b in _batches(len(files), step):
            ok, x = emb.load_images(files[a:b])
            bar.update(b - a)
            if x is None:
                continue
            x = x.to(device)
            r, _, _ = emb.encode_tensor(x)
            aged, e, ag = _synthesize(model, emb, x)
            reals.append(r.cpu().numpy())
            ageds.append(e.cpu().numpy())
            aged_ages.append(ag.cpu().numpy())
            room = sheet_rows - len(sheet_names)
            if room > 0:
                sheet_src.append(x[:room].cpu())
                sheet_aged.append(aged[:room].cpu())
                sheet_names += [os.path.basename(p) for p in ok[:room]]
        bar.close()
        if not reals:
            raise ValueError("--synthesis: none of the images could be read")
        m = synthesis_metrics(np.concatenate(reals), np.concatenate(ageds), np.concatenate(aged_ages), G)
        m["group_labels"] = group_labels(G)
        m["seconds"] = time.perf_counter() - t0
        unread = [f for f in files if f in emb.failed]
        m["unreadable"] = [dict(path=f, reason=emb.failed[f]) for f in unread]
        report["synthesis"] = m
        if sheet_names:
            report["files"]["contact_sheet"] = contact_sheet(
                os.path.join(out, "contact_sheet.png"), torch.cat(sheet_src), torch.cat(sheet_aged), m["group_labels"],
                captions=sheet_names, title=f"synthesized ages ({source})")
        log(f"synthesis: identity cosine {m['identity_cosine_mean']:.4f}, age accuracy {100 * m['age_accuracy']:.2f}% "
            f"on {m['n_faces']} face(s)")

    # -- run info and files -------------------------------------------------------------------------------------
    run = report["run"]
    run.update(images_encoded=emb.n_forward_images, encode_seconds=emb.seconds,
               images_per_second=emb.n_forward_images / emb.seconds if emb.seconds > 0 else 0.0,
               total_seconds=time.perf_counter() - t_start)
    report["unreadable_images"] = dict(emb.failed)
    if cache:
        try:
            report["files"]["cache"] = emb.save_cache(cache)
        except ValueError:
            pass
    report["files"]["json"] = os.path.join(out, "report.json")
    report["files"]["summary"] = os.path.join(out, "summary.md")
    write_json(report["files"]["json"], report)
    write_markdown(report["files"]["summary"], report)
    log(f"wrote {report['files']['json']} and {report['files']['summary']}")
    return report


def _thin_roc(fpr: np.ndarray, tpr: np.ndarray, n: int = 400) -> Dict:
    """At most ~n ROC points for the JSON (log-spaced in FAR; the exact curve can be huge)."""
    if fpr.size <= n:
        return dict(fpr=fpr.tolist(), tpr=tpr.tolist())
    lo = max(fpr[fpr > 0].min(), 1e-9) if (fpr > 0).any() else 1e-9
    grid = np.r_[0.0, np.logspace(np.log10(lo), 0, n - 1)]
    idx = np.searchsorted(fpr, grid, side="right") - 1  # last point with fpr <= grid value
    idx = np.unique(np.clip(idx, 0, fpr.size - 1))
    return dict(fpr=fpr[idx].tolist(), tpr=tpr[idx].tolist())


class _NoBar:
    def update(self, n):
        pass

    def close(self):
        pass


def _bar(progress: bool, total: int, desc: str):
    if not progress:
        return _NoBar()
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="img", file=sys.stderr, dynamic_ncols=True)


# -- command line ---------------------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    g = p.add_argument_group("verification")
    g.add_argument("--pairs", action="append", default=[], metavar="[NAME=]LIST",
                   help="pair list (repeatable): 'left right label' lines, LFW pairs.txt, CALFW format, "
                        "or an insightface verification .bin")
    g.add_argument("--root", help="folder the pair lists' image paths are relative to (default: each list's folder)")
    g.add_argument("--pairs-format", default="auto", choices=FORMATS, help="pair-list format (auto)")
    g.add_argument("--folds", type=int, default=10, help="cross-validation folds without an LFW header (10)")
    g.add_argument("--lfw-ext", default=".jpg", help="image extension of LFW-style names (.jpg)")
    g.add_argument("--far", type=float, action="append", default=None,
                   help="false-accept rates for TAR@FAR (repeatable; default 1e-2 .. 1e-6)")
    g = p.add_argument_group("identification")
    g.add_argument("--identify", metavar="LIST", help="'path id [age] [role]' lines")
    g.add_argument("--identify-root", help="folder the list's paths are relative to (default: the list's folder)")
    g.add_argument("--split", default="loo", choices=SPLITS,
                   help="loo: leave-one-out; role: 4th column probe/gallery; age: probes younger than --split-age")
    g.add_argument("--split-age", type=float, default=18.0, help="age split: probes are younger than this (18)")
    g.add_argument("--augment-gallery", action="store_true",
                   help="also rank against a gallery augmented with every synthesized age of each gallery image")
    g = p.add_argument_group("age estimation")
    g.add_argument("--ages", metavar="LABELS", help="'path age' lines or a JSON (e.g. ECAF data.json)")
    g.add_argument("--ages-root", help="folder the label paths are relative to (default: the file's folder)")
    g = p.add_argument_group("synthesis")
    g.add_argument("--synthesis", nargs="+", default=[], metavar="IMAGE_OR_DIR", help="faces to age")
    g.add_argument("--sheet-rows", type=int, default=8, help="faces shown in the contact sheet (8)")
    g = p.add_argument_group("run")
    g.add_argument("--out", default="eval_out", help="output folder (eval_out)")
    g.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:N")
    g.add_argument("--batch-size", type=int, default=64, help="images per forward (64)")
    g.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="fp32 (exact), bf16 or fp16 autocast")
    g.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None,
                   help="flip test-time augmentation (image + mirrored image); default: the model's (on for the "
                        "TPAMI release, as its encode; off for the CVPR model)")
    g.add_argument("--workers", type=int, default=4, help="image-decoding threads (4)")
    g.add_argument("--cache", help="an .npz embedding cache to reuse and update (keyed by the model's weights)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")


def _precheck(args) -> None:
    """Read every input list once before the model is built, so that bad input fails in a second."""
    if not (args.pairs or args.identify or args.ages or args.synthesis):
        raise ValueError("nothing to evaluate: give --pairs, --identify, --ages and/or --synthesis")
    for _, path in _named(args.pairs):
        if path.lower().endswith(".bin"):
            if not os.path.isfile(path):
                raise FileNotFoundError(f"verification .bin not found: {path}")
        else:
            read_pairs(path, root=args.root, fmt=args.pairs_format, n_folds=args.folds, ext=args.lfw_ext)
    if args.identify:
        read_identity_list(args.identify, root=args.identify_root)
    if args.ages:
        read_age_labels(args.ages, root=args.ages_root)
    if args.synthesis:
        image_files(args.synthesis)


def execute(args, log=print) -> int:
    from ..loading import load_model_from_args
    device = resolve_device(args.device)
    _precheck(args)
    model, source = load_model_from_args(args)
    if args.weights is None:
        log(f"NOTE: no --weights given; using a {source}. The numbers are meaningless for a real model.")
    model = model.to(device).eval()
    evaluate(model, pairs=_named(args.pairs), root=args.root, pairs_format=args.pairs_format, n_folds=args.folds,
             lfw_ext=args.lfw_ext, identify=args.identify, identify_root=args.identify_root, split=args.split,
             split_age=args.split_age, augment_gallery=args.augment_gallery, ages=args.ages, ages_root=args.ages_root,
             synthesis=args.synthesis, sheet_rows=args.sheet_rows, out=args.out, batch_size=args.batch_size,
             flip=args.flip, dtype=args.dtype, workers=args.workers, progress=not args.no_progress, cache=args.cache,
             fars=tuple(args.far) if args.far else DEFAULT_FARS, source=source, log=log)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="mtlface-fast eval", description=__doc__,
                                formatter_class=argparse.RawTextHelpFormatter)
    add_arguments(p)
    return execute(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
