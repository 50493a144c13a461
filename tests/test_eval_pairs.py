"""Pair lists: the three formats, folds, missing files (reported with lines, excluded, counted), bad input."""
import os

import numpy as np
import pytest
from PIL import Image

from mtlface_fast.eval.pairs import format_missing, read_pairs


def _touch(root, *names):
    for n in names:
        p = os.path.join(root, n)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        Image.new("RGB", (4, 4)).save(p) if n.endswith((".png", ".jpg")) else open(p, "w").close()


def test_paths_format_labels_and_resolution(tmp_path):
    _touch(tmp_path, "a.jpg", "b.jpg", "c d.jpg")
    (tmp_path / "pairs.txt").write_text("# comment\na.jpg b.jpg 1\n\na.jpg b.jpg same\nb.jpg a.jpg diff\n"
                                        "a.jpg\tc d.jpg\tgenuine\nb.jpg b.jpg 0\n")
    pl = read_pairs(str(tmp_path / "pairs.txt"))
    assert pl.format == "paths" and pl.n_total == 5 and len(pl.pairs) == 5
    assert pl.labels.tolist() == [True, True, False, True, False]
    assert [p.line for p in pl.pairs] == [2, 4, 5, 6, 7]
    assert pl.pairs[3].right == str(tmp_path / "c d.jpg")
    assert pl.images() == [str(tmp_path / n) for n in ("a.jpg", "b.jpg", "c d.jpg")]
    assert pl.n_folds == 5  # a 5-pair list gets 5 folds


def test_lfw_format_with_header_folds(tmp_path):
    lines = ["2 2"]
    names = []
    for f in range(2):
        lines += [f"P{f} 1 2", f"Q{f} 1 2", f"P{f} 1 Q{f} 1", f"Q{f} 2 P{f} 2"]
        names += [f"P{f}/P{f}_0001.jpg", f"P{f}/P{f}_0002.jpg", f"Q{f}/Q{f}_0001.jpg", f"Q{f}/Q{f}_0002.jpg"]
    _touch(tmp_path / "lfw", *names)
    (tmp_path / "pairs.txt").write_text("\n".join(lines) + "\n")
    pl = read_pairs(str(tmp_path / "pairs.txt"), root=str(tmp_path / "lfw"))
    assert pl.format == "lfw" and pl.n_total == 8 and pl.n_folds == 2
    assert pl.folds.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert pl.labels.tolist() == [True, True, False, False] * 2
    assert pl.pairs[2].left == str(tmp_path / "lfw" / "P0" / "P0_0001.jpg")
    assert pl.pairs[2].right == str(tmp_path / "lfw" / "Q0" / "Q0_0001.jpg")


def test_header_before_path_lines_sets_the_folds(tmp_path):
    _touch(tmp_path, "a.jpg", "b.jpg")
    (tmp_path / "p.txt").write_text("3 1\n" + "a.jpg b.jpg 1\nb.jpg a.jpg 0\n" * 3)
    pl = read_pairs(str(tmp_path / "p.txt"))
    assert pl.format == "paths" and pl.folds.tolist() == [0, 0, 1, 1, 2, 2] and [p.line for p in pl.pairs][0] == 2


def test_calfw_two_line_format(tmp_path):
    _touch(tmp_path, "x1.jpg", "x2.jpg", "y1.jpg")
    (tmp_path / "pairs_CALFW.txt").write_text("x1.jpg 3\nx2.jpg 3\nx1.jpg 0\ny1.jpg 0\n")
    pl = read_pairs(str(tmp_path / "pairs_CALFW.txt"))
    assert pl.format == "calfw" and pl.labels.tolist() == [True, False] and [p.line for p in pl.pairs] == [1, 3]
    (tmp_path / "odd.txt").write_text("x1.jpg 3\nx2.jpg 3\nx1.jpg 0\n")
    with pytest.raises(ValueError, match="odd number"):
        read_pairs(str(tmp_path / "odd.txt"))
    (tmp_path / "disagree.txt").write_text("x1.jpg 3\nx2.jpg 0\n")
    with pytest.raises(ValueError, match=r"disagree.txt:1-2"):
        read_pairs(str(tmp_path / "disagree.txt"))


def test_missing_files_reported_with_lines_and_excluded(tmp_path):
    _touch(tmp_path, "a.jpg", "b.jpg")
    text = "".join(f"a.jpg b.jpg {i % 2}\n" for i in range(20))
    text = text.replace("a.jpg b.jpg 1\n", "a.jpg gone.jpg 1\n", 1)  # line 2
    text += "lost.jpg gone.jpg 0\n"                                    # line 21
    (tmp_path / "p.txt").write_text(text)
    pl = read_pairs(str(tmp_path / "p.txt"))
    assert pl.n_total == 21 and len(pl.pairs) == 19 and len(pl.excluded) == 2
    assert pl.missing == [(2, str(tmp_path / "gone.jpg")), (21, str(tmp_path / "lost.jpg")),
                          (21, str(tmp_path / "gone.jpg"))]
    # folds come from the full list: pair at line 2 (index 1) excluded, the others keep their fold
    full = np.repeat(np.arange(10), [3] + [2] * 9)
    keep = [i for i in range(21) if i not in (1, 20)]
    assert pl.folds.tolist() == full[keep].tolist()
    s = pl.summary()
    assert s["n_excluded"] == 2 and s["n_missing_files"] == 2 and s["missing"][0] == {"line": 2, "path":
                                                                                        str(tmp_path / "gone.jpg")}
    msg = format_missing(pl)
    assert "2 of 21 pair(s) excluded" in msg and "line 2:" in msg and "line 21:" in msg
    # without the check everything is kept
    assert len(read_pairs(str(tmp_path / "p.txt"), check_files=False).pairs) == 21


def test_all_missing_empty_and_malformed(tmp_path):
    (tmp_path / "gone.txt").write_text("x.jpg y.jpg 1\n")
    with pytest.raises(ValueError, match=r"all 1 pair\(s\) refer to missing images \(first: line 1"):
        read_pairs(str(tmp_path / "gone.txt"))
    (tmp_path / "empty.txt").write_text("\n# only a comment\n")
    with pytest.raises(ValueError, match="empty"):
        read_pairs(str(tmp_path / "empty.txt"))
    with pytest.raises(FileNotFoundError, match="pair list not found"):
        read_pairs(str(tmp_path / "absent.txt"))
    (tmp_path / "bad_label.txt").write_text("a.jpg b.jpg 1\na.jpg b.jpg maybe\n")
    with pytest.raises(ValueError, match=r"bad_label.txt:2: label 'maybe'"):
        read_pairs(str(tmp_path / "bad_label.txt"))
    (tmp_path / "bad_fields.txt").write_text("a.jpg b.jpg 1\na.jpg b.jpg 1 extra\n")
    with pytest.raises(ValueError, match=r"bad_fields.txt:2: expected 'left right label' \(3 fields\), got 4"):
        read_pairs(str(tmp_path / "bad_fields.txt"))
    (tmp_path / "bad_lfw.txt").write_text("10 300\nAlice 1 2\nAlice one\n")
    with pytest.raises(ValueError, match=r"bad_lfw.txt:3: expected LFW"):
        read_pairs(str(tmp_path / "bad_lfw.txt"))
    (tmp_path / "unknown.txt").write_text("just-one-token\n")
    with pytest.raises(ValueError, match="cannot tell the pair-list format"):
        read_pairs(str(tmp_path / "unknown.txt"))
    (tmp_path / "header_only.txt").write_text("10 300\n")
    with pytest.raises(ValueError, match="holds no pairs"):
        read_pairs(str(tmp_path / "header_only.txt"))
    with pytest.raises(ValueError, match="fmt must be"):
        read_pairs(str(tmp_path / "gone.txt"), fmt="csv")


def _png_bytes(seed):
    import io
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_insightface_bin_is_unpacked_into_a_pair_list(tmp_path):
    import pickle

    from mtlface_fast.eval.pairs import extract_bin
    imgs = [_png_bytes(i) for i in range(8)]
    issame = [True, False, np.bool_(True), False]
    with open(tmp_path / "agedb_30.bin", "wb") as fh:
        pickle.dump((imgs, issame), fh, protocol=2)
    txt = extract_bin(str(tmp_path / "agedb_30.bin"), str(tmp_path / "x"))
    pl = read_pairs(txt)
    assert pl.labels.tolist() == [True, False, True, False] and pl.format == "paths"
    assert open(pl.pairs[1].left, "rb").read() == imgs[2] and pl.pairs[1].right.endswith("000003.png")
    mtime = os.path.getmtime(txt)
    assert extract_bin(str(tmp_path / "agedb_30.bin"), str(tmp_path / "x")) == txt  # reused
    assert os.path.getmtime(txt) == mtime


def test_insightface_bin_refuses_code_and_bad_layouts(tmp_path):
    import pickle

    from mtlface_fast.eval.pairs import extract_bin

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    with open(tmp_path / "evil.bin", "wb") as fh:
        pickle.dump(([Evil(), b"x"], [True]), fh)
    with pytest.raises(ValueError, match="refusing to load"):
        extract_bin(str(tmp_path / "evil.bin"), str(tmp_path / "e"))
    with open(tmp_path / "odd.bin", "wb") as fh:
        pickle.dump(([_png_bytes(0)] * 3, [True]), fh)
    with pytest.raises(ValueError, match="3 images for 1 labels"):
        extract_bin(str(tmp_path / "odd.bin"), str(tmp_path / "o"))
    (tmp_path / "junk.bin").write_bytes(b"junk")
    with pytest.raises(ValueError, match="not a verification .bin"):
        extract_bin(str(tmp_path / "junk.bin"), str(tmp_path / "j"))
    with pytest.raises(FileNotFoundError):
        extract_bin(str(tmp_path / "none.bin"), str(tmp_path / "n"))


def test_sample_set_from_scikit_image(tmp_path):
    from mtlface_fast.eval.identification import read_identity_list
    from mtlface_fast.eval.sample import write_sample
    info = write_sample(str(tmp_path), variants=3, size=32, n_faces=5)
    assert info == dict(images=15, pairs=20, folder=str(tmp_path))
    pl = read_pairs(str(tmp_path / "pairs.txt"))
    assert len(pl.pairs) == 20 and pl.labels.tolist() == [True, False] * 10 and not pl.excluded
    assert Image.open(pl.pairs[0].left).size == (32, 32) and Image.open(pl.pairs[0].left).mode == "RGB"
    ids = read_identity_list(str(tmp_path / "identities.txt"))
    assert len(ids.paths) == 15 and len(set(ids.ids)) == 5
    with pytest.raises(ValueError, match="variants"):
        write_sample(str(tmp_path), variants=1)
